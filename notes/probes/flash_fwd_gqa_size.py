"""H200 probe (issue 19, session 12): is the D=128 GQA 32/8 forward's shortfall at 8k without a mask
(0.91x cuDNN in results/06_flash.json at 09a5714, ours 7% below its own MHA 16/16 row there, cuDNN 10%
above its) about GQA, or about the shape being twice the MHA row's work? 06's forward (the Gluon kernel)
and SDPA pinned to cuDNN, both by 06's own timing (_time: CUDA-graph replay, L2 flushed), over N = 8k
shapes that separate the two: MHA 16/16 (the benchmark's row), MHA 32/32 (GQA's size and grid, its
K and V not shared), GQA 32/8 at B = 2 (the benchmark's row) and B = 1 (half of it), interleaved over
ROUNDS rounds so a drifting clock hits every shape alike. Run beside `nvidia-smi -lms` to see the clock.
GPU only:  python -u notes/probes/flash_fwd_gqa_size.py   (ROUNDS=3 by default)"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402

fa = harness.load_build("06_flash")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
N, D = 8192, 128
# (B, H, H_KV, causal)
SHAPES = [(2, 16, 16, False), (2, 32, 32, False), (2, 32, 8, False), (1, 32, 8, False),
          (2, 16, 16, True), (2, 32, 32, True), (2, 32, 8, True)]  # fmt: skip


def main():
    dev = torch.device("cuda")
    impls = {}
    for causal in (False, True):
        every = fa._impls(causal)
        impls[causal] = {name: every[name] for name in ("ours", "cudnn")}
    best = {}
    for r in range(ROUNDS):
        for B, H, H_KV, causal in SHAPES:
            q = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(B, H_KV, N, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
            flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
            line = []
            for name, (fn, ctx) in impls[causal].items():
                with torch.no_grad():
                    ms, _, _ = fa._time(fn, ctx, q, k, v, None, dev, backward=False)
                tf = flops / ms / 1e9
                key = (B, H, H_KV, causal, name)
                best[key] = max(best.get(key, 0.0), tf)
                line.append(f"{name} {tf:6.1f}")
            mode = "causal" if causal else "full"
            print(f"round {r} B{B} H{H}/{H_KV} {mode:6s} " + "  ".join(line), flush=True)
    print("best of rounds (TFLOP/s): ours, cudnn, ours/cudnn")
    for B, H, H_KV, causal in SHAPES:
        o, c = best[(B, H, H_KV, causal, "ours")], best[(B, H, H_KV, causal, "cudnn")]
        print(f"B{B} H{H}/{H_KV} {'causal' if causal else 'full':6s} {o:6.1f} {c:6.1f} {o / c:.3f}")


if __name__ == "__main__":
    main()
