"""H200 probe (issue 19, session 22): the packed (varlen) D=128 Gluon forward as persistent programs (06
as it is) against a program per row of the tile table and head (06 at c7c3f63, BASE), beside the dense
forward on the same tokens.
Why: at c4fb2d2 the dense D=128 forward became persistent (1.02-1.15x a program a tile) and the varlen
rows, measured against it, fell to 0.96x / 0.89x at mean length 1k without a mask / causal (the issue
asks within 10%). The persistent packed forward walks the table's tiles p, p + programs, ... (causal,
units of two tiles, a head's blocks heavy and light in turn), up to the count of real tiles, which the
table's last row holds; D=64 stays a program a tile. Offline (Triton 3.6, sm_90a) its loops compile
without spills: 904 / 906 instructions without a mask, 1,034 / 1,036 causal (900 / 932 and 1,030 / 1,062
a program a tile). Prediction: +4-8% at mean 1k (the dense rows at 1k-2k gained 4-14%), +2-4% at mean 4k;
the 4,096 + 63 x 64 prefill mix less or negative (one long sequence's tiles are few and heavy: a static
share of them may leave programs idle at the end, where a program a tile is scheduled as SMs free up).
Checks first: the persistent forward against 06's tl kernel on lengths around the tiles (MHA and GQA,
causal and not, D=64 and 128) on every SM and on 1, 2, 3 and 7 programs; short sequences beside inf/NaN
rows. Then interleaved rounds (CUDA-graph replay) of 06's varlen rows and the prefill mix; `seeds`: mean
4k over three seeds' lengths (7 rounds without a mask) and mean 2k.
Measured (session 22, the persistent forward then a patch on c7c3f63;
notes/logs/flash_varlen_persistent_c7c3f63_patch_h200.log, ..._patch_seeds_h200.log): 42 checks ok.
Persistent against a program a tile, without a mask / causal: mean 1k 1.04x / 1.08x (483 against 465
TFLOP/s, 372 against 344; 0.90x / 0.92x dense, was 0.87x / 0.85x in this run); mean 2k 1.04x without a mask;
mean 4k 1.01-1.02x / 1.02-1.04x over three seeds (the first run's 0.91x without a mask was one noisy row:
525-596 across its 3 rounds, 588-602 across 7 in the second), GQA 32/8 1.01x / 1.03x; the prefill mix 1.07x
/ 1.11x. A repeat at 32c738f (persistent landed, against BASE;
notes/logs/flash_varlen_persistent_32c738f_h200.log): 42 checks ok; mean 1k 1.05x / 1.07x, mean 4k 0.99x /
1.04x (persistent's first round without a mask low again, 512), GQA 1.02x / 1.03x, the mix 1.07x / 1.10x. So
06 takes it (GLUON_FWD's PERSISTENT now covers packed rows).
GPU only:
    BASE=data/06_flash_c7c3f63.py python -u notes/probes/flash_varlen_persistent.py [seeds]   (ROUNDS=3)"""

import contextlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "notes" / "probes"))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import check_varlen_runs, load_06_at, varlen_mean_rows, varlen_rounds  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
fa = harness.load_build("06_flash")


def check(dev):
    def on(programs):  # 06's varlen forward on this many persistent programs (None: one an SM)
        def run(q, k, v, cu, n, causal):
            with fa.fixed_programs(programs) if programs else contextlib.nullcontext():
                return fa.flash_attention_varlen(q, k, v, cu, cu, n, n, causal)

        return run

    lens = [300, 1, 127, 128, 129, 191, 192, 193, 255, 256, 77, 513, 1500]
    runs = {f"on {p or 'every SM'} programs": on(p) for p in (None, 1, 2, 3, 7)}
    check_varlen_runs(fa, dev, lens, runs)
    for causal in (False, True):
        got = fa.check_isolation(True, causal, 128, torch.bfloat16, dev)
        print(f"check D=128 varlen causal={causal} beside inf/NaN rows: {got} ok", flush=True)


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    mods = {"persistent": fa, "a tile a program": load_06_at("c7c3f63", "flash_base")}
    if sys.argv[1:] == ["seeds"]:
        for seed in (0, 1, 2):
            lens = fa.mixed_lengths(65536, 4096, seed)
            print(f"seed {seed} lens {lens}", flush=True)
            for causal in (False, True):
                rounds = ROUNDS if causal else 7
                varlen_rounds(fa, mods, dev, lens, f"mean 4096 seed {seed}", causal, rounds, mean=4096)
        varlen_rounds(fa, mods, dev, fa.mixed_lengths(65536, 2048), "mean 2048", False, 5, mean=2048)
        return
    check(dev)
    varlen_mean_rows(fa, mods, dev, ROUNDS)
    lens = fa.mixed_lengths(65536, 4096)
    for causal in (False, True):
        varlen_rounds(fa, mods, dev, lens, "mean 4096 GQA 32/8", causal, ROUNDS, H=32, H_KV=8, mean=4096)
        varlen_rounds(fa, mods, dev, [4096] + [64] * 63, "4096 + 63 x 64", causal, ROUNDS)


if __name__ == "__main__":
    main()
