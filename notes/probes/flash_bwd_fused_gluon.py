"""H200 probe (issue 19, sessions 12-13): a backward with five matmuls a block pair, not seven. 06's
Gluon dK/dV kernel also produces dQ: FlashAttention-3's split, in Gluon. The "writer" mode below is
what 06 now runs for deterministic=False (its _bwd_dkdv_gluon with FUSED); this file keeps all three
modes as they were measured.

06's backward runs two kernels. dK/dV does 4 matmuls a (key block, query block) pair; dQ does 3, two of
which (S and dP) recompute what dK/dV already had. At D=128 causal 4k that is 965 + 617 us against
cuDNN's one 1,278 us kernel (results/06_flash.json, e9b7646). Here the dK/dV program (128 keys of a kv
head as two consumer warpgroups of 64, 06's producer warp streaming Q, dO and the (lse, delta) pairs)
adds, a step:
  - each warpgroup writes its dS^T (64 keys x 64 queries, bf16) into its half of a shared (128, 64)
    tile, double-buffered by step parity, and both warpgroups meet on an mbarrier;
  - warpgroup w computes dQ[:, 64w : 64w + 64] = dS (the shared tile, transposed) K[:, 64w : 64w + 64]
    over all 128 keys (a 64 x 64 fp32 accumulator, 32 registers a thread), as two matmuls over each
    half's 64 keys (session 12's version reinterpreted the two K tiles as one (128, D) tile, which a
    swizzled (64, D) tile's layout, (64, 64) column blocks one after another, does not allow: its dQ
    came out wrong on the H200, relative error ~1);
  - and adds the tile into an fp32 dQ buffer (DQ_MODES): "reduce", one TMA bulk reduce-add from the
    warpgroup's registers (the compiler stages them through shared memory and waits until the copy
    engine has read them); "atomic", fp32 pointer atomics; "writer", the tile into a shared slot for a
    fourth partition, one warp that issues the TMA reduce-add from there and frees the slot once read.
A pass after the kernel scales the buffer by sm_scale and rounds it to bf16 (cuDNN's
convert_dq_to_16bits does the same). The fp32 adds from different programs land in any order, so dQ's
last bits vary from run to run (like 06's deterministic=False).
Session 13 on the H200 (notes/logs/flash_bwd_fused_modes_h200.log): all 15 checks ok; whole backward
against 06's two kernels: reduce 0.99-1.04x, atomic 0.85-0.91x, writer 1.11-1.14x (0.94-0.99x cuDNN).

The run: checks against 06's own backward (MHA and GQA, causal and not, ragged N), then the whole
backward (06's benchmark method: graph replay of autograd.grad, L2 flushed) for cuDNN, 06's default and
this one, interleaved over ROUNDS rounds. The kernel is swapped into 06's autograd through its _bwd
(fused_backward below), so the forward and the delta kernel are 06's.
Offline (Triton 3.6, sm_90a): see the notes; run `python notes/probes/flash_bwd_fused_gluon.py --compile`
with the GPU's Triton on any machine to compile without launching.
GPU only otherwise:  python -u notes/probes/flash_bwd_fused_gluon.py   (ROUNDS=3 by default)"""

import contextlib
import faulthandler
import functools
import itertools
import os
import statistics
import sys
from pathlib import Path

if "--compile" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "0"  # before harness: compile for sm_90a, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from flash_tma_reduce_compile import tma_reduce_add, tma_reduce_add_smem  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

fa = harness.load_build("06_flash")
ROUNDS = int(os.environ.get("ROUNDS", "3"))


DQ_MODES = {"reduce": 0, "atomic": 1, "writer": 2}  # how a step's dQ tile reaches the fp32 buffer


@gluon.jit
def _fused_consumer(descs, smem, bars, geom, extra, qk_scale, CAUSAL: gl.constexpr, DQ_MODE: gl.constexpr,
                    WG: gl.constexpr):  # fmt: skip
    """06's _gb_dkdv_consumer step, then this warpgroup's half of dQ for the step's 64 queries."""
    k_smem, v_smem, q_smem, do_smem, lse_smem, dl_smem = smem
    kv_bar, ready, empty = bars
    LD, q_head0, kv_head, n_q, lo, n_steps, steps_per_head, DK, DV, n_k, start_n, sm_scale = geom
    ds_smem, ds_bar, dq_desc, DQ, dq_smem, dq_full, dq_empty = extra
    dtype: gl.constexpr = q_smem.dtype
    STAGES: gl.constexpr = q_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    HALF: gl.constexpr = k_smem.type.shape[1]
    HALF_D: gl.constexpr = HEAD_DIM // 2
    s_layout: gl.constexpr = fa._g_mma_layout(BLOCK_M)
    acc_layout: gl.constexpr = fa._g_mma_layout(HEAD_DIM)
    dq_layout: gl.constexpr = fa._g_mma_layout(HALF_D)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    cols_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    k0 = start_n + WG * HALF
    k_rows = k0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    diag = n_k - n_q
    k_tile = k_smem.index(WG)
    v_tile = v_smem.index(WG)
    # dQ's B operand: this warpgroup's half of D for each half's 64 keys. A (64, D) tile is stored as D / 64
    # swizzled (64, 64) column blocks one after another, so the two halves cannot be reinterpreted as
    # one (128, D) tile; a column slice at a block boundary is a whole block.
    k_lo = k_smem.index(0).slice(WG * HALF_D, HALF_D, dim=1)
    k_hi = k_smem.index(1).slice(WG * HALF_D, HALF_D, dim=1)
    dk = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
    dq = gl.zeros([BLOCK_M, HALF_D], gl.float32, dq_layout)
    s = gl.zeros([HALF, BLOCK_M], gl.float32, s_layout)
    dp = gl.zeros([HALF, BLOCK_M], gl.float32, s_layout)
    mbarrier.wait(kv_bar, 0)
    for i in range(n_steps):
        slot = i % STAGES
        start_m = lo + (i % steps_per_head) * BLOCK_M
        mbarrier.wait(ready.index(slot), i // STAGES & 1)
        q_t = q_smem.index(slot)
        do_t = do_smem.index(slot)
        s_tok = warpgroup_mma(k_tile, q_t.permute((1, 0)), s, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(v_tile, do_t.permute((1, 0)), dp, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        lse = lse_smem.index(slot).load(cols_layout)
        q_rows = start_m + gl.arange(0, BLOCK_M, layout=cols_layout)
        if CAUSAL:
            p = fa._gb_pt(s, lse, k_rows, q_rows, diag, qk_scale, start_m + diag < k0 + HALF - 1)
        else:
            p = gl.exp2(s * qk_scale - lse[None, :])
        p_op = gl.convert_layout(p.to(dtype), op_layout)
        dv_tok = warpgroup_mma(p_op, do_t, dv, is_async=True)
        dp = warpgroup_mma_wait(1, deps=[dp_tok])
        dl = dl_smem.index(slot).load(cols_layout)
        ds = (p * (dp - dl[None, :])).to(dtype)
        ds_op = gl.convert_layout(ds, op_layout)
        dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
        # dS^T into this warpgroup's rows of the shared tile; both halves present before either reads.
        # Every thread fences its stores for the async proxy; Gluon's arrive syncs the warpgroup first
        # (bar.sync on the partition's barrier) and one thread arrives.
        buf = i % 2
        ds_tile = ds_smem.index(buf)
        ds_tile.slice(WG * HALF, HALF).store(ds)
        fence_async_shared()
        mbarrier.arrive(ds_bar.index(buf), count=1)
        mbarrier.wait(ds_bar.index(buf), i // 2 & 1)
        dq_tok = warpgroup_mma(ds_tile.slice(0, HALF).permute((1, 0)), k_lo, dq, use_acc=False, is_async=True)
        dq_tok = warpgroup_mma(ds_tile.slice(HALF, HALF).permute((1, 0)), k_hi, dq_tok, is_async=True)
        dv, dk, dq, p_op, ds_op = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq_tok, p_op, ds_op])
        mbarrier.arrive(empty.index(slot), count=1)  # Q and dO are read; dS stays until step i + 2
        head = q_head0 + i // steps_per_head
        if DQ_MODE == 0:  # reduce from registers: staged and waited on (until read) right here
            tma_reduce_add(dq_desc, [head * n_q + start_m, WG * HALF_D], dq)
        elif DQ_MODE == 1:  # fp32 atomics, one per element
            offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
            offs_d = WG * HALF_D + gl.arange(0, HALF_D, layout=gl.SliceLayout(0, dq_layout))
            rows_q = (head * n_q + offs_m).to(gl.int64) * HEAD_DIM
            gl.atomic_add(DQ + rows_q[:, None] + offs_d[None, :], dq, mask=(offs_m < n_q)[:, None],
                          sem="relaxed")  # fmt: skip
        else:  # hand the tile to the writer warp through shared memory: its reduce overlaps our next step
            mbarrier.wait(dq_empty.index(WG), (i & 1) ^ 1)  # a fresh barrier's phase -1 is complete
            dq_smem.index(WG).store(dq)
            fence_async_shared()
            mbarrier.arrive(dq_full.index(WG), count=1)
    offs_k = k0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    rows = (kv_head * n_k + offs_k).to(gl.int64) * HEAD_DIM
    ok = (offs_k < n_k)[:, None]
    gl.store(DK + rows[:, None] + offs_d[None, :], (dk * sm_scale).to(dtype), mask=ok)
    gl.store(DV + rows[:, None] + offs_d[None, :], dv.to(dtype), mask=ok)


@gluon.jit
def _fused_consumer1(descs, smem, bars, geom, extra, qk_scale, CAUSAL: gl.constexpr, DQ_MODE: gl.constexpr):
    _fused_consumer(descs, smem, bars, geom, extra, qk_scale, CAUSAL, DQ_MODE, 1)


@gluon.jit
def _fused_dq_writer(descs, smem, bars, geom, extra, qk_scale, CAUSAL: gl.constexpr, DQ_MODE: gl.constexpr):
    """One warp (DQ_MODE 2): each step, each warpgroup's dQ tile from shared memory into the fp32 buffer
    by one TMA reduce-add, then the tile's slot back to its warpgroup once the copy engine has read it."""
    LD, q_head0, kv_head, n_q, lo, n_steps, steps_per_head, DK, DV, n_k, start_n, sm_scale = geom
    ds_smem, ds_bar, dq_desc, DQ, dq_smem, dq_full, dq_empty = extra
    BLOCK_M: gl.constexpr = dq_smem.type.shape[1]
    HALF_D: gl.constexpr = dq_smem.type.shape[2]
    if DQ_MODE == 2:
        for i in range(n_steps):
            row = (q_head0 + i // steps_per_head) * n_q + lo + (i % steps_per_head) * BLOCK_M
            for w in gl.static_range(2):
                mbarrier.wait(dq_full.index(w), i & 1)
                tma_reduce_add_smem(dq_desc, [row, w * HALF_D], dq_smem.index(w))
                tma.store_wait(0)
                mbarrier.arrive(dq_empty.index(w), count=1)


@gluon.jit
def _bwd_fused(q_desc, k_desc, v_desc, do_desc, dq_desc, DQ, LD, DK, DV, n_q, n_k, H, GROUP, qk_scale,
               sm_scale, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr, CAUSAL: gl.constexpr, DQ_MODE: gl.constexpr):  # fmt: skip
    """06's _bwd_dkdv_gluon with the dS tiles and their barriers added; dq_desc: the fp32 dQ buffer DQ's
    (B*H*N, D) rows in (64, D / 2) tiles."""
    start_n = gl.program_id(0) * BLOCK_N
    pid = gl.program_id(1)
    b = pid // (H // GROUP)
    h_kv = pid % (H // GROUP)
    q_head0 = b * H + h_kv * GROUP
    if CAUSAL:
        lo = gl.maximum(start_n - (n_k - n_q), 0) // BLOCK_M * BLOCK_M
    else:
        lo = start_n * 0
    steps_per_head = gl.cdiv(n_q - lo, BLOCK_M)
    n_steps = GROUP * steps_per_head
    dtype: gl.constexpr = q_desc.dtype
    HALF: gl.constexpr = BLOCK_N // 2
    tile: gl.constexpr = fa._g_tile_layout(q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], tile)
    v_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], tile)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], tile)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], tile)
    row_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], row_smem)
    dl_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], row_smem)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
    if DQ_MODE == 2:
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, HEAD_DIM // 2], dq_desc.layout)
    else:
        unused: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, 1, 1], unused)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(ds_bar.index(i), count=2)  # both warpgroups' halves of dS^T written
        mbarrier.init(dq_full.index(i), count=1)  # warpgroup i's dQ tile stored
        mbarrier.init(dq_empty.index(i), count=1)  # and read by the copy engine
    fence_async_shared()
    descs = (q_desc, k_desc, v_desc, do_desc)
    smem = (k_smem, v_smem, q_smem, do_smem, lse_smem, dl_smem)
    bars = (kv_bar, ready, empty)
    geom = (LD, q_head0, pid, n_q, lo, n_steps, steps_per_head, DK, DV, n_k, start_n, sm_scale)
    extra = (ds_smem, ds_bar, dq_desc, DQ, dq_smem, dq_full, dq_empty)
    gl.warp_specialize([
        (_fused_consumer, (descs, smem, bars, geom, extra, qk_scale, CAUSAL, DQ_MODE, 0)),
        (_fused_consumer1, (descs, smem, bars, geom, extra, qk_scale, CAUSAL, DQ_MODE)),
        (fa._gb_dkdv_producer, (descs, smem, bars, geom)),
        (_fused_dq_writer, (descs, smem, bars, geom, extra, qk_scale, CAUSAL, DQ_MODE)),
    ], [4, 1, 1], [240, 24, 24])  # fmt: skip


def fused_dkdv_dq(q, k, v, do, ld, causal, sm_scale, mode="writer", kernel=_bwd_fused):
    """dq, dk, dv of dense contiguous D=128 (B, H, N, D) q, dO and (B, H_KV, N, D) k, v from 06's (lse,
    delta) pairs, by the fused kernel (dQ by DQ_MODES[mode]) and the scale-and-round pass."""
    B, H, n_q, D = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dq_tile = [fa.GLUON_BWD["TILE"], D // 2]
    dq_layout = gl.NVMMASharedLayout.get_default_for(dq_tile, gl.float32)
    dq_desc = fa.GluonDescriptor.from_tensor(dq_acc.view(-1, D), dq_tile, dq_layout)
    bn = fa.GLUON_BWD["BLOCK"]
    descs = fa._gluon_bwd_descs(q, k, v, do)
    tile, stages = fa.GLUON_BWD["TILE"], fa.GLUON_BWD["DKDV_STAGES"]
    kernel[(triton.cdiv(n_k, bn), B * h_kv)](
        *descs, dq_desc, dq_acc, ld, dk, dv, n_q, n_k, H, H // h_kv, sm_scale * fa.LOG2E, sm_scale, D, tile,
        bn, stages, causal, DQ_MODES[mode], num_warps=4, maxnreg=168)  # fmt: skip
    return (dq_acc * sm_scale).to(q.dtype), dk, dv


TAKEN = []  # one entry per backward the fused kernel ran: the checks say whether it ran at all


@contextlib.contextmanager
def fused_backward(mode="writer"):
    """06's autograd takes the fused kernel (dQ by DQ_MODES[mode]) wherever its Gluon dK/dV would run
    whole (dense, D=128, sm_90, one program per kv head's group, as 06 decides it, fixed_dkdv_splits
    included); elsewhere its own _bwd."""
    real = fa._bwd

    def bwd(do, q, k, v, o, lse, cu, B, n_q, n_k, causal, sm_scale, poison, deterministic=True):
        h_kv = k.shape[1]
        splits = fa._FIXED["splits"] or fa.dkdv_splits(n_k, B, h_kv, q.shape[1] // h_kv, q.device)
        if cu is not None or not fa.gluon_ok((q, k, v, do), False) or splits != 1:
            return real(do, q, k, v, o, lse, cu, B, n_q, n_k, causal, sm_scale, poison, deterministic)
        TAKEN.append((tuple(q.shape), h_kv, causal))
        (do,) = fa._contig_last(do)
        ld = torch.empty((*lse.shape, 2), device=q.device, dtype=torch.float32)
        fa._bwd_delta_kernel[(triton.cdiv(n_q, 32), B * q.shape[1])](
            o, do, lse, ld, *fa._bhn(o, False), *fa._bhn(do, False), n_q, q.shape[1], HEAD_DIM=q.shape[-1],
            BLOCK_M=32)  # fmt: skip
        return fused_dkdv_dq(q, k, v, do, ld, causal, sm_scale, mode)

    fa._bwd = bwd
    try:
        yield
    finally:
        fa._bwd = real


def compile_only():
    """Compile the fused kernel for sm_90a without a GPU (flash_ptxas.py's way) and report ptxas's
    registers, spills and shared memory, for bf16 and fp16, causal and not."""
    import flash_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    def compile_launch(tag):
        class Launch:  # stands in for _bwd_fused[grid]: compiles the launch's specialisation, runs nothing
            def __getitem__(self, grid):
                def call(*args, **meta):
                    backend, fn = flash_ptxas.BACKEND, _bwd_fused
                    bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(
                        *args, **meta
                    )
                    options, sig, constexprs, attrs = fn._pack_args(backend, meta, bound, spec, options)
                    compiled = triton.compile(
                        GluonASTSource(fn, sig, constexprs, attrs),
                        target=flash_ptxas.TARGET,
                        options=options.__dict__,
                    )
                    asm = compiled.asm | {"shared": compiled.metadata.shared}
                    dump = Path(os.environ["DUMP"]) if "DUMP" in os.environ else None  # ttgir, ptx, sass
                    report = flash_ptxas.ptxas_report(asm, dump, tag.replace(" ", "_"), loops=True)
                    print(tag, report, flush=True)

                return call

        return Launch()

    for mode in DQ_MODES:
        for dtype in (torch.bfloat16, torch.float16):
            for causal in (False, True):
                q = torch.empty(1, 4, 1000, 128, dtype=dtype)
                k = torch.empty(1, 2, 1000, 128, dtype=dtype)
                tag = f"fused {mode} {str(dtype)[6:]} {'causal' if causal else 'full'}"
                ld = torch.empty(1, 4, 1000, 2)
                fused_dkdv_dq(q, k, k, q, ld, causal, 128**-0.5, mode, compile_launch(tag))


def main():
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    shapes = [(1, 2, 2, 256, False), (2, 4, 2, 1000, True), (1, 8, 2, 513, False), (1, 2, 1, 77, True),
              (2, 4, 4, 1000, False)]  # fmt: skip
    for mode, (B, H, H_KV, N, causal) in itertools.product(DQ_MODES, shapes):
        q, do = (torch.randn(B, H, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(B, H_KV, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with fa.fixed_dkdv_splits(1):
            ref = torch.autograd.grad(fa.flash_attention(q, k, v, causal), (q, k, v), do)
            faulthandler.dump_traceback_later(60, exit=True)  # a barrier waited on forever ends the run
            with fused_backward(mode):
                got = torch.autograd.grad(fa.flash_attention(q, k, v, causal), (q, k, v), do)
            torch.cuda.synchronize()
            faulthandler.cancel_dump_traceback_later()
        errs = [harness.rel_err(a, b) for a, b in zip(got, ref, strict=True)]
        verdict = "ok" if max(errs) < 1e-2 and TAKEN else "FAILED" if TAKEN else "NOT TAKEN"
        TAKEN.clear()
        got = " ".join(f"{e:.1e}" for e in errs)
        print(f"check {mode} {(B, H, H_KV, N, causal)}: dq, dk, dv vs 06's {got} {verdict}", flush=True)
    for B, H, H_KV, N, causal in [(4, 16, 16, 4096, False), (4, 16, 16, 4096, True), (2, 32, 8, 8192, True)]:
        q, do = (torch.randn(B, H, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(B, H_KV, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        impls = fa._impls(causal)
        flops = 5 * 2 * B * H * N * N * 128 * (0.5 if causal else 1.0)
        times = {}
        faulthandler.dump_traceback_later(60 + 60 * ROUNDS, exit=True)
        for r in range(ROUNDS):
            fused = [(m, impls["ours"][0], functools.partial(fused_backward, m)) for m in DQ_MODES]
            for name, fn, ctx in [("cudnn", *impls["cudnn"]), ("06", impls["ours"][0], None), *fused]:
                times.setdefault(name, []).append(fa._time(fn, ctx, q, k, v, do, device)[1])
            print(f"{(B, H, H_KV, N, causal)} round {r}: " + ", ".join(
                f"{n} {flops / t[-1] / 1e9:.0f}" for n, t in times.items()), flush=True)  # fmt: skip
        faulthandler.cancel_dump_traceback_later()
        med = {n: statistics.median(t) for n, t in times.items()}
        got = ", ".join(f"{n} {flops / t / 1e9:.0f} (x{med['cudnn'] / t:.2f} cuDNN)" for n, t in med.items())
        print(f"{(B, H, H_KV, N, causal)} backward TFLOP/s, median round: {got}", flush=True)


if __name__ == "__main__":
    compile_only() if "--compile" in sys.argv else main()
