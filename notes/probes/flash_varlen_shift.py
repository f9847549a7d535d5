"""H200 probe (issue 19, session 17): the packed varlen forward's last key block read from seq_k - 128
on, so that its tile ends with the sequence (06 as it is), against zeroing the V rows past the end in
shared memory (06 at 2b68114, BASE). Both Gluon kernels at D=128, each module with its own compiled
kernels, timed by 06's _time (CUDA-graph replay, L2 flushed), interleaved over ROUNDS rounds, on 06's
varlen rows (65,536 tokens of mixed lengths) beside the dense forward on the same tokens. One more
row launches the shifted kernel with max_seqlen doubled: twice the grid, the added programs empty, so
what an empty program costs. Checks first: both against 06's tl kernel on lengths around the tile
(1, 127, 128, 129, 255, 256, 300), causal and not. GPU only:
    BASE=data/06_flash_2b68114.py python -u notes/probes/flash_varlen_shift.py   (ROUNDS=5 by default)
(BASE defaults to `git show 2b68114:06_flash.py` where git has the history.)"""

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "notes" / "probes"))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import load_06_at  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "5"))
fa = harness.load_build("06_flash")


def check(mods, dev):
    lens = [300, 1, 127, 128, 129, 255, 256, 77, 513]
    cu = fa.cu_seqlens(lens, dev)
    q, k, v = (torch.randn(sum(lens), 8, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    for causal in (False, True):
        with fa.tl_kernels():
            want = fa.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal)
        for name, m in mods.items():
            got = m.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal)
            err = harness.rel_err(got, want)
            print(f"check {name} varlen {lens} causal={causal}: vs the tl kernel {err:.1e} "
                  f"{'ok' if err < 1e-2 else 'FAILED'}", flush=True)  # fmt: skip


def rows(mods, dev, mean, causal, tokens=65536, H=16, D=128):
    lens = fa.mixed_lengths(tokens, mean)
    cu, n = fa.cu_seqlens(lens, dev), max(lens)
    q, k, v = (torch.randn(tokens, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    B = tokens // mean
    qd, kd, vd = (torch.randn(B, H, mean, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    half = 0.5 if causal else 1.0
    flops = sum(4 * H * x * x * D * half for x in lens)

    def varlen(m, n_grid):  # n_grid: the max_seqlen_q the grid is sized by
        return lambda: m.flash_attention_varlen(q, k, v, cu, cu, n_grid, n, causal, check_offsets=False)

    runs = {name: (varlen(m, n), flops) for name, m in mods.items()}
    runs["shifted, grid x2"] = (varlen(fa, 2 * n), flops)
    runs["dense"] = (lambda: fa.flash_attention(qd, kd, vd, causal), 4 * B * H * mean * mean * D * half)
    tf = {}
    for r in range(ROUNDS):
        for name, (fn, fl) in runs.items():
            ms = harness.bench(fn, dev, graph=True)
            tf.setdefault(name, []).append(fl / ms / 1e9)
        print(
            f"mean {mean} {'causal' if causal else 'full'} round {r}: "
            + ", ".join(f"{k} {v[-1]:.0f}" for k, v in tf.items()),
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in tf.items()}
    print(
        f"mean {mean} {'causal' if causal else 'full'} median TFLOP/s: "
        + ", ".join(f"{k} {v:.0f} ({v / med['dense']:.3f}x dense)" for k, v in med.items()),
        flush=True,
    )


def main():
    dev = torch.device("cuda")
    print(harness.env_line(dev, torch.bfloat16), flush=True)
    mods = {"shifted": fa, "zeroed": load_06_at("2b68114", "flash_base")}
    check(mods, dev)
    for mean in (1024, 4096):
        for causal in (False, True):
            rows(mods, dev, mean, causal)


if __name__ == "__main__":
    main()
