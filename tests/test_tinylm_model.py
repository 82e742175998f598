"""Tiny LM model: the causal mask, cached == uncached logits, and long contexts, for every position encoding."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from backends.tinylm.generate import extrapolation, window_loss
from backends.tinylm.model import KVCache, TinyGPT, alibi_bias, apply_rope, causal_mask, rope_tables
from backends.tinylm.types import POSITIONS, TinyLMConfig

VOCAB = 13


def model_for(pos: str, seed: int = 0, **kw) -> TinyGPT:
    torch.manual_seed(seed)
    shape = {"n_layer": 2, "n_head": 6 if pos == "alibi" else 2, "n_embd": 48, "block_size": 32} | kw
    return TinyGPT(TinyLMConfig(vocab_size=VOCAB, pos=pos, **shape)).eval()


@pytest.mark.parametrize("pos", POSITIONS)
def test_a_later_token_never_changes_an_earlier_positions_logits(pos):
    model = model_for(pos)
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    logits = model(idx)[0]
    for t in (0, 9, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % VOCAB
        out = model(changed)[0]
        assert torch.equal(out[:, :t], logits[:, :t]), f"position < {t} saw token {t}"
        assert not torch.allclose(out[:, t:], logits[:, t:]), "the change must reach its own and later positions"


def test_the_causal_mask_is_lower_triangular_and_aligned_to_the_last_queries():
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4).tril().bool())
    m = causal_mask(2, 5)  # two new queries at absolute positions 3 and 4 over five keys
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)  # the full-sequence path's is_causal is the same mask
    explicit = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(5, 5))
    assert torch.allclose(explicit, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)


def test_alibi_bias_is_minus_slope_times_distance_and_masks_the_future():
    bias = alibi_bias(torch.tensor([0.5, 0.25]), 3, 3)
    assert bias[0].tolist() == [[0.0, float("-inf"), float("-inf")], [-0.5, 0.0, float("-inf")], [-1.0, -0.5, 0.0]]
    assert torch.equal(alibi_bias(torch.tensor([0.5]), 1, 3)[0], torch.tensor([[-1.0, -0.5, 0.0]]))


def test_rope_scores_depend_only_on_the_distance():
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)

    def score(i: int, j: int) -> float:
        ci, si = rope_tables(16, i, 1, "cpu")
        cj, sj = rope_tables(16, j, 1, "cpu")
        return float((apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


@pytest.mark.parametrize("pos", POSITIONS)
def test_cached_logits_equal_uncached_logits(pos):
    model = model_for(pos)
    idx = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model(idx)[0]
    for capacity in (None, 32):  # growing by concatenation, and preallocated buffers filled in place
        cache = KVCache(model.cfg.n_layer, capacity)
        pieces = [model(idx[:, :9], cache=cache)[0]]  # a prompt
        pieces += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(9, 20)]  # one token at a time
        pieces.append(model(idx[:, 20:], cache=cache)[0])  # a chunk after a past: the explicit mask path
        assert cache.length == 30
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    full_cache, kv = KVCache(1, 2), torch.zeros(1, 1, 2, 4)
    full_cache.extend(0, kv, kv)
    with pytest.raises(ValueError, match="holds 2 positions; 3 asked"):
        full_cache.extend(0, kv[:, :, :1], kv[:, :, :1])


@pytest.mark.parametrize("pos", POSITIONS)
def test_generation_with_the_cache_matches_generation_without(pos):
    model = model_for(pos)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    greedy = {c: model.generate(prompt, 20, top_k=1, use_cache=c) for c in (True, False)}  # inside the window
    assert torch.equal(greedy[True], greedy[False])
    long = model.generate(prompt, 45, top_k=5, use_cache=True, generator=torch.Generator().manual_seed(0))
    assert long.shape == (1, 50)  # past the 32-token window: the cache is refilled, nothing breaks


def test_learned_positions_stop_at_the_table_and_computed_ones_go_on():
    with pytest.raises(ValueError, match="learned positions end at 32"):
        model_for("learned")(torch.zeros(1, 33, dtype=torch.long))
    for pos in ("rope", "alibi"):
        assert model_for(pos)(torch.zeros(1, 128, dtype=torch.long))[0].shape == (1, 128, VOCAB)


def test_extrapolation_scores_the_same_tokens_at_each_context():
    data = torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(4))
    points = extrapolation(model_for("alibi"), data, max_tokens=600)
    assert [(p.factor, p.context) for p in points] == [(1, 32), (2, 64), (4, 128)]
    assert {p.tokens for p in points} == {512}  # 4 windows of 128 = 8 of 64 = 16 of 32
    assert all(p.loss > 0 and p.perplexity > 1 for p in points)
    learned = extrapolation(model_for("learned"), data, max_tokens=600)
    assert learned[0].loss is not None and learned[1].loss is None and learned[2].perplexity is None
    loss, n = window_loss(model_for("rope"), data, 32, 600)
    assert n == 18 * 32 and loss == pytest.approx(points[0].loss, rel=0.5)  # same scale; other weights
    with pytest.raises(ValueError, match="too few"):
        extrapolation(model_for("rope"), data[:100], max_tokens=600)
