"""H200 probe (issue 19, session 13): can the fused backward (06's deterministic=False at D=128, 5 matmuls a
block pair) be bitwise repeatable? Its dQ tiles are added into one fp32 buffer by TMA reduce-adds from
every key block's program, in whatever order the programs get there, so dQ's last bits vary from run to
run; 06's default stays with two kernels (7 matmuls) to be repeatable, at 0.83-0.90x cuDNN on D=128 MHA
(results/06_flash.json, 010f9fe) against the fused kernel's 0.92-1.04x.

FlashAttention-3's deterministic backward fixes the order instead: a counter per (query head, query
block) in global memory; the writer of key block j waits until the counter says the blocks before it in
the order have added, adds, and increments it. The order follows the one in which the programs arrive
anyway, so the waits are short: causal, a key block's program starts at its diagonal, so for query block
m the program of the last key block that sees m arrives first (order: descending j); without a mask all
start at query block 0 together (order: ascending j, and the programs of one head run skewed by a step
each: the cost to measure). Here 06's fused kernel is copied with one change, its writer warp
(_det_writer): before a step's two reduce-adds it spins on the counter (an acquire load by atomic add of
0), after them it waits until the copy engine has read the tiles (as 06's writer does, and as
FlashAttention-3's store_dq does before its release), then until the adds have completed, and adds 1
with release semantics. The consumer
warpgroups and the producer warp are 06's own. Whole groups only (no PARTIAL shares), causal needs
Nq == Nk (06's rule), and the causal order assumes every key block program of a head fits on the GPU
at once (N / 128 <= the resident programs, 132 on an H200), else a program could wait on one not yet
launched.

The run: checks against 06's deterministic=False (MHA and GQA, causal and not, ragged N), each with dQ
computed REPEATS times and compared bit for bit; then the whole backward (06's benchmark method) for
cuDNN, 06's default, 06's deterministic=False and this one, interleaved over ROUNDS rounds.
Session 13 on the H200 (ROUNDS=1, REPEATS=3; notes/logs/flash_bwd_det_fused_41a9be4_h200.log): the 4
checks ok, dQ bitwise equal over the repeats; against 06's default (7 matmuls) 1.06x at MHA causal 4k,
1.03x GQA 32/8 causal 8k, 0.97x MHA full 4k; against 06's unordered fused kernel 0.83-0.94x.
Since then (compiled offline, not run): the ".read" variant (WAIT_FULL=False) and, without a mask, the
shifted walk (SHIFT, _shift_producer), each checked and timed beside (MODES).
GPU only:  python -u notes/probes/flash_bwd_det_fused.py   (ROUNDS=2, REPEATS=5 by default)
Offline:   python notes/probes/flash_bwd_det_fused.py --compile   (Triton 3.6; see flash_ptxas.py)"""

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
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma  # noqa: E402

fa = harness.load_build("06_flash")
ROUNDS = int(os.environ.get("ROUNDS", "2"))
REPEATS = int(os.environ.get("REPEATS", "5"))


@gluon.jit
def _spin_until(lock, value):
    """Every lane reloads the int32 at lock (acquire, GPU scope) until it equals value. In PTX: a while loop
    of atomic adds of 0 here made ptxas spill in the consumer warpgroups' loop (11 reloads a pass)."""
    gl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 v; SPIN: ld.acquire.gpu.global.u32 v, [$1]; setp.ne.u32 p, v, $2; "
        "@p bra SPIN; mov.u32 $0, v; }",
        "=r,l,r", [lock, value], gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _adds_done(lock):
    """Wait until this thread's bulk copies have completed, their writes too (tma.store_wait waits only
    until they have been read: cp.async.bulk.wait_group.read), order the copy engine's global writes
    before what follows (fence.proxy.async.global) and sync the warp, so that the release after it
    publishes the adds. lock is only an operand the asm needs."""
    gl.inline_asm_elementwise(
        "{ cp.async.bulk.wait_group 0; fence.proxy.async.global; bar.warp.sync -1; mov.u32 $0, 0; }",
        "=r,l", [lock], gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _det_writer(descs, smem, bars, geom, dq_io, SEM, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                WAIT_FULL: gl.constexpr, SHIFT: gl.constexpr):  # fmt: skip
    """06's _gb_dq_writer, each step's adds ordered by the step's (query head, query block) counter.
    WAIT_FULL=False releases after the .read wait alone, as FlashAttention-3's store_dq does. SHIFT
    (without a mask): key block j's program walks the query blocks from block j on, wrapping round
    (_shift_producer), so for query block m the programs arrive j = m, m - 1, ..., 0, then the last
    key block down to m + 1, one step apart: rank (min(m, NB - 1) - j) mod NB for NB key blocks (NB <=
    the query blocks, so no two programs start on the same block)."""
    LD, q_head0, kv_head, n_q, lo, n_steps, steps_per_head, DK, DV, n_k, start_n, sm_scale = geom
    ds_smem, ds_bar, dq_desc, dq_smem, dq_full, dq_empty = dq_io
    BLOCK_M: gl.constexpr = dq_smem.type.shape[1]
    HALF_D: gl.constexpr = dq_smem.type.shape[2]
    jb = start_n // BLOCK_N
    n_mblocks = gl.cdiv(n_q, BLOCK_M)
    n_kblocks = gl.cdiv(n_k, BLOCK_N)
    for i in range(n_steps):
        head = q_head0 + i // steps_per_head
        if SHIFT:
            m = (i % steps_per_head + jb) % steps_per_head
            rank = (gl.minimum(m, n_kblocks - 1) - jb + n_kblocks) % n_kblocks
        elif CAUSAL:  # descending: the last key block that sees query block m first
            m = lo // BLOCK_M + i % steps_per_head
            rank = gl.minimum(n_kblocks, gl.cdiv((m + 1) * BLOCK_M + n_k - n_q, BLOCK_N)) - 1 - jb
        else:
            m = i % steps_per_head
            rank = jb
        lock = SEM + head * n_mblocks + m
        _spin_until(lock, rank)
        for w in gl.static_range(2):
            mbarrier.wait(dq_full.index(w), i & 1)
            fa._tma_reduce_add(dq_desc, [head * n_q + m * BLOCK_M, w * HALF_D], dq_smem.index(w))
            tma.store_wait(0)
            mbarrier.arrive(dq_empty.index(w), count=1)
        if WAIT_FULL:
            _adds_done(lock)
        gl.atomic_add(lock, 1, sem="release")


@gluon.jit
def _shift_producer(descs, smem, bars, geom):
    """06's _gb_dkdv_producer (without a mask) with each head's query blocks walked from block j on, j
    the program's key block, wrapping round."""
    q_desc, k_desc, v_desc, do_desc = descs
    k_smem, v_smem, q_smem, do_smem, lse_smem, dl_smem = smem
    kv_bar, ready, empty = bars
    LD, q_head0, kv_head, n_q, lo, n_steps, steps_per_head, DK, DV, n_k, start_n, sm_scale = geom
    STAGES: gl.constexpr = q_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    HALF: gl.constexpr = k_smem.type.shape[1]
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for w in gl.static_range(2):
        fa._g_load(k_desc, start_n + w * HALF, kv_head, kv_bar, k_smem.index(w))
        fa._g_load(v_desc, start_n + w * HALF, kv_head, kv_bar, v_smem.index(w))
    rows_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    jb = start_n // (2 * HALF)
    for i in range(n_steps):
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), (i // STAGES & 1) ^ 1)
        start_m = (i % steps_per_head + jb) % steps_per_head * BLOCK_M
        head = q_head0 + i // steps_per_head
        rows = start_m + gl.arange(0, BLOCK_M, layout=rows_layout)
        pairs = LD + (head * n_q + rows).to(gl.int64) * 2
        lse_smem.index(slot).store(gl.load(pairs, mask=rows < n_q, other=float("inf")))
        dl_smem.index(slot).store(gl.load(pairs + 1, mask=rows < n_q, other=0.0))
        bar = ready.index(slot)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        fa._g_load(q_desc, start_m, head, bar, q_smem.index(slot))
        fa._g_load(do_desc, start_m, head, bar, do_smem.index(slot))


@gluon.jit
def _bwd_det(q_desc, k_desc, v_desc, do_desc, dq_desc, LD, DK, DV, n_q, n_k, H, GROUP, qk_scale, sm_scale,
             SEM, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             CAUSAL: gl.constexpr, WAIT_FULL: gl.constexpr, SHIFT: gl.constexpr,
             REVERSE: gl.constexpr):  # fmt: skip
    """06's _bwd_dkdv_gluon with FUSED and without PARTIAL, its writer warp _det_writer. REVERSE
    (causal): the last key block's program first, so that every program waits only on programs
    launched before it (no deadlock however few programs are resident), the lightest first."""
    if REVERSE:
        start_n = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_N
    else:
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
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    descs = (q_desc, k_desc, v_desc, do_desc)
    smem = (k_smem, v_smem, q_smem, do_smem, lse_smem, dl_smem)
    bars = (kv_bar, ready, empty)
    geom = (LD, q_head0, pid, n_q, lo, n_steps, steps_per_head, DK, DV, n_k, start_n, sm_scale)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, HEAD_DIM // 2], dq_desc.layout)
    ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(ds_bar.index(i), count=2)
        mbarrier.init(dq_full.index(i), count=1)
        mbarrier.init(dq_empty.index(i), count=1)
    fence_async_shared()
    dq_io = (ds_smem, ds_bar, dq_desc, dq_smem, dq_full, dq_empty)
    writer = (descs, smem, bars, geom, dq_io, SEM, BLOCK_N, CAUSAL, WAIT_FULL, SHIFT)
    if SHIFT:  # 06's consumers use the step's query block only for the causal mask: they need no change
        gl.warp_specialize([
            (fa._gb_dkdv_consumer, (descs, smem, bars, geom, dq_io, qk_scale, CAUSAL, True, 0)),
            (fa._gb_dkdv_consumer1, (descs, smem, bars, geom, dq_io, qk_scale, CAUSAL, True)),
            (_shift_producer, (descs, smem, bars, geom)),
            (_det_writer, writer),
        ], [4, 1, 1], [240, 24, 24])  # fmt: skip
    else:
        gl.warp_specialize([
            (fa._gb_dkdv_consumer, (descs, smem, bars, geom, dq_io, qk_scale, CAUSAL, True, 0)),
            (fa._gb_dkdv_consumer1, (descs, smem, bars, geom, dq_io, qk_scale, CAUSAL, True)),
            (fa._gb_dkdv_producer, (descs, smem, bars, geom)),
            (_det_writer, writer),
        ], [4, 1, 1], [240, 24, 24])  # fmt: skip


TAKEN = []  # one entry per backward this kernel ran: the checks say whether it ran at all


def det_dkdv(descs, ld, dk, dv, q, k, causal, sm_scale, dq=None, splits=1, kernel=_bwd_det):
    """Stands in for 06's _dkdv_gluon: the ordered kernel where 06 would launch its fused one whole."""
    if dq is None or splits != 1:
        return REAL(descs, ld, dk, dv, q, k, causal, sm_scale, dq, splits)
    TAKEN.append((tuple(q.shape), k.shape[1], causal))
    B, H, n_q, D = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    bm, bn = fa.GLUON_BWD["TILE"], fa.GLUON_BWD["BLOCK"]
    sem = torch.zeros(B * H, triton.cdiv(n_q, bm), device=q.device, dtype=torch.int32)
    shift = WAIT["shift"] and not causal  # causal programs start at their diagonals anyway
    reverse = WAIT["reverse"] and causal
    if shift and triton.cdiv(n_k, bn) > triton.cdiv(n_q, bm):
        raise ValueError("the shifted walk needs no more key blocks than query blocks")
    dq_desc = fa._gluon_desc(dq.view(-1, D), [bm, D // 2])
    kernel[(triton.cdiv(n_k, bn), B * h_kv)](
        *descs, dq_desc, ld, dk, dv, n_q, n_k, H, H // h_kv, sm_scale * fa.LOG2E, sm_scale, sem, D, bm, bn,
        fa.GLUON_BWD["DKDV_STAGES"], causal, WAIT["full"], shift, reverse, num_warps=4,
        maxnreg=168)  # fmt: skip


REAL = fa._dkdv_gluon
MODES = {
    "ordered": (True, False, False),
    "ordered rev": (True, False, True),
    "ordered .read": (False, False, False),
    "ordered .read shift": (False, True, False),
    "ordered .read rev": (False, False, True),
}  # (WAIT_FULL, SHIFT, REVERSE)
WAIT = {"full": True, "shift": False, "reverse": False}  # the kernel's WAIT_FULL, SHIFT and REVERSE


@contextlib.contextmanager
def ordered(wait_full=True, shift=False, reverse=False):
    """06's deterministic=False takes the ordered kernel wherever it would take its fused one whole."""
    fa._dkdv_gluon, WAIT["full"], WAIT["shift"], WAIT["reverse"] = det_dkdv, wait_full, shift, reverse
    try:
        yield
    finally:
        fa._dkdv_gluon, WAIT["full"], WAIT["shift"], WAIT["reverse"] = REAL, True, False, False


def compile_only():
    """Compile the kernel for sm_90a without a GPU (flash_ptxas.py's way): registers, spills, shared memory
    and the loops' SASS, bf16, causal and not."""
    import flash_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    class Launch:  # stands in for _bwd_det[grid]: compiles the launch's specialisation, runs nothing
        def __getitem__(self, grid):
            def call(*args, **meta):
                backend, fn = flash_ptxas.BACKEND, _bwd_det
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
                dump = Path(os.environ["DUMP"]) if "DUMP" in os.environ else None
                print(flash_ptxas.ptxas_report(asm, dump, "det_" + "_".join(map(str, args[-3:])), loops=True))

            return call

    for causal, (mode, (wait_full, shift, reverse)) in itertools.product((False, True), MODES.items()):
        if (shift and causal) or (reverse and not causal):
            continue
        q, k = (torch.empty(1, h, 1000, 128, dtype=torch.bfloat16) for h in (4, 2))
        descs, ld = fa._gluon_bwd_descs(q, k, k, q), torch.empty(1, 4, 1000, 2)
        print(f"ordered fused, bf16, {'causal' if causal else 'full'}, {mode}:", flush=True)
        dk, dq = torch.empty_like(k), torch.zeros(q.shape)
        WAIT["full"], WAIT["shift"], WAIT["reverse"] = wait_full, shift, reverse
        det_dkdv(descs, ld, dk, dk, q, k, causal, 0.1, dq, 1, Launch())


def main():
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    shapes = [(2, 4, 4, 1000, True), (1, 8, 2, 513, False), (2, 4, 2, 777, True), (1, 2, 1, 77, False)]
    for (mode, (wait_full, shift, reverse)), shape in itertools.product(MODES.items(), shapes):
        B, H, H_KV, N, causal = shape
        if (shift and causal) or (reverse and not causal):
            continue
        q, do = (torch.randn(B, H, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(B, H_KV, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with fa.fixed_dkdv_splits(1):
            ref = torch.autograd.grad(fa.flash_attention(q, k, v, causal, deterministic=False), (q, k, v), do)
            faulthandler.dump_traceback_later(60, exit=True)  # a counter waited on forever ends the run
            with ordered(wait_full, shift, reverse):
                out = [fa.flash_attention(q, k, v, causal, deterministic=False) for _ in range(REPEATS)]
                runs = [torch.autograd.grad(o, (q, k, v), do) for o in out]
            torch.cuda.synchronize()
            faulthandler.cancel_dump_traceback_later()
        errs = [harness.rel_err(a, b) for a, b in zip(runs[0], ref, strict=True)]
        same = all(torch.equal(r[0], runs[0][0]) for r in runs)
        verdict = "ok" if max(errs) < 1e-2 and same and TAKEN else "FAILED" if TAKEN else "NOT TAKEN"
        TAKEN.clear()
        got = " ".join(f"{e:.1e}" for e in errs)
        print(f"check {mode} {(B, H, H_KV, N, causal)}: dq, dk, dv vs 06's fused {got}; dq bitwise equal "
              f"over {REPEATS} runs: {same} {verdict}", flush=True)  # fmt: skip
    for B, H, H_KV, N, causal in [
        (4, 16, 16, 4096, True),
        (4, 16, 16, 4096, False),
        (2, 32, 8, 8192, True),
        (1, 16, 16, 16384, True),
        (2, 32, 8, 8192, False),
    ]:
        q, do = (torch.randn(B, H, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(B, H_KV, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        impls = fa._impls(causal)
        flops = 5 * 2 * B * H * N * N * 128 * (0.5 if causal else 1.0)
        runs = [("cudnn", *impls["cudnn"]), ("06", *impls["ours"]), ("06 fused", *impls["ours_atomic"]),
                *[(mode, impls["ours_atomic"][0], functools.partial(ordered, *m)) for mode, m in MODES.items()
                  if not (causal and m[1]) and not (m[2] and not causal)]]  # fmt: skip
        times = {}
        faulthandler.dump_traceback_later(60 + 60 * ROUNDS, exit=True)
        for r in range(ROUNDS):
            for name, fn, ctx in runs:
                times.setdefault(name, []).append(fa._time(fn, ctx, q, k, v, do, device)[1])
            print(f"{(B, H, H_KV, N, causal)} round {r}: " + ", ".join(
                f"{n} {flops / t[-1] / 1e9:.0f}" for n, t in times.items()), flush=True)  # fmt: skip
        faulthandler.cancel_dump_traceback_later()
        med = {n: statistics.median(t) for n, t in times.items()}
        got = ", ".join(f"{n} {flops / t / 1e9:.0f} (x{med['cudnn'] / t:.2f} cuDNN)" for n, t in med.items())
        print(f"{(B, H, H_KV, N, causal)} backward TFLOP/s, median round: {got}", flush=True)


if __name__ == "__main__":
    compile_only() if "--compile" in sys.argv else main()
