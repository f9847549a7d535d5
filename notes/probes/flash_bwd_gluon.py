"""H200 probe (issue 19, sessions 10-11): the backward's dK/dV and dQ kernels in Gluon, with the forward's
recipe (flash_fwd_gluon.py), against 06's tl kernels on the same inputs. Written in session 10, run in
session 11 (notes/logs/flash_bwd_gluon_s11*_h200.log); 06 has carried the same kernels since 09a5714, and
the whole-backward timing's "06 default" variant times them there, beside this probe's copies.

06's dK/dV kernel is the backward's slow part: 276 us a matmul against 231 for its dQ kernel and 254 for
cuDNN's whole backward (D=128 causal 4k, notes/06_flash.md session 9). Here one program owns 128 keys of
one kv head as two consumer warpgroups of 64 keys each, and one producer warp streams the query side
through a ring of STAGES slots: Q and dO tiles of 64 rows by TMA, and each row's (lse, delta) pair,
which it loads and writes to shared memory itself before the slot's mbarrier arrival publishes it.
A warpgroup's step for one query block (S^T etc. are 64 keys x 64 queries):

    S^T = K Q^T, dP^T = V dO^T          both issued, async
    wait for S^T; P^T = 2^(S^T * scale - lse)           while dP^T runs
    dV += P^T dO                         async
    wait for dP^T; dS^T = P^T (dP^T - delta)            while dV runs
    dK += dS^T Q; wait for both; hand the slot back

The warpgroups never wait for each other, so one's exponentials can run while the other's matmuls do.
GQA: the loop runs over the group's heads and their query blocks as one sequence of steps. Causal: the
steps start at the first query block that sees one of the 128 keys, and a warpgroup masks only the
blocks crossing its own 64 keys' diagonal (each step's arithmetic in both arms of that branch, so
ptxas's wgmma waits stay where they are written: see the forward probe). Dense contiguous inputs,
D = 128, any N (a missing query row gets lse = +inf, so P = 0; key rows past N are computed and not
stored). The dQ kernel (below) mirrors it: 128 query rows a program as two warpgroups, K and V streamed.
dK, dV, dQ checked against 06's backward on the same (lse, delta) pairs; each kernel timed beside 06's,
per matmul, and the whole backward with 06's launches replaced, against cuDNN, the way 06's benchmark
times it. GPU only:  python notes/probes/flash_bwd_gluon.py"""

import contextlib
import faulthandler
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
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
ROUNDS = int(os.environ.get("ROUNDS", "3"))  # interleaved rounds of the whole-backward timings
LOG2E = fa.LOG2E


@gluon.constexpr_function
def _score_layout(n):
    """One warpgroup's wgmma result layout for a 64 x n tile (scores, or an accumulator with n = D)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _p_step(s, lse, k_rows, q_rows, diag, qk_scale, masked):
    """P^T for one block; the mask (key k sees query i iff k <= i + diag) only where the block needs it,
    the whole step in both arms."""
    if masked:
        keep = k_rows[:, None] <= q_rows[None, :] + diag
        p = gl.where(keep, gl.exp2(s * qk_scale - lse[None, :]), 0.0)
    else:
        p = gl.exp2(s * qk_scale - lse[None, :])
    return p


@gluon.jit
def _producer(descs, smem, bars, geom, qk_scale, CAUSAL: gl.constexpr):
    """One warp: K and V once, then per step the Q and dO tiles (TMA) and the (lse, delta) pairs of the
    block's rows (loaded here and stored to shared memory before the slot's arrival publishes them)."""
    q_desc, k_desc, v_desc, do_desc = descs
    k_smem, v_smem, q_smem, do_smem, lse_smem, dl_smem = smem
    kv_bar, ready, empty = bars
    LD, q_row0, kv_row, n_q, lo, n_steps, steps_per_head = geom
    STAGES: gl.constexpr = q_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    HALF: gl.constexpr = k_smem.type.shape[1]
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [kv_row + w * HALF, 0], kv_bar, k_smem.index(w))
        tma.async_copy_global_to_shared(v_desc, [kv_row + w * HALF, 0], kv_bar, v_smem.index(w))
    rows_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    for i in range(n_steps):
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), (i // STAGES & 1) ^ 1)
        g = i // steps_per_head
        start_m = lo + (i % steps_per_head) * BLOCK_M
        rows = start_m + gl.arange(0, BLOCK_M, layout=rows_layout)
        pairs = LD + (q_row0 + g * n_q + rows).to(gl.int64) * 2  # (lse, delta) of row r at 2r, 2r + 1
        lse = gl.load(pairs, mask=rows < n_q, other=float("inf"))  # a missing row: P = 0
        dl = gl.load(pairs + 1, mask=rows < n_q, other=0.0)
        lse_smem.index(slot).store(lse)
        dl_smem.index(slot).store(dl)
        bar = ready.index(slot)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)  # releases the stores
        tma.async_copy_global_to_shared(q_desc, [q_row0 + g * n_q + start_m, 0], bar, q_smem.index(slot))
        tma.async_copy_global_to_shared(do_desc, [q_row0 + g * n_q + start_m, 0], bar, do_smem.index(slot))


@gluon.jit
def _consumer(descs, smem, bars, geom, qk_scale, CAUSAL: gl.constexpr, WG: gl.constexpr):
    """One warpgroup's 64 keys: dK and dV over every step, then stored (dK scaled once at the end)."""
    k_smem, v_smem, q_smem, do_smem, lse_smem, dl_smem = smem
    kv_bar, ready, empty = bars
    LD, q_row0, kv_row, n_q, lo, n_steps, steps_per_head, DK, DV, n_k, start_n, sm_scale = geom
    dtype: gl.constexpr = q_smem.dtype
    STAGES: gl.constexpr = q_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    HALF: gl.constexpr = k_smem.type.shape[1]
    s_layout: gl.constexpr = _score_layout(BLOCK_M)
    acc_layout: gl.constexpr = _score_layout(HEAD_DIM)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    cols_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    k0 = start_n + WG * HALF  # this warpgroup's first key
    k_rows = k0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    diag = n_k - n_q
    k_tile = k_smem.index(WG)
    v_tile = v_smem.index(WG)
    dk = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
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
        lse = lse_smem.index(slot).load(cols_layout)  # each row value read where it is used: fewer live
        q_rows = start_m + gl.arange(0, BLOCK_M, layout=cols_layout)  # registers (spills otherwise)
        if CAUSAL:  # masked where some key of this block is past some query row's limit
            p = _p_step(s, lse, k_rows, q_rows, diag, qk_scale, start_m + diag < k0 + HALF - 1)
        else:
            p = gl.exp2(s * qk_scale - lse[None, :])
        p_op = gl.convert_layout(p.to(dtype), op_layout)
        dv_tok = warpgroup_mma(p_op, do_t, dv, is_async=True)
        dp = warpgroup_mma_wait(1, deps=[dp_tok])
        dl = dl_smem.index(slot).load(cols_layout)
        ds = p * (dp - dl[None, :])
        ds_op = gl.convert_layout(ds.to(dtype), op_layout)
        dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
        dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, p_op, ds_op])
        mbarrier.arrive(empty.index(slot), count=1)
    offs_k = k0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    rows = (kv_row - start_n + offs_k).to(gl.int64) * HEAD_DIM
    ok = (offs_k < n_k)[:, None]
    gl.store(DK + rows[:, None] + offs_d[None, :], (dk * sm_scale).to(dtype), mask=ok)
    gl.store(DV + rows[:, None] + offs_d[None, :], dv.to(dtype), mask=ok)


@gluon.jit
def _consumer1(descs, smem, bars, geom, qk_scale, CAUSAL: gl.constexpr):
    _consumer(descs, smem, bars, geom, qk_scale, CAUSAL, 1)


@gluon.jit
def _producer_w(descs, smem, bars, geom, qk_scale, CAUSAL: gl.constexpr):
    LD, q_row0, kv_row, n_q, lo, n_steps, steps_per_head, DK, DV, n_k, start_n, sm_scale = geom
    _producer(descs, smem, bars, (LD, q_row0, kv_row, n_q, lo, n_steps, steps_per_head), qk_scale, CAUSAL)


@gluon.jit
def _dkdv_gluon(q_desc, k_desc, v_desc, do_desc, LD, DK, DV, n_q, n_k, H, GROUP, qk_scale, sm_scale,
                HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                CAUSAL: gl.constexpr):  # fmt: skip
    start_n = gl.program_id(0) * BLOCK_N
    pid = gl.program_id(1)  # (batch, kv head)
    b = pid // (H // GROUP)
    h_kv = pid % (H // GROUP)
    kv_row = pid * n_k + start_n
    q_row0 = (b * H + h_kv * GROUP) * n_q  # the group's first head; head g of the group is g * n_q further
    if CAUSAL:  # query blocks before lo see none of these keys
        lo = gl.maximum(start_n - (n_k - n_q), 0) // BLOCK_M * BLOCK_M
    else:
        lo = start_n * 0
    steps_per_head = gl.cdiv(n_q - lo, BLOCK_M)
    n_steps = GROUP * steps_per_head
    dtype: gl.constexpr = q_desc.dtype
    HALF: gl.constexpr = BLOCK_N // 2
    k_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    row_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], row_smem)
    dl_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], row_smem)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups
    fence_async_shared()
    descs = (q_desc, k_desc, v_desc, do_desc)
    smem = (k_smem, v_smem, q_smem, do_smem, lse_smem, dl_smem)
    bars = (kv_bar, ready, empty)
    geom = (LD, q_row0, kv_row, n_q, lo, n_steps, steps_per_head, DK, DV, n_k, start_n, sm_scale)
    gl.warp_specialize([
        (_consumer, (descs, smem, bars, geom, qk_scale, CAUSAL, 0)),
        (_consumer1, (descs, smem, bars, geom, qk_scale, CAUSAL)),
        (_producer_w, (descs, smem, bars, geom, qk_scale, CAUSAL)),
    ], [4, 1], [240, 24])  # fmt: skip


# The dQ kernel the same way: one program owns 128 query rows of one head as two consumer warpgroups of
# 64 (Q, dO and each row's lse and delta loaded once); the producer streams K and V tiles of 64 keys.
# Per step: S = Q K^T and dP = dO V^T issued together, P while dP runs, then dQ += dS K.


@gluon.jit
def _dq_producer(descs, smem, bars, geom, qk_scale, CAUSAL: gl.constexpr):
    q_desc, k_desc, v_desc, do_desc = descs
    q_smem, do_smem, k_smem, v_smem = smem
    qd_bar, ready, empty = bars
    q_row, kv_row, n_q, n_k, start_m, n_steps, LD, DQ, sm_scale = geom
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    HALF: gl.constexpr = q_smem.type.shape[1]
    mbarrier.expect(qd_bar, 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes)
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [q_row + start_m + w * HALF, 0], qd_bar, q_smem.index(w))
        tma.async_copy_global_to_shared(do_desc, [q_row + start_m + w * HALF, 0], qd_bar, do_smem.index(w))
    for i in range(n_steps):
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), (i // STAGES & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + i * BLOCK_N, 0], bar, k_smem.index(slot))
        tma.async_copy_global_to_shared(v_desc, [kv_row + i * BLOCK_N, 0], bar, v_smem.index(slot))


@gluon.jit
def _dq_consumer(descs, smem, bars, geom, qk_scale, CAUSAL: gl.constexpr, WG: gl.constexpr):
    q_smem, do_smem, k_smem, v_smem = smem
    qd_bar, ready, empty = bars
    q_row, kv_row, n_q, n_k, start_m, n_steps, LD, DQ, sm_scale = geom
    dtype: gl.constexpr = q_smem.dtype
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    HALF: gl.constexpr = q_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    s_layout: gl.constexpr = _score_layout(BLOCK_N)
    acc_layout: gl.constexpr = _score_layout(HEAD_DIM)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    row0 = start_m + WG * HALF
    diag = n_k - n_q
    q_rows = row0 + gl.arange(0, HALF, layout=rows_layout)
    pairs = LD + (q_row + q_rows).to(gl.int64) * 2  # (lse, delta) of this warpgroup's rows
    lse = gl.load(pairs, mask=q_rows < n_q, other=float("inf"))
    dl = gl.load(pairs + 1, mask=q_rows < n_q, other=0.0)
    if CAUSAL:  # key blocks from here on cross the diagonal of some row
        unmasked = (row0 + diag + 1) // BLOCK_N * BLOCK_N
    else:
        unmasked = n_k // BLOCK_N * BLOCK_N
    q_t = q_smem.index(WG)
    do_t = do_smem.index(WG)
    dq = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
    s = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    dp = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(qd_bar, 0)
    for i in range(n_steps):
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), i // STAGES & 1)
        k_t = k_smem.index(slot)
        s_tok = warpgroup_mma(q_t, k_t.permute((1, 0)), s, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do_t, v_smem.index(slot).permute((1, 0)), dp, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        start_n = i * BLOCK_N
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        if start_n >= unmasked:  # a missing key, or one past the row's causal limit: P = 0
            keep = cols[None, :] < n_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= q_rows[:, None] + diag)
            p = gl.where(keep, gl.exp2(s * qk_scale - lse[:, None]), 0.0)
        else:
            p = gl.exp2(s * qk_scale - lse[:, None])
        dp = warpgroup_mma_wait(0, deps=[dp_tok])
        ds = p * (dp - dl[:, None])
        ds_op = gl.convert_layout(ds.to(dtype), op_layout)
        dq_tok = warpgroup_mma(ds_op, k_t, dq, is_async=True)
        dq, ds_op = warpgroup_mma_wait(0, deps=[dq_tok, ds_op])
        mbarrier.arrive(empty.index(slot), count=1)
    offs_m = row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    rows = (q_row + offs_m).to(gl.int64) * HEAD_DIM
    gl.store(DQ + rows[:, None] + offs_d[None, :], (dq * sm_scale).to(dtype), mask=(offs_m < n_q)[:, None])


@gluon.jit
def _dq_consumer1(descs, smem, bars, geom, qk_scale, CAUSAL: gl.constexpr):
    _dq_consumer(descs, smem, bars, geom, qk_scale, CAUSAL, 1)


@gluon.jit
def _dq_gluon(q_desc, k_desc, v_desc, do_desc, LD, DQ, n_q, n_k, H, GROUP, qk_scale, sm_scale,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr):  # fmt: skip
    pid_m = gl.program_id(0)
    if CAUSAL:  # heaviest query blocks first
        pid_m = gl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    pid_bh = gl.program_id(1)
    q_row = pid_bh * n_q  # this head's first row; the rows' (lse, delta) pairs are indexed the same way
    kv_row = (pid_bh // H * (H // GROUP) + pid_bh % H // GROUP) * n_k
    if CAUSAL:
        hi = gl.minimum(n_k, start_m + BLOCK_M + n_k - n_q)
    else:
        hi = n_k
    n_steps = gl.cdiv(hi, BLOCK_N)
    dtype: gl.constexpr = q_desc.dtype
    HALF: gl.constexpr = BLOCK_M // 2
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    qd_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(qd_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    fence_async_shared()
    descs = (q_desc, k_desc, v_desc, do_desc)
    smem = (q_smem, do_smem, k_smem, v_smem)
    bars = (qd_bar, ready, empty)
    geom = (q_row, kv_row, n_q, n_k, start_m, n_steps, LD, DQ, sm_scale)
    gl.warp_specialize([
        (_dq_consumer, (descs, smem, bars, geom, qk_scale, CAUSAL, 0)),
        (_dq_consumer1, (descs, smem, bars, geom, qk_scale, CAUSAL)),
        (_dq_producer, (descs, smem, bars, geom, qk_scale, CAUSAL)),
    ], [4, 1], [240, 24])  # fmt: skip


def gluon_dq(q, k, v, do, ld, causal, stages=3, dq=None, block_n=64):
    """dq of dense contiguous (B, H, N, D) q, do and (B, H_KV, N, D) k, v from the (lse, delta) pairs."""
    B, H, n_q, D = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    dq = torch.empty_like(q) if dq is None else dq
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_tile, kv_tile = [64, D], [block_n, D]
    q_layout = gl.NVMMASharedLayout.get_default_for(q_tile, dtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for(kv_tile, dtype)
    descs = [TensorDescriptor.from_tensor(t.view(-1, D), tile, lay)
             for t, tile, lay in ((q, q_tile, q_layout), (k, kv_tile, kv_layout), (v, kv_tile, kv_layout),
                                  (do, q_tile, q_layout))]  # fmt: skip
    grid = (triton.cdiv(n_q, 128), B * H)
    scale = D**-0.5
    _dq_gluon[grid](*descs, ld, dq, n_q, n_k, H, H // h_kv, scale * LOG2E, scale, D, 128, block_n, stages,
                    causal, num_warps=4, maxnreg=168)  # fmt: skip
    return dq


def gluon_dkdv(q, k, v, do, ld, causal, stages=2, dk=None, dv=None):
    """dk, dv of dense contiguous (B, H, N, D) q, do and (B, H_KV, N, D) k, v from the (lse, delta) pairs
    (into dk, dv when given)."""
    B, H, n_q, D = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    tile = [64, D]  # 64 query rows of Q and dO a step; each warpgroup's 64 keys of K and V
    layout = gl.NVMMASharedLayout.get_default_for(tile, dtype)
    descs = [TensorDescriptor.from_tensor(t.view(-1, D), tile, layout) for t in (q, k, v, do)]
    grid = (triton.cdiv(n_k, 128), B * h_kv)
    scale = D**-0.5
    _dkdv_gluon[grid](*descs, ld, dk, dv, n_q, n_k, H, H // h_kv, scale * LOG2E, scale, D, 64, 128, stages,
                      causal, num_warps=4, maxnreg=168)  # fmt: skip
    return dk, dv


@contextlib.contextmanager
def hooked_launch(hook):
    """Inside the block, 06's kernel launches go through hook(real_launch, kernel, kind, grid, *args,
    **meta)."""
    real = fa._launch
    fa._launch = functools.partial(hook, real)
    try:
        yield
    finally:
        fa._launch = real


def _gluon_launch(kinds, real, kernel, kind, grid, *args, **meta):
    q, k, v, do, ld = args[:5]
    dense = not meta["IS_VARLEN"] and meta["HEAD_DIM"] == 128
    dense = dense and all(t.is_contiguous() for t in (q, k, v, do))
    if kind == "dkdv" and kind in kinds and dense and not meta["ATOMIC_DQ"] and args[5].dtype == q.dtype:
        return gluon_dkdv(q, k, v, do, ld, meta["CAUSAL"], dk=args[5], dv=args[6])
    if kind == "dq" and kind in kinds and dense:
        return gluon_dq(q, k, v, do, ld, meta["CAUSAL"], dq=args[5])
    return real(kernel, kind, grid, *args, **meta)


@contextlib.contextmanager
def gluon_in_06(kinds=("dkdv",)):
    """06's tl backward with its dK/dV (and, with "dq" in kinds, its dQ) launch taken by this probe's
    Gluon kernels where they apply (dense, D = 128, contiguous, one dK/dV program per kv head's whole
    group, no atomic dQ): the whole backward timed the way 06's benchmark times it, against cuDNN's."""
    with fa.tl_kernels(), hooked_launch(functools.partial(_gluon_launch, kinds)):
        yield


def inputs(B, H, H_KV, N, D, causal, device, seed=0):
    """(q, k, v, dO, the (lse, delta) pairs), then (dk, dv, dq) from one run of 06's own tl backward
    (tl_kernels: since 09a5714 06 takes its Gluon kernels at D=128), which also records its dK/dV and dQ
    launches: kind -> a call that launches that kernel alone again, on the same arguments (with one
    dK/dV split, as the timed shapes get, the whole dK/dV)."""
    g = torch.Generator(device).manual_seed(seed)
    q = torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, H_KV, N, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    do = torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16, generator=g)
    o, lse = fa._fwd(q, k, v, None, B, N, N, causal, D**-0.5, False)
    launches = {}

    def record(real, kernel, kind, grid, *args, **meta):
        launches[kind] = functools.partial(real, kernel, kind, grid, *args, **meta)
        return real(kernel, kind, grid, *args, **meta)

    with fa.tl_kernels(), hooked_launch(record):
        dq, dk, dv = fa._bwd(do, q, k, v, o, lse, None, B, N, N, causal, D**-0.5, False)
    ld = launches["dkdv"].args[7]  # after _launch's kernel, kind, grid: q, k, v, dO, then the pairs
    return (q, k, v, do, ld), (dk, dv, dq), launches


def time_kernels(args, causal, launches, device) -> str:
    """Each backward kernel alone, 06's and the Gluon one with 2 and 3 stages, per matmul it does."""
    out = []
    for name, kind, n_mm, gluon_fn in (("dK/dV", "dkdv", 4, gluon_dkdv), ("dQ", "dq", 3, gluon_dq)):
        t06 = harness.bench(launches[kind], device, graph=True) / n_mm
        row = f"{name} 06 {t06 * 1e3:.0f}"
        for stages in (2, 3):
            t = harness.bench(functools.partial(gluon_fn, *args, causal, stages), device, graph=True) / n_mm
            row += f", gluon {stages} stages {t * 1e3:.0f} (x{t06 / t:.2f})"
        out.append(row)
    return "; ".join(out)


def main():
    device = torch.device("cuda")
    t0 = time.time()
    print(harness.env_line(device, torch.bfloat16), flush=True)
    checks = [(1, 2, 2, 256, False), (2, 4, 2, 1000, True), (1, 8, 2, 513, False), (1, 2, 1, 77, True)]
    for B, H, H_KV, N, causal in checks:
        args, ref, _ = inputs(B, H, H_KV, N, 128, causal, device)
        print("check", (B, H, H_KV, N, causal), end=" ", flush=True)
        faulthandler.dump_traceback_later(60, exit=True)  # a barrier waited on forever ends the run
        got = (*gluon_dkdv(*args, causal), gluon_dq(*args, causal))
        torch.cuda.synchronize()
        faulthandler.cancel_dump_traceback_later()
        errs = [harness.rel_err(a, b) for a, b in zip(got, ref, strict=True)]
        verdict = "ok" if max(errs) < 1e-2 else "FAILED"
        print("dk, dv, dq vs 06: " + " ".join(f"{e:.1e}" for e in errs), verdict, flush=True)
    shapes = [(4, 16, 16, 4096, False), (4, 16, 16, 4096, True), (2, 32, 8, 8192, False),
              (2, 32, 8, 8192, True), (1, 16, 16, 16384, True)]  # fmt: skip
    for B, H, H_KV, N, causal in shapes:
        args, _, launches = inputs(B, H, H_KV, N, 128, causal, device)
        q, k, v, do, _ = args
        matmul = 2 * B * H * N * N * 128 * (0.5 if causal else 1.0)  # one of the backward's matmuls
        faulthandler.dump_traceback_later(120 + 60 * ROUNDS, exit=True)
        row = f"{(B, H, H_KV, N, causal)} us a matmul: " + time_kernels(args, causal, launches, device)
        print(row, f"[{time.time() - t0:.0f} s]", flush=True)
        # the whole backward, as 06's benchmark times it (graph replay of autograd.grad, L2 flushed), the
        # variants interleaved over ROUNDS rounds so that a clock drifting through the run (power, heat)
        # lands on all of them alike; the median round is reported
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        impls = fa._impls(causal)
        bwd_flops = 5 * matmul
        times = {}
        variants = [("cudnn", impls["cudnn"][1]), ("06 tl", fa.tl_kernels),
                    ("06 tl + gluon dK/dV", gluon_in_06),
                    ("06 tl + gluon dQ", lambda: gluon_in_06(("dq",))),
                    ("06 tl + gluon dK/dV, dQ", lambda: gluon_in_06(("dkdv", "dq"))),
                    ("06 default", None)]  # fmt: skip
        for r in range(ROUNDS):
            for name, ctx in variants:
                fn = impls["cudnn" if name == "cudnn" else "ours"][0]
                times.setdefault(name, []).append(fa._time(fn, ctx, qg, kg, vg, do, device)[1])
            got = ", ".join(f"{n} {bwd_flops / t[-1] / 1e9:.0f}" for n, t in times.items())
            print(f"   round {r}: {got}", flush=True)
        faulthandler.cancel_dump_traceback_later()
        med = {n: statistics.median(t) for n, t in times.items()}
        c = med["cudnn"]
        got = ", ".join(f"{n} {bwd_flops / t / 1e9:.0f} (x{c / t:.2f} cuDNN)" for n, t in med.items())
        print(f"   backward TFLOP/s (median round): {got}", flush=True)


if __name__ == "__main__":
    main()
