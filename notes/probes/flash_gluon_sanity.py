"""H200 pre-flight (issue 19, session 11): 06's own dense checks on the shapes its Gluon kernels take (D=128,
MHA / GQA / MQA, ragged Nq != Nk, causal and not, bf16 and fp16, dK/dV groups whole and split), each under
a 60 s watchdog, then check_isolation (inf and NaN in the next head's or sequence's rows; session 12),
before a full `06_flash.py` run that would otherwise wait out a hung kernel. GPU only:

    timeout -s ABRT 200 python -u notes/probes/flash_gluon_sanity.py   (the dense cases took 96 s)"""

import faulthandler
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402

fa = harness.load_build("06_flash")
dev = torch.device("cuda")
# (B, H, H_KV, Nq, Nk, D, causal), dK/dV splits (None: dkdv_splits decides; 1: the group whole)
cases = [((2, 4, 4, 1000, 1000, 128, True), None), ((1, 8, 2, 777, 777, 128, False), 1),
         ((2, 4, 1, 300, 1111, 128, False), None), ((1, 32, 8, 2048, 2048, 128, True), None),
         ((2, 8, 2, 1000, 1000, 128, True), 1)]  # fmt: skip
for s, splits in cases:
    for dt in (torch.bfloat16, torch.float16):
        faulthandler.dump_traceback_later(60, exit=True)  # a barrier waited on forever ends the run
        t = time.perf_counter()
        with fa.fixed_configs(0), fa.fixed_dkdv_splits(splits):
            note = fa.check_dense(*s, dt, dev)  # raises past the dtype's tolerance
        print(s, splits, dt, note, f"({time.perf_counter() - t:.1f} s)", flush=True)
for varlen in (False, True):
    for causal in (False, True):
        faulthandler.dump_traceback_later(60, exit=True)
        t = time.perf_counter()
        with fa.fixed_configs(0):
            note = fa.check_isolation(varlen, causal, 128, torch.bfloat16, dev)
        took = f"({time.perf_counter() - t:.1f} s)"
        print("isolation", "varlen" if varlen else "dense", causal, note, took, flush=True)
faulthandler.cancel_dump_traceback_later()
print("all ok", flush=True)
