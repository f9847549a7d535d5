"""H200 probe (issue 19, session 9): how fast is 06's delta kernel, and which launch shape is best?

The backward's first kernel reads O and dO once (delta = rowsum(O * dO)) and writes each row's
(lse, delta) pair. In session 9's profile (D=128 causal N=4k B=4 H=16) it took 36 us, read then as
~0.9 TB/s from 32 MB; the probe was written on that reading, which was wrong by 4x: O and dO are
134 MB there, so 36 us is ~3.7 TB/s with the L2 partly warm.

Session 9's answer (notes/logs/flash_delta_1e677be_h200.log): 42.6-45.3 us at every launch shape and
shape of the three, 0.78-0.83x the copy's bandwidth (3.9 TB/s), all within 6% of each other; nothing
to gain here.

    python notes/probes/flash_delta.py

Times the kernel as 06 launches it (BLOCK_M=64, 4 warps) and at other (BLOCK_M, warps), each by
CUDA-graph replay with the L2 flushed (harness.bench, as the benchmark times), beside a ceiling
measured in the same run: a device copy of O and dO into a buffer (it reads what the kernel reads and
also writes as much, so the kernel's time floor is about half the copy's). Checks each variant's pairs
against torch. GPU only."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

fa = harness.load_build("06_flash")
SHAPES = [(4, 16, 4096, 128), (32, 16, 512, 128), (4, 32, 4096, 64)]  # (B, H, N, D): 16k tokens each
LAUNCHES = [(64, 4), (64, 8), (32, 4), (32, 2), (16, 4), (16, 2), (128, 8), (128, 4)]  # (BLOCK_M, warps)


def time_shape(B, H, N, D, dev):
    torch.manual_seed(0)
    o, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    lse = torch.randn(B, H, N, device=dev)
    ld = torch.empty(B, H, N, 2, device=dev)
    want = torch.stack([lse, (o.float() * do.float()).sum(-1)], -1)
    moved = 2 * o.numel() * o.element_size() + lse.numel() * 4 + ld.numel() * 4
    src = torch.cat([o.flatten(), do.flatten()])
    dst = torch.empty_like(src)
    copy_ms = harness.bench(lambda: dst.copy_(src), dev, graph=True)
    copy_tbs = 2 * src.numel() * src.element_size() / copy_ms / 1e9
    print(f"B{B} H{H} N{N} D{D}: copy of O and dO {copy_ms * 1e3:.1f} us ({copy_tbs:.2f} TB/s)")
    for block_m, warps in LAUNCHES:

        def delta(block_m=block_m, warps=warps):
            fa._bwd_delta_kernel[(triton.cdiv(N, block_m), B * H)](
                o, do, lse, ld, *o.stride()[:3], *do.stride()[:3], N, H, HEAD_DIM=D, BLOCK_M=block_m,
                num_warps=warps,
            )  # fmt: skip

        ld.fill_(float("nan"))
        delta()
        err = (ld - want).abs().max().item()
        ms = harness.bench(delta, dev, graph=True)
        tbs = moved / ms / 1e9
        print(f"  BLOCK_M {block_m:3d} warps {warps}: {ms * 1e3:6.1f} us  {tbs:.2f} TB/s "
              f"({tbs / copy_tbs:.2f} of copy)  max err {err:.1e}", flush=True)  # fmt: skip


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for B, H, N, D in SHAPES:
        time_shape(B, H, N, D, dev)


if __name__ == "__main__":
    main()
