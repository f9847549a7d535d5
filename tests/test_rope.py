"""04_rope: one hand-computed value per scaling type, the conventions, the cache, and the Triton kernel."""

import math

import pytest
import torch
from conftest import load_build

mod = load_build("04_rope")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def freqs(head_dim, scaling=None, **kw):
    inv, af = mod.rope_frequencies(head_dim, 10000.0, scaling, **kw)
    return inv.tolist(), af


# Hand-computed with base 10000: theta_i = 10000^(-2i/R), so R = 4 gives [1, 0.01] and R = 8 gives
# [1, 0.1, 0.01, 0.001]. Each case's arithmetic is in its comment.
HAND = [
    # default: 10000^0 = 1, 10000^(-2/4) = 0.01
    ("default", 4, None, {}, [1.0, 0.01], 1.0),
    # older configs say "type"; linear divides every theta by the factor
    ("linear", 4, {"type": "linear", "factor": 4.0}, {}, [0.25, 0.0025], 1.0),
    # NTK-aware: base' = 10000 * 4^(4/2) = 160000 -> [1, 160000^-0.5 = 1/400]
    ("ntk", 4, {"rope_type": "ntk", "factor": 4.0}, {}, [1.0, 0.0025], 1.0),
    # dynamic inside L_orig: unchanged
    ("dynamic short", 4, {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 1000},
     {"seq_len": 500}, [1.0, 0.01], 1.0),
    # dynamic at L = 2000: s = 2*2000/1000 - 1 = 3, base' = 10000 * 3^2 = 90000 -> [1, 1/300]
    ("dynamic long", 4, {"rope_type": "dynamic", "factor": 2.0},
     {"seq_len": 2000, "max_position_embeddings": 1000}, [1.0, 1 / 300], 1.0),
    # YaRN R=8, factor 4, L=2048: i(r) = 8 ln(2048/(2 pi r)) / (2 ln 10000) = 0.434294 ln(325.949/r)
    # i(32) = 1.008000 -> floor 1, i(1) = 2.513150 -> ceil 3; ramp (i-1)/2 clamped = [0, 0, 0.5, 1]
    # theta' = theta/4 * ramp + theta * (1 - ramp) = [1, 0.1, 0.5*0.0025 + 0.5*0.01, 0.001/4]
    # attention factor 0.1 ln 4 + 1
    ("yarn", 8, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}, {},
     [1.0, 0.1, 0.00625, 0.00025], 0.1 * math.log(4) + 1),
    # truncate false: ramp at i=2 is (2 - 1.008000)/(2.513150 - 1.008000) = 0.659070
    # -> 0.0025*0.659070 + 0.01*0.340930 = 0.00505697; i=3: (3-1.008)/1.505 > 1 -> 0.001/4
    ("yarn no truncate", 8, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                             "truncate": False}, {}, [1.0, 0.1, 0.00505697, 0.00025], 0.1 * math.log(4) + 1),
    # DeepSeek-style mscale 2, mscale_all_dim 1: (1 + 0.2 ln 4) / (1 + 0.1 ln 4) = 1.277259 / 1.138629
    ("yarn mscale", 8, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                        "mscale": 2.0, "mscale_all_dim": 1.0}, {}, [1.0, 0.1, 0.00625, 0.00025], 1.121751),
    # explicit attention_factor wins
    ("yarn af", 8, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                    "attention_factor": 0.5}, {}, [1.0, 0.1, 0.00625, 0.00025], 0.5),
    # llama3 R=8, factor 8, low 1, high 4, L=1024: wavelengths 2pi/theta = [6.28, 62.8, 628.3, 6283.2]
    # < 256 kept; > 1024 -> 0.001/8; 628.3 blended: smooth = (1024/628.3185 - 1)/3 = 0.209916
    # -> 0.790084 * 0.01/8 + 0.209916 * 0.01 = 0.00308676
    ("llama3", 8, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 1024}, {}, [1.0, 0.1, 0.00308676, 0.000125], 1.0),
    # longrope (no factor, 131072 / 4096 = 32): af = sqrt(1 + ln 32 / ln 4096) = sqrt(17/12)
    ("longrope short", 4, {"rope_type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [1.0, 8.0],
                           "original_max_position_embeddings": 4096},
     {"seq_len": 4096, "max_position_embeddings": 131072}, [1.0, 0.005], math.sqrt(17 / 12)),
    ("longrope long", 4, {"rope_type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [1.0, 8.0],
                          "original_max_position_embeddings": 4096},
     {"seq_len": 4097, "max_position_embeddings": 131072}, [1.0, 0.00125], math.sqrt(17 / 12)),
    # Phi-3-mini-128k's real layout: original_max_position_embeddings at the top level of config.json,
    # not in rope_scaling. An explicit factor wins over max_position_embeddings / original (transformers
    # 5.x, _compute_longrope_parameters): af = sqrt(1 + ln 2 / ln 4096) = sqrt(1 + 1/12) = sqrt(13/12);
    # the long factors do not depend on it: [1/1, 0.01/8]
    ("longrope phi3 long", 4, {"type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [1.0, 8.0],
                               "factor": 2.0},
     {"seq_len": 8192, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096},
     [1.0, 0.00125], math.sqrt(13 / 12)),
    # the top-level trained length wins over one inside rope_scaling, as transformers' standardize does:
    # 4096 decides short vs long (seq 3000 < 4096: short) and af = sqrt(1 + ln 2 / ln 4096)
    ("longrope top-level orig wins", 4, {"type": "longrope", "short_factor": [1.0, 2.0],
                                         "long_factor": [1.0, 8.0], "factor": 2.0,
                                         "original_max_position_embeddings": 2048},
     {"seq_len": 3000, "original_max_position_embeddings": 4096}, [1.0, 0.005], math.sqrt(13 / 12)),
    ("longrope phi3 short", 4, {"type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [1.0, 8.0]},
     {"seq_len": 4096, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096},
     [1.0, 0.005], math.sqrt(17 / 12)),
    # partial rotary: head 8, factor 0.5 -> R = 4 -> [1, 0.01]
    ("partial", 8, None, {"partial_rotary_factor": 0.5}, [1.0, 0.01], 1.0),
]  # fmt: skip


@pytest.mark.parametrize("name,head_dim,scaling,kw,want,want_af", HAND, ids=[h[0] for h in HAND])
def test_hand_computed_frequencies(name, head_dim, scaling, kw, want, want_af):
    inv, af = freqs(head_dim, scaling, **kw)
    assert inv == pytest.approx(want, rel=2e-6)
    assert af == pytest.approx(want_af, rel=2e-6)


@pytest.mark.parametrize("rope_type", mod.ROPE_TYPES[1:])
def test_scaling_matches_paper_formula(rope_type):
    assert mod.check_scaling(rope_type) < 1e-12


@pytest.mark.parametrize(
    "scaling,kw,match",
    [
        ({"rope_type": "rope2d"}, {}, "unknown rope_type"),
        ({"rope_type": "linear"}, {}, "needs the key 'factor'"),
        ({"rope_type": "linear", "factor": 0.5}, {}, "factor must be a finite number >= 1"),
        ({"rope_type": "yarn", "factor": 2.0}, {}, "original_max_position_embeddings"),
        ({"rope_type": "llama3", "factor": 8.0}, {}, "low_freq_factor"),
        (
            {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0], "factor": 2.0},
            {"max_position_embeddings": 8},
            "need 2 entries",
        ),  # fmt: skip
        (None, {"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
        # every scaling parameter is validated: what was wrong and what is accepted
        ({"rope_type": "yarn", "factor": -4.0, "original_max_position_embeddings": 64}, {},
         r"factor must be a finite number >= 1, got -4"),
        ({"rope_type": "llama3", "factor": 0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}, {}, r"factor must be a finite number >= 1, got 0"),
        ({"rope_type": "linear", "factor": float("nan")}, {}, "factor must be a finite number >= 1"),
        ({"rope_type": "ntk", "factor": float("inf")}, {}, "factor must be a finite number >= 1"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
          "original_max_position_embeddings": 64}, {}, "high_freq_factor .* must be > low_freq_factor"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}, {}, "low_freq_factor must be a finite number > 0"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}, {},
         "original_max_position_embeddings must be a positive int"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1,
          "beta_slow": 32}, {}, "beta_fast .* must be > beta_slow"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
          "attention_factor": -1.0}, {}, "attention_factor must be a finite number > 0"),
        ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}, {"seq_len": -1},
         "seq_len must be"),
        ({"rope_type": "longrope", "short_factor": [1.0, float("nan")], "long_factor": [1.0, 1.0],
          "factor": 2.0, "original_max_position_embeddings": 64}, {}, "short_factor entries must be finite"),
        ({"rope_type": "longrope", "short_factor": [1.0, 1.0], "long_factor": [1.0, 1.0],
          "factor": 0.5, "original_max_position_embeddings": 64}, {}, "factor must be a finite number >= 1"),
    ],
)  # fmt: skip
def test_bad_configs_raise(scaling, kw, match):
    with pytest.raises(ValueError, match=match):
        mod.rope_frequencies(4, 10000.0, scaling, **kw)


@pytest.mark.parametrize("base", [float("nan"), float("inf"), 1.0, -5.0])
def test_bad_base_raises(base):
    with pytest.raises(ValueError, match="base \\(rope_theta\\) must be a finite number > 1"):
        mod.rope_frequencies(4, base)


def test_relative_position_property():
    assert mod.check_relative_position(DEVICE) < 1e-10


def test_conventions_are_a_row_permutation():
    assert mod.check_weight_permutation(DEVICE) < 1e-12


def test_interleaved_is_complex_multiplication():
    assert mod.check_complex_form(DEVICE) < 1e-12


def test_rotary_embedding_cache():
    mod.check_module_cache(DEVICE)
    emb = mod.RotaryEmbedding(8, 10000.0, {"rope_type": "longrope", "short_factor": [1.0] * 4,
                                           "long_factor": [2.0] * 4, "original_max_position_embeddings": 16,
                                           "factor": 4.0})  # fmt: skip
    short, _ = emb(16)
    long, _ = emb(17)
    assert emb.rebuilds == 2 and not torch.allclose(short, long[:16])  # switched to the long factors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize(
    "shape,rotary,layout,scaling",
    [
        ((2, 13, 6, 2, 32), 1.0, "contiguous", None),  # GQA 3:1, odd T
        ((1, 7, 5, 5, 20), 1.0, "fused", None),  # MHA, R/2 = 10, slices of a qkv buffer
        ((2, 9, 3, 1, 32), 0.25, "bhtd", None),  # MQA, partial rotary, (B, H, T, D) transposed
        ((1, 5, 7, 1, 24), 0.5, "contiguous", {"rope_type": "yarn", "factor": 4.0}),  # attention factor
    ],
)
def test_kernel_matches_reference(shape, rotary, layout, scaling, interleaved, dtype):
    mod.check_kernel(*shape, dtype, DEVICE, interleaved, rotary, layout, scaling)


def test_kernel_input_errors():
    q, k = torch.randn(1, 4, 2, 8, device=DEVICE), torch.randn(1, 4, 1, 8, device=DEVICE)
    cos, sin = mod.cos_sin_table(mod.rope_frequencies(8, 10000.0)[0], 4, device=DEVICE)
    with pytest.raises(ValueError, match="must be \\(B, T, H, D\\)"):
        mod.rope_triton_(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="agree on B, T and D"):
        mod.rope_triton_(q, k[:, :3], cos, sin)
    with pytest.raises(ValueError, match="cos, sin must both be"):
        mod.rope_triton_(q, k, cos[:3], sin[:3])
    with pytest.raises(TypeError, match="floating tensor"):
        mod.rope_triton_(q.long(), k, cos, sin)
    with pytest.raises(ValueError, match="stride-0"):
        mod.rope_triton_(q[:, :, :1].expand(1, 4, 2, 8), k, cos, sin)
    with pytest.raises(ValueError, match="same memory"):
        mod.rope_triton_(q, q, cos, sin)
    x = torch.randn(1, 4, 2, 8, device=DEVICE, requires_grad=True) * 1  # the autograd path checks too
    with pytest.raises(ValueError, match="same memory"):
        mod.rope_triton_(x, x, cos, sin)


def test_overlapping_q_and_k_are_refused_anywhere():
    """Any shared element, not only a shared start, would be rotated twice."""
    cos, sin = mod.cos_sin_table(mod.rope_frequencies(8, 10000.0)[0], 4, device=DEVICE)
    q = torch.randn(1, 4, 4, 8, device=DEVICE)
    for k in (q[:, :, 1:3], q[:, :, 3:], q[:, :, 2:]):
        with pytest.raises(ValueError, match="same memory"):
            mod.rope_triton_(q, k, cos, sin)
    leaf = torch.randn(1, 4, 4, 8, device=DEVICE, requires_grad=True)
    x = leaf * 1
    with pytest.raises(ValueError, match="same memory"):
        mod.rope_triton_(x, x[:, :, 1:3], cos, sin)
    # slices of one fused buffer that share no element are fine: q heads 0-1, k heads 2-3
    buf = torch.randn(1, 4, 4, 8, device=DEVICE)
    q2, k2 = buf[:, :, :2], buf[:, :, 2:]
    ref_q, ref_k = mod.apply_rope(q2.clone(), k2.clone(), cos, sin)
    mod.rope_triton_(q2, k2, cos, sin)
    torch.testing.assert_close(q2, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k2, ref_k, rtol=1e-5, atol=1e-5)


def test_empty_inputs_are_a_no_op():
    cos, sin = mod.cos_sin_table(mod.rope_frequencies(8, 10000.0)[0], 4, device=DEVICE)
    empty_b = torch.randn(0, 4, 2, 8, device=DEVICE)
    q, k = mod.rope_triton_(empty_b, torch.randn(0, 4, 1, 8, device=DEVICE), cos, sin)
    assert q.shape == (0, 4, 2, 8) and k.shape == (0, 4, 1, 8)
    # zero query heads: nothing to rotate in q; k is still rotated
    k = torch.randn(1, 4, 2, 8, device=DEVICE)
    ref_k = mod.apply_rope(k[:, :, :0], k.clone(), cos, sin)[1]
    mod.rope_triton_(torch.randn(1, 4, 0, 8, device=DEVICE), k, cos, sin)
    torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)
    # zero tokens, and the autograd path
    t0 = torch.randn(1, 0, 2, 8, device=DEVICE, requires_grad=True)
    c0, s0 = cos[:0], sin[:0]
    out_q, _ = mod.rope_triton_(t0 * 1, t0 * 1, c0, s0)
    assert out_q.shape == (1, 0, 2, 8)


def test_rotary_embedding_phi3_layout():
    """Phi-3's config keeps the trained length at the top level: the module switches to the long
    factors past it and scales by sqrt(1 + ln 32 / ln 4096)."""
    scaling = {"type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [1.0, 8.0]}
    emb = mod.RotaryEmbedding(4, 10000.0, scaling, max_position_embeddings=131072,
                              original_max_position_embeddings=4096)  # fmt: skip
    cos, _ = emb(8192)
    af = math.sqrt(17 / 12)
    want = torch.tensor([math.cos(1.0), math.cos(0.00125)], dtype=torch.float64) * af
    torch.testing.assert_close(cos[1].double(), want, rtol=1e-6, atol=1e-6)


def test_forward_then_backward_restores_input():
    """The backward kernel is the inverse rotation when the attention factor is 1: rotate, un-rotate."""
    q0, k0 = torch.randn(2, 10, 4, 16, device=DEVICE), torch.randn(2, 10, 2, 16, device=DEVICE)
    cos, sin = mod.cos_sin_table(mod.rope_frequencies(16, 10000.0)[0], 10, device=DEVICE)
    q, k = q0.clone(), k0.clone()
    mod._launch(q, k, cos, sin, False, backward=False)
    assert not torch.allclose(q, q0)
    mod._launch(q, k, cos, sin, False, backward=True)
    torch.testing.assert_close(q, q0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k0, rtol=1e-5, atol=1e-5)


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    mod.plot_frequencies(tmp_path)
    assert (tmp_path / "04_rope.png").stat().st_size > 10_000


def test_backward_reads_an_expanded_gradient_through_its_strides():
    """.sum() hands backward a stride-0 (expanded) gradient; the kernel must see real elements."""
    cos, sin = mod.cos_sin_table(mod.rope_frequencies(8, 10000.0)[0], 4, device=DEVICE)
    leaf = torch.randn(1, 4, 3, 8, device=DEVICE, requires_grad=True)
    q, k = mod.rope_triton_(leaf[:, :, :2] * 1, leaf[:, :, 2:] * 1, cos, sin)
    (q.sum() + k.sum()).backward()
    ref_leaf = leaf.detach().double().requires_grad_()
    rq, rk = mod.apply_rope(ref_leaf[:, :, :2], ref_leaf[:, :, 2:], cos.double(), sin.double())
    (rq.sum() + rk.sum()).backward()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-5, atol=1e-5)


def test_overlap_test_is_exact_on_views_of_one_buffer(monkeypatch):
    """_overlap agrees with marking memory on random head/time/channel slices of one qkv buffer, and
    decides equal-stride views from shapes and strides alone (no scratch map, so no device sync)."""
    import random

    # hand-checkable: strides (8, 1), c in [-1, 3] x [-7, 7]; 16 = 2*8 + 0; 40 > 3*8 + 7
    assert mod._offset_reachable(16, [(8, -1, 3), (1, -7, 7)]) is True
    assert mod._offset_reachable(40, [(8, -1, 3), (1, -7, 7)]) is False
    rng = random.Random(0)
    for _ in range(150):
        B, T, H, D = rng.randint(1, 3), rng.randint(1, 5), rng.randint(2, 7), rng.choice([2, 4, 8])
        buf = torch.zeros(B, T, H, D)
        ha, hb = rng.randint(1, H - 1), rng.randint(1, H - 1)
        a0, b0, t0 = rng.randint(0, H - ha), rng.randint(0, H - hb), rng.randint(0, T - 1)
        q, k = buf[:, :, a0 : a0 + ha], buf[:, t0:, b0 : b0 + hb]
        mark = torch.zeros(buf.numel(), dtype=torch.bool)
        mark.as_strided(q.shape, q.stride(), q.storage_offset()).fill_(True)
        truth = bool(mark.as_strided(k.shape, k.stride(), k.storage_offset()).any())
        with monkeypatch.context() as m:  # equal strides: decided without a scratch map
            m.setattr(mod.torch, "zeros", lambda *a, **kw: pytest.fail("_overlap touched memory"))
            assert mod._overlap(q, k) == truth, (buf.shape, a0, ha, b0, hb, t0)
