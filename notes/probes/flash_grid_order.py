"""H200 probe (issue 19, session 6): does the launch order of 06's grids matter for causal attention?

Before 3fbf27d's successor, the forward and dQ grids were (query blocks, B * H) and the dK/dV grid
(key blocks, B * H_KV * splits). CUDA launches programs with grid axis 0 varying fastest, so a causal
grid walked one (batch, head)'s blocks heaviest-first, then the next head's, and the last wave held a
whole head's blocks, its heaviest included: the GPU idles behind a few long programs at the end.
With the axes swapped (B * H first), every head's heaviest block launches before any lighter one and
the grid ends on the lightest blocks (longest-processing-time-first). Prediction: causal rows +2-5%
(more where programs are long against the grid: GQA/MQA dK/dV walks a group of heads per program),
rows without a mask unchanged (every program does the same work).

Times the current 06 against an older copy of it (the path given, e.g. `git show
3fbf27d:06_flash.py > data/flash_3fbf27d.py`), both autotuned, forward and backward each by CUDA-graph
replay with the L2 flushed (06's own _time), in three interleaved rounds so drift shows as spread
within a name. Outputs and gradients are compared between the two first. GPU only.
    python notes/probes/flash_grid_order.py data/flash_3fbf27d.py
"""

import importlib.util
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402

SHAPES = [  # (D, H, H_KV, N, causal)
    (128, 16, 16, 4096, True), (128, 16, 16, 16384, True), (128, 32, 8, 2048, True),
    (128, 32, 1, 4096, True), (64, 32, 32, 4096, True), (128, 16, 16, 4096, False),
]  # fmt: skip


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    dev = torch.device("cuda")
    mods = {"new": harness.load_build("06_flash"), "old": load(Path(sys.argv[1]), "flash_old")}
    for D, H, H_KV, N, causal in SHAPES:
        B = 16384 // N
        q = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        kv_shape = (B, H_KV, N, D)
        k, v = (torch.randn(kv_shape, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        do = torch.randn_like(q)
        fwd_flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
        outs = {}
        for name, fa in mods.items():
            o = fa.flash_attention(q, k, v, causal)
            outs[name] = [o.detach(), *torch.autograd.grad(o, (q, k, v), do)]
        errs = [harness.rel_err(a, b) for a, b in zip(outs["new"], outs["old"], strict=True)]
        assert max(errs) < 2e-2, errs
        seen = {(name, part): [] for name in mods for part in ("fwd", "bwd")}
        for _ in range(3):
            for name, fa in mods.items():
                fn = lambda q, k, v, fa=fa, c=causal: fa.flash_attention(q, k, v, c)  # noqa: E731
                fwd_ms, bwd_ms, _ = fa._time(fn, None, q, k, v, do, dev)
                seen[name, "fwd"].append(fwd_flops / fwd_ms / 1e9)
                seen[name, "bwd"].append(2.5 * fwd_flops / bwd_ms / 1e9)
        label = f"D{D} H{H}/{H_KV} N{N} {'causal' if causal else 'full'}"
        for part in ("fwd", "bwd"):
            new, old = (statistics.median(seen[n, part]) for n in ("new", "old"))
            rounds = " | ".join(f"{n} " + " ".join(f"{x:.0f}" for x in seen[n, part]) for n in ("new", "old"))
            ratio = f"new {new:.0f} old {old:.0f} TFLOP/s, {new / old:.3f}x"
            print(f"{label} {part}: {ratio} ({rounds})", flush=True)


if __name__ == "__main__":
    main()
