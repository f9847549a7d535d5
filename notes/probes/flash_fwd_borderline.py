"""H200 probe (issue 19, session 22): 06's forward against cuDNN, 9 interleaved rounds, on the rows whose
ratio sat at a target's edge in 06's benchmark at d15792c (3 rounds): D=64 causal 4k (1.003x cuDNN, the
target >= 1.0x; 0.996-1.01x in earlier runs), MQA 32/1 at 4k without a mask (0.91x there, 1.03x in a run
of the same commit before it), and beside them D=64 4k without a mask, D=64 causal 8k, MQA 4k causal.
Prediction: D=64 causal 4k within 1% of cuDNN either way; MQA 4k without a mask near 1.0x.
GPU only:
    python -u notes/probes/flash_fwd_borderline.py   (ROUNDS=9)"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import forward_rounds  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "9"))
SHAPES = [  # (B, H, H_KV, N, D, causal): 06's benchmark batches, 16k query tokens a row
    (4, 32, 32, 4096, 64, True),
    (4, 32, 32, 4096, 64, False),
    (2, 32, 32, 8192, 64, True),
    (4, 32, 1, 4096, 128, False),
    (4, 32, 1, 4096, 128, True),
]


def main():
    fa = harness.load_build("06_flash")
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    forward_rounds(fa, {}, SHAPES, dev, ROUNDS, ("cudnn", "ours"))


if __name__ == "__main__":
    main()
