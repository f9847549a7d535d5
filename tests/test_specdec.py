"""11_specdec.py: the rejection sampler, the loop and its rollback, against hand cases, plain decoding,
exact distributions (chi-square, vLLM's L2 test) and a model that is not the build's GPT."""

import pytest
import torch
from conftest import load_build

sd = load_build("11_specdec")


@pytest.fixture(autouse=True)
def one_thread():
    with sd.one_thread():  # tiny models: per-op overhead dominates, threads only add contention
        yield


# Hand-checkable cases


def test_rejection_sample_hand_cases():
    gen = torch.Generator().manual_seed(0)
    V = 4
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0]] * 3, dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 2, dtype=torch.float64)
    for _ in range(200):
        # draft token 0 has p = 0: rejected every time; the residual max(0, p - q) = [0, 0, .5, 0] -> 2
        assert sd.rejection_sample(p, q, torch.tensor([0, 1]), gen) == [2]
        # draft token 1 has p = q: accepted every time; then token 0 is rejected again
        assert sd.rejection_sample(p, q, torch.tensor([1, 0]), gen) == [1, 2]
    # p == q everywhere: every draft accepted, and the bonus token comes from the last row
    same = torch.softmax(torch.randn(3, V, dtype=torch.float64), -1)
    bonus = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    out = sd.rejection_sample(torch.cat([same[:2], bonus]), same[:2], torch.tensor([2, 1]), gen)
    assert out == [2, 1, 3]
    # point-mass proposal (q=None): accepted with probability p(x); a token with p(x) = 1 always is
    sure = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    assert sd.rejection_sample(sure, None, torch.tensor([1]), gen) == [1, 3]
    # ... and on rejection the drafted token is removed from p: never emitted
    p2 = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0, 0, 0]], dtype=torch.float64)
    assert {sd.rejection_sample(p2, None, torch.tensor([2]), gen)[0] for _ in range(100)} == {0, 1}


def test_rejection_sample_no_drafts_is_plain_sampling():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 0.0, 1.0]])
    assert sd.rejection_sample(p, None, torch.empty(0, dtype=torch.long), gen) == [2]


def test_verify_greedy():
    logits = torch.tensor([[0.0, 9.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 7.0]])  # argmax 1, 0, 2
    assert sd.verify_greedy(logits, torch.tensor([1, 0])) == [1, 0, 2]
    assert sd.verify_greedy(logits, torch.tensor([1, 2])) == [1, 0]
    assert sd.verify_greedy(logits, torch.tensor([0, 0])) == [1]


def test_warp_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    torch.testing.assert_close(sd.warp(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    torch.testing.assert_close(sd.warp(logits, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top_p 0.7: 0.5 < 0.7, 0.5 + 0.3 reaches it -> keep two tokens
    torch.testing.assert_close(sd.warp(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert sd.warp(logits, 0.01).argmax() == 0 and sd.warp(logits, 0.01)[0] > 0.999


def test_warp_keeps_the_tokens_transformers_keeps():
    """Temperature, top-k and top-p against transformers' logits warpers, in HF's order (temperature,
    top-k, top-p): the same kept set on random logit vectors (continuous: no exact ties, which the two
    break differently) and the same renormalised probabilities."""
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(0)
    for i in range(300):
        V = int(torch.randint(2, 60, (1,), generator=gen))
        logits = torch.randn(1, V, generator=gen, dtype=torch.float64) * float(
            torch.rand(1, generator=gen) * 6
        )
        temperature = float(torch.rand(1, generator=gen)) * 2 + 0.05
        top_k = int(torch.randint(0, V + 2, (1,), generator=gen)) if i % 3 else 0
        top_p = float(torch.rand(1, generator=gen)) * 0.98 + 0.01 if i % 4 else 1.0
        hf = transformers.TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            hf = transformers.TopKLogitsWarper(top_k)(None, hf)
        if top_p < 1.0:
            hf = transformers.TopPLogitsWarper(top_p)(None, hf)
        ours = sd.warp(logits[0], temperature, top_k=top_k, top_p=top_p)
        case = f"case {i}: V {V}, T {temperature:.3f}, top_k {top_k}, top_p {top_p:.3f}"
        assert torch.equal(ours > 0, torch.isfinite(hf[0])), case
        torch.testing.assert_close(ours, hf[0].softmax(-1), msg=case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_draws_each_row_from_its_distribution(dtype):
    """The exponential race: one draw per row, distributed as the row, zero-probability tokens never."""
    gen = torch.Generator().manual_seed(3)
    probs = torch.tensor([[0.0, 0.1, 0.6, 0.3, 0.0], [0.25, 0.0, 0.0, 0.0, 0.75]], dtype=dtype)
    draws = sd.sample(probs.expand(20000, 2, 5), gen)  # (20000, 2, 1)
    assert draws.shape == (20000, 2, 1) and draws.dtype == torch.long
    for row in range(2):
        counts = torch.bincount(draws[:, row, 0], minlength=5)
        _, p_value = sd.chi_square(counts, probs[row])
        assert p_value > 1e-3, (row, counts.tolist())
    assert sd.sample(torch.tensor([0.0, 0.0, 1.0], dtype=dtype), gen).tolist() == [2]


def test_chi_square_p_value():
    # counts 60/40 against 50/50: statistic 100/50 * 2 = 4, df 1, p = P(chi2_1 > 4) = 0.0455
    stat, pval = sd.chi_square(torch.tensor([60, 40]), torch.tensor([0.5, 0.5]))
    assert stat == pytest.approx(4.0) and pval == pytest.approx(0.0455, abs=1e-4)
    assert sd.chi_square(torch.tensor([5, 5]), torch.tensor([1.0, 0.0]))[1] == 0.0  # impossible token seen
    counts, probs = torch.tensor([5000, 3000, 1999, 1]), torch.tensor([0.5, 0.3, 0.2, 0.0])
    assert sd.chi_square(counts, probs)[1] == 0.0  # even once, even where small cells would be pooled


def test_acceptance_and_formula():
    beta = [torch.tensor(b) for b in ([1.0, 0.5], [0.0], [1.0, 0.0], [0.9])]  # tried positions per step
    stats = sd.SpecStats(steps=[(2, 2), (2, 0), (2, 1), (1, 0)], beta=beta)
    a = sd.acceptance(stats, 2)  # full steps only: accepted 3, rejected 2 -> alpha 0.6; beta mean 2.5/5
    assert a["alpha"] == pytest.approx(0.6) and a["tok_per_step"] == pytest.approx(2.0)
    assert a["formula"] == pytest.approx(1 + 0.6 + 0.36) and a["alpha_beta"] == pytest.approx(0.5)
    assert sd.expected_tokens(1.0, 4) == 5.0


def test_ngram_proposer():
    prop = sd.NGramProposer("cpu", max_n=3)
    drafts, q = prop.propose(list(b"the cat sat. the c"), 4)
    assert bytes(drafts.tolist()) == b"at s" and q is None
    assert prop.propose(list(b"abc"), 3)[0].numel() == 0  # no earlier occurrence: nothing proposed


# The distribution checks


@pytest.mark.parametrize("point_mass", [False, True])
def test_sampler_chi_square(point_mass):
    sd.check_sampler_chi2(10000, point_mass)


def test_chi_square_rejects_a_biased_sampler():
    """The test has power: resampling from p instead of the residual max(0, p - q) must fail it."""
    gen = torch.Generator().manual_seed(0)
    p, q = sd.random_pq(8, gen)
    n = 10000
    x = torch.multinomial(q, n, replacement=True, generator=gen)
    accept = torch.rand(n, generator=gen, dtype=torch.float64) * q[x] < p[x]
    wrong = torch.where(accept, x, torch.multinomial(p, n, replacement=True, generator=gen))
    assert sd.chi_square(torch.bincount(wrong, minlength=8), p)[1] < sd.SIGNIFICANCE


def test_sampler_l2_convergence():
    sd.check_sampler_l2(100_000)


@pytest.mark.parametrize(("k", "proposer", "top_k"), [(1, "draft", 0), (3, "draft", 3), (2, "ngram", 0)])
def test_two_token_joint_through_the_loop(k, proposer, top_k):
    # every sample's first step must draft K tokens, or the check tests plain sampling
    assert f"first step drafted K={k} in 1500/1500" in sd.check_joint(1500, k, proposer, top_k)


def test_joint_check_catches_a_biased_loop(monkeypatch):
    """Power of the full-loop check: resampling from p (not the residual) after a rejection must fail."""
    exact = sd.rejection_sample

    def biased(target_probs, draft_probs, draft_tokens, generator):
        out = exact(target_probs, draft_probs, draft_tokens, generator)
        m = len(out) - 1
        if m < len(draft_tokens):
            out[-1] = torch.multinomial(target_probs[m], 1, generator=generator).item()
        return out

    monkeypatch.setattr(sd, "rejection_sample", biased)
    with pytest.raises(AssertionError, match="p-value"):
        sd.check_joint(1500, 1)


# The loop: greedy equality, rollback, errors, other models


def test_greedy_equals_plain_decoding():
    target, draft = sd.tiny_models()
    sd.check_greedy(target, draft, [[1, 2, 3, 4, 0], [2], [4, 4, 4, 1, 2, 4, 4]], 24, range(1, 9))


def test_greedy_float32_and_top_k_do_not_matter_to_greedy():
    target, draft = sd.tiny_models(dtype=torch.float32, seed=3)
    ref = sd.generate(target, [1, 2], 20, temperature=0)
    assert sd.speculative_generate(target, draft, [1, 2], 20, k=4, temperature=0, top_k=2) == ref


def test_kv_rollback_matches_fresh_cache():
    target, draft = sd.tiny_models()
    sd.check_rollback(target, draft, [1, 2, 3], 40, 3)
    sd.check_rollback(target, sd.tiny_models(seed=1)[1], [0], 30, 6, temperature=0.7)


def test_cache_truncate_and_forward_errors():
    target, _ = sd.tiny_models()
    cache = target.new_cache(8)
    target(torch.tensor([[1, 2, 3]]), cache, 0)
    cache.truncate(1)
    assert cache.length == 1
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(2)
    with pytest.raises(ValueError, match="start_pos == cache.length"):
        target(torch.tensor([[1]]), cache, 3)
    with pytest.raises(ValueError, match="start_pos \\+ T"):
        target(torch.tensor([[1] * 8]), cache, 1)
    with pytest.raises(ValueError, match="block_size"):
        target.new_cache(65)


def test_bad_arguments_raise():
    target, draft = sd.tiny_models()
    with pytest.raises(ValueError, match="k >= 1"):
        sd.speculative_generate(target, draft, [1], 4, k=0)
    with pytest.raises(ValueError, match="non-empty prompt"):
        sd.speculative_generate(target, draft, [], 4)
    with pytest.raises(ValueError, match="temperature >= 0"):
        sd.speculative_generate(target, draft, [1], 4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        sd.generate(target, [1], 4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sd.generate(target, [1], 0)
    with pytest.raises(ValueError, match="min_n"):
        sd.NGramProposer("cpu", max_n=1, min_n=2)


class TableModel:
    """Not a GPT: logits from a random table indexed by the previous two tokens. Its cache is the token
    list, so a wrong rollback would show up as a wrong context and a wrong distribution."""

    class Cache:
        def __init__(self, max_len):
            self.tokens, self.max_len = [], max_len

        @property
        def length(self):
            return len(self.tokens)

        def truncate(self, n):
            del self.tokens[n:]

    def __init__(self, V, seed):
        self.V, self.device = V, torch.device("cpu")
        self.table = 2 * torch.randn(
            V, V, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )

    def new_cache(self, max_len):
        return self.Cache(max_len)

    def __call__(self, ids, cache, start_pos):
        assert start_pos == cache.length
        out = []
        for t in ids[0].tolist():
            cache.tokens.append(t)
            prev = cache.tokens[-2] if len(cache.tokens) > 1 else 0
            out.append(self.table[prev, t])
        return torch.stack(out)[None]


def test_other_models_plug_in():
    target, draft = TableModel(6, 0), TableModel(6, 1)
    for k in (1, 3, 5):
        ref = sd.generate(target, [1, 2], 30, temperature=0)
        assert sd.speculative_generate(target, draft, [1, 2], 30, k=k, temperature=0) == ref
    # sampled: the first token after the prompt is distributed as the table row
    counts = torch.zeros(6)
    for s in range(1500):
        counts[sd.speculative_generate(target, draft, [1, 2], 2, k=2, seed=s)[0]] += 1
    assert sd.chi_square(counts, torch.softmax(target.table[1, 2], -1))[1] > sd.SIGNIFICANCE


def test_train_and_cache(tmp_path):
    data = torch.randint(0, 256, (5000,))
    cfg = sd.GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=32)
    tc = sd.TrainConfig(steps=3, batch=2, seq_len=16, lr=1e-3, max_seconds=30)
    dev = torch.device("cpu")
    m1, info1 = sd.trained_model("t", cfg, tc, data, dev, tmp_path)
    m2, info2 = sd.trained_model("t", cfg, tc, data, dev, tmp_path)
    assert not info1["cached"] and info2["cached"]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
