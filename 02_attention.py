r"""Attention: multi-head attention from the definition up, with GQA/MQA, a KV cache and its variants.

Attention is the one operation that defines the transformer: every token builds a query, compares it
with every key, and takes the softmax-weighted mix of the values. This file writes it out as the
formula (the reference, float64-capable), then as the module every later build uses, with the
variants a reader meets in real models one flag away from the baseline: grouped-query and multi-query
attention, a KV cache for prefill-then-decode, Mistral's sliding window, ALiBi, and a hook where
rotary embeddings (04_rope.py) plug in. Every variant is proved equal to PyTorch's own kernels.

You will learn:
  - softmax(Q K^T / sqrt(D) + bias) V, where every variant (causal, window, ALiBi) is just the bias;
  - GQA/MQA: query heads grouped under shared K/V heads by a view, without copying K or V;
  - why a KV cache turns each decode step from O(T^2) into O(T), and what it costs in bytes per token;
  - the subtle mask of a chunk of queries that sits at the end of a longer key sequence;
  - what PyTorch's fused kernels (flash, memory-efficient, cuDNN) buy over the materialised T x T matrix.

Builds on: harness.py (device, checks, timing, results).

Does not handle:
  - dropout on the attention weights, padding masks for ragged batches, cross-attention;
  - a rolling-buffer cache for the sliding window (the cache here keeps every position), paged caches
    (later builds), or rotary embeddings themselves (04_rope.py plugs into `pos_transform`).

References: Vaswani et al., "Attention Is All You Need" (2017), eq. 1; Ainslie et al., "GQA" (2023);
Shazeer, "Fast Transformer Decoding" (MQA, 2019); Press et al., "ALiBi" (ICLR 2022); Jiang et al.,
"Mistral 7B" (2023); nanoGPT `model.py` (CausalSelfAttention) as the reference implementation.

Run:
  python 02_attention.py            # checks, then the benchmark (GPU), writes results/02_attention.json
  python 02_attention.py --quick    # tiny shapes, seconds on a CPU

Shapes: B batch, T sequence (Tq queries, Tk keys), C model width (d_model), H query heads,
Hkv key/value heads, G = H / Hkv queries per K/V head, D head dim, V vocabulary. Internally (B, H, T, D).
"""

import copy
import functools
import math
import numbers
import time
import warnings
from dataclasses import dataclass

import harness  # first: sets TRITON_INTERPRET=1 when there is no GPU, before Triton is imported

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# %% [markdown]
# ## Config


@dataclass
class BenchConfig:
    batch: int = 1  # one long sequence: the regime where the T x T matrix dominates memory
    n_head: int = 32  # Llama-2-7B's heads, as MHA so every SDPA backend can run the same shape
    head_dim: int = 128  # the head size of every 7-8B model in the KV-cache table
    seq_lens: tuple = (512, 1024, 2048, 4096, 8192, 16384)
    mem_cap_gb: float = 20.0  # skip a materialised path whose estimated T x T buffers exceed this
    d_model: int = 4096  # decode benchmark: one Llama-3-8B attention layer ...
    dec_n_head: int = 32  # ... 32 query heads ...
    dec_n_kv_head: int = 8  # ... sharing 8 K/V heads (GQA)
    decode_ctx: tuple = (512, 1024, 2048, 4096, 8192, 16384)


QUICK = BenchConfig(
    batch=4,
    n_head=4,
    head_dim=32,
    seq_lens=(64, 128, 256),
    mem_cap_gb=1.0,
    d_model=128,
    dec_n_head=4,
    dec_n_kv_head=2,
    decode_ctx=(32, 64, 128, 256),
)
CPU = BenchConfig(
    n_head=8,
    head_dim=64,
    seq_lens=(256, 512, 1024, 2048),
    mem_cap_gb=2.0,
    d_model=512,
    dec_n_head=8,
    dec_n_kv_head=2,
    decode_ctx=(256, 512, 1024, 2048),
)  # full mode without a GPU
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")

# %% [markdown]
# ## Reference: the formula, written out
#
# One rule every path below follows: a query row that sees no key (a window that ends before the
# keys start or after they end, or no keys at all) outputs 0, the empty weighted sum, with zero
# gradients, as FlashAttention does; softmax over a row of -inf alone would give NaN. A causal mask
# whose first query would sit before position 0 is rejected instead, as a likely mistake.


def _check_qkv(q, k, v, causal=False, window=None, alibi_slopes=None, q_start=None, sm_scale=None):
    """Raise ValueError unless q is (B, H, Tq, D) and k, v are (B, Hkv, Tk, D) with Hkv >= 1 dividing
    H and D >= 1, the window is a whole number of tokens >= 1, the scale is finite, there is one ALiBi
    slope per query head, and under the causal mask no query sits before position 0."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D (B, heads, T, D); got {q.ndim}-D, {k.ndim}-D, {v.ndim}-D")
    (B, H, Tq, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)} in B, D")
    if D < 1:
        raise ValueError(f"head dim D must be >= 1; got q {tuple(q.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(
            f"query heads ({H}) must be a multiple of key/value heads ({Hkv}), which must be >= 1"
        )
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1
    ):
        raise ValueError(f"window must be a whole number of tokens >= 1, or None; got {window!r}")
    if sm_scale is not None and not (isinstance(sm_scale, numbers.Real) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite number or None (1/sqrt(D)); got {sm_scale!r}")
    if alibi_slopes is not None and alibi_slopes.shape != (H,):
        raise ValueError(
            f"alibi_slopes must hold one slope per query head, shape ({H},); got {tuple(alibi_slopes.shape)}"
        )
    if q_start is not None and q_start < 0:
        raise ValueError(
            f"q_start is the absolute position of the first query and must be >= 0; got {q_start}"
        )
    first = Tk - Tq if q_start is None else q_start  # absolute position of the first query
    if causal and first < 0:
        raise ValueError(
            f"causal attention with the first query at position {first} < 0 (Tq={Tq}, Tk={Tk}) gives rows "
            "that see no key; pass q_start >= 0 (by default the queries are the last Tq positions)"
        )


def some_row_sees_no_key(Tq, Tk, causal=False, window=None, q_start=None) -> bool:
    """Whether any query row has no key to attend to, from the shapes alone (no GPU sync).

    Query p (absolute position) sees keys j in [0, Tk) with j <= p (causal) and |p - j| < window.
    Both ends of that range grow with p, so the rows that see nothing, if any, are at the two ends:
    checking the first and the last query is enough. E.g. Tq=3, Tk=5, window=2, q_start=10 -> True.
    """
    if Tq == 0:
        return False
    q_start = Tk - Tq if q_start is None else q_start
    for p in (q_start, q_start + Tq - 1):
        lo = 0 if window is None else max(0, p - window + 1)
        hi = min(Tk - 1, p if causal else Tk - 1, Tk - 1 if window is None else p + window - 1)
        if lo > hi:
            return True
    return False


def _blind_rows_to_zero(bias):
    """The collection's rule for a query row that sees no key: its output is 0, the empty weighted
    sum (as FlashAttention and PyTorch's SDPA give), never the NaN of softmax over all -inf. Returns
    the bias with such rows made finite (0), so the softmax and its gradient stay finite, and the
    mask `seen` (1, H or 1, Tq, 1) of rows that see a key, to zero the others after the softmax."""
    seen = bias.isfinite().any(-1, keepdim=True)
    return bias.masked_fill(~seen, 0.0), seen


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes m_h: the geometric series 2^(-8h/n), h = 1..n (Press et al., sec. 3).

    For 8 heads: 1/2, 1/4, ..., 1/256. When n is not a power of two the paper takes the slopes of the
    power of two below it and fills up with every other slope of the power of two above it.
    """

    def powers(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    n2 = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(powers(n2) + powers(2 * n2)[0::2][: n_head - n2], dtype=torch.float64)


def attention_bias(Tq, Tk, causal=False, window=None, slopes=None, q_start=None, device=None, dtype=None):
    """The additive bias every variant reduces to, (1, H or 1, Tq, Tk): 0 or -inf, plus ALiBi's line.

    Query i sits at absolute position q_start + i and key j at position j; q_start defaults to
    Tk - Tq, the last Tq tokens (a chunk or a decode step after a cache). dist = i_abs - j says how
    far back key j is. causal keeps dist >= 0, a window keeps |dist| < window, and ALiBi adds
    -m_h * |dist|, which under the causal mask is the paper's m_h * (j - i). None when nothing applies.
    """
    if not causal and window is None and slopes is None:
        return None
    q_start = Tk - Tq if q_start is None else q_start
    dtype = torch.get_default_dtype() if dtype is None else dtype
    q_pos = torch.arange(q_start, q_start + Tq, device=device, dtype=torch.int32)
    dist = q_pos[:, None] - torch.arange(Tk, device=device, dtype=torch.int32)[None, :]  # (Tq, Tk)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        allowed &= dist >= 0
    if window is not None:
        allowed &= dist.abs() < window
    bias = torch.zeros(Tq, Tk, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))[None, None]
    if slopes is not None:  # (H,) -> (1, H, 1, 1) times (Tq, Tk): one line of slope -m_h per head
        bias = bias - slopes.to(device, dtype)[None, :, None, None] * dist.abs().to(dtype)
    return bias


def attention_reference(
    q, k, v, causal=False, sm_scale=None, window=None, alibi_slopes=None, q_start=None
):  # fmt: skip
    """softmax(Q K^T * sm_scale + bias) V, the T x T matrix materialised, computed in q's dtype (pass
    float64 for a reference). q (B, H, Tq, D), k and v (B, Hkv, Tk, D); sm_scale defaults to
    1/sqrt(D). GQA by a view: query head h reads K/V head h // G, the same pairing as PyTorch's
    enable_gqa (and repeat_interleave), with no copy of K or V. A row that sees no key gives 0.
    """
    _check_qkv(q, k, v, causal, window, alibi_slopes, q_start, sm_scale)
    (B, H, Tq, D), Hkv, Tk = q.shape, k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale  # keeps q.k at unit variance (eq. 1)
    qg = q.view(B, Hkv, G, Tq, D)  # (B, Hkv, G, Tq, D): the G query heads that share one K/V head
    scores = (qg @ k.unsqueeze(2).transpose(-2, -1)) * scale  # (B, Hkv, G, Tq, Tk), broadcast over G
    bias = attention_bias(Tq, Tk, causal, window, alibi_slopes, q_start, q.device, q.dtype)
    seen = None
    if bias is not None and some_row_sees_no_key(Tq, Tk, causal, window, q_start):
        bias, seen = _blind_rows_to_zero(bias)
    if bias is not None:  # (1, H or 1, Tq, Tk) -> (1, Hkv or 1, G or 1, Tq, Tk): head h = (h // G, h % G)
        scores = scores + (bias.view(1, Hkv, G, Tq, Tk) if bias.shape[1] == H else bias.unsqueeze(2))
    weights = scores.softmax(dim=-1)  # each query's weights over the keys sum to 1
    out = (weights @ v.unsqueeze(2)).reshape(B, H, Tq, D)  # (B, Hkv, G, Tq, D) -> (B, H, Tq, D)
    return out if seen is None else out * seen  # rows that see no key: 0


# %% [markdown]
# ## Fast path: PyTorch's fused kernels, K/V shared without copies


def attention(q, k, v, causal=False, sm_scale=None, window=None, alibi_slopes=None, q_start=None):
    """The same maths as attention_reference through F.scaled_dot_product_attention.

    Plain causal attention and decode steps reach the fused kernels with no T x T tensor at all. A
    window, ALiBi or a chunk's offset mask is handed to SDPA as a dense (Tq, Tk) bias (per head for
    ALiBi), so those still hold O(Tq * Tk) memory; the fused kernel saves the softmax's intermediates
    and the time, not the bias. (torch's flex_attention computes such biases inside the kernel.)"""
    _check_qkv(q, k, v, causal, window, alibi_slopes, q_start, sm_scale)
    (H, Tq, Hkv, Tk) = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if Tk == 0:  # no keys at all: every row is 0, which the reference gives without a kernel
        return attention_reference(q, k, v, causal, sm_scale, window, alibi_slopes, q_start)
    q_start = Tk - Tq if q_start is None else q_start
    # subtle: SDPA's is_causal aligns the mask top-left (query i sees keys 0..i) which is only right
    # when queries and keys start together. A chunk at the end of a cache needs the explicit mask,
    # and one decode token at the last position sees every key, so it needs none.
    is_causal = causal and Tq == Tk and q_start == 0 and window is None and alibi_slopes is None
    plain_decode = causal and Tq == 1 and q_start == Tk - 1 and window is None and alibi_slopes is None
    mask = seen = None
    if not (is_causal or plain_decode):
        mask = attention_bias(Tq, Tk, causal, window, alibi_slopes, q_start, q.device, q.dtype)
        if mask is not None and some_row_sees_no_key(Tq, Tk, causal, window, q_start):
            mask, seen = _blind_rows_to_zero(mask)  # same rule as the reference, whatever the backend
    # Flash indexes K/V head h // G itself, nothing copied (PyTorch's math backend repeats internally).
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=sm_scale, enable_gqa=Hkv != H
    )
    return out if seen is None else out * seen


class KVCache:
    """One layer's keys and values, preallocated as (B, Hkv, max_T, D) each, filled as tokens arrive.

    update(k, v, start_pos) writes the new positions start_pos .. start_pos+T-1 and returns views of
    every position so far. Writing again at an earlier start_pos rolls the cache back (as a rejected
    speculative draft would). Inference only: update raises under autograd (use torch.no_grad()),
    since writing in place into the cache would break the backward of the steps before.
    """

    def __init__(self, batch, n_kv_head, max_T, head_dim, device=None, dtype=torch.float32):
        self.k = torch.zeros(batch, n_kv_head, max_T, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # positions 0 .. length-1 hold valid keys and values

    @property
    def max_T(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, k, v, start_pos: int):
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise RuntimeError(
                "KVCache is for inference: k/v require grad here; run the cached forward under "
                "torch.no_grad() (or torch.inference_mode()), or call the module without a cache to train"
            )
        T = k.shape[2]
        if k.shape[:2] + k.shape[3:] != self.k.shape[:2] + self.k.shape[3:] or k.shape != v.shape:
            raise ValueError(f"k/v {tuple(k.shape)} do not fit a cache of shape {tuple(self.k.shape)}")
        if (k.dtype, k.device) != (self.k.dtype, self.k.device):
            raise ValueError(
                f"k/v are {k.dtype} on {k.device} but the cache holds {self.k.dtype} on {self.k.device}; "
                "make it with MultiHeadAttention.new_cache or the module's dtype and device"
            )
        if not 0 <= start_pos <= self.length:
            raise ValueError(f"start_pos {start_pos} must be in [0, {self.length}] (no gaps in the cache)")
        if start_pos + T > self.max_T:
            raise ValueError(f"positions up to {start_pos + T} exceed the cache's max_T = {self.max_T}")
        self.k[:, :, start_pos : start_pos + T] = k
        self.v[:, :, start_pos : start_pos + T] = v
        self.length = start_pos + T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]  # (B, Hkv, length, D) views


class MultiHeadAttention(nn.Module):
    """Q, K, V = x @ W_qkv; attention per head; output projection. MHA, GQA or MQA by n_kv_head.

    bias: biases on the projections (GPT-2 has them, Llama not). causal: decoder attention.
    window: keys at most window-1 positions back (Mistral). alibi: add ALiBi's bias.
    pos_transform(q, k, positions) -> (q, k): applied to the new tokens' q and k at their absolute
    positions, before caching (RoPE in 04_rope.py). use_sdpa: None picks the fused kernel, False the
    materialised reference.
    """

    def __init__(
        self,
        d_model,
        n_head,
        n_kv_head=None,
        bias=False,
        *,
        causal=True,
        window=None,
        alibi=False,
        pos_transform=None,
        use_sdpa=None,
    ):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_head < 1 or d_model < n_head or d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_head ({n_head}) >= 1")
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(f"n_kv_head ({n_kv_head}) must divide n_head ({n_head}); 1 is MQA, None MHA")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive number of tokens or None, got {window}")
        if pos_transform is not None and not callable(pos_transform):
            raise TypeError("pos_transform must be a callable (q, k, positions) -> (q, k)")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.causal, self.window, self.pos_transform = causal, window, pos_transform
        self.use_sdpa = use_sdpa
        # One matmul yields all three: H query heads, then Hkv key heads and Hkv value heads.
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)
        self.register_buffer("alibi_slopes", alibi_slopes(n_head) if alibi else None, persistent=False)

    def new_cache(self, batch, max_T, device=None, dtype=None) -> KVCache:
        w = self.qkv.weight
        return KVCache(batch, self.n_kv_head, max_T, self.head_dim, device or w.device, dtype or w.dtype)

    def forward(self, x, cache: KVCache | None = None, start_pos: int | None = None):
        """x (B, T, C) at absolute positions start_pos .. start_pos + T - 1. With a cache, start_pos
        defaults to the cache's length (append); an earlier start_pos rolls the cache back. Without a
        cache, the T tokens attend only to each other; start_pos then only positions them for
        pos_transform (RoPE), as when a model runs on a window cut from a longer text."""
        if x.ndim != 3 or x.shape[-1] != self.proj.out_features:
            raise ValueError(f"x must be (B, T, {self.proj.out_features}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        start_pos = (cache.length if cache is not None else 0) if start_pos is None else start_pos
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.pos_transform is not None:  # absolute positions, so a decode step rotates correctly
            q, k = self.pos_transform(q, k, torch.arange(start_pos, start_pos + T, device=x.device))
        q_start = 0  # subtle: without a cache the keys are these same T tokens, so queries start with them
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (B, Hkv, start_pos + T, D): the whole context
            q_start = start_pos
        attend = attention if self.use_sdpa is not False else attention_reference
        y = attend(q, k, v, self.causal, window=self.window, alibi_slopes=self.alibi_slopes, q_start=q_start)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, H, T, D) -> (B, T, C)


# %% [markdown]
# ## Checks
# Each variant: the reference in float64 against PyTorch's SDPA handed repeated K/V and a mask built
# another way (tril/triu), then the fast path in fp32 and in the benchmark dtype against that float64.

CASES = {  # name: (H, Hkv, Tq, Tk, options); odd lengths throughout, D = 24
    "MHA": (4, 4, 37, 37, {}),
    "MHA causal": (4, 4, 37, 37, {"causal": True}),
    "GQA": (8, 2, 37, 37, {}),
    "GQA causal": (8, 2, 37, 37, {"causal": True}),
    "MQA": (6, 1, 37, 37, {}),
    "MQA causal": (6, 1, 37, 37, {"causal": True}),
    "GQA causal window=8": (8, 2, 37, 37, {"causal": True, "window": 8}),
    "GQA causal ALiBi": (8, 2, 37, 37, {"causal": True, "alibi": True}),
    "MHA ALiBi, 6 heads": (6, 6, 37, 37, {"alibi": True}),
    "GQA causal chunk 5 of 37": (8, 2, 5, 37, {"causal": True}),
    "MQA decode, window, ALiBi": (4, 1, 1, 37, {"causal": True, "window": 8, "alibi": True}),
}


def sdpa_outside(q, k, v, causal=False, window=None, alibi=False):
    """PyTorch's SDPA as the outside reference: K/V repeated per query head, the mask from tril/triu."""
    (H, Tq), (Hkv, Tk) = q.shape[1:3], k.shape[1:3]
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # fine in a check
    ones = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    off = Tk - Tq  # query i is token off + i, so "not in the future" is the diagonal shifted by off
    allowed = ones.tril(off) if causal else ones
    if window is not None:
        allowed = allowed & ones.triu(off - window + 1) & ones.tril(off + window - 1)
    bias = torch.zeros(Tq, Tk, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    if alibi:
        rel = (
            torch.arange(Tk, device=q.device)[None, :] - torch.arange(off, off + Tq, device=q.device)[:, None]
        )
        bias = bias - alibi_slopes(H).to(q)[:, None, None] * rel.abs()  # (H, Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def check_variant(name, device, dtype=torch.bfloat16):
    """fast (fp32 and `dtype`) vs reference (fp64), and reference (fp64) vs PyTorch SDPA (fp64)."""
    H, Hkv, Tq, Tk, opts = CASES[name]
    D = 24
    q = torch.randn(2, H, Tq, D, device=device, dtype=torch.float64)
    k, v = (torch.randn(2, Hkv, Tk, D, device=device, dtype=torch.float64) for _ in range(2))
    slopes = alibi_slopes(H).to(device) if opts.get("alibi") else None
    kw = {"causal": opts.get("causal", False), "window": opts.get("window"), "alibi_slopes": slopes}
    ref64 = attention_reference(q, k, v, **kw)
    e_out = harness.assert_close(
        ref64,
        sdpa_outside(q, k, v, kw["causal"], kw["window"], slopes is not None),
        torch.float64,
        "reference vs SDPA",
    )
    errs = []
    for dt in dict.fromkeys([torch.float32, dtype]):
        fast = attention(q.to(dt), k.to(dt), v.to(dt), **kw)
        errs.append(f"{str(dt)[6:]} {harness.assert_close(fast.float(), ref64, dt, f'fast {dt}'):.1e}")
    return f"fast vs ref64: {', '.join(errs)}; ref64 vs SDPA64 {e_out:.1e}"


def check_sdpa_backends(device):
    """Every SDPA backend this device runs agrees with the reference (bf16 on GPU, fp32 on CPU)."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(2, 4, 77, 64, device=device, dtype=dt) for _ in range(3))
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    ran, skipped = [], []
    for name in BACKENDS:
        try:
            with warnings.catch_warnings(), sdpa_kernel(getattr(SDPBackend, name)):
                warnings.simplefilter("ignore")  # "kernel not used because ..." notes
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        except (RuntimeError, TypeError):
            skipped.append(name)
            continue
        ran.append(f"{name} {harness.assert_close(out.float(), ref, dt, name):.1e}")
    return f"{', '.join(ran)}" + (f"; not on this device: {', '.join(skipped)}" if skipped else "")


def toy_rotary(q, k, positions):
    """A stand-in for RoPE (04_rope.py builds the real one): rotate pair (2i, 2i+1) by pos * 10000^(-2i/D)."""
    D = q.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, D, 2, device=q.device, dtype=torch.float64) / D)
    angle = positions.double()[:, None] * theta  # (T, D/2)
    cos, sin = angle.cos().to(q.dtype), angle.sin().to(q.dtype)

    def rotate(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    return rotate(q), rotate(k)


@torch.no_grad()
def check_prefill_decode(device, n_kv_head=2, rotary=False, **variant):
    """A 2-layer toy LM: prefill 11 tokens, a chunk of 3, then 7 single-token steps through one KVCache
    per layer, equals one full causal forward over the 21 tokens (hidden states and logits, fp32)."""
    V, C, H, B, T = 50, 48, 4, 2, 21
    emb, head = nn.Embedding(V, C).to(device), nn.Linear(C, V).to(device)
    hook = toy_rotary if rotary else None
    layers = [MultiHeadAttention(C, H, n_kv_head, pos_transform=hook, **variant).to(device) for _ in range(2)]

    def run(tokens, caches=None, start_pos=0):
        x = emb(tokens)
        for i, layer in enumerate(layers):
            x = x + layer(x, cache=None if caches is None else caches[i], start_pos=start_pos)
        return torch.cat([x, head(x)], dim=-1)  # (B, T, C + V): hidden states and logits together

    tokens = torch.randint(V, (B, T), device=device)
    full = run(tokens)
    caches = [layer.new_cache(B, T) for layer in layers]
    splits = [(0, 11), (11, 14)] + [(t, t + 1) for t in range(14, T)]
    steps = torch.cat([run(tokens[:, a:b], caches, a) for a, b in splits], dim=1)
    return max(
        harness.assert_close(steps[..., :C], full[..., :C], torch.float32, "hidden"),
        harness.assert_close(steps[..., C:], full[..., C:], torch.float32, "logits"),
    )


def check_module_grads(device, n_kv_head=2, **variant):
    """Module (fast path, fp32) vs a float64 copy on the materialised path: output, dx and every dW."""
    layer = MultiHeadAttention(48, 4, n_kv_head, bias=True, **variant).to(device)
    ref = copy.deepcopy(layer).double()
    ref.use_sdpa = False
    x = torch.randn(2, 19, 48, device=device, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out, out64 = layer(x), ref(x64)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out64 * g.double()).sum().backward()
    errs = [
        harness.assert_close(out, out64, torch.float32, "output"),
        harness.assert_close(x.grad, x64.grad, torch.float32, "dx"),
    ]
    for (name, p), p64 in zip(layer.named_parameters(), ref.parameters(), strict=True):
        errs.append(harness.assert_close(p.grad, p64.grad, torch.float32, f"d{name}"))
    return max(errs)


def check_rows_without_keys(device, dtype):
    """A window that ends past the last key leaves the last query rows with nothing to see: both paths
    give 0 there (the collection's rule), agree elsewhere, and keep every gradient finite."""
    q = torch.randn(2, 4, 7, 16, device=device, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(2, 2, 5, 16, device=device, dtype=torch.float64, requires_grad=True) for _ in range(2)
    )
    kw = {"window": 3, "q_start": 4, "alibi_slopes": alibi_slopes(4).to(device)}  # rows at 8, 9, 10 blind
    if not some_row_sees_no_key(7, 5, False, 3, 4):
        raise AssertionError("some_row_sees_no_key missed the blind rows")
    ref = attention_reference(q, k, v, **kw)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    errs = []
    for dt in dict.fromkeys([torch.float32, dtype]):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        fast = attention(*leaves, **kw)
        if not (fast[:, :, 4:] == 0).all():
            raise AssertionError(f"{dt}: rows that see no key are not 0")
        grads = torch.autograd.grad(fast, leaves, dout.to(dt))
        errs.append(harness.assert_close(fast.float(), ref, dt, f"{dt} output"))
        for name, g, r in zip("qkv", grads, ref_grads, strict=True):
            errs.append(harness.assert_close(g.float(), r, dt, f"{dt} d{name}"))
    if not (ref[:, :, 4:] == 0).all():
        raise AssertionError("reference: rows that see no key are not 0")
    return max(errs)


def check_errors():
    """Inputs a user can get wrong raise ValueError or TypeError with a message."""
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8)
    cache = KVCache(1, 2, 8, 8)
    layer = MultiHeadAttention(16, 4, 2)
    bad = [
        lambda: attention(q, k[:, :2], k[:, :2], window=0),
        lambda: attention_reference(q, k[:, :0], k[:, :0]),  # no key/value heads
        lambda: attention(q[..., :0], k[:, :2, :, :0], k[:, :2, :, :0]),  # head dim 0
        lambda: MultiHeadAttention(0, 4),  # head dim 0
        lambda: layer(torch.randn(1, 2, 16), cache=layer.new_cache(1, 4)),  # a cache under autograd
        lambda: MultiHeadAttention(48, 5),  # 48 not a multiple of 5 heads
        lambda: MultiHeadAttention(48, 4, 3),  # 3 K/V heads cannot share 4 query heads
        lambda: MultiHeadAttention(48, 4, window=0),
        lambda: MultiHeadAttention(48, 4, pos_transform="rope"),
        lambda: MultiHeadAttention(48, 4)(torch.randn(2, 5, 32)),
        lambda: attention_reference(q, k, k),
        lambda: attention(q[0], q[0], q[0]),
        lambda: cache.update(torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), 0),  # past max_T
        lambda: cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), 3),  # a gap
    ]
    for i, fn in enumerate(bad):
        try:
            fn()
        except (ValueError, TypeError, RuntimeError):
            continue
        raise AssertionError(f"bad input #{i} was accepted")
    return f"{len(bad)} bad inputs rejected"


DECODE_CASES = {  # 4 query heads throughout
    "MHA": {"n_kv_head": 4},
    "GQA": {"n_kv_head": 2},
    "MQA": {"n_kv_head": 1},
    "GQA window=4 + rotary hook": {"n_kv_head": 2, "window": 4, "rotary": True},
    "GQA ALiBi": {"n_kv_head": 2, "alibi": True},
}
GRAD_CASES = {
    "GQA causal": {"n_kv_head": 2},
    "MQA window ALiBi": {"n_kv_head": 1, "window": 6, "alibi": True},
    "MHA non-causal": {"n_kv_head": 4, "causal": False},
}


def run_checks(device, dtype):
    checks = harness.Checks()
    for name in CASES:
        checks(f"attention {name}", check_variant, name, device, dtype)
    checks("SDPA backends vs reference (causal, T=77)", check_sdpa_backends, device)
    for name, kw in DECODE_CASES.items():
        checks(f"prefill + chunk + decode == full forward, {name}", check_prefill_decode, device, **kw)
    for name, kw in GRAD_CASES.items():
        checks(f"module grads vs fp64 reference, {name}", check_module_grads, device, **kw)
    checks("rows that see no key give 0 on both paths, grads finite", check_rows_without_keys, device, dtype)
    checks("bad arguments raise", check_errors)
    checks.finish()


# %% [markdown]
# ## Benchmark
# Attention FLOPs: Q K^T and P V are 2*T*T*D each per head, so 4*B*H*T^2*D, halved under the causal
# mask (fused kernels skip masked blocks; the materialised path computes them and throws them away).
# Timing follows the collection's policy (harness.py): L2 flushed before every repetition; the
# attention rows and the matmul ceiling eagerly (graph=False), the decode steps by CUDA-graph replay
# (graph=True); the copy ceiling eagerly, as harness.copy_bandwidth explains (a captured copy runs on
# the DMA engines, 35% slower than the copy kernel).

# Published shapes from each model's config.json on the Hugging Face Hub (num_hidden_layers,
# num_attention_heads, num_key_value_heads, head_dim = hidden_size / num_attention_heads):
#   meta-llama/Llama-2-7b-hf      32 layers, 32 heads, 32 KV heads (MHA), hidden 4096 -> head_dim 128
#   meta-llama/Meta-Llama-3-8B    32 layers, 32 heads,  8 KV heads (GQA), hidden 4096 -> head_dim 128
#   mistralai/Mistral-7B-v0.1     32 layers, 32 heads,  8 KV heads (GQA), hidden 4096 -> head_dim 128
#   HuggingFaceTB/SmolLM2-135M    30 layers,  9 heads,  3 KV heads (GQA), hidden  576 -> head_dim 64
KV_MODELS = {  # name: (n_layer, n_head, n_kv_head, head_dim)
    "Llama-2-7B": (32, 32, 32, 128),
    "Llama-3-8B": (32, 32, 8, 128),
    "Mistral-7B": (32, 32, 8, 128),
    "SmolLM2-135M": (30, 9, 3, 64),
    "(Llama-3-8B shape as MQA)": (32, 32, 1, 128),
}


def kv_bytes_per_token(n_layer, n_kv_head, head_dim, itemsize=2) -> int:
    """K and V, each n_kv_head * head_dim numbers, in every layer: 2 * L * Hkv * D * bytes (bf16: 2)."""
    return 2 * n_layer * n_kv_head * head_dim * itemsize


def kv_table():
    rows = []
    for name, (L, H, Hkv, D) in KV_MODELS.items():
        per_tok = kv_bytes_per_token(L, Hkv, D)
        kind = "MHA" if Hkv == H else ("MQA" if Hkv == 1 else "GQA")
        rows.append(
            {
                "model": name,
                "layers": L,
                "heads": H,
                "kv_heads": Hkv,
                "head_dim": D,
                "kind": kind,
                "KiB/token": per_tok / 2**10,
                "GiB @ 4096 tok": per_tok * 4096 / 2**30,
                "vs MHA": f"1/{H // Hkv}",
            }
        )
    return rows


def peak_mib(fn, device):
    """Peak CUDA memory fn allocates above what was live before it (inputs excluded), in MiB."""
    if device.type != "cuda":
        return "-"  # torch tracks no CPU peak; the T x T column shows the same growth by formula
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def _sdpa_pinned(backend, q, k, v):
    with warnings.catch_warnings(), sdpa_kernel(backend):
        warnings.simplefilter("ignore")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@torch.no_grad()
def bench_attention(cfg, device, dtype, peak_flops):
    """Causal MHA: the materialised reference vs SDPA pinned to each backend, time and memory vs T."""
    B, H, D, rows = cfg.batch, cfg.n_head, cfg.head_dim, []
    size = torch.finfo(dtype).bits // 8

    def est_gb(T, itemsize):  # scores, scaled, biased and softmaxed: up to ~4 live (B, H, T, T) buffers
        return 4 * B * H * T * T * itemsize / 1e9

    methods = {"materialised": (lambda q, k, v: attention_reference(q, k, v, causal=True), size)}
    methods["sdpa auto"] = (lambda q, k, v: attention(q, k, v, causal=True), None)
    for name in BACKENDS:  # MATH upcasts half types to fp32 on CUDA
        methods[name] = (
            functools.partial(_sdpa_pinned, getattr(SDPBackend, name)),
            4 if name == "MATH" else None,
        )
    caps = {
        m: max((T for T in cfg.seq_lens if est_gb(T, s) <= cfg.mem_cap_gb), default=0)
        for m, (_, s) in methods.items()
        if s is not None
    }
    print(
        f"T x T paths capped at ~{cfg.mem_cap_gb:g} GB of estimated 4*B*H*T^2*bytes: "
        + ", ".join(f"{m} up to T={t}" for m, t in caps.items())
    )
    unavailable = set()
    for T in cfg.seq_lens:
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(3))
        flops = 4 * B * H * T * T * D / 2  # causal: half the (query, key) pairs are computed
        for m, (fn, _) in methods.items():
            if m in unavailable:
                continue
            if T > caps.get(m, T):  # a row that says so, rather than a gap in the table
                rows.append({"T": T, "method": m, "ms": f"skipped: ~{est_gb(T, methods[m][1]):.0f} GB > cap"})
                continue
            try:
                fn(q, k, v)  # a pinned backend that cannot run this shape raises here
            except (RuntimeError, TypeError) as e:  # OutOfMemoryError is a RuntimeError too
                print(f"  {m}: cannot run here from T={T} on ({type(e).__name__}: {str(e)[:60]}...)")
                unavailable.add(m)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            call = functools.partial(fn, q, k, v)
            try:
                ms = harness.bench(call, device, graph=False)  # as the matmul ceiling is timed
            except (RuntimeError, TypeError) as e:  # one failing row must not hide the others
                print(f"  {m} T={T}: timing failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            rows.append(
                {
                    "T": T,
                    "method": m,
                    "ms": ms,
                    "TFLOP/s": flops / ms / 1e9,
                    "% matmul": 100 * flops / (ms * 1e-3) / peak_flops,
                    "T x T MiB": B * H * T * T * size / 2**20,
                    "peak MiB": peak_mib(call, device),
                }
            )
        del q, k, v
    return rows


@torch.no_grad()
def bench_decode(cfg, device, dtype, copy_bw):
    """One GQA layer: a decode step reading the KV cache vs recomputing the whole prefix, as T grows.

    With the cache a step projects one token and attends 1 x T: O(T). Without it, every step
    re-projects all T tokens and attends T x T: O(T^2), so generating T tokens costs O(T^3).
    """
    layer = MultiHeadAttention(cfg.d_model, cfg.dec_n_head, cfg.dec_n_kv_head).to(device, dtype).eval()
    weight_bytes = sum(p.nbytes for p in layer.parameters())
    rows = []
    for T in cfg.decode_ctx:
        x = torch.randn(1, T + 1, cfg.d_model, device=device, dtype=dtype)
        cache = layer.new_cache(1, T + 1)
        layer(x[:, :T], cache=cache, start_pos=0)  # prefill the first T tokens
        # Rewriting position T each call keeps the cache at T + 1 tokens: every timed step is the same.
        step = lambda x=x, c=cache, T=T: layer(x[:, T:], cache=c, start_pos=T)  # noqa: E731
        # A one-token step is a handful of tiny kernels: timed eagerly it measures Python and launch
        # overhead (flat in T); replayed as a CUDA graph it measures the GPU work, which grows with T.
        ms_eager = harness.bench(step, device)
        ms_cache = harness.bench(step, device, graph=True)
        ms_full = harness.bench(lambda x=x: layer(x)[:, -1:], device, graph=True)
        # A cached step reads every weight once plus K and V of all T + 1 positions.
        step_bytes = weight_bytes + cache.k[:, :, : T + 1].nbytes * 2
        rows.append(
            {
                "context": T,
                "eager step ms": ms_eager,
                "cached step ms": ms_cache,
                "recompute ms": ms_full,
                "speed-up": ms_full / ms_cache,
                "cached GB/s": step_bytes / (ms_cache * 1e-3) / 1e9,
                "% copy bw": 100 * step_bytes / (ms_cache * 1e-3) / copy_bw,
            }
        )
    return rows


def profile(device, dtype, out):
    """A torch.profiler trace of one SDPA and one materialised forward, for chrome://tracing."""
    q, k, v = (torch.randn(1, 8, 512, 64, device=device, dtype=dtype) for _ in range(3))
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    with torch.no_grad(), torch.profiler.profile(activities=acts) as prof:
        attention(q, k, v, causal=True)
        attention_reference(q, k, v, causal=True)
    harness.save_trace(prof, "02_attention", out)


# %% [markdown]
# ## Main


def main():
    parser = harness.build_parser("Multi-head attention, GQA/MQA, KV cache: checks and benchmark")
    args, device, dtype = harness.start(parser)
    fast = "F.scaled_dot_product_attention (enable_gqa for grouped heads)"
    print(f"fast path: {fast}")
    t0 = time.perf_counter()
    run_checks(device, dtype)
    print(f"checks took {time.perf_counter() - t0:.1f} s")
    if args.profile:
        profile(device, dtype, args.out)
    if args.no_bench:
        return
    cfg = QUICK if args.quick else (BenchConfig() if device.type == "cuda" else CPU)
    # Each ceiling is timed as the rows compared with it: the attention table eagerly (its calls take
    # milliseconds, so launch overhead is noise); the copy ceiling always eagerly (see harness).
    peak_flops = harness.matmul_flops(device, dtype, graph=False)
    copy_bw = harness.copy_bandwidth(device)
    print(f"ceilings: matmul {peak_flops / 1e12:.2f} TFLOP/s, copy {copy_bw / 1e9:.1f} GB/s")
    rows = bench_attention(cfg, device, dtype, peak_flops)
    harness.print_table(rows)
    decode = bench_decode(cfg, device, dtype, copy_bw)
    harness.print_table(decode)
    kv = kv_table()
    harness.print_table(kv)
    facts = {"dtype": str(dtype), "quick": args.quick, "config": vars(cfg), "fast_path": fast}
    ceilings = {"matmul_TFLOPs": peak_flops / 1e12, "copy_GBs": copy_bw / 1e9}
    harness.write_results(
        "02_attention", rows, device, args.out, **facts, **ceilings, decode=decode, kv_cache_bf16=kv
    )


if __name__ == "__main__":
    main()
