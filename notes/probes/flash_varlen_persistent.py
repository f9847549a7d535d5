"""H200 probe (issue 19, session 21, written then; not yet run): the packed (varlen) D=128 Gluon forward as
persistent programs, 06 with flash_varlen_persistent.patch applied, against 06 as it is (a program per
row of the tile table and head), beside the dense forward on the same tokens.
Why: at c4fb2d2 the dense D=128 forward became persistent (1.02-1.15x a program a tile) and the varlen
rows, measured against it, fell to 0.96x / 0.89x at mean length 1k without a mask / causal (the issue
asks within 10%). The patch walks the table's tiles in persistent programs: tiles p, p + programs, ...
(causal, units of two tiles, a head's blocks heavy and light in turn), up to the count of real tiles,
which the table's new last row holds; D=64 stays a program a tile. Offline (Triton 3.6, sm_90a) its
loops compile without spills: 904 / 906 instructions without a mask, 1,034 / 1,036 causal (900 / 932 and
1,030 / 1,062 a program a tile). tests/test_flash.py needs flash_varlen_persistent_tests.patch with it.
Prediction: +4-8% at mean 1k (the dense rows at 1k-2k gained 4-14%), +2-4% at mean 4k; the 4,096 + 63 x
64 prefill mix less or negative (one long sequence's tiles are few and heavy: a static share of them
may leave programs idle at the end, where a program a tile is scheduled as SMs free up).
Checks first: the patched forward against 06's tl kernel on lengths around the tiles (MHA and GQA,
causal and not, D=64 and 128) on every SM and on 1, 2, 3 and 7 programs; short sequences beside inf/NaN
rows. Then interleaved rounds (CUDA-graph replay) of 06's varlen rows and the prefill mix. If it holds,
apply both patches (`patch -p1 < notes/probes/flash_varlen_persistent.patch`, the same for the tests),
fill in the measured numbers where the patch's comment says "To be measured", and run 06's checks (the
patch adds two: the packed forward on 3 programs). GPU only:
    python -u notes/probes/flash_varlen_persistent.py   (ROUNDS=3)"""

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "notes" / "probes"))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import load_module, varlen_rounds  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
fa = harness.load_build("06_flash")


def load_patched():
    """06_flash.py as it is in this tree with flash_varlen_persistent.patch applied, as its own module."""
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "flash_varlen_persistent.py"
    with open(Path(__file__).with_name("flash_varlen_persistent.patch")) as diff:
        done = subprocess.run(["patch", "-s", "-o", path, ROOT / "06_flash.py"], stdin=diff)
    if done.returncode:
        raise SystemExit("flash_varlen_persistent.patch no longer applies to 06_flash.py")
    return load_module(path, path.stem)


def check(new, dev):
    lens = [300, 1, 127, 128, 129, 191, 192, 193, 255, 256, 77, 513, 1500]
    cu = fa.cu_seqlens(lens, dev)
    for programs in (None, 1, 2, 3, 7):
        for D in (64, 128):
            for H, H_KV in ((8, 8), (8, 2)):
                q = torch.randn(sum(lens), H, D, device=dev, dtype=torch.bfloat16)
                k, v = (torch.randn(sum(lens), H_KV, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
                for causal in (False, True):
                    with fa.tl_kernels():
                        want = fa.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal)
                    with new.fixed_programs(programs) if programs else contextlib.nullcontext():
                        got = new.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal)
                    err = harness.rel_err(got, want)
                    where = f"on {programs or 'every SM'} programs"
                    print(f"check D={D} {H}/{H_KV} causal={causal} {where}: vs the tl kernel {err:.1e} "
                          f"{'ok' if err < 1e-2 else 'FAILED'}", flush=True)  # fmt: skip
    for causal in (False, True):
        got = new.check_isolation(True, causal, 128, torch.bfloat16, dev)
        print(f"check D=128 varlen causal={causal} beside inf/NaN rows: {got} ok", flush=True)


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    new = load_patched()
    check(new, dev)
    mods = {"persistent": new, "a tile a program": fa}
    for mean in (1024, 4096):
        for causal in (False, True):
            varlen_rounds(
                fa, mods, dev, fa.mixed_lengths(65536, mean), f"mean {mean}", causal, ROUNDS, mean=mean
            )
    lens = fa.mixed_lengths(65536, 4096)
    for causal in (False, True):
        varlen_rounds(fa, mods, dev, lens, "mean 4096 GQA 32/8", causal, ROUNDS, H=32, H_KV=8, mean=4096)
        varlen_rounds(fa, mods, dev, [4096] + [64] * 63, "4096 + 63 x 64", causal, ROUNDS)


if __name__ == "__main__":
    main()
