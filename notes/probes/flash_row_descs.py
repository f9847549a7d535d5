"""H200 probe (issue 19, session 4): what the row descriptors (TMA tile loads in every kernel's unmasked
loop, and the bulk reduce-add of the atomic dQ) buy 06 against the same kernels with pointer loads.

Runs 06's own bench_case (every implementation side by side: ours with descriptors, ours with
pointer loads, the atomic-dQ backward, cuDNN, FA2) on a few shapes the benchmark also times, and prints
each row's TFLOP/s and ratios. GPU only."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402

fa = harness.load_build("06_flash")

# (D, H, H_KV, N, causal)
SHAPES = [(128, 16, 16, 4096, False), (128, 16, 16, 4096, True), (128, 16, 16, 16384, True),
          (64, 32, 32, 4096, False), (128, 32, 8, 8192, True)]  # fmt: skip


def main():
    dev = torch.device("cuda")
    cfg = fa.BenchConfig()
    for D, H, H_KV, N, causal in SHAPES:
        skipped = {}
        try:
            row = fa.bench_case(D, H, H_KV, N, causal, cfg, dev, torch.bfloat16, skipped)
        except Exception as e:  # a kernel this Triton refuses: say which shape and why, go on
            print(f"D{D} H{H}/{H_KV} N{N} causal={causal}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        keep = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if "efficient" not in k}
        print(json.dumps(keep), skipped or "", flush=True)


if __name__ == "__main__":
    main()
