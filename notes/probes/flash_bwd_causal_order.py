"""H200 probe (issue 19, session 20): the causal Gluon dK/dV kernel heaviest first (06 now) against its
old launch (BASE, 06 at 573e360). The ordered kernel launched each head's key blocks last first, so that
every program waits only on programs launched before it; the lightest block came first and key block 0,
the heaviest, last, and the last heads' heaviest blocks ran on alone at the end. A list-scheduling model
(132 SMs; notes/probes/flash_bwd_order_model.py) puts that at 1.08x the ideal at MHA 4k-16k (B x H =
64, 32, 16) and 1.04x at GQA 32/8 in one-head shares. Now the launch takes key block 0 first, over a
group of units (causal_units) at a time; the dQ adds go up from key block 0 and every program walks its
query blocks from the last down, each for every one of its heads in turn, so that all key blocks reach
a query block at the same step and the order of their launch is the order of their adds.
06's checks of the causal kernel first (the ordered ones bitwise the same twice), then the backward by
06's own timing (_time: CUDA-graph replay), ROUNDS interleaved rounds beside cuDNN: the default, the
old launch, whole GQA groups (one program walking the group's 4 heads, no shares), other group sizes,
and deterministic=False (the same launch, unordered adds). GPU only:
    BASE=data/06_flash_573e360.py CALL=1 python -u notes/probes/flash_bwd_causal_order.py
CALL=1, 2 or 3 picks the rows and variants of session 20's calls (3 by default: BASE 06 at 393012b, and
"old launch" is that one's); CHECKS=0 skips the checks."""

import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import bwd_inputs, bwd_rounds, load_06_at  # noqa: E402  (this folder is on sys.path)

fa = harness.load_build("06_flash")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
# (B, H, H_KV, N, causal) -> extra variants: ("splits", n) or ("units", n)
CALLS = {
    "1": {  # the first call, with one-head shares of a causal group (dkdv_splits then)
        (2, 16, 16, 8192, True): [("units", 8), ("units", 2)],
        (4, 16, 16, 4096, True): [("units", 16)],
        (1, 16, 16, 16384, True): [],
        (2, 32, 8, 8192, True): [("splits", 1), ("splits", 2)],
        (8, 32, 8, 2048, True): [("splits", 1)],
        (4, 32, 1, 4096, True): [("splits", 8)],
        (2, 16, 16, 8192, False): [],  # a control: the launch without a mask is unchanged
    },
    "2": {  # dkdv_splits' rule for every mask now: the fewest shares that give 4 programs an SM
        (2, 16, 16, 8192, True): [],
        (2, 32, 8, 8192, True): [("splits", 2), ("splits", 4), ("units", 4)],
        (8, 32, 8, 2048, True): [("splits", 2)],
        (4, 32, 1, 4096, True): [("splits", 4), ("splits", 16)],
    },
    "3": {  # causal_units' wave floor (BASE: 06 at 393012b, its groups sized by L2 alone)
        (4, 32, 1, 4096, True): [],  # 4 units a group (2 at 393012b)
        (8, 32, 8, 2048, True): [],  # 8 (4)
        (1, 32, 1, 4096, True): [("splits", 8), ("splits", 16)],  # one-head shares, 8 (8); 4 (2), 4 (4)
        (1, 7, 7, 8192, True): [],  # 7 (1: no divisor of 7 from 2 to 4)
        (2, 16, 16, 8192, True): [],  # 4 (4): a control
        (2, 32, 8, 8192, True): [],  # 2 (2): a control
    },
}
CALL = os.environ.get("CALL", "3")
SHAPES = CALLS[CALL]
BASE_AT = "393012b" if CALL == "3" else "573e360"  # what "old launch" runs
base = load_06_at(BASE_AT, f"flash_{BASE_AT}")


@contextlib.contextmanager
def fixed_units(n):
    """06's causal launch with n units a group (where n divides the rows)."""
    old = fa.causal_units
    fa.causal_units = lambda rows, *a: n if rows % n == 0 else old(rows, *a)
    try:
        yield
    finally:
        fa.causal_units = old


def checks(device):
    checks = harness.Checks()
    bf16 = torch.bfloat16
    cases = [((3, 4, 4, 1000, 1000, 128, True), None), ((2, 8, 2, 1000, 1000, 128, True), None),
             ((2, 8, 2, 1000, 1000, 128, True), 1), ((2, 8, 2, 1000, 1000, 128, True), 2),
             ((1, 8, 1, 1111, 1111, 128, True), None), ((1, 8, 1, 1111, 1111, 128, True), 2),
             ((1, 6, 6, 2000, 2000, 128, True), None), ((1, 7, 7, 2000, 2000, 128, True), None)]  # fmt: skip
    for s, splits in cases:
        ctx = fa.fixed_dkdv_splits(splits) if splits else contextlib.nullcontext()
        with ctx, fa.two_kernel_backward(False):
            name = f"{s} splits {splits or 'default'}, ordered, repeatable"
            checks(name, fa.check_dense, *s, bf16, device, repeat=True)
            checks(f"{s} splits {splits or 'default'}, unordered", fa.check_dense, *s, bf16, device, False)
    for units in (1, 3):  # every unit in a group of its own, and groups of 3 of the 6 rows
        with fixed_units(units), fa.two_kernel_backward(False):
            s = (1, 6, 6, 2000, 2000, 128, True)
            checks(f"{s} units {units}, ordered, repeatable", fa.check_dense, *s, bf16, device, repeat=True)
    for s in [(1, 32, 8, 2048, 2048, 128, True), (1, 32, 1, 4096, 4096, 128, True)]:
        checks(f"{s} default, repeatable", fa.check_dense, *s, bf16, device, repeat=True)
    print(f"checks failed: {checks.failed or 'none'}; timing anyway", flush=True)


def main():
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    if os.environ.get("CHECKS") != "0":
        checks(device)
    for (B, H, H_KV, N, causal), extra in SHAPES.items():
        q, k, v, do = bwd_inputs(B, H, H_KV, N, device)
        impls, old = fa._impls(causal), base._impls(causal)
        runs = [("cudnn", *impls["cudnn"]), ("heavy first", *impls["ours"]), ("old launch", *old["ours"])]
        for kind, n in extra:
            ctx = (lambda n=n: fa.fixed_dkdv_splits(n)) if kind == "splits" else (lambda n=n: fixed_units(n))
            runs.append((f"{kind} {n}", impls["ours"][0], ctx))
        if (B, H, N) in ((2, 16, 8192), (2, 32, 8192)) and causal:
            runs += [("unordered", *impls["ours_atomic"]), ("old unordered", *old["ours_atomic"])]
        bwd_rounds(fa, (B, H, H_KV, N, causal), runs, ROUNDS, (q, k, v, do, device))


if __name__ == "__main__":
    main()
