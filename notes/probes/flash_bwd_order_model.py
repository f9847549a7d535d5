"""CPU model (issue 19, session 20): how much of the causal Gluon dK/dV kernel's time its launch order
loses to imbalance, by list scheduling, as flash_causal_order_model.py does for the forward. Each program
takes the first free SM in launch order (132 SMs) and runs for its steps (64-row query blocks times the
heads it walks) plus two (its start and end); the makespan is printed against the ideal, total / 132.
Orders: the old ordered launch (each unit's key blocks last first, unit after unit: the lightest block
first, key block 0 the heaviest last) and heaviest first over G units at a time (06 now; causal_units
picks G). A unit is a row of the launch: a (batch, kv head, share) walking `per` query heads.
    python notes/probes/flash_bwd_order_model.py"""

from flash_causal_order_model import SMS, makespan  # this folder is on sys.path when run as a script


def orders(n: int, units: int, per: int) -> dict:
    """Makespan / ideal of each launch order: units rows of n // 128 key blocks, key block j walking
    per heads' (n - 128 j) / 64 query blocks."""
    work = [per * (n - jb * 128) // 64 + 2 for jb in range(n // 128)]  # key block 0 first: heaviest
    ideal = sum(work) * units / SMS
    out = {"old": makespan([w for _ in range(units) for w in reversed(work)]) / ideal}
    for g in (1, 2, 4, 8, 16):
        if g <= units:
            order = [w for u0 in range(0, units, g) for w in work for _ in range(min(g, units - u0))]
            out[f"G={g}"] = makespan(order) / ideal
    return out


CASES = [
    ("MHA 4k", 4096, 64, 1),
    ("MHA 8k", 8192, 32, 1),
    ("MHA 16k", 16384, 16, 1),
    ("GQA 32/8 8k shares", 8192, 64, 1),
    ("GQA 32/8 8k whole", 8192, 16, 4),
    ("GQA 32/8 2k shares", 2048, 256, 1),
    ("GQA 32/8 2k whole", 2048, 64, 4),
    ("MQA 4k shares of 1", 4096, 128, 1),
    ("MQA 4k shares of 4", 4096, 32, 4),
]  # (label, N, units = B x H_KV x shares, heads a unit walks), the benchmark's batch sizes


def main():
    for label, n, units, per in CASES:
        got = orders(n, units, per)
        print(f"{label:20s} " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()))


if __name__ == "__main__":
    main()
