"""H200 probe (issue 19, session 15): the Gluon forward with its consumer warpgroups taking turns at the
tensor cores (FlashAttention-3's ping-pong), and with three of them at D=64.

The issue's last open target is D=64's forward >= 1.0x cuDNN. 06 runs D=64 on the tl kernel (0.93-0.99x
at N >= 4k, results/06_flash.json at 8c5b839); 06's Gluon kernel (two consumer warpgroups of 64 query
rows, 128-key blocks) did no better there in session 10 (0.87-0.98x). At D=64 a block's matmuls take
about as long as its exp2s, and the softmax is issue-bound (notes/06_flash.md, session 8: moving exp2s
to the FMA units lost 4-15%), so the softmax only gains by running while another warpgroup's matmuls
do. Two levers, constexprs of _fwd_kernel_gluon in flash_fwd_pingpong.patch (06 at b78dfa0; main
reverted them after this probe measured no gain, so the probe applies the patch to 06's source):
- PINGPONG: warpgroup w waits for its turn (an mbarrier) before issuing a block's two matmuls and hands
  the turn on to w + 1 once they are issued, so the warpgroups' matmul phases alternate and one's
  softmax overlaps the next one's matmuls (FlashAttention-3, section 3.1). Triton's tl kernels cannot
  say this; Gluon's mbarriers can.
- BLOCK_M = 192: three consumer warpgroups (FlashAttention-3's D=64 shape), 160 registers each; with
  128-key blocks the score tile spills (~3 KB a thread, compiled offline), so 64-key blocks.
Checks first: every configuration against 06's default (the tl kernel at D=64, the Gluon one at D=128),
ragged and aligned N, causal and not, MHA and GQA, dense and packed (varlen). Then the forward beside
cuDNN, by 06's own timing (_time: CUDA-graph replay, L2 flushed), interleaved over ROUNDS rounds.

Prediction: at D=128 (MUFU and issue within 10%, session 8) ping-pong gains 0-5% (FlashAttention-3's
ablation: ~570 -> ~620-660 TFLOP/s from ping-pong with intra-warpgroup overlap, which 06 already has);
at D=64, where the softmax has no matmul of its own warpgroup to hide behind, 3-10% for two warpgroups
with ping-pong, and three warpgroups ~0-10% over two, less the 64-key blocks' per-block overhead
(session 10: 128-key blocks beat 64-key ones by 11-21% at D=128).
Measured (session 15, call 1; notes/logs/flash_fwd_pingpong_b78dfa0_h200.log): no gain anywhere.
Ping-pong against the same kernel without it: D=128 0.99-1.00x (MHA 4k full and causal, 16k causal),
D=64 0.98-1.00x; three warpgroups with 64-key blocks 0.92-1.01x of two with 128-key blocks. D=64 read
0.88-1.04x cuDNN at best (the Gluon kernel, two warpgroups), against the tl kernel's 0.93-1.02x.
GPU only:  python -u notes/probes/flash_fwd_pingpong.py   (ROUNDS=3 by default)
Offline:   python notes/probes/flash_fwd_pingpong.py --compile   (Triton 3.6; registers, spills, loops)"""

import os
import sys
from pathlib import Path

if "--compile" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "0"  # before harness: compile for sm_90a, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_rounds import (  # noqa: E402  (this folder is on sys.path)
    Compiling,
    check_forwards,
    configured_fwd,
    interleaved,
    load_pingpong,
)

fa = load_pingpong()
ROUNDS = int(os.environ.get("ROUNDS", "3"))
# name -> 06's GLUON_FWD: (BLOCK_M, BLOCK_N, STAGES, PINGPONG)
CONFIGS = {
    "g2": (128, 128, 2, False),
    "g2 pp": (128, 128, 2, True),
    "g3 n64": (192, 64, 2, False),
    "g3 n64 pp": (192, 64, 2, True),
    "g3 n64 s3 pp": (192, 64, 3, True),
}
FOR_D = {128: ["g2 pp"], 64: list(CONFIGS)}


def configured(name):
    """fn(q, k, v, causal, cu) -> o: the Gluon forward under configuration name."""
    return configured_fwd(fa, *CONFIGS[name])


def compile_only():
    """Each configuration for sm_90a, bf16, causal and not, D=64 and 128: registers, spills, loops."""
    fa._fwd_kernel_gluon = Compiling(fa._fwd_kernel_gluon)
    for D, names in FOR_D.items():
        for name in names:
            for causal in (False, True):
                q, k = (torch.empty(1, h, 1000, D, dtype=torch.bfloat16) for h in (4, 2))
                print(f"D={D} {name} {CONFIGS[name]}, {'causal' if causal else 'full'}:", flush=True)
                configured(name)(q, k, k, causal)


def main():
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    cases = [(2, 4, 4, 1000, True), (1, 8, 2, 777, False), (2, 4, 4, 1024, False), (1, 4, 1, 300, True),
             (1, 4, 4, 64, True)]  # fmt: skip
    for D, names in FOR_D.items():
        check_forwards({name: configured(name) for name in names}, fa, D, device, cases)
    shapes = [(64, 4, 32, 4096, False), (64, 4, 32, 4096, True), (64, 2, 32, 8192, False),
              (64, 2, 32, 8192, True), (64, 1, 32, 16384, False), (64, 1, 32, 16384, True),
              (128, 4, 16, 4096, False), (128, 4, 16, 4096, True), (128, 1, 16, 16384, True)]  # fmt: skip
    for D, B, H, N, causal in shapes:
        q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        impls = fa._impls(causal)
        runs = [("cudnn", *impls["cudnn"]), ("06", *impls["ours"])]
        for name in FOR_D[D]:
            runs.append((name, lambda q, k, v, c=causal, n=name: configured(n)(q, k, v, c), None))
        flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
        interleaved(f"D={D} {(B, H, N, causal)} forward", runs, flops, ROUNDS, fa._time,
                    (q, k, v, do, device, False), 0)  # fmt: skip


if __name__ == "__main__":
    compile_only() if "--compile" in sys.argv else main()
