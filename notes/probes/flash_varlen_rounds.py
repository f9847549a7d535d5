"""H200 probe (issue 19, session 12): the benchmark's varlen rows (06's own varlen_case: the varlen
forward on mixed lengths against the dense forward on the same tokens, and the tl kernel, each by
CUDA-graph replay) repeated over ROUNDS rounds, so the "within 10% of dense" target is read from a
median rather than from one timing of each. Results at 6a0226f read 0.87x at mean length 1k without a
mask, where the run before (09a5714) read 0.96x. GPU only:
    python -u notes/probes/flash_varlen_rounds.py   (ROUNDS=5 by default)"""

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402

fa = harness.load_build("06_flash")
ROUNDS = int(os.environ.get("ROUNDS", "5"))


def main():
    dev, cfg = torch.device("cuda"), fa.BenchConfig()
    seen = {}
    for r in range(ROUNDS):
        for D, H, H_KV, mean in cfg.varlen_cases:
            for causal in (False, True):
                row = fa.varlen_case(D, H, H_KV, mean, causal, cfg.varlen_tokens, dev, torch.bfloat16)
                name = f"D{D} H{H}/{H_KV} mean {mean} {'causal' if causal else 'full'}"
                seen.setdefault(name, []).append(row)
                print(f"round {r} {name}: varlen {row['varlen_fwd']:.0f} dense {row['dense_fwd']:.0f} "
                      f"tl {row['varlen_tl_fwd']:.0f} TFLOP/s, varlen/dense {row['varlen/dense']:.3f}",
                      flush=True)  # fmt: skip
    print("median of rounds: varlen, dense, tl TFLOP/s; varlen/dense (min-max over rounds)")
    for name, rows in seen.items():
        med = {k: statistics.median(x[k] for x in rows) for k in ("varlen_fwd", "dense_fwd", "varlen_tl_fwd")}
        ratios = [x["varlen/dense"] for x in rows]
        print(f"{name:32s} {med['varlen_fwd']:5.0f} {med['dense_fwd']:5.0f} {med['varlen_tl_fwd']:5.0f}  "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
