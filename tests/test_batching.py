"""10_batching.py: the scheduler with a deterministic stand-in model (every schedule reproduces each
request's stand-alone output, budgets hold, FCFS, all blocks freed), and the transformer's paged
engine against its dense forward."""

import types

import harness

import pytest
import torch
from conftest import load_build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

bt = load_build("10_batching")
pk = load_build("09_paged_kv")
DEVICE = harness.pick_device()

SPECS = bt.stand_in_trace()
EXPECTED = bt.alone(SPECS)


@pytest.mark.parametrize("num_blocks", [9, 12, 64])
@pytest.mark.parametrize("chunk", [None, 1, 2, 5, 16])
def test_outputs_match_alone_under_any_chunk_and_memory(chunk, num_blocks):
    bt.check_schedules("t", SPECS, EXPECTED, num_blocks=num_blocks, chunk=chunk)


def test_tight_memory_preempts_and_still_matches():
    msg = bt.check_schedules("t", SPECS, EXPECTED, want_preemption=True, num_blocks=9)
    assert "preemptions" in msg


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_shared_prefix(prefix_caching):
    shared = bt.stand_in_trace(shared_prefix=9, seed=1)
    outs, _, bm, _ = bt.run_stand_in(shared, num_blocks=16, prefix_caching=prefix_caching)
    assert outs == bt.alone(shared)
    assert (bm.stats["hit_blocks"] > 0) == prefix_caching


def test_static_baseline_matches_and_never_refills_a_running_batch():
    bt.check_schedules("static", SPECS, EXPECTED, num_blocks=16, static=True)
    bm = pk.BlockManager(32, 4)
    sched = bt.StaticScheduler(bm, 8, 16, static_max_len=32)  # 4 slots of 32 tokens
    for _ in range(6):
        sched.add(bt.Sequence([1, 2, 3], max_tokens=4))
    sched.schedule()
    assert len(sched.running) == 4 and len(sched.waiting) == 2


def test_static_baseline_admits_nobody_until_the_whole_batch_is_done():
    bm = pk.BlockManager(32, 4)
    sched = bt.StaticScheduler(bm, 8, 16, static_max_len=32)  # 4 slots of 32 tokens
    engine = bt.Engine(bt.StandInModel(bm), sched, clock=bt.StepClock())
    seqs = [bt.Sequence([1, 2, 3], max_tokens=m) for m in (2, 5, 3, 8, 2, 2)]
    for s in seqs:
        sched.add(s)
    engine.step()
    batch = set(sched.running)
    assert batch == set(seqs[:4])
    finished_first = False
    while batch & set(sched.running):  # some of the first batch still runs: the waiting must wait
        _, done = engine.step()
        finished_first |= bool(done)
        assert set(sched.running) <= batch and list(sched.waiting) == seqs[4:]
    assert finished_first  # requests of the batch finished at different steps, with the slots left idle
    engine.step()
    assert set(sched.running) == set(seqs[4:])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(8, 40),
    max_num_seqs=st.integers(1, 6),
    budget_extra=st.integers(0, 20),
    chunk=st.one_of(st.none(), st.integers(1, 8)),
)
def test_random_traces(seed, num_blocks, max_num_seqs, budget_extra, chunk):
    specs = bt.make_trace(8, (1, 12), (1, 10), rate=0.7, seed=seed, vocab=7, shared_prefix=seed % 6)
    outs, _, _, order = bt.run_stand_in(
        specs,
        num_blocks=num_blocks,
        max_num_seqs=max_num_seqs,
        budget=max_num_seqs + budget_extra,
        chunk=chunk,
    )
    assert outs == bt.alone(specs)
    assert order == sorted(order)  # FCFS admission


def test_errors():
    bt.check_errors()
    with pytest.raises(ValueError, match="max_prefill_chunk"):
        bt.Scheduler(pk.BlockManager(4, 4), 2, 8, max_prefill_chunk=0)


def test_engine_step_and_timings():
    bm = pk.BlockManager(16, 4)
    clock = bt.StepClock()
    engine = bt.Engine(bt.StandInModel(bm), bt.Scheduler(bm, 2, 8), clock=clock)
    seqs = [bt.Sequence([3, 1, 4, 1, 5], 3, arrival_time=0.0), bt.Sequence([2, 7], 2, arrival_time=1.0)]
    timeline = bt.serve(engine, seqs)
    assert [len(s.output_ids) for s in seqs] == [3, 2]
    assert all(s.first_token_time >= s.arrival_time and s.finish_time >= s.first_token_time for s in seqs)
    assert timeline[0]["tokens"] == 5  # the first prompt fits the budget of 8 in one chunk
    row = bt.summarize("continuous", seqs, timeline, engine.scheduler)
    assert row["output_tokens"] == 5
    assert row["mean_step_ms"] == 1e3  # the step clock advances one unit a step, and nobody idled


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp16: 06's prefill kernel as well
def test_transformer_engine_matches_dense_forward(dtype):
    bt.check_model_vs_dense(bt.QUICK_MODEL, DEVICE, dtype)  # raises past the dtype's tolerance


def test_step_inputs_split_decodes_from_prefill_chunks():
    bm = pk.BlockManager(16, 4)
    a, b = bt.Sequence(list(range(6)), 2), bt.Sequence(list(range(3)), 2)
    bm.allocate(a)
    bm.allocate(b)
    items = [bt.ScheduledSeq(a, 5, 1), bt.ScheduledSeq(b, 1, 2)]  # a decodes position 5; b prefills 1..2
    s = bt.step_inputs(items, 4, "cpu")
    assert s.tokens.tolist() == [5, 1, 2] and s.pos.tolist() == [5, 1, 2] and s.last.tolist() == [0, 2]
    assert s.dec_rows.tolist() == [0] and s.ctx_lens.tolist() == [6] and s.max_ctx == 6
    assert s.tables.tolist() == [a.block_table] and s.tables.dtype == torch.int32
    assert s.pre_rows.tolist() == [1, 2] and s.cu_q.tolist() == [0, 2] and s.cu_k.tolist() == [0, 3]
    slots = pk.slot_mapping(b.block_table, 0, 3, 4)
    assert (s.ctx_blk * 4 + s.ctx_off).tolist() == slots and (s.max_q, s.max_k) == (2, 3)
    only_decode = bt.step_inputs(items[:1], 4, "cpu")
    assert only_decode.pre_rows is None and only_decode.cu_q is None


def test_demo_continuous_takes_fewer_steps_than_static():
    demo = bt.QUICK_DEMO
    model = bt.TinyLlama(bt.QUICK_MODEL, DEVICE, torch.float32)
    specs = bt.make_trace(10, demo.prompt_len, (2, 24), 1e3, 0, bt.QUICK_MODEL.vocab_size)
    cont, _ = bt.run_policy("continuous", model, specs, demo)
    static, _ = bt.run_policy("static", model, specs, demo)
    assert cont["output_tokens"] == static["output_tokens"]
    assert cont["steps"] < static["steps"]


def test_profile_labels_each_engine_stage(tmp_path):
    model = bt.TinyLlama(bt.QUICK_MODEL, DEVICE, torch.float32)
    bt.profile_policies(model, bt.QUICK_MODEL, bt.QUICK_DEMO, 0, tmp_path)
    for policy in ("continuous", "static"):
        trace = (tmp_path / f"10_batching_{policy}_trace.json").read_text()
        for stage in ("schedule", "forward", "sample", "postprocess"):
            assert f'"name": "{stage}"' in trace, (policy, stage)


def test_warm_up_launches_every_decode_split_count(monkeypatch):
    """The demo compiles each paged-decode variant before timing: with an H200's 132 SMs its batches
    and contexts reach several split counts, and each gets calls with a page-table width that is a
    multiple of 16 and one that is not (Triton specialises integer arguments on that)."""
    demo, cfg, calls = bt.DemoConfig(), bt.ModelConfig(), []
    monkeypatch.setattr(bt.pk, "_sm_count", lambda device: 132)

    def record(q, k_cache, v_cache, tables, lens, max_context_len):
        splits = bt.pk.decode_split(q.shape[0], cfg.n_kv_head, max_context_len, "cpu")[0]
        calls.append((splits, tables.shape[1]))

    monkeypatch.setattr(bt.pk, "paged_attention_decode", record)
    model = types.SimpleNamespace(decode_kernel=True, cfg=cfg, hd=cfg.d_model // cfg.n_head,
                                  embed=torch.zeros(1, dtype=torch.float16),
                                  cache=types.SimpleNamespace(k=[None], v=[None]))  # fmt: skip
    counts = bt.warm_decode_launches(model, demo)
    longest = demo.prompt_len[1] + demo.output_len[1]
    every = {bt.pk.decode_split(b, cfg.n_kv_head, c, "cpu")[0] for b in range(1, demo.max_num_seqs + 1)
             for c in range(1, longest + 1)}  # fmt: skip
    assert sorted({n for n, _ in calls}) == counts == sorted(every) and len(counts) > 2
    for n in counts:
        widths = [w for m, w in calls if m == n]
        assert any(w % 16 == 0 for w in widths) and any(w % 16 for w in widths), (n, widths)
    model.decode_kernel = False  # the reference decode has nothing to compile
    assert bt.warm_decode_launches(model, demo) == []
