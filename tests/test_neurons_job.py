"""The neuron job against an independent recomputation on stories260K (plain hooks on the MLP input)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from precompute.jobs.neurons import NeuronsConfig, run
from precompute.jobs.neurons.tables import neuron_page


def _independent_acts(lm, seqs, layer: int) -> list[np.ndarray]:
    """silu(gate(x)) * up(x) from the MLP's own input, one unpadded sequence at a time."""
    mlp = lm.model.model.layers[layer].mlp
    seen = {}
    h = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    out = []
    try:
        with torch.no_grad():
            for ids in seqs.ids:
                lm.model(input_ids=torch.tensor(ids[None, :], dtype=torch.long))
                x = seen["x"][0]
                out.append((torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).numpy())
    finally:
        h.remove()
    return out


def _greedy_top(acts_per_seq, neuron, k, before, first, lowest=False):
    cands = []
    for s, a in enumerate(acts_per_seq):
        for p in range(first, a.shape[0]):
            cands.append((float(a[p, neuron]), s, p))
    cands.sort(key=lambda c: c[0] if lowest else -c[0])
    kept = []
    for v, s, p in cands:
        if any(ks == s and abs(kp - p) <= before for _, ks, kp in kept):
            continue
        kept.append((v, s, p))
        if len(kept) == k:
            break
    return kept


@pytest.fixture(scope="module")
def result(lm260k, seqs260k):
    return run(lm260k, seqs260k, NeuronsConfig(top_k=8))


@pytest.mark.parametrize("layer,neurons", [(0, [0, 17, 171]), (3, [5, 99]), (4, [42, 150])])
def test_top_examples_match_plain_hooks(lm260k, seqs260k, result, layer, neurons):
    acts = _independent_acts(lm260k, seqs260k, layer)
    L = next(x for x in result.layers if x.layer == layer)
    cfg = result.config
    for n in neurons:
        want = _greedy_top(acts, n, cfg.top_k, cfg.ctx_before, seqs260k.first_scored())
        got = L.examples[n]
        assert [(e.seq, e.pos) for e in got] == [(s, p) for _, s, p in want]
        np.testing.assert_allclose([e.act for e in got], [v for v, _, _ in want], atol=1e-4)
        for e in got:  # every token of the window, BOS included, has its own activation
            ref = acts[e.seq][e.win_start : e.win_start + len(e.acts), n]
            np.testing.assert_allclose(e.acts, ref, atol=1e-4)
            assert e.pos - e.win_start == min(cfg.ctx_before, e.pos)


@pytest.mark.parametrize("layer,neurons", [(2, [5, 33]), (4, [42])])
def test_bottom_examples_and_bos_match_plain_hooks(lm260k, seqs260k, result, layer, neurons):
    """Bottom examples: the lowest activations by a plain sort (same overlap rule); BOS: the hook's
    value at position 0, never in the scored stats."""
    acts = _independent_acts(lm260k, seqs260k, layer)
    L = next(x for x in result.layers if x.layer == layer)
    cfg = result.config
    for n in neurons:
        want = _greedy_top(acts, n, cfg.top_k, cfg.ctx_before, seqs260k.first_scored(), lowest=True)
        got = L.bottom[n]
        assert [(e.seq, e.pos) for e in got] == [(s, p) for _, s, p in want]
        np.testing.assert_allclose([e.act for e in got], [v for v, _, _ in want], atol=1e-4)
        assert got[0].act == L.min[n]
        for e in got:
            np.testing.assert_allclose(e.acts, acts[e.seq][e.win_start : e.win_start + len(e.acts), n], atol=1e-4)
        np.testing.assert_allclose(L.bos[n], acts[0][0, n], atol=1e-4)
    bos_all = np.array([a[0] for a in acts])  # every sequence's BOS: the same token, the same activation
    np.testing.assert_allclose(bos_all, np.broadcast_to(L.bos, bos_all.shape), atol=1e-4)


def test_stats_histogram_and_top_tokens(lm260k, seqs260k, result):
    layer, n = 2, 33
    acts = _independent_acts(lm260k, seqs260k, layer)
    first = seqs260k.first_scored()
    flat = np.concatenate([a[first:, n] for a in acts])
    toks = np.concatenate([ids[first:] for ids in seqs260k.ids])
    L = next(x for x in result.layers if x.layer == layer)
    assert result.n_scored == len(flat) == seqs260k.n_scored
    np.testing.assert_allclose(L.mean[n], flat.mean(), atol=1e-5)
    np.testing.assert_allclose(L.max[n], flat.max(), atol=1e-5)
    np.testing.assert_allclose(L.min[n], flat.min(), atol=1e-5)
    np.testing.assert_allclose(L.frac_pos[n], (flat > 0).mean(), atol=1e-6)
    # histogram: bars of g fine bins of width 2^e from floor(min / 2^e), e the smallest >= -40 for
    # which min..max spans fewer than 256 fine bins, g = round(span / n_bins); every token counted once
    assert all(h.sum() == len(flat) for h in L.hist)
    lo, hi = float(L.min[n]), float(L.max[n])  # the plain-hook min and max (checked above)
    e = -40
    while math.floor(hi / 2.0**e) - math.floor(lo / 2.0**e) >= 256:
        e += 1
    k0 = math.floor(lo / 2.0**e)
    span = math.floor(hi / 2.0**e) - k0 + 1
    g = max(1, math.floor(span / result.config.n_bins + 0.5))
    edges = L.hist_edges[n]
    np.testing.assert_array_equal(edges, (k0 + np.arange(-(-span // g) + 1) * g) * 2.0**e)
    assert 40 <= len(L.hist[n]) <= 60
    ref, _ = np.histogram(flat, bins=edges)
    near_edge = (np.abs(flat[:, None] - edges[None, :]) < 1e-5).any(axis=1)  # plain hooks round differently
    assert np.abs(ref - L.hist[n]).sum() <= 2 * near_edge.sum()
    # top tokens by mean activation (tokens seen >= min_token_count times)
    means = {t: flat[toks == t].mean() for t in np.unique(toks) if (toks == t).sum() >= result.config.min_token_count}
    best = sorted(means, key=lambda t: -means[t])[: result.config.n_top_tokens]
    assert list(L.top_tokens[n][: len(best)]) == best
    # spectrum sample: per bar min(count, samples_per_bin) tokens of that bar, each value the
    # activation at that place, with its context
    rec = L.spectrum[n]
    for s, p, a in rec[["seq", "pos", "act"]][:50]:
        np.testing.assert_allclose(a, acts[s][p, n], atol=1e-5)
        assert p >= first
    assert ((edges[rec["bin"]] <= rec["act"]) & (rec["act"] < edges[rec["bin"] + 1])).all()
    np.testing.assert_array_equal(np.bincount(rec["bin"], minlength=len(L.hist[n])),
                                  np.minimum(L.hist[n], result.config.samples_per_bin))
    for r in rec[:20]:
        assert r["ctx"][r["at"]] == seqs260k.ids[r["seq"]][r["pos"]]


def test_logit_effects(lm260k, seqs260k, result):
    layer, n = 1, 7
    m = lm260k.model
    w_out = m.model.layers[layer].mlp.down_proj.weight[:, n]  # [d_model]
    eff = (w_out * m.model.norm.weight) @ m.lm_head.weight.T
    L = next(x for x in result.layers if x.layer == layer)
    top = torch.topk(eff, 10)
    np.testing.assert_array_equal(L.logit_top[n], top.indices.numpy())
    np.testing.assert_allclose(L.logit_top_values[n], top.values.numpy(), atol=1e-5)
    np.testing.assert_array_equal(L.logit_bottom[n], torch.topk(-eff, 10).indices.numpy())
    # the same among tokens seen in the corpus (scored tokens: every one is also a prediction target)
    seen = np.zeros(eff.shape[0], bool)
    seen[np.unique(np.concatenate([ids[1:] for ids in seqs260k.ids]))] = True
    effs = eff.detach().numpy()
    for got, sign in ((L.logit_top_seen[n], 1), (L.logit_bottom_seen[n], -1)):
        want = sorted(np.nonzero(seen)[0], key=lambda t: -sign * effs[t])[:10]
        assert list(got) == want and seen[got].all()


def test_positions_match_raw_token_ids(lm260k, seqs260k, valid_corpus):
    """Sequence k position p is exactly token p of the story's raw tokenisation (BOS at 0)."""
    from precompute.corpus import read_text_corpus

    stories = read_text_corpus(valid_corpus, max_stories=400).stories
    for k in (0, 1, 5):
        raw = lm260k.tokenizer(stories[seqs260k.story_ids[k]])["input_ids"]  # the tokenizer adds <s>
        assert raw[0] == 1 == seqs260k.ids[k][0]
        off = seqs260k.offsets[k]
        assert list(seqs260k.ids[k][1:]) == raw[1 + off : 1 + off + len(seqs260k.ids[k]) - 1]


def test_stored_page_round_trip(neurons_db, lm260k):
    from precompute.store.db import open_store

    store = open_store(neurons_db, create=False)
    with store.session() as s:
        page = neuron_page(s, "stories260K", 0, 3)
    assert page.run.prepend_bos and page.run.job == "neurons"
    assert sum(page.histogram.counts) == page.run.n_tokens
    ex = page.examples[0]
    assert ex.tokens[ex.max_index].id == ex.tokens[ex.pos - ex.win_start].id
    assert ex.acts[ex.max_index] == pytest.approx(ex.act, abs=1e-5)
    assert max(ex.acts[i] for i, t in enumerate(ex.tokens) if not t.special) <= ex.act + 1e-5
    if ex.win_start == 0:
        assert ex.tokens[0].special and ex.tokens[0].text == "<s>"
    assert [e.act for e in page.examples] == sorted((e.act for e in page.examples), reverse=True)
    assert [e.act for e in page.bottom_examples] == sorted(e.act for e in page.bottom_examples)
    assert page.bottom_examples[0].act == pytest.approx(page.stats.min) and len(page.bottom_examples) == 10
    assert page.bos_act is not None and page.bos_above_max == (page.bos_act > page.stats.max)
    assert all(t.count > 0 for t in page.logit_top_seen + page.logit_bottom_seen)
    assert [b.lo for b in page.bands] == sorted((b.lo for b in page.bands), reverse=True)
    for b in page.bands:
        assert 0 < len(b.samples) <= 5 and all(b.lo <= x.act < b.hi or x.act == page.stats.max for x in b.samples)


def test_top_where_equals_a_stable_full_sort():
    """The seen-token logit lists (partition, then ties re-sorted) equal a plain stable argsort:
    highest first, ties to the smaller token id, with heavy ties (small integers) included."""
    import torch

    from precompute.jobs.neurons.job import _top_where

    rng = np.random.default_rng(0)
    for trial in range(200):
        r, v = int(rng.integers(1, 30)), int(rng.integers(1, 200))
        x = rng.integers(-3, 4, (r, v)).astype(np.float32) if trial % 2 else rng.standard_normal((r, v)).astype(np.float32)
        mask = rng.random(v) < rng.random()
        n = int(rng.integers(1, 25))
        ids, vals = _top_where(torch.tensor(x), torch.tensor(mask), n)
        cols = np.nonzero(mask)[0]
        m = min(n, len(cols))
        order = np.argsort(-x[:, cols], axis=1, kind="stable")[:, :m]
        assert np.array_equal(ids[:, :m], cols[order]) and (ids[:, m:] == -1).all()
        assert np.array_equal(vals[:, :m], np.take_along_axis(x[:, cols], order, 1)) and np.isnan(vals[:, m:]).all()
        # the lowest entries (finish's bottom list, without a negated copy of the matrix): the
        # highest of the negated matrix, ties to the smaller id too, given as the entries themselves
        low_ids, low_vals = _top_where(torch.tensor(x), torch.tensor(mask), n, lowest=True)
        neg_ids, neg_vals = _top_where(torch.tensor(-x), torch.tensor(mask), n)
        assert np.array_equal(low_ids, neg_ids) and np.array_equal(low_vals, -neg_vals, equal_nan=True)
