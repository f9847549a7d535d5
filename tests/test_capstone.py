"""capstone_minivllm.py part 1: logits equal transformers' for every architecture, checkpoints load
(sharded, rope_scaling, GGUF), the GGUF tokenizer and greedy generation equal transformers', and bad
checkpoints fail with errors that name the problem."""

import json

import numpy as np
import pytest
import torch
from conftest import load_build

cap = load_build("capstone_minivllm")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


def hf_config(arch, **over):
    kw = {**TINY, **over}
    if arch == "llama":
        return transformers.LlamaConfig(**kw)
    if arch == "qwen2":
        return transformers.Qwen2Config(**kw)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=24, **kw)
    if arch == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw)
    raise ValueError(arch)


def save_tiny(tmp_path, arch, shard=None, **over):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **over)).eval()
    with torch.no_grad():  # HF initialises norms to ones and biases to zeros: make them visible
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path, max_shard_size=shard) if shard else hf.save_pretrained(tmp_path)
    return hf


CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 32}}),
    "yarn-rope": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 64}}),
    "llama-attention-bias": ("llama", {"attention_bias": True}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qknorm": ("qwen3", {}),
    "mixtral": ("mixtral", {}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case, tmp_path):
    arch, over = CASES[case]
    hf = save_tiny(tmp_path, arch, **over)
    ours, _ = cap.load_hf(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    # fp32 throughout: the only differences are summation orders (SDPA vs eager attention)
    assert cap.harness.rel_err(out, ref) < 1e-5, case


def test_sharded_checkpoint(tmp_path):
    hf = save_tiny(tmp_path, "llama", shard="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    ours, _ = cap.load_hf(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 17))
    with torch.no_grad():
        assert cap.harness.rel_err(ours(ids), hf(ids).logits) < 1e-5


def test_cached_generation_equals_transformers_greedy(tmp_path):
    hf = save_tiny(tmp_path, "qwen3")
    ours, _ = cap.load_hf(tmp_path)
    prompt = [5, 17, 3, 88, 41]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
    assert cap.generate(ours, prompt, 20, stop_ids=[]) == ref


def test_read_safetensors_equals_the_package(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4)}
    save_file(tensors, tmp_path / "x.safetensors")
    got = cap.read_safetensors(tmp_path / "x.safetensors")
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16"])
def test_dequantize_equals_gguf_py(qtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w, t)
    ref = gguf.quants.dequantize(raw, t).reshape(8, 64)
    ours = cap.dequantize(raw, qtype, (8, 64)).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_unpermute_undoes_llama_cpp_permute():
    n_head, D, C = 3, 8, 5
    w = torch.randn(n_head * D, C)
    # llama.cpp's convert_hf_to_gguf permute, written out: each head's rows (2, D/2) -> (D/2, 2)
    permuted = w.reshape(n_head, 2, D // 2, C).transpose(1, 2).reshape(w.shape)
    assert torch.equal(cap.unpermute_qk(permuted, n_head), w)


def test_sampling_filters_and_seed():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator()
    top2 = {int(cap.sample(logits, 1.0, top_k=2, generator=g.manual_seed(i))) for i in range(200)}
    assert top2 == {0, 1}
    # probabilities ~ [.64, .24, .09, .03, .01]: top_p 0.8 keeps the first two (0.64 < 0.8 <= 0.88)
    nucleus = {int(cap.sample(logits, 1.0, top_p=0.8, generator=g.manual_seed(i))) for i in range(200)}
    assert nucleus == {0, 1}
    a = [int(cap.sample(logits, 1.0, generator=g.manual_seed(7))) for _ in range(3)]
    assert len(set(a)) == 1
    assert int(cap.sample(logits, 0.0)) == 0
    with pytest.raises(ValueError, match="top_p"):
        cap.sample(logits, 1.0, top_p=0.0)


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        cap.load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        cap.load_model(tmp_path / "nothing.bin")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        cap.config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="Q4_K is not supported"):
        cap.dequantize(np.zeros(144, np.uint8), "Q4_K", (256,))
    save_tiny(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    misfit = r"mlp.gate_proj.weight: checkpoint shape \(96, 64\) != config shape \(80, 64\)"
    with pytest.raises(ValueError, match=misfit):
        cap.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(KeyError, match="lacks"):
        cap.load_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cap.load_hf(tmp_path)


# %% The embedded SmolLM2-135M-Instruct GGUF against transformers reading the same file


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = cap.default_model_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))  # the Makefile installs it: a missing model is a set-up failure, not a skip
    ours, extras = cap.load_gguf(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return ours, extras, hf_tok, hf


TEXTS = [
    "The capital of France is Paris.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Prices rose 3.75% to $1,234,567.89 in 2024-12-31T23:59:59Z.",
    "Grüße aus München! Ça va? Привет, мир. 日本語のテキスト。 🤖🚀",
    "  leading spaces\t\ttabs\n\n\nnew lines   trailing  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]


def test_gguf_tokenizer_equals_transformers(smollm2):
    _, extras, hf_tok, _ = smollm2
    tok = extras["tokenizer"]
    for text in TEXTS:
        ref = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, allowed_special="all") == ref, text
        assert tok.decode(ref) == hf_tok.decode(ref), text


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def test_gguf_chat_template_and_greedy_generation_equal_transformers(smollm2):
    ours, extras, hf_tok, hf = smollm2
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = cap.render_chat(extras["chat_template"], messages, True, bos_token=extras["bos_token"],
                               eos_token=extras["eos_token"])  # fmt: skip
        assert text == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = extras["tokenizer"].encode(text, allowed_special="all")
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
        ours_ids = cap.generate(ours, ids, 32)
        assert ours_ids == ref[: len(ours_ids)], prompt  # transformers pads past EOS; we stop there


def test_quick_main_answers_a_chat_prompt(tmp_path):
    """What a reader runs first: the embedded model loads on the CPU, passes its checks and answers."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(cap.harness.ROOT / "capstone_minivllm.py"), "--quick", "--out", str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "All results match." in proc.stdout
    reply = proc.stdout.split("assistant:", 1)[1]
    assert "Paris" in reply, reply


def test_chat_template_helpers_match_transformers(tmp_path):
    """Llama-2-style AddedToken dicts for bos/eos, tojson's full signature, strftime_now."""
    save_tiny(tmp_path, "llama")
    template = (
        "{{ bos_token }}{{ messages | tojson(sort_keys=True, separators=(',', ':')) }}"
        "{{ strftime_now('%Y') }}{{ eos_token }}"
    )
    added = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
             "rstrip": False, "single_word": False}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "bos_token": added, "eos_token": "</s>"})
    )
    _, extras = cap.load_hf(tmp_path)
    assert extras["bos_token"] == "<s>"
    messages = [{"role": "user", "content": "hi", "a": 1}]
    text = cap.render_chat(extras["chat_template"], messages, False, bos_token="<s>", eos_token="</s>")
    import datetime

    year = datetime.datetime.now().strftime("%Y")
    assert text == '<s>[{"a":1,"content":"hi","role":"user"}]' + year + "</s>"


def test_gguf_rope_scaling_and_truncated_safetensors(tmp_path):
    meta = {
        "rope.scaling.type": "yarn",
        "rope.scaling.factor": 4.0,
        "rope.scaling.original_context_length": 4096,
    }
    g = lambda k, d=None: meta.get(k, d)  # noqa: E731
    assert cap._gguf_rope_scaling(g) == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
    }
    assert cap._gguf_rope_scaling(lambda k, d=None: d) is None
    with pytest.raises(ValueError, match="rope scaling type 'longrope' is not supported"):
        cap._gguf_rope_scaling(lambda k, d=None: "longrope" if k == "rope.scaling.type" else d)
    from safetensors.torch import save_file

    save_file({"w": torch.randn(300, 5)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-20])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        cap.read_safetensors(tmp_path / "x.safetensors")


def test_filters_keep_the_tokens_transformers_keeps():
    """Temperature, top-k and top-p against transformers' logits warpers on random logits (no ties)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        V = int(torch.randint(2, 200, (), generator=g))
        logits = torch.randn(2, V, generator=g) * float(torch.rand((), generator=g) * 4 + 0.1)
        temp = float(torch.rand((), generator=g)) * 2 + 0.05
        top_k = int(torch.randint(0, V + 2, (), generator=g)) if trial % 3 else 0
        top_p = float(torch.rand((), generator=g)) * 0.99 + 0.01 if trial % 2 else 1.0
        ref = TemperatureLogitsWarper(temp)(None, logits.clone())
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        ours = cap.filter_logits(logits, temp, top_k, top_p)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref)), (trial, V, temp, top_k, top_p)
