"""01_bpe: fast trainer == naive trainer, byte-exact parity with tiktoken and HF tokenizers, bad input."""

import json
import random
import time

import harness

import pytest
from conftest import load_build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

bpe = load_build("01_bpe")
Tokenizer = bpe.Tokenizer
HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def text():
    return harness.resolve_data("tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def cl100k_path():
    return harness.resolve_data("cl100k_base.tiktoken")


@pytest.fixture(scope="module")
def ours(cl100k_path):
    return Tokenizer.from_tiktoken(
        cl100k_path, bpe.GPT4_SPLIT_PATTERN, bpe.CL100K_SPECIALS, expected_hash=bpe.CL100K_SHA256
    )


@pytest.fixture(scope="module")
def enc(cl100k_path):
    return bpe.cl100k_tiktoken(cl100k_path)


# %% training


def test_hand_case():
    tok = Tokenizer.train("aaabdaaabac", 256 + 3, pattern=None)
    assert tok.merges == {(97, 97): 256, (256, 97): 257, (257, 98): 258}
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"


@pytest.mark.parametrize("pattern", [bpe.GPT4_SPLIT_PATTERN, bpe.GPT2_SPLIT_PATTERN, None])
@pytest.mark.parametrize("alphabet", ["ab", "ab c\n", "aab  1'\n"])
def test_fast_equals_naive_with_ties(pattern, alphabet):
    rng = random.Random(f"{pattern}{alphabet}")  # a str seed is deterministic across runs
    for _ in range(25):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        vocab = 256 + rng.randint(0, 30)
        fast, naive = Tokenizer.train(text, vocab, pattern), bpe.train_naive(text, vocab, pattern)
        assert fast.merges == naive.merges, repr(text)


def test_fast_equals_naive_shakespeare_with_specials(text):
    part = text[:20_000].replace("\n\n", "<|endoftext|>")  # specials are cut out before training
    fast = Tokenizer.train(part, 300, special_tokens=["<|endoftext|>"])
    naive = bpe.train_naive(part, 300, special_tokens=["<|endoftext|>"])
    assert fast.merges == naive.merges and len(fast.merges) == 300 - 256 - 1
    assert fast.special_tokens == {"<|endoftext|>": 299} and fast.n_vocab == 300
    assert fast.encode("a<|endoftext|>b", allowed_special="all") == [97, 299, 98]


def test_training_stops_when_nothing_is_left_to_merge():
    tok = Tokenizer.train("ab ab", 1000, pattern=None)
    assert tok.merges == bpe.train_naive("ab ab", 1000, pattern=None).merges and len(tok.merges) == 3


# %% tiktoken parity


def test_tiktoken_parity_shakespeare(ours, enc, text):
    assert ours.encode(text) == enc.encode(text)
    assert ours.n_vocab == enc.n_vocab


@pytest.mark.parametrize("name", list(bpe.SAMPLES))
def test_tiktoken_parity_samples(ours, enc, name):
    s = bpe.SAMPLES[name]
    assert ours.encode(s) == enc.encode(s)
    assert ours.decode(ours.encode(s)) == s


def test_tiktoken_special_tokens(ours, enc):
    s = "<|endoftext|>a<|fim_prefix|> b<|endofprompt|>"
    assert ours.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all")
    sub = {"<|endoftext|>"}
    assert ours.encode(s, allowed_special=sub, disallowed_special=()) == enc.encode(
        s, allowed_special=sub, disallowed_special=()
    )
    assert (
        ours.encode(s, disallowed_special=())
        == enc.encode(s, disallowed_special=())
        == ours.encode_ordinary(s)
    )
    with pytest.raises(ValueError, match="fim_prefix"):
        ours.encode(s, allowed_special={"<|endoftext|>"})


@HYPOTHESIS
@given(s=st.text(max_size=80))
def test_tiktoken_parity_hypothesis(ours, enc, s):
    ids = ours.encode(s, allowed_special="all")  # hypothesis finds "<|fim_suffix|>" on its own
    assert ids == enc.encode(s, allowed_special="all")
    assert ours.decode(ids) == s


@HYPOTHESIS
@given(s=st.text(st.characters(blacklist_categories=()), max_size=30))
def test_lone_surrogates_like_tiktoken(ours, enc, s):
    assert ours.encode(s, disallowed_special=()) == enc.encode(s, disallowed_special=())


def test_decode_invalid_utf8_like_tiktoken(ours, enc):
    ids = ours.encode("é🙂")
    partial = [ours.encode_ordinary("é")[0], ours._byte_ids[0xF0]]  # a 4-byte lead byte on its own
    assert ours.decode(partial) == enc.decode(partial)
    assert ours.decode_bytes(ids) == enc.decode_bytes(ids)


def test_long_run_is_not_quadratic(ours, enc):
    s = "a" * 200_000
    t0 = time.perf_counter()
    got = ours.encode(s)
    assert time.perf_counter() - t0 < 5.0
    assert got == enc.encode(s)


def test_heap_merge_equals_scan_merge(ours):
    rng = random.Random(1)
    for _ in range(50):
        data = "".join(rng.choice("ab \n1é") for _ in range(rng.randint(2, 300))).encode("utf-8")
        ids = [ours._byte_ids[b] for b in data]
        assert bpe.bpe_heap(list(ids), ours._ranks) == bpe.bpe_scan(list(ids), ours._ranks)


def test_from_tiktoken_dict_and_naive_encoder(ours, enc, text):
    ranks = {ours.vocab[i]: i for i in ours.vocab if i not in ours.special_tokens.values()}
    again = Tokenizer.from_tiktoken(ranks, bpe.GPT4_SPLIT_PATTERN)
    assert again.merges == ours.merges
    part = text[:5000]
    assert bpe.encode_naive(again, part) == enc.encode_ordinary(part)


# %% Hugging Face tokenizers parity


@pytest.fixture(scope="module")
def hf_texts(text):
    rng = random.Random(2)
    randoms = [bpe.random_unicode(rng, rng.randint(0, 50)) for _ in range(100)]
    return list(bpe.SAMPLES.values()) + ["<|endoftext|>x <|endoftext|>", text[-4000:]] + randoms


@pytest.mark.parametrize("style", ["gpt4", "gpt2", "smol"])
@pytest.mark.parametrize("string_merges", [False, True])
def test_hf_parity(text, hf_texts, tmp_path, style, string_merges):
    from tokenizers import Tokenizer as HFTokenizer

    hf = bpe.hf_train(text[:60_000], 500, style, special_tokens=["<|endoftext|>"])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    if string_merges:  # older files write merges as "a b"; Llama-3 also sets ignore_merges
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
        spec["model"]["ignore_merges"] = True
        path.write_text(json.dumps(spec), encoding="utf-8")
        hf = HFTokenizer.from_file(str(path))
    ours = Tokenizer.from_hf(path)
    for s in hf_texts:
        assert ours.encode(s, allowed_special="all") == hf.encode(s, add_special_tokens=False).ids, repr(s)
        assert ours.decode(hf.encode(s, add_special_tokens=False).ids) == hf.decode(
            hf.encode(s, add_special_tokens=False).ids, skip_special_tokens=False
        )


def test_hf_rejects_what_it_cannot_reproduce(tmp_path, text):
    hf = bpe.hf_train(text[:5000], 300, "gpt2")
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["pre_tokenizer"]["add_prefix_space"] = True
    path.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match="add_prefix_space"):
        Tokenizer.from_hf(path)
    spec["model"]["type"] = "WordPiece"
    path.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match="not BPE"):
        Tokenizer.from_hf(path)


# %% round trips, save/load


def test_round_trip_held_out(text, ours):
    held = text[len(text) * 9 // 10 :]
    tok = Tokenizer.train(text[:30_000], 300)
    assert tok.decode(tok.encode(held)) == held
    assert ours.decode(ours.encode(held)) == held


def test_save_load_round_trip(tmp_path, text):
    tok = Tokenizer.train(text[:20_000], 320, special_tokens=["<|endoftext|>", "<|pad|>"])
    tok.save(tmp_path / "t.bpe")
    back = Tokenizer.load(tmp_path / "t.bpe")
    assert back.merges == tok.merges and back.vocab == tok.vocab
    assert back.special_tokens == tok.special_tokens == {"<|endoftext|>": 318, "<|pad|>": 319}
    assert back.pattern == tok.pattern
    s = "<|pad|>" + text[-2000:] + "<|endoftext|>"
    assert back.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all")


def test_save_load_cl100k_and_hf_shaped(tmp_path, ours, text):
    ours.save(tmp_path / "cl100k.bpe")
    back = Tokenizer.load(tmp_path / "cl100k.bpe")
    assert back.merges == ours.merges and back.special_tokens == ours.special_tokens
    assert back.encode(text[:20_000]) == ours.encode(text[:20_000])


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "not a saved tokenizer"),
        ("hello\n", "not a saved tokenizer"),
        ("bpe-tokenizer v2\n{}\n", "v2"),
        ("bpe-tokenizer v1\nnot json\n", "corrupt"),
        ('bpe-tokenizer v1\n{"n_merges": 3}\n1 2 256\n', "corrupt"),
    ],
)
def test_corrupt_save_files(tmp_path, content, match):
    p = tmp_path / "bad.bpe"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        Tokenizer.load(p)


def test_corrupt_merge_line(tmp_path):
    tok = Tokenizer.train("hello hello world", 260, pattern=None)
    tok.save(tmp_path / "t.bpe")
    lines = (tmp_path / "t.bpe").read_text().splitlines()
    lines[2] = "9999 1 256"  # a merge of an id nobody defined
    (tmp_path / "t.bpe").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="corrupt"):
        Tokenizer.load(tmp_path / "t.bpe")


# %% bad input


def test_bad_input(ours, tmp_path, cl100k_path):
    with pytest.raises(TypeError, match="str"):
        ours.encode(b"bytes")
    with pytest.raises(TypeError, match="str"):
        ours.encode_ordinary(None)
    with pytest.raises(ValueError, match="unknown token id"):
        ours.decode([ours.n_vocab + 10])
    with pytest.raises(ValueError, match="unknown token id"):
        ours.decode_bytes(["x"])
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train("abc", 255)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train("abc", 257, special_tokens=["<a>", "<b>"])
    with pytest.raises(ValueError, match="already the token"):
        Tokenizer.train("aaaa", 258, special_tokens={"<s>": 256})
    with pytest.raises(ValueError, match="share an id"):
        Tokenizer(list(range(256)), [], special_tokens={"<a>": 300, "<b>": 300})
    with pytest.raises(ValueError, match="sha256"):
        Tokenizer.from_tiktoken(cl100k_path, expected_hash="0" * 64)
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"!!notbase64 0\n")
    with pytest.raises(ValueError, match="base64"):
        Tokenizer.from_tiktoken(bad)
    with pytest.raises(ValueError, match="compile"):
        Tokenizer.train("abc", 260, pattern="(unclosed")
