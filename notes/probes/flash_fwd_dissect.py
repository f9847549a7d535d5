"""H200 probe (issue 19, session 4): which of 06's forward features costs the 3-11% that a stripped
forward (notes/probes/flash_fwd_tma.py) ran ahead of it, now that TMA row descriptors in 06 itself
bought nothing (notes/06_flash.md, session 4)? And does the dK/dV kernel's new unmasked middle range
pay, against the file as it was at d816d82?

Forward variants, each a dense contiguous (B, H, N, D) kernel that runs 06's own key loop (_fwd_inner,
imported, not copied; since session 5 through its pointer loads, USE_TMA=False) over whole blocks and then the
masked diagonal blocks, adding one of 06's features at a time: V0 nothing else; V1 + the log-sum-exp store; V2
+ 64-bit offsets and row masks on the Q load and O store; V3 + N not specialised (06 passes n_q, n_k as
do_not_specialize). "ahead": the whole-block loop computes the next block's scores before this block's softmax
(_inner_ahead; measured ~2% faster at D=128 full 4k, 11-20% slower elsewhere, and out of shared memory at 128
x 128 with 3 stages). "tmaQ" / "tmaQO": the Q tile loaded (and the O tile stored) through a tensor descriptor,
K and V still through pointers (no gain). "tmaKV": the whole-block loop's K and V through descriptors, both at
the loop's top, or V after the softmax ("late V"); "tmaQKVO": all four, i.e. the stripped TMA kernel with 06's
masked diagonal. Each at 06's two tiles, best kept, checked against cuDNN, timed beside 06, the stripped TMA
kernel and cuDNN. Backward: 06 now against an older 06_flash.py passed as argv[1] (session 4: d816d82's, via
`git show d816d82:06_flash.py > data/flash_d816d82.py`, carried to the device), forward and backward, same
run. GPU only."""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

fa = harness.load_build("06_flash")
_fwd_inner = fa._fwd_inner
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flash_fwd_tma  # noqa: E402


@triton.jit
def _inner_ahead(acc, l_i, m_i, q, k_base, v_base, stride_n, lo, hi, qk_scale, HEAD_DIM: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    """06's unmasked key loop with the scores one block ahead (FlashAttention-3's intra-warpgroup
    overlap): block j+1's Q K^T is issued before block j's softmax, which may then run while that
    matmul is in flight. Needs hi - lo >= BLOCK_N."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk = tl.dot(q, tl.trans(tl.load(k_base + (lo + offs_n)[:, None] * stride_n + offs_d[None, :])))
    for start_n in range(lo, hi, BLOCK_N):
        nxt = tl.minimum(start_n + BLOCK_N, hi - BLOCK_N)  # the last block recomputes itself, unused
        k = tl.load(k_base + (nxt + offs_n)[:, None] * stride_n + offs_d[None, :])
        qk_next = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + (start_n + offs_n)[:, None] * stride_n + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        qk = qk_next
    return acc, l_i, m_i


@triton.jit
def _inner_tma(acc, l_i, m_i, q, k_desc, v_desc, row0, lo, hi, qk_scale, BLOCK_N: tl.constexpr,
               LATE_V: tl.constexpr):  # fmt: skip
    """06's whole-block key loop with K and V tiles through tensor descriptors over the (B*H*N, D) view:
    both at the top of the loop (as the stripped TMA kernel does), or V after the softmax (LATE_V, as
    06's loop and the row-descriptor attempt did)."""
    for start_n in range(lo, hi, BLOCK_N):
        k = k_desc.load([row0 + start_n, 0])
        if not LATE_V:
            v = v_desc.load([row0 + start_n, 0])
        qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if LATE_V:
            v = v_desc.load([row0 + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _inner_ptr_top(acc, l_i, m_i, q, k_base, v_base, stride_n, lo, hi, qk_scale, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
    """06's whole-block key loop with both K and V loaded through pointers at the loop's top: the order
    that made the descriptors pay (_inner_tma), without the descriptors."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        k = tl.load(k_base + (start_n + offs_n)[:, None] * stride_n + offs_d[None, :])
        v = tl.load(v_base + (start_n + offs_n)[:, None] * stride_n + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _inner_tma_ws(acc, l_i, m_i, q, k_desc, v_desc, row0, lo, hi, qk_scale, BLOCK_N: tl.constexpr):
    """_inner_tma (K and V at the top) with Triton's automatic warp specialisation of the loop: a
    producer warp issues the TMA loads while the others compute."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
        k = k_desc.load([row0 + start_n, 0])
        v = v_desc.load([row0 + start_n, 0])
        qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


def _variant(Q, K, V, O, LSE, Q_DESC, O_DESC, K_DESC, V_DESC, N, stride_n, qk_scale, HEAD_DIM: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr,
             GUARD: tl.constexpr, LOOP: tl.constexpr, TMA_Q: tl.constexpr,
             TMA_O: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    bh = tl.program_id(1)
    if GUARD:
        bh = bh.to(tl.int64)
    base = bh * N * stride_n
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + base + offs_m[:, None] * stride_n + offs_d[None, :]
    if TMA_Q:  # (B * H * N, D) view: the tile lands in shared memory, where wgmma reads it
        q = Q_DESC.load([(tl.program_id(1) * N + start_m).to(tl.int32), 0])
    elif GUARD:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < N, other=0.0)
    else:
        q = tl.load(q_ptrs)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo_end = start_m if CAUSAL else N
    hi = start_m + BLOCK_M if CAUSAL else N
    if LOOP == 2 or LOOP == 3:
        row0 = (tl.program_id(1) * N).to(tl.int32)
        acc, l_i, m_i = _inner_tma(
            acc, l_i, m_i, q, K_DESC, V_DESC, row0, 0, lo_end, qk_scale, BLOCK_N, LOOP == 3
        )
    elif LOOP == 4:
        acc, l_i, m_i = _inner_ptr_top(acc, l_i, m_i, q, K + base, V + base, stride_n, 0, lo_end, qk_scale,
                                       HEAD_DIM, BLOCK_N)  # fmt: skip
    elif LOOP == 5:
        row0 = (tl.program_id(1) * N).to(tl.int32)
        acc, l_i, m_i = _inner_tma_ws(acc, l_i, m_i, q, K_DESC, V_DESC, row0, 0, lo_end, qk_scale, BLOCK_N)
    elif LOOP == 1:
        if lo_end > 0:
            acc, l_i, m_i = _inner_ahead(acc, l_i, m_i, q, K + base, V + base, stride_n, 0, lo_end,
                                         qk_scale, HEAD_DIM, BLOCK_N)  # fmt: skip
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + base, V + base, stride_n, stride_n, K_DESC, V_DESC,
                                   0, 0, offs_m, 0, lo_end, N, 0, qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL,
                                   False)  # fmt: skip
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + base, V + base, stride_n, stride_n, K_DESC, V_DESC, 0, 0,
                               offs_m, lo_end, hi, N, 0, qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL,
                               False)  # fmt: skip
    o = (acc / l_i[:, None]).to(O.dtype.element_ty)
    o_ptrs = O + base + offs_m[:, None] * stride_n + offs_d[None, :]
    if TMA_O:
        O_DESC.store([(tl.program_id(1) * N + start_m).to(tl.int32), 0], o)
    elif GUARD:
        tl.store(o_ptrs, o, mask=offs_m[:, None] < N)
    else:
        tl.store(o_ptrs, o)
    if STORE_LSE:
        tl.store(LSE + bh * N + offs_m, m_i + tl.math.log2(l_i))


KERNELS = {"spec": triton.jit(_variant), "nospec": triton.jit(do_not_specialize=["N"])(_variant)}
# name: (kernel, STORE_LSE, GUARD, LOOP, TMA_Q, TMA_O); LOOP: 0 06's _fwd_inner, 1 _inner_ahead,
# 2 _inner_tma (K and V at the top), 3 _inner_tma (V after the softmax), 4 _inner_ptr_top (pointers, K and
# V at the top), 5 _inner_tma_ws (2 with warp specialisation)
VARIANTS = {"V0": ("spec", False, False, 0, False, False),
            "V1": ("spec", True, False, 0, False, False),
            "V2": ("spec", True, True, 0, False, False),
            "V3": ("nospec", True, True, 0, False, False),
            "V0 ahead": ("spec", False, False, 1, False, False),
            "V0 tmaKV": ("spec", False, False, 2, False, False),
            "V0 tmaKV late V": ("spec", False, False, 3, False, False),
            "V0 ptrKV top": ("spec", False, False, 4, False, False),
            "V0 tmaKV ws": ("spec", False, False, 5, False, False),
            "V3 ptrKV top": ("nospec", True, True, 4, False, False),
            "V3 tmaKV": ("nospec", True, True, 2, False, False),
            "V0 tmaQKVO": ("spec", False, False, 2, True, True),
            "V0 tmaQ": ("spec", False, False, 0, True, False),
            "V0 tmaQO": ("spec", False, False, 0, True, True),
            "V3 tmaQ": ("nospec", True, True, 0, True, False)}  # fmt: skip
TILES = [(128, 64), (128, 128)]
SHAPES = [(128, 16, 4096, False), (128, 16, 4096, True), (128, 16, 16384, True), (64, 32, 4096, False)]
SHORT = [(128, 16, 512, True), (128, 16, 512, False), (128, 16, 1024, True)]  # session 5: --short


def run_variant(q, k, v, causal, name, tile, stages=3):
    kernel, store_lse, guard, loop, tma_q, tma_o = VARIANTS[name]
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B * H * N, device=q.device, dtype=torch.float32)
    descs = [TensorDescriptor.from_tensor(t.detach().view(-1, D), [rows, D])
             for t, rows in ((q, tile[0]), (o, tile[0]), (k, tile[1]), (v, tile[1]))]  # fmt: skip
    flags = dict(STORE_LSE=store_lse, GUARD=guard, LOOP=loop, TMA_Q=tma_q, TMA_O=tma_o)
    KERNELS[kernel][(N // tile[0], B * H)](q, k, v, o, lse, *descs, N, D, D**-0.5 * fa.LOG2E,
                                           HEAD_DIM=D, BLOCK_M=tile[0], BLOCK_N=tile[1], CAUSAL=causal,
                                           **flags, num_warps=8, num_stages=stages)  # fmt: skip
    return o


def load_old(path):
    spec = importlib.util.spec_from_file_location("flash_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shape_row(D, H, N, causal, old, variants) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = torch.device("cuda"), torch.bfloat16
    B = 16384 // N
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)

    def tf(fn):
        return flops / harness.bench(fn, dev) / 1e9

    def bwd(attn):
        o = attn(q, k, v, causal)
        return 2.5 * tf(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c)  # noqa: E731
        ref = cudnn(q, k, v, causal)
        res = {"cuDNN": tf(lambda: cudnn(q, k, v, causal)), "cuDNN bwd": bwd(cudnn)}
    res["06"] = tf(lambda: fa.flash_attention(q, k, v, causal))
    res["06 bwd"] = bwd(fa.flash_attention)
    if old is not None:
        tag = Path(old.__file__).stem  # session 4's logs: "06@d816d82" (from data/flash_d816d82.py)
        res[tag] = tf(lambda: old.flash_attention(q, k, v, causal))
        res[f"{tag} bwd"] = bwd(old.flash_attention)
    res["stripped TMA"] = max(
        tf(lambda t=t: flash_fwd_tma.fwd_tma(q, k, v, causal, (*t, 8, 3, False))) for t in TILES
    )
    for name in variants:
        best = 0.0
        for t in TILES:
            for stages in (3, 2):  # 2 where 3 stages do not fit in shared memory
                try:
                    err = harness.rel_err(run_variant(q, k, v, causal, name, t, stages), ref)
                except triton.runtime.errors.OutOfResources:
                    res[f"{name} {t} s{stages}"] = "out of shared memory"
                    continue
                except Exception as e:  # a variant Triton cannot compile here (warp specialisation)
                    res[f"{name} {t}"] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    break
                if err > 2e-2:
                    res[f"{name} {t}"] = f"WRONG {err:.1e}"
                    break
                ms = harness.bench(lambda t=t, n=name, st=stages: run_variant(q, k, v, causal, n, t, st), dev)
                best = max(best, flops / ms / 1e9)
                break
        res[name] = best
    line = " | ".join(f"{n} {x:.0f}" if isinstance(x, float) else f"{n} {x}" for n, x in res.items())
    return f"D{D} H{H} N{N} {'causal' if causal else 'full'} TFLOP/s: {line}"


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("old", nargs="?", help="an older 06_flash.py to time beside this one")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--short", action="store_true", help="the short shapes (SHORT) before SHAPES")
    args = ap.parse_args()
    old = load_old(args.old) if args.old else None
    for D, H, N, causal in (SHORT if args.short else []) + SHAPES:
        print(shape_row(D, H, N, causal, old, args.variants.split(",")), flush=True)


if __name__ == "__main__":
    main()
