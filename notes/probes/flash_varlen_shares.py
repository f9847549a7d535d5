"""CPU model (issue 19, session 22): how evenly the persistent packed D=128 forward shares its tiles out.
Each tile costs the key blocks it walks (causal: up to its diagonal) plus START blocks' worth for its
start and end (its Q load and O store). The persistent forward hands tile p + k * programs (causal, units
of two tiles, a head's blocks heavy and light in turn: 06's _g_tile) to program p; a program a tile is
modelled as a greedy queue, each tile in the table's order (a head's blocks in order, as 06 at c7c3f63
launched them) to the program that frees up first. Printed:
the busiest program's total over an even share (the time the last program adds, if every tile's cost
were its key blocks).
Result (START=2, 132 programs, 16 heads): static shares 1.041 / 1.061 over even at mean 1k without a
mask / causal, 1.025 / 1.034 at mean 4k, 1.034 / 1.035 on 4,096 + 63 x 64; the greedy queue 1.003-1.014.
START=0: static 1.026-1.073, the queue 1.002-1.016 but 1.187 on the causal mix (the long sequence's
heaviest blocks come last).
On the H200 the persistent forward still ran 1.01-1.11x a program a tile on these rows (notes/06_flash.md,
session 22): its saved per-tile start outweighs the uneven shares.
    python notes/probes/flash_varlen_shares.py   (START=2)"""

import heapq
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

fa = harness.load_build("06_flash")
START = int(os.environ.get("START", "2"))
PROGRAMS, HEADS = 132, 16


def tile_costs(lens: list, causal: bool, turns: bool) -> list:
    """Each tile's cost in the table's order: sequence by sequence, head by head, a head's query blocks
    in order, or with turns heavy and light in turn (as the persistent forward walks them causal)."""
    bm, bn = fa.GLUON_FWD[128]["BLOCK_M"], fa.GLUON_FWD[128]["BLOCK_N"]
    costs = []
    for n in lens:
        blocks, key_blocks = max(-(-n // bm), 1), -(-n // bn)
        for _ in range(HEADS):
            for b in range(blocks):
                block = (b // 2 if b % 2 == 0 else blocks - 1 - b // 2) if turns else b
                walked = min(key_blocks, -(-(block + 1) * bm // bn)) if causal else key_blocks
                costs.append(walked + START)
    return costs


def static_shares(costs: list, causal: bool) -> list:
    """Program p's total: units p, p + programs, ... (a unit is a tile, or causal two in a row)."""
    per = 2 if causal else 1
    totals = [0] * PROGRAMS
    for u in range(0, len(costs), per):
        totals[u // per % PROGRAMS] += sum(costs[u : u + per])
    return totals


def queue_shares(costs: list) -> list:
    """Each tile in order to the program that frees up first."""
    free = [(0, p) for p in range(PROGRAMS)]
    for c in costs:
        t, p = heapq.heappop(free)
        heapq.heappush(free, (t + c, p))
    return [t for t, _ in free]


def main():
    cases = [(f"mean {m}", fa.mixed_lengths(65536, m)) for m in (1024, 4096)]
    cases.append(("4096 + 63 x 64", [4096] + [64] * 63))
    for label, lens in cases:
        for causal in (False, True):
            costs = tile_costs(lens, causal, turns=causal)
            even = sum(costs) / PROGRAMS
            static = max(static_shares(costs, causal)) / even
            queue = max(queue_shares(tile_costs(lens, causal, turns=False))) / even
            mode = "causal" if causal else "full"
            print(f"{label} {mode}: {len(costs)} tiles, busiest over even: static {static:.3f}, "
                  f"queue {queue:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
