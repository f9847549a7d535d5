"""CPU probe (issue 19, session 7): what ptxas makes of 06's kernels for the H200, without an H200.

Triton compiles for a GPU it is not running on when given the target, so this compiles 06's forward,
dK/dV and dQ kernels for sm_90a (every launch config in 06's lists, dense bf16, causal and not, D=128
and D=64) and runs the wheel's own ptxas -v on each: registers, spill bytes, shared memory, and whether
ptxas reports C7515 ("wgmma.mma_async instructions are serialized"), which means it waits for every
16-deep wgmma before issuing the next. Use the GPU's Triton, not the CPU machine's (the device has 3.6):

    python3.11 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 torch==2.13.0 numpy
    (torch==2.13.0 is the CPU build on this project's machines; elsewhere the CPU build comes from
    --extra-index-url https://download.pytorch.org/whl/cpu, not tried here)
    /tmp/t36/bin/python notes/probes/flash_ptxas.py [--file 06_flash.py] [--kinds dkdv,dq] [--h-kv 1]
                                                    [--dump DIR] [--loops]

--h-kv 1 makes the query group 4 heads (GQA); --dump writes each kernel's TTGIR, PTX and SASS to DIR;
--loops counts each inner loop's SASS instructions (HGMMA, MUFU, loads, spill traffic): session 8 found
the causal dK/dV kernel's 4-byte lse/delta loads and the exp2 probe's costs this way.
Session 7 found the non-causal MHA dK/dV kernel serialised (and ~1 KB of spills in the GQA causal
one); the device's own ptxas agreed (notes/probes/flash_dkdv_serial.py)."""

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before harness: compile, do not interpret
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
BIN = Path(triton.__file__).parent / "backends/nvidia/bin"


def compile_for_sm90(fn, args, meta) -> dict:
    """Specialise fn on args exactly as a launch would (alignment, value 1, do_not_specialize), compile
    it for sm_90a and return the asm stages."""
    binder = create_function_from_signature(fn.signature, fn.params, BACKEND)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = fn._pack_args(BACKEND, meta, bound, specialization, options)
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__
    )
    return kernel.asm | {"shared": kernel.metadata.shared}


INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")  # address, opcode


def sass_loops(sass: str) -> list[str]:
    """The innermost loops of a cuobjdump SASS listing (a branch back to a lower address closes one):
    instructions per pass, and the kinds that told session 8 what a loop costs."""
    ins = [(int(m[1], 16), m[2], line) for line in sass.splitlines() if (m := INSTR.match(line))]
    loops = []
    for addr, op, line in ins:
        target = re.search(r"0x([0-9a-f]+)", line.split(op, 1)[1]) if op.startswith("BRA") else None
        if target and int(target[1], 16) < addr:
            loops.append((int(target[1], 16), addr))
    inner = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]
    out = []
    for lo, hi in inner:
        ops = collections.Counter(op.split(".")[0] for addr, op, _ in ins if lo <= addr <= hi)
        kinds = ", ".join(f"{k} {ops[k]}" for k in ("HGMMA", "MUFU", "LDGSTS", "LDS", "LDL", "STL"))
        out.append(f"    loop {lo:#06x}-{hi:#06x}: {sum(ops.values())} instructions; {kinds}")
    return out


def ptxas_report(asm: dict, dump: Path | None, tag: str, loops: bool = False) -> str:
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        ptx.write_text(asm["ptx"])
        err = subprocess.run(
            [BIN / "ptxas", "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True
        )
        if dump is not None or loops:
            sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / f"{tag}.ttgir").write_text(asm["ttgir"])
            (dump / f"{tag}.ptx").write_text(asm["ptx"])
            (dump / f"{tag}.sass").write_text(sass)
    regs = re.search(r"Used (\d+) registers", err.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err.stderr)
    serial = "SERIALIZED (C7515)" if "C7515" in err.stderr else "pipelined"
    spilled = "/".join(spill.groups()) if spill else "?"
    report = (f"regs {regs.group(1) if regs else '?':>3}  spill st/ld {spilled:>9}"
              f"  smem {asm['shared']:>6}  {serial}")  # fmt: skip
    return "\n".join([report] + (sass_loops(sass) if loops else []))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=str(ROOT / "06_flash.py"), help="a 06_flash.py (or a variant of it)")
    ap.add_argument("--kinds", default="fwd,dkdv,dq", help="which kernels, comma-separated")
    ap.add_argument("--h-kv", type=int, default=4, help="kv heads for 4 query heads (4: MHA, 1: GQA 4/1)")
    ap.add_argument("--dump", type=Path, default=None, help="folder for TTGIR / PTX / SASS of each kernel")
    ap.add_argument("--loops", action="store_true", help="count the SASS instructions of each inner loop")
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("flash_under_test", a.file)
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)
    kinds = a.kinds.split(",")

    def launch(kernel, kind, grid, *args, **meta):  # stands in for fa._launch: compile every config
        if kind not in kinds:
            return
        named = dict(zip(kernel.fn.arg_names, args, strict=False))
        for cfg in fa._configs(kind):
            if cfg.pre_hook is not None:  # the forward's descriptor tiles
                cfg.pre_hook(named | meta | cfg.kwargs)
            tile = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
            tag = (f"{kind}{'_atomic' if meta.get('ATOMIC_DQ') else ''} D{meta['HEAD_DIM']} "
                   f"{'causal' if meta['CAUSAL'] else 'full'} group {named.get('GROUP', '-')} "
                   f"{tile}")  # fmt: skip
            launch_meta = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            asm = compile_for_sm90(kernel.fn, args, meta | cfg.kwargs | launch_meta)
            print(f"{tag:48s} {ptxas_report(asm, a.dump, tag.replace(' ', '_'), a.loops)}", flush=True)

    class NoLaunch:  # the delta kernel is launched directly; it has no dot, so nothing to see
        def __getitem__(self, grid):
            return lambda *args, **meta: None

    fa._launch, fa._bwd_delta_kernel = launch, NoLaunch()
    torch.cuda.get_device_capability = lambda *_: (9, 0)  # so the forward takes its descriptor path
    B, H, N = 1, 4, 512
    for D in (128, 64):
        for causal in (False, True):
            q, do, o = (torch.randn(B, H, N, D, dtype=torch.bfloat16) for _ in range(3))
            k, v = (torch.randn(B, a.h_kv, N, D, dtype=torch.bfloat16) for _ in range(2))
            lse = torch.randn(B, H, N)
            fa._fwd(q, k, v, None, B, N, N, causal, D**-0.5, False)
            for deterministic in (True, False):
                fa._bwd(do, q, k, v, o, lse, None, B, N, N, causal, D**-0.5, False, deterministic)


if __name__ == "__main__":
    main()
