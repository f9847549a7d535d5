"""08_loader: token file format and corruption, prepare, nanoGPT parity, epoch partition across ranks and
workers, resume, determinism across processes, bad arguments."""

import json

import harness

import numpy as np
import pytest
import torch
from conftest import load_build

ld = load_build("08_loader")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """4001 ids from a 60000 vocabulary: uint16 with ids above 32767 (the sign-extension case)."""
    path = tmp_path_factory.mktemp("small") / "small.bin"
    return ld.write_tokens(path, np.random.default_rng(0).integers(0, 60000, 4001), 60000, 0)


def test_file_round_trip_and_dtype(tmp_path):
    assert ld.check_file_roundtrip(tmp_path)
    head = (tmp_path / "rt300.bin").read_bytes()[:8]
    assert head == ld.MAGIC


CORRUPTIONS = {"magic": "not a token file", "version": "version", "dtype": "bytes per token",
               "count too large": "header says", "truncated": "header says", "trailing bytes": "header says",
               "short header": "shorter than", "eot >= vocab": "need eot < vocab"}  # fmt: skip


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_header_raises(tmp_path, case):
    good = ld.write_tokens(tmp_path / "good.bin", np.arange(100) % 50, 50, eot=49)
    cases = ld.corrupt_cases(good)
    assert set(cases) == set(CORRUPTIONS)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(cases[case])
    with pytest.raises(ValueError, match=CORRUPTIONS[case]):
        ld.open_tokens(bad)


def test_write_rejects_bad_ids(tmp_path):
    with pytest.raises(ValueError, match="ids must lie in"):
        ld.write_tokens(tmp_path / "x.bin", np.array([0, 5]), 5, 0)
    with pytest.raises(TypeError, match="1-D integer"):
        ld.write_tokens(tmp_path / "x.bin", np.array([0.5]), 5, 0)


@pytest.mark.parametrize("vocab, eot", [(5, 5), (5, -1), (2**32, 0), (0, 0)])
def test_write_rejects_what_the_reader_rejects(tmp_path, vocab, eot):
    """The writer refuses a header the reader would refuse (or could not even pack)."""
    with pytest.raises(ValueError, match="need 0 <= eot < vocab_size"):
        ld.write_tokens(tmp_path / "x.bin", np.array([0, 1]), vocab, eot)


def test_prepare_with_our_bpe(tmp_path):
    assert "decode == text" in ld.check_prepare(harness.resolve_data("tinyshakespeare.txt"), tmp_path, True)
    info = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert info["train_docs"] == 1 and info["val_docs"] == 1


def test_prepare_cl100k_is_uint32(tmp_path):
    text = harness.resolve_data("tinyshakespeare.txt").read_text(encoding="utf-8")[:5000]
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    info = ld.prepare([tmp_path / "a.txt"], tmp_path / "out", "cl100k", progress=False)
    tf = ld.open_tokens(tmp_path / "out" / "train.bin")
    assert tf.tokens.dtype == np.uint32 and tf.eot == 100257 and info["vocab_size"] == 100277
    enc, _, _ = ld.make_tokenizer("cl100k", "")
    assert enc.decode(tf.tokens[:-1].tolist()) == text[: int(len(text) * 0.9)]


def test_prepare_bad_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bpe:<vocab size>"):
        ld.prepare([tmp_path / "a.txt"], tmp_path / "out", "gpt2", progress=False)


def test_matches_nanogpt_and_random_mode(small):
    assert ld.check_matches_nanogpt(small, 64)
    assert ld.check_random_mode(small, 64)


def test_epoch_partition_all_world_sizes_and_workers(small):
    assert ld.check_epoch_partition(small, 16, 8)


def test_drop_last_gives_equal_steps(small):
    n = (4001 - 1) // 16  # 250 windows; W * B = 24 -> 240 used, 10 batches per rank
    lens = [len(ld.TokenLoader(small, 8, 16, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert lens == [n // 24] * 3


def test_resume_mid_epoch(small):
    assert ld.check_resume(small, 16, 8)


def test_next_epoch_is_a_new_permutation(small):
    loader = ld.TokenLoader(small, 8, 16, seed=1)
    first = torch.cat([x for x, _ in loader])
    second = torch.cat([x for x, _ in loader])
    assert loader.epoch == 2 and first.shape == second.shape and not torch.equal(first, second)


def test_determinism_across_processes(small):
    assert ld.check_two_processes(small, 16, 4)


def test_bad_arguments(small):
    with pytest.raises(ValueError, match="rank"):
        ld.TokenLoader(small, 8, 16, rank=2, world_size=2)
    with pytest.raises(ValueError, match="mode"):
        ld.TokenLoader(small, 8, 16, mode="shuffle")
    with pytest.raises(ValueError, match="a window needs"):
        ld.TokenLoader(small, 8, 5000)
    with pytest.raises(ValueError, match="batch_size"):
        ld.TokenLoader(small, 0, 16)
    state = ld.TokenLoader(small, 8, 16, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ld.TokenLoader(small, 8, 16, seed=2).load_state_dict(state)


def test_device_path_logic_on_this_machine(small):
    """On a GPU machine this is the CUDA path (pinned memory, side stream, prefetch); here the CPU one."""
    assert ld.check_device_path(small, 16, 8, harness.pick_device())


class _ZerosLoader(ld.TokenLoader):
    """Yields batches of the right shapes but all zeros: the window checks must catch it."""

    def __iter__(self):
        for x, y in super().__iter__():
            yield torch.zeros_like(x), torch.zeros_like(y)


def test_window_checks_look_at_the_content(small):
    with pytest.raises(AssertionError, match="content"):
        ld._windows(_ZerosLoader(small, 8, 16, seed=5))
    with pytest.raises(AssertionError, match="content"):
        ld._windows(_ZerosLoader(small, 8, 16, seed=5, rank=1, world_size=2, num_workers=2))
