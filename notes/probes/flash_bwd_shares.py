"""H200 probe (issue 19, session 19): how many shares a kv head's query group should take in the Gluon
dK/dV kernel now that the shares sum dK, dV in order inside it (8d192cc) rather than through fp32
partials. dkdv_splits takes the fewest shares that give 4 programs an SM (MQA 4k without a mask: 8),
and one head a share with a causal mask (GQA 32/8: 4, MQA: 32). Each backward beside cuDNN under
fixed_dkdv_splits, in interleaved rounds; MHA causal 8k too, for GQA's per-FLOP ratio in the same rounds.
06's checks of the share counts timed here first (bitwise the same twice). GPU only:
    python -u notes/probes/flash_bwd_shares.py   (ROUNDS=3; GQA=1: only the 8k causal MHA and GQA rows,
    without the checks, whose shares 06's own checks cover)"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import bwd_inputs, bwd_rounds  # noqa: E402  (this folder is on sys.path)

fa = harness.load_build("06_flash")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
# (B, H, H_KV, N, causal) -> share counts to time beside the default (None)
SHARES = {
    (2, 16, 16, 8192, True): (None,),
    (2, 32, 8, 8192, True): (None, 2),
    (4, 32, 1, 4096, False): (None, 4, 16, 32),
    (4, 32, 1, 4096, True): (None, 16, 8),
}
if os.environ.get("GQA") == "1":
    SHARES = {s: c for s, c in SHARES.items() if s[3] == 8192}


def checks(device):
    checks = harness.Checks()
    for s, splits in [((1, 32, 1, 1111, 1111, 128, False), 16), ((1, 32, 1, 1111, 1111, 128, True), 16),
                      ((1, 32, 1, 1111, 1111, 128, False), 32)]:  # fmt: skip
        with fa.fixed_dkdv_splits(splits):
            name = f"{s} in {splits} shares, repeatable"
            checks(name, fa.check_dense, *s, torch.bfloat16, device, repeat=True)
    print(f"checks failed: {checks.failed or 'none'}; timing anyway", flush=True)


def main():
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    if os.environ.get("GQA") != "1":
        checks(device)
    for (B, H, H_KV, N, causal), counts in SHARES.items():
        q, k, v, do = bwd_inputs(B, H, H_KV, N, device)
        impls = fa._impls(causal)
        runs = [("cudnn", *impls["cudnn"])]
        for n in counts:
            ctx = None if n is None else (lambda n=n: fa.fixed_dkdv_splits(n))
            runs.append(("default" if n is None else f"{n} shares", impls["ours"][0], ctx))
        bwd_rounds(fa, (B, H, H_KV, N, causal), runs, ROUNDS, (q, k, v, do, device))


if __name__ == "__main__":
    main()
