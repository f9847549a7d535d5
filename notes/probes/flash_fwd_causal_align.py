"""H200 probe (issue 19, session 17): the Gluon forward's causal query blocks counted back from the last
row (06 as it is), so that where BLOCK_M does not divide the rows it is a sequence's first block, the
lightest, that is partial, against blocks counted from row 0 (06 at 864413f, BASE), whose partial block
is the last and heaviest. At D=64 (192-row blocks, 128-key blocks) a partial last block makes its
program walk every key with a third or two thirds of its rows past the end: counting the key blocks the
programs walk, 5.2% fewer at N=2k causal, 5.8% at 4k, 1.5% at 8k and 16k; at D=128 (128 | N) none.
Checks first (the Gluon forward at D=64 and 128 against 06's tl kernel, dense and packed, and 06's
isolation check at D=64 through gluon_d64_forward), then the forward beside cuDNN, 06's default and the
tl kernel in interleaved rounds. GPU only:
    BASE=data/06_flash_864413f.py python -u notes/probes/flash_fwd_causal_align.py   (ROUNDS=3)
(BASE defaults to `git show 864413f:06_flash.py` where git has the history.)"""

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
    base = load_06_at("864413f", "flash_base")
    fwds = gluon_pair(fa, base, ("aligned", "from row 0"))
    cases = [(2, 4, 4, 1000, True), (1, 8, 2, 777, True, True), (1, 4, 1, 300, True), (1, 4, 4, 64, True),
             (2, 4, 4, 4096, True), (2, 4, 4, 1000, False)]  # fmt: skip
    check_pair(fwds, fa, dev, cases)
    shapes = [(8, 32, 32, 2048, 64, True), (4, 32, 32, 4096, 64, True), (2, 32, 32, 8192, 64, True),
              (1, 32, 32, 16384, 64, True), (4, 16, 16, 4096, 128, True)]  # fmt: skip
    forward_rounds(fa, fwds, shapes, dev, ROUNDS, ("cudnn", "ours", "ours_tl"))


if __name__ == "__main__":
    main()
