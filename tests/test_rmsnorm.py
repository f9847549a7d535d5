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
