"""H200 probe (issue 19, session 16): FlashAttention-3's D=64 shape without spills, by converting P to
bf16 at the end of each step instead of at the start of the next.

Three consumer warpgroups with 128-key blocks and P in registers (FlashAttention-3's D=64 tile, 192 x
128) spilled ~3 KB a thread at their 160 registers (session 15), so the probes before took 64-key
blocks (flash_fwd_pingpong.py) or sent P through shared memory (flash_fwd_p_smem.py: -10-13%). The
SASS says why it spilled: 06's consumer converts P_j-1 to bf16 at the top of step j, just before the
S_j matmul, but LLVM builds the packed bf16 pairs only where the P V matmul reads them, after S_j is
issued, and ptxas keeps it so. S_j's accumulator (64 registers) then overwrites the registers where
the scores were, so the 64 fp32 values of P_j-1 cannot stay in place and live elsewhere until they
are packed: 64 + 64 + 32 (O) + 32 (the bf16 P) is over 160, and they spill. Converted at the end of
step j-1 instead (after P_j-2 V's wait, before the loop's back edge, which ptxas does not move code
across), P_j-1 is 32 packed registers before S_j starts.
Offline (Triton 3.6, sm_90a), 192 x 128 at D=64: spills 3,020/3,248 bytes -> 0, and the key loop 1,087
-> 827 instructions (no LDL/STL), the same as two warpgroups'; also with three K and V ring slots
(123 KB of shared memory) and with ping-pong turns. Two warpgroups: unchanged at 827 instructions.
Configurations (flash_fwd_pingpong.patch's 06 with this edit, "late", or without, "g2" = 06's Gluon
forward): two or three consumer warpgroups, two or three ring slots, ping-pong turns or not.
Prediction: three warpgroups +5-10% over two at D=64 (the shared-memory variant's third warpgroup
bought 7-11%), so 1.00-1.05x cuDNN where two read 0.93-0.99x; the late conversion alone +-2%, at D=128
too; ping-pong +-2% (session 15).
Checks first (flash_rounds.check_forwards against 06's tl kernel, dense and packed; D=128 for the
two-warpgroup variant), then the forward beside 06 and cuDNN at D=64 over ROUNDS interleaved rounds,
then D=128 MHA at 4k and 16k beside 06's Gluon forward.
Measured (session 16, call 4; notes/logs/flash_fwd_late_convert_da2323e_h200.log; 42 checks ok), x cuDNN
at D=64, 4k full / 4k causal / 8k / 8k causal / 16k / 16k causal: g2 0.93 0.92 0.99 0.98 0.98 1.02; g2 late
0.93 0.91 0.98 0.97 0.97 1.00; g3 late 0.99 0.95 1.07 1.06 1.04 1.07; g3 late s3 0.99 0.93 1.09 1.06 1.03
1.08; g3 late pp 0.98 0.91 1.05 1.06 1.07 1.06 (06's tl kernel 0.93 0.95 0.97 0.98 0.97 1.00). D=128, g2
late against 06's Gluon forward: 587 / 578, 509 / 515, 595 / 597 TFLOP/s. The prediction held: three
warpgroups 1.04-1.09x two. Taken into 06 as its D=64 forward (g3 late), the late conversion for D=128 too.
GPU only:  python -u notes/probes/flash_fwd_late_convert.py   (ROUNDS=3 by default)
Offline:   python notes/probes/flash_fwd_late_convert.py --compile   (Triton 3.6; registers, spills, loops)"""

import os
import sys
from pathlib import Path

if "--compile" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "0"  # before harness: compile for sm_90a, do not interpret
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_dkdv_serial import edit  # noqa: E402  (this folder is on sys.path)
from flash_rounds import (  # noqa: E402  (this folder is on sys.path)
    Compiling,
    check_forwards,
    configured_fwd,
    d64_forward_rounds,
    interleaved,
    load_pingpong,
)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
# name -> (BLOCK_M, BLOCK_N, K and V ring slots, ping-pong turns, P converted late)
CONFIGS = {
    "g2": (128, 128, 2, False, False),
    "g2 late": (128, 128, 2, False, True),
    "g3 late": (192, 128, 2, False, True),
    "g3 late s3": (192, 128, 3, False, True),
    "g3 late pp": (192, 128, 2, True, True),
}
CONVERT = "        p_op = gl.convert_layout(p.to(dtype), p_layout)\n"
LATE_EDITS = [
    (CONVERT.rstrip("\n") + "  # block j-1's P: no matmul reads P's registers now\n", ""),
    ("CAUSAL)\n    for j in range(1, n_blocks):\n",
     "CAUSAL)\n" + CONVERT[4:] + "    for j in range(1, n_blocks):\n"),
    (
        "        acc, p_op = warpgroup_mma_wait(0, deps=[o_tok, p_op])\n"
        "        mbarrier.arrive(v_empty.index(prev), count=1)\n",
        "        acc, p_op = warpgroup_mma_wait(0, deps=[o_tok, p_op])\n"
        "        mbarrier.arrive(v_empty.index(prev), count=1)\n" + CONVERT,
    ),
    (
        "acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_last, acc)",
        "acc = warpgroup_mma(p_op, v_last, acc)",
    ),
]  # fmt: skip


def late(src: str) -> str:
    for old, new in LATE_EDITS:
        src = edit(src, old, new)
    return src


MODS = {name: load_pingpong(name, late if cfg[4] else None) for name, cfg in CONFIGS.items()}


def configured(name):
    """fn(q, k, v, causal, cu) -> o: the Gluon forward of configuration name."""
    return configured_fwd(MODS[name], *CONFIGS[name][:4])


def compile_only():
    """Each configuration for sm_90a, bf16, D=64, causal and not: registers, spills, loops."""
    for name, fa in MODS.items():
        fa._fwd_kernel_gluon = Compiling(fa._fwd_kernel_gluon)
        for causal in (False, True):
            print(f"{name} {CONFIGS[name]} D=64 {'causal' if causal else 'full'}:", flush=True)
            q, k = (torch.empty(1, h, 1000, 64, dtype=torch.bfloat16) for h in (4, 2))
            configured(name)(q, k, k, causal)


def main():
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    base = harness.load_build("06_flash")
    cases = [(2, 4, 4, 1000, True), (1, 8, 2, 777, False, True), (2, 4, 4, 1024, False),
             (1, 4, 1, 300, True), (1, 4, 4, 64, True)]  # fmt: skip
    fwds = {name: configured(name) for name in CONFIGS}
    check_forwards(fwds, base, 64, device, cases)
    check_forwards({"g2 late": fwds["g2 late"]}, base, 128, device, cases)
    d64_forward_rounds(base, fwds, device, ROUNDS)
    for B, H, N, causal in [(4, 16, 4096, False), (4, 16, 4096, True), (1, 16, 16384, True)]:
        q, k, v, do = (torch.randn(B, H, N, 128, device=device, dtype=torch.bfloat16) for _ in range(4))
        impls = base._impls(causal)
        runs = [("cudnn", *impls["cudnn"]), ("06", *impls["ours"])]
        runs.append(("g2 late", lambda q, k, v, c=causal: fwds["g2 late"](q, k, v, c), None))
        flops = 4 * B * H * N * N * 128 * (0.5 if causal else 1.0)
        interleaved(f"D=128 {(B, H, N, causal)} forward", runs, flops, ROUNDS, base._time,
                    (q, k, v, do, device, False), 0)  # fmt: skip


if __name__ == "__main__":
    compile_only() if "--compile" in sys.argv else main()
