"""H200 probe (issue 19, session 15; run in session 16): the Gluon forward at D=64 with three consumer
warpgroups and 128-key blocks, its P handed to the P V matmul through shared memory.

Three consumer warpgroups (FlashAttention-3's D=64 shape, 192 query rows a program) have 160 registers a
thread. With 64-key blocks they fit but lost to two warpgroups with 128-key blocks (0.92-1.01x, call 1 of
session 15, notes/probes/flash_fwd_pingpong.py); with 128-key blocks they spilled ~3 KB a thread, since a
warpgroup holds S_j (64 x 128 fp32: 64 registers), P_j-1 as the matmul's register operand (32) and its
accumulator (32) at once. FlashAttention-3 at D=64 (192 x 192 without a mask) takes P V's A operand from
shared memory instead. Here, on top of flash_fwd_pingpong.patch (06 with BLOCK_M = 192), each consumer
stores P_j-1 into a (64, BLOCK_N) shared tile of its own (fence, then the warpgroup's barrier) and the
matmul reads it there, so P holds no registers across the S_j matmul; the wait after P V no longer
names P's registers. Configurations: two or three warpgroups, 128-key blocks, P in registers (06) or in
shared memory, two or three K and V ring slots (three: 172 KB of shared memory, no spills).
Checks first (flash_rounds.check_forwards against 06's tl kernel, dense and packed), then the forward
beside 06 and cuDNN at D=64, interleaved over ROUNDS rounds.
Compiled offline (Triton 3.6, sm_90a): no spills in any configuration; three warpgroups at 160
registers a consumer thread with 128-key blocks, 139.6 KB of shared memory (P's tiles 48 KB of it).
Prediction: three warpgroups with 128-key blocks gain 0-8% over two, the shared-memory round trip of
P (16 KB a block a warpgroup) costing less than the third warpgroup's overlap buys; two warpgroups with
P in shared memory lose 0-3%.
Measured (session 16, call 1; notes/logs/flash_fwd_p_smem_7ae5b75_h200.log): P in shared memory costs
10-13% with two warpgroups (0.82-0.88x cuDNN), and the third warpgroup buys back 7-11% (0.80-0.95x;
0.81-0.98x with three ring slots). Missed; not kept. flash_fwd_late_convert.py removes the spill instead.
GPU only:  python -u notes/probes/flash_fwd_p_smem.py   (ROUNDS=3 by default)
Offline:   python notes/probes/flash_fwd_p_smem.py --compile   (Triton 3.6; registers, spills, loops)"""

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
    load_pingpong,
)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
# name -> (BLOCK_M, BLOCK_N, K and V ring slots, P through shared memory)
CONFIGS = {
    "g2": (128, 128, 2, False),
    "g2 p_smem": (128, 128, 2, True),
    "g3 p_smem": (192, 128, 2, True),
    "g3 p_smem s3": (192, 128, 3, True),
}
P_EDITS = [
    # the producer's and the consumer's
    ("    q_smem, k_smem, v_smem = smem\n", "    q_smem, k_smem, v_smem, p_smem = smem\n"),
    ("    q_tile = q_smem.index(WG)\n", "    q_tile = q_smem.index(WG)\n    p_tile = p_smem.index(WG)\n"),
    (
        "        p_op = gl.convert_layout(p.to(dtype), p_layout)"
        "  # block j-1's P: no matmul reads P's registers now\n",
        "        p_tile.store(p.to(dtype))  # block j-1's P, read from here by its P V\n"
        "        fence_async_shared()\n        _g_sync()\n",
    ),
    (
        "o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)",
        "o_tok = warpgroup_mma(p_tile, v_smem.index(prev), acc, is_async=True)",
    ),  # fmt: skip
    (
        "        acc, p_op = warpgroup_mma_wait(0, deps=[o_tok, p_op])\n",
        "        acc = warpgroup_mma_wait(0, deps=[o_tok])\n",
    ),  # fmt: skip
    (
        "    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_last, acc)\n",
        "    p_tile.store(p.to(dtype))\n    fence_async_shared()\n    _g_sync()\n"
        "    acc = warpgroup_mma(p_tile, v_last, acc)\n",
    ),
    (
        "        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile)\n"
        "        q_bars",
        "        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile)\n"
        "        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_N], dtype)\n"
        "        p_smem = gl.allocate_shared_memory(dtype, [WGS, 64, BLOCK_N], p_layout)\n"
        "        q_bars",
    ),
    ("        smem = (q_smem, k_smem, v_smem)\n", "        smem = (q_smem, k_smem, v_smem, p_smem)\n"),
]


def with_p_smem(src: str) -> str:
    """The P edits on the patched source (the smem unpacking twice: producer and consumer)."""
    for old, new in P_EDITS:
        src = src.replace(old, new) if src.count(old) == 2 else edit(src, old, new)
    return src


def variants():
    mods = {name: load_pingpong(name, with_p_smem if p else None) for name, (*_, p) in CONFIGS.items()}

    return mods, {name: configured_fwd(mods[name], *CONFIGS[name][:3], False) for name in CONFIGS}


def compile_only():
    """Each configuration for sm_90a, bf16, D=64, causal and not: registers, spills, loops."""
    mods, fwds = variants()
    for name, fa in mods.items():
        fa._fwd_kernel_gluon = Compiling(fa._fwd_kernel_gluon)
        for causal in (False, True):
            print(f"{name} {CONFIGS[name]} D=64 {'causal' if causal else 'full'}:", flush=True)
            q, k = (torch.empty(1, h, 1000, 64, dtype=torch.bfloat16) for h in (4, 2))
            fwds[name](q, k, k, causal)


def main():
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    mods, fwds = variants()
    base = harness.load_build("06_flash")
    cases = [(2, 4, 4, 1000, True), (1, 8, 2, 777, False), (2, 4, 4, 1024, False), (1, 4, 1, 300, True),
             (1, 4, 4, 64, True)]  # fmt: skip
    check_forwards(fwds, base, 64, device, cases)
    d64_forward_rounds(base, fwds, device, ROUNDS)


if __name__ == "__main__":
    compile_only() if "--compile" in sys.argv else main()
