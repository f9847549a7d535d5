"""H200 probe (issue 14, session 3): where a step of 10_batching's demo goes, per policy.

Serves the demo trace with each policy and times every step's stages on the host with perf_counter
(schedule, forward enqueue, sample = wait for the GPU + copy back, postprocess) and the forward on the
GPU with CUDA events, which add no waits. Sums by step kind (decode-only, holding prefill).
Variants: max_num_seqs (argv[1], default 128) and Python's gc disabled during serving (argv[2] == "nogc")."""

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402

b = harness.load_build("10_batching")


class TimedEngine(b.Engine):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rows = []

    def step(self):
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.items:
            return batch, []
        t1 = time.perf_counter()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        logits = self.model(batch)
        e1.record()
        t2 = time.perf_counter()
        next_tokens = self.sample(logits)
        t3 = time.perf_counter()
        fin = self.scheduler.postprocess(batch, next_tokens, self.clock())
        t4 = time.perf_counter()
        pre = batch.num_tokens > len(batch.items)
        self.rows.append((pre, len(batch.items), t1 - t0, t2 - t1, t3 - t2, t4 - t3, e0, e1))
        return batch, fin


def run(policy, model, specs, demo):
    nb = demo.kv_tokens // demo.block_size
    bm = b.pk.BlockManager(nb, demo.block_size)
    model.attach_cache(nb, demo.block_size)
    if policy == "static":
        sched = b.StaticScheduler(bm, demo.max_num_seqs, demo.max_num_batched_tokens, demo.static_max_len)
    else:
        sched = b.Scheduler(bm, demo.max_num_seqs, demo.max_num_batched_tokens)
    eng = TimedEngine(model, sched)
    seqs = [b.Sequence(p, m, a) for p, m, a in specs]
    t = time.perf_counter()
    b.serve(eng, seqs)
    wall = time.perf_counter() - t
    return eng.rows, wall, sched.num_preemptions


def main():
    max_seqs = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    nogc = len(sys.argv) > 2 and sys.argv[2] == "nogc"
    demo = b.DemoConfig(max_num_seqs=max_seqs)
    cfg = b.ModelConfig()
    model = b.TinyLlama(cfg, "cuda", torch.bfloat16)
    warm = b.make_trace(8, demo.prompt_len, (2, 8), 1e6, 1, cfg.vocab_size)
    for p in ("continuous", "static"):
        run(p, model, warm, demo)
    specs = b.make_trace(
        demo.n_requests, demo.prompt_len, demo.output_len, demo.arrival_rate, 0, cfg.vocab_size
    )
    print(f"max_num_seqs {max_seqs}, gc {'off' if nogc else 'on'}")
    for p in ("continuous", "static"):
        if nogc:
            gc.collect()
            gc.disable()
        rows, wall, npre = run(p, model, specs, demo)
        gc.enable()
        torch.cuda.synchronize()
        print(f"{p}: {wall:.2f} s wall, {len(rows)} steps, {npre} preemptions")
        for kind in (False, True):
            rs = [r for r in rows if r[0] == kind]
            if not rs:
                continue
            n = len(rs)
            ms = [1e3 * sum(r[i] for r in rs) / n for i in range(2, 6)]
            gpu = sum(r[6].elapsed_time(r[7]) for r in rs) / n
            seqs = sum(r[1] for r in rs) / n
            kind_name = "prefill" if kind else "decode "
            print(
                f"  {kind_name} steps {n:5d} seqs {seqs:6.1f}  ms/step: schedule {ms[0]:.2f} "
                f"fwd-enqueue {ms[1]:.2f} sample-wait {ms[2]:.2f} postprocess {ms[3]:.2f} "
                f"| gpu forward {gpu:.2f} | total {sum(ms):.2f} ({sum(ms) * n:.0f} ms in all)"
            )


if __name__ == "__main__":
    main()
