"""06_flash: every check of the build on small shapes (Triton interpreter on CPU, fp16 dots).

Each test draws fresh random inputs and poisons the outputs with NaN before the kernels run; shapes
are chosen off the 16-wide interpreter blocks so the masked tails are exercised.
"""

import contextlib

import harness

import pytest
import torch
from conftest import load_build

mod = load_build("06_flash")
DEVICE = harness.pick_device()
F16 = torch.float16  # bf16 tl.dot is wrong in the Triton 3.9 interpreter; bf16 is checked on the GPU


@pytest.mark.parametrize(
    "shape",
    [
        (1, 2, 2, 37, 37, 64, False),  # tail, full attention
        (1, 2, 2, 45, 45, 64, True),  # tail, causal
        (2, 4, 2, 33, 33, 128, True),  # GQA, D=128
        (1, 4, 1, 29, 53, 32, False),  # MQA, Nq < Nk, D=32
        (1, 2, 2, 50, 19, 16, False),  # Nq > Nk, D=16
        (1, 2, 1, 16, 16, 128, False),  # exactly one block
    ],
)
def test_forward_and_gradients_match_float64_and_sdpa(shape):
    note = mod.check_dense(*shape, F16, DEVICE)  # raises on any error over the fp16 tolerance
    assert "vs f64" in note


def test_saved_log_sum_exp():
    assert mod.check_lse(DEVICE) < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_each_sequence_alone(causal):
    # a zero-length prompt, a one-token prompt, and cached prefixes (len_k > len_q) for the last two
    mod.check_varlen([37, 1, 0, 20, 9], [37, 1, 5, 20, 30], 4, 2, 64, causal, F16, DEVICE)


def test_causal_first_row_is_first_value():
    # hand-checkable: under a causal mask query 0 sees only key 0, so its output is exactly v[0]
    q, k, v = (torch.randn(1, 2, 20, 32, dtype=F16, device=DEVICE) for _ in range(3))
    out = mod.flash_attention(q, k, v, causal=True, poison=True)
    assert torch.allclose(out[:, :, 0].float(), v[:, :, 0].float(), atol=1e-3)


def test_gqa_reads_kv_in_place_and_grads_sum_over_group():
    # GQA equals MHA on repeated kv heads; the kv-head gradient is the sum over its group of q heads
    q = torch.randn(1, 4, 24, 32, dtype=F16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, 2, 24, 32, dtype=F16, device=DEVICE, requires_grad=True) for _ in range(2))
    k_rep, v_rep = (t.detach().repeat_interleave(2, dim=1).requires_grad_() for t in (k, v))
    do = torch.randn(1, 4, 24, 32, dtype=F16, device=DEVICE)
    out = mod.flash_attention(q, k, v, causal=True)
    out_rep = mod.flash_attention(q, k_rep, v_rep, causal=True)
    harness.assert_close(out, out_rep, F16, "gqa vs repeated")
    dk, dv = torch.autograd.grad(out, (k, v), do)
    dk_rep, dv_rep = torch.autograd.grad(out_rep, (k_rep, v_rep), do)
    harness.assert_close(dk, dk_rep.view(1, 2, 2, 24, 32).sum(2), F16, "dk")
    harness.assert_close(dv, dv_rep.view(1, 2, 2, 24, 32).sum(2), F16, "dv")


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_query_group_in_dkdv_matches_reference(splits):
    """dK/dV with the query group walked whole (1) or split across programs (fp32 partials, summed):
    what GQA and MQA get on a GPU. Forced here, since off the GPU no group is split."""
    with mod.fixed_dkdv_splits(splits):
        assert "vs f64" in mod.check_dense(1, 4, 1, 29, 29, 32, True, F16, DEVICE)  # MQA, group of 4
        mod.check_varlen([21, 1, 0, 17], [21, 4, 3, 30], 4, 1, 32, False, F16, DEVICE, grad=True)
        mod.check_varlen([21, 1, 0, 17], [30, 4, 3, 30], 8, 2, 32, True, F16, DEVICE, grad=True)  # prefixes
    with mod.fixed_dkdv_splits(3), pytest.raises(ValueError, match="must divide the query group 4"):
        mod.check_dense(1, 4, 1, 29, 29, 32, True, F16, DEVICE)


def test_dkdv_splits_fill_the_gpu_and_divide_the_group(monkeypatch):
    """The fewest shares (a divisor of the group) that give 4 programs an SM, here an H200's 132 (faked,
    so that the rule is checked on any machine); the Gluon causal launch also caps the heads a program
    walks by what L2 holds, at two at least."""
    assert mod.dkdv_splits(4096, 4, 1, 32, torch.device("cpu")) == 1  # no GPU: never split
    monkeypatch.setattr(mod, "_sm_count", lambda device: 132)
    dev = torch.device("cuda")
    assert mod.dkdv_splits(4096, 4, 1, 32, dev) == 8  # MQA: 128 programs, 1,024 in 8 shares (>= 528)
    assert mod.dkdv_splits(8192, 2, 8, 4, dev) == 1  # GQA 32/8 at 8k: 1,024 programs already
    assert mod.dkdv_splits(8192, 2, 8, 4, dev, True, 8192, 128) == 2  # 4 heads' 32 MB: 2 heads a program
    assert mod.dkdv_splits(2048, 8, 8, 4, dev, True, 2048, 128) == 1  # 4 heads' 8 MB: the whole group
    assert mod.dkdv_splits(4096, 4, 1, 32, dev, True, 4096, 128) == 8
    assert mod.dkdv_splits(16384, 1, 8, 4, dev, True, 16384, 128) == 2  # never single-head shares for L2
    assert mod.dkdv_splits(4096, 1, 1, 32, dev, True, 4096, 128) == 16  # 2 heads a share, 512 programs
    assert mod.dkdv_splits(8192, 2, 16, 1, dev, True, 8192, 128) == 1  # MHA: one head a program anyway
    # no divisor between 2 heads and the cap: the fewest heads above one (24/8 and 28/4 heads at 8k)
    assert mod.dkdv_splits(8192, 1, 8, 3, dev, True, 8192, 128) == 1
    assert mod.dkdv_splits(8192, 1, 4, 7, dev, True, 8192, 128) == 1
    assert mod.dkdv_splits(8192, 1, 4, 6, dev, True, 8192, 128) == 3  # 6 heads: 2 a program


def test_causal_units_fill_a_wave_fit_l2_and_divide_the_rows():
    """The causal dK/dV launch takes a group of units (rows of the grid) at a time: a divisor of the rows,
    so every group is whole; enough units that a group holds about a wave of programs (132 SMs / key
    blocks, at least 2); beyond that, as many as keep their Q, dO and dQ within 32 MB of L2."""

    def units(rows, n, heads):  # 128-key blocks, D=128, an H200's 132 SMs
        return mod.causal_units(rows, n, -(-n // 128), 128, heads, 132)

    assert units(32, 8192, 1) == 4  # MHA 16 heads x 2 at 8k: 8 MB a head, 4 in 32 MB
    assert units(64, 4096, 1) == 8
    assert units(16, 16384, 1) == 2  # 16 MB a head: 2 fill the budget
    assert units(32, 8192, 2) == 2  # GQA 32/8 in shares of 2 heads
    assert units(64, 2048, 4) == 8  # GQA 32/8 whole at 2k: 16 key blocks, 8 units for a wave
    assert units(32, 4096, 4) == 4  # MQA 4k in 8 shares of 4 heads, B=4: a wave over L2
    assert units(7, 8192, 1) == 7  # no divisor of 7 from 2 to 4: every row
    assert units(12, 1000, 1) == 12  # fewer rows than a wave
    assert units(1, 32768, 1) == 1


def test_custom_scale_and_non_contiguous_inputs():
    q, k, v = (torch.randn(1, 21, 2, 64, dtype=F16, device=DEVICE).transpose(1, 2) for _ in range(3))
    out = mod.flash_attention(q, k, v, sm_scale=0.3, poison=True)
    harness.assert_close(
        out, mod.attention_reference(q.double(), k.double(), v.double(), sm_scale=0.3), F16, "scale 0.3"
    )


@pytest.mark.parametrize("varlen", [False, True])
def test_forward_descriptor_loads_match_pointer_loads(monkeypatch, varlen):
    """Contiguous K and V reach the forward as row descriptors (TMA tiles for whole blocks), strided ones
    and pointer_loads() as pointers only; both paths give the float64 reference's output."""
    made = []
    real = mod._row_descs
    monkeypatch.setattr(mod, "_row_descs", lambda *a: made.append(real(*a)) or made[-1])
    if varlen:
        cu = torch.tensor([0, 37, 40, 73], dtype=torch.int32)
        q, k, v = (torch.randn(73, 4, 32, dtype=F16) for _ in range(3))
        run = lambda q, k, v: mod.flash_attention_varlen(q, k, v, cu, cu, 37, 37, True, poison=True)  # noqa: E731
    else:
        q, k, v = (torch.randn(2, 4, 45, 32, dtype=F16) for _ in range(3))
        run = lambda q, k, v: mod.flash_attention(q, k, v, True, poison=True)  # noqa: E731
    with mod.fixed_configs(0):
        by_desc = run(q, k, v)
        assert made[-1][0] is not None and made[-1][0].block_shape == [16, 32]  # tile set by the pre-hook
        with mod.pointer_loads():
            by_ptr = run(q, k, v)
        assert made[-1] == [None, None]
        strided = run(q, *(t.transpose(0, 1).contiguous().transpose(0, 1) for t in (k, v)))
        assert made[-1] == [None, None]
    assert torch.equal(by_desc, by_ptr) and torch.equal(by_desc, strided)
    if not varlen:
        ref = mod.attention_reference(q.double(), k.double(), v.double(), True)
        harness.assert_close(by_desc, ref, F16, "descriptor loads")


def test_user_errors_are_clear():
    q = torch.randn(1, 2, 8, 64, dtype=F16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        mod.flash_attention(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="head dim"):
        mod.flash_attention(q[..., :48], q[..., :48], q[..., :48])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        mod.flash_attention(torch.randn(1, 3, 8, 64, dtype=F16), q, q)
    with pytest.raises(ValueError, match="Nq == Nk"):
        mod.flash_attention(q, q[:, :, :5], q[:, :, :5], causal=True)
    with pytest.raises(ValueError, match="4-D"):
        mod.flash_attention(q[0], q[0], q[0])
    t = torch.randn(10, 2, 64, dtype=F16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="len_q <= len_k"):
        mod.flash_attention_varlen(
            t, t[:6], t[:6], cu, torch.tensor([0, 1, 6], dtype=torch.int32), 6, 5, True
        )
    with pytest.raises(ValueError, match="int32"):
        mod.flash_attention_varlen(t, t, t, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        mod.flash_attention_varlen(t, t, t, cu, cu, 3, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[0\] != 0"):
        mod.flash_attention_varlen(t[:8], t, t, torch.tensor([2, 4, 8], dtype=torch.int32), cu, 6, 6)


def test_varlen_strided_offsets_and_bad_lengths():
    """cu_seqlens given as a strided view (every other entry) give the same result as a contiguous copy."""
    q, k, v = (torch.randn(12, 2, 16, dtype=F16, device=DEVICE) for _ in range(3))
    cu_every_other = torch.tensor([0, 99, 5, 99, 12], dtype=torch.int32, device=DEVICE)[::2]
    cu = cu_every_other.contiguous()
    out = mod.flash_attention_varlen(q, k, v, cu_every_other, cu_every_other, 7, 7, poison=True)
    torch.testing.assert_close(out, mod.flash_attention_varlen(q, k, v, cu, cu, 7, 7), rtol=0, atol=0)
    with pytest.raises(TypeError, match="max_seqlen_q must be a non-negative int"):
        mod.flash_attention_varlen(q, k, v, cu, cu, 7.0, 7)
    unchecked = mod.flash_attention_varlen(q, k, v, cu, cu, 7, 7, check_offsets=False)  # no host sync
    torch.testing.assert_close(unchecked, out, rtol=0, atol=0)
    bad = torch.tensor([0, 5, 13], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] != q.shape\[0\]"):
        mod.flash_attention_varlen(q, k, v, bad, bad, 8, 8)
    with pytest.raises(ValueError, match="1-D int32"):  # the type and shape checks stay on
        mod.flash_attention_varlen(q, k, v, bad.long(), bad, 8, 8, check_offsets=False)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0, -0.5, "0.1"])
def test_bad_sm_scale_is_refused(bad):
    q = torch.randn(1, 2, 8, 64, dtype=F16)
    with pytest.raises(ValueError, match="sm_scale must be a finite number > 0"):
        mod.flash_attention(q, q, q, sm_scale=bad)
    t = q[0].transpose(0, 1)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="sm_scale must be a finite number > 0"):
        mod.flash_attention_varlen(t, t, t, cu, cu, 8, 8, sm_scale=bad)


def test_zero_heads_are_refused():
    q = torch.randn(1, 2, 8, 64, dtype=F16)
    with pytest.raises(ValueError, match="kv heads must be >= 1"):
        mod.flash_attention(q, q[:, :0], q[:, :0])
    with pytest.raises(ValueError, match="query heads must be >= 1"):
        mod.flash_attention(q[:, :0], q, q)
    t = q[0].transpose(0, 1)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv heads must be >= 1"):
        mod.flash_attention_varlen(t, t[:, :0], t[:, :0], cu, cu, 8, 8)


def test_autotune_keys_include_the_grid_and_checks_do_not_tune():
    """The programs a launch has change the best tile, so they are part of every autotune key; the
    checks launch fixed configs and never reach the autotuner (whose cache the benchmark reuses)."""
    for kern in (mod._fwd_kernel, mod._bwd_dkdv_kernel, mod._bwd_dq_kernel):
        assert "GRID_BUCKET" in kern.keys, kern.keys

    def no_tuning(*a, **kw):
        raise AssertionError("a check reached the autotuner")

    kernels = (mod._fwd_kernel, mod._bwd_dkdv_kernel, mod._bwd_dq_kernel)
    saved = [k.run for k in kernels]
    try:
        for k in kernels:
            k.run = no_tuning
        with mod.fixed_configs(0):
            mod.check_dense(1, 2, 1, 19, 19, 32, True, F16, DEVICE)
            mod.check_varlen([5, 3], [5, 7], 2, 1, 32, True, F16, DEVICE)
    finally:
        for k, run in zip(kernels, saved, strict=True):
            k.run = run


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_a_non_finite_head_or_sequence_stays_there(varlen, causal):
    note = mod.check_isolation(varlen, causal, 32, F16, DEVICE)  # raises if head / sequence 0 is off
    assert "vs f64" in note


@pytest.mark.parametrize("varlen", [False, True])
def test_the_isolation_check_catches_a_leak(monkeypatch, varlen):
    # a stand-in that does what a whole TMA tile would without the zeroing: adds the next head's (or
    # sequence's) first V row times a zero probability to every output
    real = mod.flash_attention_varlen if varlen else mod.flash_attention

    def leaky(q, k, v, *args, **kwargs):
        out = real(q, k, v, *args, **kwargs)
        return out + 0 * (v[45:46] if varlen else v[:, 1:2, :1])  # 45: sequence 0's length on the CPU

    monkeypatch.setattr(mod, "flash_attention_varlen" if varlen else "flash_attention", leaky)
    with pytest.raises(AssertionError, match="beside inf/NaN rows"):
        mod.check_isolation(varlen, False, 32, F16, DEVICE)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_backward_matches_autograd_through_the_reference(causal):
    """Packed sequences train: dq, dk, dv of the varlen kernel equal autograd through the float64
    reference run on each sequence alone (GQA 4/2, a zero-length and a one-token sequence, cached
    prefixes len_k > len_q, lengths off the block size, and one long enough that its dK/dV key blocks
    see masked diagonal blocks, whole blocks and a ragged end)."""
    lens_q, lens_k = [21, 1, 0, 17, 45], [21, 4, 3, 30, 52]
    note = mod.check_varlen(lens_q, lens_k, 4, 2, 32, causal, F16, DEVICE, grad=True)
    assert "dq/dk/dv" in note


def test_reference_is_02s_not_a_copy():
    """The float64 reference is 02_attention's, loaded through the harness, not a copy of it."""
    source = (harness.ROOT / "06_flash.py").read_text()
    assert "def attention_reference" not in source
    assert mod.attention_reference is load_build("02_attention").attention_reference


@pytest.mark.parametrize("tokens, mean", [(65536, 1024), (65536, 4096), (100, 16), (4096, 4096)])
def test_mixed_lengths_sum_to_the_tokens_within_the_range(tokens, mean):
    lens = mod.mixed_lengths(tokens, mean)
    assert sum(lens) == tokens
    lo, hi = mean // 8, 15 * mean // 8
    assert all(lo <= n for n in lens) or len(lens) == 1  # a cut-short last length joins the one before it
    assert max(lens) <= hi + lo
    assert mod.mixed_lengths(tokens, mean) == lens  # seeded: every run benchmarks the same batch


def test_varlen_benchmark_row_counts_each_sequences_own_flops(monkeypatch):
    with mod.fixed_configs(0):  # the benchmark's path in the interpreter, without tuning
        row = mod.varlen_case(32, 2, 1, 64, True, 256, DEVICE, F16)
    assert row["sequences"] > 1 and row["min_len"] < row["max_len"]
    assert row["varlen/dense"] == pytest.approx(row["varlen_fwd"] / row["dense_fwd"])
    assert row["varlen/tl"] == pytest.approx(row["varlen_fwd"] / row["varlen_tl_fwd"])

    def bench(fn, device, graph):  # every call "takes" 2 ms, 4 ms by the tl kernel; all graph-replayed
        assert graph
        fn()
        return 4.0 if mod._FIXED["tl"] else 2.0

    checked = []  # check_offsets of every varlen call: checked once untimed, then never (no host sync)
    real = mod._validate_varlen
    monkeypatch.setattr(mod, "_validate_varlen", lambda *a: checked.append(a[-1]) or real(*a))
    monkeypatch.setattr(harness, "bench", bench)
    with mod.fixed_configs(0):
        row = mod.varlen_case(32, 2, 1, 64, True, 256, DEVICE, F16)
    assert checked == [True, False, False]
    lens = mod.mixed_lengths(256, 64)
    assert row["varlen_fwd"] == pytest.approx(sum(4 * 2 * n * n * 32 * 0.5 for n in lens) / 2.0 / 1e9)
    assert row["dense_fwd"] == pytest.approx(4 * 4 * 2 * 64 * 64 * 32 * 0.5 / 2.0 / 1e9)  # B = 256 / 64
    assert row["varlen_tl_fwd"] == pytest.approx(row["varlen_fwd"] / 2) and row["varlen/tl"] == 2


@pytest.mark.parametrize(
    "shape, splits",
    [((1, 4, 2, 45, 45, 32, True), 1), ((1, 4, 2, 37, 37, 64, False), 2), ((1, 2, 1, 50, 19, 16, False), 1)],
)
def test_atomic_dq_matches_float64_and_sdpa(shape, splits, monkeypatch):
    """deterministic=False: dQ added by fp32 atomics inside the dK/dV kernel (causal, GQA with the group
    whole or split, Nq > Nk) is as close to the references as the two-kernel path."""
    monkeypatch.setattr(mod, "_bwd_dq_kernel", None)  # the atomic path must never reach the dQ kernel
    with mod.fixed_configs(0), mod.fixed_dkdv_splits(splits):
        note = mod.check_dense(*shape, F16, DEVICE, deterministic=False)
    assert "vs f64" in note


def test_atomic_dq_varlen_and_the_default_is_bitwise_repeatable(monkeypatch):
    with monkeypatch.context() as m, mod.fixed_configs(0):
        m.setattr(mod, "_bwd_dq_kernel", None)  # the atomic path must never reach the dQ kernel
        note = mod.check_varlen([21, 1, 0, 17], [21, 4, 3, 30], 4, 2, 32, True, F16, DEVICE, True, False)
    assert "dq/dk/dv" in note
    q, k, v = (torch.randn(1, 4, 33, 32, dtype=F16, device=DEVICE, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 4, 33, 32, dtype=F16, device=DEVICE)
    runs = [torch.autograd.grad(mod.flash_attention(q, k, v, True), (q, k, v), do) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))  # no atomics: same bits every run
    atomic = torch.autograd.grad(mod.flash_attention(q, k, v, True, deterministic=False), (q, k, v), do)
    for a, b in zip(runs[0], atomic, strict=True):
        harness.assert_close(b, a, F16, "atomic vs two-kernel")


def test_gluon_kernels_are_not_taken_in_the_interpreter():
    """Gluon has no interpreter: on the CPU every kernel is a tl one (the rest of this file); the Gluon
    kernels are proved by 06's own checks on an H200 (run_checks), beside the tl kernels."""
    q, k, v = (torch.randn(1, 2, 40, 128, dtype=F16) for _ in range(3))
    assert not mod.gluon_ok((q, k, v), False)
    with mod.tl_kernels():
        assert not mod.gluon_ok((q, k, v), False)


@pytest.mark.parametrize("varlen", [False, True])
def test_forward_hands_the_gluon_kernel_its_outputs(monkeypatch, varlen):
    """Where gluon_ok says yes, _fwd gives the Gluon wrapper o and lse (lse's batch and head
    strides per layout) and returns them, and no tl kernel is launched."""
    calls = []

    def fake(q, k, v, o, lse, cu_q, cu_k, lse_bh, B, n_q, n_k, causal, sm_scale, is_varlen):
        calls.append((tuple(lse.shape), lse_bh, B, n_q, n_k, causal, is_varlen))
        o.fill_(1.0)
        lse.fill_(2.0)

    monkeypatch.setattr(mod, "gluon_ok", lambda *a: True)
    monkeypatch.setattr(mod, "_fwd_gluon", fake)
    monkeypatch.setattr(mod, "_launch", lambda *a, **kw: pytest.fail("the tl kernel was launched"))
    if varlen:
        cu = torch.tensor([0, 37, 40, 73], dtype=torch.int32)
        q, k, v = (torch.randn(73, 4, 128, dtype=F16) for _ in range(3))
        o, lse = mod._fwd(q, k, v, (cu, cu), 3, 37, 37, True, 0.1, False)
        assert calls == [((4, 73), (0, 73), 3, 37, 37, True, True)]
    else:
        q, k, v = (torch.randn(2, 4, 45, 128, dtype=F16) for _ in range(3))
        o, lse = mod._fwd(q, k, v, None, 2, 45, 45, False, 0.1, False)
        assert calls == [((2, 4, 45), (180, 45), 2, 45, 45, False, False)]
    assert o.shape == q.shape and bool((o == 1).all()) and bool((lse == 2).all())


CASES = ["mha", "gqa_split", "shift", "atomic", "atomic_split", "two_kernel", "short", "varlen"]


@pytest.mark.parametrize("case", CASES)
def test_backward_hands_the_gluon_kernels_their_outputs(monkeypatch, case):
    """Where gluon_ok says yes, _bwd gives all three gradients to the fused Gluon kernel: dQ as a zeroed
    fp32 buffer it adds into, in order (deterministic) or not, and without a mask as two buffers (the
    shifted walk) then summed; dK, dV in k's shape and dtype, a split group's too (its shares sum them
    in the kernel). Under
    two_kernel_backward, and on sequences too short for the ordered kernel to pay (these: 40 rows), the
    deterministic backward takes the Gluon dK/dV kernel, then the Gluon dQ kernel; two_kernel_backward
    (False) forces the ordered kernel. Varlen takes the tl kernels."""
    varlen = case == "varlen"
    h_kv = 4 if case == "mha" else 2
    cu = torch.tensor([0, 20, 33], dtype=torch.int32)
    shape_q, shape_kv = ((33, 4, 32), (33, h_kv, 32)) if varlen else ((1, 4, 40, 32), (1, h_kv, 40, 32))
    q, do = (torch.randn(shape_q, dtype=F16) for _ in range(2))
    k, v = (torch.randn(shape_kv, dtype=F16) for _ in range(2))
    geom = ((cu, cu), 2, 20, 20) if varlen else (None, 1, 40, 40)
    with mod.fixed_configs(0):
        o, lse = mod._fwd(q, k, v, *geom, True, 0.2, False)  # the tl forward, before anything is patched
    launched = []

    def fake_dkdv(descs, ld, dk, dv, q, k, causal, sm_scale, dq=None, splits=1, ordered=False, shift=False):
        assert dq is not None or not (ordered or shift)  # the order is the fused kernel's alone
        kind = "gluon dkdv" if dq is None else "gluon fused" + " ordered" * ordered + " shifted" * shift
        launched.append(f"{kind} in {splits}")
        assert dk.shape == dv.shape == k.shape and dk.dtype == dv.dtype == k.dtype
        dk.fill_(1.0)
        dv.fill_(2.0)
        if dq is not None:  # adds into zeros: one buffer, or two with shift, summed afterwards
            assert dq.dtype == torch.float32 and dq.shape == (1 + shift, *q.shape) and not dq.any()
            dq.fill_(3.0 / (1 + shift))

    def fake_dq(descs, ld, dq, q, k, causal, sm_scale):
        launched.append("gluon dq")
        dq.fill_(3.0)

    real_launch = mod._launch
    monkeypatch.setattr(mod, "gluon_ok", lambda *a: True)
    monkeypatch.setattr(mod, "_gluon_bwd_descs", lambda *ts: None)  # descriptors need a GPU
    monkeypatch.setattr(mod, "_dkdv_gluon", fake_dkdv)
    monkeypatch.setattr(mod, "_dq_gluon", fake_dq)
    monkeypatch.setattr(mod, "_launch", lambda kernel, kind, *a, **kw: launched.append(f"tl {kind}")
                        or real_launch(kernel, kind, *a, **kw))  # fmt: skip
    split, det = case in ("gqa_split", "atomic_split"), "atomic" not in case
    if case in ("mha", "gqa_split", "shift"):
        two = mod.two_kernel_backward(False)
    else:
        two = mod.two_kernel_backward() if case == "two_kernel" else contextlib.nullcontext()
    with mod.fixed_configs(0), mod.fixed_dkdv_splits(2 if split else 1), two:
        dq, dk, dv = mod._bwd(do, q, k, v, o, lse, *geom, case != "shift", 0.2, False, deterministic=det)
    expected = {
        "mha": ["gluon fused ordered in 1"],
        "gqa_split": ["gluon fused ordered in 2"],
        "shift": ["gluon fused ordered shifted in 1"],
        "atomic": ["gluon fused in 1"],
        "atomic_split": ["gluon fused in 2"],
        "two_kernel": ["gluon dkdv in 1", "gluon dq"],
        "short": ["gluon dkdv in 1", "gluon dq"],
        "varlen": ["tl dkdv", "tl dq"],
    }[case]
    assert launched == expected
    gluon = expected[0].startswith("gluon")
    assert bool((dq == 3).all()) == gluon and dq.dtype == q.dtype
    assert bool((dk == 1).all() and (dv == 2).all()) == gluon and dk.dtype == k.dtype


@pytest.mark.parametrize("D", [64, 128])
def test_gluon_forward_launch_shape_per_head_dim(monkeypatch, D):
    """The forward offers the Gluon kernel head dim 128 always and 64 over rows of at least 2k keys (4k
    causal) or inside gluon_d64_forward, the backward 128 only. D=128 launches 128 query rows a program
    (two consumer warpgroups) under a 168-register cap, D=64 192 rows (three) under 128; Q goes in tiles
    of 64 rows either way, K and V in 128-row blocks."""
    asked, launched, fwd_gluon = [], [], mod._fwd_gluon

    class Grab:  # stands in for the Gluon forward kernel: records its launch, runs nothing
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((grid, args, kw))

    def ok(ts, varlen, head_dims=(128,)):
        asked.append(head_dims)
        return False

    monkeypatch.setattr(mod, "gluon_ok", ok)
    q, k, v = (torch.randn(1, 2, 40, D, dtype=F16, device=DEVICE, requires_grad=True) for _ in range(3))
    with mod.fixed_configs(0):
        mod.flash_attention(q, k, v, True).sum().backward()
    assert asked[0] == (128,) and all(dims == (128,) for dims in asked[1:]) and len(asked) > 1
    asked.clear()
    monkeypatch.setattr(mod, "gluon_ok", lambda ts, varlen, head_dims: asked.append(head_dims) or True)
    monkeypatch.setattr(mod, "_fwd_gluon", lambda *a: None)  # only the dispatch: nothing runs
    for n, causal in [(2047, False), (2048, False), (4095, True), (4096, True)]:
        mod._fwd(q, k, v, None, 1, n, n, causal, 0.1, False)
    with mod.gluon_d64_forward():  # what the GPU checks use to reach it on short rows
        mod._fwd(q, k, v, None, 1, 40, 40, True, 0.1, False)
    mod._fwd(q, k, v, None, 1, 40, 40, True, 0.1, False)
    assert asked == [(128,), (128, 64), (128,), (128, 64), (128, 64), (128,)]
    monkeypatch.setattr(mod, "_fwd_kernel_gluon", Grab())
    monkeypatch.setattr(mod, "_sm_count", lambda device: 132)  # the persistent launch asks for it
    q, k, v = (torch.randn(2, 4, 500, D, dtype=F16) for _ in range(3))
    fwd_gluon(q, k, v, torch.empty_like(q), torch.empty(2, 4, 500), None, None, (2000, 500), 2, 500, 500,
              True, 0.1, False)  # fmt: skip
    ((grid, args, kw),) = launched
    rows = 192 if D == 64 else 128
    assert args[12] == 8 * -(-500 // rows)  # the tiles: batch x heads x query blocks
    assert args[14:17] == (D, rows, 128) and args[-1] == (D == 128)  # HEAD_DIM, BLOCK_M, BLOCK_N, PERSISTENT
    assert grid == ((-(-500 // rows), 8) if D == 64 else (16,))  # D=128 causal: 16 pairs of tiles
    assert kw["maxnreg"] == (128 if D == 64 else 168)


@pytest.mark.parametrize("causal", [False, True])
def test_persistent_forward_launches_at_most_one_program_an_sm(monkeypatch, causal):
    """The dense D=128 Gluon forward launches one program for each unit of work (a tile, or causal a pair
    of tiles, cdiv(tiles, 2)) up to one an SM, or as many as fixed_programs says; each program walks the
    units pid, pid + programs, ... in turn (_g_count, _g_tile, GPU-checked on 1, 2, 3 and 7 programs)."""
    launched = []

    class Grab:  # stands in for the Gluon forward kernel: records its grid and tile count, runs nothing
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((grid, args[12]))

    monkeypatch.setattr(mod, "_fwd_kernel_gluon", Grab())
    monkeypatch.setattr(mod, "_sm_count", lambda device: 132)
    for B, H, N in [(1, 3, 300), (2, 16, 4096), (1, 1, 64)]:
        q = torch.randn(B, H, N, 128, dtype=F16)
        lse = torch.empty(B, H, N)
        mod._fwd_gluon(q, q, q, torch.empty_like(q), lse, None, None, lse.stride()[:2], B, N, N, causal, 0.1,
                       False)  # fmt: skip
        with mod.fixed_programs(7):
            mod._fwd_gluon(q, q, q, torch.empty_like(q), lse, None, None, lse.stride()[:2], B, N, N, causal,
                           0.1, False)  # fmt: skip
    tiles = [3 * 3, 2 * 16 * 32, 1]
    units = [-(-t // 2) if causal else t for t in tiles]
    want = [g for u, t in zip(units, tiles, strict=True) for g in (((min(u, 132),), t), ((min(u, 7),), t))]
    assert launched == want


@pytest.mark.parametrize("block_m", [64, 128, 192])
def test_varlen_tiles_list_every_real_query_block_once(monkeypatch, block_m):
    """The packed Gluon forward's tile table (_varlen_tiles, a tl kernel): a row for each of a sequence's
    query blocks, each holding the sequence's (q_start, k_start, seq_q, seq_k, first tile), none for an
    empty sequence, then spare rows of zeros up to cdiv(T, block_m) + B rows, then a row holding the count
    of real tiles. The D=128 forward launches persistent programs, one for each of H x the rows before the
    count (half as many causal) up to one an SM, and hands the kernel the table and that row count."""
    lens_q, lens_k = [5, 0, 300, 128, 129, 1, 0, 64, 191, 193], [5, 3, 300, 200, 129, 9, 1, 64, 191, 400]
    cu_q, cu_k = mod.cu_seqlens(lens_q, "cpu"), mod.cu_seqlens(lens_k, "cpu")
    tiles = mod._varlen_tiles(cu_q, cu_k, block_m, sum(lens_q)).tolist()
    blocks = [-(-n // block_m) for n in lens_q]
    want = [[int(cu_q[b]), int(cu_k[b]), n, lens_k[b], sum(blocks[:b])] for b, n in enumerate(lens_q)
            for _ in range(blocks[b])]  # fmt: skip
    rows = -(-sum(lens_q) // block_m) + len(lens_q)
    assert len(tiles) == rows + 1 and tiles[-1] == [len(want), 0, 0, 0, 0]
    assert tiles[: len(want)] == want and all(row == [0] * 5 for row in tiles[len(want) : -1])
    launched = []

    class Grab:  # stands in for the Gluon forward kernel: records its launch, runs nothing
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((grid, args))

    monkeypatch.setattr(mod, "_fwd_kernel_gluon", Grab())
    monkeypatch.setattr(mod, "_sm_count", lambda device: 132)
    monkeypatch.setitem(mod.GLUON_FWD, 128, {**mod.GLUON_FWD[128], "BLOCK_M": block_m})
    q, k, v = (torch.randn(sum(lens_q), n, 128, dtype=F16) for n in (4, 2, 2))
    lse = torch.empty(4, sum(lens_q))
    for causal in (False, True):
        mod._fwd_gluon(q, k, v, torch.empty_like(q), lse, cu_q, cu_k, (0, sum(lens_q)), len(lens_q), 300,
                       400, causal, 0.1, True)  # fmt: skip
    (grid, args), (grid_causal, _) = launched
    assert grid == (min(rows * 4, 132),) and grid_causal == (min(-(-rows * 4 // 2), 132),)
    assert args[5].tolist() == tiles and args[12] == rows  # the table, and its rows before the count


@pytest.mark.parametrize("varlen", [False, True])
def test_gluon_tiles_of_dense_inputs_stay_inside_a_head(monkeypatch, varlen):
    """Dense q, k, v (and dO) reach the Gluon kernels through per-head (B*H, N, D) descriptors whose tiles
    are one head's rows, so TMA fills the rows past a head's end with zeros; packed varlen inputs through
    one (T, H*D) descriptor each, whose tails the forward zeroes itself (check_isolation, on the GPU)."""
    seen = []

    class Grab:  # stands in for the Gluon forward kernel: records its descriptors, launches nothing
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.extend(a for a in args if isinstance(a, mod.GluonDescriptor))

    def geometry(descs):
        return [(tuple(d.shape), d.block_shape) for d in descs]

    monkeypatch.setattr(mod, "_fwd_kernel_gluon", Grab())
    monkeypatch.setattr(mod, "_sm_count", lambda device: 132)  # the persistent launches ask for it
    if varlen:
        q, k, v = (torch.randn(73, n, 128, dtype=F16) for n in (4, 2, 2))
        cu = torch.tensor([0, 37, 73], dtype=torch.int32)
        lse = torch.empty(4, 73)
        mod._fwd_gluon(q, k, v, torch.empty_like(q), lse, cu, cu, (0, 73), 2, 37, 37, True, 0.1, True)
        assert geometry(seen) == [((73, 512), [64, 128])] + [((73, 256), [128, 128])] * 2
        return
    q, k, v = (torch.randn(2, n, 45, 128, dtype=F16) for n in (4, 2, 2))
    lse = torch.empty(2, 4, 45)
    mod._fwd_gluon(q, k, v, torch.empty_like(q), lse, None, None, (180, 45), 2, 45, 45, True, 0.1, False)
    assert geometry(seen) == [((8, 45, 128), [1, 64, 128])] + [((4, 45, 128), [1, 128, 128])] * 2
    bwd = mod._gluon_bwd_descs(q, k, v, torch.randn_like(q))
    assert geometry(bwd) == [((8, 45, 128), [1, 64, 128])] + [((4, 45, 128), [1, 64, 128])] * 2 + [
        ((8, 45, 128), [1, 64, 128])
    ]  # dO like q
    # the fused backward's fp32 dQ buffer: per head too, in tiles of 64 rows by half of D, so what a
    # head's last tile adds past its rows is dropped, after the four inputs
    seen.clear()
    monkeypatch.setattr(mod, "_bwd_dkdv_gluon", Grab())
    dk, dv, dq = torch.empty_like(k), torch.empty_like(v), torch.zeros(q.shape)
    mod._dkdv_gluon(bwd, torch.empty(2, 4, 45, 2), dk, dv, q, k, True, 0.1, dq)
    assert geometry(seen) == geometry(bwd) + [((8, 45, 128), [1, 64, 64])]
    assert seen[-1].layout.element_bitwidth == 32


@pytest.mark.parametrize("splits", [1, 2])
def test_gluon_dkdv_launch_of_a_shared_group(monkeypatch, splits):
    """_dkdv_gluon launches one program per (128-key block, batch * kv head, share of the group), and with
    shares (splits > 1) hands the kernel PARTIAL, fp32 running sums of dK and dV in k's shape and zeroed
    int32 counters, one per (batch * kv head, key block, warpgroup); whole groups get none of them, so
    their kernel is the one without the shares' arithmetic."""
    launches = []

    class Grab:  # stands in for the Gluon dK/dV kernel: records its grid and arguments, launches nothing
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid, args, kw))

    names = mod._bwd_dkdv_gluon.arg_names  # the real kernel's parameters, to read the launch's arguments by
    monkeypatch.setattr(mod, "_bwd_dkdv_gluon", Grab())
    q = torch.randn(2, 4, 200, 128, dtype=F16)
    k = torch.randn(2, 2, 200, 128, dtype=F16)
    descs = mod._gluon_bwd_descs(q, k, k, q)
    dk, dv = torch.empty_like(k), torch.empty_like(k)
    ld = torch.empty(2, 4, 200, 2)
    mod._dkdv_gluon(descs, ld, dk, dv, q, k, False, 0.1, None, splits)
    ((grid, args, kw),) = launches
    assert grid == (2, 2 * 2 * splits)  # ceil(200 / 128) key blocks, B * H_KV * shares
    bound = dict(zip(names, args, strict=True))
    assert bound["SPLITS"] == splits and bound["PARTIAL"] == (splits > 1)
    assert bound["DK"] is dk and bound["DV"] is dv
    assert bound["FUSED"] is False and bound["dq_desc"] is None
    if splits == 1:
        assert all(bound[n] is ld for n in ("ACC_K", "ACC_V", "CHAIN"))
    else:
        for n in ("ACC_K", "ACC_V"):
            assert bound[n].shape == k.shape and bound[n].dtype == torch.float32
        assert bound["ACC_K"].data_ptr() != bound["ACC_V"].data_ptr()
        chain = bound["CHAIN"]
        assert chain.dtype == torch.int32 and chain.numel() == 2 * 2 * 2 * 2 and not chain.any()


@pytest.mark.parametrize("shift, splits", [(False, 1), (True, 1), (False, 2)])
def test_gluon_dkdv_launch_in_order(monkeypatch, shift, splits):
    """The ordered fused kernel gets zeroed int32 counters, one per (dQ buffer, query head, 64-row query
    block), and a dQ descriptor over every buffer's rows: two buffers with the shifted walk. With shares
    of the group, their counters follow in the same zeroed buffer. The causal launch is (units, key
    blocks, groups of units), on an H200's 132 SMs (faked)."""
    launches = []
    monkeypatch.setattr(mod, "_sm_count", lambda device: 132)

    class Grab:  # stands in for the Gluon dK/dV kernel: records its grid and arguments, launches nothing
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid, args, kw))

    names = mod._bwd_dkdv_gluon.arg_names
    monkeypatch.setattr(mod, "_bwd_dkdv_gluon", Grab())
    q = torch.randn(2, 4, 200, 128, dtype=F16)
    k = torch.randn(2, 2, 200, 128, dtype=F16)
    descs = mod._gluon_bwd_descs(q, k, k, q)
    dk, dv = torch.empty_like(k), torch.empty_like(k)
    dq = torch.zeros(1 + shift, *q.shape)
    mod._dkdv_gluon(descs, torch.empty(2, 4, 200, 2), dk, dv, q, k, not shift, 0.1, dq, splits, True, shift)
    ((grid, args, kw),) = launches
    bound = dict(zip(names, args, strict=True))
    assert bound["FUSED"] is True and bound["ORDERED"] is True and bound["SHIFT"] == shift
    rows = 2 * 2 * splits  # B * H_KV * shares, each walking HEADS of the group of 2
    assert bound["HEADS"] == 2 // splits
    if shift:  # without a mask: (key blocks, rows)
        assert grid == (2, rows)
    else:  # causal: (units, key blocks, groups of units), heaviest first
        units = mod.causal_units(rows, 200, 2, 128, 2 // splits, 132)
        assert grid == (units, 2, rows // units) and rows % units == 0
    sem, n_sem = bound["SEM"], (1 + shift) * 2 * 4 * 4  # (buffer, B * H, 64-row query blocks)
    n_chain = 2 * 2 * 2 * 2 if splits > 1 else 0  # (B * H_KV, 128-key blocks, warpgroups)
    assert sem.dtype == torch.int32 and sem.numel() == n_sem + n_chain and not sem.any()
    if splits > 1:
        assert bound["CHAIN"].data_ptr() == sem[n_sem:].data_ptr() and bound["CHAIN"].numel() == n_chain
    assert tuple(bound["dq_desc"].shape) == ((1 + shift) * 2 * 4, 200, 128)


def test_the_ordered_backward_starts_where_it_pays():
    """The deterministic backward takes the ordered fused kernel from 1k query rows causal, 4k without a
    mask (the H200's measurements in _ordered_pays), the two-kernel road below."""
    assert [mod._ordered_pays(n, True) for n in (1023, 1024)] == [False, True]
    assert [mod._ordered_pays(n, False) for n in (4095, 4096)] == [False, True]


def test_benchmark_keeps_the_median_round_of_ours_and_cudnn(monkeypatch):
    """bench_case times ours and cuDNN in cfg.rounds interleaved rounds and keeps each phase's median
    (the ratio that leads every row), the other implementations once; a backend that fails is skipped
    and reported, not retried."""
    calls = []
    fwd_ms = {"ours": [4.0, 1.0, 2.0], "cudnn": [2.0, 8.0, 4.0], "fa2": [3.0]}

    def fake_time(fn, ctx, q, k, v, do, device):
        name = fn
        if name == "efficient":
            raise RuntimeError("no kernel for this shape")
        calls.append(name)
        fwd = fwd_ms[name][sum(c == name for c in calls) - 1]
        return fwd, 2 * fwd, q.detach()

    impls = {name: (name, None) for name in ("ours", "cudnn", "fa2", "efficient")}
    monkeypatch.setattr(mod, "_time", fake_time)
    monkeypatch.setattr(mod, "_impls", lambda causal: impls)
    cfg, skipped = mod.BenchConfig(tokens=32), {}
    row = mod.bench_case(16, 2, 2, 16, True, cfg, torch.device("cpu"), F16, skipped)
    assert calls == ["ours", "cudnn", "fa2", "ours", "cudnn", "ours", "cudnn"]
    flops = 4 * 2 * 2 * 16 * 16 * 16 * 0.5
    assert row["ours_fwd"] == pytest.approx(flops / 2.0 / 1e9)  # median of 4, 1, 2 ms
    assert row["fwd/cudnn"] == pytest.approx(4.0 / 2.0)  # cuDNN's median 4 ms against ours 2
    assert row["bwd/fa2"] == pytest.approx(6.0 / 4.0)
    assert row["rounds"]["cudnn_bwd"] == pytest.approx([flops * 2.5 / ms / 1e9 for ms in (4.0, 16.0, 8.0)])
    assert "fa2_fwd" not in row["rounds"] and "efficient_fwd" not in row
    assert list(skipped) == ["efficient H2/2"]
