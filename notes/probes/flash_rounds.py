"""Interleaved timing rounds for the flash probes: each implementation once a round, in turn, so that a
drifting clock hits them all alike; each round's TFLOP/s, then the median round's with every one's
ratio to the first (cuDNN in these probes)."""

import statistics


def interleaved(label: str, runs: list, flops: float, rounds: int, time, args: tuple, pick: int) -> dict:
    """runs: (name, fn, ctx) triples, each timed as time(fn, ctx, *args)[pick] milliseconds (06's _time:
    pick 0 the forward, 1 the backward). Returns name -> median ms."""
    times = {}
    for r in range(rounds):
        for name, fn, ctx in runs:
            times.setdefault(name, []).append(time(fn, ctx, *args)[pick])
        got = ", ".join(f"{n} {flops / t[-1] / 1e9:.0f}" for n, t in times.items())
        print(f"{label} round {r}: {got}", flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    first = med[runs[0][0]]
    got = ", ".join(f"{n} {flops / t / 1e9:.0f} (x{first / t:.2f})" for n, t in med.items())
    print(f"{label} TFLOP/s, median round (x {runs[0][0]}): {got}", flush=True)
    return med
