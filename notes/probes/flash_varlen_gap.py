"""H200 probe (issue 19, session 3): where does the varlen forward lose to the dense one at mean 1024?

Same 65,536 tokens, D=128, H=16, bf16, TFLOP/s by each sequence's own FLOPs. Compares: dense
(64 x 1024); varlen with 64 equal lengths of 1024 (the packed layout and launch, no mix); the mixed
lengths of 06's benchmark in their drawn order and sorted longest first; each under both forward
configs (fixed_configs 0 and 1), so autotuning plays no part."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402

fa = harness.load_build("06_flash")
TOKENS, MEAN, D, H = 65536, 1024, 128, 16


def varlen_tflops(lens, causal, dev, dt):
    cu = fa.cu_seqlens(lens, dev)
    q, k, v = (torch.randn(sum(lens), H, D, device=dev, dtype=dt) for _ in range(3))
    n = max(lens)
    ms = harness.bench(lambda: fa.flash_attention_varlen(q, k, v, cu, cu, n, n, causal), dev)
    return sum(4 * H * x * x * D * (0.5 if causal else 1.0) for x in lens) / ms / 1e9


def dense_tflops(causal, dev, dt):
    B = TOKENS // MEAN
    q, k, v = (torch.randn(B, H, MEAN, D, device=dev, dtype=dt) for _ in range(3))
    ms = harness.bench(lambda: fa.flash_attention(q, k, v, causal), dev)
    return 4 * B * H * MEAN * MEAN * D * (0.5 if causal else 1.0) / ms / 1e9


def main():
    dev, dt = torch.device("cuda"), torch.bfloat16
    mixed = fa.mixed_lengths(TOKENS, MEAN)
    cases = {"equal": [MEAN] * (TOKENS // MEAN), "mixed": mixed, "mixed, longest first": sorted(mixed)[::-1]}
    for causal in (False, True):
        for cfg in (0, 1):
            with fa.fixed_configs(cfg):
                line = [f"dense {dense_tflops(causal, dev, dt):.0f}"]
                line += [f"{name} {varlen_tflops(lens, causal, dev, dt):.0f}" for name, lens in cases.items()]
            print(
                f"{'causal' if causal else 'full'} config {fa._configs('fwd')[cfg]}: " + " | ".join(line),
                flush=True,
            )


if __name__ == "__main__":
    main()
