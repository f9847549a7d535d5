"""H200 probe (issue 19, session 14): can the Gluon forward reach cuDNN at D=64 with three consumer
warpgroups? The issue's last open target is D=64's forward >= 1.0x cuDNN; 06 runs it on the tl kernel
(0.93-0.99x at N >= 4k, results/06_flash.json at 8c5b839), and 06's Gluon kernel (two consumer
warpgroups of 64 query rows, 128-key blocks) did no better there in session 10 (0.87-0.98x): at D=64 a
block's matmuls take about as long as its exp2s (notes/06_flash.md, session 8), so a warpgroup's softmax
has little matmul time of the other warpgroup to hide behind. FlashAttention-3 runs D=64 with three
consumer warpgroups (192 query rows a program, 160 registers each), so that while one does its softmax
two can keep the tensor cores busy.

Here 06's Gluon forward is copied with that one change (_fwd_three: one Q tile and one consumer per
warpgroup, 06's own _g_consumer and _g_producer; the K and V slots freed by as many arrivals), dense
inputs only, beside 06's default (the tl kernel) and cuDNN, forward only, by 06's own timing (_time:
CUDA-graph replay, L2 flushed), interleaved over ROUNDS rounds. Checks first: every variant against 06's
default on ragged and aligned N, causal and not, MHA and GQA.

Compiled offline (Triton 3.6, sm_90a): every timed variant without spills (168 registers a thread for
two warpgroups; 128 at launch for three, 16 warps, raised to 160 in the workers by warp specialisation).
Three warpgroups with 128-key blocks spill ~3 KB a thread (a 64 x 128 fp32 score tile and its bf16 copy
do not fit beside the rest in 160; FlashAttention-3 fits 192 x 128 at D=64 in CUTLASS), so three take
64-key blocks here, with 2 or 3 ring slots.

Prediction: per 64 x 64 block a warpgroup's two matmuls take ~256 clocks of the SM's tensor cores
(dense bf16, ~4,000 FLOPs a clock) and its 4,096 exp2s ~256 clocks of the MUFU unit (16 a clock), so
the ceiling overlaps the two fully, which two warpgroups can only do if their phases alternate; a third
gives the schedulers slack. Expect 0-10% over 06's tl kernel, less if the softmax's other FP32
instructions (about five an element) fill the issue slots first (session 8 found D=64 issue-bound), and
64-key blocks cost per-block overhead (session 10: 128-key blocks beat 64-key ones by 11-21% at D=128).
GPU only:  python -u notes/probes/flash_fwd_d64_three.py   (ROUNDS=3 by default)
Offline:   python notes/probes/flash_fwd_d64_three.py --compile   (Triton 3.6; see flash_ptxas.py)"""

import os
import sys
from pathlib import Path

if "--compile" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "0"  # before harness: compile for sm_90a, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from flash_rounds import interleaved  # noqa: E402  (this folder is on sys.path)
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier  # noqa: E402

fa = harness.load_build("06_flash")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
D = 64
# (consumer warpgroups, key block, ring slots): 06's shape, its 64-key block, and three warpgroups with
# 64-key blocks (with 128-key blocks, 160 registers a thread spill ~3 KB: compiled, not timed)
VARIANTS = [(2, 128, 2), (2, 64, 2), (3, 64, 2), (3, 64, 3)]


@gluon.jit
def _consumer2(descs, smem, bars, geom, out, qk_scale, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    fa._g_consumer(descs, smem, bars, geom, out, qk_scale, BLOCK_N, CAUSAL, 2)


@gluon.jit
def _fwd_three(q_desc, k_desc, v_desc, O, LSE, n_q, n_k, H, GROUP, qk_scale, HEAD_DIM: gl.constexpr,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               CAUSAL: gl.constexpr):  # fmt: skip
    """06's _fwd_kernel_gluon, dense only, with BLOCK_M // 64 consumer warpgroups (three at 192)."""
    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    WGS: gl.constexpr = BLOCK_M // 64
    if CAUSAL:
        hi = gl.minimum(n_k, start_m + BLOCK_M + n_k - n_q)
    else:
        hi = n_k
    n_blocks = gl.cdiv(hi, BLOCK_N)
    dtype: gl.constexpr = q_desc.dtype
    tile: gl.constexpr = fa._g_tile_layout(q_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [WGS, 64, HEAD_DIM], tile)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile)
    q_bars = gl.allocate_shared_memory(gl.int64, [WGS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(WGS):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=WGS)
        mbarrier.init(v_empty.index(i), count=WGS)
    fence_async_shared()
    descs = (q_desc, k_desc, v_desc)
    smem = (q_smem, k_smem, v_smem)
    bars = (q_bars, k_ready, v_ready, k_empty, v_empty)
    geom = (0, pid_bh, 0, b * (H // GROUP) + h // GROUP, start_m, n_q, n_k, n_blocks)
    out = (O, LSE, pid_bh.to(gl.int64) * n_q, pid_bh * n_q, 0, HEAD_DIM)
    if WGS == 3:
        gl.warp_specialize([
            (fa._g_consumer, (descs, smem, bars, geom, out, qk_scale, BLOCK_N, CAUSAL, 0)),
            (fa._g_consumer1, (descs, smem, bars, geom, out, qk_scale, BLOCK_N, CAUSAL)),
            (_consumer2, (descs, smem, bars, geom, out, qk_scale, BLOCK_N, CAUSAL)),
            (fa._g_producer, (descs, smem, bars, geom, out, qk_scale, BLOCK_N, CAUSAL)),
        ], [4, 4, 1], [160, 160, 24])  # fmt: skip
    else:
        gl.warp_specialize([
            (fa._g_consumer, (descs, smem, bars, geom, out, qk_scale, BLOCK_N, CAUSAL, 0)),
            (fa._g_consumer1, (descs, smem, bars, geom, out, qk_scale, BLOCK_N, CAUSAL)),
            (fa._g_producer, (descs, smem, bars, geom, out, qk_scale, BLOCK_N, CAUSAL)),
        ], [4, 1], [240, 24])  # fmt: skip


def gluon_fwd(q, k, v, causal, variant, launch=None):
    """o, lse of dense contiguous q, k, v through _fwd_three, variant = (consumer warpgroups, key block,
    ring slots): 2 warpgroups at 168 registers a thread at launch (06's), 3 at 128 (16 warps)."""
    wgs, bn, stages = variant
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    bm = 64 * wgs
    tiles = ((q, 64), (k, bn), (v, bn))
    descs = [fa._gluon_desc(t.view(-1, t.shape[2], D), [1, rows, D]) for t, rows in tiles]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, n_q, device=q.device, dtype=torch.float32)
    launch = launch or _fwd_three[(triton.cdiv(n_q, bm), B * H)]
    launch(*descs, o, lse, n_q, n_k, H, H // k.shape[1], q.shape[-1] ** -0.5 * fa.LOG2E, D, bm, bn, stages,
           causal, num_warps=4, maxnreg=168 if wgs == 2 else 128)  # fmt: skip
    return o, lse


def compile_only():
    """Compile both variants for sm_90a without a GPU (flash_ptxas.py's way): registers, spills, shared
    memory and the consumers' loop SASS, bf16, causal and not."""
    import flash_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    def launch(*args, **meta):
        backend, fn = flash_ptxas.BACKEND, _fwd_three
        bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **meta)
        options, sig, constexprs, attrs = fn._pack_args(backend, meta, bound, spec, options)
        compiled = triton.compile(GluonASTSource(fn, sig, constexprs, attrs), target=flash_ptxas.TARGET,
                                  options=options.__dict__)  # fmt: skip
        asm = compiled.asm | {"shared": compiled.metadata.shared}
        dump = Path(os.environ["DUMP"]) if "DUMP" in os.environ else None
        print(flash_ptxas.ptxas_report(asm, dump, "fwd_" + "_".join(map(str, args[-5:])), loops=True))

    for variant in [*VARIANTS, (3, 128, 2)]:
        for causal in (False, True):
            q, k = (torch.empty(1, h, 1000, D, dtype=torch.bfloat16) for h in (4, 2))
            mode = "causal" if causal else "full"
            print(f"Gluon forward D=64, (warpgroups, key block, slots) {variant}, {mode}:", flush=True)
            gluon_fwd(q, k, k, causal, variant, launch)


def main():
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    for B, H, H_KV, N, causal in [(2, 4, 4, 1000, True), (1, 8, 2, 777, False), (2, 4, 4, 1024, False),
                                  (1, 4, 1, 300, True)]:  # fmt: skip
        q = torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(B, H_KV, N, D, device=device, dtype=torch.bfloat16) for _ in range(2))
        ref = fa.flash_attention(q, k, v, causal)
        for variant in VARIANTS:
            o, _ = gluon_fwd(q, k, v, causal, variant)
            err = harness.rel_err(o, ref)
            print(f"check {variant} {(B, H, H_KV, N, causal)}: vs 06's default {err:.1e} "
                  f"{'ok' if err < 1e-2 else 'FAILED'}", flush=True)  # fmt: skip
    shapes = [(4, 32, 4096, False), (4, 32, 4096, True), (2, 32, 8192, False), (2, 32, 8192, True),
              (1, 32, 16384, False), (1, 32, 16384, True)]  # fmt: skip
    for B, H, N, causal in shapes:
        q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        impls = fa._impls(causal)
        runs = [("cudnn", *impls["cudnn"]), ("06 (tl)", *impls["ours"])]
        for variant in VARIANTS:
            fwd = lambda q, k, v, c=causal, a=variant: gluon_fwd(q, k, v, c, a)[0]  # noqa: E731
            runs.append((f"gluon {variant}", fwd, None))
        flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
        interleaved(
            f"{(B, H, N, causal)} forward", runs, flops, ROUNDS, fa._time, (q, k, v, do, device, False), 0
        )


if __name__ == "__main__":
    compile_only() if "--compile" in sys.argv else main()
