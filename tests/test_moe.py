"""05_moe: every check of the build on small shapes (Triton interpreter on CPU, fp32/fp16 dots).

Token counts are odd and the model sizes (d=48, f=40) are off the interpreter's 32-wide tiles, so the
ragged M, N and K edges of the grouped GEMM are exercised; bf16 runs on the GPU (the Triton 3.9
interpreter's bf16 tl.dot is unreliable).
"""

import harness

import pytest
import torch
from conftest import load_build

moe = load_build("05_moe")
DEVICE = harness.pick_device()
D, F = 48, 40


@pytest.mark.parametrize("case", list(moe.CASES))
@pytest.mark.parametrize("impl", ["loop", "triton", "grouped_mm"])
def test_forward_and_gradients_match_dense_float64(case, impl):
    if impl == "grouped_mm" and not moe.HAS_GROUPED_MM:
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm")
    # every routing option, top-1/2/3/8, capacity, shared experts; output and all gradients
    err = moe.check_layer(case, impl, torch.float32, DEVICE, D, F)
    assert isinstance(err, float) and err < harness.TOLERANCES[torch.float32]
    if getattr(err, "note", None):  # a torch whose _grouped_mm has no backward: only the forward ran
        pytest.skip(f"gradients not checked: {err.note}")


def test_triton_fp16():
    assert (
        moe.check_layer("mixtral top-2", "triton", torch.float16, DEVICE, D, F)
        < harness.TOLERANCES[torch.float16]
    )


def test_kernels_write_exactly_the_kept_rows():
    assert moe.check_kernel_rows(DEVICE, torch.float32) < harness.TOLERANCES[torch.float32]


def test_routing_variants_and_precision():
    assert moe.check_routing(DEVICE) < harness.TOLERANCES[torch.float32]


def test_balance_loss_minimum_and_growth():
    assert "= alpha" in moe.check_balance_loss(DEVICE)


def test_balance_loss_by_hand():
    # E=2, k=1, two tokens both on expert 0 with P = (0.75, 0.25): f = (1, 0), L = a * 2 * 0.75
    r = moe.Routing(torch.tensor([[0], [0]]), None, None, torch.tensor([[0.5, 0.5], [1.0, 0.0]]), None)
    assert moe.balance_loss(r, 2, 0.1).item() == pytest.approx(0.1 * 2 * 0.75)


def test_capacity_drops_exactly_the_overflow():
    assert "dropped" in moe.check_capacity(DEVICE)


def test_capacity_keep_by_hand():
    # E=2, capacity 1: token 0's first choice wins expert 0, token 1's first choice wins expert 1,
    # both second choices overflow
    keep = moe.capacity_keep(torch.tensor([[0, 1], [1, 0]]), 2, 1)
    assert keep.tolist() == [[True, False], [True, False]]


def test_plan_dispatch_by_hand():
    plan = moe.plan_dispatch(torch.tensor([[1], [0], [1]]), 2)
    assert plan.row_token.tolist() == [1, 0, 2]
    assert plan.starts.tolist() == [0, 1] and plan.ends.tolist() == [1, 3]


def test_bias_update_and_mixtral_load():
    moe.check_bias_update(DEVICE)
    assert moe.check_mixtral_load(DEVICE, torch.float32) < harness.TOLERANCES[torch.float32]


def test_aux_outputs_and_leading_dims():
    layer = moe.MoELayer(16, 24, 4, 2, capacity_factor=1.0)
    x = torch.randn(2, 9, 16)
    y, aux = layer(x)
    assert y.shape == x.shape
    assert aux["tokens_per_expert"].sum().item() == 18 * 2
    assert set(aux) >= {"balance_loss", "z_loss", "loss", "tokens_per_expert", "dropped", "routing"}
    torch.testing.assert_close(aux["loss"], aux["balance_loss"] + aux["z_loss"])


def test_demo_collapses_without_balancing_and_not_with():
    fr = {t: moe.train_demo(DEVICE, 60, 64, **o)[-10:].mean(0) for t, o in moe.DEMO_RUNS.items()}
    no_loss, switch, bias = fr.values()
    assert no_loss.max() > 0.3  # most pairs on about k experts
    assert switch.max() < 0.25 and bias.max() < 0.25  # near 1/E = 0.125


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="top_k"):
        moe.MoELayer(8, 8, 4, 5)
    with pytest.raises(ValueError, match="accepted: softmax_topk"):
        moe.MoELayer(8, 8, 4, 2, routing="softmax")
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.MoELayer(8, 8, 4, 2, capacity_factor=0)
    layer = moe.MoELayer(8, 8, 4, 2)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(3, 9))
    with pytest.raises(ValueError, match="accepted: auto"):
        layer(torch.randn(3, 8), impl="fast")
    with pytest.raises(TypeError, match="accepted: float32, bfloat16, float16"):
        layer.double()(torch.randn(3, 8, dtype=torch.float64), impl="triton")
    with pytest.raises(KeyError, match="missing"):
        moe.load_mixtral(moe.MoELayer(8, 8, 4, 2), {}, 0)


def test_inference_path_matches_training_path():
    torch.manual_seed(0)
    layer = moe.MoELayer(D, F, 8, 2)
    x = torch.randn(23, D)
    with torch.no_grad():
        y_inf, _ = layer(x, impl="triton")
    y_train, _ = layer(x, impl="triton")
    assert y_inf.grad_fn is None and y_train.grad_fn is not None
    torch.testing.assert_close(y_inf, y_train)


def test_grouped_mm_layout_is_aligned_and_complete():
    # capacity leaves gaps; every group offset must be a multiple of 16 and every kept row placed once
    ids = torch.randint(0, 8, (37, 2))
    plan = moe.plan_dispatch(ids, 8, moe.capacity_keep(ids, 8, 7))
    dest, kept_row, offs, n_rows = moe._padded_layout(plan)
    assert (offs % moe.ALIGN == 0).all() and offs[-1].item() == n_rows
    placed = dest[kept_row]
    assert placed.unique().numel() == placed.numel() and (dest[~kept_row] == n_rows - 1).all()
    # each kept row lands inside its own expert's group: offs[e-1] <= dest < offs[e] (offs[-1] = 0)
    expert = ids.t().reshape(-1).sort(stable=True).values  # expert of each sorted row
    group_start = torch.cat([offs.new_zeros(1), offs[:-1]])
    e = expert[kept_row]
    assert ((group_start[e] <= placed) & (placed < offs[e])).all()


@pytest.mark.parametrize("impl", ["loop", "triton"])
def test_empty_input_gives_empty_output_and_zero_losses(impl):
    layer = moe.MoELayer(D, F, 8, 2)
    x = torch.randn(0, D, requires_grad=True)
    y, aux = layer(x, impl=impl)
    assert y.shape == (0, D)
    assert aux["loss"].item() == 0.0 and aux["balance_loss"].item() == 0.0 and aux["z_loss"].item() == 0.0
    (y.sum() + aux["loss"]).backward()
    assert x.grad.shape == (0, D) and torch.isfinite(layer.gate.grad).all()


def test_float64_layer_matches_dense_float64():
    # auto picks the loop for float64; it must accumulate in float64, not float32
    torch.manual_seed(3)
    layer = moe.MoELayer(D, F, 8, 2, dtype=torch.float64)
    x = torch.randn(23, D, dtype=torch.float64)
    with torch.no_grad():
        y, aux = layer(x)
        ref = moe.moe_dense_reference(x, layer.w1, layer.w3, layer.w2, aux["routing"])
    harness.assert_close(y, ref, torch.float64)
