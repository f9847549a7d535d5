"""CPU probe (issue 14, session 3): 10_batching's schedules under a step-cost model, no GPU.

Runs the real schedulers (continuous and static) over the demo trace with a stand-in model that only
advances a simulated clock by a modelled step time: F0 seconds a step, plus PS a scheduled sequence,
plus PF when the step holds a prefill chunk (COST="F0 PS PF", defaults fitted to the H200 stage probe
of session 3: notes/10_batching.md). Prints steps, mean sequences a step, preemptions, prefill steps,
simulated seconds and the throughput ratio, for each KV memory given on the command line (tokens)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import harness  # noqa: E402

import torch  # noqa: E402

b = harness.load_build("10_batching")
F0, PS, PF = (float(x) for x in os.environ.get("COST", "0.0036 0.00002 0.004").split())


class ModelledClock(b.StepClock):
    """serve() adds 1 a step on a StepClock; the model adds the modelled step time less that 1."""


class ModelledStep:
    def __init__(self, clock):
        self.clock = clock

    def __call__(self, batch):
        prefill = batch.num_tokens > len(batch.items)
        self.clock.t += F0 + PS * len(batch.items) + (PF if prefill else 0.0) - 1
        return torch.zeros(len(batch.items), 8)


def run(policy, demo, specs):
    bm = b.pk.BlockManager(demo.kv_tokens // demo.block_size, demo.block_size)
    if policy == "static":
        sched = b.StaticScheduler(bm, demo.max_num_seqs, demo.max_num_batched_tokens, demo.static_max_len)
    else:
        sched = b.Scheduler(bm, demo.max_num_seqs, demo.max_num_batched_tokens)
    clock = ModelledClock()
    timeline = b.serve(b.Engine(ModelledStep(clock), sched, clock=clock), [b.Sequence(*s) for s in specs])
    n = len(timeline)
    seqs = sum(r["seqs"] for r in timeline) / n
    prefill_steps = sum(r["tokens"] > r["seqs"] for r in timeline)
    print(f"  {policy}: {n} steps, {seqs:.1f} sequences a step, {sched.num_preemptions} preemptions, "
          f"{prefill_steps} steps with prefill, {clock.t:.2f} s")  # fmt: skip
    return clock.t


def main():
    for kv in [int(x) for x in sys.argv[1:]] or [b.DemoConfig().kv_tokens]:
        demo = b.DemoConfig(kv_tokens=kv)
        specs = b.make_trace(demo.n_requests, demo.prompt_len, demo.output_len, demo.arrival_rate, 0, 4096)
        print(f"KV memory {kv} tokens, step = {F0 * 1e3:.2f} ms + {PS * 1e3:.3f} ms a sequence + "
              f"{PF * 1e3:.2f} ms with prefill")  # fmt: skip
        ratio = run("static", demo, specs) / run("continuous", demo, specs)
        print(f"  continuous / static throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
