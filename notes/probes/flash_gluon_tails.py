"""H200 probe (issue 19, session 12): what does zeroing the rows past a head's or sequence's end cost
the Gluon kernels? 06 loaded twice, as itself and as a copy whose _g_zero_rows does nothing (what main
ran before the zeroing), each module with its own compiled kernels; both timed by 06's _time (CUDA-graph
replay, L2 flushed), interleaved over ROUNDS rounds, on shapes whose every sequence ends mid-tile, so
the zeroing runs: the forward's every program once, dK/dV once per head of a program's group walk, dQ
once per program. The outputs of the two must agree bit for bit (finite inputs: the zeroed rows had
P = 0). Since the Gluon kernels read dense inputs through per-head descriptors (TMA's zero fill; after
4f60a26), only the packed varlen forward calls _g_zero_rows: the dense rows then time one kernel
twice, a control for the noise. GPU only:  python -u notes/probes/flash_gluon_tails.py   (ROUNDS=3 by
default)"""

import functools
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402

import torch  # noqa: E402
from triton.experimental import gluon  # noqa: E402

fa = harness.load_build("06_flash")
spec = importlib.util.spec_from_file_location("flash_no_zeroing", ROOT / "06_flash.py")
bare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bare)
ROUNDS = int(os.environ.get("ROUNDS", "3"))


@gluon.jit
def _leave_rows(tile, keep):
    pass


bare._g_zero_rows = _leave_rows  # resolved when the copy's kernels compile, after this line


def dense(m, q, k, v, causal):
    return m.flash_attention(q, k, v, causal)


def varlen(m, q, k, v, cu, n, causal):
    return m.flash_attention_varlen(q, k, v, cu, cu, n, n, causal, check_offsets=False)


def cases(dev):
    """(name, fn(module, q, k, v) -> output, (q, k, v, dO or None), FLOPs of the forward)."""
    bf16 = torch.bfloat16
    out = []
    for B, H, N, causal in ((16, 16, 1000, False), (16, 16, 1000, True), (4, 16, 4000, True)):
        q, k, v = (torch.randn(B, H, N, 128, device=dev, dtype=bf16, requires_grad=True) for _ in range(3))
        flops = 4 * B * H * N * N * 128 * (0.5 if causal else 1.0)
        name = f"dense B{B} H{H} N{N} {'causal' if causal else 'full'}"
        fn = functools.partial(dense, causal=causal)
        out.append((name, fn, (q, k, v, torch.randn_like(q)), flops))
    for causal in (False, True):
        lens = fa.mixed_lengths(65536, 1024)
        q, k, v = (torch.randn(65536, 16, 128, device=dev, dtype=bf16) for _ in range(3))
        flops = sum(4 * 16 * n * n * 128 * (0.5 if causal else 1.0) for n in lens)
        name = f"varlen {len(lens)} sequences, mean 1024, H16 {'causal' if causal else 'full'}"
        fn = functools.partial(varlen, cu=fa.cu_seqlens(lens, dev), n=max(lens), causal=causal)
        out.append((name, fn, (q, k, v, None), flops))
    return out


def main():
    dev = torch.device("cuda")
    best = {}
    for r in range(ROUNDS):
        for name, fn, (q, k, v, do), flops in cases(dev):
            outs = {}
            for tag, m in (("zeroing", fa), ("bare", bare)):
                call = functools.partial(fn, m)
                fwd_ms, bwd_ms, outs[tag] = fa._time(call, None, q, k, v, do, dev, backward=do is not None)
                for what, ms, f in (("fwd", fwd_ms, flops), ("bwd", bwd_ms, 2.5 * flops)):
                    if ms is not None:
                        key = (name, what, tag)
                        best[key] = max(best.get(key, 0.0), f / ms / 1e9)
            same = torch.equal(outs["zeroing"], outs["bare"])
            print(f"round {r} {name}: outputs equal {same}", flush=True)
    print("best of rounds, TFLOP/s: zeroing, bare, zeroing/bare")
    for name, what, tag in sorted(best):
        if tag == "zeroing":
            z, b = best[(name, what, "zeroing")], best[(name, what, "bare")]
            print(f"{name:48s} {what}  {z:6.1f} {b:6.1f}  {z / b:.3f}")


if __name__ == "__main__":
    main()
