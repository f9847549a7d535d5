r"""RoPE: rotary position embedding, the context-extension variants real checkpoints use, and a Triton kernel.

Rotary position embedding (Su et al., 2021) encodes a token's position m by rotating each pair of
channels of its query and key by the angle m * theta_i. A dot product of two rotated vectors then depends
only on the distance m - n, which is why every modern open LLM uses it. This file builds the frequency
tables exactly as Hugging Face `config.json` files specify them (`rope_scaling`), applies the rotation in
both conventions found in the wild, and ships a Triton kernel that rotates q and k in place in one launch.

You will learn:
  - why q_m . k_n depends only on m - n (a rotation by m*theta times the transpose of one by n*theta);
  - rotate-half (GPT-NeoX, HF Llama) versus interleaved pairs (RoFormer, Meta, GPT-J, llama.cpp), and
    why they are the same model once the rows of W_q and W_k are permuted;
  - the context-extension family as configs write it: linear position interpolation, NTK-aware base
    scaling (static: our "ntk", not an HF rope_type; and HF's "dynamic"), YaRN (ramp + attention
    factor), Llama-3.1 smooth interpolation, LongRoPE;
  - an in-place elementwise Triton kernel over strided (B, T, H, D) views, GQA included, whose
    backward is the same kernel with sin -> -sin (the transpose of a rotation).

Builds on: harness.py (device, checks, timing, results).

Does not handle:
  - per-sequence position ids (packed or ragged batches, decode offsets): slice the cos/sin table
    (`cos[offset:offset + T]`) before calling; multimodal M-RoPE (Qwen2-VL) and 2-D RoPE;
  - gradients with respect to cos/sin (they are fixed tables, not parameters);
  - dynamic NTK's known inconsistency at decode time: keys already in a KV cache keep the frequencies
    they were rotated with when the base changes (Hugging Face behaves the same).

References: Su et al., "RoFormer" (2021); Chen et al., "Extending Context Window ... via Positional
Interpolation" (2023); bloc97's NTK-aware scaling (2023, Reddit); Peng et al., "YaRN" (2023); Meta,
"The Llama 3 Herd of Models" (2024); Ding et al., "LongRoPE" (2024). Reference implementation for the
config keys and defaults: Hugging Face transformers `modeling_rope_utils.py` (read, not copied).

Run:
  python 04_rope.py            # checks, then the benchmark (GPU); writes results/04_rope.json and .png
  python 04_rope.py --quick    # small shapes; on CPU the kernel runs in Triton's interpreter

Shapes: B batch, T sequence (positions), H heads (HQ query heads, HK key heads, HK <= HQ for GQA),
D head dim, R = rotated dims (D * partial_rotary_factor), R/2 rotation pairs. Tensors are (B, T, H, D).
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import harness  # first: sets TRITON_INTERPRET=1 when there is no GPU, before Triton is imported

import torch
import triton
import triton.language as tl

# %% [markdown]
# ## Config


@dataclass
class BenchConfig:
    # (B, T, HQ, HK, D): Llama-3-8B prefill (32 query heads, 8 KV heads, head dim 128) at 8k tokens.
    shapes: tuple = ((1, 8192, 32, 8, 128), (4, 8192, 32, 8, 128))
    base: float = 500000.0  # Llama 3's rope_theta; the speed does not depend on it


QUICK = BenchConfig(shapes=((2, 64, 8, 2, 64),))
TILE, NUM_WARPS = 4096, 4  # kernel tile: pairs per program (x2 halves: 16 KB of bf16), warps per program
# An elementwise kernel in fp32 maths rounds once per output: bf16 lands near 1.6e-3 (3.3e-3 in the CPU
# interpreter, whose float -> bf16 cast truncates), so the harness's bf16 tolerance for matmul-heavy
# builds (2e-2) would let a 1% error in the angles pass.
KERNEL_TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-3, torch.float16: 1e-3}
# Hugging Face's rope_type names, plus "ntk" (static NTK-aware scaling): HF has no such rope_type, only
# "dynamic"; "ntk" is this collection's name, accepted here so the static form can be compared.
ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")


# %% [markdown]
# ## Frequencies: RoPE and its context-extension family
#
# RoFormer eq. (15): pair i of R rotated dims turns by theta_i = base^(-2i/R) per position, i < R/2,
# so pair 0 turns one radian per token and the last pair (i = R/2 - 1) takes 2*pi*base^((R-2)/R) tokens
# per turn (its wavelength 2*pi/theta_i). A model trained on L tokens has only seen each slow pair turn
# a fraction of a circle; past L, the slow pairs reach angles never seen in training and attention
# breaks. Every extension below slows some pairs so that the long context maps back onto angles the
# model knows.


def _need(s: dict, key: str, rope_type: str):
    if s.get(key) is None:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs the key {key!r}; got keys {sorted(s)}")
    return s[key]


def _number(name: str, x, lo: float, inclusive: bool = False) -> float:
    """x as a float if it is a finite real number above lo (or at it, if inclusive); else a clear error.
    (NaN fails every comparison, so a bare `x <= lo` test would let it through.)"""
    real = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if not (real and (x >= lo if inclusive else x > lo)):
        raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {lo:g}, got {x!r}")
    return float(x)


def _length(name: str, x, allow_zero: bool = False):
    """None, or a context length: a non-negative (positive unless allow_zero) int."""
    if x is not None and (not isinstance(x, int) or isinstance(x, bool) or x < (0 if allow_zero else 1)):
        raise ValueError(f"{name} must be {'a non-negative' if allow_zero else 'a positive'} int, got {x!r}")
    return x


def _factor(s: dict, rope_type: str) -> float:
    """The stretch s: a finite number >= 1 (below 1 would speed pairs up, <= 0 flips or breaks them)."""
    return _number(f"rope_scaling {rope_type!r}: factor", _need(s, "factor", rope_type), 1, inclusive=True)


def _attention_factor(s: dict, rope_type: str):
    """An explicit attention_factor (a finite number > 0), or None to use the paper's default."""
    af = s.get("attention_factor")
    return None if af is None else _number(f"{rope_type} attention_factor", af, 0)


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN's fit sqrt(1/t) = 0.1 ln(s) + 1: the logit temperature that keeps attention entropy
    # flat as the context grows s-fold (fitted on Llama 2 in the paper).
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq, s, dim, base, orig):
    """YaRN "NTK-by-parts": keep fast pairs, interpolate slow ones, ramp linearly in between."""
    if s.get("factor") is None:  # DeepSeek-V3-style configs give the two lengths instead of the factor
        if s.get("max_position_embeddings") is None:
            raise ValueError(
                "yarn without 'factor' needs max_position_embeddings= (the config field) to derive it"
            )
        s["factor"] = s["max_position_embeddings"] / orig
    factor = _factor(s, "yarn")
    # Pair i turns r = orig * theta_i / (2 pi) times over the trained context; solving for i gives
    # i(r) = dim * ln(orig / (2 pi r)) / (2 ln base) ("NTK-by-parts" in YaRN). The defaults are beta_fast=32,
    # beta_slow=1 ("or": a 0 or null in the config also means the default, as in transformers).
    beta_fast = _number("rope_scaling 'yarn': beta_fast", s.get("beta_fast") or 32, 0)
    beta_slow = _number("rope_scaling 'yarn': beta_slow", s.get("beta_slow") or 1, 0)
    if beta_fast <= beta_slow:
        raise ValueError(f"yarn beta_fast ({beta_fast:g} turns) must be > beta_slow ({beta_slow:g} turns)")
    lo, hi = (dim * math.log(orig / (2 * math.pi * r)) / (2 * math.log(base)) for r in (beta_fast, beta_slow))
    if s.get("truncate", True):  # the paper rounds to whole pairs; gpt-oss sets truncate=false
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    hi = hi + 0.001 if hi == lo else hi  # a one-pair ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)  # 0 keep, 1 interp
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = _attention_factor(s, "yarn")
    if attention_factor is None:  # DeepSeek-V2/V3 give two mscales whose ratio is the factor
        m, m_all = (s.get(key) and _number(f"yarn {key}", s[key], 0) for key in ("mscale", "mscale_all_dim"))
        attention_factor = (
            _get_mscale(factor, m) / _get_mscale(factor, m_all) if m and m_all else _get_mscale(factor)
        )
    return inv_freq, float(attention_factor)


def _llama3(inv_freq, s):
    """Llama 3.1: pairs faster than orig/high_freq_factor kept, slower than orig/low_freq_factor
    divided by factor, a smooth blend in wavelength between (Llama 3 paper; Meta's apply_scaling)."""
    factor = _factor(s, "llama3")
    low, high = (
        _number(f"llama3 {k}", _need(s, k, "llama3"), 0) for k in ("low_freq_factor", "high_freq_factor")
    )
    if high <= low:  # the blend divides by high - low: equal or reversed bands have no meaning
        raise ValueError(f"llama3 high_freq_factor ({high:g}) must be > low_freq_factor ({low:g})")
    orig = _length(
        "llama3 original_max_position_embeddings", _need(s, "original_max_position_embeddings", "llama3")
    )
    wavelen = 2 * math.pi / inv_freq
    smooth = ((orig / wavelen - low) / (high - low)).clamp(0, 1)  # 1 at wavelen<=orig/high, 0 at >=orig/low
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0


def _longrope(inv_freq, s, dim, orig, seq_len, max_position_embeddings):
    """LongRoPE (Phi-3): searched per-pair divisors, one set inside the trained range, one past it."""
    short, long = _need(s, "short_factor", "longrope"), _need(s, "long_factor", "longrope")
    if len(short) != dim // 2 or len(long) != dim // 2:
        raise ValueError(
            f"longrope short_factor/long_factor need {dim // 2} entries (R/2), got {len(short)}/{len(long)}"
        )
    for name, fs in (("short_factor", short), ("long_factor", long)):
        if not all(isinstance(f, (int, float)) and math.isfinite(f) and f > 0 for f in fs):
            raise ValueError(f"longrope {name} entries must be finite numbers > 0, got {fs}")
    if s.get("factor") is None:  # Phi-3: factor = max_position_embeddings / original_max_position_embeddings
        if max_position_embeddings is None:
            raise ValueError("longrope without 'factor' needs max_position_embeddings= to derive it")
        s["factor"] = max_position_embeddings / orig
    factor = _factor(s, "longrope")  # an explicit factor wins over the ratio, as in transformers 5
    attention_factor = _attention_factor(s, "longrope")
    if attention_factor is None:  # LongRoPE / Phi-3: sqrt(1 + ln(s) / ln(L_orig))
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = long if seq_len is not None and seq_len > orig else short
    return inv_freq / torch.tensor(ext, dtype=torch.float64), float(attention_factor)


def rope_frequencies(head_dim, base, scaling=None, partial_rotary_factor=1.0, *, seq_len=None,
                     max_position_embeddings=None, original_max_position_embeddings=None):  # fmt: skip
    """(inv_freq, attention_factor): theta_i for the R/2 rotated pairs (float64), and the scale HF
    multiplies into cos and sin. `scaling` is a config.json `rope_scaling` dict, e.g.
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768};
    max_position_embeddings and original_max_position_embeddings are the config's top-level fields.

    Example: rope_frequencies(4, 10000.0) -> (tensor([1.0, 0.01]), 1.0); with
    {"rope_type": "linear", "factor": 4.0} -> (tensor([0.25, 0.0025]), 1.0).
    """
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if not 0 < partial_rotary_factor <= 1:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}")
    dim = int(head_dim * partial_rotary_factor)  # R, the rotated dims (transformers rounds down the same way)
    if dim < 2 or dim % 2:
        raise ValueError(f"rotated dims head_dim*partial_rotary_factor = {dim} must be even and >= 2")
    _number("base (rope_theta)", base, 1)
    _length("seq_len", seq_len, allow_zero=True)
    _length("max_position_embeddings", max_position_embeddings)
    _length("original_max_position_embeddings", original_max_position_embeddings)
    s = dict(scaling or {})
    rope_type = s.get("rope_type", s.get("type", "default"))  # older configs spell it "type"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unknown rope_type {rope_type!r}; accepted: {', '.join(ROPE_TYPES)}")
    if rope_type in ("linear", "ntk", "dynamic"):
        _factor(s, rope_type)
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim  # 2i/R
    inv_freq = base**-exponent  # theta_i = base^(-2i/R), RoFormer eq. (15)
    if rope_type == "linear":  # position interpolation (Chen et al.): m -> m/s, i.e. theta_i -> theta_i/s
        return inv_freq / s["factor"], 1.0
    if rope_type in ("ntk", "dynamic"):
        # NTK-aware: raise the base so the slowest pair (i = R/2-1) slows by exactly s while pair 0 keeps
        # its speed: (base*k)^(-(R-2)/R) = base^(-(R-2)/R) / s  <=>  k = s^(R/(R-2)).
        scale = s["factor"]
        if rope_type == "dynamic":  # dynamic NTK: s grows with the sequence, s = f*L/L_orig - (f-1) >= 1
            orig = _original_max(s, max_position_embeddings, rope_type, original_max_position_embeddings)
            length = max(seq_len or orig, orig)
            scale = scale * length / orig - (scale - 1)
        return (base * scale ** (dim / (dim - 2))) ** -exponent, 1.0
    if rope_type == "yarn":
        s.setdefault("max_position_embeddings", max_position_embeddings)
        orig = _original_max(s, max_position_embeddings, rope_type, original_max_position_embeddings)
        return _yarn(inv_freq, s, dim, base, orig)
    if rope_type == "llama3":
        if original_max_position_embeddings is not None:  # the top-level field wins (see Interop)
            s["original_max_position_embeddings"] = original_max_position_embeddings
        return _llama3(inv_freq, s)
    if rope_type == "longrope":
        orig = _original_max(s, max_position_embeddings, rope_type, original_max_position_embeddings)
        return _longrope(inv_freq, s, dim, orig, seq_len, max_position_embeddings)
    return inv_freq, 1.0


# %% [markdown]
# ## Reference: tables, the two conventions, and a caching module
#
# Write a pair as a complex number z = x1 + i*x2. RoPE is z * e^{i m theta}: x1' = x1 cos - x2 sin,
# x2' = x2 cos + x1 sin. Then <R(m) q, R(n) k> = q^T R(m)^T R(n) k = q^T R(n - m) k: only the
# difference of positions survives. The conventions differ only in *which* channels form a pair:
#   interleaved (RoFormer, Meta's llama, GPT-J, llama.cpp): (x[2i], x[2i+1])
#   rotate-half (GPT-NeoX, HF Llama):                       (x[i],  x[i + R/2])
# Proof they are one model: let P put channels [0, 2, 4, ..., 1, 3, 5, ...] first. If W_q's rows are
# permuted by P then q' = q[P], so q'[i] = q[2i] and q'[i + R/2] = q[2i+1]: rotate-half on q' pairs
# exactly the interleaved pairs of q, so rope_half(q[P]) = rope_interleaved(q)[P], and a dot product
# over a permuted pair of vectors is unchanged. (HF's convert_llama_weights_to_hf.py permutes so.)


def cos_sin_table(inv_freq, seq_len, attention_factor=1.0, dtype=torch.float32, device=None):
    """cos and sin of m * theta_i for m < seq_len, each (T, R/2), times the attention factor. Angles in
    float64: in float32, m * theta at m = 1e5 is off by ~1e-2 rad."""
    pos = torch.arange(seq_len, dtype=torch.float64, device=device)
    angles = torch.outer(pos, inv_freq.to(device=device, dtype=torch.float64))  # (T, R/2)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def _check_shapes(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, T, H, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    (B, T, _, D), (Bk, Tk, _, Dk) = q.shape, k.shape
    if (B, T, D) != (Bk, Tk, Dk):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, T and D")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != T or not 0 < 2 * cos.shape[1] <= D:
        raise ValueError(
            f"cos, sin must both be (T, R/2) = ({T}, <= {D // 2}); got {tuple(cos.shape)} {tuple(sin.shape)}"
        )


def _rotate(x, cos, sin, interleaved):
    half = cos.shape[-1]
    ct = torch.promote_types(x.dtype, torch.float32)  # float32 maths for bf16, float64 stays float64
    c, s = cos[None, :, None, :].to(ct), sin[None, :, None, :].to(ct)  # (1, T, 1, R/2)
    xr = x[..., : 2 * half].to(ct)
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    y = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return torch.cat((y.to(x.dtype), x[..., 2 * half :]), -1)  # dims past R pass through (partial rotary)


def apply_rope(q, k, cos, sin, interleaved=False):
    """Rotate q (B, T, HQ, D) and k (B, T, HK, D) by the (T, R/2) tables; returns new tensors."""
    _check_shapes(q, k, cos, sin)
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)


class RotaryEmbedding(torch.nn.Module):
    """Caches the cos/sin tables for the device and dtype in use; forward(seq_len) -> (cos, sin).

    The table is rebuilt only when the device, dtype or frequency regime changes, or it is too short.
    Dynamic NTK's regime is the length its base was computed for: it grows with seq_len past the
    original length and falls back to the original inside it; LongRoPE switches short -> long.
    """

    def __init__(self, head_dim, base=10000.0, scaling=None, partial_rotary_factor=1.0,
                 max_position_embeddings=None, original_max_position_embeddings=None):  # fmt: skip
        super().__init__()
        self.args = dict(
            head_dim=head_dim, base=base, scaling=scaling, partial_rotary_factor=partial_rotary_factor,
            max_position_embeddings=max_position_embeddings,
            original_max_position_embeddings=original_max_position_embeddings,
        )  # fmt: skip
        rope_frequencies(**self.args)  # validate now
        s = scaling or {}
        self.rope_type = s.get("rope_type", s.get("type", "default"))
        if self.rope_type in ("dynamic", "longrope"):
            self.orig = _original_max(
                s, max_position_embeddings, self.rope_type, original_max_position_embeddings
            )
        self._key, self._cos, self._sin, self.rebuilds = None, None, None, 0

    def _regime(self, seq_len):
        if self.rope_type == "longrope":
            return seq_len > self.orig
        if self.rope_type == "dynamic":
            current = self._key[2] if self._key else self.orig
            return self.orig if seq_len <= self.orig else max(seq_len, current)
        return None

    def forward(self, seq_len: int, device=None, dtype=torch.float32):
        device = torch.device(device or "cpu")
        key = (device, dtype, self._regime(seq_len))
        if key != self._key or self._cos.shape[0] < seq_len:
            freq_len = key[2] if self.rope_type == "dynamic" else seq_len
            inv_freq, af = rope_frequencies(**self.args, seq_len=freq_len)
            self._cos, self._sin = cos_sin_table(inv_freq, seq_len, af, dtype, device)
            self._key, self.rebuilds = key, self.rebuilds + 1
        return self._cos[:seq_len], self._sin[:seq_len]


# %% [markdown]
# ## Triton: rotate q and k in place, one launch
#
# RoPE does 6 flops per pair and moves every byte of q and k once: it is purely memory-bound, so the
# kernel's job is to read q and k once, write them once, in place (no new allocation), and launch once
# for both. Grid = (T blocks, q head blocks + k head blocks, B): axis 1 decides whether a program works
# on q or on k, which is how GQA's fewer k heads share the launch. Each program holds a
# (BLOCK_T, BLOCK_H, R/2) tile of both halves of the pairs and the (BLOCK_T, R/2) cos/sin it needs.
# Every tensor comes with its four strides, so views of a fused qkv buffer or a (B, H, T, D) tensor
# transposed to (B, T, H, D) work without a copy. Backward: y = A x with A = a * R(m theta) block
# diagonal, so dx = A^T dy = a * R(-m theta) dy: the same kernel with sin negated.


@triton.jit
def _rope_tile(x_ptr, cos_ptr, sin_ptr, b, t0, h0, T, H, s_b, s_t, s_h, s_d, s_ct, HALF,
               BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr,
               INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr):  # fmt: skip
    t = t0 + tl.arange(0, BLOCK_T)  # (BLOCK_T,) positions
    h = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,) heads
    i = tl.arange(0, HALF_PAD)  # (HALF_PAD,) pair index; R/2 need not be a power of two
    cs_off = t[:, None].to(tl.int64) * s_ct + i[None, :]
    cs_mask = (t[:, None] < T) & (i[None, :] < HALF)
    c = tl.load(cos_ptr + cs_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]  # (BT, 1, HP)
    s = tl.load(sin_ptr + cs_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    if BACKWARD:
        s = -s  # the transpose of a rotation is the rotation by minus the angle
    row = x_ptr + b.to(tl.int64) * s_b + t[:, None, None].to(tl.int64) * s_t + h[None, :, None] * s_h
    th_mask = (t < T)[:, None, None] & (h < H)[None, :, None]
    if INTERLEAVED:
        # pairs (x[2i], x[2i+1]): load the R channels as one contiguous run (stride-2 loads would waste
        # most of each memory transaction), then split even and odd lanes in registers.
        d = tl.arange(0, 2 * HALF_PAD)
        ptrs, mask = row + d[None, None, :] * s_d, th_mask & (d < 2 * HALF)[None, None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, HALF_PAD, 2)))  # each (BT, BH, HP)
        y = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)  # (BT, BH, HP, 2): interleave back
        tl.store(ptrs, tl.reshape(y, (BLOCK_T, BLOCK_H, 2 * HALF_PAD)).to(x_ptr.dtype.element_ty), mask=mask)
    else:
        # pairs (x[i], x[i + R/2]): two contiguous half-rows
        mask = th_mask & (i < HALF)[None, None, :]
        p1, p2 = row + i[None, None, :] * s_d, row + (i + HALF)[None, None, :] * s_d  # (BT, BH, HP)
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(p2, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, T, HQ, HK, sqb, sqt, sqh, sqd, skb, skt, skh, skd, s_ct,
                 HALF,
                 BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr,
                 INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr):  # fmt: skip
    pid_t, pid_h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_q_blocks = tl.cdiv(HQ, BLOCK_H)
    if pid_h < n_q_blocks:  # this program rotates query heads ...
        _rope_tile(q_ptr, cos_ptr, sin_ptr, b, pid_t * BLOCK_T, pid_h * BLOCK_H, T, HQ, sqb, sqt, sqh, sqd,
                   s_ct, HALF, BLOCK_T, BLOCK_H, HALF_PAD, INTERLEAVED, BACKWARD)  # fmt: skip
    else:  # ... or key heads
        _rope_tile(k_ptr, cos_ptr, sin_ptr, b, pid_t * BLOCK_T, (pid_h - n_q_blocks) * BLOCK_H, T, HK, skb,
                   skt, skh, skd, s_ct, HALF, BLOCK_T, BLOCK_H, HALF_PAD, INTERLEAVED, BACKWARD)  # fmt: skip


def _launch(q, k, cos, sin, interleaved, backward):
    """One launch rotating q and, unless k is None, k. Validates what a user can get wrong."""
    _check_shapes(q, q if k is None else k, cos, sin)
    if q.numel() == 0:  # nothing to rotate in q (B, T or HQ is 0): rotate k alone, or nothing
        q, k = (k, None) if k is not None and k.numel() > 0 else (None, None)
    elif k is not None and k.numel() == 0:
        k = None
    if q is None:
        return
    tensors = (("q", q), ("k", k), ("cos", cos), ("sin", sin)) if k is not None else (("q", q), ("cos", cos))
    for name, x in tensors:
        if not x.is_floating_point() or x.device != q.device:
            raise TypeError(f"{name} must be a floating tensor on {q.device}; got {x.dtype} on {x.device}")
    for name, x in tensors[: 2 if k is not None else 1]:  # stride 0 would make in-place writes collide
        if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape, strict=True)):
            raise ValueError(
                f"{name} has a stride-0 (expanded) dimension; in-place RoPE needs distinct elements"
            )
        if max((n - 1) * abs(st) for st, n in zip(x.stride(), x.shape, strict=True)) >= 2**31:
            raise ValueError(f"{name} spans 2^31 elements or more; the kernel's offsets are 32-bit")
    if k is not None and _overlap(q, k):
        raise ValueError(_OVERLAP_MSG)
    B, T, HQ, _ = q.shape
    HK, half = (0 if k is None else k.shape[2]), cos.shape[1]
    cos, sin = cos.contiguous(), sin.contiguous()  # (T, R/2), small
    half_pad = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(min(HQ, HK or HQ)), 16)  # GQA: sized to the k heads, no wasted lanes
    block_t = max(1, min(triton.next_power_of_2(T), TILE // (block_h * half_pad)))
    grid = (triton.cdiv(T, block_t), triton.cdiv(HQ, block_h) + triton.cdiv(HK, block_h), B)
    k = q if k is None else k  # no k programs are launched when HK = 0
    _rope_kernel[grid](q, k, cos, sin, T, HQ, HK, *q.stride(), *k.stride(), cos.stride(0), half,
                       BLOCK_T=block_t, BLOCK_H=block_h, HALF_PAD=half_pad, INTERLEAVED=interleaved,
                       BACKWARD=backward, num_warps=NUM_WARPS)  # fmt: skip


_OVERLAP_MSG = ("q and k share memory (the same memory in part or whole): rotating in place would rotate "
                "the shared elements twice; pass tensors or views that share no element")  # fmt: skip


def _overlap(q, k) -> bool:
    """Whether q and k share any element (rope_triton_(q, q[:, :, 1:3]) would rotate two heads twice).

    Tensors whose address ranges are disjoint cannot overlap: the usual case. Slices of one fused qkv
    buffer interleave in memory without sharing elements, so when the ranges intersect and the strides
    agree, _offset_reachable decides exactly from shapes and strides alone (no memory touched, no
    device sync). Other intersecting layouts get a scratch map: mark q's elements, look under k."""
    if q.numel() == 0 or k.numel() == 0:
        return False
    es = q.element_size()

    def span(x):  # [first byte, one past the last byte]; torch strides are non-negative
        last = sum((n - 1) * st for n, st in zip(x.shape, x.stride(), strict=True))
        return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()

    (q0, q1), (k0, k1) = span(q), span(k)
    if q1 <= k0 or k1 <= q0:
        return False
    if k.element_size() != es or (k0 - q0) % es:  # mixed dtypes over one buffer: refuse, not guess
        return True
    if q.stride() == k.stride():
        # q[a] and k[b] are one element iff (a - b) . strides = (k0 - q0) / es, a - b in a box
        box = [(st, 1 - nk, nq - 1) for st, nq, nk in zip(q.stride(), q.shape, k.shape, strict=True)]
        found = _offset_reachable((k0 - q0) // es, box)
        if found is not None:
            return found
    lo = min(q0, k0)
    mark = torch.zeros((max(q1, k1) - lo) // es, dtype=torch.bool, device=q.device)
    mark.as_strided(q.shape, q.stride(), (q0 - lo) // es).fill_(True)
    return bool(mark.as_strided(k.shape, k.stride(), (k0 - lo) // es).any())


def _offset_reachable(delta: int, box, budget: int = 10_000):
    """Is delta = sum_d c_d * stride_d for integers lo_d <= c_d <= hi_d? box = [(stride, lo, hi)].

    Depth-first from the largest stride: c_d must leave a remainder the smaller strides can still
    reach, which for tensor layouts leaves about three candidates per dimension. Example: strides
    (8, 1), c in [-1, 3] x [-7, 7]: delta = 16 -> c = (2, 0): True. None if the search runs past
    `budget` nodes (then the caller tests memory instead)."""
    dims = sorted((d for d in box if d[0] > 0 and d[1] < d[2]), reverse=True)  # size-1 dims add nothing
    reach = [0] * (len(dims) + 1)  # reach[i]: the largest |sum| dims i.. can make
    for i in range(len(dims) - 1, -1, -1):
        st, lo, hi = dims[i]
        reach[i] = reach[i + 1] + st * max(-lo, hi)
    nodes = 0

    def search(i, rem):
        nonlocal nodes
        nodes += 1
        if nodes > budget:
            raise OverflowError
        if i == len(dims):
            return rem == 0
        st, lo, hi = dims[i]
        r = reach[i + 1]
        c_lo, c_hi = max(lo, -((r - rem) // st)), min(hi, (rem + r) // st)  # |rem - c*st| <= r
        return any(search(i + 1, rem - c * st) for c in range(c_lo, c_hi + 1))

    try:
        return search(0, delta)
    except OverflowError:
        return None


class _RopeFunction(torch.autograd.Function):
    """Rotate one tensor in place. One Function per tensor: q and k are usually views (of a projection's
    output or a fused qkv buffer), and autograd lets an in-place Function on a view return one tensor only."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        _launch(x, None, cos, sin, interleaved, backward=False)  # a no-op on an empty x
        ctx.mark_dirty(x)  # tells autograd x was overwritten, so no one reads the old values
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        # subtle: the incoming gradient may be shared with other graph branches, so rotate a private copy.
        dx = dx.clone()
        _launch(dx, None, cos, sin, ctx.interleaved, backward=True)
        return dx, None, None, None


def rope_triton_(q, k, cos, sin, interleaved=False):
    """Rotate q (B, T, HQ, D) and k (B, T, HK, D) IN PLACE (any strides); differentiable. Returns (q, k).
    Same maths as apply_rope, computed in float32. Inference: one launch for both; with autograd, one
    launch each (see _RopeFunction)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        _check_shapes(q, k, cos, sin)
        if _overlap(q, k):
            raise ValueError(_OVERLAP_MSG)
        return _RopeFunction.apply(q, cos, sin, interleaved), _RopeFunction.apply(k, cos, sin, interleaved)
    _launch(q, k, cos, sin, interleaved, backward=False)  # inference: skip autograd's per-call overhead
    return q, k


# %% [markdown]
# ## Interop: where configuration files keep these numbers
#
# Not part of the lesson: quirks of particular config.json layouts, kept here so the formulas above read
# plainly. Phi-3 (LongRoPE) stretches max_position_embeddings and keeps the trained length at the top
# level of config.json as original_max_position_embeddings, not inside rope_scaling; transformers 5
# (`standardize_rope_params`) gives that top-level field priority for llama3, yarn and longrope, and
# LongRoPE derives its factor from max_position_embeddings / original only when rope_scaling has no
# explicit `factor` (an explicit one wins, `_compute_longrope_parameters`). The rope_type names are
# Hugging Face's except "ntk": static NTK-aware scaling has no HF rope_type (HF has only "dynamic");
# "ntk" is this collection's name for it.


def _original_max(s: dict, max_position_embeddings: int | None, rope_type: str, top_orig=None) -> int:
    """The trained context length: the config's top-level original_max_position_embeddings (where Phi-3
    keeps it), else rope_scaling's own key, else the config's max_position_embeddings."""
    orig = next((x for x in (top_orig, s.get("original_max_position_embeddings"), max_position_embeddings)
                 if x is not None), None)  # fmt: skip
    if orig is None:
        raise ValueError(
            f"rope_scaling of type {rope_type!r} needs 'original_max_position_embeddings' (or pass "
            "max_position_embeddings=, the config.json field it falls back to)"
        )
    return _length(f"{rope_type} original_max_position_embeddings", orig)


# %% [markdown]
# ## Checks
#
# Scaling types against the formulas of their papers (hand-computed values live in tests/test_rope.py),
# the two conventions against each other and against Meta's complex-number form, the relative-position
# property, the module's cache, and the kernel against the float64 reference, forward and backward.


def check_scaling(rope_type: str):
    D, base, orig, f = 128, 500000.0, 8192, 4.0
    ref, _ = rope_frequencies(D, base)
    wavelen, o = 2 * math.pi / ref, {"original_max_position_embeddings": orig}
    if rope_type == "linear":
        inv, _ = rope_frequencies(D, base, {"rope_type": "linear", "factor": f})
        return harness.rel_err(inv, ref / f)
    if rope_type == "ntk":  # NTK-aware: pair 0 untouched, the slowest pair slowed by exactly f
        inv, _ = rope_frequencies(D, base, {"rope_type": "ntk", "factor": f})
        return max(abs(inv[0] / ref[0] - 1), abs(inv[-1] * f / ref[-1] - 1)).item()
    if rope_type == "dynamic":  # original frequencies inside L_orig; NTK with s = f*L/L_orig - (f-1) past it
        dyn = {"rope_type": "dynamic", "factor": f, **o}
        inside, _ = rope_frequencies(D, base, dyn, seq_len=orig // 2)
        past, _ = rope_frequencies(D, base, dyn, seq_len=3 * orig)
        ntk, _ = rope_frequencies(D, base, {"rope_type": "ntk", "factor": 3 * f - (f - 1)})
        return max(harness.rel_err(inside, ref), harness.rel_err(past, ntk))
    if rope_type == "yarn":  # pairs turning > 32 times in L_orig kept, < 1 interpolated, af = 0.1 ln f + 1
        inv, af = rope_frequencies(D, base, {"rope_type": "yarn", "factor": f, **o})
        fast, slow = wavelen < orig / 32, wavelen > orig / 1
        mid_ok = ((inv <= ref * (1 + 1e-12)) & (inv >= ref / f * (1 - 1e-12))).all()
        if not (fast.any() and slow.any() and mid_ok and abs(af - (0.1 * math.log(f) + 1)) < 1e-12):
            raise AssertionError(f"YaRN bands or attention factor wrong (af={af})")
        return max(harness.rel_err(inv[fast], ref[fast]), harness.rel_err(inv[slow], ref[slow] / f))
    if rope_type == "llama3":  # wavelength < L/4 kept, > L/1 divided by f, monotone blend between
        inv, _ = rope_frequencies(D, base, {"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, **o})  # fmt: skip
        hi, lo = wavelen < orig / 4, wavelen > orig
        stretch = ref / inv  # 1 for fast pairs rising to f for slow ones
        if not (stretch[1:] >= stretch[:-1] - 1e-12).all():
            raise AssertionError("llama3 stretch is not monotone in wavelength")
        return max(harness.rel_err(inv[hi], ref[hi]), harness.rel_err(inv[lo], ref[lo] / f))
    if rope_type == "longrope":  # short factors inside L_orig, long past it, af = sqrt(1 + ln f / ln L_orig)
        short, long = torch.linspace(1, 2, D // 2).tolist(), torch.linspace(1, 8, D // 2).tolist()
        cfg = {"rope_type": "longrope", "short_factor": short, "long_factor": long, **o}
        a, af = rope_frequencies(D, base, cfg, seq_len=orig, max_position_embeddings=4 * orig)
        b, _ = rope_frequencies(D, base, cfg, seq_len=orig + 1, max_position_embeddings=4 * orig)
        if abs(af - math.sqrt(1 + math.log(4) / math.log(orig))) > 1e-12:
            raise AssertionError(f"longrope attention factor {af}")
        return max(harness.rel_err(a, ref / torch.tensor(short).double()),
                   harness.rel_err(b, ref / torch.tensor(long).double()))  # fmt: skip
    raise ValueError(rope_type)


def check_relative_position(device):
    """Rotate one q and one k to every position: the score matrix S[m, n] must be constant along each
    diagonal m - n = const (Toeplitz), for both conventions and a scaled table too. float64."""
    P, D = 256, 64
    worst = 0.0
    for scaling in (None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}):
        inv, af = rope_frequencies(D, 10000.0, scaling)
        cos, sin = cos_sin_table(inv, P, af, torch.float64, device)
        q = torch.randn(1, 1, 1, D, dtype=torch.float64, device=device).expand(1, P, 1, D)
        k = torch.randn(1, 1, 1, D, dtype=torch.float64, device=device).expand(1, P, 1, D)
        for interleaved in (False, True):
            rq, rk = apply_rope(q, k, cos, sin, interleaved)
            S = rq[0, :, 0] @ rk[0, :, 0].T  # (P, P): S[m, n] = q_m . k_n
            diag = [S.diagonal(off) for off in range(-P + 1, P)]
            dev = max((d - d[0]).abs().max().item() for d in diag) / S.abs().max().item()
            if torch.stack([d[0] for d in diag]).std() < 1e-3:  # and the score does depend on m - n
                raise AssertionError("scores do not vary with m - n: the rotation did nothing")
            worst = max(worst, dev)
    if worst > 1e-10:
        raise AssertionError(f"q_m . k_n changes along m - n = const by {worst:.2e}")
    return worst


def check_weight_permutation(device):
    """rope_half on x @ W[P]^T == rope_interleaved(x @ W^T)[P], and the attention scores agree."""
    B, T, C, HQ, HK, D = 2, 9, 48, 4, 2, 16
    inv, _ = rope_frequencies(D, 10000.0, partial_rotary_factor=0.75)  # R = 12 of D = 16 dims rotated
    cos, sin = cos_sin_table(inv, T, dtype=torch.float64, device=device)
    R = 2 * cos.shape[1]
    perm = torch.cat((torch.arange(0, R, 2), torch.arange(1, R, 2), torch.arange(R, D))).to(device)
    opts = dict(dtype=torch.float64, device=device)
    x, wq, wk = torch.randn(B, T, C, **opts), torch.randn(HQ * D, C, **opts), torch.randn(HK * D, C, **opts)

    def rows(w, H):  # the same permutation inside every head's block of D rows
        return w.view(H, D, C)[:, perm].reshape(H * D, C)

    qi, ki = apply_rope(
        (x @ wq.T).view(B, T, HQ, D), (x @ wk.T).view(B, T, HK, D), cos, sin, interleaved=True
    )
    qh, kh = apply_rope(
        (x @ rows(wq, HQ).T).view(B, T, HQ, D), (x @ rows(wk, HK).T).view(B, T, HK, D), cos, sin
    )
    err = max(harness.rel_err(qh, qi[..., perm]), harness.rel_err(kh, ki[..., perm]))
    scores_i = torch.einsum("bthd,bshd->bhts", qi[:, :, :HK], ki)  # first HK query heads vs the k heads
    scores_h = torch.einsum("bthd,bshd->bhts", qh[:, :, :HK], kh)
    return harness.assert_close(scores_h, scores_i, torch.float64, "scores", tol=1e-12) + err


def check_complex_form(device):
    """Interleaved RoPE == Meta llama's x * e^{i m theta} via torch.view_as_complex and torch.polar."""
    T, D = 33, 32
    inv, _ = rope_frequencies(D, 10000.0)
    cos, sin = cos_sin_table(inv, T, dtype=torch.float64, device=device)
    q = torch.randn(2, T, 3, D, dtype=torch.float64, device=device)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv).to(device)
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]  # (1, T, 1, D/2) unit complex
    meta = torch.view_as_real(torch.view_as_complex(q.reshape(2, T, 3, D // 2, 2)) * rot).flatten(-2)
    out, _ = apply_rope(q, q, cos, sin, interleaved=True)
    return harness.assert_close(out, meta, torch.float64, "complex form", tol=1e-12)


def check_module_cache(device):
    """Tables cached per device/dtype; dynamic NTK rebuilds when T grows past L_orig, and returns to the
    original frequencies inside it."""
    emb = RotaryEmbedding(
        64, scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}
    )
    c1, _ = emb(16, device)
    c2, _ = emb(8, device)
    if emb.rebuilds != 1 or c2.data_ptr() != c1.data_ptr():
        raise AssertionError("a shorter request inside the same regime should reuse the cached table")
    emb(16, device, torch.bfloat16)
    c3, _ = emb(48, device)
    inv, _ = rope_frequencies(64, 10000.0, emb.args["scaling"], seq_len=48)
    if emb.rebuilds != 3 or harness.rel_err(c3, cos_sin_table(inv, 48, device=device)[0]) > 1e-6:
        raise AssertionError(f"dtype change or growth past L_orig did not rebuild correctly ({emb.rebuilds})")
    c4, _ = emb(16, device)
    return f"{emb.rebuilds} rebuilds; back to original freqs: {harness.rel_err(c4, c1):.1e}"


def _kernel_inputs(B, T, HQ, HK, D, dtype, device, layout):
    """q, k as (B, T, H, D) views: contiguous, slices of a fused qkv buffer, or (B, H, T, D) transposed."""
    if layout == "fused":  # (B, T, HQ + 2*HK, D) projection output; q and k are strided slices of it
        buf = torch.randn(B, T, HQ + 2 * HK, D, dtype=dtype, device=device)
        return buf[:, :, :HQ], buf[:, :, HQ : HQ + HK], buf
    if layout == "bhtd":  # attention-kernel layout, viewed as (B, T, H, D)
        return *(torch.randn(B, H, T, D, dtype=dtype, device=device).transpose(1, 2) for H in (HQ, HK)), None
    return *(torch.randn(B, T, H, D, dtype=dtype, device=device) for H in (HQ, HK)), None


def check_kernel(
    B, T, HQ, HK, D, dtype, device, interleaved=False, rotary=1.0, layout="contiguous", scaling=None
):
    """Forward: in-place kernel vs the float64 reference; untouched channels and neighbours bit-identical.
    Backward: autograd through the kernel vs autograd through the float64 reference."""
    inv, af = rope_frequencies(D, 10000.0, scaling, rotary, max_position_embeddings=max(T // 2, 1))
    cos, sin = cos_sin_table(inv, T, af, torch.float32, device)
    q, k, buf = _kernel_inputs(B, T, HQ, HK, D, dtype, device, layout)
    v_before = buf[:, :, HQ + HK :].clone() if buf is not None else None
    ref_q, ref_k = apply_rope(q.double(), k.double(), cos.double(), sin.double(), interleaved)
    R = 2 * cos.shape[1]
    pass_q = q[..., R:].clone()
    rope_triton_(q, k, cos, sin, interleaved)
    tol = KERNEL_TOL[dtype]
    err = max(
        harness.assert_close(q, ref_q, dtype, "q", tol), harness.assert_close(k, ref_k, dtype, "k", tol)
    )
    if not torch.equal(q[..., R:], pass_q) or (
        buf is not None and not torch.equal(buf[:, :, HQ + HK :], v_before)
    ):
        raise AssertionError("the kernel wrote outside the rotated channels of q and k")
    # backward through the views a training step hands the kernel: q and k split from one non-leaf
    # tensor (leaf * 1 stands in for the projection's output), in this check's layout
    bhtd = layout == "bhtd"
    shape = (B, HQ + HK, T, D) if bhtd else (B, T, HQ + HK, D)
    leaf = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)

    def views(x):  # (B, T, HQ, D) and (B, T, HK, D) views of x
        x = x.transpose(1, 2) if bhtd else x
        return x[:, :, :HQ], x[:, :, HQ:]

    dq, dk = (torch.randn(B, T, H, D, dtype=dtype, device=device) for H in (HQ, HK))
    (grad,) = torch.autograd.grad(rope_triton_(*views(leaf * 1), cos, sin, interleaved), leaf, (dq, dk))
    ref_leaf = leaf.detach().double().requires_grad_()
    ref = apply_rope(*views(ref_leaf), cos.double(), sin.double(), interleaved)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, (dq.double(), dk.double()))
    return max(err, harness.assert_close(grad, ref_grad, dtype, "d(q, k)", tol=KERNEL_TOL[dtype]))


def run_checks(device, quick):
    checks = harness.Checks()
    for rope_type in ROPE_TYPES[1:]:
        checks(f"scaling {rope_type} matches its paper's formula", check_scaling, rope_type)
    checks("relative position: q_m . k_n depends only on m - n", check_relative_position, device)
    checks("rotate-half == interleaved under a row permutation of W_q, W_k", check_weight_permutation, device)
    checks("interleaved == Meta's complex multiplication", check_complex_form, device)
    checks("RotaryEmbedding cache and dynamic NTK rebuilds", check_module_cache, device)
    big = [] if quick else [(2, 1000, 32, 8, 128), (1, 4097, 28, 4, 128)]
    cases = [  # (B, T, HQ, HK, D), partial rotary, layout, scaling: odd T and head counts, GQA, views
        ((2, 13, 6, 2, 32), 1.0, "contiguous", None),
        ((1, 7, 5, 5, 20), 1.0, "fused", None),  # R/2 = 10: not a power of two
        ((2, 9, 3, 1, 32), 0.25, "bhtd", None),  # partial rotary (R = 8 of 32), multi-query (HK = 1)
        ((1, 11, 4, 2, 16), 1.0, "contiguous", {"rope_type": "yarn", "factor": 4.0}),  # attention factor != 1
        *[(s, 1.0, "fused", None) for s in big],
    ]
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for shape, rotary, layout, scaling in cases:
            for interleaved in (False, True):
                conv = "interleaved" if interleaved else "rotate-half"
                label = f"triton {name} {conv} {'x'.join(map(str, shape))}"
                label += f" R={rotary:g}D {layout}" + (" yarn" if scaling else "") + " fwd+bwd"
                checks(label, check_kernel, *shape, dtype, device, interleaved, rotary, layout, scaling)
    checks.finish()


# %% [markdown]
# ## Benchmark and picture
#
# Bytes the operation must move (e = bytes per element of q/k, c of the tables):
#   read + write q and k:  2 * (B*T*HQ*D + B*T*HK*D) * e,  plus read cos and sin once:  2 * T * (R/2) * c
# GB/s = bytes / median time, and % of the device-to-device copy measured in this run. Eager and
# torch.compile write new tensors; the kernel writes in place; all move the same bytes at minimum.
# Kernel, eager and torch.compile are timed the same way: harness.bench with graph=True, i.e. CUDA-graph
# replays with the L2 flushed before each, so a call's GPU time is measured without the Python and
# launch overhead that made the small 1 x 8192 shape swing between runs. The copy ceiling is timed
# eagerly with the same flush (a copy captured in a graph runs on the DMA engines: see harness).


def benchmark(cfg: BenchConfig, dtype, device, quick):
    copy_bw = harness.copy_bandwidth(device)
    print(f"copy ceiling: {copy_bw / 1e9:.0f} GB/s (device-to-device, read + write)")
    compiled = None
    if not (quick and device.type == "cpu"):  # compiling on a 2-core CPU takes longer than the run
        compiled = torch.compile(apply_rope, dynamic=False)
    else:
        print("torch.compile skipped: --quick on CPU (compiling takes longer than the whole run)")
    rows = []
    for B, T, HQ, HK, D in cfg.shapes:
        q = torch.randn(B, T, HQ, D, dtype=dtype, device=device)
        k = torch.randn(B, T, HK, D, dtype=dtype, device=device)
        inv, af = rope_frequencies(D, cfg.base)
        cos, sin = cos_sin_table(inv, T, af, dtype, device)  # tables in the activation dtype, as HF does
        nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * cos.element_size()
        for interleaved in (False, True):
            providers = {"eager": apply_rope, "triton": rope_triton_} | (
                {"compile": compiled} if compiled else {}
            )
            for name, fn in providers.items():
                with torch.no_grad():
                    call = lambda f=fn, a=(q, k, cos, sin, interleaved): f(*a)  # noqa: E731
                    try:
                        ms = harness.bench(call, device, graph=True)
                    except Exception as e:  # one failing row says why and does not kill the others
                        print(f"{name} {B}x{T}x{HQ}/{HK}x{D} {interleaved=}: {type(e).__name__}: {e}")
                        continue
                rows.append({"shape": f"{B}x{T}x{HQ}/{HK}x{D}", "convention": "interleaved" if interleaved
                             else "rotate-half", "provider": name, "ms": ms, "GBs": nbytes / ms / 1e6,
                             "%copy": 100 * nbytes / (ms * 1e-3) / copy_bw})  # fmt: skip
    for row in rows:  # speed-up over torch.compile (what a practitioner would reach for) per shape/convention
        base = [r for r in rows if r["provider"] == "compile" and r["shape"] == row["shape"]
                and r["convention"] == row["convention"]]  # fmt: skip
        if base:
            row["vs_compile"] = base[0]["ms"] / row["ms"]
    return rows, copy_bw


def plot_frequencies(out, head_dim=128, base=500000.0, orig=8192, factor=4.0):
    """Wavelength (tokens per turn) and stretch (theta / theta_scaled) per pair, each type at factor 4."""
    plt = harness.pyplot()
    if plt is None:
        return

    o = {"factor": factor, "original_max_position_embeddings": orig}
    i = torch.arange(head_dim // 2) / (head_dim // 2 - 1)
    long = (1 + (factor - 1) * i**2).tolist()  # illustrative: real ones come from LongRoPE's search
    types = {
        "default": (None, None),
        "linear": ({"rope_type": "linear", **o}, None),
        "ntk": ({"rope_type": "ntk", **o}, None),
        f"dynamic at T = {2 * orig}": ({"rope_type": "dynamic", **o}, 2 * orig),
        "yarn": ({"rope_type": "yarn", **o}, None),
        "llama3": ({"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, **o}, None),
        "longrope (illustrative long_factor)": (
            {"rope_type": "longrope", "short_factor": long, "long_factor": long, **o},
            2 * orig,
        ),  # fmt: skip
    }
    ref, _ = rope_frequencies(head_dim, base)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, (scaling, seq_len) in types.items():
        inv, _ = rope_frequencies(head_dim, base, scaling, seq_len=seq_len)
        ax1.plot(2 * math.pi / inv, label=name)
        ax2.plot(ref / inv, label=name)
    ax1.axhline(orig, color="gray", ls=":", label=f"trained context {orig}")
    ax1.set(yscale="log", xlabel="pair index i", ylabel="wavelength 2*pi/theta_i (tokens)",
            title=f"RoPE wavelengths, head_dim {head_dim}, base {base:g}")  # fmt: skip
    ax2.set(xlabel="pair index i", ylabel="stretch theta_i / theta_i(scaled)",
            title=f"which pairs slow down (factor {factor:g})")  # fmt: skip
    ax1.legend(fontsize=8), ax2.legend(fontsize=8)
    harness.save_figure(fig, Path(out) / "04_rope.png", dpi=110)


def profile(device, dtype, out):
    """A torch.profiler trace of the kernel on the first benchmark shape, for chrome://tracing."""
    B, T, HQ, HK, D = BenchConfig().shapes[0] if device.type == "cuda" else QUICK.shapes[0]
    q, k = (torch.randn(B, T, H, D, dtype=dtype, device=device) for H in (HQ, HK))
    cos, sin = cos_sin_table(rope_frequencies(D, 500000.0)[0], T, dtype=dtype, device=device)
    with torch.profiler.profile() as prof:
        for _ in range(5):
            rope_triton_(q, k, cos, sin)
    harness.save_trace(prof, "04_rope", out)


# %% [markdown]
# ## Main


def main():
    parser = harness.build_parser("RoPE: scaling variants, both conventions, a fused in-place Triton kernel")
    args, device, dtype = harness.start(parser)
    t0 = time.perf_counter()
    run_checks(device, args.quick)
    print(f"checks took {time.perf_counter() - t0:.1f} s")
    if args.profile:
        profile(device, dtype, args.out)
    if not args.no_bench:
        rows, copy_bw = benchmark(QUICK if args.quick else BenchConfig(), dtype, device, args.quick)
        harness.print_table(rows)
        formula = "2*(B*T*HQ*D + B*T*HK*D)*e + 2*T*(R/2)*c"
        harness.write_results("04_rope", rows, device, args.out, dtype=str(dtype), copy_GBs=copy_bw / 1e9,
                              quick=args.quick, bytes_formula=formula)  # fmt: skip
    plot_frequencies(args.out)


if __name__ == "__main__":
    main()
