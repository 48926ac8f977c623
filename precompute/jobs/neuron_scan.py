"""The neuron job's per-neuron statistics as compiled scans (numba) over a token-major buffer.

``A`` is ``[n_tokens, d_mlp]`` float32, one row per scored token, exactly as the model's hook
hands it over (no transpose). Each thread owns a contiguous block of neurons and reads its slice
of every row; all per-neuron state (histogram, sample slots, candidate buffers) stays in cache.

Three passes:
1. moments: min, max, sum, sum of squares, count above zero;
2. the *prefix*: the tokens of the first ``m`` ranks of a seeded random permutation, in rank
   order. A bin's first ``S`` tokens met here are its ``S`` smallest ranks, so a bin that gets
   ``S`` of them has its final spectrum sample. The prefix's histogram also gives the top
   candidates a first floor;
3. every other token: histogram bin, top candidates (only values at least the current floor,
   the ``n_cand``-th best so far, can enter), and for a bin whose sample is still short every
   token it has, from which the smallest ranks are kept at the end.

Definitions (the same as the tests' independent recomputation):
- bin ``b = floor((x - min) * n_bins / (max - min))``, the maximum in the last bin;
- spectrum: per bin, the ``S`` tokens of smallest rank, i.e. a uniform random ``S``-subset of the
  bin (all of it when it is smaller);
- top candidates: the ``n_cand`` largest values, ties to the smaller ``key`` (corpus order), then a
  greedy pass in that order that drops a candidate whose window would overlap an already kept
  one (same sequence, positions at most ``ctx_before`` apart).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit


SHORT = 1 << 62
NO_KEY = np.iinfo(np.int64).max


@njit(cache=True)
def _best_first(v, c, size, key):
    """Sort the first ``size`` candidates (values ``v``, token rows ``c``) by value descending,
    ties by ``key`` ascending."""
    k = np.empty(size, np.int64)
    for q in range(size):
        k[q] = key[c[q]]
    o = np.argsort(k)
    o = o[np.argsort(-v[:size][o], kind="mergesort")]
    v[:size] = v[:size][o]
    c[:size] = c[:size][o]


@njit(cache=True)
def _cut(v, c, size, n_keep, key):
    """Keep the candidates with a value at least the ``n_keep``-th largest (in place, any order);
    when ties at that value leave too many, keep exactly the best ``n_keep``. Returns the new
    size, the floor (a later value below it cannot be among the best ``n_keep``) and, after an
    exact cut, the key of the worst kept one (a later value equal to the floor needs a smaller
    key), else ``NO_KEY``."""
    t = -np.partition(-v[:size], n_keep - 1)[n_keep - 1]
    m = 0
    for q in range(size):
        if v[q] >= t:
            v[m] = v[q]
            c[m] = c[q]
            m += 1
    worst = NO_KEY
    if m > n_keep + (size - n_keep) // 2:  # too many ties: cut exactly
        _best_first(v, c, m, key)
        m = n_keep
        worst = key[c[m - 1]]
    return m, t, worst


@njit(cache=True, fastmath=True)
def _moments(A, i0, i1, lo, hi, s, s2, npos):
    """Min, max, count above zero, and the sum and sum of squares of ``x - x_0`` (shifted by the
    first value, so the variance does not cancel away) of columns ``i0:i1``. fastmath: the sums
    may be reassociated, so the loop vectorises."""
    w = i1 - i0
    shift = np.empty(w, np.float64)
    for q in range(w):
        lo[q] = A[0, i0 + q]
        hi[q] = A[0, i0 + q]
        shift[q] = A[0, i0 + q]
    for j in range(A.shape[0]):
        row = A[j, i0:i1]
        for q in range(w):
            x = row[q]
            lo[q] = min(lo[q], x)
            hi[q] = max(hi[q], x)
            xd = np.float64(x) - shift[q]
            s[q] += xd
            s2[q] += xd * xd
            npos[q] += x > 0
    return shift


@njit(cache=True, fastmath=True, inline="always")
def _bin(x, l64, sc, top):
    """The histogram bin of value ``x`` (the one formula every pass uses)."""
    return min(np.int32((np.float64(x) - l64) * sc), top)


@njit(cache=True, fastmath=True)
def _row_bins(row, l64, sc, top, out):
    """Histogram bins of one row slice (a loop simple enough to vectorise)."""
    for q in range(row.shape[0]):
        out[q] = _bin(row[q], l64[q], sc[q], top)


@njit(cache=True, fastmath=True)
def _add_row(acc, row):
    for q in range(row.shape[0]):
        acc[q] += row[q]


@njit(cache=True)
def _short_tokens(A, i0, i1, rank, m_prefix, short, l64, sc, n_ext):
    """Every token outside the prefix whose bin is short: (neuron in block, token row)."""
    top = np.int32(short.shape[1] - 1)
    xq = np.empty(n_ext, np.int64)
    xj = np.empty(n_ext, np.int64)
    e = 0
    for j in range(A.shape[0]):
        if rank[j] >= m_prefix:
            row = A[j, i0:i1]
            for q in range(i1 - i0):
                if short[q, _bin(row[q], l64[q], sc[q], top)]:
                    xq[e] = q
                    xj[e] = j
                    e += 1
    return xq, xj


def scan(A, perm, rank, m_prefix, key, seq, pos, tok, tok_count, min_count, n_top, n_bins, S, n_cand, top_k, ctx_before,
         n_blocks, ext_cap=None):
    """``A`` float32 [n, d]; per token row: ``rank`` (its place in the seeded permutation
    ``perm``), ``key`` (corpus order), ``seq``/``pos``, ``tok`` (token, numbered 0..len(tok_count)-1;
    the ``n_top`` with the highest mean among those seen ``min_count`` times are returned).
    The neurons are cut into ``n_blocks`` blocks scanned on as many threads (the compiled code
    releases the GIL). ``ext_cap``: slots per block for the tokens of short bins (more are
    collected in one extra pass; default twice the sample slots of a block). Returns per-neuron
    arrays."""
    n, d = A.shape
    out = (
        np.empty(d, np.float32),  # lo
        np.empty(d, np.float32),  # hi
        np.empty(d, np.float64),  # mean
        np.empty(d, np.float64),  # std
        np.zeros(d, np.int64),  # n_pos
        np.zeros((d, n_bins), np.int64),  # hist
        np.zeros(d, np.int64),  # sp_n
        np.full((d, n_bins * S), -1, np.int64),  # sp_col
        np.zeros((d, n_bins * S), np.float32),  # sp_act
        np.zeros(d, np.int64),  # ex_n
        np.full((d, top_k), -1, np.int64),  # ex_col
        np.full((d, n_top), -1, np.int64),  # tt_id
        np.zeros((d, n_top), np.float64),  # tt_mean
    )
    width = max(1, -(-d // max(1, n_blocks)))
    if ext_cap is None:
        ext_cap = 2 * n_bins * S * width

    def one(i0):
        _scan_block(A, perm, rank, m_prefix, key, seq, pos, tok, tok_count, min_count, n_top, n_bins, S, n_cand,
                    top_k, ctx_before, ext_cap, i0, min(d, i0 + width), *out)

    starts = list(range(0, d, width))
    if len(starts) <= 1:
        for i0 in starts:
            one(i0)
    else:
        with ThreadPoolExecutor(len(starts)) as pool:
            list(pool.map(one, starts))
    return out


@njit(cache=True, nogil=True)
def _scan_block(A, perm, rank, m_prefix, key, seq, pos, tok, tok_count, min_count, n_top, n_bins, S, n_cand, top_k,
                ctx_before, ext_cap, i0, i1, lo, hi, mean, std, n_pos, hist, sp_n, sp_col, sp_act, ex_n, ex_col,
                tt_id, tt_mean):
    """Neurons ``i0:i1`` of ``scan``, written into its output arrays."""
    n = A.shape[0]
    n_tok = tok_count.shape[0]
    cap = max(4 * n_cand, n_cand + 2)
    w = i1 - i0
    l = np.empty(w, np.float32)
    h = np.empty(w, np.float32)
    s = np.zeros(w, np.float64)
    s2 = np.zeros(w, np.float64)
    npos = np.zeros(w, np.int64)
    shift = _moments(A, i0, i1, l, h, s, s2, npos)  # 1.
    l64 = l.astype(np.float64)
    sc = np.zeros(w, np.float64)
    for q in range(w):
        if h[q] > l[q]:
            sc[q] = n_bins / (np.float64(h[q]) - l64[q])
    top = np.int32(n_bins - 1)
    bins = np.empty(w, np.int32)
    hs = np.zeros((w, n_bins), np.int64)
    spc = np.empty((w, n_bins * S), np.int64)  # sample slots: token rows
    cnt = np.zeros((w, n_bins), np.int64)
    bv = np.empty((w, cap), np.float32)
    bc = np.empty((w, cap), np.int64)
    bs = np.zeros(w, np.int64)
    floor = np.full(w, -np.inf, np.float32)
    fkey = np.full(w, NO_KEY, np.int64)
    tsum = np.zeros((n_tok, w), np.float64)  # per token, per neuron of the block

    # 2. prefix, in rank order (its tokens are counted in the histogram here)
    for r in range(m_prefix):
        j = perm[r]
        row = A[j, i0:i1]
        _row_bins(row, l64, sc, top, bins)
        _add_row(tsum[tok[j]], row)
        for q in range(w):
            b = bins[q]
            hs[q, b] += 1
            c = cnt[q, b]
            if c < S:
                spc[q, b * S + c] = j
                cnt[q, b] = c + 1
    # the first floor: the lower edge of the bin below the one where the prefix's n_cand-th
    # largest value lies (at least n_cand values of the whole corpus are above it)
    for q in range(w):
        above = 0
        for b in range(top, -1, -1):
            above += hs[q, b]
            if above >= n_cand:  # one bin lower: safe from rounding at the edge
                floor[q] = np.float32(l64[q] + (b - 1) / sc[q]) if b > 0 else l[q]
                break
    # a short bin's sample needs tokens outside the prefix: its count is offset by SHORT
    # below zero, so the histogram update itself tells (no second lookup)
    for q in range(w):
        for b in range(n_bins):
            if cnt[q, b] < S:
                hs[q, b] -= SHORT

    # 3. every other token: histogram, candidates, and the tokens of short bins
    ext_q = np.empty(ext_cap, np.int64)
    ext_j = np.empty(ext_cap, np.int64)
    n_ext = 0
    for j in range(n):
        row = A[j, i0:i1]
        if rank[j] >= m_prefix:  # (a prefix token is counted already; it is only a candidate now)
            _row_bins(row, l64, sc, top, bins)
            _add_row(tsum[tok[j]], row)
            for q in range(w):
                b = bins[q]
                v = hs[q, b]
                hs[q, b] = v + 1
                if v < 0:
                    if n_ext < ext_cap:
                        ext_q[n_ext] = q
                        ext_j[n_ext] = j
                    n_ext += 1
        kj = key[j]
        for q in range(w):  # candidates: the buffer code is inline, a call here costs too much
            x = row[q]
            if x >= floor[q] and not (x == floor[q] and kj > fkey[q]):
                p = bs[q]
                bv[q, p] = x
                bc[q, p] = j
                p += 1
                if p == cap:
                    p, floor[q], fkey[q] = _cut(bv[q], bc[q], p, n_cand, key)
                bs[q] = p
    for q in range(w):
        for b in range(n_bins):
            if hs[q, b] < 0:
                hs[q, b] += SHORT
    if n_ext > ext_cap:  # rare: more short-bin tokens than slots; collect them all again
        xq, xj = _short_tokens(A, i0, i1, rank, m_prefix, cnt < S, l64, sc, n_ext)
    else:
        xq, xj = ext_q, ext_j

    # short bins: a bin with at most S tokens in all takes them all; the others take the
    # smallest ranks among their tokens outside the prefix
    if n_ext:
        sel = np.empty(n_ext, np.int64)
        gk = np.empty(n_ext, np.int64)
        n_sel = 0
        for e in range(n_ext):
            q = xq[e]
            b = _bin(A[xj[e], i0 + q], l64[q], sc[q], top)
            if hs[q, b] <= S:
                spc[q, b * S + cnt[q, b]] = xj[e]
                cnt[q, b] += 1
            else:
                sel[n_sel] = e
                gk[n_sel] = (q * n_bins + b) * n + rank[xj[e]]
                n_sel += 1
        for f in np.argsort(gk[:n_sel]):
            e = sel[f]
            q = xq[e]
            b = gk[f] // n - q * n_bins
            c = cnt[q, b]
            if c < S:
                spc[q, b * S + c] = xj[e]
                cnt[q, b] = c + 1

    for q in range(w):
        i = i0 + q
        lo[i] = l[q]
        hi[i] = h[q]
        m = s[q] / n  # mean of the shifted values
        mean[i] = shift[q] + m
        std[i] = np.sqrt(max(0.0, s2[q] - n * m * m) / (n - 1)) if n > 1 else 0.0
        n_pos[i] = npos[q]
        hist[i] = hs[q]

        # top tokens by mean activation: insertion into a short sorted list (ties: smaller id)
        k = 0
        for t in range(n_tok if n_top > 0 else 0):
            if tok_count[t] < min_count:
                continue
            mt = tsum[t, q] / tok_count[t]
            if k == n_top and not mt > tt_mean[i, n_top - 1]:
                continue
            p = k if k < n_top else n_top - 1
            while p > 0 and mt > tt_mean[i, p - 1]:
                if p < n_top:
                    tt_mean[i, p] = tt_mean[i, p - 1]
                    tt_id[i, p] = tt_id[i, p - 1]
                p -= 1
            tt_mean[i, p] = mt
            tt_id[i, p] = t
            if k < n_top:
                k += 1

        # top examples: best candidates first, then greedy non-overlap
        nb_ = bs[q]
        if nb_ > n_cand:
            nb_, _, _ = _cut(bv[q], bc[q], nb_, n_cand, key)
        _best_first(bv[q], bc[q], nb_, key)
        kept = 0
        for e in range(min(nb_, n_cand)):
            col = bc[q, e]
            ok = True
            for f in range(kept):
                other = ex_col[i, f]
                if seq[other] == seq[col] and abs(pos[other] - pos[col]) <= ctx_before:
                    ok = False
                    break
            if ok:
                ex_col[i, kept] = col
                kept += 1
                if kept == top_k:
                    break
        ex_n[i] = kept

        # spectrum sample, sorted by activation: bins in order, each bin's few by insertion
        k = 0
        for b in range(n_bins):
            k0 = k
            for c in range(cnt[q, b]):
                col = spc[q, b * S + c]
                x = A[col, i]
                p = k
                while p > k0 and sp_act[i, p - 1] > x:
                    sp_col[i, p] = sp_col[i, p - 1]
                    sp_act[i, p] = sp_act[i, p - 1]
                    p -= 1
                sp_col[i, p] = col
                sp_act[i, p] = x
                k += 1
        sp_n[i] = k


@njit(cache=True, nogil=True)
def windows(A, bos, ex_n, ex_col, seq, pos, col_start, lengths, first, before, after):
    """The activation of every token in the window around each kept example, rows in (neuron,
    rank) order; ``bos[seq, neuron]`` fills position 0 when sequences start with BOS
    (``first`` = 1). Returns the rows' start offsets per neuron, window starts, lengths, acts."""
    d = ex_n.shape[0]
    off = np.zeros(d + 1, np.int64)
    for i in range(d):
        off[i + 1] = off[i] + ex_n[i]
    win = np.zeros((off[d], before + after + 1), np.float32)
    start = np.empty(off[d], np.int64)
    length = np.empty(off[d], np.int64)
    for i in range(d):
        for r in range(ex_n[i]):
            e = off[i] + r
            col = ex_col[i, r]
            k = seq[col]
            p = pos[col]
            st = max(0, p - before)
            en = min(lengths[k], p + after + 1)
            start[e] = st
            length[e] = en - st
            for t in range(st, en):
                win[e, t - st] = bos[k, i] if t < first else A[col_start[k] + t - first, i]
    return off, start, length, win
