"""H200 probe (issue 19, sessions 10-11): the backward's dK/dV and dQ kernels in Gluon against 06's tl kernels
on the same inputs, and their ring depths.

Written in session 10 with its own copies of the two kernels (the forward's recipe, flash_fwd_gluon.py:
a producer warp streams tiles by TMA into a ring of slots, two consumer warpgroups of 64 rows never wait
for each other, each matmul's wait placed after the softmax work it overlaps); run in session 11 (logs
notes/logs/flash_bwd_gluon_s11*_h200.log, the kernels then in this file at 044dba9 and d92ada5). Since
09a5714 06 carries the kernels (_bwd_dkdv_gluon, _bwd_dq_gluon; its Gluon backward section describes
them) and this probe launches 06's. It checks them against 06's tl backward on the same (lse, delta)
pairs, times each kernel alone beside the tl one with rings of 2 and 3 slots, per matmul, and times the
whole backward (06's benchmark method, the variants interleaved over ROUNDS rounds) against cuDNN: 06's
tl kernels, 06's default, and 06's default with the other ring depth for each kernel.
GPU only:  python -u notes/probes/flash_bwd_gluon.py   (ROUNDS=3 by default; SHAPES=n: the first n shapes)"""

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

fa = harness.load_build("06_flash")
ROUNDS = int(os.environ.get("ROUNDS", "3"))  # interleaved rounds of the whole-backward timings


@contextlib.contextmanager
def gluon_stages(dkdv=None, dq=None):
    """06's Gluon backward with other ring depths (slots) for dK/dV's Q and dO, dQ's K and V."""
    before = dict(fa.GLUON_BWD)
    fa.GLUON_BWD.update({k: v for k, v in (("DKDV_STAGES", dkdv), ("DQ_STAGES", dq)) if v is not None})
    try:
        yield
    finally:
        fa.GLUON_BWD.update(before)


def gluon_dkdv(q, k, v, do, ld, causal, stages=None):
    """06's Gluon dK/dV kernel alone on dense contiguous (B, H, N, D) q, dO and (B, H_KV, N, D) k, v."""
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    with gluon_stages(dkdv=stages):
        fa._dkdv_gluon(fa._gluon_bwd_descs(q, k, v, do), ld, dk, dv, q, k, causal, q.shape[-1] ** -0.5)
    return dk, dv


def gluon_dq(q, k, v, do, ld, causal, stages=None):
    """06's Gluon dQ kernel alone, as gluon_dkdv."""
    dq = torch.empty_like(q)
    with gluon_stages(dq=stages):
        fa._dq_gluon(fa._gluon_bwd_descs(q, k, v, do), ld, dq, q, k, causal, q.shape[-1] ** -0.5)
    return dq


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
    """Each backward kernel alone, 06's tl one and its Gluon one with 2 and 3 slots, per matmul it does."""
    out = []
    for name, kind, n_mm, gluon_fn in (("dK/dV", "dkdv", 4, gluon_dkdv), ("dQ", "dq", 3, gluon_dq)):
        t06 = harness.bench(launches[kind], device, graph=True) / n_mm
        row = f"{name} tl {t06 * 1e3:.0f}"
        for stages in (2, 3):
            t = harness.bench(functools.partial(gluon_fn, *args, causal, stages), device, graph=True) / n_mm
            row += f", gluon {stages} slots {t * 1e3:.0f} (x{t06 / t:.2f})"
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
        print("dk, dv, dq vs 06's tl: " + " ".join(f"{e:.1e}" for e in errs), verdict, flush=True)
    shapes = [(4, 16, 16, 4096, False), (4, 16, 16, 4096, True), (2, 32, 8, 8192, False),
              (2, 32, 8, 8192, True), (1, 16, 16, 16384, True)]  # fmt: skip
    for B, H, H_KV, N, causal in shapes[: int(os.environ.get("SHAPES", len(shapes)))]:  # SHAPES=2: first two
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
        n_kv, n_q = fa.GLUON_BWD["DKDV_STAGES"], fa.GLUON_BWD["DQ_STAGES"]  # 06's ring depths (2, 3)
        other_kv, other_q = (
            functools.partial(gluon_stages, dkdv=5 - n_kv),
            functools.partial(gluon_stages, dq=5 - n_q),
        )
        variants = [
            ("cudnn", impls["cudnn"][1]),
            ("06 tl", fa.tl_kernels),
            (f"06 ({n_kv}, {n_q} slots)", None),
            (f"06 ({5 - n_kv}, {n_q} slots)", other_kv),
            (f"06 ({n_kv}, {5 - n_q} slots)", other_q),
        ]
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
