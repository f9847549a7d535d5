"""H200 probe (issue 19, session 3): what do tensor descriptors (TMA) and warp specialisation buy
06's forward on Hopper with Triton 3.6?

A stripped forward (dense, contiguous (B, H, N, D), N a multiple of the tiles, causal or not) whose
Q/K/V/O tiles move through host-made TensorDescriptors (TMA) instead of pointer loads, with the key
loop optionally warp-specialised (tl.range(..., warp_specialize=True)). Each variant is checked
against SDPA, then timed (harness.bench) beside 06's autotuned forward and cuDNN. A variant the
compiler refuses prints its error. Interpreter (CPU): checks one tiny shape, no timings."""

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


@triton.jit
def _step(acc, l_i, m_i, q, k, v, qk_scale, offs_m, start_n, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    qk = tl.dot(q, tl.trans(k))
    if MASK:
        cols = start_n + tl.arange(0, BLOCK_N)
        qk = tl.where(cols[None, :] <= offs_m[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _fwd_tma(desc_q, desc_k, desc_v, desc_o, N, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WS: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    row0 = tl.program_id(1) * N  # (batch, head) rows in the (B * H * N, D) view
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = desc_q.load([row0 + start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = start_m if CAUSAL else N  # key blocks wholly visible to every row of this block
    for start_n in tl.range(0, full_end, BLOCK_N, warp_specialize=WS):
        k = desc_k.load([row0 + start_n, 0])
        v = desc_v.load([row0 + start_n, 0])
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, qk_scale, offs_m, start_n, BLOCK_N, False)
    if CAUSAL:
        for start_n in range(start_m, start_m + BLOCK_M, BLOCK_N):
            k = desc_k.load([row0 + start_n, 0])
            v = desc_v.load([row0 + start_n, 0])
            acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, qk_scale, offs_m, start_n, BLOCK_N, True)
    desc_o.store([row0 + start_m, 0], (acc / l_i[:, None]).to(desc_o.dtype))


def fwd_tma(q, k, v, causal, cfg):
    bm, bn, warps, stages, ws = cfg
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    flat = [t.view(B * H * N, D) for t in (q, k, v, o)]
    descs = [TensorDescriptor.from_tensor(t, [bm if i in (0, 3) else bn, D]) for i, t in enumerate(flat)]
    _fwd_tma[(N // bm, B * H)](*descs, N, D**-0.5 * fa.LOG2E, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
                               CAUSAL=causal, WS=ws, num_warps=warps, num_stages=stages)  # fmt: skip
    return o


# (BLOCK_M, BLOCK_N, warps, stages, warp-specialised key loop)
CONFIGS = [(128, 64, 8, 3, False), (128, 128, 8, 3, False), (128, 64, 8, 4, False), (128, 128, 8, 2, False),
           (128, 64, 8, 3, True), (128, 128, 8, 3, True), (128, 64, 4, 3, True),
           (128, 128, 8, 2, True)]  # fmt: skip
SHAPES = [(128, 16, 4096, False), (128, 16, 4096, True), (128, 16, 16384, True), (64, 32, 4096, False)]


def shape_row(D, H, N, causal, dev, dt) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = 16384 // N
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt) for _ in range(3))
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        cudnn = (
            flops
            / harness.bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), dev)
            / 1e9
        )
    ours = flops / harness.bench(lambda: fa.flash_attention(q, k, v, causal), dev) / 1e9
    line = [f"cuDNN {cudnn:.0f}", f"06 {ours:.0f} ({ours / cudnn:.2f})"]
    for cfg in CONFIGS:
        try:
            err = harness.rel_err(fwd_tma(q, k, v, causal, cfg), ref)
            if err > 2e-2:
                line.append(f"{cfg}: WRONG (rel err {err:.1e})")
                continue
            tf = flops / harness.bench(lambda c=cfg: fwd_tma(q, k, v, causal, c), dev) / 1e9
            line.append(f"{cfg}: {tf:.0f} ({tf / cudnn:.2f})")
        except Exception as e:  # a variant this Triton or GPU refuses: say which and why
            line.append(f"{cfg}: {type(e).__name__} {str(e).splitlines()[0][:80] if str(e) else ''}")
    return f"D{D} H{H} N{N} {'causal' if causal else 'full'} TFLOP/s: " + " | ".join(line)


def main():
    if harness.INTERPRET:  # no timings in the interpreter: prove the kernel on one tiny shape
        q, k, v = (torch.randn(1, 2, 64, 32, dtype=torch.float16) for _ in range(3))
        for causal in (False, True):
            out = fwd_tma(q, k, v, causal, (32, 16, 4, 1, False))
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
            print(f"interpreter, causal={causal}: rel err {harness.rel_err(out, ref):.1e}")
        return
    for D, H, N, causal in SHAPES:
        print(shape_row(D, H, N, causal, torch.device("cuda"), torch.bfloat16), flush=True)


if __name__ == "__main__":
    main()
