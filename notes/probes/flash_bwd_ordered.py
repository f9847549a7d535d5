"""H200 probe (issue 19, session 14): 06's deterministic backward as the ordered fused kernel (one kernel,
5 matmuls a block pair, dQ added in a fixed order) against the two-kernel road it replaces (7 matmuls,
two_kernel_backward), deterministic=False's unordered fused kernel and cuDNN, by 06's own timing (_time:
CUDA-graph replay, L2 flushed), interleaved over ROUNDS rounds. Also the ordered kernel with a GQA
group in single-head shares (fixed_dkdv_splits): causal, the ordered launch runs the heaviest program
of each kv head last, and a whole group makes it GROUP times heavier (notes/06_flash.md, session 14).
GPU only:  python -u notes/probes/flash_bwd_ordered.py   (ROUNDS=3 by default; SPLITS=1: the shares)"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import bwd_inputs, bwd_rounds  # noqa: E402  (this folder is on sys.path)

fa = harness.load_build("06_flash")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
# (B, H, H_KV, N, causal): the benchmark's D=128 rows at N >= 4k; SPLITS=1 (call 4): the shares of a
# group to time the ordered kernel with beside its default (a whole group, call 3; one head since)
SHAPES = [(4, 16, 16, 4096, True), (4, 16, 16, 4096, False), (1, 16, 16, 16384, True),
          (1, 16, 16, 16384, False), (2, 32, 8, 8192, True), (2, 32, 8, 8192, False),
          (4, 32, 1, 4096, True), (4, 32, 1, 4096, False)]  # fmt: skip
SPLITS = {(2, 32, 8, 8192, True): (1, 2), (4, 32, 1, 4096, True): (8, 16)}
if os.environ.get("SPLITS") == "1":
    SHAPES = [s for s in SHAPES if s in SPLITS or s[:2] == (4, 16)]


def checks(device):
    """06's ordered-kernel checks first (against float64 and SDPA, bitwise the same twice), then the
    isolation checks that go through it."""
    checks = harness.Checks()
    bf16 = torch.bfloat16
    for s, splits in [((2, 4, 4, 1000, 1000, 128, True), 1), ((2, 4, 4, 1000, 1000, 128, False), 1),
                      ((1, 4, 2, 300, 1111, 128, False), 1), ((2, 8, 2, 1000, 1000, 128, True), 2),
                      ((1, 8, 1, 1111, 1111, 128, False), 4), ((1, 16, 16, 2048, 2048, 128, True), 1),
                      ((1, 8, 2, 777, 777, 128, False), 1)]:  # fmt: skip
        with fa.fixed_dkdv_splits(splits), fa.two_kernel_backward(False):
            checks(f"{s} in {splits} part(s), repeatable", fa.check_dense, *s, bf16, device, repeat=True)
    for causal in (False, True):
        with fa.two_kernel_backward(False):
            checks(f"dense isolation causal={causal}", fa.check_isolation, False, causal, 128, bf16, device)
    with fa.two_kernel_backward():
        checks(
            "two-kernel (2, 4, 4, 1000, causal)", fa.check_dense, 2, 4, 4, 1000, 1000, 128, True, bf16, device
        )
    print(f"checks failed: {checks.failed or 'none'}; timing anyway", flush=True)


def main():
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    checks(device)
    for B, H, H_KV, N, causal in SHAPES:
        q, k, v, do = bwd_inputs(B, H, H_KV, N, device)
        impls = fa._impls(causal)
        runs = [("cudnn", *impls["cudnn"]), ("ordered", *impls["ours"]), ("unordered", *impls["ours_atomic"])]
        if os.environ.get("SPLITS") == "1":
            for n in SPLITS.get((B, H, H_KV, N, causal), ()):
                runs.append((f"ordered in {n}", impls["ours"][0], lambda n=n: fa.fixed_dkdv_splits(n)))
        else:
            runs.insert(2, ("two-kernel", impls["ours"][0], fa.two_kernel_backward))
            if H_KV not in (1, H):
                shares = lambda g=H // H_KV: fa.fixed_dkdv_splits(g)  # noqa: E731
                runs.append(("ordered 1-head shares", impls["ours"][0], shares))
        bwd_rounds(fa, (B, H, H_KV, N, causal), runs, ROUNDS, (q, k, v, do, device))


if __name__ == "__main__":
    main()
