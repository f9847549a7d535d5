"""H200 probe (issue 19, session 18): the dense D=128 Gluon forward of 06 as it is against 06 at 9eff7fa
(BASE), beside cuDNN, in interleaved rounds. Session 18's changes touched the dense path only in the
kernel's prologue (the lse offset computed before the bounds check, and the idle-warpgroup test, which
never holds where 128 divides N); offline every key loop compiles to the same SASS. The benchmark at
8e797d8 read the dense D=128 forward 2-4% lower than at c7b462f, with cuDNN 1-3% lower and the matmul
ceiling higher (722 against 687 TFLOP/s): a machine's difference or the code's? GPU only:
    BASE=data/06_flash_9eff7fa.py python -u notes/probes/flash_fwd_dense_ab.py   (ROUNDS=3)"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import forward_rounds, gluon_pair, load_06_at  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
fa = harness.load_build("06_flash")


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    fwds = gluon_pair(fa, load_06_at("9eff7fa", "flash_base"), ("now", "9eff7fa"))
    shapes = [(4, 16, 16, 4096, 128, False), (2, 16, 16, 8192, 128, False), (1, 16, 16, 16384, 128, True),
              (2, 32, 8, 8192, 128, False)]  # fmt: skip
    forward_rounds(fa, fwds, shapes, dev, ROUNDS)


if __name__ == "__main__":
    main()
