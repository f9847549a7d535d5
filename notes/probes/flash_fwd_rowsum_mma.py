"""H200 probe (issue 19, session 16): the forward's row sums l by the tensor cores, P times a block of ones.

At D=64 the tl forward (06's route there) is bound by issue and by MUFU at once (session 8's exp2 probe,
notes/06_flash.md): per 128 x 64 block its loop is 302 SASS instructions a thread for 32 scores, of
which 34 MUFU and 160 the softmax's own (FFMA, FMNMX, MUFU, F2FP, and the FADDs and shuffles of
l += rowsum(p)). Summing P on the tensor cores instead, l = alpha * l + P @ ones(BLOCK_N, 16) (16: the
narrowest tl.dot), takes those FADDs off the issue slots at the price of a wgmma of 16 columns beside
P V's 64 (one eighth more tensor work at D=64). l is then the sum of the bf16 P that P V multiplies,
which makes o = acc / l normalise exactly the weights it used.
Offline (Triton 3.6, sm_90a, flash_ptxas.py --loops): the D=64 full loop 302 -> 268 instructions at
128 x 64 (HGMMA 8 -> 12), 454 -> 399 at 128 x 128; causal 292 -> 270 and 452 -> 399; no spills.
Prediction: D=64 forward +2-6% (the FADDs were ~11% of the loop's issue, and MUFU stays as it was);
the same code at D=128 (tl kernel, checked here but not the H200's route) about unchanged.
Checks first (flash_rounds.check_forwards against 06's tl kernel, D=64 and D=128, dense and packed),
then the forward beside 06 and cuDNN at D=64 over ROUNDS interleaved rounds, then each module's
autotuned tile per shape.
Measured (session 16, call 3; notes/logs/flash_fwd_rowsum_mma_c351bd4_h200.log; 14 checks ok): 0.94-1.01x
of 06 (medians of three rounds; causal 4k 0.94x, 16k 0.97x), x cuDNN 0.89-0.96 against 06's 0.94-0.99.
Missed: the loop is not bound by its issue slots; the extra wgmma and its accumulator cost more than
the FADDs saved. Not kept.
GPU only:  python -u notes/probes/flash_fwd_rowsum_mma.py   (ROUNDS=3 by default)"""

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402, F401  (before torch: the project's import order)

import torch  # noqa: E402
from flash_dkdv_serial import edit, load_variants  # noqa: E402  (this folder is on sys.path)
from flash_rounds import check_forwards, d64_forward_rounds  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "3"))
EDITS = [
    ("        alpha = tl.math.exp2(m_i - m_new)\n        l_i = l_i * alpha + tl.sum(p, 1)\n",
     "        alpha = tl.math.exp2(m_i - m_new)\n"),
    ("        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # acc = alpha * acc + p v\n",
     "        p = p.to(v.dtype)\n"
     "        acc = tl.dot(p, v, acc * alpha[:, None])  # acc = alpha * acc + p v\n"
     "        l_i = tl.dot(p, tl.full([BLOCK_N, 16], 1.0, v.dtype), l_i * alpha[:, None])\n"),
    ("        l_i = tl.zeros([BLOCK_M], tl.float32)\n",
     "        l_i = tl.zeros([BLOCK_M, 16], tl.float32)\n"),
    ("        o = acc / l_i[:, None]\n", "        l_i = tl.max(l_i, 1)  # its 16 columns are equal\n"
     "        o = acc / l_i[:, None]\n"),
]  # fmt: skip


def ones(src: str) -> str:
    for old, new in EDITS:
        src = edit(src, old, new)
    return src


def forward(mod):
    """fn(q, k, v, causal, cu) -> o through mod's public entry points, tl kernels only."""

    def fwd(q, k, v, causal, cu):
        with mod.tl_kernels():
            if cu is None:
                return mod.flash_attention(q, k, v, causal)
            return mod.flash_attention_varlen(q, k, v, cu[0], cu[1], cu[2], cu[2], causal)

    return fwd


def main():
    dev = torch.device("cuda")
    import triton

    print("torch", torch.__version__, " triton", triton.__version__, " device", torch.cuda.get_device_name())
    with tempfile.TemporaryDirectory() as tmp:
        mods = load_variants({"base": lambda s: s, "ones": ones}, ["base", "ones"],
                             (HERE.parents[1] / "06_flash.py").read_text(), Path(tmp))  # fmt: skip
        fwds = {"ones": forward(mods["ones"])}
        cases = [(2, 4, 4, 1000, True), (1, 8, 2, 777, False, True), (2, 4, 4, 1024, False),
                 (1, 4, 1, 300, True), (1, 4, 4, 64, True)]  # fmt: skip
        for D in (64, 128):
            check_forwards(fwds, mods["base"], D, dev, cases)
        d64_forward_rounds(mods["base"], fwds, dev, ROUNDS)
        for name, mod in mods.items():
            for key, cfg in mod._fwd_kernel.cache.items():
                print(f"{name} tile {key}: {cfg}", flush=True)


if __name__ == "__main__":
    main()
