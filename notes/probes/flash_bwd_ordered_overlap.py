"""H200 probe (issue 19, session 14): does the ordered backward's writer warp lose time waiting for each
step's adds to land before it moves on?

06's default backward at D=128 (the ordered fused kernel) adds each step's dQ tile into fp32 by TMA
reduce-adds in a fixed order: the writer warp waits for its turn on the tile's counter, adds, waits
until the adds have completed (cp.async.bulk.wait_group 0), and only then raises the counter and
starts the next step. So each step of each program pays one full round trip of the copy engine. The
unshifted FlashAttention-3 order measured its `.read` release (not waiting for completion) -3% to +6%
faster, and without a mask the shifted walk read 0.99x cuDNN with `.read` (session 14, call 1) against
0.91-0.92x with the completion wait (calls 2 and 3, other runs): notes/06_flash.md, session 14.

"overlap" keeps the order exact and takes the wait off the writer's path: it raises step i - 1's
counter only after issuing step i's adds (cp.async.bulk.wait_group 2: everything but this step's two
groups has landed), so one step's round trip overlaps the next step's wait and adds. Deadlock-free as
06's order is: a program's release is held back only by its own next wait, which is on programs of
higher key blocks, and the highest never waits. "read" (FlashAttention-3's release, for reference: it
leaves two SMs' adds to a tile in flight in no promised order, so 06 does not take it).

Checks first: each variant's backward (the ordered kernel forced) against 06's as it is, bit for bit
(the same order gives the same sums), causal and not, GQA in shares; then the whole backward beside
cuDNN, interleaved over ROUNDS rounds, by 06's own timing (_time: CUDA-graph replay, L2 flushed).
Prediction: overlap recovers most of the gap to `.read` where the steps are short against the copy
engine's round trip (MHA without a mask: up to ~8%), nothing causal (the programs lead one another by
a whole step there).
Measured (session 15, call 1, at b78dfa0; notes/logs/flash_bwd_ordered_overlap_b78dfa0_h200.log): every
variant's dq, dk, dv bitwise equal to 06's. Prediction missed: overlap ran 0.81-1.00x of 06 (MHA 4k
full 399 against 473 TFLOP/s, causal 352 against 434; 16k and GQA 0.98-1.00x). Holding step i - 1's
counter until step i's turn has come chains the programs: a program's release now waits on the
program after it in the order, whose own waits on the next, so the releases run down a chain instead of
each following its own adds. `.read` ran 0.99-1.03x of 06 in the same rounds: the completion wait
costs 0-3%, and calls 1 and 2 of session 14 (0.99x against 0.91x) differed by their runs, not by it.
GPU only:  python -u notes/probes/flash_bwd_ordered_overlap.py   (ROUNDS=3 by default)
Offline:   python notes/probes/flash_bwd_ordered_overlap.py --compile   (Triton 3.6; registers, spills)"""

import os
import sys
import tempfile
from pathlib import Path

if "--compile" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "0"  # before harness: compile for sm_90a, do not interpret
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import torch  # noqa: E402
from flash_dkdv_serial import edit, load_variants  # noqa: E402  (this folder is on sys.path)
from flash_rounds import Compiling, bwd_rounds  # noqa: E402  (this folder is on sys.path)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DONE = "cp.async.bulk.wait_group 0; fence.proxy.async.global;"  # _adds_done's wait
LOOP = """    for i in range(n_steps):
        head = q_head0 + i // steps_per_head  # in dQ's"""
RELEASE = """        if ORDERED:
            _adds_done(lock)
            gl.atomic_add(lock, 1, sem="release")
"""
OVERLAP = """        if ORDERED:
            if i > 0:  # the step before's adds have landed: all but this step's two groups
                _adds_done_but_two(prev)
                gl.atomic_add(prev, 1, sem="release")
            prev = lock
    if ORDERED:
        if n_steps > 0:
            _adds_done(prev)
            gl.atomic_add(prev, 1, sem="release")
"""
HELPER = """

@gluon.jit
def _adds_done_but_two(lock):
    gl.inline_asm_elementwise(
        "{ cp.async.bulk.wait_group 2; fence.proxy.async.global; bar.warp.sync -1; mov.u32 $0, 0; }",
        "=r,l", [lock], gl.int32, is_pure=False, pack=1)  # fmt: skip
"""
ANCHOR = "\n\n@gluon.jit\ndef _gb_dq_turn("


def overlap(src: str) -> str:
    src = edit(src, ANCHOR, HELPER + ANCHOR)
    src = edit(src, LOOP, "    prev = SEM\n" + LOOP)
    return edit(src, RELEASE, OVERLAP)


VARIANTS = {
    "06": lambda s: s,
    "overlap": overlap,
    "read": lambda s: edit(s, DONE, DONE.replace("wait_group 0", "wait_group.read 0")),
}
# (B, H, H_KV, N, causal): D=128 rows the ordered kernel takes
SHAPES = [(4, 16, 16, 4096, False), (4, 16, 16, 4096, True), (1, 16, 16, 16384, False),
          (2, 32, 8, 8192, False), (2, 32, 8, 8192, True)]  # fmt: skip


def compile_only(mods):
    """The ordered kernel of each variant for sm_90a, bf16, causal and not: registers and spills."""
    for name, fa in mods.items():
        fa._bwd_dkdv_gluon = Compiling(fa._bwd_dkdv_gluon, name)
        for causal in (False, True):
            q, k = (torch.empty(1, h, 1000, 128, dtype=torch.bfloat16) for h in (4, 2))
            descs, ld = fa._gluon_bwd_descs(q, k, k, q), torch.empty(1, 4, 1000, 2)
            dk, dq = torch.empty_like(k), torch.zeros(2 - causal, *q.shape)
            fa._dkdv_gluon(descs, ld, dk, dk, q, k, causal, 0.1, dq, 1, True, not causal)


def main(mods):
    device = torch.device("cuda")
    print(harness.env_line(device, torch.bfloat16), flush=True)
    base = mods["06"]
    for B, H, H_KV, N, causal, splits in [(2, 4, 4, 1000, True, 1), (2, 4, 4, 1000, False, 1),
                                          (2, 8, 2, 1000, True, 2), (1, 4, 2, 300, False, 1)]:  # fmt: skip
        q, do = (torch.randn(B, H, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(B, H_KV, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        grads = {}
        for name, fa in mods.items():
            with fa.two_kernel_backward(False), fa.fixed_dkdv_splits(splits):
                grads[name] = torch.autograd.grad(fa.flash_attention(q, k, v, causal), (q, k, v), do)
        for name in mods:
            same = all(torch.equal(a, b) for a, b in zip(grads[name], grads["06"], strict=True))
            print(f"check {name} {(B, H, H_KV, N, causal)} in {splits}: dq, dk, dv bitwise equal to 06's: "
                  f"{same} {'ok' if same else 'FAILED'}", flush=True)  # fmt: skip
    for B, H, H_KV, N, causal in SHAPES:
        q, do = (torch.randn(B, H, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(B, H_KV, N, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        runs = [("cudnn", *base._impls(causal)["cudnn"])]
        runs += [(name, *fa._impls(causal)["ours"]) for name, fa in mods.items()]
        bwd_rounds(base, (B, H, H_KV, N, causal), runs, ROUNDS, (q, k, v, do, device))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_variants(VARIANTS, list(VARIANTS), (ROOT / "06_flash.py").read_text(), Path(tmp))
        compile_only(loaded) if "--compile" in sys.argv else main(loaded)
