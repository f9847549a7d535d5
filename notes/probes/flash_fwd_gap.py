"""H200 probe (issue 19, session 5): the forward dissection's kernel with 06's features and K/V through
descriptors ("V3 tmaKV", notes/probes/flash_fwd_dissect.py) ran 594 / 492 TFLOP/s at D=128 N=4k
full / causal, where 06 with the same loads ran 544 / 470 in the same run. Is that the kernels, the
tile the autotuner picks, or drift over the run (clocks, power)? Times, at each shape, 06 autotuned,
06 at each fixed config, and V3 / V0 tmaKV at each tile, interleaved over three rounds so drift shows
as spread within a name rather than as a gap between names; every call by CUDA-graph replay with the
L2 flushed (harness.bench), as the benchmark now times. GPU only.

Session 5's answer: the kernels run alike (06 at 128 x 128 543 against V3 tmaKV 549 full, 477 against
480 causal); the 594 was within single-reading noise (notes/06_flash.md)."""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import flash_fwd_dissect as dissect  # noqa: E402
import torch  # noqa: E402

fa = dissect.fa
SHAPES = [(128, 16, 4096, False), (128, 16, 4096, True)]  # (D, H, N, causal)


def candidates(q, k, v, causal):
    def fixed(i):
        def call():
            with fa.fixed_configs(i):
                return fa.flash_attention(q, k, v, causal)

        return call

    out = {"06 autotuned": lambda: fa.flash_attention(q, k, v, causal)}
    for i, cfg in enumerate(fa._configs("fwd")):
        out[f"06 {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}"] = fixed(i)
    for name in ("V3 tmaKV", "V0 tmaKV"):
        for tile in dissect.TILES:
            label = f"{name} {tile[0]}x{tile[1]}"
            out[label] = lambda n=name, t=tile: dissect.run_variant(q, k, v, causal, n, t)
    return out


def main():
    dev = torch.device("cuda")
    for D, H, N, causal in SHAPES:
        B = 16384 // N
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
        calls = candidates(q, k, v, causal)
        ref = fa.flash_attention(q, k, v, causal)
        for name, fn in calls.items():  # compile, tune, and prove each against 06 before timing
            assert harness.rel_err(fn(), ref) < 2e-2, name
        seen = {name: [] for name in calls}
        for _ in range(3):
            for name, fn in calls.items():
                seen[name].append(flops / harness.bench(fn, dev, graph=True) / 1e9)
        mode = "causal" if causal else "full"
        for name, tf in seen.items():
            print(f"D{D} N{N} {mode} {name}: median {statistics.median(tf):.0f} TFLOP/s, rounds "
                  + " ".join(f"{t:.0f}" for t in tf), flush=True)  # fmt: skip
    print("autotuned picks:", fa.tuned_configs()["_fwd_kernel"])


if __name__ == "__main__":
    main()
