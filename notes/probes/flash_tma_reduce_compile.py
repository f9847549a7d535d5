"""CPU probe (issue 19, session 12): can a Gluon kernel add a register tile into global memory with one
TMA bulk reduce, as a fused backward's dQ would need? Gluon 3.6's hopper.tma offers copies both ways
and store_wait, no reduce; tl's desc.atomic_add goes through the IR builder's create_descriptor_reduce.
This wraps that builder call as a Gluon builtin, compiles a kernel that reduce-adds a 64 x 64 fp32 tile
for sm_90a (no GPU needed, as in flash_ptxas.py) and prints the PTX lines that do it. Session 12 saw:

    cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.bulk_group [...], [...];
    cp.async.bulk.commit_group;
    cp.async.bulk.wait_group.read 0;

so the compiler stages the tile through shared memory itself, and waits, right after, until the copy
engine has read it (not until the adds land). The same call inside a warp_specialize partition also
compiles (each partition gets its own 16 KB of staging). Not run on a GPU. Use the GPU's Triton:

    /tmp/t36/bin/python notes/probes/flash_tma_reduce_compile.py"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flash_ptxas  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import ir  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402
from triton.language.core import builtin  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402


@builtin
def tma_reduce_add(desc, coord, value, _semantic=None):
    """global[desc at coord] += value (a register tile of the descriptor's block shape), by TMA."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_descriptor_reduce(
        ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, value.handle, coord
    )


@gluon.jit
def _add_ones(desc):
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
    tma_reduce_add(desc, [gl.program_id(0) * 64, 0], gl.full([64, 64], 1.0, gl.float32, layout))


def main():
    backend = flash_ptxas.BACKEND
    acc = torch.empty(256, 64)
    desc = TensorDescriptor.from_tensor(
        acc, [64, 64], gl.NVMMASharedLayout.get_default_for([64, 64], gl.float32)
    )
    fn, meta = _add_ones, {"num_warps": 4}
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
        desc, **meta
    )
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, specialization, options)
    src = GluonASTSource(fn, signature, constexprs, attrs)
    ptx = triton.compile(src, target=flash_ptxas.TARGET, options=options.__dict__).asm["ptx"]
    for line in ptx.splitlines():
        if "bulk" in line:
            print(line.strip())


if __name__ == "__main__":
    main()
