"""CPU probe (issue 19, session 19): what ptxas makes of 06's Gluon kernels for the H200, without an H200:
the forward (D=64 and 128, dense and packed, causal and not), the dK/dV kernel (D=128, causal and not;
dK/dV alone, fused, fused in order; the group whole and in 2 shares) and the dQ kernel. Each launch is
compiled for sm_90a through flash_rounds.Compiling, which prints registers, spill bytes, shared memory
and each loop's SASS counts. Sessions 17-19 checked every kernel change this way before it ran on the
GPU ("the loops as before, no spills"). Use the GPU's Triton (3.6; flash_ptxas.py says how):
    /tmp/t36/venv/bin/python notes/probes/flash_gluon_compile.py [--file 06_flash.py] [words ...]
Words filter the launches by their labels, e.g. `fwd dense causal` or `dkdv ordered=True`."""

import argparse
import os
import re
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from flash_rounds import Compiling, gluon_fwd, load_module  # noqa: E402

BF16 = torch.bfloat16


def compiling(fa, name: str, label: str) -> None:
    """fa's Gluon kernel `name` replaced by a Compiling stand-in that prints under label."""
    kernel = getattr(fa, name)
    setattr(fa, name, Compiling(kernel.fn if isinstance(kernel, Compiling) else kernel, label))


def forwards(fa, want):
    # the packed forward's tile table comes from a tl kernel, which needs a GPU: zeros stand in
    fa._varlen_tiles = lambda cu_q, cu_k, bm, rows: torch.zeros(
        (rows // bm + cu_q.numel(), 5), dtype=torch.int32
    )
    for D in (64, 128):
        for varlen in (False, True):
            for causal in (False, True):
                label = f"fwd D={D} {'varlen' if varlen else 'dense'} {'causal' if causal else 'full'}"
                if not want(label):
                    continue
                compiling(fa, "_fwd_kernel_gluon", label)
                if varlen:
                    q = torch.empty(3000, 4, D, dtype=BF16)
                    cu = torch.tensor([0, 1000, 3000], dtype=torch.int32)
                    gluon_fwd(fa, q, q[:, :2], q[:, :2], causal, (cu, cu, 2000))
                else:
                    q = torch.empty(1, 4, 1000, D, dtype=BF16)
                    k = torch.empty(1, 2, 1000, D, dtype=BF16)
                    gluon_fwd(fa, q, k, k, causal)


def bwd_operands(fa):
    """q (4 heads), k (2 kv heads) of 1,000 rows at D=128, the backward's descriptors over them, and an
    (lse, delta) buffer: what the dK/dV and dQ launches take."""
    q = torch.empty(1, 4, 1000, 128, dtype=BF16)
    k = torch.empty(1, 2, 1000, 128, dtype=BF16)
    return q, k, fa._gluon_bwd_descs(q, k, k, q), torch.empty(1, 4, 1000, 2)


def dkdv(fa, want):
    for causal in (False, True):
        for fused, ordered in ((False, False), (True, False), (True, True)):
            for splits in (1, 2):
                mode = "causal" if causal else "full"
                label = f"dkdv {mode} fused={fused} ordered={ordered} splits={splits}"
                if not want(label):
                    continue
                compiling(fa, "_bwd_dkdv_gluon", label)
                q, k, descs, ld = bwd_operands(fa)
                dq = torch.zeros((1, *q.shape)) if fused else None
                fa._dkdv_gluon(
                    descs,
                    ld,
                    torch.empty_like(k),
                    torch.empty_like(k),
                    q,
                    k,
                    causal,
                    0.1,
                    dq,
                    splits,
                    ordered,
                )


def dq(fa, want):
    for causal in (False, True):
        label = f"dq {'causal' if causal else 'full'}"
        if not want(label):
            continue
        compiling(fa, "_bwd_dq_gluon", label)
        q, k, descs, ld = bwd_operands(fa)
        fa._dq_gluon(descs, ld, torch.empty_like(q), q, k, causal, 0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=HERE.parents[1] / "06_flash.py")
    parser.add_argument("words", nargs="*", help="compile only the launches whose labels hold every word")
    args = parser.parse_args()
    fa = load_module(args.file, "flash_" + re.sub(r"\W", "_", args.file.stem))

    def want(label):
        return all(w in label for w in args.words)

    # the dense forward and the causal dK/dV launch size their grids by the SM count, which a machine
    # without a GPU cannot report: the H200's
    fa._sm_count = lambda device: 132
    forwards(fa, want)
    dkdv(fa, want)
    dq(fa, want)


if __name__ == "__main__":
    main()
