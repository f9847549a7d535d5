"""H200 probe (issue 19, session 18): without a causal mask, a consumer warpgroup of the Gluon forward
whose 64 query rows all lie past the last query walks one key block, not all of them, and hands the rest
back unread (06 as it is), against walking them all (06 at 9eff7fa, BASE). Such warpgroups are in the
partial last query block of each packed sequence (mixed lengths at mean 1k: the padded query rows walked
fall from 1.109x to 1.082x the real ones, so up to 2.4% of the matmul work goes) and of D=64's 192-row
programs where 192 does not divide N (2 of 66 warpgroup-blocks at N = 4k, 1 of 129 at 8k, 2 of 258 at
16k, 1 of 33 at 2k). What a lone warpgroup saves depends on how much faster the program's other
warpgroups run without it. Checks first (both against 06's tl kernel, dense and packed, D=64 and 128,
and 06's isolation check at D=64 without a mask), then D=64 forwards without a mask beside cuDNN, and
06's varlen rows without a mask beside the dense forward on the same tokens, in interleaved rounds. GPU
only:
    BASE=data/06_flash_9eff7fa.py python -u notes/probes/flash_fwd_idle_warpgroups.py   (ROUNDS=3)"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import D64_SHAPES, check_pair, forward_rounds, gluon_pair, interleaved, load_06_at  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
fa = harness.load_build("06_flash")


def varlen_rows(base, dev, mean, tokens=65536, H=16, D=128):
    """06's varlen row without a mask (varlen_case's lengths and FLOP count): both kernels and the dense
    forward on the same tokens, each through its module's public function."""
    lens = fa.mixed_lengths(tokens, mean)
    cu, n = fa.cu_seqlens(lens, dev), max(lens)
    q, k, v = (torch.randn(tokens, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    B = tokens // mean
    qd, kd, vd = (torch.randn(B, H, mean, D, device=dev, dtype=torch.bfloat16) for _ in range(3))

    def varlen(m):
        return lambda *_: m.flash_attention_varlen(q, k, v, cu, cu, n, n, False, check_offsets=False)

    runs = [("dense", lambda *_: fa.flash_attention(qd, kd, vd, False), None)]
    runs += [("idle skip", varlen(fa), None), ("walk all", varlen(base), None)]
    flops = sum(4 * H * x * x * D for x in lens)  # the rounds print every row at this count
    med = interleaved(f"varlen mean {mean} full (the dense row at the varlen FLOPs)", runs, flops, ROUNDS,
                      fa._time, (qd, kd, vd, qd, dev, False), 0)  # fmt: skip
    dense = 4 * B * H * mean * mean * D / med["dense"]  # the dense row at its own FLOPs
    got = ", ".join(f"{name} {flops / med[name] / dense:.3f}x" for name in ("idle skip", "walk all"))
    print(f"varlen mean {mean} full, TFLOP/s against dense (varlen_case's varlen/dense): {got}", flush=True)


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    base = load_06_at("9eff7fa", "flash_base")
    fwds = gluon_pair(fa, base, ("idle skip", "walk all"))
    cases = [(2, 4, 4, 1000, False), (1, 8, 2, 777, False, True), (1, 4, 1, 300, False),
             (2, 4, 4, 4096, False), (1, 4, 4, 4160, False, True)]  # fmt: skip
    check_pair(fwds, fa, dev, cases, causal=False)
    forward_rounds(fa, fwds, [(B, 32, 32, N, 64, False) for B, N in D64_SHAPES], dev, ROUNDS)
    for mean in (1024, 4096):
        varlen_rows(base, dev, mean)


if __name__ == "__main__":
    main()
