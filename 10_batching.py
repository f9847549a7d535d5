r"""Continuous batching: an iteration-level scheduler with chunked prefill and preemption by recompute.

A static server runs a fixed batch until its longest request finishes: short requests leave idle slots
behind, and newcomers wait for the whole batch. Orca's iteration-level scheduling decides again at
every step (one forward pass): finished requests leave, waiting ones join, and the KV memory of the
paged cache (09_paged_kv) is handed out a block at a time as sequences grow. vLLM adds chunked
prefill, so a long prompt is split across steps and rides along with the decodes instead of stalling
them, and preemption, so a step that runs out of blocks evicts the newest request and recomputes it
later. This file builds that scheduler, an engine-agnostic step(), and a static baseline, and measures
both on a Poisson-arrival trace with a small transformer.

You will learn:
  - the Sequence life cycle (waiting -> running -> finished, back to waiting when preempted) and the
    per-step budgets: max_num_seqs sequences and max_num_batched_tokens tokens;
  - schedule(): decodes first, then prefill chunks of partial prompts, then new requests in arrival
    order (FCFS) while tokens and free blocks last; preemption of the newest when blocks run out;
  - why recompute-preemption is exact: the preempted sequence's prompt and generated tokens are
    prefilled again (often from the prefix cache) and generation resumes where it stopped;
  - a model forward over a mixed batch: new K/V scattered into the paged cache by slot_mapping,
    decode tokens through 09's paged kernel, all prefill chunks through one gather of their contexts
    and one launch of 06's varlen flash kernel (causal, aligned bottom-right);
  - throughput, TTFT and TPOT, and why continuous batching multiplies throughput at the same memory.

Builds on: 09_paged_kv.py (BlockManager, Sequence, slot_mapping, write_kv, paged_attention_decode);
06_flash.py (flash_attention_varlen); 02_attention.py (attention, the prefill reference); harness.py.

Does not handle:
  - sampling other than greedy (argmax), stop strings, beam search; parallel sampling (09's fork is
    there, the scheduler does not use it);
  - swapping preempted KV to CPU memory (vLLM's other preemption mode), priorities, fairness beyond FCFS;
  - CUDA graphs and a compiled model (the capstone's job): with the demo's small model launches and
    Python set the pace of every step for both policies (measured: see the demonstration's notes);
  - tensor/pipeline parallelism; speculative decoding.

References: Yu et al., "Orca: A Distributed Serving System for Transformer-Based Generative Models"
(OSDI 2022); Kwon et al., "PagedAttention" (SOSP 2023); Agrawal et al., "Sarathi-Serve" (OSDI 2024,
chunked prefill); reference implementations: vLLM's v1 Scheduler and nano-vllm's Scheduler.

Run:
  python 10_batching.py           # checks, then the GPU demo; writes results/10_batching.{json,png}
  python 10_batching.py --quick   # the same with a tiny model on the CPU in seconds

Shapes: T tokens in a step (all sequences' chunks flattened), H query heads, H_KV KV heads, D head dim,
V vocabulary, C context length of a sequence.
"""

import contextlib
import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import harness  # first: sets TRITON_INTERPRET=1 when there is no GPU, before Triton is imported

import torch
import torch.nn.functional as F

attn = harness.load_build("02_attention")
fa = harness.load_build("06_flash")
pk = harness.load_build("09_paged_kv")

# %% [markdown]
# ## Config


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    d_model: int = 1024
    n_head: int = 16
    n_kv_head: int = 4  # GQA, G = 4, as in Llama-3
    ffn_hidden: int = 2816  # SwiGLU width ~ 8/3 d_model
    max_position: int = 4096  # RoPE table length


@dataclass
class DemoConfig:
    n_requests: int = 512
    # Requests per second, Poisson: the 512 arrive in about 1 s, far faster than either policy serves
    # them (an earlier H200 run served 45 and 27 a second), so throughput measures the engine's
    # capacity. At 64/s that run was arrival-bound: continuous batching idled, waiting for requests.
    arrival_rate: float = 512.0
    prompt_len: tuple = (32, 512)  # uniform, inclusive
    output_len: tuple = (16, 512)  # uniform, inclusive; generation always runs to this length (no EOS)
    block_size: int = 16
    kv_tokens: int = 49152  # KV memory of both policies, in tokens (3072 blocks of 16)
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    static_max_len: int = 1024  # what a static engine preallocates per slot: longest prompt + longest output


QUICK_MODEL = ModelConfig(vocab_size=256, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128)
QUICK_DEMO = DemoConfig(
    n_requests=24, arrival_rate=400.0, prompt_len=(8, 48), output_len=(4, 48), block_size=8,
    kv_tokens=768, max_num_seqs=16, max_num_batched_tokens=128, static_max_len=96,
)  # fmt: skip


# %% [markdown]
# ## Sequence state
#
# A request is a Sequence: 09's token list and page table, plus what the scheduler needs.
# `num_computed_tokens` counts the leading tokens whose KV is in the cache. A step computes positions
# [num_computed_tokens, num_computed_tokens + n) of a sequence; when that reaches len(seq), the logits
# of the last position give the next token. A decode is simply n = 1 at the end of the sequence.


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence(pk.Sequence):
    """One request: prompt, generated tokens, computed-token count, status and timings (seconds)."""

    def __init__(self, prompt, max_tokens: int, arrival_time: float = 0.0):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        super().__init__(prompt)
        self.num_prompt_tokens = len(self.token_ids)
        self.max_tokens = max_tokens
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.admission_index: int | None = None  # order of first admission: FCFS means arrival order
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (= seq.num_computed_tokens)
    num_tokens: int  # positions [start, start + num_tokens) are computed

    @property
    def samples(self) -> bool:
        """Does this chunk reach the end of the sequence, so its last logits give the next token?"""
        return self.start + self.num_tokens == len(self.seq)


@dataclass
class Batch:
    """One step's work: the chunks to compute, and the copy-on-write block copies to apply first."""

    items: list[ScheduledSeq]
    copies: list[tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items)


# %% [markdown]
# ## The scheduler
#
# Every step, under two budgets (at most max_num_seqs sequences, at most max_num_batched_tokens tokens):
#   1. running sequences that are decoding, oldest first, one token each. Each needs a slot for its
#      newest token (`append_slot`); when the pool is out of blocks, the newest running sequence is
#      preempted (blocks freed, back to the front of the waiting queue) until the slot fits;
#   2. running sequences still in their prompt: the next chunk, as large as the token budget allows;
#   3. waiting sequences in arrival order: allocate blocks for the whole known sequence (prompt, plus
#      the tokens generated before a preemption), reusing prefix-cached blocks, and schedule the first
#      chunk. The first one that does not fit stops admission: nobody overtakes it (FCFS).
# No starvation: preemption only ever takes the newest running sequence, so the oldest one always
# makes progress (add() refuses requests larger than the whole pool), finishes and frees its blocks;
# then the next oldest is the oldest, and so on. A preempted sequence rejoins at the head of the queue.
# Full blocks are registered in the prefix cache when the step that writes their KV is scheduled: within
# a step, every layer writes all new K/V before any attention reads it.


class Scheduler:
    def __init__(self, block_manager, max_num_seqs: int, max_num_batched_tokens: int, max_prefill_chunk=None):
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"need 1 <= max_num_seqs ({max_num_seqs}) <= max_num_batched_tokens "
                f"({max_num_batched_tokens}): every running sequence must be able to decode in the same step"
            )
        if max_prefill_chunk is not None and max_prefill_chunk < 1:
            raise ValueError(f"max_prefill_chunk must be >= 1 or None, got {max_prefill_chunk}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_chunk = max_prefill_chunk or max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()  # admission order: oldest at the left
        self.num_preemptions = 0
        self.num_admitted = 0
        self.more_arrivals = False  # set by the driver; a static batcher waits to fill while it is True

    def add(self, seq: Sequence) -> None:
        worst = -(-(seq.num_prompt_tokens + seq.max_tokens) // self.bm.block_size)
        if worst > self.bm.num_blocks:
            raise ValueError(
                f"request of {seq.num_prompt_tokens} prompt + {seq.max_tokens} output tokens needs {worst} "
                f"blocks; the pool has {self.bm.num_blocks}"
            )
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-preemption: drop its KV; it rejoins the queue at the front, keeping its tokens."""
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status, seq.num_computed_tokens = Status.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _schedule_decodes(self, items: list) -> None:
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or len(seq) - seq.num_computed_tokens != 1:
                continue  # preempted earlier in this loop, or still in its prompt
            while True:
                try:
                    self.bm.append_slot(seq)
                    items.append(ScheduledSeq(seq, seq.num_computed_tokens, 1))
                    break
                except pk.NoFreeBlocksError:
                    victim = self.running[-1]  # the newest; never one already scheduled (those are older)
                    self._preempt(victim)
                    if victim is seq:
                        break

    def _can_admit(self, seq: Sequence) -> bool:
        return self.bm.can_allocate(seq)

    def _admit(self, seq: Sequence) -> None:
        """Blocks for everything known (prompt, plus tokens generated before a preemption), cache hits
        first; the cached tokens count as computed."""
        seq.num_computed_tokens = self.bm.allocate(seq)
        if seq.admission_index is None:  # first admission (not a re-admission after preemption)
            seq.admission_index, self.num_admitted = self.num_admitted, self.num_admitted + 1
        seq.status = Status.RUNNING
        self.running.append(seq)

    def schedule(self) -> Batch:
        items: list[ScheduledSeq] = []
        preempted = self.num_preemptions
        self._schedule_decodes(items)
        budget = self.max_num_batched_tokens - len(items)
        for seq in self.running:  # partially prefilled prompts: their blocks are already allocated
            left = len(seq) - seq.num_computed_tokens
            if left > 1 and budget > 0:  # (left == 1 was scheduled above, as a decode)
                n = min(left, budget, self.max_prefill_chunk)
                items.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
                budget -= n
        # New admissions, unless this step had to preempt: memory is tight, re-admitting would thrash.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if self.num_preemptions != preempted or not self._can_admit(self.waiting[0]):
                break  # FCFS: nobody overtakes the head of the queue
            seq = self.waiting.popleft()
            self._admit(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget, self.max_prefill_chunk)
            items.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        for it in items:  # their KV is written by this step's forward, before any attention reads it
            self.bm.cache_blocks(it.seq, it.start + it.num_tokens)
        return Batch(items, self.bm.take_copies())

    def postprocess(self, batch: Batch, next_tokens: list[int], now: float) -> list[Sequence]:
        """Advance each scheduled sequence; append the sampled token where the chunk reached the end;
        retire finished sequences and free their blocks. Returns the sequences that finished."""
        finished = []
        for it, tok in zip(batch.items, next_tokens, strict=True):
            seq = it.seq
            seq.num_computed_tokens += it.num_tokens
            if not it.samples:
                continue  # a prompt chunk short of the end: nothing to sample yet
            seq.append_token(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if len(seq.output_ids) >= seq.max_tokens:
                seq.status, seq.finished, seq.finish_time = Status.FINISHED, True, now
                self.bm.free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished


class StaticScheduler(Scheduler):
    """The baseline: a batch is formed only when the previous one has finished and enough requests
    wait to fill it (or no more are coming), and it runs until its longest request ends. Like a
    server with a contiguous cache, it reserves static_max_len tokens of KV per request, so at the
    same memory it runs num_blocks * BS // static_max_len requests at once. (Finished requests stop
    computing, which flatters the baseline: a padded static batch keeps computing them.)"""

    def __init__(self, block_manager, max_num_seqs, max_num_batched_tokens, static_max_len: int, **kw):
        super().__init__(block_manager, max_num_seqs, max_num_batched_tokens, **kw)
        slots = block_manager.num_blocks * block_manager.block_size // static_max_len
        if slots < 1:
            raise ValueError(f"static_max_len {static_max_len} exceeds the KV pool")
        self.max_num_seqs = min(max_num_seqs, slots)
        self.static_max_len = static_max_len

    def add(self, seq: Sequence) -> None:
        if seq.num_prompt_tokens + seq.max_tokens > self.static_max_len:
            raise ValueError(f"request longer than static_max_len {self.static_max_len}")
        super().add(seq)

    def _can_admit(self, seq):
        return False  # nobody joins a running batch

    def schedule(self) -> Batch:
        full = len(self.waiting) >= self.max_num_seqs or not self.more_arrivals
        if not self.running and full:  # the previous batch is done and the next is full (or all there is)
            while (
                self.waiting
                and len(self.running) < self.max_num_seqs
                and self.bm.can_allocate(self.waiting[0])
            ):
                self._admit(self.waiting.popleft())
        return super().schedule()  # prompts in chunks under the token budget, then decodes


# %% [markdown]
# ## The engine loop
#
# step() is the whole engine: schedule, run the model (any callable from a Batch to one row of logits
# per scheduled chunk), sample, and let the scheduler append, retire and free. `serve` drives it over
# a trace of timed arrivals.


def greedy(logits: torch.Tensor) -> list[int]:
    return logits.argmax(-1).tolist()


class WallClock:
    """Seconds since construction."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def _no_label(name: str):
    return contextlib.nullcontext()


class Engine:
    def __init__(self, model, scheduler: Scheduler, sample=greedy, clock=None, label_stages=False):
        clock = WallClock() if clock is None else clock
        self.model, self.scheduler, self.sample, self.clock = model, scheduler, sample, clock
        # label_stages names each stage in a torch.profiler trace (--profile); record_function costs
        # ~10 us a call on a CPU like this one's, so timed runs leave it off
        self.stage = torch.profiler.record_function if label_stages else _no_label

    def step(self) -> tuple[Batch, list[Sequence]]:
        with self.stage("schedule"):
            batch = self.scheduler.schedule()
        if not batch.items:
            return batch, []
        with self.stage("forward"):
            logits = self.model(batch)
        with self.stage("sample"):
            next_tokens = self.sample(logits)  # greedy's .tolist() waits for the GPU
        with self.stage("postprocess"):
            return batch, self.scheduler.postprocess(batch, next_tokens, self.clock())


class StepClock:
    """A clock that counts engine steps: deterministic arrivals for the checks."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def serve(engine: Engine, requests: list[Sequence], on_step=None) -> list[dict]:
    """Feed requests to the engine at their arrival times (seconds on engine.clock, which starts at 0)
    and step until all finish.
    Returns the timeline: per step, its time, sequences scheduled and tokens computed."""
    pending = deque(sorted(requests, key=lambda s: s.arrival_time))
    sched, clock, timeline = engine.scheduler, engine.clock, []
    clock.reset()
    while pending or sched.has_work():
        while pending and pending[0].arrival_time <= clock():
            sched.add(pending.popleft())
        sched.more_arrivals = bool(pending)
        now = clock()
        batch, _ = engine.step() if sched.has_work() else (None, None)
        if batch is None or not batch.items:  # idle, or a static batch still filling: next arrival
            if not pending:
                raise RuntimeError("the scheduler made no progress with no arrivals left")
            if isinstance(clock, StepClock):
                clock.t = max(clock.t, pending[0].arrival_time)
            else:
                time.sleep(max(0.0, pending[0].arrival_time - clock()))
            continue
        if on_step is not None:
            on_step(batch)
        timeline.append({"t": now, "seqs": len(batch.items), "tokens": batch.num_tokens})
        if isinstance(clock, StepClock):
            clock.t += 1
    return timeline


# %% [markdown]
# ## Models
#
# The scheduler only needs a callable from a Batch to logits. Two are built here.
#
# StandInModel: exact integer arithmetic, for the checks. The "KV" of position p is an integer of
# (token_p, p), written through slot_mapping into a paged int64 cache (initialised with garbage); the
# next token is a function of the whole context read back through the page table. Any wrong slot,
# stale block, bad copy-on-write or prefix-cache hit, or lost position after a preemption changes the
# output, while a correct engine reproduces each request's stand-alone output exactly.
#
# TinyLlama: a small Llama-style transformer in plain PyTorch with random weights (RMSNorm, RoPE, GQA,
# SwiGLU). Per layer it writes the step's new K/V into the paged cache with one write_kv launch, runs
# the single-token chunks (decodes) through 09's paged decode kernel, and all multi-token chunks
# (prefill) together: one gather of their contexts through the slots, then one launch of 06's varlen
# flash kernel, whose bottom-right causal diagonal is exactly "the chunk sits at the end of its
# context". The step's index tensors go to the GPU in one copy (step_inputs). An earlier H200 run
# gathered and attended chunk by chunk with a copy of each page table per layer, and each copy waits
# for the GPU: a least-squares fit of its step times gave 2.9 ms + 0.008 ms per sequence + 0.006 ms
# per prefill token + 3.1 ms for any step holding a prefill chunk, so a step with 2,048 prefill tokens
# took 10-16 ms, where its 0.2 TFLOP of matmuls would take 0.3 ms at 700 TFLOP/s. On the CPU both
# attentions go through references (09's gather, 02's attention): the interpreter would take minutes.


class StandInModel:
    def __init__(self, block_manager, vocab_size: int = 97, seed: int = 0):
        bm = block_manager
        g = torch.Generator().manual_seed(seed)
        self.k = torch.randint(-(10**6), 10**6, (bm.num_blocks, 1, bm.block_size, 1), generator=g)
        self.v = self.k.clone()  # unused by the "attention", kept so copy-on-write copies both
        self.block_size, self.vocab_size = bm.block_size, vocab_size

    def __call__(self, batch: Batch) -> torch.Tensor:
        for src, dst in batch.copies:
            self.k[dst], self.v[dst] = self.k[src], self.v[src]
        for it in batch.items:  # every chunk's KV is written before any is read, as in a real forward
            seq, end = it.seq, it.start + it.num_tokens
            kv = torch.tensor(
                [(t * 31 + p * 17) % 1009 for p, t in enumerate(seq.token_ids[it.start : end], it.start)]
            )
            slots = torch.tensor(pk.slot_mapping(seq.block_table, it.start, end, self.block_size))
            pk.write_kv_reference(self.k, self.v, kv.view(-1, 1, 1), kv.view(-1, 1, 1), slots)
        logits = torch.zeros(len(batch.items), self.vocab_size)
        for i, it in enumerate(batch.items):
            end = it.start + it.num_tokens
            ctx = pk.gather_kv(self.k, it.seq.block_table, end).flatten()  # (C,) read through the pages
            logits[i, int((ctx * (torch.arange(end) % 5 + 1)).sum()) % self.vocab_size] = 1.0
        return logits


@dataclass
class StepInputs:
    """One step's index tensors on the device; rows index the step's T tokens (all chunks flattened).
    The decode fields are None when no chunk is a single token, the prefill fields when none is longer."""

    tokens: torch.Tensor  # (T,) token ids
    pos: torch.Tensor  # (T,) positions
    slots: torch.Tensor  # (T,) cache slots the new K/V go to
    last: torch.Tensor  # (len(items),) row of each chunk's last token: its logits are returned
    dec_rows: torch.Tensor | None  # (B_dec,) rows of the single-token chunks
    tables: torch.Tensor | None  # (B_dec, max blocks) int32 page tables, padded with block 0
    ctx_lens: torch.Tensor | None  # (B_dec,) int32 context lengths, the new token included
    max_ctx: int
    pre_rows: torch.Tensor | None  # (T_pre,) rows of the multi-token chunks
    ctx_blk: torch.Tensor | None  # (sum of C,) block and offset in the block of every position of
    ctx_off: torch.Tensor | None  #   every prefill chunk's context, cached prefix and the chunk itself
    cu_q: torch.Tensor | None  # (B_pre + 1,) int32 offsets of the chunks in pre_rows
    cu_k: torch.Tensor | None  # (B_pre + 1,) int32 offsets of their contexts in ctx_blk
    max_q: int
    max_k: int


def step_inputs(items: list[ScheduledSeq], block_size: int, device) -> StepInputs:
    """Built as host lists and moved in ONE copy: a copy from host lists to the GPU waits for the GPU
    to catch up, so one per tensor per layer would stall the pipeline a dozen times a step."""
    tokens, pos, slots, last = [], [], [], []
    dec_rows, tables, ctx = [], [], []
    pre_rows, ctx_slots, cu_q, cu_k = [], [], [0], [0]
    max_q = max_k = 0
    for it in items:
        seq, end, at = it.seq, it.start + it.num_tokens, len(tokens)
        tokens += seq.token_ids[it.start : end]
        pos += range(it.start, end)
        slots += pk.slot_mapping(seq.block_table, it.start, end, block_size)
        last.append(len(tokens) - 1)
        if it.num_tokens == 1:  # a decode (or a one-token prompt chunk): 09's paged decode kernel
            dec_rows.append(at)
            tables.append(seq.block_table)
            ctx.append(end)
        else:  # a prefill chunk: attends to positions 0..end-1, bottom-right causal
            pre_rows += range(at, len(tokens))
            ctx_slots += pk.slot_mapping(seq.block_table, 0, end, block_size)
            cu_q.append(cu_q[-1] + it.num_tokens)
            cu_k.append(cu_k[-1] + end)
            max_q, max_k = max(max_q, it.num_tokens), max(max_k, end)
    width = max(map(len, tables), default=0)
    padded = [b for t in tables for b in t + [0] * (width - len(t))]
    parts = {"tokens": tokens, "pos": pos, "slots": slots, "last": last, "dec_rows": dec_rows,
             "tables": padded, "ctx_lens": ctx, "pre_rows": pre_rows, "ctx_slots": ctx_slots, "cu_q": cu_q,
             "cu_k": cu_k}  # fmt: skip
    flat = torch.tensor([v for p in parts.values() for v in p], dtype=torch.int64).to(device)
    t = dict(zip(parts, flat.split([len(p) for p in parts.values()]), strict=True))
    dec, pre = bool(dec_rows), bool(pre_rows)
    return StepInputs(
        t["tokens"], t["pos"], t["slots"], t["last"],
        t["dec_rows"] if dec else None, t["tables"].view(len(tables), width).int() if dec else None,
        t["ctx_lens"].int() if dec else None, max(ctx, default=0),
        t["pre_rows"] if pre else None, t["ctx_slots"] // block_size if pre else None,
        t["ctx_slots"] % block_size if pre else None,
        t["cu_q"].int() if pre else None, t["cu_k"].int() if pre else None,
        max_q, max_k,
    )  # fmt: skip


def prefill_attention_reference(q, k, v, cu_q, cu_k):
    """What flash_attention_varlen(..., causal=True) computes, chunk by chunk through 02's attention
    (SDPA with the causal diagonal aligned bottom-right: the chunk's queries sit at the end of its keys).
    q (T_pre, H, D), k and v (sum of C, H_KV, D)."""
    out = torch.empty_like(q)
    bounds = torch.stack([cu_q, cu_k]).tolist()
    for q0, q1, k0, k1 in zip(bounds[0], bounds[0][1:], bounds[1], bounds[1][1:], strict=False):
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # (1, H, n, D)
        out[q0:q1] = attn.attention(qi, ki, vi, causal=True)[0].transpose(0, 1)
    return out


def rope_tables(cfg: ModelConfig, head_dim: int, device):
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    ang = torch.arange(cfg.max_position, device=device).float()[:, None] * inv  # (P, D/2)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """x (T, heads, D) rotated by its position's angles; cos, sin (T, D/2). Rotate-half pairing."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


class TinyLlama:
    def __init__(self, cfg: ModelConfig, device, dtype):
        self.cfg, self.hd = cfg, cfg.d_model // cfg.n_head
        d, kv = cfg.d_model, cfg.n_kv_head * self.hd

        def lin(i, o):
            return (torch.randn(o, i, device=device) / math.sqrt(i)).to(dtype)

        self.embed = (torch.randn(cfg.vocab_size, d, device=device)).to(dtype)
        self.layers = [
            {"wqkv": lin(d, d + 2 * kv), "wo": lin(d, d), "w13": lin(d, 2 * cfg.ffn_hidden),
             "w2": lin(cfg.ffn_hidden, d), "n1": torch.ones(d, device=device, dtype=dtype),
             "n2": torch.ones(d, device=device, dtype=dtype)}
            for _ in range(cfg.n_layer)
        ]  # fmt: skip
        self.norm = torch.ones(d, device=device, dtype=dtype)
        self.lm_head = lin(d, cfg.vocab_size)
        self.cos, self.sin = rope_tables(cfg, self.hd, device)
        self.cache: pk.PagedKVCache | None = None
        # attention through 09's paged decode kernel and 06's varlen flash kernel (fp16/bf16 only); on
        # the CPU the interpreter is slow, so the demo uses the references there and only
        # check_model_vs_dense turns the kernels on
        on_gpu = torch.device(device).type == "cuda"
        self.decode_kernel = on_gpu
        self.prefill_kernel = on_gpu and dtype in (torch.float16, torch.bfloat16)

    def attach_cache(self, num_blocks: int, block_size: int):
        c = self.cfg
        self.cache = pk.PagedKVCache(c.n_layer, num_blocks, c.n_kv_head, block_size, self.hd,
                                     self.embed.dtype, self.embed.device)  # fmt: skip

    def _qkv(self, layer, x, pos):
        c, hd = self.cfg, self.hd
        h = F.rms_norm(x, (c.d_model,), layer["n1"], 1e-6)
        q, k, v = (h @ layer["wqkv"].T).split([c.d_model, c.n_kv_head * hd, c.n_kv_head * hd], dim=-1)
        cos, sin = self.cos[pos], self.sin[pos]
        q = apply_rope(q.view(-1, c.n_head, hd), cos, sin)  # (T, H, D)
        k = apply_rope(k.view(-1, c.n_kv_head, hd), cos, sin)  # (T, H_KV, D)
        return q, k, v.reshape(-1, c.n_kv_head, hd)

    def _mlp(self, layer, x):
        g, u = (F.rms_norm(x, (self.cfg.d_model,), layer["n2"], 1e-6) @ layer["w13"].T).chunk(2, dim=-1)
        return (F.silu(g) * u) @ layer["w2"].T

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> torch.Tensor:
        """Logits (len(items), V) at the last computed position of each chunk."""
        self.cache.copy_blocks(batch.copies)
        s = step_inputs(batch.items, self.cache.block_size, self.embed.device)
        x = self.embed[s.tokens]  # (T, d)
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, s.pos)
            self.cache.write(li, k, v, s.slots)  # all new K/V first: chunks may read each other's blocks
            o = torch.empty_like(q)
            kc, vc = self.cache.k[li], self.cache.v[li]
            if s.dec_rows is not None:
                qd = q[s.dec_rows]
                if self.decode_kernel:
                    o[s.dec_rows] = pk.paged_attention_decode(
                        qd, kc, vc, s.tables, s.ctx_lens, max_context_len=s.max_ctx
                    )
                else:
                    o[s.dec_rows] = pk.paged_attention_reference(
                        qd, kc, vc, s.tables, s.ctx_lens, self.hd**-0.5
                    )
            if s.pre_rows is not None:  # every prefill chunk's context, gathered through its slots
                kk, vv = kc[s.ctx_blk, :, s.ctx_off], vc[s.ctx_blk, :, s.ctx_off]  # (sum of C, H_KV, D)
                qp = q[s.pre_rows]
                if self.prefill_kernel:
                    # shapes change every step, so no autotuning inside a trace: 06's first forward
                    # config (128 x 64 tiles, 8 warps), which its checks prove too
                    with fa.fixed_configs(0):
                        o[s.pre_rows] = fa.flash_attention_varlen(  # offsets built above: no checking sync
                            qp, kk, vv, s.cu_q, s.cu_k, s.max_q, s.max_k, causal=True, check_offsets=False
                        )
                else:
                    o[s.pre_rows] = prefill_attention_reference(qp, kk, vv, s.cu_q, s.cu_k)
            x = x + o.reshape(len(x), -1) @ layer["wo"].T
            x = x + self._mlp(layer, x)
        h = F.rms_norm(x[s.last], (self.cfg.d_model,), self.norm, 1e-6)
        return (h @ self.lm_head.T).float()

    @torch.inference_mode()
    def dense_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Reference: the whole sequence at once, no cache, causal SDPA. Logits (C, V)."""
        dev, c = self.embed.device, self.cfg
        pos = torch.arange(len(token_ids), device=dev)
        x = self.embed[torch.tensor(token_ids, device=dev)]
        for layer in self.layers:
            q, k, v = self._qkv(layer, x, pos)
            G = c.n_head // c.n_kv_head
            k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
            o = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), is_causal=True)
            x = x + o.transpose(0, 1).reshape(len(token_ids), -1) @ layer["wo"].T
            x = x + self._mlp(layer, x)
        return (F.rms_norm(x, (c.d_model,), self.norm, 1e-6) @ self.lm_head.T).float()


# %% [markdown]
# ## Checks
#
# With the stand-in model every output is exact, so "the same" means equal token lists. Each engine
# run asserts the budgets at every step and, at the end, that every request finished, the books
# balance and every block is free. The transformer is checked against its own dense forward: the
# logits the engine computed through chunked prefill, the paged cache and the decode kernel equal the
# logits of the whole sequence computed at once.


def make_trace(n, prompt_len, output_len, rate, seed, vocab, shared_prefix=0):
    """(prompt, max_tokens, arrival) per request: Poisson arrivals at `rate` per time unit, lengths
    uniform in the inclusive ranges; the first `shared_prefix` tokens are common to all prompts."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(vocab, (shared_prefix,), generator=g).tolist()
    gaps = torch.empty(n, dtype=torch.float64).exponential_(rate, generator=g)
    specs = []
    for arrival in gaps.cumsum(0).tolist():
        lp = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (), generator=g))
        lo = int(torch.randint(output_len[0], output_len[1] + 1, (), generator=g))
        specs.append((common + torch.randint(vocab, (lp,), generator=g).tolist(), lo, arrival))
    return specs


def run_stand_in(specs, num_blocks, block_size=4, max_num_seqs=6, budget=24, chunk=None, static=False,
                 prefix_caching=True):  # fmt: skip
    """Serve specs with the stand-in model on a step clock; check budgets every step and the books at
    the end. Returns (outputs, scheduler, block manager, admission order)."""
    bm = pk.BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    if static:
        sched = StaticScheduler(bm, max_num_seqs, budget, static_max_len=num_blocks * block_size // 2,
                                max_prefill_chunk=chunk)  # fmt: skip
    else:
        sched = Scheduler(bm, max_num_seqs, budget, max_prefill_chunk=chunk)
    engine = Engine(StandInModel(bm), sched, clock=StepClock())
    seqs = [Sequence(p, m, a) for p, m, a in specs]

    def on_step(batch):
        ids = [it.seq.seq_id for it in batch.items]
        if batch.num_tokens > budget or len(ids) > max_num_seqs or len(set(ids)) != len(ids):
            raise AssertionError(f"budget exceeded: {batch.num_tokens} tokens, {len(ids)} sequences")
        if min((it.num_tokens for it in batch.items), default=1) < 1:
            raise AssertionError("an empty chunk was scheduled")

    serve(engine, seqs, on_step)
    if not all(s.status is Status.FINISHED and len(s.output_ids) == s.max_tokens for s in seqs):
        raise AssertionError("a request did not finish")
    bm.check_invariants([])
    if bm.num_free_blocks != bm.num_blocks or bm.live:
        raise AssertionError("blocks still held at the end")
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].admission_index)  # request indices, as admitted
    return [s.output_ids for s in seqs], sched, bm, order


def stand_in_trace(shared_prefix=0, seed=0):
    return make_trace(14, (1, 14), (1, 16), rate=0.5, seed=seed, vocab=11, shared_prefix=shared_prefix)


def alone(specs):
    """Each request served by itself in an ample pool: the outputs every schedule must reproduce."""
    return [run_stand_in([(p, m, 0.0)], num_blocks=64)[0][0] for p, m, _ in specs]


def check_schedules(label, specs, expected, want_preemption=False, **kw) -> str:
    outs, sched, bm, order = run_stand_in(specs, **kw)
    if outs != expected:
        bad = next(i for i, (a, b) in enumerate(zip(outs, expected, strict=True)) if a != b)
        raise AssertionError(f"{label}: request {bad} gave {outs[bad]}, alone {expected[bad]}")
    if order != sorted(order):
        raise AssertionError(f"{label}: admitted out of arrival order: {order}")
    if want_preemption and sched.num_preemptions == 0:
        raise AssertionError(f"{label}: the pool was meant to force preemptions")
    return f"{len(specs)} requests identical to alone; {sched.num_preemptions} preemptions, " \
           f"cache hit rate {bm.hit_rate():.2f}"  # fmt: skip


def check_errors() -> str:
    bm = pk.BlockManager(4, 4)
    for fn, what in (
        (lambda: Scheduler(bm, 8, 4), "max_num_seqs"),
        (lambda: Scheduler(bm, 2, 8).add(Sequence([1] * 10, 10)), "needs 5 blocks"),
        (lambda: Sequence([1], 0), "max_tokens"),
    ):
        try:
            fn()
            raise AssertionError(f"no error for {what}")
        except ValueError as e:
            if what not in str(e):
                raise AssertionError(f"message {e!r} does not mention {what!r}") from e
    return "bad budgets, requests larger than the pool, max_tokens < 1 raise ValueError"


def check_model_vs_dense(cfg: ModelConfig, device, dtype, chunk=5) -> float:
    """Engine logits (chunked prefill, paged cache, decode and prefill kernels) == the model's dense
    forward. The kernels run on the CPU too, in the Triton interpreter; 06's prefill kernel takes fp16 and
    bf16 only, so in float32 the prefill goes through its reference."""
    model = TinyLlama(cfg, device, dtype)
    model.decode_kernel, model.prefill_kernel = True, dtype in (torch.float16, torch.bfloat16)
    bm = pk.BlockManager(64, 16)
    model.attach_cache(64, 16)
    seen = {}  # (seq_id, position) -> logits row

    def forward(batch):
        logits = model(batch)
        for row, it in zip(logits, batch.items, strict=True):
            seen[(it.seq.seq_id, it.start + it.num_tokens - 1)] = row
        return logits

    g = torch.Generator().manual_seed(1)
    seqs = [
        Sequence(torch.randint(cfg.vocab_size, (n,), generator=g).tolist(), m)
        for n, m in ((23, 6), (7, 9), (40, 3))
    ]
    serve(Engine(forward, Scheduler(bm, 4, 16, max_prefill_chunk=chunk), clock=StepClock()), seqs)
    err = 0.0
    for s in seqs:
        dense = model.dense_logits(s.token_ids)
        pos = sorted(p for i, p in seen if i == s.seq_id)
        fast = torch.stack([seen[(s.seq_id, p)] for p in pos])
        err = max(err, harness.assert_close(fast, dense[pos], dtype, f"seq {s.seq_id} logits"))
    return err


def run_checks(device, dtype, quick, model_cfg):
    checks = harness.Checks()
    specs = stand_in_trace()
    expected = alone(specs)
    checks("errors", check_errors)
    checks("continuous, ample memory", check_schedules, "ample", specs, expected, num_blocks=64)
    checks("continuous, tight memory (preemption)", check_schedules, "tight", specs, expected,
           want_preemption=True, num_blocks=9)  # fmt: skip
    for chunk in (1, 3, 16):
        checks(f"chunked prefill, chunk {chunk}, tight memory", check_schedules, f"chunk {chunk}", specs,
               expected, num_blocks=10, chunk=chunk)  # fmt: skip
    checks(
        "prefix caching off", check_schedules, "no cache", specs, expected, num_blocks=9, prefix_caching=False
    )
    shared = stand_in_trace(shared_prefix=9, seed=1)
    checks("shared prompt prefix, prefix cache on", check_schedules, "shared", shared, alone(shared),
           num_blocks=16)  # fmt: skip
    checks("static baseline", check_schedules, "static", specs, expected, num_blocks=16, static=True)
    # GPU: the demo's dtype, both kernels, and float32 (prefill reference); CPU (the demo in float32):
    # float16 too, for the prefill kernel in the interpreter (whose bf16 dots are wrong)
    for dt in dict.fromkeys([dtype, torch.float32 if device.type == "cuda" else torch.float16]):
        prefill = "varlen flash kernel" if dt in (torch.float16, torch.bfloat16) else "prefill reference"
        checks(f"transformer engine logits vs dense forward ({str(dt).removeprefix('torch.')}, {prefill})",
               check_model_vs_dense, model_cfg, device, dt)  # fmt: skip
    checks.finish()


# %% [markdown]
# ## Demonstration: continuous vs static batching on a Poisson trace
#
# Both policies serve the same requests with the same model and the same KV memory (demo.kv_tokens).
# Output tokens/s = all generated tokens / (last finish - time 0, the trace's start). TTFT = first
# token time - arrival (queueing included); TPOT = (finish - first token) / (output tokens - 1).
# Percentiles over requests. Kernels are compiled before either policy is timed: by a short warm-up
# trace, then by warm_decode_launches for the decode-kernel variants the trace does not reach.
#
# What the H200 measured (results/10_batching.json and notes/10_batching.md; 512 requests arriving in
# about 1 s): 2.1-2.8x static's throughput over four runs, short of the 3x the issue set. Two of the
# three runs with saved timelines paused for Triton compiles mid-trace (1.4-1.7 s of continuous's
# 10-11 s, 0.5 s of static's in one: the warm-up did not yet cover the decode kernel's variants, and
# that fix has not run on the H200); without the pauses they give 2.4-2.5x, and the third, whose
# kernels were compiled already, 2.8x. Both policies
# generate the same tokens, so the ratio is (static's steps / continuous's) x (static's mean step time /
# continuous's). The first factor is the bound the run prints, 3.53x here (5,577 steps against 1,581:
# continuous runs 3.5x the sequences a step). The second is below 1: every step costs ~4 ms of
# launches and Python whatever it holds (a four-layer model leaves the GPU mostly idle), and
# continuous's steps also pay 20-30 us of Python per sequence (schedule, step_inputs, postprocess) and
# ~4 ms more when they hold prefill chunks, in 4x as many steps (330 of ~1,580 against 76
# of 5,577: arrivals, and 215-240 preemptions that prefill again). A stage probe on the H200 timed
# decode steps at 5.9 ms with 82 sequences against 4.2 ms with 25. Replaying the real schedules under
# that cost model (notes/probes/batching_cost_model.py) gives 2.4x; cutting the per-sequence cost to
# 10 us and the prefill extra to 1 ms would give 2.9x, and only a step cost independent of its
# contents reaches the 3.5x bound. In a GPU-bound regime (a large model) the prefill compute, the same
# for both policies, dilutes the ratio instead. So 3x on this trace at this memory is out of reach of a
# Python engine; the notes have the measurements.


def percentile(xs, q):
    return torch.quantile(torch.tensor(xs, dtype=torch.float64), q).item() if xs else float("nan")


def summarize(policy, seqs, timeline, sched) -> dict:
    ttft = [s.first_token_time - s.arrival_time for s in seqs]
    tpot = [
        (s.finish_time - s.first_token_time) / (len(s.output_ids) - 1) for s in seqs if len(s.output_ids) > 1
    ]
    tokens = sum(len(s.output_ids) for s in seqs)
    seconds = max(s.finish_time for s in seqs)
    return {
        "policy": policy, "requests": len(seqs), "output_tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
        "ttft_p99_ms": 1e3 * percentile(ttft, 0.99), "tpot_p50_ms": 1e3 * percentile(tpot, 0.5),
        "tpot_p99_ms": 1e3 * percentile(tpot, 0.99), "steps": len(timeline),
        "mean_seqs_per_step": sum(t["seqs"] for t in timeline) / len(timeline),
        "mean_step_ms": 1e3 * (timeline[-1]["t"] - timeline[0]["t"]) / max(1, len(timeline) - 1),
        "max_concurrent": sched.max_num_seqs, "preemptions": sched.num_preemptions,
    }  # fmt: skip


def run_policy(policy, model, specs, demo: DemoConfig, label_stages=False):
    num_blocks = demo.kv_tokens // demo.block_size
    bm = pk.BlockManager(num_blocks, demo.block_size)
    model.attach_cache(num_blocks, demo.block_size)
    if policy == "static":
        sched = StaticScheduler(bm, demo.max_num_seqs, demo.max_num_batched_tokens, demo.static_max_len)
    else:
        sched = Scheduler(bm, demo.max_num_seqs, demo.max_num_batched_tokens)
    seqs = [Sequence(p, m, a) for p, m, a in specs]
    timeline = serve(Engine(model, sched, label_stages=label_stages), seqs)
    if bm.num_free_blocks != num_blocks:
        raise AssertionError(f"{policy}: blocks still held after the trace")
    return summarize(policy, seqs, timeline, sched), timeline


def warm_decode_launches(model, demo: DemoConfig) -> list[int]:
    """Compile every variant of 09's paged decode kernel the demo can launch, before anything is timed.
    Triton specialises the kernel on its split count (decode_split: from the batch size and the longest
    context) and on whether integer arguments such as the page-table width are 1 or multiples of 16;
    a short warm-up trace meets only some of these, and an earlier H200 run lost 1.4 s of its 10.4 s to
    compiles mid-trace (among them the steps where the batch first fell to 65 and to 32 sequences, where
    the split count changes). So: for each split count a batch of 1 to max_num_seqs sequences with
    contexts up to the longest request can get, one call per page-table width class (the tables may be
    padded wider than the context needs). Returns the counts (none when decoding through the reference)."""
    if not model.decode_kernel:
        return []
    c, dev, dt = model.cfg, model.embed.device, model.embed.dtype
    longest = demo.prompt_len[1] + demo.output_len[1]
    shapes = {}  # split count -> a (batch, context) that gets it
    for batch in range(1, demo.max_num_seqs + 1):
        for ctx in [*range(1, longest, demo.block_size), longest]:
            shapes.setdefault(pk.decode_split(batch, c.n_kv_head, ctx, dev)[0], (batch, ctx))
    kc, vc = model.cache.k[0], model.cache.v[0]
    for batch, ctx in shapes.values():
        q = torch.randn(batch, c.n_head, model.hd, device=dev, dtype=dt)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        need = -(-ctx // demo.block_size)
        for width in {need, -(-need // 16) * 16, -(-need // 16) * 16 + 1}:  # == 1, % 16 == 0, neither
            tables = torch.zeros(batch, width, dtype=torch.int32, device=dev)  # block 0: any valid id
            pk.paged_attention_decode(q, kc, vc, tables, lens, max_context_len=ctx)
    return sorted(shapes)


def demo_run(model_cfg, demo: DemoConfig, device, dtype, seed, profile_out=None):
    model = TinyLlama(model_cfg, device, dtype)
    warm = make_trace(8, demo.prompt_len, (2, 8), 1e6, seed + 1, model_cfg.vocab_size)
    for policy in ("continuous", "static"):  # compiles the kernels for the shape classes they see
        run_policy(policy, model, warm, demo)
    warm_decode_launches(model, demo)  # and the decode variants a short trace does not reach
    specs = make_trace(demo.n_requests, demo.prompt_len, demo.output_len, demo.arrival_rate, seed,
                       model_cfg.vocab_size)  # fmt: skip
    rows, timelines = [], {}
    for policy in ("continuous", "static"):
        row, timelines[policy] = run_policy(policy, model, specs, demo)
        rows.append(row)
        print(f"  {policy}: {row['seconds']:.1f} s, {row['tokens_per_s']:.0f} output tokens/s", flush=True)
    cont, static = rows
    cont["speedup_vs_static"] = cont["tokens_per_s"] / static["tokens_per_s"]
    # both generate the same tokens, so if every step cost the same the ratio would be the step counts'
    cont["equal_step_cost_bound"] = static["steps"] / cont["steps"]
    if profile_out is not None:  # after the timed runs, so the profiler's overhead is not in them
        profile_policies(model, model_cfg, demo, seed, profile_out)
    return rows, timelines


def profile_policies(model, model_cfg, demo: DemoConfig, seed, out):
    """A torch.profiler trace of each policy serving one static batch's worth of requests with short
    outputs, all arriving at once: where a step's time goes, host (schedule, step_inputs, launches)
    against GPU. Prints the top operators and writes out/10_batching_<policy>_trace.json."""
    n = demo.kv_tokens // demo.static_max_len
    short = (demo.output_len[0], min(demo.output_len[1], 64))
    specs = make_trace(n, demo.prompt_len, short, 1e6, seed + 2, model_cfg.vocab_size)
    for policy in ("continuous", "static"):
        with torch.profiler.profile() as prof:
            run_policy(policy, model, specs, demo, label_stages=True)
        print(f"{policy}, {n} requests: operators by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        harness.save_trace(prof, f"10_batching_{policy}", out)


def plot_timelines(timelines, path: Path, demo: DemoConfig):
    plt = harness.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    for ax, (policy, tl) in zip(axes, timelines.items(), strict=True):
        ax.step([r["t"] for r in tl], [r["seqs"] for r in tl], where="post", lw=0.8)
        ax.set_ylabel("sequences in step")
        ax.set_title(f"{policy} batching", fontsize=10)
        ax.set_ylim(0, demo.max_num_seqs * 1.05)
    axes[-1].set_xlabel("seconds since the first arrival")
    fig.suptitle(
        f"Batch occupancy: {demo.n_requests} Poisson requests, same KV memory ({demo.kv_tokens} tokens)"
    )
    harness.save_figure(fig, path, dpi=120)


# %% [markdown]
# ## Main


def main():
    parser = harness.build_parser("Continuous batching scheduler with chunked prefill and preemption")
    args, device, dtype = harness.start(parser)
    if device.type == "cpu":
        dtype = torch.float32  # the tiny CPU model: bf16 matmuls on a CPU are slow and add nothing here
    model_cfg, demo = (
        (QUICK_MODEL, QUICK_DEMO) if args.quick or device.type == "cpu" else (ModelConfig(), DemoConfig())
    )
    t0 = time.perf_counter()
    run_checks(device, dtype, args.quick, model_cfg)
    print(f"checks took {time.perf_counter() - t0:.1f} s")
    if args.no_bench:
        return
    print(f"trace: {demo.n_requests} requests, Poisson arrivals at {demo.arrival_rate}/s, prompts "
          f"U{list(demo.prompt_len)}, outputs U{list(demo.output_len)}; KV memory {demo.kv_tokens} tokens "
          f"for both; static reserves {demo.static_max_len} tokens per request")  # fmt: skip
    t0 = time.perf_counter()
    rows, timelines = demo_run(model_cfg, demo, device, dtype, args.seed, args.out if args.profile else None)
    print(f"demo took {time.perf_counter() - t0:.1f} s")
    harness.print_table(rows)
    speedup = rows[0]["speedup_vs_static"]
    if device.type == "cuda" and not args.quick:
        verdict = "met" if speedup >= 3 else "MISSED"
        print(f"target continuous >= 3x static throughput: {speedup:.2f}x -> {verdict}")
        bound, (c_ms, s_ms) = rows[0]["equal_step_cost_bound"], (r["mean_step_ms"] for r in rows)
        print(
            f"bound if every step cost the same (static steps / continuous steps): {bound:.2f}x; measured "
            f"{speedup / bound:.0%} of it, as continuous's mean step took {c_ms:.2f} ms against {s_ms:.2f}"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot_timelines(timelines, Path(args.out) / "10_batching.png", demo)
    harness.write_results(
        "10_batching", rows, device, args.out, dtype=str(dtype), model=dataclasses.asdict(model_cfg),
        demo=dataclasses.asdict(demo), quick=args.quick,
        timelines={p: {k: [round(r[k], 4) for r in tl] for k in tl[0]} for p, tl in timelines.items()},
    )  # fmt: skip


if __name__ == "__main__":
    main()
