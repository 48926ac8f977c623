"""The neuron job's compiled kernels (``precompute/jobs/neurons/scan.py``) piece by piece against
plain Python: the sample hash, the bin-width rule, re-binning, the exact candidate cut with ties,
the per-sequence greedy, the shown bars, sample contexts, and a whole layer update on data with
ties everywhere, rows out of corpus order and more candidates than the buffer holds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from precompute.jobs.neurons import scan

S = 4


def test_splitmix64_and_the_sample_hash():
    assert int(scan.splitmix64(np.array([0], np.uint64))[0]) == 0xE220A8397B1DCDAF  # splitmix64's first output, seed 0
    keys = np.arange(-5, 100_000, dtype=np.int64)
    h = scan.sample_hash(keys, seed=3)
    assert len(np.unique(h)) == len(keys)  # a bijection: keys never tie
    assert not np.array_equal(h, scan.sample_hash(keys, seed=4))


@pytest.mark.parametrize("seed", range(5))
def test_fit_exponent_is_the_smallest_that_fits(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        scale = 10.0 ** rng.integers(-14, 8)
        lo, hi = np.sort(rng.standard_normal(2) * scale).astype(np.float32)
        e = scan.fit_exponent(lo, hi, scan.E_MIN)
        kl, kh = math.floor(float(lo) / 2.0**e), math.floor(float(hi) / 2.0**e)
        assert kh - kl < 256 and abs(kl) <= 2**50
        if e > scan.E_MIN:
            assert math.floor(float(hi) / 2.0 ** (e - 1)) - math.floor(float(lo) / 2.0 ** (e - 1)) >= 256
    assert scan.fit_exponent(np.float32(0), np.float32(0), scan.E_MIN) == scan.E_MIN
    big = np.float32(3e38)  # huge equal values: the index bound decides
    e = scan.fit_exponent(big, big, scan.E_MIN)
    assert math.floor(float(big) / 2.0**e) <= 2**50 < math.floor(float(big) / 2.0 ** (e - 1)) + 255


def _state(values, hashes, e):
    """One neuron's fine counts and reservoirs at exponent e, built directly (reservoirs sorted)."""
    st = scan.LayerState.empty(1, S, 1, 1, 0)
    st.lo[0], st.hi[0], st.ex[0] = values.min(), values.max(), e
    k = np.floor(values.astype(np.float64) / 2.0**e).astype(np.int64)
    for sl in range(256):
        m = np.nonzero((k & 255) == sl)[0]
        st.bins[0, sl, 0] = len(m)
        m = m[np.argsort(hashes[m])][:S]
        st.rh[0, sl, : len(m)] = hashes[m]
        st.ra[0, sl, : len(m)] = values[m]
        st.rloc[0, sl, : len(m)] = m
        st.bins[0, sl, 1] = hashes[m[-1]] if len(m) == S else scan.EMPTY
    return st


def _sorted_reservoirs(st):
    o = np.argsort(st.rh, axis=2)
    return [np.take_along_axis(getattr(st, n), o, axis=2) for n in ("rh", "ra", "rloc")]


def test_regrid_equals_binning_at_the_coarser_width():
    rng = np.random.default_rng(0)
    v = (rng.standard_normal(3000) * 0.3).astype(np.float32)
    h = scan.to_signed(scan.sample_hash(np.arange(3000), 0))
    e = scan.fit_exponent(v.min(), v.max(), scan.E_MIN)
    for d in (1, 3, 70):
        a, b = _state(v, h, e), _state(v, h, e + d)
        scan._regrid(0, e, e + d, a.lo[0], a.bins, a.rh, a.ra, a.rloc)
        np.testing.assert_array_equal(a.bins, b.bins, err_msg=f"d={d}")
        for x, y in zip(_sorted_reservoirs(a), _sorted_reservoirs(b)):
            np.testing.assert_array_equal(x, y, err_msg=f"d={d}")


@pytest.mark.parametrize("seed", range(6))
def test_cut_keeps_exactly_the_best(seed):
    rng = np.random.default_rng(seed)
    n, M = 200, 37
    v = rng.integers(0, 5, n).astype(np.float32)  # ties everywhere
    k = rng.permutation(n).astype(np.int64) * 3
    j = np.arange(n, dtype=np.int64)
    want = sorted(range(n), key=lambda q: (-v[q], k[q]))[:M]
    cv, ck, cj = v.copy(), k.copy(), j.copy()
    t, kt = scan._cut(cv, ck, cj, n, M)
    assert sorted(cj[:M].tolist()) == sorted(want)
    assert (t, kt) == (v[want[-1]], k[want[-1]])


def _greedy(v, k, r, p, before, K):
    kept = []
    for q in sorted(range(len(v)), key=lambda q: (-v[q], k[q])):
        if any(r[o] == r[q] and abs(p[o] - p[q]) <= before for o in kept):
            continue
        kept.append(q)
    return kept[:K]


@pytest.mark.parametrize("seed", range(6))
def test_select_top_is_the_per_sequence_greedy(seed):
    rng = np.random.default_rng(seed)
    K, before, after, n = 5, 3, 2, 120
    lengths = np.full(6, 40, np.int64)
    seq_idx = np.arange(6, dtype=np.int64) + 100
    r = rng.integers(0, 6, n).astype(np.int64)
    p = rng.integers(1, 40, n).astype(np.int64)
    _, u = np.unique(r * 100 + p, return_index=True)  # one candidate per token
    r, p = r[u], p[u]
    v = rng.integers(0, 4, len(r)).astype(np.float32)
    k = r * 1000 + p
    A = rng.standard_normal((6, 40, 1)).astype(np.float32)
    st = scan.LayerState.empty(1, 1, K, before + after + 1, 0)
    # the list already holds two examples of other sequences (an earlier batch)
    for val, key in ((2.0, 5), (1.0, 7)):
        scan._insert_top(0, np.float32(val), key, 1, 1, 0, 1, st.tn, st.tv, st.tk, st.tseq, st.tpos, st.tws, st.twl,
                         st.twin)
    scan.select_top(0, v.copy(), k.copy(), r, p, len(r), before, st.tn, st.tv, st.tk, st.tseq, st.tpos, st.tws, st.twl,
                    st.twin, seq_idx, lengths, after, A, True)
    cand = [(float(v[q]), int(k[q])) for q in _greedy(v, k, r, p, before, K)]
    want = sorted(cand + [(2.0, 5), (1.0, 7)], key=lambda c: (-c[0], c[1]))[:K]
    assert list(zip(st.tv[0, : st.tn[0]].tolist(), st.tk[0, : st.tn[0]].tolist())) == want
    for j in range(st.tn[0]):
        if st.tk[0, j] >= 1000:
            row, pos = divmod(int(st.tk[0, j]), 1000)
            assert st.tseq[0, j] == row + 100 and st.tws[0, j] == max(0, pos - before)
            np.testing.assert_array_equal(st.twin[0, j, : st.twl[0, j]], A[row, st.tws[0, j] : pos + after + 1, 0])


@pytest.mark.parametrize("span,g,bars", [(1, 1, 1), (25, 1, 25), (74, 1, 74), (75, 2, 38), (124, 2, 62),
                                         (125, 3, 42), (256, 5, 52)])
def test_display_bins(span, g, bars):
    assert scan.display_bins(-7, -7 + span - 1, 50) == (g, bars)


def test_contexts_are_clipped_to_the_sequence():
    flat = np.arange(70, dtype=np.int64)  # sequence 4: tokens 0-49, sequence 9: 50-69
    seq = np.array([4, 4, 9, 9])
    pos = np.array([0, 30, 19, 5])
    at, n_ctx, ctx = scan.contexts(np.array([4, 9]), flat, np.array([0, 50]), np.array([50, 20]), seq, pos, 12, 3)
    assert at.tolist() == [0, 12, 12, 5] and n_ctx.tolist() == [4, 16, 13, 9]
    assert ctx[1].tolist() == list(range(18, 34)) and ctx[2, :13].tolist() == list(range(57, 70))
    assert (ctx[2, 13:] == -1).all() and ctx[3, :9].tolist() == list(range(50, 59))


@pytest.mark.parametrize("seed,tile", [(0, 32), (1, 3)])
def test_update_block_with_a_small_candidate_buffer(seed, tile):
    """Ties everywhere and a buffer of only 2 * M candidates: many exact cuts inside a batch."""
    rng = np.random.default_rng(seed)
    B, T, d, K, before = 6, 50, 7, 3, 1
    A = np.maximum(rng.integers(-3, 4, (B, T, d)), 0).astype(np.float32)
    A[:, :, 1] = 2.0
    A[:, :, 2] = -rng.integers(0, 3, (B, T))  # ties at the low end too
    lengths = rng.integers(2, T + 1, B).astype(np.int64)
    lengths[0] = T
    rkeys = rng.permutation(B).astype(np.int64) * T  # rows out of corpus order
    keys2d = rkeys[:, None] + np.arange(T)
    seq_idx = np.arange(B, dtype=np.int64)
    st = scan.LayerState.empty(d, S, K, 2 * before + 1, 0)
    M = K * (2 * before + 1)
    r, p = np.nonzero((np.arange(T)[None, :] >= 1) & (np.arange(T)[None, :] < lengths[:, None]))
    key = keys2d[r, p]
    hh = scan.to_signed(scan.sample_hash(key, 0))
    status = scan.update_block(A, r, p, key, hh, (seq_idx[r] << scan.LOC_BITS) | p, np.full(len(r), -1),
                               seq_idx, lengths, 0, d, 0, st.lo, st.hi, st.ex, st.mean, st.m2, st.npos, st.bins, st.rh,
                               st.ra, st.rloc, *st.top_arrays(), *st.bottom_arrays(), st.tsum, M, before, before,
                               tile)
    assert status == 0
    for i in range(d):
        x = A[r, p, i]
        kept = _greedy(x, keys2d[r, p], r, p, before, K)
        assert st.tk[i, : st.tn[i]].tolist() == [int(keys2d[r[q], p[q]]) for q in kept]
        low = _greedy(-x, keys2d[r, p], r, p, before, K)  # the bottom list: the same rule on -x
        assert st.bk[i, : st.bn[i]].tolist() == [int(keys2d[r[q], p[q]]) for q in low]
        assert (-st.bv[i, : st.bn[i]]).tolist() == [float(x[q]) for q in low]
        assert st.bins[i, :, 0].sum() == len(x) and st.npos[i] == (x > 0).sum()
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(st.mean[i], x64.mean(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(st.m2[i], ((x64 - x64.mean()) ** 2).sum(), rtol=1e-9, atol=1e-9)
