"""H200 probe (issue 19, session 10): does a forward written in Gluon, where the wgmma waits are ours to
place, close the forward's gap to cuDNN that Triton's tl language could not (notes/06_flash.md)?

FlashAttention-3's first lever is the intra-warpgroup overlap: issue block j's S = Q K^T, then block
j-1's O += P V, and run block j's softmax while the P V matmul is still in flight, waiting for it only
to rescale O. tl.dot waits for every matmul where its result is first used, so in 06 the softmax and
the matmuls of one warpgroup never overlap (06's "scores one block ahead" variant in
flash_fwd_dissect.py lost 11-20%). Gluon (triton.experimental.gluon, in Triton 3.6) exposes
warpgroup_mma(is_async=True) and warpgroup_mma_wait(num_outstanding), TMA copies and mbarriers, so the
order is explicit:

    wait K_j;   S_j = Q K_j^T                 (async)
    wait V_j-1; O += P_j-1 V_j-1              (async, P from registers)
    wait until one matmul is in flight        (S_j done)
    softmax of S_j -> P_j, m, l, alpha        (while P_j-1 V_j-1 runs)
    wait until none is in flight; O *= alpha; refill the K and V slots both warpgroups are done with

K and V move by TMA through a ring of STAGES slots each, one mbarrier per slot; one program owns 128
query rows at 8 warps (two warpgroups of 64 rows). Dense contiguous (B, H, N, D) inputs, MHA and GQA,
causal (square) or not, any N (a tail block is masked; K and V rows past a head's end come from the
next head, or TMA's zero fill at the tensor's end, and get P = 0). Checked against SDPA in float64,
and its log-sum-exp against 06's; timed beside 06 and cuDNN (harness.bench, CUDA-graph replay, L2
flushed), best of the listed configs. The "ws" configs (warp-specialised: a producer warp, two consumer
warpgroups) had their own kernel here when session 10 measured them (logs
notes/logs/flash_fwd_gluon_s10_call*_h200.log, at 0ca3728); that kernel went into 06 (_fwd_kernel_gluon,
since 8090cd9), so they now launch 06's with each config's tiles and ring depth (compiled for sm_90a
offline for every config, not re-run since). GPU only:  python notes/probes/flash_fwd_gluon.py"""

import faulthandler
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

fa = harness.load_build("06_flash")
LOG2E = fa.LOG2E


@gluon.jit
def _softmax(s, m_i, l_i, start_n, unmasked, offs_m, n, qk_scale, BLOCK_N: gl.constexpr,
             CAUSAL: gl.constexpr):  # fmt: skip
    """One online-softmax step on a block of raw scores s, with the masks only where the block needs
    them. The whole step sits in both arms of the branch (not just the mask): ptxas hoists a wgmma wait
    to the top of its basic block, so the wait that follows this step must start a block of its own."""
    if start_n >= unmasked:
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        keep = cols[None, :] < n
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        p, m_new, alpha, l_new = fa._g_softmax_step(gl.where(keep, s, float("-inf")), m_i, l_i, qk_scale)
    else:
        p, m_new, alpha, l_new = fa._g_softmax_step(s, m_i, l_i, qk_scale)
    return p, m_new, alpha, l_new


@gluon.jit
def _load_kv(desc, row, bars, smem, slot, pred):
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred)
    tma.async_copy_global_to_shared(desc, [row, 0], bars.index(slot), smem.index(slot), pred)


@gluon.jit
def _program(n, H, GROUP, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """This program's first query row, its (batch, head), the rows of the (B*H*N, D) views where its Q
    block and its kv head start, and how many key blocks it visits (heaviest query blocks first, as 06)."""
    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    pid_bh = gl.program_id(1)
    kv_head = pid_bh // H * (H // GROUP) + pid_bh % H // GROUP
    if CAUSAL:
        hi = gl.minimum(n, start_m + BLOCK_M)
    else:
        hi = n
    return start_m, pid_bh, pid_bh * n + start_m, kv_head * n, gl.cdiv(hi, BLOCK_N)


@gluon.jit
def _store(acc, l_i, m_i, offs_m, row0, head, n, O, LSE):
    """O = acc / l for the rows from row0 of one head, and their base-2 lse; rows past n are dropped."""
    rows_o: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    HEAD_DIM: gl.constexpr = acc.type.shape[1]
    o = acc / gl.convert_layout(l_i, rows_o)[:, None]
    offs_mo = row0 + gl.arange(0, acc.type.shape[0], layout=rows_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc.type.layout))
    o_rows = (head * n + offs_mo).to(gl.int64) * HEAD_DIM
    gl.store(O + o_rows[:, None] + offs_d[None, :], o.to(O.dtype.element_ty), mask=(offs_mo < n)[:, None])
    gl.store(LSE + head.to(gl.int64) * n + offs_m, m_i + gl.log2(l_i), mask=offs_m < n)


@gluon.jit
def _gluon_fwd(q_desc, k_desc, v_desc, O, LSE, n, H, GROUP, qk_scale, HEAD_DIM: gl.constexpr,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
               num_warps: gl.constexpr):  # fmt: skip
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    start_m, pid_bh, q_row, kv_row, n_blocks = _program(n, H, GROUP, BLOCK_M, BLOCK_N, CAUSAL)
    if CAUSAL:
        unmasked = (start_m + 1) // BLOCK_N * BLOCK_N
    else:
        unmasked = n // BLOCK_N * BLOCK_N

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()
    gl.thread_barrier()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _load_kv(k_desc, kv_row + i * BLOCK_N, k_bars, k_smem, i, i < n_blocks)
        _load_kv(v_desc, kv_row + i * BLOCK_N, v_bars, v_smem, i, i < n_blocks)

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s, use_acc=False)
    gl.thread_barrier()  # K_0's slot is free: K_STAGES goes there (the loop refills from K_STAGES+1 on)
    _load_kv(k_desc, kv_row + STAGES * BLOCK_N, k_bars, k_smem, 0, STAGES < n_blocks)
    p, m_i, alpha, l_i = _softmax(s, m_i, l_i, 0, unmasked, offs_m, n, qk_scale, BLOCK_N, CAUSAL)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    for j in range(1, n_blocks):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_bars.index(slot), j // STAGES & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s, use_acc=False, is_async=True)
        acc = acc * gl.convert_layout(alpha, rows_o)[:, None]  # block j-1's rescale, while S_j runs
        mbarrier.wait(v_bars.index(prev), (j - 1) // STAGES & 1)
        o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        start_n = j * BLOCK_N
        p, m_i, alpha, l_i = _softmax(s, m_i, l_i, start_n, unmasked, offs_m, n, qk_scale, BLOCK_N, CAUSAL)
        acc, p_op = warpgroup_mma_wait(0, deps=[o_tok, p_op])
        p_op = gl.convert_layout(p.to(dtype), p_layout)  # into P's registers once P V_j-1 is done
        gl.thread_barrier()  # both warpgroups are done with K_j and V_j-1: refill their slots
        _load_kv(k_desc, kv_row + (j + STAGES) * BLOCK_N, k_bars, k_smem, slot, j + STAGES < n_blocks)
        _load_kv(v_desc, kv_row + (j - 1 + STAGES) * BLOCK_N, v_bars, v_smem, prev, j - 1 + STAGES < n_blocks)
    acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
    last = (n_blocks - 1) % STAGES
    mbarrier.wait(v_bars.index(last), (n_blocks - 1) // STAGES & 1)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc)

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    _store(acc, l_i, m_i, offs_m, start_m, pid_bh, n, O, LSE)


# kind, BLOCK_M, BLOCK_N, STAGES: "pipe" _gluon_fwd (8 warps), "ws" 06's _fwd_kernel_gluon (4 + 4 + 1 warps)
CONFIGS = {
    128: [("pipe", 128, 128, 2), ("pipe", 128, 64, 3), ("ws", 128, 128, 2), ("ws", 128, 64, 3)],
    64: [("pipe", 128, 128, 3), ("pipe", 128, 64, 4), ("ws", 128, 128, 3), ("ws", 128, 64, 4)],
}  # what fits in shared memory


def gluon_attention(q, k, v, causal, cfg):
    """o and the base-2 lse of dense contiguous (B, H, N, D) q and (B, H_KV, N, D) k, v."""
    B, H, N, D = q.shape
    kind, block_m, block_n, stages = cfg
    o = torch.empty_like(q)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    if kind == "ws":  # 06's kernel with this config's tiles and ring, past 06's own D = 128 rule
        before = dict(fa.GLUON_FWD)
        fa.GLUON_FWD.update(BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages)
        try:
            fa._fwd_gluon(q, k, v, o, lse, q, q, lse.stride()[:2], B, N, N, causal, D**-0.5, False)
        finally:
            fa.GLUON_FWD.update(before)
        return o, lse
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, D], gdt)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, D], gdt)
    q_desc = TensorDescriptor.from_tensor(q.view(-1, D), [block_m, D], q_layout)
    k_desc = TensorDescriptor.from_tensor(k.view(-1, D), [block_n, D], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v.view(-1, D), [block_n, D], kv_layout)
    grid = (triton.cdiv(N, block_m), B * H)
    scale = D**-0.5 * LOG2E
    _gluon_fwd[grid](q_desc, k_desc, v_desc, o, lse, N, H, H // k.shape[1], scale, D, block_m, block_n,
                     stages, causal, num_warps=8)  # fmt: skip
    return o, lse


CHECKS = [(1, 2, 2, 256, 128, False), (2, 4, 2, 1000, 128, True), (1, 2, 1, 77, 64, True),
          (1, 8, 2, 513, 128, False), (1, 2, 2, 1024, 64, False)]  # fmt: skip
SHAPES = [(128, 16, 16, 4096, False), (128, 16, 16, 4096, True), (128, 32, 8, 8192, True),
          (64, 32, 32, 4096, False)]  # fmt: skip
ORDER = [("pipe", 128, 128, 2), ("ws", 128, 128, 2), ("ws", 128, 64, 3), ("ws", 128, 128, 3),
         ("pipe", 128, 128, 3), ("pipe", 128, 64, 3), ("pipe", 128, 64, 4), ("ws", 128, 64, 4)]  # fmt: skip
if os.environ.get("PROBE_SET") == "wide":  # call 4: the winner on more shapes, one more stage each
    SHAPES = [(128, 16, 16, 4096, False), (128, 16, 16, 4096, True), (128, 16, 16, 8192, False),
              (128, 16, 16, 16384, True), (128, 32, 8, 8192, True), (128, 32, 1, 4096, True),
              (64, 32, 32, 4096, False), (64, 32, 32, 4096, True), (64, 32, 32, 16384, True)]  # fmt: skip
    ORDER = [("ws", 128, 128, 2), ("ws", 128, 128, 3), ("ws", 128, 128, 4)]
    CONFIGS[128].append(("ws", 128, 128, 3))
    CONFIGS[64].append(("ws", 128, 128, 4))


def watchdog(seconds: int) -> None:
    """A launch that never finishes (a barrier waited on forever) ends the run with a traceback."""
    faulthandler.cancel_dump_traceback_later()
    faulthandler.dump_traceback_later(seconds, exit=True)


def check(cfg, device) -> bool:
    """Against SDPA in float64 (outputs) and the probe's own lse from a float64 softmax, on ragged and
    aligned shapes; each launch announced first, so a kernel that never finishes is named in the log."""
    ok = True
    for B, H, H_KV, N, D, causal in CHECKS:
        if cfg not in CONFIGS[D]:
            continue
        g = torch.Generator(device).manual_seed(N)
        q = torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(B, H_KV, N, D, device=device, dtype=q.dtype, generator=g) for _ in range(2))
        kr, vr = (t.double().repeat_interleave(H // H_KV, 1) for t in (k, v))
        s = q.double() @ kr.transpose(-1, -2) * D**-0.5
        if causal:
            s = s.masked_fill(torch.ones(N, N, device=device, dtype=torch.bool).triu(1), float("-inf"))
        ref, lse_ref = torch.softmax(s, -1) @ vr, torch.logsumexp(s, -1) * LOG2E
        print("check", (B, H, H_KV, N, D, causal), cfg, end=" ", flush=True)
        watchdog(100)
        o, lse = gluon_attention(q, k, v, causal, cfg)
        torch.cuda.synchronize()
        err, lse_err = harness.rel_err(o, ref), (lse.double() - lse_ref).abs().max().item()
        good = err < 1e-2 and lse_err < 1e-3
        ok &= good
        print(f"rel err {err:.1e}, lse err {lse_err:.1e}", "ok" if good else "FAILED", flush=True)
    return ok


def bench_shape(D, H, H_KV, N, causal, device, fns) -> dict:
    """TFLOP/s of each fn(q, k, v, causal) on one shape, by CUDA-graph replay with the L2 flushed."""
    B = 16384 // N
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, H_KV, N, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    out = {}
    for name, fn in fns.items():
        watchdog(120)
        out[name] = flops / harness.bench(lambda f=fn: f(q, k, v, causal), device, graph=True) / 1e9
    return out


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t0 = time.time()
    deadline = float(os.environ.get("PROBE_DEADLINE_S", "400"))
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)

    def cudnn(q, k, v, causal):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            gqa = q.shape[1] != k.shape[1]
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    base = {}
    for shape in SHAPES:
        base[shape] = bench_shape(*shape, device, {"cudnn": cudnn, "06": fa.flash_attention})
        print(shape, " ".join(f"{k} {t:.0f}" for k, t in base[shape].items()), f"[{time.time() - t0:.0f} s]",
              flush=True)  # fmt: skip
    for cfg in ORDER:
        if time.time() - t0 > deadline:
            print("deadline: not run", cfg)
            continue
        if not check(cfg, device):
            continue
        for shape in SHAPES:
            if cfg in CONFIGS[shape[0]]:
                t = bench_shape(*shape, device, {"g": functools.partial(gluon_attention, cfg=cfg)})["g"]
                b = base[shape]
                vs = f"x{t / b['cudnn']:.2f} cuDNN ({b['cudnn']:.0f}), x{t / b['06']:.2f} 06 ({b['06']:.0f})"
                print(f"{cfg} {shape}: {t:.0f} TFLOP/s, {vs} [{time.time() - t0:.0f} s]", flush=True)
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
