"""H200 probe (issue 19, session 3): do dK/dV launch configs outside 06's list beat it?

Times 06's backward (delta + dK/dV + dQ, two-kernel path) with the dK/dV kernel under each candidate
(BLOCK_M, BLOCK_N, warps, stages), dQ under its own fixed config, on the benchmark's shapes
(B*N = 16k tokens, H*D = 2048, bf16), next to cuDNN's backward. A config the compiler refuses prints
its error."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

fa = harness.load_build("06_flash")
CANDIDATES = [(32, 128, 4, 4), (64, 128, 8, 3), (64, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 3),
              (32, 64, 4, 4), (128, 128, 8, 2), (32, 128, 8, 4)]  # fmt: skip
SHAPES = [(128, 16, 16, 4096, True), (128, 16, 16, 4096, False), (128, 16, 16, 16384, True),
          (64, 32, 32, 4096, False), (128, 32, 8, 8192, True)]  # fmt: skip


def shape_row(D, H, H_KV, N, causal, dev, dt) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = 16384 // N
    q = torch.randn(B, H, N, D, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(B, H_KV, N, D, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    do = torch.randn(B, H, N, D, device=dev, dtype=dt)
    flops = 2.5 * 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != H_KV)
        ms = harness.bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), dev)
    cudnn = flops / ms / 1e9
    line = [f"cuDNN {cudnn:.0f}"]
    for i, c in enumerate(CANDIDATES):
        try:
            with fa.fixed_configs(i):
                o = fa.flash_attention(q, k, v, causal)
                ms = harness.bench(lambda o=o: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), dev)
            tf = flops / ms / 1e9
            line.append(f"{c}: {tf:.0f} ({tf / cudnn:.2f})")
        except Exception as e:  # out of shared memory or registers: say so and go on
            line.append(f"{c}: {type(e).__name__}")
    return f"D{D} H{H}/{H_KV} N{N} {'causal' if causal else 'full'} bwd TFLOP/s: " + " | ".join(line)


def main():
    dev, dt = torch.device("cuda"), torch.bfloat16
    orig = fa._configs
    fa._configs = lambda kind: [fa._c(*c) for c in CANDIDATES] if kind == "dkdv" else orig(kind)[:1]
    for shape in SHAPES:
        print(shape_row(*shape, dev, dt), flush=True)


if __name__ == "__main__":
    main()
