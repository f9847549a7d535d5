"""H200 probe (issue 19, session 19): the Gluon dK/dV kernel's shares of a query group summing dK and dV
in share order through one fp32 running sum (06 now) against each share writing its own fp32 partial
sums, added up by torch afterwards (BASE, 06 at 3235d40). With a causal mask the default (ordered)
backward gives every program one head, so GQA 32/8 runs in shares of 4 and MQA in shares of 32; the
partial sums cost (shares + 1) x 4 + 4 + 2 bytes an element of dK and of dV in DRAM against about 6.
06's checks of the shares first (against float64 and SDPA; the ordered ones bitwise the same twice),
then the backward by 06's own timing (_time: CUDA-graph replay), ROUNDS interleaved rounds beside cuDNN.
GPU only:  BASE=data/06_flash_3235d40.py python -u notes/probes/flash_bwd_chain.py"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import bwd_inputs, bwd_rounds, load_06_at  # noqa: E402  (this folder is on sys.path)

fa = harness.load_build("06_flash")
base = load_06_at("3235d40", "flash_3235d40")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
# (B, H, H_KV, N, causal): GQA 32/8 and MQA rows of the benchmark, and MHA (no shares: a control)
SHAPES = [(2, 32, 8, 8192, True), (2, 32, 8, 8192, False), (4, 32, 1, 4096, True),
          (4, 32, 1, 4096, False), (8, 32, 8, 2048, True), (2, 16, 16, 8192, True)]  # fmt: skip


def checks(device):
    checks = harness.Checks()
    bf16 = torch.bfloat16
    for s, splits in [((2, 8, 2, 1000, 1000, 128, True), 2), ((1, 8, 1, 300, 1111, 128, False), 4)]:
        for det in (True, False):
            with fa.fixed_dkdv_splits(splits):
                checks(f"{s} in {splits} shares, deterministic={det}", fa.check_dense, *s, bf16, device, det)
    ordered = [((2, 8, 2, 1000, 1000, 128, True), 2), ((1, 8, 1, 1111, 1111, 128, False), 4),
               ((1, 8, 1, 1111, 1111, 128, True), 8), ((2, 8, 2, 777, 777, 128, False), 4)]  # fmt: skip
    for s, splits in ordered:
        with fa.fixed_dkdv_splits(splits), fa.two_kernel_backward(False):
            name = f"{s} in {splits} shares, ordered, repeatable"
            checks(name, fa.check_dense, *s, bf16, device, repeat=True)
    for s in [(1, 32, 8, 2048, 2048, 128, True), (1, 32, 1, 4096, 4096, 128, True),
              (1, 32, 1, 4096, 4096, 128, False)]:  # fmt: skip
        checks(f"{s} default shares, repeatable", fa.check_dense, *s, bf16, device, repeat=True)
    print(f"checks failed: {checks.failed or 'none'}; timing anyway", flush=True)


def main():
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    checks(device)
    for B, H, H_KV, N, causal in SHAPES:
        q, k, v, do = bwd_inputs(B, H, H_KV, N, device)
        impls, old = fa._impls(causal), base._impls(causal)
        runs = [
            ("cudnn", *impls["cudnn"]),
            ("chain", *impls["ours"]),
            ("partials", *old["ours"]),
            ("chain unordered", *impls["ours_atomic"]),
            ("partials unordered", *old["ours_atomic"]),
        ]
        bwd_rounds(fa, (B, H, H_KV, N, causal), runs, ROUNDS, (q, k, v, do, device))


if __name__ == "__main__":
    main()
