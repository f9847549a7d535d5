"""H200 probe (issue 19, session 17): each consumer warpgroup of the causal Gluon forward walks only the
key blocks its own rows see (06 as it is), handing the program's later blocks back to the producer
unread, against every warpgroup walking all the blocks its program's last row sees (06 at c7b462f,
BASE). With 192-row programs (D=64) and 128-key blocks the first warpgroup's last block or two are
wholly masked for it: 5.9% / 3.1% / 1.5% / 0.8% of the warpgroup-blocks at N = 2k / 4k / 8k / 16k
causal. At D=64 the softmax (MUFU, ALU) the warpgroups share outweighs the matmuls, so the others may
run faster for it. Checks first (both against 06's tl kernel, dense and packed, D=64 and 128, and 06's
isolation check at D=64), then the forward beside cuDNN in interleaved rounds. GPU only:
    BASE=data/06_flash_c7b462f.py python -u notes/probes/flash_fwd_own_blocks.py   (ROUNDS=3)"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import D64_SHAPES, check_pair, forward_rounds, gluon_pair, load_06_at  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
fa = harness.load_build("06_flash")


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    base = load_06_at("c7b462f", "flash_base")
    fwds = gluon_pair(fa, base, ("own blocks", "all blocks"))
    cases = [(2, 4, 4, 1000, True), (1, 8, 2, 777, True, True), (1, 4, 1, 300, True), (2, 4, 4, 4096, True)]
    check_pair(fwds, fa, dev, cases)
    forward_rounds(fa, fwds, [(B, 32, 32, N, 64, True) for B, N in D64_SHAPES], dev, ROUNDS)


if __name__ == "__main__":
    main()
