"""H200 probe (issue 19, session 7): does the dK/dV kernel lose its wgmma pipelining to ptxas, and does
reordering its three query-block loops give it back?

Found offline first (Triton 3.6 compiling 06 for sm_90a on a CPU machine, notes/probes/flash_ptxas.py):
ptxas reports "(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to
non wgmma instructions defining accumulator registers" for the non-causal MHA dK/dV kernel, which then
waits for every 16-deep wgmma before issuing the next. At cbfdc94 the kernel walks a key block's query
blocks in three loops, dK and dV carried from one to the next: masked blocks crossing the diagonal,
unmasked whole blocks, the masked ragged end. Compiled offline, keeping only the first two loops, or
putting the unmasked loop last, removes the serialization.

    python notes/probes/flash_dkdv_serial.py OLD_06 [NAMES]

OLD_06 is cbfdc94's 06_flash.py (`git show cbfdc94:06_flash.py > data/flash_cbfdc94.py`, carried to the
device; data/ is git-ignored): the edits below are written against its text and stop the probe with a
message on any other. NAMES, comma-separated, picks the variants (default: all):
  base         OLD_06 as it is;
  ragged_first the ragged end's masked loop before the unmasked middle (three loops, unmasked last);
  one_masked   the diagonal blocks and the ragged end in one masked loop (its index jumps from the
               diagonal's end to the ragged end), then the unmasked middle: two loops;
  one_masked_dp_early  one_masked with dP^T = V dO^T issued before the exponential;
  now          the repository's 06_flash.py as it stands (call 2, 9500d14: the group's heads walked
               inside the two loops by a carried counter; call 3, 8611a07: one_masked with dP^T
               early only in the kernel without a causal mask, what 06 kept).
Each: whole backward (delta + dK/dV + dQ) by CUDA-graph replay as 06's benchmark times it, dK/dV under a
fixed config, beside cuDNN; the compiled dK/dV kernel's registers, spills and the C7515 verdict of the
device's own ptxas; the largest relative gradient difference from the first variant at the shape's first
config (so a second config's row shows the difference between the two tiles). GPU only."""

import importlib.util
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402


def _call(lo: str, hi: str, masked: str, extra: str = "") -> str:
    """One of cbfdc94's three _dkdv_inner calls, as its text reads."""
    pad = " " * 33
    return (
        "            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, "
        f"stride_qn,\n{pad}stride_don, stride_dqn, offs_n, {lo}, {hi}, seq_q, diag, qk_scale, sm_scale,"
        f"{extra}\n{pad}HEAD_DIM, BLOCK_M, {masked}, CAUSAL, ATOMIC_DQ)  # fmt: skip\n"
    )


DIAG, MIDDLE, RAGGED = (
    _call("lo", "mid", "True"),
    _call("mid", "full", "False"),
    _call("full", "seq_q", "True"),
)
LOOP = """    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
"""
JUMP = """    for start in range(lo, hi, BLOCK_M):
        start_m = tl.where(start < jump, start, start - jump + to)
        offs_m = start_m + tl.arange(0, BLOCK_M)
"""
INNER_SIG = "stride_dqn, offs_n, lo, hi, seq_q, diag, qk_scale, sm_scale, HEAD_DIM: tl.constexpr,"
DP_LATE = (
    "        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])"
    "  # P^T, (BLOCK_N, BLOCK_M)\n"
    """        if MASKED and CAUSAL:  # key j visible to row i iff j <= i + diag
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)  # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do))  # dP^T = V dO^T
"""
)
DP_EARLY = """        s_t = tl.dot(k, tl.trans(q))
        dp_t = tl.dot(v, tl.trans(do))  # dP^T = V dO^T
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # P^T, (BLOCK_N, BLOCK_M)
        if MASKED and CAUSAL:  # key j visible to row i iff j <= i + diag
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)  # dV += P^T dO
"""


def edit(src: str, old: str, new: str) -> str:
    if src.count(old) != 1:
        raise SystemExit(f"06_flash.py changed: expected one copy of\n{old}")
    return src.replace(old, new)


def _one_masked(src: str) -> str:
    src = edit(src, DIAG + MIDDLE + RAGGED, _call("lo", "mid + seq_q - full", "True", " mid, full,")
               + _call("mid", "full", "False", " full, full,"))  # fmt: skip
    src = edit(src, INNER_SIG, INNER_SIG.replace("sm_scale,", "sm_scale, jump, to,"))
    return edit(src, LOOP, JUMP)


VARIANTS = {
    "base": lambda s: s,
    "now": lambda s: (ROOT / "06_flash.py").read_text(),
    "ragged_first": lambda s: edit(s, DIAG + MIDDLE + RAGGED, DIAG + RAGGED + MIDDLE),
    "one_masked": _one_masked,
    "one_masked_dp_early": lambda s: edit(_one_masked(s), DP_LATE, DP_EARLY),
}
SHAPES = [(128, 16, 16, 4096, False), (128, 16, 16, 4096, True), (128, 16, 16, 16384, False),
          (128, 16, 16, 16384, True), (128, 32, 8, 8192, False), (128, 32, 8, 8192, True),
          (128, 32, 1, 4096, True), (64, 32, 32, 4096, False), (64, 32, 32, 4096, True)]  # fmt: skip


def load_variants(variants: dict, names: list, source: str, tmp: Path) -> dict:
    """Each named variant of 06's source (variants: name -> edit of the source text), written to tmp
    and imported as its own module (also used by flash_exp2_poly.py)."""
    mods = {}
    for name in names:
        path = tmp / f"flash_{name}.py"
        path.write_text(variants[name](source))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    return mods


def ptxas_verdict(mod) -> list[str]:
    """Registers, spills and whether the device's ptxas serialises the wgmmas, per compiled dK/dV kernel
    (labelled by its constexpr values: HEAD_DIM, CAUSAL, IS_VARLEN, ATOMIC_DQ, BLOCK_M, BLOCK_N, ...),
    read by flash_ptxas.py's report on each kernel's PTX."""
    from flash_ptxas import ptxas_report  # here, not at the top: that module compiles for sm_90a

    out = []
    for cache in mod._bwd_dkdv_kernel.fn.device_caches.values():
        for key, kernel in cache[0].items():
            consts = re.findall(r"\('constexpr', ([^)]*)\)", str(key))
            report = ptxas_report(kernel.asm | {"shared": kernel.metadata.shared}, None, "")
            out.append(f"{','.join(consts)} warps {kernel.metadata.num_warps}: {report}")
    return out


def main():
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "06_flash.py").read_text()
        names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)  # argv[2]: names to run
        mods = load_variants(VARIANTS, names, source, Path(tmp))
        base = next(iter(mods.values()))  # the first variant times cuDNN and names the configs
        for D, H, H_KV, N, causal in SHAPES:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            B = 16384 // N
            torch.manual_seed(0)
            q = torch.randn(B, H, N, D, device=dev, dtype=dt, requires_grad=True)
            k, v = (torch.randn(B, H_KV, N, D, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
            do = torch.randn(B, H, N, D, device=dev, dtype=dt)
            flops = 2.5 * 4 * B * H * N * N * D * (0.5 if causal else 1.0)
            gqa = H != H_KV

            def ctx():
                return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)

            def sdpa(q, k, v, causal=causal, gqa=gqa):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

            _, ms, _ = base._time(sdpa, ctx, q, k, v, do, dev)
            cudnn = flops / ms / 1e9
            head = f"D{D} H{H}/{H_KV} N{N} {'causal' if causal else 'full'}"
            print(f"{head}: cuDNN bwd {cudnn:.0f} TFLOP/s", flush=True)
            configs = (0, 1) if D == 64 else (1,)
            ref = None
            for index in configs:
                tile = base._configs("dkdv")[index]
                for rnd in range(2):
                    line = []
                    for name, mod in mods.items():
                        fn = lambda q, k, v, mod=mod, c=causal: mod.flash_attention(q, k, v, c)  # noqa: E731
                        with mod.fixed_configs(index):
                            _, ms, _ = mod._time(fn, None, q, k, v, do, dev)
                            grads = torch.autograd.grad(fn(q, k, v), (q, k, v), do)
                        if ref is None:
                            ref = grads
                        err = max(harness.rel_err(g, r) for g, r in zip(grads, ref, strict=True))
                        tf = flops / ms / 1e9
                        line.append(f"{name} {tf:.0f} ({tf / cudnn:.2f}, err {err:.1e})")
                    print(
                        f"  dkdv {tile.kwargs['BLOCK_M']}x{tile.kwargs['BLOCK_N']} w{tile.num_warps} "
                        f"s{tile.num_stages} round {rnd}: " + " | ".join(line),
                        flush=True,
                    )
        for name, mod in mods.items():
            print(name, *ptxas_verdict(mod), sep="\n  ")


if __name__ == "__main__":
    main()
