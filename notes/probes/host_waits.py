"""H200 probe (notes/gpu_runs_2026-12-02.md, session 2): does an op wait for the GPU?
Queue ~0.1 s of GPU sleep, then time the op on the host."""

import time

import torch

d = "cuda"
p = torch.softmax(torch.randn(5, 256, device=d), -1)
g = torch.Generator(d).manual_seed(0)
ops = {
    "multinomial(1-D p, 1)": lambda: torch.multinomial(p[0], 1, generator=g),
    "multinomial(2-D p, 1)": lambda: torch.multinomial(p, 1, generator=g),
    "exponential race (11 sample)": lambda: (
        p / torch.empty_like(p).exponential_(generator=g).clamp_min_(1e-38)
    ).argmax(-1, keepdim=True),
    "F.one_hot(t, V)": lambda: torch.nn.functional.one_hot(torch.tensor([1, 2], device=d), 256),
    "torch.tensor(list, device)": lambda: torch.tensor([1, 2, 3], device=d),
}
for _ in range(2):
    for name, f in ops.items():
        f()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)
        t = time.perf_counter()
        f()
        dt = time.perf_counter() - t
        torch.cuda.synchronize()
        print(f"{name:32s} host {dt * 1e3:8.3f} ms (a wait for the GPU shows as ~100 ms)")
