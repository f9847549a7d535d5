"""Tests for 02_attention.py: every check of its __main__, plus hand-checkable cases and properties."""

import pytest
import torch
from conftest import load_build
from hypothesis import given, settings
from hypothesis import strategies as st

mod = load_build("02_attention")
CPU = torch.device("cpu")


# The checks __main__ runs, one test each.


@pytest.mark.parametrize("name", list(mod.CASES))
def test_variant_matches_reference_and_sdpa(name):
    mod.check_variant(name, CPU, torch.bfloat16)


def test_sdpa_backends_match_reference():
    mod.check_sdpa_backends(CPU)


@pytest.mark.parametrize("name", list(mod.DECODE_CASES))
def test_prefill_decode_equals_full_forward(name):
    assert mod.check_prefill_decode(CPU, **mod.DECODE_CASES[name]) < 1e-5


@pytest.mark.parametrize("name", list(mod.GRAD_CASES))
def test_module_grads_match_fp64_reference(name):
    assert mod.check_module_grads(CPU, **mod.GRAD_CASES[name]) < 1e-5


def test_bad_arguments_raise():
    mod.check_errors()


# Hand-checkable cases.


def test_one_key_returns_its_value():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    for fn in (mod.attention_reference, mod.attention):
        torch.testing.assert_close(fn(q, k, v), v.expand(1, 2, 3, 8))  # softmax over one key is 1


def test_equal_scores_average_the_values():
    q, k, v = torch.zeros(1, 1, 4, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    out = mod.attention_reference(q, k, v)  # q = 0: every score is 0, every weight 1/5
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand(1, 1, 4, 8))


def test_causal_first_query_sees_only_the_first_key():
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    for fn in (mod.attention_reference, mod.attention):
        torch.testing.assert_close(fn(q, k, v, causal=True)[:, :, 0], v[:, :, 0])


def test_chunk_mask_is_bottom_right_aligned():
    # Two queries at positions 2 and 3 of four keys: the first may not see key 3, the second sees all.
    bias = mod.attention_bias(2, 4, causal=True)
    assert (bias[0, 0] == 0).tolist() == [[True, True, True, False], [True, True, True, True]]
    window = mod.attention_bias(2, 4, causal=True, window=2)  # keys at distance 0 and 1 only
    assert (window[0, 0] == 0).tolist() == [[False, True, True, False], [False, False, True, True]]


def test_alibi_slopes_from_the_paper():
    assert mod.alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    # 6 heads: the 4-head series (1/4, 1/16, 1/64, 1/256) then every other 8-head slope (1/2, 1/8).
    assert mod.alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def test_kv_bytes_per_token_by_hand():
    assert mod.kv_bytes_per_token(32, 32, 128) == 2 * 32 * 32 * 128 * 2 == 524288  # Llama-2-7B, 512 KiB
    assert mod.kv_bytes_per_token(32, 8, 128) == 131072  # Llama-3-8B and Mistral-7B, 128 KiB
    assert mod.kv_bytes_per_token(30, 3, 64) == 23040  # SmolLM2-135M, 22.5 KiB
    cache = mod.KVCache(1, 3, 10, 64, dtype=torch.bfloat16)  # one layer of SmolLM2, 10 positions
    assert cache.nbytes == 10 * mod.kv_bytes_per_token(1, 3, 64)
    rows = {r["model"]: r for r in mod.kv_table()}
    assert rows["Llama-2-7B"]["KiB/token"] == 512 and rows["Llama-3-8B"]["vs MHA"] == "1/4"


def test_cache_tracks_positions_and_rolls_back():
    cache = mod.KVCache(1, 2, 8, 4)
    k, v = cache.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 0)
    assert cache.length == 5 and k.shape == (1, 2, 5, 4)
    cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 3)  # rewrite position 3: drop 4
    assert cache.length == 4


# Properties and fast-path guarantees.


@settings(max_examples=25, deadline=None)
@given(
    n_kv_head=st.sampled_from([1, 2, 3]),
    group=st.integers(1, 3),
    tk=st.integers(1, 40),
    tq_frac=st.floats(0.01, 1.0),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 9)),
    alibi=st.booleans(),
)
def test_fast_matches_reference_on_random_shapes(n_kv_head, group, tk, tq_frac, causal, window, alibi):
    H, tq = n_kv_head * group, max(1, round(tk * tq_frac))
    q = torch.randn(2, H, tq, 16, dtype=torch.float64)
    k, v = (torch.randn(2, n_kv_head, tk, 16, dtype=torch.float64) for _ in range(2))
    kw = {"causal": causal, "window": window, "alibi_slopes": mod.alibi_slopes(H) if alibi else None}
    ref = mod.attention_reference(q, k, v, **kw)
    fast = mod.attention(q.float(), k.float(), v.float(), **kw)
    mod.harness.assert_close(fast, ref, torch.float32, "fast vs reference")


def test_fast_path_makes_no_kv_copies():
    """Every aten op the fast path dispatches, and every tensor it creates, is recorded: a K/V copy
    repeated to H heads would show up as a (B, H, Tk, D) tensor (Tk != Tq here, so the output is not one)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.shapes = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops.append(str(func))
            self.shapes += [tuple(t.shape) for t in (out if isinstance(out, tuple | list) else [out])
                            if isinstance(t, torch.Tensor)]  # fmt: skip
            return out

    B, H, Hkv, Tk, D = 2, 8, 2, 9, 16
    k, v = torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    for q, causal in ((torch.randn(B, H, 1, D), True), (torch.randn(B, H, 4, D), False)):
        with torch.no_grad(), Record() as rec:
            mod.attention(q, k, v, causal=causal)
        assert (B, H, Tk, D) not in rec.shapes, rec.ops
        assert not any("repeat" in op or "index_select" in op for op in rec.ops), rec.ops


def test_pos_transform_sees_absolute_positions():
    seen = []

    def record(q, k, positions):
        seen.append(positions.tolist())
        return q, k

    layer = mod.MultiHeadAttention(16, 2, pos_transform=record)
    cache = layer.new_cache(1, 6)
    with torch.no_grad():
        layer(torch.randn(1, 4, 16), cache=cache)
        layer(torch.randn(1, 1, 16), cache=cache, start_pos=4)
    assert seen == [[0, 1, 2, 3], [4]]


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_start_pos_without_cache_stays_causal(use_sdpa):
    """Without a cache, start_pos only positions the tokens: token 0 must not see the last token."""
    torch.manual_seed(0)
    layer = mod.MultiHeadAttention(16, 4, 2, use_sdpa=use_sdpa)
    x = torch.randn(1, 6, 16)
    changed = x.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        a, b = layer(x, start_pos=5), layer(changed, start_pos=5)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])


def test_decode_without_start_pos_appends_to_the_cache():
    torch.manual_seed(0)
    layer = mod.MultiHeadAttention(16, 4, 2)
    x = torch.randn(1, 7, 16)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(1, 7)
        layer(x[:, :6], cache=cache)
        step = layer(x[:, 6:], cache=cache)  # no start_pos: continues at cache.length
    assert cache.length == 7
    torch.testing.assert_close(step, full[:, 6:], rtol=1e-5, atol=1e-5)


def test_more_user_errors_are_clear():
    q, k = torch.randn(1, 8, 5, 4), torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="one slope per query head"):
        mod.attention(q, k, k, alibi_slopes=mod.alibi_slopes(2))
    with pytest.raises(ValueError, match="see no key"):
        mod.attention_reference(q, k, k, causal=True)
    cache = mod.KVCache(1, 2, 8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="the cache holds torch.float64"):
        cache.update(k, k, 0)


# Rows that see no key, degenerate shapes, the KV cache under autograd, strided inputs.


@pytest.mark.parametrize(
    "kw",
    [
        {"window": 2, "q_start": 10},  # the window ends before the keys start: every row sees nothing
        {"causal": True, "window": 2, "q_start": 10},
        {"window": 3, "q_start": 4},  # 7 queries at 4..10 over 5 keys: the last rows see nothing
        {"causal": True, "window": 2, "q_start": 5, "alibi": True},
    ],
)
def test_rows_that_see_no_key_are_zero_on_every_path(kw):
    """The collection's rule: a query row with no visible key outputs 0 (the empty weighted sum), on
    the reference and the fused path alike, with finite (zero) gradients through that row."""
    kw = dict(kw)
    H = 4
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = mod.alibi_slopes(H)
    q = torch.randn(1, H, 7, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    p = torch.arange(kw["q_start"], kw["q_start"] + 7)[:, None]
    j = torch.arange(5)[None, :]
    visible = ((p - j).abs() < kw["window"]) & ((j <= p) if kw.get("causal") else True)
    blind = ~visible.any(-1)  # (Tq,): the rows that see no key
    assert blind.any()
    outs, dout = [], torch.randn(1, H, 7, 8, dtype=torch.float64)
    for fn in (mod.attention_reference, mod.attention):
        out = fn(q, k, v, **kw)
        assert torch.isfinite(out).all(), fn.__name__
        assert (out[:, :, blind] == 0).all(), fn.__name__
        grads = torch.autograd.grad(out, (q, k, v), dout)
        assert all(torch.isfinite(g).all() for g in grads), fn.__name__
        assert (grads[0][:, :, blind] == 0).all()
        outs.append((out, grads))
    (ref, ref_grads), (fast, fast_grads) = outs
    torch.testing.assert_close(fast, ref)
    for g, r in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("fn", ["attention_reference", "attention"])
def test_degenerate_shapes_and_window_raise_clear_errors(fn):
    f = getattr(mod, fn)
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="window"):
        f(q, k, k, window=0)
    with pytest.raises(ValueError, match="window"):
        f(q, k, k, window=2.5)
    with pytest.raises(ValueError, match="key/value heads"):
        f(q, k[:, :0], k[:, :0])
    with pytest.raises(ValueError, match="head dim"):
        f(q[..., :0], k[..., :0], k[..., :0])
    with pytest.raises(ValueError, match="sm_scale"):
        f(q, k, k, sm_scale=float("inf"))


def test_module_with_zero_head_dim_raises():
    with pytest.raises(ValueError, match="d_model"):
        mod.MultiHeadAttention(0, 4)


def test_kv_cache_with_grad_enabled_raises_up_front():
    layer = mod.MultiHeadAttention(16, 4, 2)
    cache = layer.new_cache(1, 8)
    with pytest.raises(RuntimeError, match="no_grad"):
        layer(torch.randn(1, 3, 16), cache=cache)
    assert cache.length == 0  # nothing was written
    with torch.no_grad():
        layer(torch.randn(1, 3, 16), cache=cache)  # the same call for inference works
    assert cache.length == 3


def test_strided_inputs_give_the_same_result():
    """q, k, v as views (a (B, T, H, D) layout transposed, every other position): both paths read
    them through their strides, with the same result as contiguous copies."""
    base_q, base_kv = torch.randn(2, 18, 4, 8), torch.randn(2, 2, 22, 2, 8)
    q = base_q.transpose(1, 2)[:, :, ::2]  # (2, 4, 9, 8), non-contiguous
    k, v = base_kv.permute(1, 0, 3, 2, 4)[:, :, :, ::2]  # each (2, 2, 11, 8), non-contiguous
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    for fn in (mod.attention_reference, mod.attention):
        want = fn(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, window=5)
        torch.testing.assert_close(fn(q, k, v, causal=True, window=5), want)


def test_drop_in_for_the_flash_build_signature():
    """06_flash.py calls attention_reference(q, k, v, causal, sm_scale=...) with fewer K/V heads."""
    q = torch.randn(1, 4, 6, 16, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64) for _ in range(2))
    out = mod.attention_reference(q, k, v, True, sm_scale=0.3)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kr.transpose(-1, -2)) * 0.3
    s = s.masked_fill(torch.ones(6, 9, dtype=torch.bool).triu(9 - 6 + 1), float("-inf"))
    torch.testing.assert_close(out, s.softmax(-1) @ vr)
    torch.testing.assert_close(mod.attention(q, k, v, True, sm_scale=0.3), out)
