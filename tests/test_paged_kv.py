"""09_paged_kv.py: block-manager invariants (hypothesis), COW, prefix caching, and the paged decode kernel
(run by the interpreter on CPU) against a float64 gather reference and SDPA."""

import harness

import pytest
import torch
from conftest import load_build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pk = load_build("09_paged_kv")
DEVICE = harness.pick_device()

OPS = st.lists(
    st.tuples(
        st.sampled_from(["new", "append", "append", "fork", "free"]),
        st.integers(0, 30),
        st.integers(0, 30),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, num_blocks=st.integers(2, 16), block_size=st.sampled_from([1, 2, 4]))
def test_random_workload_keeps_invariants(ops, num_blocks, block_size):
    # random_workload checks free + in-use == total, ref counts == page-table occurrences, no block
    # owned twice, after every op, and that every block is free once all sequences are freed.
    pk.random_workload(ops, num_blocks=num_blocks, block_size=block_size)


def test_slot_mapping_example():
    assert pk.slot_mapping([7, 2], 3, 7, 4) == [31, 8, 9, 10]


def test_errors():
    pk.check_errors()
    bm = pk.BlockManager(4, 2)
    s = pk.Sequence([1, 2, 3])
    with pytest.raises(pk.SequenceStateError, match="holds no blocks"):
        bm.append_slot(s)
    bm.allocate(s)
    with pytest.raises(pk.SequenceStateError, match="already holds blocks"):
        bm.allocate(s)
    with pytest.raises(ValueError, match="num_tokens"):
        bm.allocate(pk.Sequence([1]), 2)
    with pytest.raises(ValueError, match="at least one token"):
        pk.Sequence([])


def test_cow_and_prefix_cache_return_recomputed_kv():
    pk.check_cow(DEVICE)
    pk.check_prefix_cache(DEVICE)
    pk.check_lru()


def test_hash_collisions_cannot_return_wrong_kv(monkeypatch):
    # Every block hashes alike: the tokens (and parent name) compared on a hit must refuse foreign KV.
    monkeypatch.setattr(pk, "block_hash", lambda parent, tokens: b"same")
    bm = pk.BlockManager(16, 2)
    a, b = pk.Sequence([1, 2, 3, 4, 5]), pk.Sequence([1, 2, 9, 9, 5])
    bm.allocate(a)
    bm.cache_blocks(a, len(a))
    assert bm.allocate(b) == 2  # block [1, 2] is a true hit; [9, 9] must not match a's [3, 4]
    assert b.block_table[1] != a.block_table[1]


def test_position_blind_hash_cannot_return_a_block_from_another_position(monkeypatch):
    # A hash of the tokens alone: a's block at positions 2-3 holds [1, 2] given the prefix [5, 6]; b's
    # first block is also [1, 2], same name, same tokens, but another parent: it must not be a hit.
    monkeypatch.setattr(pk, "block_hash", lambda parent, tokens: bytes(tokens))
    bm = pk.BlockManager(16, 2)
    a, b = pk.Sequence([5, 6, 1, 2, 0]), pk.Sequence([1, 2, 1, 2, 0])
    bm.allocate(a)
    bm.cache_blocks(a, len(a))
    assert bm.allocate(b) == 0
    assert a.block_table[1] not in b.block_table
    bm.cache_blocks(b, len(b))
    bm.check_invariants([a, b])


def test_invariants_check_what_named_blocks_hold():
    bm = pk.BlockManager(8, 2)
    a = pk.Sequence([1, 2, 3, 4, 5])
    bm.allocate(a)
    bm.cache_blocks(a, len(a))
    bm.check_invariants([a])
    block = bm.blocks[a.block_table[1]]
    block.token_ids = (3, 9)  # the name's tokens no longer those at its position in a
    with pytest.raises(AssertionError, match="tokens"):
        bm.check_invariants([a])
    block.token_ids = (3, 4)
    bm.check_invariants([a])
    block.parent = b"another prefix"  # right tokens, recorded under another parent
    with pytest.raises(AssertionError, match="hash"):
        bm.check_invariants([a])


def test_full_prompt_hit_still_computes_last_token():
    bm = pk.BlockManager(8, 2)
    a = pk.Sequence([1, 2, 3, 4])
    bm.allocate(a)
    bm.cache_blocks(a, 4)
    b = pk.Sequence([1, 2, 3, 4])
    assert bm.allocate(b) == 2  # the block holding the last prompt token is recomputed for its logits
    assert bm.stats["hit_blocks"] == 1


def test_write_kv_matches_index_put():
    pk.check_write_kv(DEVICE, torch.bfloat16)
    pk.check_write_kv(DEVICE, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_decode_kernel(G, block_size, dtype):
    lens = [1, 37, 200, 16, 129, 64]
    assert (
        pk.check_decode(lens, 2 * G, 2, block_size, dtype, DEVICE, 32, num_splits=3)
        < harness.TOLERANCES[dtype]
    )


@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_kernel_splits_and_fp32(num_splits):
    # 7 slices asked of a 300-token context run as 5 of 64 tokens (whole BLOCK_N = 64 tiles in the
    # interpreter); some slices are empty for the short sequences
    lens = [300, 3, 45]
    if num_splits == 7:
        assert pk.decode_split(3, 2, 300, DEVICE, 7, 64) == (5, 64)
    err = pk.check_decode(lens, 4, 2, 16, torch.float32, DEVICE, 16, num_splits=num_splits)
    assert err < harness.TOLERANCES[torch.float32]


def test_split_heuristic():
    assert pk.choose_num_splits(1, 8, 32768, 132) == 33
    assert pk.decode_split(1, 8, 32768, DEVICE, 33, 64) == (32, 1024)  # what runs: 32 slices of 1024
    assert pk.choose_num_splits(64, 8, 8192, 132) == 1
    assert pk.choose_num_splits(1, 8, 300, 132) == 1  # too short to split


def test_decode_bad_inputs():
    kc = torch.randn(4, 2, 16, 32, device=DEVICE)
    q = torch.randn(2, 3, 32, device=DEVICE)
    bt = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    ctx = torch.ones(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of H_KV"):
        pk.paged_attention_decode(q, kc, kc, bt, ctx)
    with pytest.raises(TypeError, match="accepted"):
        pk.paged_attention_decode(q.long(), kc, kc, bt, ctx)
    with pytest.raises(ValueError, match="powers of two"):
        pk.paged_attention_decode(
            torch.randn(2, 4, 24), torch.randn(4, 2, 16, 24), torch.randn(4, 2, 16, 24), bt, ctx
        )


def test_memory_waste_table():
    rows = pk.memory_waste(n=500)
    for r in rows:
        assert r["paged_bs16_waste_%"] < r["contiguous_waste_%"]


@pytest.mark.parametrize("num_splits", [None, 1, 2])
def test_decode_short_max_context_len_still_reads_every_token(num_splits):
    # max_context_len is a hint for the launch (split count, slice length); a sequence longer than
    # num_splits * split_len is finished by its last slice instead of silently losing tokens.
    err = pk.check_decode([200, 7], 4, 2, 16, torch.float32, DEVICE, 16, num_splits, max_context_len=8)
    assert err < harness.TOLERANCES[torch.float32]


def test_decode_bad_split_arguments():
    kc = torch.randn(4, 2, 16, 32, device=DEVICE)
    q = torch.randn(2, 4, 32, device=DEVICE)
    bt = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    ctx = torch.ones(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="num_splits"):
        pk.paged_attention_decode(q, kc, kc, bt, ctx, num_splits=0)
    with pytest.raises(ValueError, match="max_context_len"):
        pk.paged_attention_decode(q, kc, kc, bt, ctx, max_context_len=0)


def test_decode_empty_context():
    # Checked (ValueError) when the launcher reads context_lens anyway; with max_context_len given
    # (no device->host read, as under graph capture) an empty sequence's output is 0, split or not.
    kc = torch.randn(4, 2, 16, 32, device=DEVICE)
    q = torch.randn(2, 4, 32, device=DEVICE)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor([20, 0], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="context_lens"):
        pk.paged_attention_decode(q, kc, kc, bt, ctx)
    for n in (1, 2):
        out = pk.paged_attention_decode(
            q, kc, kc, bt, ctx, max_context_len=20, num_splits=n, launch=(16, 1, 1)
        )
        assert pk.decode_split(2, 2, 20, DEVICE, n, 16)[0] == n
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out[0]).all()
