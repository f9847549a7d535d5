"""H200 probe (issue 19, session 18): the dense causal Gluon forward launched heaviest first across heads
taken 8 at a time (06 as it is), against head by head, each head's blocks heaviest first (06 at e87a9e5,
BASE). A list-scheduling model (132 SMs, a program's time its key blocks plus one) puts the head-by-head
order 4-7% over the ideal at N = 2k-8k, D=64 and D=128, and 8 heads at a time within 0-3%: predicted
+2-6% on these rows, less at 16k. Checks first: both against 06's tl kernel on dense causal shapes
whose batch x heads are 8, fewer than 8 and not a multiple of 8 (D=64 and 128), and 06's isolation
check at D=64 causal; then the forward beside cuDNN in interleaved rounds. GPU only:
    BASE=data/06_flash_e87a9e5.py python -u notes/probes/flash_fwd_causal_lpt.py   (ROUNDS=3)"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import check_pair, forward_rounds, gluon_pair, load_06_at  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
fa = harness.load_build("06_flash")


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    fwds = gluon_pair(fa, load_06_at("e87a9e5", "flash_base"), ("8 heads", "head by head"))
    cases = [(2, 4, 4, 1000, True), (1, 8, 2, 777, True, True), (1, 4, 1, 300, True), (3, 5, 5, 2000, True)]
    check_pair(fwds, fa, dev, cases)
    shapes = [(8, 32, 32, 2048, 64), (4, 32, 32, 4096, 64), (2, 32, 32, 8192, 64), (4, 16, 16, 4096, 128),
              (2, 16, 16, 8192, 128), (2, 32, 8, 8192, 128), (4, 32, 1, 4096, 128)]  # fmt: skip
    forward_rounds(fa, fwds, [(*s, True) for s in shapes], dev, ROUNDS)


if __name__ == "__main__":
    main()
