"""H200 probe (issue 19, session 3): do forward launch configs outside 06's list beat it?

Times 06's forward kernel under each candidate (BLOCK_M, BLOCK_N, warps, stages) on the benchmark's
shapes (B*N = 16k tokens, H*D = 2048, bf16) with harness.bench, next to cuDNN."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

fa = harness.load_build("06_flash")
CANDIDATES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2),
              (128, 128, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3)]  # fmt: skip
SHAPES = [(128, 16, 4096, True), (128, 16, 4096, False), (128, 16, 16384, True), (64, 32, 4096, False),
          (64, 32, 4096, True)]  # fmt: skip


def shape_row(D, H, N, causal, dev, dt) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = 16384 // N
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt) for _ in range(3))
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = (
            flops
            / harness.bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), dev)
            / 1e9
        )
    line = []
    for i, c in enumerate(CANDIDATES):
        try:
            with fa.fixed_configs(i):
                tf = flops / harness.bench(lambda: fa.flash_attention(q, k, v, causal), dev) / 1e9
            line.append(f"{c}: {tf:.0f} ({tf / cudnn:.2f})")
        except Exception as e:  # out of shared memory or registers: say so and go on
            line.append(f"{c}: {type(e).__name__}")
    return f"D{D} H{H} N{N} {'causal' if causal else 'full'} cuDNN {cudnn:.0f} TFLOP/s | " + " | ".join(line)


def main():
    dev, dt = torch.device("cuda"), torch.bfloat16
    fa._configs = lambda kind, orig=fa._configs: (
        [fa._c(*c) for c in CANDIDATES] if kind == "fwd" else orig(kind)
    )
    for D, H, N, causal in SHAPES:
        print(shape_row(D, H, N, causal, dev, dt), flush=True)


if __name__ == "__main__":
    main()
