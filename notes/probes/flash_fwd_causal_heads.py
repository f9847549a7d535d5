"""H200 probe (issue 19, session 19): the dense causal Gluon forward's heaviest-first order over heads
taken 1024 / D at a time, 16 at D=64 (06 at d023a8f with its HEADS edited here), against 8 at every D
(06 at d023a8f, BASE: the probe ran on the edit in place, and it was not kept). 16 heads'
K and V at D=64 fill as much L2 as 8 at D=128. The list-scheduling model (flash_causal_order_model.py)
puts 8 heads at 1.026 / 1.015 / 1.008 / 1.004 x the ideal at D=64 N = 2k / 4k / 8k / 16k and 16 heads
at 1.012 / 1.007 / 1.004 / 1.001: predicted +1.4% / +0.8% / +0.4% / +0.3%. D=128 is unchanged (8 heads):
one row as a control. Checks first: both against 06's tl kernel on dense causal shapes whose batch x
heads are 8, 15, 20 and 33 (D=64 and 128), and 06's isolation check at D=64 causal; then the forward
beside cuDNN in interleaved rounds. GPU only:
    BASE=data/06_flash_d023a8f.py python -u notes/probes/flash_fwd_causal_heads.py   (ROUNDS=3)"""

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import check_pair, forward_rounds, gluon_pair, load_06_at, load_module  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
fa = harness.load_build("06_flash")


def by_head_dim(base):
    """base's source with the causal group of heads 1024 / HEAD_DIM instead of 8, as a module."""
    src = Path(base.__file__).read_text()
    old = "HEADS: gl.constexpr = 8"
    assert src.count(old) == 1, "the causal launch order's HEADS line moved"
    path = Path(tempfile.mkdtemp()) / "flash_heads_by_dim.py"
    path.write_text(src.replace(old, "HEADS: gl.constexpr = 1024 // HEAD_DIM"))
    return load_module(path, path.stem)


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    base = load_06_at("d023a8f", "flash_base")
    fwds = gluon_pair(by_head_dim(base), base, ("1024 / D heads", "8 heads"))
    cases = [(2, 4, 4, 1000, True), (3, 5, 5, 2000, True), (1, 20, 4, 777, True, True), (1, 33, 3, 300, True)]
    check_pair(fwds, fa, dev, cases)
    shapes = [(8, 32, 32, 2048, 64), (4, 32, 32, 4096, 64), (2, 32, 32, 8192, 64), (1, 32, 32, 16384, 64),
              (4, 16, 16, 4096, 128)]  # fmt: skip
    forward_rounds(fa, fwds, [(*s, True) for s in shapes], dev, ROUNDS)


if __name__ == "__main__":
    main()
