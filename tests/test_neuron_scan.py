"""The compiled neuron scan against a plain numpy/Python reference of every definition, on data
made to be hard: exact ties in value (ReLU zeros, integer values, constant and dead neurons),
rows not in corpus order, fewer tokens than candidates, more than 256 bins, and the overflow
path for short-bin tokens."""

from __future__ import annotations

import numpy as np
import pytest

from precompute.jobs.neuron_scan import scan, windows

SEQ_LEN = 50


def _reference(A, rank, key, seq, pos, tok, n_tok, min_count, n_top, n_bins, S, n_cand, top_k, before):
    n, d = A.shape
    out = []
    counts = np.bincount(tok, minlength=n_tok)
    for i in range(d):
        x = A[:, i]
        lo, hi = x.min(), x.max()
        sc = n_bins / (np.float64(hi) - np.float64(lo)) if hi > lo else 0.0
        b = np.minimum(((x.astype(np.float64) - lo) * sc).astype(np.int64), n_bins - 1)
        hist = np.bincount(b, minlength=n_bins)
        sample = set()
        for bb in range(n_bins):
            members = np.nonzero(b == bb)[0]
            sample |= set(members[np.argsort(rank[members])][:S].tolist())
        order = sorted(range(n), key=lambda j: (-float(x[j]), int(key[j])))[:n_cand]
        kept = []
        for j in order:
            if any(seq[o] == seq[j] and abs(int(pos[o]) - int(pos[j])) <= before for o in kept):
                continue
            kept.append(j)
            if len(kept) == top_k:
                break
        sums = np.bincount(tok, weights=x.astype(np.float64), minlength=n_tok)
        means = {t: sums[t] / counts[t] for t in range(n_tok) if counts[t] >= min_count}
        top = sorted(means, key=lambda t: (-means[t], t))[:n_top]
        out.append(dict(lo=lo, hi=hi, mean=x.astype(np.float64).mean(), std=x.astype(np.float64).std(ddof=1),
                        npos=int((x > 0).sum()), hist=hist, sample=sample, kept=kept, top=top))
    return out


def _data(kind: str, n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        A = rng.standard_normal((n, d)).astype(np.float32)
        A[:, 4 % d] = 1000 + 0.01 * A[:, 4 % d]  # a large mean: the variance must not cancel away
    else:  # ties everywhere: integer values, ReLU zeros, a constant and a dead neuron
        A = np.maximum(rng.integers(-6, 7, (n, d)), 0).astype(np.float32)
        A[:, 1] = 0.5
        A[:, 2] = 0.0
        A[rng.random(n) < 0.01, 3] = 9.0  # a rare strong value
    key = rng.permutation(n).astype(np.int64)  # rows are not in corpus order
    seq = (key // SEQ_LEN).astype(np.int32)
    pos = (key % SEQ_LEN).astype(np.int32)
    perm = rng.permutation(n).astype(np.int64)
    rank = np.empty(n, np.int64)
    rank[perm] = np.arange(n)
    tok = rng.integers(0, 40, n).astype(np.int64)
    return A, perm, rank, key, seq, pos, tok


@pytest.mark.parametrize(
    "kind,n,d,n_bins,n_cand,top_k,blocks,ext_cap",
    [
        ("normal", 3000, 37, 50, 80, 10, 2, 10_000),
        ("normal", 3000, 37, 50, 80, 10, 3, 1),  # short-bin tokens overflow their slots
        ("ties", 2500, 9, 50, 16, 4, 2, 10_000),
        ("ties", 2500, 9, 300, 16, 4, 1, 5),
        ("normal", 10, 5, 50, 10, 10, 2, 100),  # fewer tokens than candidates
    ],
)
def test_scan_matches_reference(kind, n, d, n_bins, n_cand, top_k, blocks, ext_cap):
    A, perm, rank, key, seq, pos, tok = _data(kind, n, d)
    S, before, min_count, n_top = 10, 6, 3, 5
    tok_count = np.bincount(tok, minlength=40).astype(np.int64)
    m_prefix = max(1, n // 4)
    lo, hi, mean, std, n_pos, hist, sp_n, sp_col, sp_act, ex_n, ex_col, tt_id, tt_mean = scan(
        A, perm, rank, m_prefix, key, seq, pos, tok, tok_count, min_count, n_top, n_bins, S, n_cand, top_k, before,
        blocks, ext_cap)
    ref = _reference(A, rank, key, seq, pos, tok, 40, min_count, n_top, n_bins, S, n_cand, top_k, before)
    for i, r in enumerate(ref):
        assert lo[i] == r["lo"] and hi[i] == r["hi"]
        np.testing.assert_allclose(mean[i], r["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(std[i], r["std"], rtol=1e-6, atol=1e-9)
        assert n_pos[i] == r["npos"]
        np.testing.assert_array_equal(hist[i], r["hist"])
        cols = sp_col[i, : sp_n[i]]
        assert set(cols.tolist()) == r["sample"], f"neuron {i}: spectrum sample"
        np.testing.assert_array_equal(sp_act[i, : sp_n[i]], A[cols, i])
        assert (np.diff(sp_act[i, : sp_n[i]]) >= 0).all()
        assert ex_col[i, : ex_n[i]].tolist() == r["kept"], f"neuron {i}: top examples"
        assert [t for t in tt_id[i] if t >= 0] == r["top"], f"neuron {i}: top tokens"


def test_windows_hold_every_token_and_bos():
    A, perm, rank, key, seq, pos, tok = _data("normal", 400, 3)
    # corpus order rows so that a sequence's tokens are contiguous: row = key
    A = A[np.argsort(key)]
    n_seq = 400 // SEQ_LEN
    seq = np.repeat(np.arange(n_seq), SEQ_LEN).astype(np.int32)
    pos = (np.tile(np.arange(SEQ_LEN), n_seq) + 1).astype(np.int32)  # position 0 is a BOS row
    col_start = np.arange(n_seq) * SEQ_LEN
    lengths = np.full(n_seq, SEQ_LEN + 1)
    bos = np.arange(n_seq * 3, dtype=np.float32).reshape(n_seq, 3) + 100
    ex_col = np.array([[0, 75, -1], [399, 120, 3]])
    ex_n = np.array([2, 3, 0][:2])
    off, start, length, win = windows(A, bos, ex_n, ex_col, seq, pos, col_start, lengths, 1, 4, 2)
    assert off.tolist() == [0, 2, 5]
    for i in range(2):
        for r in range(ex_n[i]):
            e = off[i] + r
            col = ex_col[i, r]
            k, p = seq[col], pos[col]
            assert start[e] == max(0, p - 4) and start[e] + length[e] == min(SEQ_LEN + 1, p + 3)
            for t in range(start[e], start[e] + length[e]):
                want = bos[k, i] if t == 0 else A[col_start[k] + t - 1, i]
                assert win[e, t - start[e]] == want
