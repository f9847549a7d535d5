"""H200 probe (issue 19, session 8): does moving part of the softmax's exp2 off the MUFU unit speed the
forward up?

Per 128 x 128 score tile the forward does 2 * 128 * 128 * D * 2 matmul FLOPs and 16,384 exp2. An H100/H200
SM issues 16 MUFU results per clock against ~4,096 dense bf16 FLOPs per clock, so the exp2s take 1,024
clocks against 2,048 (D=128) or 1,024 (D=64) for the matmuls: at D=64 the MUFU unit is as busy as the
tensor cores. FlashAttention-4 (Blackwell) computes a share of its exponentials with a polynomial on the
FMA units instead. Here one exp2 in every PACK is 2^x = 2^j * 2^f, j = round(x) by the 1.5 * 2^23
trick, 2^f on [-0.5, 0.5] by a degree-3 polynomial (relative error 7.5e-5, fitted by least squares
reweighted to the minimax; bf16's half-ulp is 2e-3), 2^j added into the exponent bits: 7 FP32 and 2
integer instructions for one MUFU. Written as inline PTX (tl.inline_asm_elementwise, pack=PACK), which
the interpreter cannot run: GPU only.

Prediction, from the sm_90a SASS of each variant's key loop (notes/probes/flash_ptxas.py --dump), if the
two warpgroups of a program run their matmuls and their softmax in step (a phase of matmuls, then a
phase of softmax bound by the larger of MUFU time, 8 clocks a warp instruction, and issue time, 1 clock
a warp instruction per scheduler): per 128 x 128 block at D=128 the softmax phase is MUFU-bound (1,056
MUFU clocks against 942 of issue), and fwd8 / fwd4 / fwd2 move it to 1,060 / 1,170 / 1,396 issue
clocks: within 1%, 3% slower, 9% slower on a ~3,500-clock block. At D=64 the autotuner's 128 x 64
block is issue-bound already (568 against 544), so every variant loses (fwd8 ~5-7%). A gain would
mean the phases are not in step and the MUFU unit is the bottleneck after all.

    python notes/probes/flash_exp2_poly.py [NAMES]

Variants, edits of the repository's 06_flash.py (a changed text stops the probe with a message):
  base   06 as it is;  fwd8 / fwd4 / fwd2  the forward with one exp2 in 8 / 4 / 2 by the polynomial.
Each: the forward by CUDA-graph replay, three interleaved rounds, beside cuDNN; the largest relative
output difference from base."""

import statistics
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from flash_dkdv_serial import edit, load_variants  # noqa: E402  (this folder is on sys.path)

COEFFS = (0.9999281167984009, 0.6932609677314758, 0.24261081218719482, 0.055171433836221695)


def _hex(x: float) -> str:
    return f"0f{struct.unpack('<I', struct.pack('<f', x))[0]:08X}"


def ptx(pack: int) -> str:
    """exp2 of `pack` fp32 values: the first pack - 1 on the MUFU unit, the last by the polynomial.
    x is clamped at -125 so 2^j stays a normal float (-inf, a masked score, gives 2^-125, not 0)."""
    out, x = f"${pack - 1}", f"${2 * pack - 1}"
    c0, c1, c2, c3 = (_hex(c) for c in COEFFS)
    lines = [f"ex2.approx.ftz.f32 ${i}, ${pack + i};" for i in range(pack - 1)]
    lines += [
        "{", ".reg .f32 ex_x, ex_t, ex_j, ex_f, ex_p;", ".reg .b32 ex_ti, ex_pi, ex_e;",
        f"max.f32 ex_x, {x}, {_hex(-125.0)};",
        f"add.rn.f32 ex_t, ex_x, {_hex(12582912.0)};",  # 1.5 * 2^23: rounds x to an integer in t's low bits
        f"sub.rn.f32 ex_j, ex_t, {_hex(12582912.0)};",
        "sub.rn.f32 ex_f, ex_x, ex_j;",
        f"fma.rn.f32 ex_p, ex_f, {c3}, {c2};", f"fma.rn.f32 ex_p, ex_p, ex_f, {c1};",
        f"fma.rn.f32 ex_p, ex_p, ex_f, {c0};",
        "mov.b32 ex_ti, ex_t;", "shl.b32 ex_e, ex_ti, 23;",  # j << 23: the magic's own bits shift out
        "mov.b32 ex_pi, ex_p;", "add.s32 ex_pi, ex_pi, ex_e;", f"mov.b32 {out}, ex_pi;", "}",
    ]  # fmt: skip
    return " ".join(lines)


def helper(pack: int) -> str:
    cons = ",".join(["=f"] * pack + ["f"] * pack)
    return (
        "@triton.jit\n"
        "def _exp2_mix(x):\n"
        f'    return tl.inline_asm_elementwise("{ptx(pack)}", "{cons}", [x], dtype=tl.float32, is_pure=True,'
        f" pack={pack})\n\n\n"
    )


FWD = "        p = tl.math.exp2(qk * qk_scale - m_new[:, None])"
ANCHOR = "@triton.jit\ndef _seq_bounds("


def variant(src: str, pack: int, lines: tuple) -> str:
    src = edit(src, ANCHOR, helper(pack) + ANCHOR)
    for line in lines:
        src = edit(src, line, line.replace("tl.math.exp2(", "_exp2_mix("))
    return src


VARIANTS = {
    "base": lambda s: s,
    "fwd8": lambda s: variant(s, 8, (FWD,)),
    "fwd4": lambda s: variant(s, 4, (FWD,)),
    "fwd2": lambda s: variant(s, 2, (FWD,)),
}
SHAPES = [(128, 16, 16, 4096, False), (128, 16, 16, 4096, True), (128, 16, 16, 16384, True),
          (128, 32, 8, 8192, True), (64, 32, 32, 4096, False), (64, 32, 32, 4096, True),
          (64, 32, 32, 16384, False)]  # fmt: skip


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        mods = load_variants(VARIANTS, names, (ROOT / "06_flash.py").read_text(), Path(tmp))
        base = mods[names[0]]
        for D, H, H_KV, N, causal in SHAPES:
            B = 16384 // N
            torch.manual_seed(0)
            q = torch.randn(B, H, N, D, device=dev, dtype=dt)
            k, v = (torch.randn(B, H_KV, N, D, device=dev, dtype=dt) for _ in range(2))
            flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)

            def cudnn(q, k, v, causal=causal, gqa=H != H_KV):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

            ctx = lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)  # noqa: E731
            calls = {"cuDNN": (cudnn, ctx)} | {
                n: (lambda q, k, v, m=m, c=causal: m.flash_attention(q, k, v, c), None)
                for n, m in mods.items()
            }
            ref = None
            for name, (fn, _) in calls.items():  # compile, tune, and compare each with the first variant
                if name == "cuDNN":
                    continue
                out = fn(q, k, v)
                if ref is None:
                    ref = out
                    continue
                print(f"  {name} vs {names[0]}: max rel err {harness.rel_err(out, ref):.1e}", flush=True)
            seen = {n: [] for n in calls}
            for _ in range(3):
                for name, (fn, c) in calls.items():
                    f_ms, _, _ = base._time(fn, c, q, k, v, None, dev, backward=False)
                    seen[name].append(flops / f_ms / 1e9)
            head = f"D{D} H{H}/{H_KV} N{N} {'causal' if causal else 'full'}"
            cu_f = statistics.median(seen["cuDNN"])
            for name, fw in seen.items():
                med = statistics.median(fw)
                print(
                    f"{head} {name:6s} fwd {med:4.0f} ({med / cu_f:.2f}) [{min(fw):.0f}-{max(fw):.0f}]",
                    flush=True,
                )


if __name__ == "__main__":
    main()
