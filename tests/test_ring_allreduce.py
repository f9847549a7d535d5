"""12_ring_allreduce: the ring against a float64 sum and dist.all_reduce on gloo (multi-process), bad input,
the launcher's backend choice, the benchmark rows and the cost model."""

import math

import pytest
import torch
from conftest import load_build

ring = load_build("12_ring_allreduce")


def test_bounds_split_any_length():
    assert ring._bounds(7, 3) == [0, 3, 5, 7]
    assert ring._bounds(1, 4) == [0, 1, 1, 1, 1]
    assert ring._bounds(1000003, 4)[-1] == 1000003


def test_checks_on_gloo_world_sizes_2_3_4():
    """Spawns 4 gloo ranks; sums for n = 2, 3, 4 (subgroups), N = 1, 7, 1000003, fp32 and bf16; bad input.
    A failed check exits its ranks non-zero, which launch raises."""
    assert ring.launch(ring.Config(world_size=4, bench=False)) is None


def test_benchmark_rows_on_two_ranks():
    cfg = ring.Config(world_size=2, min_bytes=1024, max_bytes=4096, time_per_size=0.01)
    rows = ring.launch(cfg)
    assert [r["bytes"] for r in rows] == [1024, 4096]
    for r in rows:
        # nccl-tests: busbw = algbw * 2(n-1)/n, which is algbw itself for n = 2
        assert math.isclose(r["ours_busbw_GBs"], r["ours_algbw_GBs"])
        assert r["ours_us"] > 0 and r["torch_us"] > 0 and r["ours_vs_torch"] > 0


def test_bad_input_without_a_process_group():
    with pytest.raises(TypeError, match="accepted: float32, bfloat16, float16"):
        ring.ring_allreduce(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        ring.ring_allreduce(torch.ones(4, 4).t())
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring.ring_allreduce(torch.ones(3))


def test_backend_choice_on_cpu():
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs: auto picks NCCL")
    assert ring.choose_backend("auto", None) == ("gloo", 4)
    assert ring.choose_backend("gloo", 3) == ("gloo", 3)
    with pytest.raises(SystemExit, match="two or more GPUs"):
        ring.choose_backend("nccl", None)
    with pytest.raises(SystemExit, match=">= 2"):
        ring.choose_backend("gloo", 1)


def test_cost_model_crossover():
    B, alpha = 50e9, 5e-6
    for n in (8, 64, 1024):
        S = ring.crossover_bytes(n, B, alpha)
        assert math.isclose(ring.t_ring(n, S, B, alpha), ring.t_tree(n, S, B, alpha), rel_tol=1e-9)
        assert ring.t_ring(n, 2 * S, B, alpha) < ring.t_tree(n, 2 * S, B, alpha)  # ring wins above it
    # large messages: the ring's time tends to 2(n-1)/n * S/B, the bandwidth lower bound
    assert math.isclose(ring.t_ring(8, 1e12, B, 0.0), 2 * 7 / 8 * 1e12 / B)
