r"""Paged KV cache: a block manager with copy-on-write and prefix caching, and a paged decode kernel.

A serving engine cannot know how long each request will run, so reserving a contiguous KV cache of the
maximum length per request wastes most of the memory. PagedAttention (vLLM) stores the cache in
fixed-size blocks ("pages") drawn from one pool, with a page table per sequence, exactly like virtual
memory: waste is at most one partial block per sequence, sequences can share blocks (parallel sampling,
a common prompt prefix) and copy a block only when one of them writes into it. This file builds the
memory manager and the attention kernel that reads through the page tables.

You will learn:
  - a block pool, a free stack and per-sequence page tables; slots and the slot_mapping that writes new
    K/V into them in one kernel per layer;
  - reference counts, fork() and copy-on-write of the shared last block;
  - prefix caching: a full block is named by a hash of (its parent's hash, its tokens), so a new request
    reuses every block of a prompt prefix already computed; unreferenced cached blocks stay until they
    are evicted in least-recently-used order;
  - a Triton decode kernel over a paged cache: one program per (sequence, KV head, split) computes all
    query heads of the GQA group with tl.dot, and split-KV (flash-decoding) with a log-sum-exp merge
    keeps the GPU full when the batch is small and the context long.

Builds on: 06_flash.py (the online softmax, exp2 with log2(e) folded into the scale); 02_attention.py
(GQA); harness.py (checks, timing, results).

Does not handle:
  - more than one query token per sequence in the kernel (prefill and chunked prefill attend through
    the gather reference or 06's varlen kernel; speculative decoding would need a few query rows);
  - sliding windows, ALiBi, soft-capping, fp8 KV; swapping blocks to CPU memory (preemption recomputes);
  - head dims that are not a power of two >= 16 (tl.dot's smallest tile) in the kernel.

References: Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP 2023); Dao et al., "Flash-Decoding for long-context inference" (2023);
reference implementations: vLLM's KVCacheManager / BlockPool and nano-vllm's BlockManager.

Run:
  python 09_paged_kv.py           # checks, then the H200 benchmark; writes results/09_paged_kv.json
  python 09_paged_kv.py --quick   # small shapes; on CPU the kernels run in Triton's interpreter

Shapes: B sequences, H query heads, H_KV key/value heads (G = H // H_KV query heads per KV head),
D head dim, NB blocks in the pool, BS block size (tokens per block), L context length.
"""

import dataclasses
import functools
import hashlib
import itertools
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import harness  # first: sets TRITON_INTERPRET=1 when there is no GPU, before Triton is imported

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))

# %% [markdown]
# ## Config


@dataclass
class BenchConfig:
    n_head: int = 32  # Llama-3-8B attention: 32 query heads ...
    n_kv_head: int = 8  # ... sharing 8 KV heads (G = 4)
    head_dim: int = 128
    block_size: int = 16  # vLLM's default page: small enough that the partial last block wastes little
    batches: tuple = (1, 16, 64, 256)
    contexts: tuple = (512, 2048, 8192, 32768)
    max_tokens: int = 1 << 21  # skip batch x context above 2M tokens: 8.6 GB of K+V, twice (paged + padded)
    mixed: tuple = ((64, 256, 8192), (256, 128, 2048))  # (sequences, shortest, longest), lengths uniform


QUICK = BenchConfig(n_head=4, n_kv_head=2, head_dim=32, batches=(2,), contexts=(80,), mixed=((3, 5, 70),))
MIN_SPLIT_TOKENS = 256  # a split shorter than this spends more on its merge than it saves
MAX_SPLITS = 64
# Decode launch (BLOCK_N tokens per iteration, warps, pipeline stages). The H200 run in
# results/09_paged_kv.json ("launch_sweep": B=1 L=32768, B=64 L=4096, B=256 L=2048) measured this default
# at 58, 97 and 93% of copy; (64, 4, 3) measured 61, 98 and 101% there and is the candidate to adopt
# once the whole benchmark is re-run with it (the committed table was measured with (64, 4, 2)).
DECODE_LAUNCH = (64, 4, 2)
INTERPRET_LAUNCH = (64, 1, 1)  # the interpreter runs programs one after another: few, large tiles
LAUNCH_SWEEP = ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2))


# %% [markdown]
# ## The block manager
#
# The pool is NB blocks of BS token slots. A sequence's page table (`block_table`) lists the physical
# block of each run of BS positions: position p lives in slot `block_table[p // BS] * BS + p % BS`.
# Blocks carry reference counts: a fork shares its parent's blocks (ref 2), and the first sequence to
# write into a shared block gets a private copy (copy-on-write). Only the last block of a sequence is
# ever written, so only it is ever copied.
#
# Prefix caching. A full block's content is the KV of its tokens *given everything before them*, so it
# is named by hash(parent block's hash, its token ids): a chain, like a Merkle list. A new request walks
# its prompt block by block and reuses each block whose name is cached, stopping at the first miss.
# We use SHA-256 (a collision would need ~2^128 blocks) and on a hit also compare the block's tokens
# and its parent's name, so a hash that ignored position or collided for one block would still miss:
# returning another prompt's KV would take two different prefixes with one SHA-256 name. When the last
# sequence using a cached block releases it, the block is not freed but parked in an LRU list: still
# findable, and evicted (oldest first) only when the free stack runs dry. A block is registered only
# once its KV is being written (`cache_blocks`), never at allocation, so no request can hit a block
# whose KV does not exist yet.


class NoFreeBlocksError(RuntimeError):
    """The pool cannot supply the blocks asked for. Nothing was changed: the scheduler catches this,
    preempts a sequence to free blocks, and retries."""


class SequenceStateError(RuntimeError):
    """An operation that makes no sense for the sequence's state: freeing twice, appending to a
    finished sequence, allocating one that already holds blocks."""


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0  # page tables that list this block
    hash: bytes | None = None  # content name once full and registered in the prefix cache
    token_ids: tuple = ()  # the tokens whose KV it holds, compared on every cache hit
    parent: bytes = b""  # the name of the block before it (b"" for the first), compared too


class Sequence:
    """The block manager's view of a sequence: its tokens and its page table. 10_batching extends it
    with scheduling state (status, computed tokens, timings)."""

    _next_id = itertools.count()

    def __init__(self, token_ids):
        if len(token_ids) == 0:
            raise ValueError("Sequence needs at least one token id")
        self.seq_id = next(Sequence._next_id)
        self.token_ids = list(token_ids)
        self.block_table: list[int] = []
        self.num_cached_tokens = 0  # leading tokens whose KV came from the prefix cache
        self.finished = False

    def __len__(self):
        return len(self.token_ids)

    def append_token(self, token_id: int) -> None:
        if self.finished:
            raise SequenceStateError(f"sequence {self.seq_id} is finished; cannot append token {token_id}")
        self.token_ids.append(token_id)


def block_hash(parent: bytes, token_ids: tuple) -> bytes:
    """SHA-256 of the parent block's hash and this block's token ids (int64 little-endian)."""
    h = hashlib.sha256(parent)
    h.update(b"".join(t.to_bytes(8, "little", signed=True) for t in token_ids))
    return h.digest()


class BlockManager:
    """Allocates KV blocks to sequences: free stack, page tables, ref counts, COW and the prefix cache.

    The manager only does bookkeeping; `PagedKVCache` holds the tensors. Copy-on-write copies it decides
    on are queued in `pending_copies` as (src, dst) block pairs; the engine applies them before the
    step's forward (`PagedKVCache.copy_blocks(bm.take_copies())`).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids = list(range(num_blocks - 1, -1, -1))  # a stack; pop() hands out block 0 first
        self.cached: dict[bytes, int] = {}  # content hash -> block id (in use or evictable)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, oldest first
        self.pending_copies: list[tuple[int, int]] = []
        self.live: set[int] = set()  # ids of sequences holding blocks
        self.stats = {"queried_blocks": 0, "hit_blocks": 0, "evictions": 0, "cow_copies": 0}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request can get now: never-used or freed ones, plus cached ones nobody references."""
        return len(self.free_ids) + len(self.evictable)

    def hit_rate(self) -> float:
        return self.stats["hit_blocks"] / max(self.stats["queried_blocks"], 1)

    # -- internal: take and release one block ------------------------------------------------------

    def _take(self) -> int:
        if self.free_ids:
            bid = self.free_ids.pop()
        elif self.evictable:  # evict the least recently released cached block
            bid, _ = self.evictable.popitem(last=False)
            block = self.blocks[bid]
            del self.cached[block.hash]
            block.hash, block.token_ids, block.parent = None, (), b""
            self.stats["evictions"] += 1
        else:  # callers check capacity first; this guards the invariant
            raise NoFreeBlocksError("block pool exhausted")
        self.blocks[bid].ref_count = 1
        return bid

    def _release(self, bid: int) -> None:
        block = self.blocks[bid]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None:
                self.evictable[bid] = None  # keep its KV findable until the space is needed
            else:
                self.free_ids.append(bid)

    def _need(self, n: int, what: str) -> None:
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"{what} needs {n} block(s), {self.num_free_blocks} free")

    # -- the API ----------------------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """New blocks covering the first num_tokens (default all) of seq would take, before cache hits;
        plus one when its last block is shared and about to be written (copy-on-write)."""
        n = len(seq) if num_tokens is None else num_tokens
        grow = max(0, -(-n // self.block_size) - len(seq.block_table))
        last = (n - 1) // self.block_size
        shared_last = last < len(seq.block_table) and self.blocks[seq.block_table[last]].ref_count > 1
        return grow + int(shared_last)

    def can_allocate(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """Give a sequence with no blocks a page table covering its first num_tokens (default: all)
        tokens, reusing prefix-cached blocks; return how many leading tokens' KV is already cached.

        The lookup covers full blocks within the first num_tokens - 1 tokens: at least one token is
        always computed, since the model needs its logits. Raises NoFreeBlocksError with nothing changed.
        """
        if seq.finished:
            raise SequenceStateError(f"sequence {seq.seq_id} is finished; cannot allocate")
        if seq.seq_id in self.live:
            raise SequenceStateError(f"sequence {seq.seq_id} already holds blocks; use append_slot")
        n = len(seq) if num_tokens is None else num_tokens
        if not 1 <= n <= len(seq):
            raise ValueError(f"allocate: num_tokens={n} must be in [1, len(seq)={len(seq)}]")
        bs, hits, h = self.block_size, [], b""
        if self.enable_prefix_caching:
            for i in range((n - 1) // bs):
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                parent, h = h, block_hash(h, tokens)
                bid = self.cached.get(h)
                if bid is None or (self.blocks[bid].parent, self.blocks[bid].token_ids) != (parent, tokens):
                    break  # subtle: what the name stands for is compared too, not just the name
                hits.append(bid)
        fresh = -(-n // bs) - len(hits)
        # hits parked in the LRU count as free blocks but will not be free once reused
        self._need(fresh + sum(self.blocks[b].ref_count == 0 for b in hits), f"allocate({n} tokens)")
        for bid in hits:
            if self.blocks[bid].ref_count == 0:
                del self.evictable[bid]
            self.blocks[bid].ref_count += 1
        self.stats["queried_blocks"] += (n - 1) // bs if self.enable_prefix_caching else 0
        self.stats["hit_blocks"] += len(hits)
        seq.block_table = hits + [self._take() for _ in range(fresh)]
        seq.num_cached_tokens = len(hits) * bs
        self.live.add(seq.seq_id)
        return seq.num_cached_tokens

    def append_slot(self, seq: Sequence) -> int:
        """Make room for the KV of seq's last token (call after appending a token); return its slot.

        Grows the page table when the last block is full; when the block to be written is shared,
        gives seq a private copy (queued in pending_copies). Raises NoFreeBlocksError with nothing
        changed, SequenceStateError for a finished or unallocated sequence.
        """
        if seq.finished:
            raise SequenceStateError(f"sequence {seq.seq_id} is finished; cannot append")
        if seq.seq_id not in self.live:
            raise SequenceStateError(f"sequence {seq.seq_id} holds no blocks; allocate it first")
        self._need(self.blocks_needed(seq), f"append_slot(seq {seq.seq_id})")
        table, pos = seq.block_table, len(seq) - 1
        while len(table) * self.block_size < len(seq):
            table.append(self._take())
        idx = pos // self.block_size
        if self.blocks[table[idx]].ref_count > 1:  # shared (fork): copy on write
            new = self._take()
            self.pending_copies.append((table[idx], new))
            self.blocks[table[idx]].ref_count -= 1  # still > 0: the other owner keeps it
            table[idx] = new
            self.stats["cow_copies"] += 1
        return table[idx] * self.block_size + pos % self.block_size

    def cache_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register in the prefix cache the full blocks among seq's first num_tokens tokens. Call once
        their KV is written (or is written by this step's forward, before any attention reads it)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(num_tokens, len(seq)) // bs
        first = full  # blocks are named in order: walk back to the last named one, then name forward
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
            first -= 1
        h = self.blocks[seq.block_table[first - 1]].hash if first > 0 else b""
        for i in range(first, full):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent, h = h, block_hash(h, tokens)
            if h not in self.cached:  # else an identical block is cached already: keep that one
                block.hash, block.token_ids, block.parent = h, tokens, parent
                self.cached[h] = block.block_id

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Make child a copy of parent that shares all its blocks (parallel sampling, beam search)."""
        if parent.seq_id not in self.live:
            raise SequenceStateError(f"fork: parent {parent.seq_id} holds no blocks")
        if child.seq_id in self.live:
            raise SequenceStateError(f"fork: child {child.seq_id} already holds blocks")
        for bid in parent.block_table:
            self.blocks[bid].ref_count += 1
        child.token_ids = list(parent.token_ids)
        child.block_table = list(parent.block_table)
        child.num_cached_tokens = parent.num_cached_tokens
        self.live.add(child.seq_id)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (finished or preempted). Tail blocks are released first so that, among
        one sequence's cached blocks, the LRU evicts the tail before the widely shared prefix."""
        if seq.seq_id not in self.live:
            raise SequenceStateError(f"free: sequence {seq.seq_id} holds no blocks (freed twice?)")
        for bid in reversed(seq.block_table):
            self._release(bid)
        seq.block_table, seq.num_cached_tokens = [], 0
        self.live.discard(seq.seq_id)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def check_invariants(self, seqs) -> None:
        """Raise AssertionError unless the books balance for the live sequences `seqs`."""
        refs = [0] * self.num_blocks
        for s in seqs:
            for bid in s.block_table:
                refs[bid] += 1
        free, evict = set(self.free_ids), set(self.evictable)
        in_use = {b for b in range(self.num_blocks) if refs[b] > 0}
        if len(free) != len(self.free_ids):
            raise AssertionError("a block is on the free stack twice")
        if free & evict or (free | evict) & in_use or len(free) + len(evict) + len(in_use) != self.num_blocks:
            raise AssertionError("free + evictable + in-use != total, or a block is in two of them")
        for b in self.blocks:
            if b.ref_count != refs[b.block_id]:
                raise AssertionError(f"block {b.block_id}: ref_count {b.ref_count} != {refs[b.block_id]}")
            if b.hash is not None and self.cached.get(b.hash) != b.block_id:
                raise AssertionError(f"block {b.block_id} is named but not in the cache index")
        if any(self.blocks[b].hash is None for b in evict) or len(self.cached) != sum(
            b.hash is not None for b in self.blocks
        ):
            raise AssertionError("evictable blocks must be named; the cache index must match the blocks")
        bs = self.block_size
        for s in seqs:  # a named block holds what its name says, at its position in every holder
            h = b""
            for i, bid in enumerate(s.block_table):
                if (i + 1) * bs > len(s):
                    break  # the partial last block is never named
                tokens = tuple(s.token_ids[i * bs : (i + 1) * bs])
                parent, h = h, block_hash(h, tokens)
                b = self.blocks[bid]
                if b.hash is None:
                    continue
                if b.token_ids != tokens:
                    raise AssertionError(f"block {bid} is named for tokens {b.token_ids}, seq {s.seq_id} "
                                         f"has {tokens} at block {i}")  # fmt: skip
                if (b.parent, b.hash) != (parent, h):
                    raise AssertionError(f"block {bid}: its parent/chain hash differs from seq {s.seq_id}'s "
                                         f"prefix at block {i}")  # fmt: skip


# %% [markdown]
# ## The KV pool and slot_mapping
#
# Layout per layer: K and V each `[NB, H_KV, BS, D]`. Within a block, one head's BS x D tile is
# contiguous (BS * D * 2 bytes = 4 KB at BS 16, D 128), so the decode kernel reads each page of each
# head as one contiguous run, and a whole block (all heads) is one contiguous chunk for copy-on-write.
# (vLLM's FlashAttention backend uses [NB, BS, H_KV, D], which suits a kernel that loads all heads of
# a token at once; ours gives each program one KV head.)
#
# Writes: the forward produces K and V for T new tokens, `[T, H_KV, D]`; `slot_mapping[t]` is token t's
# physical slot (-1 for padding). One Triton launch per layer scatters both K and V.


def slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of positions [start, end): block_table[p // BS] * BS + p % BS.

    Example: block_table [7, 2], BS 4, positions 3..6 -> [31, 8, 9, 10].
    """
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def write_kv_reference(k_cache, v_cache, k, v, slots: torch.Tensor) -> None:
    """k_cache[slot // BS, :, slot % BS] = k[t] for every token with slot >= 0 (two index_put ops)."""
    bs = k_cache.shape[2]
    keep = slots >= 0
    blk, off = slots[keep] // bs, slots[keep] % bs
    k_cache[blk, :, off] = k[keep]  # advanced indices around a slice: the indexed view is [T, H_KV, D]
    v_cache[blk, :, off] = v[keep]


@triton.jit
def _write_kv_kernel(
    K, V, KC, VC, SLOTS,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
    H_KV: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)  # one program per new token: all its heads, K and V
    slot = tl.load(SLOTS + t).to(tl.int64)
    blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    valid = (tl.zeros([H_PAD, D_PAD], tl.int64) + slot) >= 0  # slot -1 marks a padding token: no write
    mask = (h < H_KV) & (d < D) & valid
    k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(KC + blk * stride_kcb + h * stride_kch + off * stride_kcs + d, k, mask=mask)
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(VC + blk * stride_vcb + h * stride_vch + off * stride_vcs + d, v, mask=mask)


def write_kv(k_cache, v_cache, k, v, slots: torch.Tensor) -> None:
    """Scatter new K/V `[T, H_KV, D]` into the pool at `slots` (int tensor [T], -1 = skip): one launch."""
    T, h_kv, d = k.shape
    if v.shape != k.shape or k_cache.shape[1] != h_kv or k_cache.shape[3] != d or slots.shape != (T,):
        raise ValueError(
            f"write_kv: k/v {tuple(k.shape)}/{tuple(v.shape)} must be [T, H_KV, D] matching the cache "
            f"{tuple(k_cache.shape)}, slots {tuple(slots.shape)} must be [T]"
        )
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise TypeError(f"write_kv: k/v dtype {k.dtype} must match the cache dtype {k_cache.dtype}")
    if T == 0:
        return
    k, v = k.contiguous(), v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("write_kv: the cache's last dim must be contiguous")
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        H_KV=h_kv, D=d, H_PAD=triton.next_power_of_2(h_kv), D_PAD=triton.next_power_of_2(d),
        BLOCK_SIZE=k_cache.shape[2],
    )  # fmt: skip


class PagedKVCache:
    """The physical pool: per layer, K and V tensors `[NB, H_KV, BS, D]`."""

    def __init__(self, n_layer, num_blocks, n_kv_head, block_size, head_dim, dtype, device):
        shape = (num_blocks, n_kv_head, block_size, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.block_size = block_size

    def write(self, layer: int, k, v, slots: torch.Tensor) -> None:
        """The Triton scatter on CUDA; elsewhere the index_put reference (the interpreter is slow)."""
        if k.is_cuda:
            write_kv(self.k[layer], self.v[layer], k, v, slots)
        else:
            write_kv_reference(self.k[layer], self.v[layer], k, v, slots)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Apply copy-on-write: block dst becomes a copy of block src, in every layer."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.k[0].device)
        dst = torch.tensor([p[1] for p in pairs], device=self.k[0].device)
        for t in self.k + self.v:
            t[dst] = t[src]

    def gather(self, layer: int, block_table: list[int], n: int):
        """Contiguous K, V `[H_KV, n, D]` of a sequence's first n positions (the reference read)."""
        return (gather_kv(self.k[layer], block_table, n), gather_kv(self.v[layer], block_table, n))

    @staticmethod
    def bytes_per_block(n_layer, n_kv_head, block_size, head_dim, itemsize) -> int:
        return 2 * n_layer * n_kv_head * block_size * head_dim * itemsize  # K and V


def gather_kv(cache: torch.Tensor, block_table, n: int) -> torch.Tensor:
    """Positions 0..n-1 of one sequence as a contiguous `[H_KV, n, D]` tensor."""
    bs = cache.shape[2]
    ids = torch.as_tensor(block_table[: -(-n // bs)], device=cache.device)
    pages = cache[ids]  # (nblocks, H_KV, BS, D)
    return pages.permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])[:, :n]


# %% [markdown]
# ## Reference decode attention
#
# One new query token per sequence attends to its L_b cached positions. The reference gathers each
# sequence's pages into contiguous tensors and calls PyTorch SDPA: obviously right, and slow (a copy of
# the whole context per step).


def paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, sm_scale):
    """q [B, H, D]; caches [NB, H_KV, BS, D]; block_tables [B, max_blocks]; context_lens [B] -> [B, H, D]."""
    B, H, D = q.shape
    G = H // k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        n = int(context_lens[b])
        table = block_tables[b].tolist()
        k = gather_kv(k_cache, table, n).repeat_interleave(G, dim=0)  # (H, n, D): KV head h // G
        v = gather_kv(v_cache, table, n).repeat_interleave(G, dim=0)
        out[b] = F.scaled_dot_product_attention(q[b, :, None], k, v, scale=sm_scale)[:, 0]
    return out


# %% [markdown]
# ## The paged decode kernel
#
# Grid (B, H_KV, S). Program (b, h, s) owns KV head h of sequence b and the s-th slice of its context.
# It loads the G query heads that share KV head h as the rows of one tile, padded to G_PAD >= 16 rows
# (tl.dot's minimum), so every K/V byte is read once per group, not once per query head. It walks its
# slice BLOCK_N tokens at a time: token n's page is block_tables[b, n // BS], its row in that page
# n % BS; the online softmax (06_flash) keeps m (running max), l (running sum) and acc:
#
#     m' = max(m, max_n s_n);  l' = l * 2^(m - m') + sum_n 2^(s_n - m');  acc' = acc * 2^(m - m') + P V
#
# Split-KV (flash-decoding): one sequence x one KV head is only B * H_KV programs, too few to fill 132
# SMs for small batches, so the context is cut into S slices processed in parallel. Each writes its
# normalised partial output o_s and log-sum-exp lse_s = m_s + log2(l_s); a second kernel merges
#
#     o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s
#
# which is exact: it rebuilds the full softmax's normaliser from the per-slice ones.


@triton.jit
def _paged_decode_kernel(
    Q, KC, VC, BT, CTX, O, OPART, LSE,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_btb, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    qk_scale, split_len,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    b, kvh, s = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(CTX + b)
    start = s * split_len
    # the last slice runs to the sequence's own end: a max_context_len below the true one (a launch
    # hint, never read from the device) costs speed, not tokens
    end = tl.where(s == tl.num_programs(2) - 1, ctx, tl.minimum(start + split_len, ctx))
    rows = tl.arange(0, G_PAD)
    hq = kvh * G + rows  # the query heads of this KV head's group; rows >= G are padding
    rmask = rows < G
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + d[None, :], mask=rmask[:, None], other=0.0)
    if DOT_F32:  # fp32 inputs; bf16 in the CPU interpreter, whose bf16 tl.dot is broken
        q = q.to(tl.float32)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)  # noqa: E741
    acc = tl.zeros([G_PAD, D], tl.float32)
    k_base = KC + kvh * stride_kh + d[None, :]
    v_base = VC + kvh * stride_vh + d[None, :]
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        tmask = tok < end
        page = tl.load(BT + b * stride_btb + tok // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        off = (tok % BLOCK_SIZE)[:, None]
        k = tl.load(k_base + page[:, None] * stride_kb + off * stride_ks, mask=tmask[:, None], other=0.0)
        v = tl.load(v_base + page[:, None] * stride_vb + off * stride_vs, mask=tmask[:, None], other=0.0)
        if DOT_F32:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))  # (G_PAD, BLOCK_N), fp32 accumulate
        qk = tl.where(tmask[None, :], qk * qk_scale, float("-inf"))  # log2 units: scale * log2(e)
        m_new = tl.maximum(m, tl.max(qk, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)  # noqa: E741
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    has = l > 0  # an empty slice (start >= ctx) contributes nothing to the merge
    o = acc / tl.where(has, l, 1.0)[:, None]
    if SPLIT:
        lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
        tl.store(LSE + b * stride_lb + hq * stride_lh + s, lse, mask=rmask)
        p_ptr = OPART + b * stride_pb + hq[:, None] * stride_ph + s * stride_ps + d[None, :]
        tl.store(p_ptr, o, mask=rmask[:, None])
    else:
        tl.store(
            O + b * stride_ob + hq[:, None] * stride_oh + d[None, :],
            o.to(O.dtype.element_ty),
            mask=rmask[:, None],
        )


@triton.jit
def _merge_kernel(
    OPART, LSE, O, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    D: tl.constexpr, S_PAD: tl.constexpr,
):  # fmt: skip
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    s = tl.arange(0, S_PAD)
    smask = s < num_splits
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
    mx = tl.max(lse, 0)  # -inf only for an empty sequence (L = 0): every weight 0, output 0
    w = tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx))
    d = tl.arange(0, D)
    p_ptr = OPART + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :]
    o = tl.load(p_ptr, mask=smask[:, None], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def choose_num_splits(batch: int, n_kv_head: int, max_context_len: int, sm_count: int) -> int:
    """Slices per sequence: enough programs for two waves over the SMs (B * H_KV * S >= 2 * SMs), no
    slice shorter than MIN_SPLIT_TOKENS. E.g. 132 SMs: B=1, H_KV=8, L=32k -> 33; B=64, L=8k -> 1.
    This is the count asked for; decode_split rounds it to what runs (33 -> 32 slices of 1024)."""
    want = -(-2 * sm_count // (batch * n_kv_head))
    return max(1, min(want, max_context_len // MIN_SPLIT_TOKENS, MAX_SPLITS))


def decode_split(batch, n_kv_head, max_context_len, device, num_splits=None, block_n=None) -> tuple[int, int]:
    """(slices that run, tokens per slice) of a decode launch: the requested count (default: the
    heuristic's) rounded so that each slice is whole BLOCK_N tiles and none is empty for every sequence."""
    if not isinstance(max_context_len, int) or max_context_len < 1:
        raise ValueError(
            f"paged_attention_decode: max_context_len must be an int >= 1, got {max_context_len!r}"
        )
    if num_splits is None:
        num_splits = choose_num_splits(batch, n_kv_head, max_context_len, _sm_count(torch.device(device)))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(
            f"paged_attention_decode: num_splits must be an int >= 1 or None, got {num_splits!r}"
        )
    if block_n is None:
        block_n = (INTERPRET_LAUNCH if harness.INTERPRET else DECODE_LAUNCH)[0]
    split_len = triton.cdiv(triton.cdiv(max_context_len, num_splits), block_n) * block_n
    return triton.cdiv(max_context_len, split_len), split_len


def _check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"paged_attention_decode: dtype {q.dtype}; accepted: float16, bfloat16, float32")
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"paged_attention_decode: q {tuple(q.shape)} must be [B, H, D], caches {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)} both [NB, H_KV, BS, D]"
        )
    B, H, D = q.shape
    if H % k_cache.shape[1] or k_cache.shape[3] != D or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"paged_attention_decode: H={H} must be a multiple of H_KV={k_cache.shape[1]}, D={D} and dtype "
            f"{q.dtype} must match the cache (D={k_cache.shape[3]}, {k_cache.dtype})"
        )
    if D < 16 or D & (D - 1):
        raise ValueError(f"paged_attention_decode: head dim {D}; accepted: powers of two >= 16")
    if block_tables.ndim != 2 or block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(
            f"paged_attention_decode: block_tables {tuple(block_tables.shape)} must be [B={B}, max_blocks], "
            f"context_lens {tuple(context_lens.shape)} must be [B]"
        )
    if block_tables.dtype not in (torch.int32, torch.int64) or context_lens.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise TypeError("paged_attention_decode: block_tables and context_lens must be int32 or int64")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_attention_decode: the caches' last dim must be contiguous")


def paged_attention_decode(
    q,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    sm_scale=None,
    *,
    max_context_len=None,
    num_splits=None,
    out=None,
    launch=None,
):
    """Attention of one query token per sequence over its paged KV cache.

    q [B, H, D]; k_cache, v_cache [NB, H_KV, BS, D]; block_tables [B, max_blocks] (int32, padded with
    any valid id); context_lens [B] (>= 1 each). Returns [B, H, D] in q's dtype. Pass max_context_len
    (>= 1; it sizes the launch, the kernel still reads every sequence to its own context_lens) to avoid a
    device->host read (needed under CUDA-graph capture); without it context_lens is read and an entry
    < 1 raises ValueError; with it, an empty sequence's output is 0. num_splits overrides the heuristic
    (decode_split gives the count that runs);
    out (optional, [B, H, D]) receives the result; launch = (BLOCK_N, num_warps, num_stages) overrides
    DECODE_LAUNCH (the benchmark's launch sweep uses it).
    """
    _check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens)
    B, H, D = q.shape
    h_kv, bs = k_cache.shape[1], k_cache.shape[2]
    G = H // h_kv
    q = q.contiguous()
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    if max_context_len is None:  # one device->host read for both bounds
        lo, max_context_len = torch.stack(torch.aminmax(context_lens)).tolist()
        if lo < 1:
            raise ValueError(f"paged_attention_decode: context_lens must all be >= 1, found {lo}")
    block_n, num_warps, num_stages = launch or (INTERPRET_LAUNCH if harness.INTERPRET else DECODE_LAUNCH)
    num_splits, split_len = decode_split(B, h_kv, max_context_len, q.device, num_splits, block_n)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"paged_attention_decode: out {tuple(out.shape)} {out.dtype} must be like q")
    split = num_splits > 1
    dot_f32 = q.dtype == torch.float32 or (harness.INTERPRET and q.dtype == torch.bfloat16)
    opart = torch.empty(B, H, num_splits, D, device=q.device, dtype=torch.float32) if split else out
    lse = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32) if split else out
    opart_s = opart.stride()[:3] if split else (0, 0, 0)
    lse_s = lse.stride()[:2] if split else (0, 0)
    _paged_decode_kernel[(B, h_kv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, opart, lse,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1), *opart_s, *lse_s,
        sm_scale * LOG2E, split_len,
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_SIZE=bs, BLOCK_N=block_n, SPLIT=split,
        DOT_F32=dot_f32, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split:
        _merge_kernel[(B, H)](
            opart, lse, out, num_splits, *opart.stride()[:3], *lse.stride()[:2], out.stride(0), out.stride(1),
            D=D, S_PAD=triton.next_power_of_2(num_splits),
        )  # fmt: skip
    return out


# %% [markdown]
# ## Checks
#
# The block manager is checked by random workloads against its invariants (the tests drive the same
# function from hypothesis), by the error cases, and by the KV it hands back: a stand-in "model" whose
# K/V at position p depends on every token up to p (as a transformer's do) lets us compare paged KV,
# after copy-on-write and prefix-cache hits, with the KV recomputed from scratch. The kernel is compared
# with a float64 gather-and-softmax and with SDPA in the input dtype, for mixed lengths.


def random_workload(ops, num_blocks=24, block_size=4, vocab=3) -> BlockManager:
    """Run (op, seq index, n) triples on a fresh manager, checking invariants after each; free all at the
    end. A tiny vocabulary makes shared prefixes (cache hits) common. Returns the manager."""
    bm = BlockManager(num_blocks, block_size)
    live: list[Sequence] = []
    for op, i, n in ops:
        if op == "new":
            seq = Sequence([(i * 7 + j) % vocab for j in range(1 + n)])
            try:
                bm.allocate(seq)
                bm.cache_blocks(seq, len(seq))  # its prefill "writes" every block
                live.append(seq)
            except NoFreeBlocksError:
                pass
        elif live and op == "append":
            seq = live[i % len(live)]
            seq.append_token(n % vocab)
            try:
                bm.append_slot(seq)
                bm.cache_blocks(seq, len(seq))
            except NoFreeBlocksError:
                seq.token_ids.pop()  # the step that would have decoded it is not run
        elif live and op == "fork":
            child = Sequence([0])
            bm.fork(live[i % len(live)], child)
            live.append(child)
        elif live and op == "free":
            bm.free(live.pop(i % len(live)))
        bm.take_copies()
        bm.check_invariants(live)
    for seq in live:
        bm.free(seq)
    bm.check_invariants([])
    if bm.num_free_blocks != bm.num_blocks or bm.live:
        raise AssertionError("blocks still held after every sequence was freed")
    return bm


def check_block_manager(seed: int, steps: int = 300) -> str:
    g = torch.Generator().manual_seed(seed)
    kinds = ("new", "append", "append", "append", "fork", "free")
    ops = [(kinds[int(torch.randint(6, (), generator=g))], *torch.randint(0, 40, (2,), generator=g).tolist())
           for _ in range(steps)]  # fmt: skip
    bm = random_workload(ops)
    return f"{steps} ops, {bm.stats['hit_blocks']} cache hits, {bm.stats['cow_copies']} COW copies"


def check_errors() -> str:
    bm = BlockManager(num_blocks=2, block_size=4)
    a = Sequence(range(8))
    bm.allocate(a)
    before = (list(bm.free_ids), list(a.block_table))
    for fn in (lambda: bm.allocate(Sequence(range(9))), lambda: (a.append_token(1), bm.append_slot(a))):
        try:
            fn()
            raise AssertionError("out of blocks did not raise")
        except NoFreeBlocksError:
            pass
    a.token_ids.pop()
    if (list(bm.free_ids), list(a.block_table)) != before:
        raise AssertionError("a failed allocation changed the manager's state")
    bm.free(a)
    for what, fn in (("double free", lambda: bm.free(a)), ("append to finished", lambda: a.append_token(3))):
        a.finished = what == "append to finished"
        try:
            fn()
            raise AssertionError(f"{what} did not raise")
        except SequenceStateError:
            pass
    return "NoFreeBlocksError leaves state unchanged; double free and append-to-finished raise"


def stand_in_kv(token_ids, n_kv_head, head_dim, dtype, device, seed=1):
    """K, V [T, H_KV, D] where position p depends on tokens 0..p: a cumulative sum of token embeddings."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(64, 2, n_kv_head, head_dim, generator=g)
    x = (
        emb[torch.tensor(token_ids) % 64].cumsum(0)
        / (torch.arange(len(token_ids)) + 1.0)[:, None, None, None]
    )
    return x[:, 0].to(dtype).to(device), x[:, 1].to(dtype).to(device)


def _prefill(bm, cache, seq, dims):
    """Allocate seq, write the stand-in KV of its uncached tokens (all layers), register its blocks."""
    cached = bm.allocate(seq)
    k, v = stand_in_kv(seq.token_ids, *dims)
    slots = torch.tensor(slot_mapping(seq.block_table, cached, len(seq), bm.block_size), device=k.device)
    for layer in range(len(cache.k)):
        cache.write(layer, k[cached:], v[cached:], slots)
    bm.cache_blocks(seq, len(seq))
    return cached


def check_cow(device, dtype=torch.float16) -> str:
    dims = (2, 16, dtype, device)
    bm, cache = BlockManager(16, 4), PagedKVCache(2, 16, 2, 4, 16, dtype, device)
    parent = Sequence(list(range(10)))  # 2.5 blocks: the last one is partial and shared after the fork
    _prefill(bm, cache, parent, dims)
    before = [cache.gather(layer, parent.block_table, len(parent)) for layer in range(2)]
    child = Sequence([0])
    bm.fork(parent, child)
    child.append_token(99)
    slot = bm.append_slot(child)  # writes position 10, inside the shared block: must copy first
    cache.copy_blocks(bm.take_copies())
    k, v = stand_in_kv(child.token_ids, *dims)
    for layer in range(2):
        cache.write(layer, k[-1:], v[-1:], torch.tensor([slot], device=device))
    if child.block_table[-1] == parent.block_table[-1] or bm.stats["cow_copies"] != 1:
        raise AssertionError("the shared last block was not copied on write")
    for layer in range(2):
        after = cache.gather(layer, parent.block_table, len(parent))
        if not all(torch.equal(x, y) for x, y in zip(before[layer], after, strict=True)):
            raise AssertionError("copy-on-write changed the parent's KV")
        kc, vc = cache.gather(layer, child.block_table, len(child))
        if not (torch.equal(kc, k.transpose(0, 1)) and torch.equal(vc, v.transpose(0, 1))):
            raise AssertionError("the child's KV is not its prefix plus its new token")
    return "parent KV unchanged bit for bit; child = shared prefix + own token"


def check_prefix_cache(device, dtype=torch.float16) -> str:
    dims = (2, 16, dtype, device)
    bm, cache = BlockManager(32, 4), PagedKVCache(1, 32, 2, 4, 16, dtype, device)
    system = [5, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # a shared "system prompt" of 2.5 blocks
    first, second = Sequence(system + [7, 7, 7]), Sequence(system + [8, 8])
    shifted = Sequence([0] + system)  # the same tokens at other positions: must not hit
    _prefill(bm, cache, first, dims)
    hits = [_prefill(bm, cache, s, dims) for s in (second, shifted)]
    if hits != [8, 0]:
        raise AssertionError(f"cached tokens {hits}, expected [8, 0]")
    for s in (first, second, shifted):  # what each sequence reads == recomputed from scratch
        k, v = stand_in_kv(s.token_ids, *dims)
        kc, vc = cache.gather(0, s.block_table, len(s))
        if not (torch.equal(kc, k.transpose(0, 1)) and torch.equal(vc, v.transpose(0, 1))):
            raise AssertionError("a prefix-cache hit returned KV different from recomputing it")
    return f"hit rate {bm.hit_rate():.2f}; cached KV == recomputed bit for bit"


def check_lru() -> str:
    bm = BlockManager(num_blocks=5, block_size=2)
    a = Sequence([1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] full, [5] partial
    bm.allocate(a)
    bm.cache_blocks(a, len(a))
    bm.free(a)  # the two full blocks stay cached (evictable), tail first
    if len(bm.evictable) != 2 or bm.num_free_blocks != 5:
        raise AssertionError("freed full blocks should stay cached and count as free")
    other = Sequence([6] * 8)  # 4 blocks: the 3 free ones, then evicts the LRU: a's tail block
    bm.allocate(other)
    bm.free(other)
    again = Sequence([1, 2, 3, 4, 9])
    if bm.stats["evictions"] != 1 or bm.allocate(again) != 2:
        raise AssertionError(f"expected 1 eviction of a's tail and a hit on a's head, got {bm.stats}")
    return "tail evicted first, head block still hit"


def check_write_kv(device, dtype=torch.bfloat16) -> float:
    T, h_kv, D, NB, BS = 13, 3, 32, 8, 4
    k, v = (torch.randn(T, h_kv, D, device=device).to(dtype) for _ in range(2))
    slots = torch.randperm(NB * BS, device=device)[:T]
    slots[5] = -1  # a padding token
    ref = [torch.randn(NB, h_kv, BS, D, device=device).to(dtype) for _ in range(2)]
    fast = [t.clone() for t in ref]
    write_kv_reference(*ref, k, v, slots)
    write_kv(*fast, k, v, slots)
    if not (torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])):
        raise AssertionError("write_kv differs from the index_put reference")
    return 0.0


def random_paged_cache(lens, n_kv_head, block_size, head_dim, dtype, device, spare=3):
    """Caches holding random KV for sequences of `lens`, blocks scattered over the pool in random order."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + spare
    k_cache, v_cache = (torch.randn(num_blocks, n_kv_head, block_size, head_dim, device=device).to(dtype)
                        for _ in range(2))  # fmt: skip
    perm = torch.randperm(num_blocks, device=device)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32, device=device)
    at = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[at : at + n]
        at += n
    return k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32, device=device)


def check_decode(lens, n_head, n_kv_head, block_size, dtype, device, head_dim=64, num_splits=None,
                 max_context_len=None) -> float:  # fmt: skip
    k_cache, v_cache, tables, ctx = random_paged_cache(lens, n_kv_head, block_size, head_dim, dtype, device)
    q = torch.randn(len(lens), n_head, head_dim, device=device).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    paged_attention_decode(q, k_cache, v_cache, tables, ctx, scale, num_splits=num_splits, out=out,
                           max_context_len=max_context_len)  # fmt: skip
    ref64 = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), tables, ctx, scale)
    err = harness.assert_close(out, ref64, dtype, "paged decode vs float64 reference")
    sdpa = paged_attention_reference(q, k_cache, v_cache, tables, ctx, scale)
    harness.assert_close(out, sdpa, dtype, "paged decode vs SDPA in dtype")
    return err


def run_checks(device, quick):
    checks = harness.Checks()
    checks("block manager random workload", check_block_manager, 0)
    checks("errors", check_errors)
    checks("copy-on-write", check_cow, device)
    checks("prefix cache", check_prefix_cache, device)
    checks("prefix cache LRU eviction", check_lru)
    checks("write_kv (slot_mapping) vs index_put", check_write_kv, device)
    cpu = device.type == "cpu"
    # Mixed lengths: 1, lengths off the block size, one much longer than the rest.
    lens = [1, 37, 200, 16, 129] if cpu else [1, 37, 5000, 16, 1029, 3333, 257, 8]
    dtypes = [torch.float16, torch.bfloat16] + ([torch.float32] if not quick else [])
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for bs in (16, 32):
            for G in (1, 4, 8):
                for splits in (None, 3):  # the heuristic's choice (no split on CPU) and 3 asked for
                    full_grid = dtype != torch.float32 if not quick else dtype == torch.float16 and splits
                    if not full_grid and (bs, G) != (16, 4):
                        continue  # every compile costs ~1 s on the GPU, minutes in the interpreter
                    ran = decode_split(len(lens), 2, max(lens), device, splits)[0]  # 3 asked -> 2 on CPU
                    label = f"decode {name} bs={bs} G={G} splits={ran} ({splits or 'auto'}) lens={lens}"
                    checks(label, check_decode, lens, 2 * G, 2, bs, dtype, device, 64, splits)
    checks.finish()


# %% [markdown]
# ## Benchmark
#
# Bytes a decode step must read: the K and V of every context token, sum_b L_b * H_KV * D * 2 * e
# ("useful bytes"; q, the output and the page tables are < 0.1% and ignored). GB/s = useful bytes / time,
# for both contenders (CUDA-graph replay, L2 flushed before each), and % of the device-to-device copy
# measured in this run (eagerly, same flush: a copy captured in a graph runs on the DMA engines).
# The baseline is SDPA over a contiguous cache padded to the longest sequence, the layout a static
# engine preallocates, with the G query heads of a KV head passed as G query rows of [B, H_KV, G, D]
# against [B, H_KV, L_max, D] (GQA without expanding K/V), and a padding mask when the lengths differ.
# On mixed lengths it reads the padding too, which is where paging pays.


def bench_case(lens, cfg, dtype, device, copy_bw):
    B, H, h_kv, D, bs = len(lens), cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.block_size
    G, L = H // h_kv, max(lens)
    k_cache, v_cache, tables, ctx = random_paged_cache(lens, h_kv, bs, D, dtype, device, spare=0)
    q = torch.randn(B, H, D, device=device, dtype=dtype)
    out = torch.empty_like(q)
    paged = lambda: paged_attention_decode(q, k_cache, v_cache, tables, ctx, max_context_len=L, out=out)  # noqa: E731
    # The padded contiguous cache a static engine would hold: [B, H_KV, L_max, D].
    k_pad = torch.zeros(B, h_kv, L, D, device=device, dtype=dtype)
    v_pad = torch.zeros_like(k_pad)
    for b, n in enumerate(lens):
        k_pad[b, :, :n] = gather_kv(k_cache, tables[b].tolist(), n)
        v_pad[b, :, :n] = gather_kv(v_cache, tables[b].tolist(), n)
    qg = q.view(B, h_kv, G, D)  # (B, H_KV, G, D): a group's query heads as query rows
    uniform = min(lens) == L
    mask = None if uniform else (torch.arange(L, device=device) < ctx[:, None])[:, None, None, :]
    sdpa = lambda: F.scaled_dot_product_attention(qg, k_pad, v_pad, attn_mask=mask)  # noqa: E731
    harness.assert_close(paged(), sdpa().view(B, H, D), dtype, "benchmark case vs padded SDPA")
    useful = sum(lens) * h_kv * D * 2 * q.element_size()
    # splits: the slices that run (decode_split), not the heuristic's request
    row = {"B": B, "L": f"{L}" if uniform else f"U[{min(lens)},{L}]", "tokens": sum(lens),
           "splits": decode_split(B, h_kv, L, device)[0]}  # fmt: skip
    for name, fn in (("paged", paged), ("sdpa_padded", sdpa)):
        try:
            ms = harness.bench(fn, device, graph=True)
            row[f"{name}_us"] = ms * 1e3
            row[f"{name}_GBs"] = useful / ms / 1e6
            row[f"{name}_%copy"] = 100 * useful / (ms * 1e-3) / copy_bw
        except Exception as e:  # one failing contender must not hide the rest of the table
            print(f"  {name} B={B} L={L}: {type(e).__name__}: {e}")
    if "paged_us" in row and "sdpa_padded_us" in row:
        row["speedup"] = row["sdpa_padded_us"] / row["paged_us"]
    return row


def benchmark(cfg, dtype, device):
    copy_bw = harness.copy_bandwidth(device)  # eager: a captured copy runs on the DMA engines
    print(f"copy ceiling: {copy_bw / 1e9:.0f} GB/s (device-to-device copy, read + write)")
    cases = [[L] * B for B in cfg.batches for L in cfg.contexts if B * L <= cfg.max_tokens]
    g = torch.Generator().manual_seed(0)
    cases += [torch.randint(lo, hi + 1, (n,), generator=g).tolist() for n, lo, hi in cfg.mixed]
    rows = []
    for lens in cases:
        try:
            rows.append(bench_case(lens, cfg, dtype, device, copy_bw))
        except Exception as e:
            print(f"benchmark case B={len(lens)} L<={max(lens)} failed: {type(e).__name__}: {e}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, copy_bw


def launch_sweep(cfg, dtype, device, copy_bw, cases=((1, 32768), (64, 4096), (256, 2048))):
    """The decode kernel under each launch of LAUNCH_SWEEP on a few uniform shapes: % of copy."""
    rows = []
    for B, L in cases:
        k_cache, v_cache, tables, ctx = random_paged_cache([L] * B, cfg.n_kv_head, cfg.block_size,
                                                           cfg.head_dim, dtype, device, spare=0)  # fmt: skip
        q = torch.randn(B, cfg.n_head, cfg.head_dim, device=device, dtype=dtype)
        useful = B * L * cfg.n_kv_head * cfg.head_dim * 2 * q.element_size()
        row = {"B": B, "L": L}
        for launch in LAUNCH_SWEEP:
            fn = functools.partial(
                paged_attention_decode, q, k_cache, v_cache, tables, ctx, max_context_len=L, launch=launch
            )
            try:
                row["%copy bn,w,s=" + ",".join(map(str, launch))] = 100 * useful / (
                    harness.bench(fn, device, graph=True) * 1e-3) / copy_bw  # fmt: skip
            except Exception as e:
                print(f"  launch {launch} B={B} L={L}: {type(e).__name__}: {e}")
        rows.append(row)
    return rows


def split_sweep(cfg, dtype, device, copy_bw, splits=(1, 2, 4, 8, 16)):
    """The decode kernel with forced split counts against the heuristic's choice: useful-bytes % of copy
    on the long single sequence and the mixed-length batches, where the choice matters most."""
    g = torch.Generator().manual_seed(1)
    cases = [[32768]] + [torch.randint(lo, hi + 1, (n,), generator=g).tolist() for n, lo, hi in cfg.mixed]
    rows = []
    for lens in cases:
        k_cache, v_cache, tables, ctx = random_paged_cache(lens, cfg.n_kv_head, cfg.block_size, cfg.head_dim,
                                                           dtype, device, spare=0)  # fmt: skip
        q = torch.randn(len(lens), cfg.n_head, cfg.head_dim, device=device, dtype=dtype)
        useful = sum(lens) * cfg.n_kv_head * cfg.head_dim * 2 * q.element_size()
        auto = decode_split(len(lens), cfg.n_kv_head, max(lens), device)[0]  # the slices that run
        row = {"B": len(lens), "L_max": max(lens), "auto_splits": auto}
        for n in (None, *splits):
            ran = decode_split(len(lens), cfg.n_kv_head, max(lens), device, n)[0]
            if n is not None and ran != n:
                print(f"  splits {n} B={len(lens)} L_max={max(lens)}: {ran} slices run")
            fn = functools.partial(paged_attention_decode, q, k_cache, v_cache, tables, ctx,
                                   max_context_len=max(lens), num_splits=n)  # fmt: skip
            try:
                ms = harness.bench(fn, device, graph=True)
                row[f"%copy S={n or 'auto'}"] = 100 * useful / (ms * 1e-3) / copy_bw
            except Exception as e:
                print(f"  splits {n} B={len(lens)}: {type(e).__name__}: {e}")
        rows.append(row)
    return rows


def memory_waste(block_sizes=(16, 32), max_lens=(4096, 32768), n=10000, seed=0, median=1024, sigma=1.0):
    """KV slots reserved vs used for n requests of lognormal total length (median tokens, sigma,
    clipped to [16, max_len]): contiguous preallocation to max_len vs pages of BS tokens."""
    g = torch.Generator().manual_seed(seed)
    logn = torch.empty(n).log_normal_(math.log(median), sigma, generator=g)
    rows = []
    for max_len in max_lens:
        lens = logn.clamp(16, max_len).round().long()
        used = int(lens.sum())
        row = {
            "max_len": max_len,
            "mean_len": used / n,
            "contiguous_waste_%": 100 * (1 - used / (n * max_len)),
        }
        for bs in block_sizes:
            reserved = int(((lens + bs - 1) // bs * bs).sum())
            row[f"paged_bs{bs}_waste_%"] = 100 * (1 - used / reserved)
        rows.append(row)
    return rows


def report_targets(rows):
    big = [r for r in rows if r["L"].isdigit() and r["tokens"] >= 256 * 1024 and "paged_%copy" in r]
    mixed = [r for r in rows if not r["L"].isdigit() and "speedup" in r]
    if big:
        worst = min(r["paged_%copy"] for r in big)
        verdict = "met" if worst >= 80 else "MISSED"
        print(f"target >= 80% of copy at B x L >= 256k: {worst:.0f}% worst -> {verdict}")
    if mixed:
        worst = min(r["speedup"] for r in mixed)
        verdict = "met" if worst >= 1.3 else "MISSED"
        print(f"target >= 1.3x padded SDPA on mixed lengths: {worst:.2f}x worst -> {verdict}")


# %% [markdown]
# ## Main


def main():
    parser = harness.build_parser("Paged KV cache and paged decode attention: checks and benchmark")
    args, device, dtype = harness.start(parser)
    if dtype not in (torch.float16, torch.bfloat16):
        parser.error(f"--dtype must be bf16 or fp16 for the benchmark, got {args.dtype}")
    t0 = time.perf_counter()
    run_checks(device, args.quick)
    print(f"checks took {time.perf_counter() - t0:.1f} s")
    waste_args = {"n": 10000, "median": 1024, "sigma": 1.0}
    waste = memory_waste(**waste_args)
    print(
        f"KV memory reserved but unused, {waste_args['n']} requests, lognormal lengths "
        f"(median {waste_args['median']}, sigma {waste_args['sigma']}, clipped to [16, max_len]):"
    )
    harness.print_table(waste)
    if args.no_bench:
        return
    cfg = QUICK if args.quick or device.type != "cuda" else BenchConfig()
    t0 = time.perf_counter()
    rows, copy_bw = benchmark(cfg, dtype, device)
    print(f"benchmark took {time.perf_counter() - t0:.1f} s")
    harness.print_table(rows)
    sweep, splits = [], []
    if device.type == "cuda" and not args.quick:
        report_targets(rows)
        sweep = launch_sweep(cfg, dtype, device, copy_bw)
        print(f"launch sweep (default {DECODE_LAUNCH}):")
        harness.print_table(sweep)
        splits = split_sweep(cfg, dtype, device, copy_bw)
        print("split-count sweep (useful bytes, % of copy):")
        harness.print_table(splits)
    note = {} if device.type == "cuda" else {"note": "CPU interpreter: timings are not a benchmark"}
    harness.write_results(
        "09_paged_kv", rows, device, args.out, dtype=str(dtype), copy_GBs=copy_bw / 1e9,
        memory_waste=waste, launch_sweep=sweep, split_sweep=splits, decode_launch=DECODE_LAUNCH,
        config=dataclasses.asdict(cfg), quick=args.quick, **note,
    )  # fmt: skip


if __name__ == "__main__":
    main()
