"""H200 probe (issue 19, session 5; the next lever of notes/06_flash.md): do the backward kernels gain
from TMA the way the forward did (1.03-1.15x at D=128), once the descriptor tiles are issued together
at the top of the loop? Commit ce166b9 put the backward's tiles through descriptors and measured
0.89-1.02x, but its dK/dV loop loaded dO after computing P^T, the order that bought nothing in the
forward.

Two stripped kernels for a dense contiguous MHA batch (N a multiple of the tiles), each running 06's
own loops (imported, not copied) for the masked blocks and, for the whole blocks, either 06's pointer
loop ("pointers") or a loop whose two streamed tiles come through row descriptors, both at its top
("tma"): dK/dV (Q and dO streamed; lse and delta through pointers) and dQ (K and V streamed). Each
variant's dq, dk, dv are checked against 06's backward, then each kernel launch is timed alone by
CUDA-graph replay with the L2 flushed (harness.bench), at each of 06's tiles.

Session 5's answer (notes/06_flash.md): dQ 1.07-1.10x with descriptors; dK/dV 0.92-1.07x.

GPU: python notes/probes/flash_bwd_tma.py. CPU (interpreter, checks only, small shapes): the same
with TRITON_INTERPRET=1."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

fa = harness.load_build("06_flash")
_dkdv_inner = fa._dkdv_inner
_dq_inner = fa._dq_inner


@triton.jit
def _dkdv_tma_inner(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, row0, lo, hi, qk_scale,
                    BLOCK_M: tl.constexpr):  # fmt: skip
    for start_m in range(lo, hi, BLOCK_M):
        q = q_desc.load([row0 + start_m, 0])
        do = do_desc.load([row0 + start_m, 0])
        offs_m = start_m + tl.arange(0, BLOCK_M)
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_probe(Q, K, V, DO, LSE, DELTA, DK, DV, Q_DESC, DO_DESC, N, qk_scale, sm_scale,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tile = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + base + tile)
    v = tl.load(V + base + tile)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if CAUSAL:  # 06's ranges with diag = 0: [lo, mid) crosses the diagonal, [mid, N) is whole blocks
        lo = start_n // BLOCK_M * BLOCK_M
        mid = tl.minimum((start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M, N)
    else:
        lo = 0
        mid = 0
    lse_base = LSE + bh * N
    delta_base = DELTA + bh * N
    dk, dv = _dkdv_inner(dk, dv, k, v, Q + base, DO + base, lse_base, delta_base, Q, HEAD_DIM, HEAD_DIM,
                         HEAD_DIM, offs_n, lo, mid, N, 0, qk_scale, sm_scale, HEAD_DIM, BLOCK_M, True, CAUSAL,
                         False)  # fmt: skip
    if TMA:
        row0 = (tl.program_id(1) * N).to(tl.int32)
        dk, dv = _dkdv_tma_inner(dk, dv, k, v, Q_DESC, DO_DESC, lse_base, delta_base, row0, mid, N, qk_scale,
                                 BLOCK_M)  # fmt: skip
    else:
        dk, dv = _dkdv_inner(dk, dv, k, v, Q + base, DO + base, lse_base, delta_base, Q, HEAD_DIM, HEAD_DIM,
                             HEAD_DIM, offs_n, mid, N, N, 0, qk_scale, sm_scale, HEAD_DIM, BLOCK_M, False,
                             CAUSAL, False)  # fmt: skip
    tl.store(DK + base + tile, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + base + tile, dv.to(DV.dtype.element_ty))


@triton.jit
def _dq_tma_inner(dq, q, do, lse, delta, k_desc, v_desc, row0, lo, hi, qk_scale, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k = k_desc.load([row0 + start_n, 0])
        v = v_desc.load([row0 + start_n, 0])
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dq_probe(Q, K, V, DO, LSE, DELTA, DQ, K_DESC, V_DESC, N, qk_scale, sm_scale, HEAD_DIM: tl.constexpr,
              CAUSAL: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tile = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + base + tile)
    do = tl.load(DO + base + tile)
    lse = tl.load(LSE + bh * N + offs_m)
    delta = tl.load(DELTA + bh * N + offs_m)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:  # 06's ranges with diag = 0
        lo_end = (start_m + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(N, start_m + BLOCK_M)
    else:
        lo_end = N
        hi = N
    if TMA:
        row0 = (tl.program_id(1) * N).to(tl.int32)
        dq = _dq_tma_inner(dq, q, do, lse, delta, K_DESC, V_DESC, row0, 0, lo_end, qk_scale, BLOCK_N)
    else:
        dq = _dq_inner(dq, q, do, lse, delta, K + base, V + base, HEAD_DIM, HEAD_DIM, offs_m, 0, lo_end, N, 0,
                       qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL)  # fmt: skip
    dq = _dq_inner(dq, q, do, lse, delta, K + base, V + base, HEAD_DIM, HEAD_DIM, offs_m, lo_end, hi, N, 0,
                   qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL)  # fmt: skip
    tl.store(DQ + base + tile, (dq * sm_scale).to(DQ.dtype.element_ty))


def _descs(ts, rows, D):
    return [TensorDescriptor.from_tensor(t.view(-1, D), [rows, D]) for t in ts]


def dkdv(q, k, v, do, lse, delta, causal, tma, cfg):
    B, H, N, D = q.shape
    bm, bn, warps, stages = cfg
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    sm_scale = D**-0.5
    _dkdv_probe[(N // bn, B * H)](q, k, v, do, lse, delta, dk, dv, *_descs((q, do), bm, D), N,
                                  sm_scale * fa.LOG2E, sm_scale, HEAD_DIM=D, CAUSAL=causal, TMA=tma,
                                  BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)  # fmt: skip
    return dk, dv


def dq(q, k, v, do, lse, delta, causal, tma, cfg):
    B, H, N, D = q.shape
    bm, bn, warps, stages = cfg
    out = torch.empty_like(q)
    sm_scale = D**-0.5
    _dq_probe[(N // bm, B * H)](q, k, v, do, lse, delta, out, *_descs((k, v), bn, D), N, sm_scale * fa.LOG2E,
                                sm_scale, HEAD_DIM=D, CAUSAL=causal, TMA=tma, BLOCK_M=bm, BLOCK_N=bn,
                                num_warps=warps, num_stages=stages)  # fmt: skip
    return out


def shape_rows(B, H, N, D, causal, dt, dev, configs, timed):
    q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dt) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(fa.flash_attention(*leaves, causal), leaves, do)
    o, lse = fa._fwd(q, k, v, None, B, N, N, causal, D**-0.5, False)
    delta = (o.float() * do.float()).sum(-1).contiguous()
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)  # one forward's worth
    mode = "causal" if causal else "full"
    for kind, fn, cfgs in (("dK/dV", dkdv, configs["dkdv"]), ("dQ", dq, configs["dq"])):
        for cfg in cfgs:
            line = []
            for tma in (False, True):
                try:
                    outs = fn(q, k, v, do, lse, delta, causal, tma, cfg)
                except Exception as e:  # e.g. a tile out of shared memory: say so, go on
                    line.append(f"{'tma' if tma else 'pointers'} FAILED {type(e).__name__}: {str(e)[:100]}")
                    continue
                refs = (ref_dk, ref_dv) if kind == "dK/dV" else (ref_dq,)
                outs = outs if kind == "dK/dV" else (outs,)
                err = max(harness.rel_err(a, b) for a, b in zip(outs, refs, strict=True))
                assert err < 2e-2, f"{kind} {cfg} tma={tma}: rel err {err:.1e} against 06"
                name = "tma" if tma else "pointers"
                if timed:
                    call = lambda f=fn, t=tma, c=cfg: f(q, k, v, do, lse, delta, causal, t, c)  # noqa: E731
                    us = 1e3 * harness.bench(call, dev, graph=True)
                    line.append(f"{name} {us:.0f} us ({flops / us / 1e6:.0f} fwd-TFLOP/s)")
                else:
                    line.append(f"{name} ok (rel err {err:.1e})")
            print(f"D{D} H{H} N{N} {mode} {kind} {cfg}: " + " | ".join(line), flush=True)


def main():
    if harness.INTERPRET:
        configs = {"dkdv": [(16, 32, 4, 1)], "dq": [(32, 16, 4, 1)]}
        for D, causal in ((32, False), (32, True)):
            shape_rows(1, 2, 64, D, causal, torch.float16, torch.device("cpu"), configs, False)
        return
    configs = {"dkdv": [(32, 128, 4, 4), (64, 128, 8, 3)], "dq": [(128, 64, 8, 3), (128, 128, 8, 3)]}
    dev = torch.device("cuda")
    for D, H, N, causal in ((128, 16, 4096, False), (128, 16, 4096, True), (64, 32, 4096, False)):
        shape_rows(16384 // N, H, N, D, causal, torch.bfloat16, dev, configs, True)


if __name__ == "__main__":
    main()
