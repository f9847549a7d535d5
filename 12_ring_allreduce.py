r"""Ring all-reduce from point-to-point sends and receives: the collective behind data-parallel training.

After every backward pass, data-parallel training sums each gradient over all ranks: an all-reduce.
Its cost grows with the model, not the batch, so at scale it is the step's largest communication.
This file builds the bandwidth-optimal ring algorithm (reduce-scatter, then all-gather, around a
ring of ranks) from `torch.distributed` isend/irecv, checks it against a float64 sum on every rank,
and measures it against `dist.all_reduce` (gloo on CPU here; NCCL when two or more GPUs are visible),
then evaluates the cost model for rank counts no single machine has.

You will learn:
  - reduce-scatter + all-gather: each rank sends and receives 2(n-1)/n of the data, the minimum
    (fp32; bf16 and fp16 send their reduce-scatter in fp32, so 3(n-1)/n of their bytes);
  - the alpha-beta cost model t = 2(n-1) * alpha + 2(n-1)/n * S/B and what it predicts at scale;
  - pipelining: chunks so that sending, receiving and adding overlap;
  - bf16 gradients summed in fp32 (rounded once, at the end), and any length over any world size;
  - algorithm vs bus bandwidth (nccl-tests' definitions) and why NCCL switches to trees.

Builds on: harness.py (checks, results).

Does not handle:
  - reduction ops other than sum; dtypes other than fp32, bf16 and fp16;
  - several concurrent rings (NCCL's channels), hierarchical (intra-node then inter-node) rings,
    in-network reduction (NVLink SHARP, InfiniBand SHARP);
  - non-contiguous tensors (it receives into slices of the tensor; it says so and stops).

References: Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations"
(JPDC 2009); Thakur, Rabenseifner & Gropp, "Optimization of collective communication operations in
MPICH" (IJHPCA 2005); Baidu's `baidu-allreduce` (the ring in deep learning); NCCL and nccl-tests'
PERFORMANCE.md (algbw, busbw); Sanders, Speck & Träff, "Two-tree algorithms for full bandwidth
broadcast, reduction and scan" (2009), the double binary tree NCCL 2.4 adopted.

Run:
  python 12_ring_allreduce.py                   # NCCL over all GPUs when >= 2, else 4 gloo CPU processes
  python 12_ring_allreduce.py --quick           # small messages only
  python 12_ring_allreduce.py --world-size 3    # gloo with 3 processes
  python 12_ring_allreduce.py --backend gloo    # gloo on CPU even where GPUs are visible

Symbols: n ranks (world size), r this rank, S message bytes, B link bandwidth per direction (bytes/s),
alpha per-message latency, C pipeline chunks per segment, N elements.
"""

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import harness  # first: sets TRITON_INTERPRET=1 when there is no GPU

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# %% [markdown]
# ## Config


@dataclass
class Config:
    backend: str = "gloo"  # gloo (CPU tensors) or nccl (one GPU per process)
    world_size: int = 4  # processes; with NCCL, the number of visible GPUs
    bench: bool = True
    seed: int = 0
    min_bytes: int = 1 << 10  # 1 KB: latency-bound
    max_bytes: int = 256 << 20  # 256 MB on CPU (a large model's gradient bucket is 25-100 MB); 1 GB on GPU
    time_per_size: float = 1.5  # seconds of timed repetitions per size and implementation (cap)
    chunk_bytes: int = 1 << 20  # pipeline chunk: small enough to overlap, large enough to amortise alpha
    max_chunks: int = 16  # per segment; more chunks = more messages = more alpha
    dtype: torch.dtype = torch.float32  # of the benchmark's messages (the checks cover fp32 and bf16)


ACCEPTED = (torch.float32, torch.bfloat16, torch.float16)


# %% [markdown]
# ## The ring, and why it is bandwidth-optimal
#
# Cut the N elements into n segments (sizes differ by at most one, so any N works). Ranks form a
# ring r -> r + 1. Reduce-scatter: in step s = 0 .. n-2, rank r sends segment (r - s) mod n to its
# successor and receives segment (r - s - 1) mod n from its predecessor, adding it to its own copy.
# Each segment travels n - 1 hops collecting one addend per hop, so after n - 1 steps rank r holds
# the complete sum of segment (r + 1) mod n. All-gather: n - 1 more steps pass the finished segments
# around the ring, each rank overwriting its copy.
#
#     rank 0: a0 b0 c0        step 0: 0 sends a0 -> 1, 1 sends b1 -> 2, 2 sends c2 -> 0
#     rank 1: a1 b1 c1        step 1: 1 sends (a0+a1) -> 2, 2 sends (b1+b2) -> 0, 0 sends (c2+c0) -> 1
#     rank 2: a2 b2 c2        now rank 2 owns a0+a1+a2, rank 0 owns b, rank 1 owns c; all-gather
#
# Cost: 2(n - 1) steps, each moving S/n bytes over every link at once. With per-message latency
# alpha and per-direction link bandwidth B (the alpha-beta model):
#
#     t_ring = 2(n-1) * alpha + 2(n-1)/n * S/B
#
# Bandwidth-optimal: every rank must receive, from the others, (n-1)/n of the data to reduce its
# share and (n-1)/n again to learn the other shares, so 2(n-1)/n * S/B is a lower bound on any
# algorithm whose ranks each have one link of bandwidth B in and out; the ring meets it, and every
# link carries each byte of a segment exactly once per phase. The bandwidth term barely grows with n
# (it tends to 2 S/B); the latency term grows linearly. nccl-tests reports bus bandwidth
# busbw = algbw * 2(n-1)/n with algbw = S/t, so a bandwidth-optimal all-reduce shows busbw = B for
# any n: the number to compare with a link's speed.
#
# When the ring loses: small messages, or many ranks. At S = 1 KB and n = 1024 the ring pays 2046
# latencies. A tree (reduce up, broadcast down, pipelined) pays about 2 log2(n) latencies and moves
# about 2 S/B per rank (a node sends its subtree's partial sums up and the result down; NCCL's double
# binary tree balances this so each rank sends ~S per phase), so t_tree ~ 2 log2(n) alpha + 2 S/B.
# Recursive halving-doubling (Rabenseifner; MPI's choice for power-of-two n) reaches the ring's
# bandwidth term with 2 log2(n) latencies, but its partners are far apart, which a real network's
# topology punishes. NCCL picks an algorithm (ring, tree, NVLS, CollNet) and a protocol (LL, LL128,
# Simple) per call from a tuning model like this one: for each pair it predicts latency + S / bw
# from per-algorithm latencies and bandwidths of the detected topology, and takes the fastest.
# In practice: trees for small messages across many nodes, rings for large messages, NVLS (NVLink
# SHARP, in-switch reduction) on NVSwitch systems when allowed. NCCL_ALGO / NCCL_PROTO override it.
#
# Pipelining: each segment is cut into C chunks, and each chunk is an isend to the successor paired
# with an irecv from the predecessor (batch_isend_irecv: on NCCL the pair must run as one group, or
# every rank's send would wait for a receive queued behind it). All C pairs of a step are posted at
# once; the add of chunk c runs while chunks c+1.. are still on the wire.


def _bounds(length: int, parts: int) -> list[int]:
    """Offsets of `parts` near-equal pieces of [0, length): the first length % parts get one more.

    _bounds(7, 3) -> [0, 3, 5, 7] (pieces of 3, 2, 2); _bounds(1, 4) -> [0, 1, 1, 1, 1]
    """
    q, rem = divmod(length, parts)
    return [i * q + min(i, rem) for i in range(parts + 1)]


def _num_chunks(longest: int, chunk_bytes: int, max_chunks: int) -> int:
    """Pipeline chunks per segment: the longest segment in fp32 cut into chunk_bytes, 1 .. max_chunks."""
    return max(1, min(max_chunks, math.ceil(longest * 4 / chunk_bytes)))


def _check_input(tensor, group):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"ring_allreduce expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in ACCEPTED:
        raise TypeError(f"ring_allreduce: dtype {tensor.dtype} is not supported; accepted: float32, "
                        "bfloat16, float16 (summed in float32)")  # fmt: skip
    if not tensor.is_contiguous():
        raise ValueError("ring_allreduce needs a contiguous tensor (it receives into slices of it); pass "
                         "t.contiguous() and copy the result back with t.copy_(...)")  # fmt: skip
    if not dist.is_initialized():
        raise RuntimeError("ring_allreduce: torch.distributed is not initialized; call init_process_group")
    if dist.get_rank(group) < 0:
        raise ValueError("ring_allreduce: this process is not a member of the group")
    if dist.get_backend(group) == "nccl" and not tensor.is_cuda:
        raise ValueError("ring_allreduce: the NCCL backend needs a CUDA tensor on this rank's GPU")


def _exchange(send, recv, nxt, prv, group, tag):
    """Post one send to the successor and one receive from the predecessor as one group; skip empties."""
    ops = []
    if send.numel():
        ops.append(dist.P2POp(dist.isend, send, nxt, group, tag))
    if recv.numel():
        ops.append(dist.P2POp(dist.irecv, recv, prv, group, tag))
    works = dist.batch_isend_irecv(ops) if ops else []
    send_work = works[0] if send.numel() else None
    return send_work, works[-1] if recv.numel() else None


def ring_allreduce(tensor: torch.Tensor, group=None, chunk_bytes: int = 1 << 20, max_chunks: int = 16):
    """Sum `tensor` over the ranks of `group` in place (every rank ends with the same bits); return it.

    fp32 in place; bf16/fp16 summed in an fp32 copy, rounded once. World size 1: returned unchanged.
    """
    _check_input(tensor, group)
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if n == 1:
        return tensor  # the sum over one rank is the tensor itself
    to_global = (lambda i: dist.get_global_rank(group, i)) if group is not None else (lambda i: i)
    nxt, prv = to_global((r + 1) % n), to_global((r - 1) % n)
    flat = tensor.view(-1)
    acc = flat if flat.dtype == torch.float32 else flat.float()  # the fp32 accumulator
    seg = _bounds(flat.numel(), n)  # segment k is [seg[k], seg[k + 1])
    longest = seg[1] - seg[0]
    C = _num_chunks(longest, chunk_bytes, max_chunks)  # same on every rank
    # chunk c of segment k, as offsets relative to the segment's start
    chunks = [_bounds(seg[k + 1] - seg[k], C) for k in range(n)]
    buf = torch.empty(longest, dtype=torch.float32, device=flat.device)

    # Reduce-scatter: n - 1 steps; step s sends segment (r - s) and receives-and-adds (r - s - 1).
    for s in range(n - 1):
        ks, kr = (r - s) % n, (r - s - 1) % n
        pending, works = [], []
        for c in range(C):
            (a, b), (a2, b2) = chunks[ks][c : c + 2], chunks[kr][c : c + 2]
            send, recv = _exchange(acc[seg[ks] + a : seg[ks] + b], buf[a2:b2], nxt, prv, group, c)
            pending.append((recv, a2, b2))
            works.append(send)
        for recv, a2, b2 in pending:
            if recv is not None:
                recv.wait()  # then add this chunk while later chunks are still arriving
                acc[seg[kr] + a2 : seg[kr] + b2] += buf[a2:b2]
        for w in works:
            if w is not None:
                w.wait()  # each work is waited once (gloo hangs on a second wait)

    # Rank r now owns the full sum of segment (r + 1) % n. Round it once to the tensor's dtype.
    own = (r + 1) % n
    if acc is not flat:
        flat[seg[own] : seg[own + 1]] = acc[seg[own] : seg[own + 1]]
    # All-gather: step s forwards segment (r + 1 - s), receiving (r - s) straight into the tensor.
    for s in range(n - 1):
        ks, kr = (r + 1 - s) % n, (r - s) % n
        works = []
        for c in range(C):
            (a, b), (a2, b2) = chunks[ks][c : c + 2], chunks[kr][c : c + 2]
            works += _exchange(flat[seg[ks] + a : seg[ks] + b], flat[seg[kr] + a2 : seg[kr] + b2],
                               nxt, prv, group, C + c)  # fmt: skip
        for w in works:
            if w is not None:
                w.wait()
    return tensor


# %% [markdown]
# ## Checks
#
# Every check runs on every rank at once (a collective), and fails on all of them if it failed on
# any. Sums: each rank of a group of size n (2, 3, 4 carved out of the launched world with
# dist.new_group) holds x_r, random and fresh; after ring_allreduce every rank must hold the float64
# sum of all x_r, bit-identical across ranks, and match dist.all_reduce (the outside reference).
# Lengths 1 and 7 leave segments empty or uneven; 1000003 is prime. Chunking: the benchmark's
# chunk_bytes, and one-element chunks (4 bytes) that force C = max_chunks on the longer lengths
# (N = 61 over 4 ranks: segments of 16 and 15, so one segment has an empty chunk).
#
# How close is "the float64 sum"? Elementwise, not a relative-norm tolerance: a ring summing n
# values in fp32 errs by at most gamma = (n-1) u / (1 - (n-1) u), u = 2^-24, times sum_r |x_r| (the
# bound for recursive summation; Higham, "Accuracy and Stability of Numerical Algorithms", 4.2),
# so the fp32 result lies in [s - e, s + e] with s the float64 sum and e = gamma * sum_r |x_r|, and
# bf16 rounded once from it lies in [round(s - e), round(s + e)]. In bf16 nearly every element is then
# bit-exact to s rounded once (each check line counts those that are not; fp32 results, rounded at
# every add, often differ in the last bit); a ring that adds in bf16 (error ~2^-9 per add) fails by
# far from n = 3 (for n = 2 one bf16 add is the sum rounded once). It is not always bit-exact:
# where the x_r cancel, fp32's error is large next to |s| (seed 3, n = 4, N = 1000003 has one such
# element in bf16). The reference rounds float64 to bf16 itself (_round_bf16): torch's own
# conversion goes through float32, rounding twice.


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 -> nearest bf16 value (ties to even), rounded once, as float64 (normal numbers)."""
    _, e = torch.frexp(x)  # x = m 2^e, 0.5 <= |m| < 1: bf16's 8 significant bits end at 2^(e-8)
    ulp = torch.ldexp(torch.ones_like(x), e - 8)
    return torch.round(x / ulp) * ulp  # torch.round: half to even; exact in float64


def _judge_sum(ours: torch.Tensor, xs: list[torch.Tensor]) -> int:
    """Raise unless every element of ours lies within fp32 summation's bound of the float64 sum of xs,
    rounded to ours' dtype; return how many elements differ from that sum rounded once."""
    n, u = len(xs), 2.0**-24
    x64 = torch.stack([x.double() for x in xs])
    s, e = x64.sum(0), (n - 1) * u / (1 - (n - 1) * u) * x64.abs().sum(0)
    got = ours.double().cpu()
    if ours.dtype == torch.float32:
        lo, hi, once = s - e, s + e, s.float().double()
    else:  # rounding is monotone, so through float32 (torch's way) gives a valid bracket too
        lo, hi = (t.float().to(ours.dtype).double() for t in (s - e, s + e))
        once = _round_bf16(s) if ours.dtype == torch.bfloat16 else s.float().to(ours.dtype).double()
    out = ((got < lo) | (got > hi)).sum().item()
    if out:
        raise AssertionError(f"{out} of {got.numel()} elements outside fp32 summation's bound of the sum")
    return int((got != once).sum().item())


def _agree(fn, device, *args):
    """Run fn on every rank; if it raised on any rank, raise on all. Return the max error over ranks
    (or fn's note, when it returns a string)."""
    err, msg, note = 0.0, "", None
    try:
        result = fn(*args)
        note, err = (result, 0.0) if isinstance(result, str) else (None, float(result or 0.0))
    except Exception as e:  # report after the collective below, so no rank is left waiting
        msg = f"{type(e).__name__}: {e}"
    t = torch.tensor([min(err, 1e300), 1.0 if msg else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[1] > 0:
        raise AssertionError(msg or "failed on another rank")
    return note if note is not None else t[0].item()


def check_sum(length: int, dtype, members: list[int], group, device, seed: int, chunk_bytes: int,
              max_chunks: int) -> str:  # fmt: skip
    if dist.get_rank() not in members:
        return ""  # not in this group: nothing to report
    n, r = len(members), members.index(dist.get_rank())
    gen = torch.Generator().manual_seed(seed * 1000 + length)
    xs = [(torch.randn(length, generator=gen) * (i + 1)).to(dtype) for i in range(n)]  # fresh, unequal
    ref = torch.stack([x.double() for x in xs]).sum(0)
    ours, theirs = xs[r].to(device, copy=True), xs[r].to(device, copy=True)  # copies, even on the CPU
    ring_allreduce(ours, group, chunk_bytes=chunk_bytes, max_chunks=max_chunks)
    lo, hi = ours.float().clone(), ours.float().clone()  # identical bits on every rank: min == max
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(theirs, group=group)
    # all communication is done: judging (and raising) now cannot leave another rank waiting
    off = _judge_sum(ours, xs)
    err = harness.assert_close(ours, ref, dtype, "ring vs float64 sum")
    if not (torch.equal(lo, hi) and torch.equal(lo, ours.float())):
        raise AssertionError("ranks disagree on the result")
    harness.assert_close(ours, theirs.double(), dtype, "ring vs dist.all_reduce")
    return f"rel_err {err:.2e}  {off}/{length} elements differ from the float64 sum rounded once"


def check_bad_input(device, solo_group) -> str:
    for bad, kind, words in ((torch.randn(8, 4, device=device)[:, ::2], ValueError, "contiguous"),
                             (torch.ones(5, dtype=torch.int64, device=device), TypeError, "accepted"),
                             ([1.0, 2.0], TypeError, "torch.Tensor")):  # fmt: skip
        try:
            ring_allreduce(bad)
        except kind as e:
            if words not in str(e):
                raise AssertionError(f"error for bad input does not say {words!r}: {e}") from e
        else:
            raise AssertionError(f"bad input ({words}) was accepted")
    if dist.get_rank() == 0:  # a group of one rank: the sum is the tensor, returned untouched
        x = torch.randn(7, device=device)
        before = x.clone()
        if ring_allreduce(x, solo_group) is not x or not torch.equal(x, before):
            raise AssertionError("world size 1 did not return the tensor unchanged")
    return "non-contiguous, int64 and a list raise; world size 1 returns the tensor"


def run_checks(cfg: Config, device) -> bool:
    rank, W = dist.get_rank(), dist.get_world_size()
    checks = harness.Checks() if rank == 0 else None
    # every rank creates every group, in the same order (new_group is itself collective)
    groups = {n: dist.new_group(list(range(n))) for n in range(2, W + 1)}
    solo = dist.new_group([0])
    for n, g in groups.items():  # one collective per group first: NCCL then builds each group's
        if rank < n:  # communicator once, instead of a separate one per pair for the first sends
            dist.all_reduce(torch.ones(1, device=device), group=g)
    failed = False

    def run(name, fn, *args):
        nonlocal failed
        if checks is not None:
            before = len(checks.failed)
            checks(name, _agree, fn, device, *args)
            failed |= len(checks.failed) > before
        else:
            try:
                _agree(fn, device, *args)
            except AssertionError:
                failed = True

    # the benchmark's chunk_bytes, then one-element chunks: C = max_chunks where a segment has that many
    cases = [(length, cfg.chunk_bytes) for length in (1, 7, 1000003)] + [(61, 4), (1000003, 4)]
    for n in sorted(set(groups) & {2, 3, 4} or set(groups)):
        for dtype in (torch.float32, torch.bfloat16):
            for length, chunk in cases:
                C = _num_chunks(_bounds(length, n)[1], chunk, cfg.max_chunks)
                name = f"sum  n={n} {str(dtype).removeprefix('torch.'):8s} N={length} C={C}"
                run(name, check_sum, length, dtype, list(range(n)), groups[n], device, cfg.seed, chunk,
                    cfg.max_chunks)  # fmt: skip
    if W > 4:  # with more GPUs, also the whole world
        run(f"sum  n={W} float32 N=1000003", check_sum, 1000003, torch.float32, list(range(W)), None,
            device, cfg.seed, cfg.chunk_bytes, cfg.max_chunks)  # fmt: skip
    run("bad input", check_bad_input, device, solo)
    if checks is not None:
        if checks.failed:
            print(f"{len(checks.failed)} check(s) failed: {', '.join(checks.failed)}", flush=True)
        else:
            print("All results match.", flush=True)
    return not failed


# %% [markdown]
# ## Benchmark
#
# nccl-tests' definitions: algbw = S / t (S = message bytes, t = time of one all-reduce, the
# slowest rank's); busbw = algbw * 2(n-1)/n, the bytes each rank's link actually carries per second,
# comparable across n and with the link's bandwidth. S is counted in the message's dtype, as
# nccl-tests does: for bf16 and fp16 our reduce-scatter sends fp32, so our links carry 3(n-1)/n S,
# not 2(n-1)/n S (the rows' ours_wire_bytes: bytes each rank sends), 1.5x what ours_busbw says.
# Message sizes in powers of 4 from 1 KB. Each size: one warm-up, then repetitions for
# ~time_per_size seconds (3 to 20), each timed alone: every rep sums in place (values grow by n,
# which overflows fp16 within a few reps), so the input is re-filled before each, outside the timed
# region, and the ranks meet at a barrier; mean time, max over ranks.


def _time(fn, x, device, cfg: Config) -> float:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    x0 = x.clone()

    def once() -> float:  # re-fill, then time one all-reduce from a common start
        x.copy_(x0)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        fn(x)
        sync()
        return time.perf_counter() - t0

    once()  # warm-up
    probe = torch.tensor([once()], dtype=torch.float64, device=device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX)  # every rank must run the same number of reps
    reps = int(max(3, min(20, cfg.time_per_size / max(probe.item(), 1e-9))))
    t = torch.tensor([sum(once() for _ in range(reps)) / reps], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def benchmark(cfg: Config, device, dtype) -> list[dict]:
    n, rows = dist.get_world_size(), []
    size = cfg.min_bytes
    ours = lambda x: ring_allreduce(x, chunk_bytes=cfg.chunk_bytes, max_chunks=cfg.max_chunks)  # noqa: E731
    while size <= cfg.max_bytes:
        numel = size // torch.tensor([], dtype=dtype).element_size()
        row = {"bytes": size, "dtype": str(dtype).removeprefix("torch.")}
        for name, fn in (("ours", ours), ("torch", dist.all_reduce)):
            x = torch.randn(numel, device=device).to(dtype)
            try:
                t = _time(fn, x, device, cfg)
            except Exception as e:  # one failing size must not hide the others
                if dist.get_rank() == 0:
                    print(f"  {name} {size} B failed: {type(e).__name__}: {e}", flush=True)
                continue
            algbw = size / t / 1e9
            row |= {
                f"{name}_us": t * 1e6,
                f"{name}_algbw_GBs": algbw,
                f"{name}_busbw_GBs": algbw * 2 * (n - 1) / n,
            }
            del x
        # bytes each rank sends: 2(n-1)/n S, but the reduce-scatter half in fp32 for bf16 / fp16
        row["ours_wire_bytes"] = (n - 1) / n * size * (2 if dtype == torch.float32 else 3)
        if "ours_us" in row and "torch_us" in row:
            row["ours_vs_torch"] = row["torch_us"] / row["ours_us"]  # > 1: ours is faster
        if dist.get_rank() == 0:
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(f"  {shown}", flush=True)
        rows.append(row)
        size *= 4
    return rows


# %% [markdown]
# ## The cost model at scale (simulation)
#
# One machine here has at most a few ranks; the model above says what happens at 8 to 1024. Link
# figures (per GPU, per direction):
#   - NVLink 4 (H100 / H200 SXM): 900 GB/s bidirectional per GPU (NVIDIA H100 and H200 datasheets),
#     so B = 450 GB/s each way. Beyond 8 GPUs this needs an NVLink Switch domain (GB200 NVL72: 72);
#     the 1024-rank NVLink curve is hypothetical.
#   - InfiniBand NDR: 400 Gb/s per port (NVIDIA ConnectX-7 / Quantum-2 specifications), B = 50 GB/s.
# alpha is an assumption, not a measurement: 2 us per step on NVLink, 5 us on InfiniBand (the order
# of NCCL's per-hop latency for small messages). Tree: t = 2 log2(n) alpha + 2 S/B (pipelined double
# binary tree with perfect pipelining: an upper bound on what a tree does. NCCL's tuner, in
# src/graph/tuning.cc, caps tree bandwidth per channel below the ring's and multiplies it by a
# correction factor < 1 for medium sizes, which is why rings still carry large messages).

LINKS = {  # name: (bytes/s per direction, alpha seconds)
    "NVLink 4 (450 GB/s/dir, alpha 2 us)": (450e9, 2e-6),
    "InfiniBand NDR (50 GB/s/dir, alpha 5 us)": (50e9, 5e-6),
}


def t_ring(n, S, B, alpha):
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * S / B


def t_tree(n, S, B, alpha):
    return 2 * math.log2(n) * alpha + 2 * S / B


def crossover_bytes(n, B, alpha) -> float:
    """Message size above which the ring beats the tree: t_ring = t_tree solved for S."""
    return n * ((n - 1) - math.log2(n)) * alpha * B  # from 2 S/B - 2(n-1)/n S/B = 2 S/(n B)


def plot_model(path: Path) -> dict:
    """The cost model's ring/tree crossover sizes, and (where matplotlib is installed) its plot."""
    summary = {
        f"{name.split(' (')[0]} n={n} crossover_bytes": crossover_bytes(n, B, alpha)
        for name, (B, alpha) in LINKS.items()
        for n in (8, 64, 1024)
    }
    plt = harness.pyplot()
    if plt is None:
        return summary
    sizes = [2.0**k for k in range(10, 36)]  # 1 KB .. 32 GB
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, (name, (B, alpha)) in zip(axes, LINKS.items(), strict=True):
        for n, color in ((8, "C0"), (64, "C1"), (1024, "C3")):
            bus = lambda t, S, n=n: S / t * 2 * (n - 1) / n / 1e9  # noqa: E731
            ax.plot(sizes, [bus(t_ring(n, S, B, alpha), S) for S in sizes], color=color, label=f"ring n={n}")
            ax.plot(sizes, [bus(t_tree(n, S, B, alpha), S) for S in sizes], color=color, ls="--",
                    label=f"tree n={n}")  # fmt: skip
        ax.axhline(B / 1e9, color="gray", lw=0.8)
        ax.set(
            xscale="log", yscale="log", title=name, xlabel="message bytes S", ylabel="bus bandwidth (GB/s)"
        )
        ax.legend(fontsize=7)
    fig.suptitle("All-reduce cost model: ring t = 2(n-1)a + 2(n-1)/n S/B vs tree t = 2 log2(n) a + 2 S/B")
    harness.save_figure(fig, path, dpi=110)
    return summary


def plot_bench(rows: list[dict], path: Path, title: str) -> None:
    plt = harness.pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in (("ours", "ring_allreduce (ours)"), ("torch", "dist.all_reduce")):
        pts = [(r["bytes"], r[f"{name}_busbw_GBs"]) for r in rows if f"{name}_busbw_GBs" in r]
        ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="message bytes", ylabel="bus bandwidth (GB/s)", title=title)
    ax.legend()
    harness.save_figure(fig, path, dpi=110)


# %% [markdown]
# ## Launcher
#
# One process per rank, started with torch.multiprocessing (spawn). Rendezvous through a file in a
# fresh temporary folder (init_method="file://..."): no fixed port, so parallel runs cannot collide.
# NCCL: one GPU per process, NVLink SHARP multicast off (NCCL_NVLS_ENABLE=0, and the symmetric-memory
# multicast that newer torch uses: TORCH_SYMM_MEM_DISABLE_MULTICAST=1), set before any init.


def _worker(rank: int, cfg: Config, init_file: str, result_file: str) -> None:
    if cfg.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # n processes share the cores: one thread each for the adds
    dist.init_process_group(
        cfg.backend, init_method=f"file://{init_file}", rank=rank, world_size=cfg.world_size
    )
    try:
        torch.manual_seed(cfg.seed + rank)
        ok = run_checks(cfg, device)
        if ok and cfg.bench:
            rows = benchmark(cfg, device, cfg.dtype)
            if rank == 0:
                import json

                Path(result_file).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def launch(cfg: Config) -> list[dict] | None:
    """Spawn cfg.world_size ranks; raise if any rank failed; return rank 0's benchmark rows (or None)."""
    if cfg.backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    with tempfile.TemporaryDirectory(prefix="ring_") as tmp:
        init_file, result_file = str(Path(tmp) / "rendezvous"), str(Path(tmp) / "rows.json")
        mp.spawn(_worker, args=(cfg, init_file, result_file), nprocs=cfg.world_size, join=True)
        if Path(result_file).exists():
            import json

            return json.loads(Path(result_file).read_text())
    return None


def choose_backend(requested: str, world_size: int | None) -> tuple[str, int]:
    """NCCL over every visible GPU when there are two or more, else gloo with world_size processes."""
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "nccl" or (requested == "auto" and n_gpu >= 2):
        if n_gpu < 2:
            raise SystemExit(f"--backend nccl needs two or more GPUs (one process per GPU); {n_gpu} visible")
        if world_size is not None and not 2 <= world_size <= n_gpu:
            raise SystemExit(
                f"--world-size {world_size} with NCCL must be between 2 and {n_gpu} (visible GPUs)"
            )
        return "nccl", world_size or n_gpu
    if n_gpu == 1 and requested == "auto":
        print("One GPU visible: the NCCL path needs two or more GPUs (one process per GPU). "
              "Running the gloo path on the CPU instead.", flush=True)  # fmt: skip
    world_size = 4 if world_size is None else world_size
    if world_size < 2:
        raise SystemExit(f"--world-size must be >= 2 to launch a ring, got {world_size}")
    return "gloo", world_size


# %% [markdown]
# ## Main


def main():
    parser = harness.build_parser("Ring all-reduce from isend/irecv: checks, benchmark vs dist.all_reduce")
    parser.set_defaults(dtype="fp32")  # the benchmark's dtype; nccl-tests' default is float too
    parser.add_argument(
        "--world-size", type=int, default=None, help="processes (default: 4 with gloo, GPUs with NCCL)"
    )
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    parser.add_argument("--note", default="", help="a remark stored in the results JSON")
    args, _, dtype = harness.start(parser, device="cpu")
    if args.profile or args.device:
        print("--profile and --device do not apply here: each rank picks its device from the backend")
    if dtype not in ACCEPTED:
        raise SystemExit(f"--dtype {args.dtype} is not accepted here; accepted: fp32, bf16, fp16")
    backend, world = choose_backend(args.backend, args.world_size)
    cfg = Config(backend=backend, world_size=world, bench=not args.no_bench, seed=args.seed, dtype=dtype)
    if backend == "nccl":
        cfg = replace(cfg, max_bytes=1 << 30, chunk_bytes=8 << 20)
    if args.quick:
        cfg = replace(cfg, max_bytes=1 << 20, time_per_size=0.1)
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    print(f"backend {backend}, {world} ranks ({harness.device_name(device)})", flush=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        rows = launch(cfg)
    except mp.ProcessExitedException as e:
        print(f"a rank failed: {e}", flush=True)
        sys.exit(1)
    print(f"run took {time.perf_counter() - t0:.1f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = plot_model(out / "12_ring_allreduce_model.png")
    for k, v in model.items():
        print(f"model: {k} = {v / 1e6:.3g} MB")
    if not rows:
        return
    harness.print_table(rows)
    big = [r for r in rows if r["bytes"] >= 64 << 20 and "ours_vs_torch" in r]
    if big:
        worst = min(r["ours_busbw_GBs"] / r["torch_busbw_GBs"] for r in big)
        print(f"ours at >= 64 MB: >= {worst:.2f}x dist.all_reduce's bus bandwidth")
    name = "12_ring_allreduce" if backend == "gloo" else "12_ring_allreduce_gpu"
    plot_bench(
        rows, out / f"{name}.png", f"all-reduce, {backend}, {world} ranks, {harness.device_name(device)}"
    )
    harness.write_results(name, rows, device, args.out, backend=backend, world_size=world, quick=args.quick,
                          dtype=str(dtype), chunk_bytes=cfg.chunk_bytes, max_chunks=cfg.max_chunks,
                          load_avg_1min_before=load_before, load_avg_1min_after=os.getloadavg()[0],
                          note=args.note, cost_model_crossover_bytes=model)  # fmt: skip


if __name__ == "__main__":
    main()
