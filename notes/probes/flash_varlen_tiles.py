"""H200 probe (issue 19, session 18): the packed Gluon forward launched over a table of the real (sequence,
query block) tiles, in the dense launch's order (06 as it is; call 2 ran a first form with the heads of a
tile side by side), against a grid of max_seqlen_q's blocks for every sequence and head, whose programs
past their sequence's end stop at once (06 at 072e3fe, BASE).
At 06's varlen rows (65,536 tokens) that grid has 1,005 programs a head at mean length 1k for 546 tiles,
780 for 520 at mean 4k; doubling the empty ones cost 3% without a mask and 6% causal at mean 1k
(flash_varlen_shift.py), so predicted: +2-5% at mean 1k, +1% at mean 4k, minus the table's own launch
(a few microseconds of a ~1.7 ms forward). A serving prefill with one long prompt among short ones (the
last rows: 4,096 + 63 x 64 tokens) is where the grid is mostly empty: there the table should gain most.
Checks first: both against 06's tl kernel on lengths around the tiles, causal and not, at D=64 (its
Gluon forward forced) and 128, and MHA and GQA; then a non-finite sequence next to short ones (fewer
keys than a tile) at D=64 and D=128, the rest exact against the tl kernel, which masks its loads.
Timed by CUDA-graph replay, interleaved over ROUNDS rounds, beside the dense forward on the same tokens.
GPU only:
    BASE=data/06_flash_072e3fe.py python -u notes/probes/flash_varlen_tiles.py   (ROUNDS=3)"""

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


def check(mods, dev):
    def d64(m):  # the module's varlen forward, its D=64 Gluon kernel at every length
        def run(q, k, v, cu, n, causal):
            with m.gluon_d64_forward():
                return m.flash_attention_varlen(q, k, v, cu, cu, n, n, causal)

        return run

    lens = [300, 1, 127, 128, 129, 191, 192, 193, 255, 256, 77, 513]
    check_varlen_runs(fa, dev, lens, {name: d64(m) for name, m in mods.items()})


def check_short_beside_nan(dev):
    """Sequences shorter than a key tile (40, 100, 7 keys) around one whose rows hold inf and NaN in q, k
    and v: the others' outputs equal the tl kernel's (it never loads past a sequence's end)."""
    lens = [40, 100, 64, 7]
    cu = fa.cu_seqlens(lens, dev)
    for D in (64, 128):
        q, k, v = (torch.randn(sum(lens), 4, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        bad = slice(140, 144)  # the first rows of the third sequence
        for t, x in ((q, float("nan")), (k, float("inf")), (v, float("nan"))):
            t[bad] = x
        for causal in (False, True):
            with fa.tl_kernels():
                want = fa.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal)
            with fa.gluon_d64_forward():
                got = fa.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal)
            keep = torch.ones(sum(lens), dtype=torch.bool, device=dev)
            keep[140:204] = False
            finite = bool(got[keep].isfinite().all())
            err = harness.rel_err(got[keep], want[keep])
            print(f"check D={D} causal={causal} short sequences beside inf/NaN: finite {finite}, vs the tl "
                  f"kernel {err:.1e} {'ok' if finite and err < 1e-2 else 'FAILED'}", flush=True)  # fmt: skip


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    mods = {"tiles": fa, "grid": load_06_at("072e3fe", "flash_base")}
    check(mods, dev)
    check_short_beside_nan(dev)
    varlen_mean_rows(fa, mods, dev, ROUNDS)
    lens = fa.mixed_lengths(65536, 4096)
    varlen_rounds(fa, mods, dev, lens, "mean 4096 GQA 32/8", False, ROUNDS, H=32, H_KV=8, mean=4096)
    for causal in (False, True):
        varlen_rounds(fa, mods, dev, [4096] + [64] * 63, "4096 + 63 x 64", causal, ROUNDS)


if __name__ == "__main__":
    main()
