"""07_adamw.py: the three AdamW implementations against torch.optim.AdamW, the variants against their
papers' rules, state_dict round trips, and the fused kernel's tables (Triton's interpreter on CPU)."""

import copy
import os
import subprocess
import sys

import harness

import pytest
import torch
from conftest import ROOT, load_build

adamw = load_build("07_adamw")
DEVICE = harness.pick_device()
FORMS = ("single", "foreach") + (("fused",) if adamw._torch_fused_available(DEVICE) else ())


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a CPU thread pool costs more than it saves (see main() in 07_adamw.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_first_step_by_hand():
    # Step 1 with m0 = v0 = 0: mhat = g, vhat = g^2, so theta = theta (1 - lr wd) - lr g / (|g| + eps).
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    p.grad = torch.tensor([0.5, 0.25, -4.0])
    opt = adamw.AdamW([p], lr=0.1, weight_decay=0.5, eps=0.25, impl="loop")
    opt.step()
    expected = torch.tensor([1.0, -2.0, 0.5]) * 0.95 - 0.1 * torch.tensor(
        [0.5 / 0.75, 0.25 / 0.5, -4.0 / 4.25]
    )
    torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("impl", list(adamw.IMPLS))
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)])
def test_adamw_matches_torch(impl, amsgrad, maximize):
    # 120 steps, three param groups, a decaying lr, a parameter that skips every third step
    assert adamw.check_adamw_vs_torch(impl, DEVICE, amsgrad, maximize, FORMS) < 1e-5


@pytest.mark.parametrize("impl", list(adamw.IMPLS))
def test_state_dict_round_trip(impl):
    assert adamw.check_state_dict(impl, DEVICE) < 1e-5


def test_fused_bf16_keeps_fp32_state():
    assert adamw.check_fused_bf16(DEVICE) < harness.TOLERANCES[torch.float32]


def test_fused_bf16_check_catches_a_wrong_step_size(monkeypatch):
    fused = adamw.IMPLS["fused"]
    monkeypatch.setitem(adamw.IMPLS, "fused", lambda *a, **hp: fused(*a, **{**hp, "lr": hp["lr"] * 0.97}))
    with pytest.raises(AssertionError, match="bf16 steps apart"):
        adamw.check_fused_bf16(DEVICE)


def test_fused_one_launch_per_step_and_strided_params():
    assert adamw.check_fused_launches(DEVICE) < 1e-5


def test_fused_splits_launches_only_when_steps_differ():
    ps = adamw._make_params(((100,), (50,)), torch.float32, DEVICE, 0)
    opt = adamw.AdamW(ps, impl="fused", block_size=64)
    for t in range(4):
        ps[0].grad, ps[1].grad = torch.randn_like(ps[0]), None if t == 1 else torch.randn_like(ps[1])
        opt.step()
    # step 1: one launch; step 2: only ps[0]; steps 3 and 4: counts 3 and 2 differ -> two launches each
    assert opt.launches[0] == 1 + 1 + 2 + 2
    assert [opt.state[p]["step"].item() for p in ps] == [4.0, 3.0]


def test_block_map_example():
    ts = [torch.zeros(5), torch.zeros(300)]
    _, numels, block_tensor, block_start, aligned = adamw._fused_tables([ts] * 5, 128, torch.device("cpu"))
    assert numels.tolist() == [5, 300]
    assert block_tensor.tolist() == [0, 1, 1, 1]
    assert block_start.tolist() == [0, 0, 128, 256]


@pytest.mark.parametrize("name", ["lion", "ademamix", "sophia"])
def test_variants_match_paper_transcription(name):
    assert adamw.check_variant(name, DEVICE) < 1e-5


def test_lion_moves_every_coordinate_by_lr():
    p = torch.nn.Parameter(torch.randn(50))
    before = p.detach().clone()
    p.grad = torch.randn(50)
    adamw.Lion([p], lr=0.01).step()
    torch.testing.assert_close((p.detach() - before).abs(), torch.full((50,), 0.01))


def test_muon_singular_values_and_adamw_half():
    assert "singular values" in adamw.check_muon(DEVICE)


def test_muon_matches_float64_transcription():
    # momentum, Nesterov, the tall-weight scale and weight decay on a (160, 64) and a (64, 160) weight
    assert adamw.check_muon_vs_ref(DEVICE) < 1e-4


def test_muon_param_groups_split():
    model = adamw.CharMLP(vocab=11)
    muon, rest = adamw.muon_param_groups(model)
    assert [p.shape for p in muon["params"]] == [model.fc.weight.shape]
    assert len(rest["params"]) == 4  # embedding, fc bias, head weight and bias


def test_gnb_estimator_is_unbiased():
    assert adamw.check_gnb(DEVICE) < 0.1


def test_state_bytes_per_param():
    p = torch.nn.Parameter(torch.randn(10, 10))
    p.grad = torch.randn(10, 10)
    for opt, expected in ((adamw.AdamW([p]), 8), (adamw.Lion([p]), 4), (adamw.AdEMAMix([p]), 12)):
        opt.step()
        assert adamw.state_bytes_per_param(opt) == expected


def test_bad_inputs_raise_clear_errors():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="accepted: loop, foreach, fused"):
        adamw.AdamW([p], impl="cuda")
    with pytest.raises(ValueError, match="lr must be >= 0"):
        adamw.AdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        adamw.AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="power of two"):
        adamw.AdamW([p], block_size=100)
    with pytest.raises(ValueError, match="b1, b2, b3"):
        adamw.AdEMAMix([p], betas=(0.9, 0.999))
    with pytest.raises(ValueError, match="use_muon"):
        adamw.Muon([{"params": [p]}])
    with pytest.raises(ValueError, match="2 or more dims"):
        adamw.Muon([{"params": [p], "use_muon": True}])
    q = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    q.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        adamw.AdamW([q], impl="fused").step()


@pytest.mark.parametrize("cls", [adamw.AdamW, adamw.Lion, adamw.AdEMAMix, adamw.Sophia])
def test_tensor_hyperparameters_act_as_floats(cls):
    # torch.optim accepts 1-element tensors for betas, eps and weight_decay; they act as the floats
    kw = {"weight_decay": 0.1, "betas": (0.9, 0.99) + ((0.999,) if cls is adamw.AdEMAMix else ())}
    if cls is not adamw.Lion:
        kw["eps"] = 1e-6
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731 (float64: exactly the float)
    as_tensors = {k: tuple(map(t, v)) if k == "betas" else t(v) for k, v in kw.items()}
    a, b = (adamw._make_params(((5, 3), (4,)), torch.float32, DEVICE, 8) for _ in range(2))
    opt_a, opt_b = cls(a, lr=1e-2, **kw), cls(b, lr=1e-2, **as_tensors)
    for _ in range(3):
        for x, y in zip(a, b, strict=True):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        opt_a.step(), opt_b.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(type(v) is float for v in opt_b.param_groups[0]["betas"])
    with pytest.raises(ValueError, match="one element"):
        cls(b, lr=1e-2, **{**kw, "weight_decay": torch.tensor([0.1, 0.2])})


def test_tensor_lr_and_state_from_torch_fused():
    # a 0-d tensor lr acts as the float; torch fused AdamW state (step a tensor) loads and continues
    a, b = (adamw._make_params(((40, 3), (17,)), torch.float32, DEVICE, 9) for _ in range(2))
    ref = torch.optim.AdamW(b, lr=2e-3, fused="fused" in FORMS)
    ours = adamw.AdamW(a, lr=torch.tensor(2e-3), impl="foreach")
    for step in range(6):
        for x, y in zip(a, b, strict=True):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        ref.step(), ours.step()
        if step == 2:
            ours = adamw.AdamW(a, lr=2e-3, impl="loop")
            ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # a copy: not the live tensors
            assert ours.state[a[0]]["step"].device.type == "cpu"
    for x, y in zip(a, b, strict=True):
        harness.assert_close(x, y, torch.float32)


PTX_SCRIPT = r"""
import re, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
except ImportError as e:
    print(f"no GPUTarget in triton {triton.__version__}: {e}", file=sys.stderr)
    sys.exit(3)
sys.path.insert(0, sys.argv[1])
import harness
adamw = harness.load_build("07_adamw")
warps = adamw.AdamW([adamw.torch.zeros(1)]).num_warps
for p_dtype in (0, 1):  # fp32, bf16 parameters
    sig = {n: "*i64" for n in ("P_ADDR", "G_ADDR", "M_ADDR", "V_ADDR", "VMAX_ADDR", "NUMELS", "BLOCK_START")}
    sig["BLOCK_TENSOR"] = "*i32"
    sig.update({n: "fp32" for n in ("decay", "w1", "beta2", "w2", "neg_step_size", "bc2_sqrt", "eps")})
    consts = dict(P_DTYPE=p_dtype, AMSGRAD=False, MAXIMIZE=False, ALIGNED=True, RNE_BF16=False,
                  BLOCK=adamw.FUSED_BLOCK)
    sig.update({c: "constexpr" for c in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(8)}
    src = triton.compiler.ASTSource(fn=adamw._adamw_kernel, signature=sig, constexprs=consts, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
    print(p_dtype, adamw.FUSED_BLOCK // (32 * warps), len(re.findall(r"ld\.global\.v4\.b32 ", ptx)),
          len(re.findall(r"st\.global\.v4\.b32 ", ptx)))
"""


def test_fused_kernel_compiles_to_128_bit_accesses_for_sm90():
    # Compiles (no GPU needed) for an H100/H200 with the default launch and counts 128-bit accesses in
    # the unmasked path: p, g, m, v read and p, m, v written, each thread's elements in 16-byte pieces.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", PTX_SCRIPT, str(ROOT)], env=env, capture_output=True, text=True
    )
    last = proc.stderr.strip().splitlines()[-1:]
    if proc.returncode == 3 or (proc.returncode != 0 and "Cannot find ptxas" in proc.stderr):
        pytest.skip(f"cannot compile for sm_90 here: {last}")  # an old Triton, or no ptxas
    assert proc.returncode == 0, f"offline compile failed:\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1"], f"expected a line per parameter dtype: {lines}"
    for line in lines:
        p_dtype, per_thread, loads, stores = map(int, line.split())
        v4_state = per_thread * 4 // 16  # fp32 m and v
        v4_param = per_thread * (4 if p_dtype == 0 else 2) // 16  # p and g in the parameter dtype
        assert v4_param >= 1 and (loads, stores) == (2 * v4_param + 2 * v4_state, v4_param + 2 * v4_state)
