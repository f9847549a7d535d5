"""H200 probe (issue 19; run in session 5 on e406d1e's file, then on 06 itself): why did the
descriptor forward of e406d1e (K and V tiles through TMA, both at the loop's top) run D=128 causal
N=512 at 0.48x of its own pointer loads, when it ran 1.03-1.15x at N >= 1k (notes/06_flash.md,
session 4)?

Session 5's answer: host-side launch cost, not the kernel. Each fixed config ran ~205-210 TFLOP/s by
both clocks, descriptors or pointers; autotuned calls read 96 (descriptors) and 138 (pointers) by
events but ~210 by device time (notes/06_flash.md, session 5).

Loads 06_flash.py as of e406d1e (`git show e406d1e:06_flash.py > data/flash_e406d1e.py`, path as
argv[1]; data/ is git-ignored, so name it in the device call's carry) and times its forward at that
shape and, as controls, D=128 full N=512 and causal N=1024, for each of its fixed configs
and the autotuned one, with descriptor loads and with pointer loads: by CUDA events around each call
(harness.bench, as the benchmark does) and by the profiler's device time of the kernel alone, which
separates host-side costs (making descriptors, the pre-hook) from the kernel's own. GPU only."""

import contextlib
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402

# (D, H, N, causal); session 5 added the 4k rows, where the forward dissection's kernel with 06's
# features and descriptor K/V (V3 tmaKV) ran 594 / 492 TFLOP/s against e406d1e's file at 544 / 470
SHAPES = [(128, 16, 512, True), (128, 16, 512, False), (128, 16, 1024, True), (128, 16, 4096, False),
          (128, 16, 4096, True)]  # fmt: skip


def load(path):
    spec = importlib.util.spec_from_file_location("flash_e406d1e", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kernel_us(fn, reps=20) -> float:
    """Mean device time of the forward kernel per call, from the profiler."""
    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = [e.device_time_total / e.count for e in prof.key_averages() if e.key == "_fwd_kernel"]
    return times[0] if times else float("nan")


def shape_rows(fa, D, H, N, causal):
    dev = torch.device("cuda")
    B = 16384 // N
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)

    def call(cfg, loads):
        with fa.fixed_configs(cfg) if cfg is not None else contextlib.nullcontext():
            with fa.pointer_loads() if loads == "pointers" else contextlib.nullcontext():
                return fa.flash_attention(q, k, v, causal)

    for cfg in [*range(len(fa._configs("fwd"))), None]:
        for loads in ("descriptors", "pointers"):
            events = flops / harness.bench(lambda c=cfg, lo=loads: call(c, lo), dev) / 1e9
            device = flops / kernel_us(lambda c=cfg, lo=loads: call(c, lo)) / 1e6
            name = "autotuned" if cfg is None else f"config {cfg}"
            print(f"D{D} N{N} {'causal' if causal else 'full'} {name} {loads}: {events:.0f} TFLOP/s by "
                  f"events, {device:.0f} by the kernel's device time", flush=True)  # fmt: skip


def main():
    fa = load(sys.argv[1])
    for D, H, N, causal in SHAPES:
        shape_rows(fa, D, H, N, causal)
    print("autotuned picks:", fa.tuned_configs())


if __name__ == "__main__":
    main()
