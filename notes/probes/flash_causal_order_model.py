"""CPU model (issue 19, session 18): how much of the dense causal Gluon forward's time its launch order
loses to imbalance, by list scheduling. Each program takes the first free SM in launch order (132 SMs,
as the H200's dispatcher does to a first approximation) and runs for its key blocks plus one (its start
and end); the makespan is printed against the ideal, total / 132. Orders: head by head (each head's
query blocks heaviest first, 06 at e87a9e5), heaviest first over all heads, and over G heads at a time
(06 now takes 8). The H200 probe of the 8-head order is flash_fwd_causal_lpt.py.
    python notes/probes/flash_causal_order_model.py"""

import heapq
import math

SMS = 132


def makespan(durations: list) -> float:
    free = [0.0] * SMS
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def orders(n: int, block_m: int, heads: int) -> dict:
    """Makespan / ideal of each launch order for heads (batch x head) of n causal rows in blocks of
    block_m, query block 0 the heaviest (counted back from the last row, as the kernel does)."""
    work = [math.ceil((n - m * block_m) / 128) + 1 for m in range(math.ceil(n / block_m))]
    out = {
        "head by head": [w for _ in range(heads) for w in work],
        "all heads": [w for w in work for _ in range(heads)],
    }
    for g in (4, 8, 12):
        out[f"{g} heads"] = [w for h0 in range(0, heads, g) for w in work for _ in range(min(g, heads - h0))]
    ideal = sum(out["head by head"]) / SMS
    return {name: makespan(d) / ideal for name, d in out.items()}


CASES = [
    ("D=64 2k", 2048, 192, 256),
    ("D=64 4k", 4096, 192, 128),
    ("D=64 8k", 8192, 192, 64),
    ("D=64 16k", 16384, 192, 32),
    ("D=128 4k", 4096, 128, 64),
    ("D=128 8k", 8192, 128, 32),
    ("D=128 16k", 16384, 128, 16),
    ("GQA 32/8 8k", 8192, 128, 64),
]  # (label, N, BLOCK_M, B x H)


def main():
    for label, n, block_m, heads in CASES:
        got = orders(n, block_m, heads)
        print(f"{label:12s} " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()))


if __name__ == "__main__":
    main()
