"""H200 probe (notes/gpu_runs_2026-12-02.md, session 2): does SDPA's backend choice cost time on
new shapes? Verify-like calls: q (1, 8, 5, 64) bf16 against a key length that grows by one per call,
with a bottom-right causal bool mask."""

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

d = "cuda"


def run(tks, backends):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for tk in tks:
        q = torch.randn(1, 8, 5, 64, device=d, dtype=torch.bfloat16)
        k = torch.randn(1, 8, tk, 64, device=d, dtype=torch.bfloat16)
        mask = torch.arange(tk, device=d)[None, :] <= torch.arange(tk - 5, tk, device=d)[:, None]
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / len(tks) * 1e3


all_b = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
no_cudnn = all_b[1:]
for label, b, tks in [
    ("default order, new shapes", all_b, range(48, 112)),
    ("default order, same shapes again", all_b, range(48, 112)),
    ("no cuDNN, new shapes", no_cudnn, range(112, 176)),
    ("no cuDNN, same shapes again", no_cudnn, range(112, 176)),
    ("default order, new shapes", all_b, range(112, 176)),
]:
    print(f"{label:34s} {run(tks, b):8.3f} ms a call")
with torch.profiler.profile() as prof:
    q = torch.randn(1, 8, 5, 64, device=d, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 300, 64, device=d, dtype=torch.bfloat16)
    mask = torch.ones(5, 300, dtype=torch.bool, device=d)
    F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
print(
    "plain SDPA call (mask) picks:",
    [e.key for e in prof.key_averages() if "attention" in e.key or "efficient" in e.key or "flash" in e.key][
        :4
    ],
)
