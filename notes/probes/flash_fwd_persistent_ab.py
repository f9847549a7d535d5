"""H200 probe (issue 19, session 21): 06's dense Gluon forward as persistent programs (06 as it is: one
program an SM walking its tiles, causal tiles in pairs of equal weight) against one program a tile, the
causal ones heaviest first over 8 heads at a time (06 at 7f2befe, BASE), beside cuDNN.
flash_fwd_persistent.py (session 21, call 1) measured the same idea as a separate kernel at D=128 with two
warpgroups: 1.02-1.12x the one-program-a-tile kernel at N = 512-2k, 1.04x / 1.02x causal at 4k / 8k.
Prediction here: the same at D=128; at D=64 (three warpgroups) less, since offline the persistent loop
costs the first two warpgroups' key loop ~40 instructions of ~830-960 (half swaps of P before P V, and
causal a 2-register spill).
Checks first: both forwards against 06's tl kernel on dense shapes (D=64 and 128, causal and not, odd and
even query blocks a head, an odd count of tiles, GQA and MQA, rows shorter than a block) on every SM and
on 1, 2, 3 and 7 programs (fixed_programs: the ring's phases across many tiles). Then the forward in
interleaved rounds.
Measured (session 21, call 2; notes/logs/flash_fwd_persistent_ab_7f2befe_wip_h200.log): 148 checks ok.
D=128 persistent against a program a tile, without a mask / causal: 1.15x / 1.05x at 512, 1.08x / 1.14x
at 1k, 1.04x / 1.09x at 2k, 1.04x / 1.06x at 4k, 1.04x / 1.03x at 8k, 1.02x / 1.03x at 16k; GQA 32/8 8k
1.04x / 1.02x, MQA 4k causal 1.07x; 0.99-1.07x cuDNN at N >= 4k. D=64: 0.99x / 0.96x / 0.95x / 0.96x at
2k / 4k / 8k / 16k without a mask, causal 0.96x / 0.93x / 0.91x at 4k / 8k / 16k: as predicted in sign,
larger than the instruction count alone. So 06 takes it at D=128 only (GLUON_FWD's PERSISTENT).
GPU only:
    BASE=data/06_flash_7f2befe.py python -u notes/probes/flash_fwd_persistent_ab.py   (ROUNDS=3)"""

import contextlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import check_forwards, forward_rounds, gluon_pair, load_06_at  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
fa = harness.load_build("06_flash")


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    fwds = gluon_pair(fa, load_06_at("7f2befe", "flash_base"), ("persistent", "a tile a program"))
    cases = [(2, 4, 4, 1000, True), (1, 8, 2, 777, False, True), (3, 5, 5, 640, True), (1, 3, 3, 1152, True),
             (1, 4, 1, 300, True), (2, 2, 2, 60, True), (2, 4, 4, 2048, False)]  # fmt: skip
    for programs in (None, 1, 2, 3, 7):
        print(f"checks on {programs or 'every SM'} programs", flush=True)
        with fa.fixed_programs(programs) if programs else contextlib.nullcontext():
            for D in (64, 128):
                check_forwards(fwds, fa, D, dev, cases, varlen=programs is None)
    lengths = (512, 1024, 2048, 4096, 8192, 16384)
    shapes = [(16384 // n, 16, 16, n, 128, c) for n in lengths for c in (False, True)]
    shapes += [(2, 32, 8, 8192, 128, False), (2, 32, 8, 8192, 128, True), (4, 32, 1, 4096, 128, True)]
    shapes += [(8, 32, 32, 2048, 64, False)]
    shapes += [(16384 // n, 32, 32, n, 64, c) for n in (4096, 8192, 16384) for c in (False, True)]
    forward_rounds(fa, fwds, shapes, dev, ROUNDS)


if __name__ == "__main__":
    main()
