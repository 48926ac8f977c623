"""The streaming neuron job against independent recomputations of every definition (numpy and
plain Python, nothing from ``scan.py``): one shard vs several merged in order, histogram and
spectrum sample on stories260K, hard synthetic data fed to the accumulator directly, and the
torch backend against the numba one."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from precompute.jobs.neurons import JOB, NeuronsAccumulator, NeuronsConfig
from precompute.sequences import Batch, batches
from precompute.sweep import Captured, SeqsLookup, sweep_shard

MASK64 = (1 << 64) - 1
S = 10


# ------------------------------------------------------------------ independent definitions


def splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def sample_hash(key: int, seed: int = 0) -> int:
    return splitmix64(key ^ splitmix64(seed))


def ref_hist(x: np.ndarray, n_bins: int = 50):
    """(e, kmin, g, edges, bar of every value, counts) by the definition."""
    lo, hi = float(x.min()), float(x.max())
    e = -40
    while True:
        kl, kh = math.floor(lo / 2.0**e), math.floor(hi / 2.0**e)
        if kh - kl < 256 and kl >= -(2**50) and kl + 255 <= 2**50:
            break
        e += 1
    k = np.floor(x.astype(np.float64) / 2.0**e).astype(np.int64)
    span = kh - kl + 1
    g = max(1, math.floor(span / n_bins + 0.5))
    nd = -(-span // g)
    edges = (kl + np.arange(nd + 1) * g) * 2.0**e
    bars = (k - kl) // g
    return e, kl, g, edges, bars, np.bincount(bars, minlength=nd)


def ref_spectrum(x, bars, hashes, seq, pos):
    """Per bar the S smallest hashes, ordered by activation then hash: [(bar, seq, pos, act)]."""
    out = []
    for b in np.unique(bars):
        m = np.nonzero(bars == b)[0]
        m = sorted(m, key=lambda j: hashes[j])[:S]
        m = sorted(m, key=lambda j: (x[j], hashes[j]))
        out += [(int(b), int(seq[j]), int(pos[j]), float(x[j])) for j in m]
    return out


def ref_top(x, key, seq, pos, k, before):
    order = sorted(range(len(x)), key=lambda j: (-float(x[j]), int(key[j])))
    kept = []
    for j in order:
        if any(seq[o] == seq[j] and abs(int(pos[o]) - int(pos[j])) <= before for o in kept):
            continue
        kept.append(j)
        if len(kept) == k:
            break
    return kept


def ref_top_tokens(x, toks, n_top, min_count, among=None):
    """Each activation rounded to a multiple of 2^-24 (half to even), summed as integers."""
    ids = np.unique(toks) if among is None else np.array(sorted(among))
    units = [int(u) for u in np.rint(x.astype(np.float64) * 2.0**24)]
    means = {}
    for t in ids:
        m = np.nonzero(toks == t)[0]
        if len(m) >= min_count and len(m):
            means[int(t)] = float(sum(units[j] for j in m)) / 2.0**24 / len(m)
    return sorted(means, key=lambda t: (-means[t], t))[:n_top], means


def check_layer_against_reference(L, x, key, seq, pos, toks, acts_of, cfg, hashes, among=None):
    """Every stat of one layer's result against the definitions; ``x`` [N, d] scored activations
    with their key/seq/pos/token, ``acts_of(seq)`` a sequence's [len, d] activations."""
    for n in range(x.shape[1]):
        v = x[:, n]
        e, k0, g, edges, bars, counts = ref_hist(v, cfg.n_bins)
        assert (L.hist_exp[n], L.hist_k0[n], L.hist_group[n]) == (e, k0, g), f"neuron {n}"
        np.testing.assert_array_equal(L.hist_edges[n], edges)
        np.testing.assert_array_equal(L.hist[n], counts)
        rec = L.spectrum[n]
        got = [(int(r["bin"]), int(r["seq"]), int(r["pos"]), float(r["act"])) for r in rec]
        assert got == ref_spectrum(v, bars, hashes, seq, pos), f"neuron {n}: spectrum"
        hs = np.array([h ^ (1 << 63) for h in hashes], np.uint64).view(np.int64)  # signed order
        assert [int(r["hash"]) for r in rec] == [int(hs[np.nonzero((seq == r["seq"]) & (pos == r["pos"]))[0][0]])
                                                 for r in rec], f"neuron {n}: sample hashes"
        check_bands(L, n, v, bars, edges, counts, hs, seq, pos)
        # top examples, and bottom ones: the same rule on the negated activations
        for table, vals in ((L.examples, v), (L.bottom, -v)):
            kept = ref_top(vals, key, seq, pos, cfg.top_k, cfg.ctx_before)
            ex = table[n]
            assert [(e_.seq, e_.pos, e_.act) for e_ in ex] == [(int(seq[j]), int(pos[j]), float(v[j])) for j in kept]
            for e_ in ex:
                a = acts_of(e_.seq)
                assert e_.win_start == max(0, e_.pos - cfg.ctx_before)
                np.testing.assert_array_equal(e_.acts, a[e_.win_start : min(len(a), e_.pos + cfg.ctx_after + 1), n])
        assert L.bos[n] == acts_of(0)[0, n], f"neuron {n}: BOS of the first sequence"
        v64 = v.astype(np.float64)
        np.testing.assert_allclose(L.mean[n], v64.mean(), rtol=1e-12, atol=1e-12 * max(1.0, np.abs(v64).max()))
        np.testing.assert_allclose(L.std[n], v64.std(), rtol=1e-9, atol=1e-12 * max(1.0, np.abs(v64).max()))
        assert (L.min[n], L.max[n]) == (v.min(), v.max())
        assert L.frac_pos[n] == np.float32((v > 0).sum() / len(v))
        best, means = ref_top_tokens(v, toks, cfg.n_top_tokens, cfg.min_token_count, among)
        got_t = [int(t) for t in L.top_tokens[n] if t >= 0]
        assert got_t == best, f"neuron {n}: top tokens"
        assert list(L.top_token_means[n][: len(best)]) == [means[t] for t in best], f"neuron {n}: top token means"


def check_bands(L, n, v, bars, edges, counts, hs, seq, pos):
    """``quantile_bands`` from the stored samples against the definition over all tokens: per
    band, the PER_BAND tokens with the smallest hashes among every token of the band's bars."""
    from collections import namedtuple

    from precompute.jobs.neurons.tables import N_BANDS, PER_BAND, quantile_bands

    Smp = namedtuple("Smp", "seq pos act")
    rec = L.spectrum[n]
    got = quantile_bands(edges, counts, rec["bin"], rec["hash"], [Smp(int(r["seq"]), int(r["pos"]), float(r["act"]))
                                                                 for r in rec], float(v.max()))
    vmax = float(v.max())
    want = {}
    for b in range(len(counts)):
        if vmax > 0 and edges[b + 1] > 0 and counts[b] > 0:
            want.setdefault(min(N_BANDS - 1, int(N_BANDS * max(edges[b], 0.0) / vmax)), []).append(b)
    assert len(got) == len(want), f"neuron {n}: bands"
    for band, g in zip(sorted(want, reverse=True), got):
        members = np.nonzero(np.isin(bars, want[band]))[0]
        assert g.count == len(members) and (g.lo, g.hi) == (edges[want[band][0]], edges[want[band][-1] + 1])
        pick = members[np.argsort(hs[members], kind="stable")][:PER_BAND]
        assert sorted((s.seq, s.pos) for s in g.samples) == sorted((int(seq[j]), int(pos[j])) for j in pick)
        assert [s.act for s in g.samples] == sorted((float(v[j]) for j in pick), reverse=True)


def assert_same(r1, r2, exact_floats: bool = False):
    """Two results of the same job: identical except the moments (float sums, 1e-12). The
    per-token means are integer sums, so they are identical too."""
    assert r1.n_scored == r2.n_scored and r1.top_tokens_among == r2.top_tokens_among
    for a, b in zip(r1.layers, r2.layers, strict=True):
        for name in ("max", "min", "frac_pos", "hist_exp", "hist_k0", "hist_group", "top_tokens", "top_token_counts",
                     "top_token_means", "logit_top", "logit_bottom", "logit_top_seen", "logit_bottom_seen", "bos"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        for name in ("mean", "std"):
            if exact_floats:
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
            else:
                np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-12, err_msg=name)
        for x, y in zip(a.hist + a.hist_edges + a.spectrum, b.hist + b.hist_edges + b.spectrum, strict=True):
            np.testing.assert_array_equal(x, y)
        for ta, tb in ((a.examples, b.examples), (a.bottom, b.bottom)):
            for name in ("offsets", "seq", "pos", "act", "win_start", "win_len"):
                np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name), err_msg=name)
            for e in range(len(ta.act)):
                w = ta.win_len[e]
                np.testing.assert_array_equal(ta.win[e, :w], tb.win[e, :w])


# ------------------------------------------------------------------ stories260K


def shard(seqs, a: int, b: int, index: int):
    keys = seqs.keys()
    return replace(seqs, ids=seqs.ids[a:b], story_ids=seqs.story_ids[a:b], offsets=seqs.offsets[a:b],
                   first_seq=seqs.first_seq + a, first_key=int(keys[a]), index=index)


def sweep(lm, seqs, parts, cfg, batch_size):
    """Sweep the shards ``parts`` (fresh accumulators, merged in order) as the driver does."""
    cfg = JOB.prepare(lm, cfg, parts[0])
    total = None
    for p in parts:
        acc = sweep_shard(lm, p, [JOB.accumulator(lm, cfg)], batch_size)[0]
        if total is None:
            total = acc
        else:
            total.merge(acc)
    return total.finish(lm, SeqsLookup(seqs))


def batched_acts(lm, seqs, layer: int, batch_size: int) -> list[np.ndarray]:
    """A plain forward pre-hook on the MLP's down projection, the job's own batches: every
    sequence's [len, d_mlp] activations."""
    out: list = [None] * len(seqs.ids)
    seen = {}
    h = lm.model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            for b in batches(seqs, batch_size):
                lm.model(input_ids=b.ids)
                for r, (s, n) in enumerate(zip(b.seq_idx, b.lengths)):
                    out[s - seqs.first_seq] = seen["x"][r, :n].numpy().copy()
    finally:
        h.remove()
    return out


def flat_tokens(seqs, acts):
    first = seqs.first_scored()
    keys = seqs.keys()
    seq = np.concatenate([np.full(len(a) - first, s) for s, a in enumerate(acts)])
    pos = np.concatenate([np.arange(first, len(a)) for a in acts])
    key = keys[seq] + pos
    toks = np.concatenate([ids[first:] for ids in seqs.ids]).astype(np.int64)
    x = np.concatenate([a[first:] for a in acts])
    return x, key, seq, pos, toks


@pytest.fixture(scope="module")
def cfg():
    return NeuronsConfig(top_k=6, layers=(0, 3), batch_size=8)


@pytest.fixture(scope="module")
def one_shard(lm260k, seqs260k, cfg):
    return sweep(lm260k, seqs260k, [seqs260k], cfg, cfg.batch_size)


def test_one_shard_equals_three(lm260k, seqs260k, cfg):
    """One sequence per batch, so the model computes the same activations however the corpus is
    cut (batched matmuls of other shapes round differently); the order of batches still differs."""
    n = len(seqs260k.ids)
    parts = [shard(seqs260k, 0, n // 4, 0), shard(seqs260k, n // 4, n // 2 + 3, 1), shard(seqs260k, n // 2 + 3, n, 2)]
    assert_same(sweep(lm260k, seqs260k, [seqs260k], cfg, 1), sweep(lm260k, seqs260k, parts, cfg, 1))


@pytest.mark.parametrize("layer", [0, 3])
def test_every_stat_against_plain_hooks(lm260k, seqs260k, cfg, one_shard, layer):
    acts = batched_acts(lm260k, seqs260k, layer, cfg.batch_size)
    x, key, seq, pos, toks = flat_tokens(seqs260k, acts)
    hashes = [sample_hash(int(k)) for k in key]
    L = next(L for L in one_shard.layers if L.layer == layer)
    assert one_shard.n_scored == len(x)
    check_layer_against_reference(L, x[:, :60], key, seq, pos, toks, lambda s: acts[s], cfg, hashes)


def test_sample_contexts(seqs260k, one_shard):
    L = one_shard.layers[0]
    for rec in np.concatenate(L.spectrum[:20]):
        ids = seqs260k.ids[rec["seq"]]
        p = int(rec["pos"])
        st = max(0, p - 12)
        want = ids[st : min(len(ids), p + 4)]
        assert list(rec["ctx"][: rec["n_ctx"]]) == list(want) and rec["ctx"][rec["at"]] == ids[p]
        assert (rec["ctx"][rec["n_ctx"] :] == -1).all()


def test_tracked_tokens_when_sums_exceed_the_budget(lm260k, seqs260k):
    cfg = NeuronsConfig(top_k=4, batch_size=16, token_sums_mb=1)  # 512 tokens x 172 x 5 layers x 8 B > 1 MB
    n = len(seqs260k.ids)
    parts = [shard(seqs260k, 0, n // 3, 0), shard(seqs260k, n // 3, n, 1)]
    res = sweep(lm260k, seqs260k, parts, cfg, 16)
    m = 2**20 // (172 * 5 * 8)
    assert res.top_tokens_among == m and JOB.summary(res)["top_tokens_among"] == m
    first = np.concatenate([ids[1:] for ids in parts[0].ids])
    counts = np.bincount(first, minlength=512)
    among = sorted(range(512), key=lambda t: (-counts[t], t))[:m]
    acts = batched_acts(lm260k, seqs260k, 1, 16)
    x, key, seq, pos, toks = flat_tokens(seqs260k, acts)
    L = res.layers[1]
    for nrn in (0, 50, 171):
        best, _ = ref_top_tokens(x[:, nrn], toks, cfg.n_top_tokens, cfg.min_token_count, among)
        assert [int(t) for t in L.top_tokens[nrn] if t >= 0] == best


def test_torch_backend_equals_numba(lm260k, seqs260k, cfg, one_shard):
    res = sweep(lm260k, seqs260k, [seqs260k], replace(cfg, backend="torch"), cfg.batch_size)
    assert_same(one_shard, res)


# ------------------------------------------------------------------ hard synthetic data


class FakeLM:
    """What the accumulator reads from a model."""

    def __init__(self, d: int, vocab: int):
        self.d_mlp, self.vocab_size, self.n_layers, self.device = d, vocab, 1, "cpu"

    def check_layer(self, layer):
        return layer

    def neuron_logit_effects(self, layer):
        return torch.arange(self.d_mlp * self.vocab_size, dtype=torch.float32).reshape(self.d_mlp, self.vocab_size) % 7


class Lookup:
    def __init__(self, ids):
        self.ids = ids

    def tokens(self, s):
        return self.ids[s]


def hard_data(seed: int = 0, n_seq: int = 40, d: int = 8):
    """Sequences (BOS first) with activations made to be hard, in batches of 4 in shuffled order."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 40, n_seq)
    ids = [np.concatenate([[1], rng.integers(2, 30, n - 1)]).astype(np.int64) for n in lens]
    acts = []
    for s, n in enumerate(lens):
        a = np.zeros((n, d), np.float32)
        a[:, 0] = np.maximum(rng.integers(-3, 4, n), 0)  # integer values: ties everywhere, ReLU zeros
        a[:, 1] = 0.5  # constant
        a[:, 2] = 0.0  # dead
        # tiny values first, huge later: the bins widen many times
        a[:, 3] = rng.standard_normal(n) * (1e-6 if s < 10 else 1e4 if s > 30 else 1.0)
        a[:, 4] = -np.abs(rng.standard_normal(n)) - 1.0  # negative only
        a[:, 5] = rng.standard_normal(n)
        a[:, 6] = np.where(rng.random(n) < 0.2, 7.0, rng.integers(0, 7, n))  # many ties at the top
        a[:, 7] = np.where(rng.random(n) < 0.05, -3e-12, 2e-12)  # tiny range near zero
        a[0] = 100.0  # BOS: never scored, shown in windows
        acts.append(a)
    order = rng.permutation(n_seq)
    keys = np.concatenate([[0], np.cumsum(lens)[:-1]])
    plan = []
    for i in range(0, n_seq, 4):
        rows = order[i : i + 4]
        T = max(lens[r] for r in rows)
        ids_b = np.zeros((len(rows), T), np.int64)
        A = np.full((len(rows), T, d), np.nan, np.float32)  # padding is never read
        for j, r in enumerate(rows):
            ids_b[j, : lens[r]] = ids[r]
            A[j, : lens[r]] = acts[r]
        batch = Batch(seq_idx=[int(r) for r in rows], ids=torch.from_numpy(ids_b),
                      lengths=[int(lens[r]) for r in rows], keys=[int(keys[r]) for r in rows], first=1)
        plan.append((batch, Captured(mlp={0: torch.from_numpy(A)})))
    return ids, acts, keys, plan


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_hard_data_against_reference(backend):
    ids, acts, keys, plan = hard_data()
    lm = FakeLM(8, 30)
    cfg = NeuronsConfig(top_k=5, ctx_before=3, ctx_after=2, min_token_count=2, backend=backend)
    acc = NeuronsAccumulator(lm, cfg)
    for b, cap in plan:
        acc.update(b, cap)
    res = acc.finish(lm, Lookup(ids))
    seq = np.concatenate([np.full(len(a) - 1, s) for s, a in enumerate(acts)])
    pos = np.concatenate([np.arange(1, len(a)) for a in acts])
    key = keys[seq] + pos
    x = np.concatenate([a[1:] for a in acts])
    toks = np.concatenate([i[1:] for i in ids])
    check_layer_against_reference(res.layers[0], x, key, seq, pos, toks, lambda s: acts[s], cfg,
                                  [sample_hash(int(k)) for k in key])
    L = res.layers[0]
    assert L.hist_exp[3] > L.hist_exp[5] > L.hist_exp[7] == L.hist_exp[2] == -40
    assert len(L.hist[2]) == 1 and len(L.hist[7]) > 1

    # any split into accumulators merged in order gives the same result
    for cut in (1, 5, 9):
        parts = [NeuronsAccumulator(lm, cfg) for _ in range(2)]
        for j, (b, cap) in enumerate(plan):
            parts[j >= cut].update(b, cap)
        parts[0].merge(parts[1])
        assert_same(res, parts[0].finish(lm, Lookup(ids)))


def test_backends_agree_on_hard_data():
    ids, acts, keys, plan = hard_data(seed=3, n_seq=60)
    lm = FakeLM(8, 30)
    out = []
    for backend in ("numba", "torch"):
        acc = NeuronsAccumulator(lm, NeuronsConfig(top_k=7, ctx_before=2, backend=backend))
        for b, cap in plan:
            acc.update(b, cap)
        out.append(acc.finish(lm, Lookup(ids)))
    assert_same(*out)


def test_non_finite_activation_is_an_error():
    ids, acts, keys, plan = hard_data(n_seq=4)
    b, cap = plan[0]
    cap.mlp[0][0, 1, 5] = float("inf")
    for backend in ("numba", "torch"):
        acc = NeuronsAccumulator(FakeLM(8, 30), NeuronsConfig(backend=backend))
        with pytest.raises(ValueError, match="non-finite"):
            acc.update(b, cap)


def test_token_sums_that_could_overflow_are_not_shown():
    """A neuron whose (token, neuron) sums could pass int64's range (count x max |activation| >=
    2^38, half int64's range in units of 2^-24) shows no top tokens rather than wrong ones; the other neurons are unaffected."""
    ids, acts, keys, plan = hard_data(n_seq=6)
    lm = FakeLM(8, 30)
    for backend in ("numba", "torch"):
        acc = NeuronsAccumulator(lm, NeuronsConfig(top_k=3, ctx_before=1, min_token_count=1, backend=backend))
        ref = NeuronsAccumulator(lm, NeuronsConfig(top_k=3, ctx_before=1, min_token_count=1, backend=backend))
        for b, cap in plan:
            ref.update(b, cap)
            big = Captured(mlp={0: cap.mlp[0].clone()})
            big.mlp[0][:, :, 4] = 1e12
            acc.update(b, big)
        L, R = acc.finish(lm, Lookup(ids)).layers[0], ref.finish(lm, Lookup(ids)).layers[0]
        assert (L.top_tokens[4] == -1).all() and (R.top_tokens[4] >= 0).any()
        for n in (0, 1, 2, 3, 5, 6, 7):
            np.testing.assert_array_equal(L.top_tokens[n], R.top_tokens[n])
            np.testing.assert_array_equal(L.top_token_means[n], R.top_token_means[n])
