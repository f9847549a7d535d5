"""03_rmsnorm.py: the Triton kernels (run by the interpreter on CPU) against the reference and F.rms_norm."""

import harness

import pytest
import torch
from conftest import load_build

rms = load_build("03_rmsnorm")
DEVICE = harness.pick_device()


def test_reference_matches_formula():
    x = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([1.0, 2.0])
    # mean(x^2) = 12.5, rms = sqrt(12.5); y = [3, 8] / sqrt(12.5)
    expected = torch.tensor([[3.0, 8.0]]) / 12.5**0.5
    torch.testing.assert_close(rms.rmsnorm(x, w, eps=0.0), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 576), (5, 1000), (2, 3, 4096), (33, 3), (1, 5119)])
def test_forward_and_backward(shape, dtype):
    M, N = (int(torch.tensor(shape[:-1]).prod()), shape[-1])
    assert rms.check_forward(M, N, dtype, DEVICE) < harness.TOLERANCES[dtype]
    assert rms.check_backward(M, N, dtype, DEVICE) < harness.TOLERANCES[dtype]


def test_leading_dims_are_kept():
    x = torch.randn(2, 3, 64, device=DEVICE)
    w = torch.rand(64, device=DEVICE) + 0.5
    y = rms.rmsnorm_triton(x, w)
    assert y.shape == x.shape
    harness.assert_close(y, rms.rmsnorm(x.double(), w.double()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual(dtype):
    assert rms.check_fused_residual(9, 768, dtype, DEVICE) < harness.TOLERANCES[dtype]


def test_module_cpu_path_and_fused_call():
    norm = rms.RMSNorm(32)
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    y, h = norm(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, rms.rmsnorm(x + r, norm.weight))


def test_bad_inputs_raise_clear_errors():
    w = torch.ones(8, device=DEVICE)
    with pytest.raises(TypeError, match="accepted: float32, bfloat16, float16"):
        rms.rmsnorm_triton(torch.ones(2, 8, dtype=torch.int32, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight shape"):
        rms.rmsnorm_triton(torch.ones(2, 9, device=DEVICE), w)
    with pytest.raises(ValueError, match="residual"):
        rms.add_rmsnorm_triton(torch.ones(2, 8, device=DEVICE), torch.ones(3, 8, device=DEVICE), w)
    with pytest.raises(ValueError, match="hidden size"):
        big = rms.MAX_N + 1
        rms.rmsnorm_triton(torch.ones(1, big, device=DEVICE), torch.ones(big, device=DEVICE))


def test_weight_read_through_its_strides():
    """A strided weight (every other element of a larger tensor) and an expanded one (stride 0)."""
    x = torch.randn(5, 16, device=DEVICE)
    big = torch.rand(32, device=DEVICE) + 0.5
    w = big[::2]
    harness.assert_close(rms.rmsnorm_triton(x, w), rms.rmsnorm(x.double(), w.double()), torch.float32)
    w = torch.tensor([2.0], device=DEVICE).expand(16)
    harness.assert_close(rms.rmsnorm_triton(x, w), rms.rmsnorm(x.double(), w.double()), torch.float32)
    # and through the backward, with the fused residual
    w = big[::2].clone().requires_grad_()
    ws = w.detach().clone()
    strided = torch.empty(32, device=DEVICE)
    strided[::2] = ws
    strided_w = strided[::2].requires_grad_()
    x.requires_grad_()
    dy = torch.randn_like(x)
    ref = torch.autograd.grad(rms.rmsnorm_triton(x, w), (x, w), dy)
    got = torch.autograd.grad(rms.rmsnorm_triton(x, strided_w), (x, strided_w), dy)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)


def test_empty_batch_forward_and_backward():
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    w = (torch.rand(64, device=DEVICE) + 0.5).requires_grad_()
    y = rms.rmsnorm_triton(x, w)
    assert y.shape == (0, 64)
    dx, dw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("eps", [None, "1e-6", -1.0, float("nan"), True])
def test_bad_eps_raises_clear_error(eps):
    x, w = torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    with pytest.raises((TypeError, ValueError), match="eps"):
        rms.rmsnorm_triton(x, w, eps)
    with pytest.raises((TypeError, ValueError), match="eps"):
        rms.add_rmsnorm_triton(x, x, w, eps)


def test_reference_in_float64_is_float64():
    x = torch.randn(4, 1000, dtype=torch.float64)
    w = torch.rand(1000, dtype=torch.float64) + 0.5
    exact = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    assert rms.rmsnorm(x, w).dtype == torch.float64
    assert harness.rel_err(rms.rmsnorm(x, w), exact) < 1e-14


def test_fused_residual_fp16_is_bit_exact():
    """fp16 stores round to nearest in the interpreter too (only bf16 truncates there), so h = x + r
    must equal PyTorch's sum bit for bit on every device."""
    x, w, r = rms._inputs(33, 1000, torch.float16, DEVICE, residual=True)
    y, h = rms.add_rmsnorm_triton(x, r, w)
    assert torch.equal(h, x + r)
