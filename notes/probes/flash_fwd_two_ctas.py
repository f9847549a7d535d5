"""H200 probe (issue 19, session 15): the Gluon forward at D=64 with two programs an SM.

06's D=64 forward is the tl kernel (128 x 64 tiles, 8 warps): 120 registers a thread, so two programs
share an SM, four warpgroups' softmaxes and matmuls to interleave. The Gluon kernel (two consumer
warpgroups, 168 registers a thread at launch, 240 in the consumers) fits one, and at D=64 reads no
better (0.88-1.04x cuDNN against the tl kernel's 0.93-1.02x: notes/probes/flash_fwd_pingpong.py). Here
the Gluon kernel is launched at 80 registers a thread (12 warps: 30,720 of the SM's 65,536, so two
programs fit), the consumer warpgroup it starts takes 112 by warp specialisation, and 64-key blocks
keep a warpgroup's 64 x 64 score tile, its P and its 64 x 64 accumulator within that. Shared memory:
49 KB a program.
Compiled offline (Triton 3.6): 188/128 bytes of spill stores/loads without a mask (228/160 causal), a
few spill instructions in each consumer's loop; 128-key blocks do not fit at all.
Checks first (against 06's tl kernel, dense and packed, causal and not, MHA and GQA), then the forward
beside 06, its Gluon kernel as it is, and cuDNN, by 06's own timing, interleaved over ROUNDS rounds.
Prediction: level with the tl kernel to +5% (the same occupancy, plus the Gluon loop's overlap of S_j
with P_j-1 V within a warpgroup), less what the spills cost.
Measured (session 15, call 6; notes/logs/flash_fwd_two_ctas_8646357_h200.log): 14 checks ok. Two programs
an SM ran 0.87-0.97x of the Gluon kernel as it is (0.84-0.86x cuDNN, where 06's tl kernel read
0.94-0.98x and the Gluon kernel 0.89-0.99x in the same rounds). Prediction missed: the spills and the
64-key blocks' per-block costs outweigh the second program's overlap. Not kept.
GPU only:  python -u notes/probes/flash_fwd_two_ctas.py   (ROUNDS=3 by default)"""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_dkdv_serial import edit, load_variants  # noqa: E402  (this folder is on sys.path)
from flash_rounds import check_forwards, d64_forward_rounds, gluon_fwd  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
WORKERS = (
    "            (_g_producer, (descs, smem, bars, geom, out, qk_scale, BLOCK_N, CAUSAL)),\n"
    "        ], [4, 1], [240, 24])"
)  # the forward's warp_specialize: the second consumer warpgroup's registers
LAUNCH = "causal, varlen, num_warps=4,\n                            maxnreg=168)"


def two_ctas(src: str) -> str:
    src = edit(src, WORKERS, WORKERS.replace("[240, 24]", "[112, 24]"))
    return edit(src, LAUNCH, LAUNCH.replace("168", "80"))


def main(mods):
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    base, two = mods["06"], mods["two_ctas"]
    two.GLUON_FWD["BLOCK_N"] = 64
    fwds = {
        "gluon": lambda q, k, v, c, cu: gluon_fwd(base, q, k, v, c, cu)[0],
        "two ctas": lambda q, k, v, c, cu: gluon_fwd(two, q, k, v, c, cu)[0],
    }
    cases = [(2, 4, 4, 1000, True), (1, 8, 2, 777, False), (2, 4, 4, 1024, False), (1, 4, 1, 300, True),
             (1, 4, 4, 64, True)]  # fmt: skip
    check_forwards(fwds, base, 64, device, cases)
    d64_forward_rounds(base, fwds, device, ROUNDS)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"06": lambda s: s, "two_ctas": two_ctas}
        main(load_variants(variants, list(variants), (ROOT / "06_flash.py").read_text(), Path(tmp)))
