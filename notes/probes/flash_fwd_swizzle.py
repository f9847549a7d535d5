"""H200 probe (issue 19, session 6): a launch order for the causal forward that is heaviest-first over
a few heads at a time, so the programs running together still share K and V in L2.

Session 6 measured two orders (notes/06_flash.md, "Launch order"): 06's (one head's blocks after
another, each head heaviest-first) and heaviest-first over the whole grid (axes swapped), which lost
0-13% to the first, likely to L2 reuse of K and V. Between them: SWZ heads at a time, their blocks
interleaved heaviest-first (a GEMM-style swizzle). SWZ = 1 is 06's order, SWZ = B * H the swapped one.
Prediction: some SWZ between (4-16) keeps 06's speed without a mask and gains a few % causal.
Session 6's answer (notes/logs/flash_fwd_swizzle_9ff0839_h200.log): no; SWZ = 4 gained 4% at causal
4k only and lost 1-3% elsewhere, SWZ = 16 lost 4-6% without a mask; 06's order stays.

Each variant is 06_flash.py's own source with the forward's program-id mapping and grid replaced (one
module per SWZ), autotuned as 06 is, outputs checked equal to 06's, timed forward only by CUDA-graph
replay with the L2 flushed, three interleaved rounds.
    python notes/probes/flash_fwd_swizzle.py          # H200
    python notes/probes/flash_fwd_swizzle.py --check  # tiny shapes, correctness only (CPU interpreter)
"""

import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402

import torch  # noqa: E402

OLD_PIDS = """    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    pid_bh = tl.program_id(1)  # grid axis 1 runs over (batch, query head)
"""
NEW_PIDS = """    n_m = tl.cdiv(n_q, BLOCK_M)
    n_bh = tl.num_programs(0) // n_m
    g = tl.minimum(SWZ, n_bh)  # heads per group; the shapes used divide B * H
    p = tl.program_id(0)
    group = p // (g * n_m)
    r = p % (g * n_m)
    pid_m = r // g
    if CAUSAL:
        pid_m = n_m - 1 - pid_m
    start_m = pid_m * BLOCK_M
    pid_bh = group * g + r % g
"""
OLD_GRID = """    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), B * H)  # noqa: E731"""
NEW_GRID = """    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * B * H,)  # noqa: E731"""


def variant(swz: int, tmp: Path):
    src = (ROOT / "06_flash.py").read_text()
    assert src.count(OLD_PIDS) == 1 and src.count(OLD_GRID) == 1, "06's forward changed: update the probe"
    src = src.replace(OLD_PIDS, NEW_PIDS).replace(OLD_GRID, NEW_GRID)
    src = src.replace("LOG2E = ", f"SWZ = tl.constexpr({swz})\nLOG2E = ", 1)
    path = tmp / f"flash_swz{swz}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"flash_swz{swz}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    check = "--check" in sys.argv
    dev = harness.pick_device()
    fa = harness.load_build("06_flash")
    shapes = [(64, 4, 50, causal) for causal in (True, False)]
    if not check:
        shapes = [(128, 16, n, causal) for n in (4096, 16384) for causal in (True, False)]
    dtype = torch.float16 if check else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        mods = {"06": fa} | {f"swz{s}": variant(s, Path(tmp)) for s in (1, 4, 16, 1 << 20)}
        for D, H, N, causal in shapes:
            B = 2 if check else 16384 // N
            q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(3))
            ref = fa.flash_attention(q, k, v, causal)
            for name, mod in mods.items():  # compile, tune and prove each before timing
                assert torch.equal(mod.flash_attention(q, k, v, causal), ref), name
            label = f"D{D} H{H} N{N} B{B} {'causal' if causal else 'full'}"
            if check:
                print(f"{label}: every order gives 06's output bit for bit")
                continue
            flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
            seen = {name: [] for name in mods}
            for _ in range(3):
                for name, mod in mods.items():
                    fn = lambda mod=mod, qkv=(q, k, v), c=causal: mod.flash_attention(*qkv, c)  # noqa: E731
                    seen[name].append(flops / harness.bench(fn, dev, graph=True) / 1e9)
            base = statistics.median(seen["06"])
            for name, tf in seen.items():
                med = statistics.median(tf)
                rounds = " ".join(f"{x:.0f}" for x in tf)
                print(f"{label} {name}: {med:.0f} TFLOP/s, {med / base:.3f}x 06 ({rounds})", flush=True)


if __name__ == "__main__":
    main()
