"""H200 probe (issue 19, session 21): compile and run the benchmark's six varlen forward launches (06's
varlen rows: 64k tokens of mixed lengths, D=128, MHA 16/16 at mean 1k and 4k, GQA 32/8 at mean 4k,
causal and not) in a fresh process. Call 3 of session 21 stopped in the first causal one with "PassManager
::run failed": the 585-second limit's SIGABRT had reached a Triton compile. Here each launch compiled and
ran (session 21, call 4; notes/logs/flash_varlen_compile_5217113_h200.log). GPU only:
    python -u notes/probes/flash_varlen_compile.py"""

import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

fa = harness.load_build("06_flash")


def main():
    dev = torch.device("cuda")
    print(triton.__version__, triton.__file__)
    for causal in (True, False):
        for H, H_KV, mean in ((16, 16, 1024), (16, 16, 4096), (32, 8, 4096)):
            lens = fa.mixed_lengths(65536, mean)
            cu = fa.cu_seqlens(lens, dev)
            q = torch.randn(65536, H, 128, device=dev, dtype=torch.bfloat16)
            k = torch.randn(65536, H_KV, 128, device=dev, dtype=torch.bfloat16)
            try:
                fa.flash_attention_varlen(q, k, k, cu, cu, max(lens), max(lens), causal)
                torch.cuda.synchronize()
                print("ok", H, H_KV, mean, causal, max(lens), flush=True)
            except Exception:
                print("FAILED", H, H_KV, mean, causal, max(lens), flush=True)
                traceback.print_exc(limit=2)


if __name__ == "__main__":
    main()
