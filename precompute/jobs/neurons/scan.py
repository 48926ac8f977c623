"""The neuron job's per-batch update, merge and finish as compiled kernels (numba), and the same
update in torch ops for a GPU (``torch_update``). Definitions are in ``job.py``'s docstring.

One layer's state is a ``LayerState`` of per-neuron arrays (the per-token sums are
``[tracked tokens, d]``). ``update_block`` folds one batch into a block of neurons (blocks run on
Python threads: the compiled code releases the GIL). The batch's tokens come in sample-hash order.
It copies a tile of 16 neurons (one cache line of a row of ``A [batch, pos, d_mlp]``) neuron-major,
adding the values to the per-token sums on the way, and then does each neuron alone, its state
in cache: one vectorised pass for the shifted sums of the moments and for what decides the rest
(values outside min..max, above zero, ahead of the K-th top or bottom example); min/max only
when a value is outside (the bins widen at most once a batch); fine-bin slots and counts; the
tokens under their bin's reservoir threshold (grouped by bin, so the reservoirs are visited in
memory order and, in hash order, a bin takes its few new samples and rejects the rest); and the
top-example candidates only when a list is not full or a value is ahead of its K-th example.
Fine bins live in a ring of 256 slots (``k mod 256``): the bins of ``kmin..kmax`` never collide.

Sample hashes are kept as signed int64 in the same order as the unsigned hash (``h ^ 2^63``), so
numba and torch compare them without unsigned arithmetic. A fine bin's reservoir holds its
``S`` smallest hashes in no particular order; the largest is the bin's threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

N_FINE = 256  # fine histogram bins (a power of two)
E_MIN = -40  # smallest bin width 2^E_MIN (a constant neuron ends there)
K_LIMIT = float(2**50)  # |fine bin index| stays below this, so edges are exact in float64
EMPTY = np.iinfo(np.int64).max  # threshold of a reservoir not yet full (every hash passes)
NO_KEY = np.iinfo(np.int64).max
MASK = N_FINE - 1
LOC_BITS = 24  # a sample's place: seq << LOC_BITS | pos
# per-token sums are int64 in units of 2^-TSUM_FRAC_BITS (each activation rounded to that grid,
# half to even): integer sums are exact in any order, so a later shard adds into the total's sums
# in place and a Ray worker's partial sums merge to the same bits. Exact while a (token, neuron)
# sum stays below 2^(63 - 24), about 5.5e11: e.g. 1e8 occurrences of activations up to 5,000.
TSUM_FRAC_BITS = 24
TSUM_SCALE = float(2**TSUM_FRAC_BITS)
_SIGN = np.int64(-(2**63))


# ---------------------------------------------------------------------------------- hashing

def splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (a bijection): numpy, wrapping arithmetic."""
    z = np.asarray(z, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seed_constant(seed: int) -> np.uint64:
    """The constant XORed into every global key before hashing."""
    return splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]


def sample_hash(keys: np.ndarray, seed: int) -> np.ndarray:
    """The spectrum-sample hash of global token keys: ``splitmix64(key ^ seed_constant(seed))``."""
    return splitmix64(np.asarray(keys, dtype=np.int64).astype(np.uint64) ^ seed_constant(seed))


def to_signed(u: np.ndarray) -> np.ndarray:
    """uint64 -> int64 of the same order."""
    return np.ascontiguousarray(u, dtype=np.uint64).view(np.int64) ^ _SIGN


def to_unsigned(s: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(s, np.int64) ^ _SIGN).view(np.uint64)


# ---------------------------------------------------------------------------------- state

@dataclass
class LayerState:
    """One layer's running statistics (numpy, one row per neuron)."""

    lo: np.ndarray  # f32 [d] min (+inf: nothing seen)
    hi: np.ndarray  # f32 [d] max
    ex: np.ndarray  # i64 [d] fine-bin exponent e: bins of width 2^e, slot floor(x / 2^e) mod 256
    mean: np.ndarray  # f64 [d]
    m2: np.ndarray  # f64 [d] sum of squared deviations
    npos: np.ndarray  # i64 [d] count above zero
    bins: np.ndarray  # i64 [d, N_FINE, 2] per fine bin: count, reservoir threshold (EMPTY: not full)
    rh: np.ndarray  # i64 [d, N_FINE, S] reservoir hashes (signed order), min(count, S) filled
    ra: np.ndarray  # f32 [d, N_FINE, S] their activations
    rloc: np.ndarray  # i64 [d, N_FINE, S] seq << LOC_BITS | pos
    tn: np.ndarray  # i64 [d] kept top examples
    tv: np.ndarray  # f32 [d, K] best first
    tk: np.ndarray  # i64 [d, K] global key
    tseq: np.ndarray  # i64 [d, K]
    tpos: np.ndarray  # i32 [d, K]
    tws: np.ndarray  # i32 [d, K] window start
    twl: np.ndarray  # i32 [d, K] window length
    twin: np.ndarray  # f32 [d, K, W] window activations
    bn: np.ndarray  # the bottom examples: the top list of the negated activations (bv = -activation),
    bv: np.ndarray  # windows hold the activations themselves
    bk: np.ndarray
    bseq: np.ndarray
    bpos: np.ndarray
    bws: np.ndarray
    bwl: np.ndarray
    bwin: np.ndarray
    tsum: np.ndarray  # i64 [tracked tokens, d] per-token sums, units of 2^-TSUM_FRAC_BITS

    @classmethod
    def empty(cls, d: int, S: int, K: int, W: int, n_track: int) -> "LayerState":
        bins = np.zeros((d, N_FINE, 2), np.int64)
        bins[:, :, 1] = EMPTY
        return cls(
            lo=np.full(d, np.inf, np.float32), hi=np.full(d, -np.inf, np.float32), ex=np.full(d, E_MIN, np.int64),
            mean=np.zeros(d), m2=np.zeros(d), npos=np.zeros(d, np.int64), bins=bins,
            rh=np.full((d, N_FINE, S), EMPTY, np.int64), ra=np.zeros((d, N_FINE, S), np.float32),
            rloc=np.zeros((d, N_FINE, S), np.int64),
            tn=np.zeros(d, np.int64), tv=np.zeros((d, K), np.float32), tk=np.zeros((d, K), np.int64),
            tseq=np.zeros((d, K), np.int64), tpos=np.zeros((d, K), np.int32), tws=np.zeros((d, K), np.int32),
            twl=np.zeros((d, K), np.int32), twin=np.zeros((d, K, W), np.float32),
            bn=np.zeros(d, np.int64), bv=np.zeros((d, K), np.float32), bk=np.zeros((d, K), np.int64),
            bseq=np.zeros((d, K), np.int64), bpos=np.zeros((d, K), np.int32), bws=np.zeros((d, K), np.int32),
            bwl=np.zeros((d, K), np.int32), bwin=np.zeros((d, K, W), np.float32), tsum=np.zeros((n_track, d), np.int64),
        )

    def hist_arrays(self):
        return self.lo, self.hi, self.ex, self.bins, self.rh, self.ra, self.rloc

    def top_arrays(self):
        return self.tn, self.tv, self.tk, self.tseq, self.tpos, self.tws, self.twl, self.twin

    def bottom_arrays(self):
        return self.bn, self.bv, self.bk, self.bseq, self.bpos, self.bws, self.bwl, self.bwin


# ---------------------------------------------------------------------------------- histogram


@njit(cache=True, inline="always")
def _k(x, e):
    """Fine bin index floor(x / 2^e) (exact: a power-of-two scale in float64)."""
    return np.int64(math.floor(np.float64(x) * math.ldexp(1.0, -e)))


@njit(cache=True)
def fits(lo, hi, e):
    """Do ``lo..hi`` span fewer than N_FINE bins of width 2^e, with indices below K_LIMIT?"""
    s = math.ldexp(1.0, -e)
    kl = math.floor(np.float64(lo) * s)
    kh = math.floor(np.float64(hi) * s)
    return kl >= -K_LIMIT and kl + (N_FINE - 1) <= K_LIMIT and kh - kl < N_FINE


@njit(cache=True)
def fit_exponent(lo, hi, e0):
    """The smallest e >= e0 for which ``lo..hi`` fits (``e0`` must not be above the answer)."""
    e = e0
    while not fits(lo, hi, e):
        e += 1
    return e


@njit(cache=True, inline="always")
def _push(bins, rh, ra, rloc, i, sl, filled, h, x, loc):
    """Offer hash ``h`` to the reservoir of neuron ``i``'s bin ``sl``, which holds ``filled``
    (<= S) entries: appended while not full, else it replaces the largest if smaller. Keeps the
    threshold (the largest once full). Returns the new number of entries."""
    S = rh.shape[2]
    if filled < S:
        rh[i, sl, filled] = h
        ra[i, sl, filled] = x
        rloc[i, sl, filled] = loc
        filled += 1
        if filled == S:
            m = rh[i, sl, 0]
            for j in range(1, S):
                m = max(m, rh[i, sl, j])
            bins[i, sl, 1] = m
        return filled
    t = bins[i, sl, 1]
    if h >= t:
        return S
    j = 0
    while rh[i, sl, j] != t:
        j += 1
    rh[i, sl, j] = h
    ra[i, sl, j] = x
    rloc[i, sl, j] = loc
    m = rh[i, sl, 0]
    for j in range(1, S):
        m = max(m, rh[i, sl, j])
    bins[i, sl, 1] = m
    return S


@njit(cache=True)
def _regrid(i, e_old, e_new, lo_old, bins, rh, ra, rloc):
    """Re-bin neuron ``i`` from width 2^e_old to 2^e_new (> e_old): fine bin k goes to
    k >> (e_new - e_old); the reservoirs of merged bins keep their S smallest hashes."""
    S = rh.shape[2]
    d = e_new - e_old
    kmin = _k(lo_old, e_old)
    b2 = np.zeros((1, N_FINE, 2), np.int64)
    b2[0, :, 1] = EMPTY
    h2 = np.full((1, N_FINE, S), EMPTY, np.int64)
    a2 = np.zeros((1, N_FINE, S), np.float32)
    l2 = np.zeros((1, N_FINE, S), np.int64)
    f2 = np.zeros(N_FINE, np.int64)
    for sl in range(N_FINE):
        c = bins[i, sl, 0]
        if c == 0:
            continue
        k = kmin + ((sl - kmin) & MASK)
        if d >= 63:
            kn = np.int64(0) if k >= 0 else np.int64(-1)
        else:
            kn = k >> d
        ns = kn & MASK
        b2[0, ns, 0] += c
        for j in range(min(c, S)):
            f2[ns] = _push(b2, h2, a2, l2, 0, ns, f2[ns], rh[i, sl, j], ra[i, sl, j], rloc[i, sl, j])
    bins[i] = b2[0]
    rh[i] = h2[0]
    ra[i] = a2[0]
    rloc[i] = l2[0]


@njit(cache=True)
def _grow(i, x, lo, hi, ex, bins, rh, ra, rloc):
    """Slow path: ``x`` is outside neuron ``i``'s min..max. Widen the bins if the new range no
    longer fits. False when ``x`` is not finite."""
    if not np.isfinite(x):
        return False
    _grow_range(i, x, x, lo, hi, ex, bins, rh, ra, rloc)
    return True


# ---------------------------------------------------------------------------------- top examples


@njit(cache=True, inline="always")
def _precedes(v, k, v2, k2):
    """Does (v, k) come before (v2, k2) in the order value descending, key ascending?"""
    return v > v2 or (v == v2 and k < k2)


@njit(cache=True)
def _cut(cv, ck, cj, n, M):
    """Keep exactly the ``M`` best of ``n`` candidates (value desc, key asc), in place (any
    order). Returns the value and key of the M-th best: the new floor."""
    t = -np.partition(-cv[:n], M - 1)[M - 1]
    n_gt = 0
    n_eq = 0
    for q in range(n):
        if cv[q] > t:
            n_gt += 1
        elif cv[q] == t:
            n_eq += 1
    need = M - n_gt
    tie = np.empty(n_eq, np.int64)
    m = 0
    for q in range(n):
        if cv[q] == t:
            tie[m] = ck[q]
            m += 1
    kt = np.partition(tie, need - 1)[need - 1]
    m = 0
    for q in range(n):
        if cv[q] > t or (cv[q] == t and ck[q] <= kt):
            cv[m] = cv[q]
            ck[m] = ck[q]
            cj[m] = cj[q]
            m += 1
    return t, kt


@njit(cache=True)
def _order(v, k, n):
    """Indices of the first ``n`` candidates in the order value descending, key ascending."""
    o = np.argsort(k[:n])
    o2 = np.argsort(-v[:n][o], kind="mergesort")
    return o[o2]


@njit(cache=True)
def _insert_top(i, v, key, s, p, ws, wl, tn, tv, tk, tseq, tpos, tws, twl, twin):
    """Insert an example into neuron ``i``'s sorted top list (the caller checked it belongs);
    returns its row, whose window the caller fills."""
    K = tv.shape[1]
    j = tn[i] if tn[i] < K else K - 1
    while j > 0 and _precedes(v, key, tv[i, j - 1], tk[i, j - 1]):
        tv[i, j] = tv[i, j - 1]
        tk[i, j] = tk[i, j - 1]
        tseq[i, j] = tseq[i, j - 1]
        tpos[i, j] = tpos[i, j - 1]
        tws[i, j] = tws[i, j - 1]
        twl[i, j] = twl[i, j - 1]
        twin[i, j, :] = twin[i, j - 1, :]
        j -= 1
    twin[i, j, :] = 0.0
    tv[i, j] = v
    tk[i, j] = key
    tseq[i, j] = s
    tpos[i, j] = p
    tws[i, j] = ws
    twl[i, j] = wl
    if tn[i] < K:
        tn[i] += 1
    return j


@njit(cache=True)
def select_top(i, cand_v, cand_k, cand_r, cand_p, n, cb, tn, tv, tk, tseq, tpos, tws, twl, twin, seq_idx, lengths,
               ca, A, copy):
    """One batch's candidates of neuron ``i`` (all that precede its floor; rows ``cand_r`` of the
    batch, positions ``cand_p``) into its top list: in order, a per-sequence greedy drops a
    candidate within ``cb`` positions of a kept one of the same row; the kept ones enter the list
    until one does not belong (every later one is worse). With ``copy`` the window is copied from
    ``A`` (the batch's activations [batch, pos, d]); returns the rows of the list filled (for a
    caller that copies windows itself) and how many."""
    K = tv.shape[1]
    o = _order(cand_v, cand_k, n)
    kr = np.empty(K, np.int64)
    kp = np.empty(K, np.int64)
    filled = np.empty(K, np.int64)
    nk = 0
    for c in o:
        r = cand_r[c]
        p = cand_p[c]
        clash = False
        for f in range(nk):
            if kr[f] == r and abs(kp[f] - p) <= cb:
                clash = True
                break
        if clash:
            continue
        v = cand_v[c]
        key = cand_k[c]
        if tn[i] == K and not _precedes(v, key, tv[i, K - 1], tk[i, K - 1]):
            break
        ws = max(0, p - cb)
        we = min(lengths[r], p + ca + 1)
        j = _insert_top(i, v, key, seq_idx[r], p, ws, we - ws, tn, tv, tk, tseq, tpos, tws, twl, twin)
        if copy:
            for t in range(ws, we):
                twin[i, j, t - ws] = A[r, t, i]
        for f in range(nk):  # rows filled earlier in this batch moved down one
            if filled[f] >= j:
                filled[f] += 1
        kr[nk] = r
        kp[nk] = p
        filled[nk] = j
        nk += 1
    return filled, nk


# ---------------------------------------------------------------------------------- update


@njit(cache=True)
def _hist_floor(i, lo, hi, ex, bins, M, low):
    """A value below which no token can be among neuron ``i``'s K best kept ones: the lower edge of
    the highest fine bin with at least ``M`` tokens (seen so far, this batch included) at or
    above it, as at least M / (2 * ctx_before + 1) = K of those are kept. -inf when fewer.
    With ``low``, the same for the negated activations (the bottom list): minus the upper edge of
    the lowest fine bin with at least ``M`` tokens at or below it."""
    if not lo[i] <= hi[i]:
        return -np.inf
    kmin = _k(lo[i], ex[i])
    kmax = _k(hi[i], ex[i])
    above = 0
    if low:
        for k in range(kmin, kmax + 1):
            above += bins[i, k & MASK, 0]
            if above >= M:
                return -np.float64(k + 1) * math.ldexp(1.0, ex[i])
        return -np.inf
    for k in range(kmax, kmin - 1, -1):
        above += bins[i, k & MASK, 0]
        if above >= M:
            return np.float64(k) * math.ldexp(1.0, ex[i])
    return -np.inf


@njit(cache=True, inline="always")
def _add_candidate(x, key, j, cv, ck, cj, n, fv, fk, M):
    """Append a candidate; when the buffer is full keep the M best and raise the floor
    (``fv[0]``, ``fk[0]``) to the M-th. Returns the new count."""
    cv[n] = x
    ck[n] = key
    cj[n] = j
    n += 1
    if n == cv.shape[0]:
        t_v, t_k = _cut(cv, ck, cj, n, M)
        fv[0] = t_v
        fk[0] = t_k
        n = M
    return n


@njit(cache=True)
def _grow_range(i, mn, mx, lo, hi, ex, bins, rh, ra, rloc):
    """Widen neuron ``i``'s min..max to take ``mn..mx``, re-binning if it no longer fits."""
    nlo = min(lo[i], mn)
    nhi = max(hi[i], mx)
    e = fit_exponent(nlo, nhi, ex[i])
    if e != ex[i] and lo[i] <= hi[i]:
        _regrid(i, ex[i], e, lo[i], bins, rh, ra, rloc)
    ex[i] = e
    lo[i] = nlo
    hi[i] = nhi


@njit(cache=True)
def _gather(x, key, fv, fk, cv, ck, cj, M):
    """The tokens ahead of the floor (``fv[0]``, ``fk[0]``) into the candidate buffer (token
    index in ``cj``); a full buffer keeps its M best and raises the floor. Returns the count."""
    N = x.shape[0]
    f = fv[0]
    ahead = 0
    for n in range(N):
        ahead += np.float64(x[n]) >= f
    nc = 0
    if ahead:
        for n in range(N):
            x64 = np.float64(x[n])
            if x64 >= fv[0]:
                if x64 > fv[0] or key[n] < fk[0]:
                    nc = _add_candidate(x64, key[n], n, cv, ck, cj, nc, fv, fk, M)
    return nc


@njit(cache=True)
def _count_kept(cv, ck, cj, rr, pp, n, cb, need):
    """How many of the ``n`` candidates the per-sequence greedy keeps (stopping at ``need``)."""
    if need <= 0:
        return 0
    o = _order(cv, ck, n)
    kr = np.empty(need, np.int64)
    kp = np.empty(need, np.int64)
    nk = 0
    for c in o:
        r = rr[cj[c]]
        p = pp[cj[c]]
        clash = False
        for f in range(nk):
            if kr[f] == r and abs(kp[f] - p) <= cb:
                clash = True
                break
        if not clash:
            kr[nk] = r
            kp[nk] = p
            nk += 1
            if nk == need:
                break
    return nk


@njit(cache=True)
def _top_step(x, low, i, key, rr, pp, A, lo, hi, ex, bins, tn, tv, tk, tseq, tpos, tws, twl, twin, cv, ck, cj, fv, fk,
              M, cb, ca, seq_idx, lengths):
    """One batch's values ``x`` of neuron ``i`` into its top list: candidates ahead of the K-th
    kept example; while it has fewer, ahead of a floor from the histogram, lowered until K kept
    ones are certainly above it. ``low``: ``x`` is the negated activations (the bottom list);
    windows are copied from ``A`` as they are."""
    K = tv.shape[1]
    if tn[i] == K:
        fv[0] = tv[i, K - 1]
        fk[0] = tk[i, K - 1]
        nc = _gather(x, key, fv, fk, cv, ck, cj, M)
    else:
        m_try = 4 * K
        while True:
            fv[0] = _hist_floor(i, lo, hi, ex, bins, m_try, low)
            fk[0] = NO_KEY
            t = fv[0]
            nc = _gather(x, key, fv, fk, cv, ck, cj, M)
            if t == -np.inf or fv[0] != t or fk[0] != NO_KEY:  # all, or cut to M (which hold K kept)
                break
            have = 0
            for j in range(tn[i]):
                have += tv[i, j] >= t
            if have + _count_kept(cv, ck, cj, rr, pp, nc, cb, K - have) >= K:
                break
            m_try *= 4
    if nc:
        cr = np.empty(nc, np.int64)
        cp = np.empty(nc, np.int64)
        for c in range(nc):
            cr[c] = rr[cj[c]]
            cp[c] = pp[cj[c]]
        select_top(i, cv, ck, cr, cp, nc, cb, tn, tv, tk, tseq, tpos, tws, twl, twin, seq_idx, lengths, ca, A, True)


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _scan_row(x, shift, lo, hi, ft, fb):
    """One pass over a neuron's batch values ``x``: the shifted sums ``sum(x - shift)`` and
    ``sum((x - shift)^2)`` in float64 (the compiler may reorder these sums: that is the only
    function where it may), and how many values are outside ``lo..hi`` (NaN included), above
    zero, at or above ``ft`` and at or below ``fb``."""
    s1 = 0.0
    s2 = 0.0
    n_out = np.int32(0)
    n_pos = np.int32(0)
    n_top = np.int32(0)
    n_bot = np.int32(0)
    for n in range(x.shape[0]):
        v = x[n]
        w = np.float64(v) - shift
        s1 += w
        s2 += w * w
        n_out += np.int32(not (v >= lo and v <= hi))
        n_pos += np.int32(v > 0)
        n_top += np.int32(v >= ft)
        n_bot += np.int32(v <= fb)
    return s1, s2, n_out, n_pos, n_top, n_bot


@njit(cache=True, nogil=True)
def update_block(A, rr, pp, key, hh, loc, tcol, seq_idx, lengths, i0, i1, n_before,
                 lo, hi, ex, mean, m2, npos, bins, rh, ra, rloc,
                 tn, tv, tk, tseq, tpos, tws, twl, twin, bn, bv, bk, bseq, bpos, bws, bwl, bwin, tsum, M, cb, ca,
                 tile):
    """Fold one batch into neurons ``i0:i1`` of a layer's state. ``A`` [batch, pos, d] f32. The
    batch's scored tokens, in any order (the caller gives them in sample-hash order, so a bin's
    reservoir meets its smallest hashes first): ``A[rr[n], pp[n]]``, with global key ``key[n]``,
    sample hash ``hh[n]`` (signed order), place ``loc[n]`` and row ``tcol[n]`` of the per-token
    sums ``tsum`` [tracked tokens, d] (-1: untracked). ``n_before``: scored tokens before this
    batch; ``M``: candidates that hold a batch's K best kept ones.

    A tile of ``tile`` neurons (one cache line of a row of ``A``) is copied neuron-major, its
    values added to the per-token sums on the way (a token's row, the tile's columns); then each
    neuron is done alone over the batch with its state in cache: one vectorised pass for the
    moments and for what decides the rest (values outside min..max, above zero, ahead of the
    K-th top or bottom example); min and max only when a value is outside (widening the bins at
    most once); the fine-bin slots; counts and the tokens under their bin's reservoir threshold
    (branch-free), then those tokens into the reservoirs; the top and bottom candidates only when
    a list is not full or a value is ahead of its K-th example. The result does not depend on the
    order of tokens within the batch (floating-point sums aside). Returns 1 when a value was not
    finite, else 0."""
    K = tv.shape[1]
    S = rh.shape[2]
    C = 2 * M
    N = rr.shape[0]
    buf = np.empty((tile, N), np.float32)
    xneg = np.empty(N, np.float32)
    slot = np.empty(N, np.uint8)
    under = np.empty(N, np.int32)
    by_bin = np.empty(N, np.int32)
    fill = np.empty(N_FINE, np.int64)
    thr = np.empty(N_FINE, np.int64)
    cnt = np.zeros((2, N_FINE), np.int64)
    cv = np.empty(C, np.float64)
    ck = np.empty(C, np.int64)
    cj = np.empty(C, np.int64)
    fv = np.empty(1, np.float64)
    fk = np.empty(1, np.int64)
    for t0 in range(i0, i1, tile):
        t1 = min(i1, t0 + tile)
        w = t1 - t0
        for n in range(N):  # neuron-major copy of the tile; per-token sums of its columns
            r = rr[n]
            p = pp[n]
            c = tcol[n]
            if c >= 0:
                for q in range(w):
                    v = A[r, p, t0 + q]
                    buf[q, n] = v
                    tsum[c, t0 + q] += np.int64(np.rint(np.float64(v) * TSUM_SCALE))
            else:
                for q in range(w):
                    buf[q, n] = A[r, p, t0 + q]
        for q in range(w):
            i = t0 + q
            x = buf[q]
            shift = mean[i] if n_before > 0 else np.float64(x[0])
            ft = tv[i, K - 1] if tn[i] == K else np.float32(np.inf)
            fb = -bv[i, K - 1] if bn[i] == K else np.float32(-np.inf)
            s1, s2, n_out, n_pos, n_top, n_bot = _scan_row(x, shift, lo[i], hi[i], ft, fb)
            if n_out:  # min and max; widen the bins once for the whole batch
                mn = x[0]
                mx = x[0]
                bad = 0
                for n in range(N):
                    v = x[n]
                    mn = min(mn, v)
                    mx = max(mx, v)
                    bad += v != v
                if bad or not (np.isfinite(mn) and np.isfinite(mx)):
                    return 1
                if mn < lo[i] or mx > hi[i]:
                    _grow_range(i, mn, mx, lo, hi, ex, bins, rh, ra, rloc)
            npos[i] += n_pos
            mb = shift + s1 / N
            m2b = s2 - s1 * s1 / N
            if n_before == 0:
                mean[i] = mb
                m2[i] = m2b
            else:
                nt = n_before + N
                delta = mb - mean[i]
                mean[i] += delta * N / nt
                m2[i] += m2b + delta * delta * (n_before * (N / nt))
            # fine-bin slots: k mod N_FINE (k exact in float64)
            inv = math.ldexp(1.0, -ex[i])
            for n in range(N):
                slot[n] = np.uint8(np.int64(math.floor(np.float64(x[n]) * inv)) & MASK)
            # counts, and the tokens under their bin's threshold as it was before this batch (a
            # superset of those that enter)
            for sl in range(N_FINE):
                fill[sl] = min(bins[i, sl, 0], S)
                thr[sl] = bins[i, sl, 1]
            m = 0
            for n in range(N):
                sl = slot[n]
                cnt[n & 1, sl] += 1
                under[m] = n
                m += hh[n] <= thr[sl]
            for sl in range(N_FINE):
                bins[i, sl, 0] += cnt[0, sl] + cnt[1, sl]
                cnt[0, sl] = 0
                cnt[1, sl] = 0
            # the reservoirs keep the S smallest hashes: offered bin by bin (their memory in order),
            # each bin's tokens in the given order (a stable counting sort of the list)
            if m:
                for u in range(m):
                    cnt[0, slot[under[u]]] += 1
                at = 0
                for sl in range(N_FINE):
                    c = cnt[0, sl]
                    cnt[0, sl] = at
                    at += c
                for u in range(m):
                    n = under[u]
                    sl = slot[n]
                    by_bin[cnt[0, sl]] = n
                    cnt[0, sl] += 1
                for sl in range(N_FINE):
                    cnt[0, sl] = 0
                for u in range(m):
                    n = by_bin[u]
                    sl = slot[n]
                    if hh[n] <= thr[sl]:
                        fill[sl] = _push(bins, rh, ra, rloc, i, sl, fill[sl], hh[n], x[n], loc[n])
                        thr[sl] = bins[i, sl, 1]
            # top candidates, then bottom ones (the top of the negated activations; exact)
            if tn[i] < K or n_top:
                _top_step(x, False, i, key, rr, pp, A, lo, hi, ex, bins, tn, tv, tk, tseq, tpos, tws, twl, twin, cv,
                          ck, cj, fv, fk, M, cb, ca, seq_idx, lengths)
            if bn[i] < K or n_bot:
                for n in range(N):
                    xneg[n] = -x[n]
                _top_step(xneg, True, i, key, rr, pp, A, lo, hi, ex, bins, bn, bv, bk, bseq, bpos, bws, bwl, bwin,
                          cv, ck, cj, fv, fk, M, cb, ca, seq_idx, lengths)
    return 0


# ---------------------------------------------------------------------------------- merge


@njit(cache=True, inline="always")
def _chan(i, na, nb, a_mean, a_m2, a_npos, b_mean, b_m2, b_npos):
    """Fold neuron i's moments of b (``nb`` tokens) into a's (``na``) (Chan et al.)."""
    if na == 0:
        a_mean[i] = b_mean[i]
        a_m2[i] = b_m2[i]
    elif nb > 0:
        delta = b_mean[i] - a_mean[i]
        a_mean[i] += delta * nb / (na + nb)
        a_m2[i] += b_m2[i] + delta * delta * (na * (nb / (na + nb)))
    a_npos[i] += b_npos[i]


@njit(cache=True)
def merge_moments(na, nb, a_mean, a_m2, a_npos, b_mean, b_m2, b_npos):
    """Only the moments of ``merge_layer`` (for a shard that updated a's other arrays in place)."""
    for i in range(a_mean.shape[0]):
        _chan(i, na, nb, a_mean, a_m2, a_npos, b_mean, b_m2, b_npos)


@njit(cache=True)
def merge_layer(na, nb, a_lo, a_hi, a_ex, a_mean, a_m2, a_npos, a_bins, a_rh, a_ra, a_rloc,
                a_tn, a_tv, a_tk, a_tseq, a_tpos, a_tws, a_twl, a_twin,
                a_bn, a_bv, a_bk, a_bseq, a_bpos, a_bws, a_bwl, a_bwin,
                b_lo, b_hi, b_ex, b_mean, b_m2, b_npos, b_bins, b_rh, b_ra, b_rloc,
                b_tn, b_tv, b_tk, b_tseq, b_tpos, b_tws, b_twl, b_twin,
                b_bn, b_bv, b_bk, b_bseq, b_bpos, b_bws, b_bwl, b_bwin):
    """Fold state b (``nb`` scored tokens, a later shard) into state a (``na``), exactly for
    counts, reservoirs and top lists. b's histogram arrays are re-binned in place."""
    d = a_lo.shape[0]
    S = a_rh.shape[2]
    K = a_tv.shape[1]
    for i in range(d):
        _chan(i, na, nb, a_mean, a_m2, a_npos, b_mean, b_m2, b_npos)
        # histogram and reservoirs: both on the bins of the union's range
        if b_lo[i] <= b_hi[i]:
            lo = min(a_lo[i], b_lo[i])
            hi = max(a_hi[i], b_hi[i])
            e = fit_exponent(lo, hi, max(a_ex[i], b_ex[i]))
            if a_lo[i] <= a_hi[i] and e != a_ex[i]:
                _regrid(i, a_ex[i], e, a_lo[i], a_bins, a_rh, a_ra, a_rloc)
            if e != b_ex[i]:
                _regrid(i, b_ex[i], e, b_lo[i], b_bins, b_rh, b_ra, b_rloc)
            a_ex[i] = e
            a_lo[i] = lo
            a_hi[i] = hi
            for sl in range(N_FINE):
                cb_ = b_bins[i, sl, 0]
                if cb_ == 0:
                    continue
                filled = min(a_bins[i, sl, 0], S)
                for j in range(min(cb_, S)):
                    filled = _push(a_bins, a_rh, a_ra, a_rloc, i, sl, filled, b_rh[i, sl, j], b_ra[i, sl, j],
                                   b_rloc[i, sl, j])
                a_bins[i, sl, 0] += cb_
        # top and bottom examples: the best K of the union (sequences never cross shards)
        _merge_top(i, a_tn, a_tv, a_tk, a_tseq, a_tpos, a_tws, a_twl, a_twin,
                   b_tn, b_tv, b_tk, b_tseq, b_tpos, b_tws, b_twl, b_twin)
        _merge_top(i, a_bn, a_bv, a_bk, a_bseq, a_bpos, a_bws, a_bwl, a_bwin,
                   b_bn, b_bv, b_bk, b_bseq, b_bpos, b_bws, b_bwl, b_bwin)


@njit(cache=True)
def _merge_top(i, a_tn, a_tv, a_tk, a_tseq, a_tpos, a_tws, a_twl, a_twin,
               b_tn, b_tv, b_tk, b_tseq, b_tpos, b_tws, b_twl, b_twin):
    """Neuron ``i``'s list of b into a's: the best K of the union."""
    K = a_tv.shape[1]
    for j in range(b_tn[i]):
        v = b_tv[i, j]
        key = b_tk[i, j]
        if a_tn[i] == K and not _precedes(v, key, a_tv[i, K - 1], a_tk[i, K - 1]):
            break
        r = _insert_top(i, v, key, b_tseq[i, j], b_tpos[i, j], b_tws[i, j], b_twl[i, j], a_tn, a_tv, a_tk, a_tseq,
                        a_tpos, a_tws, a_twl, a_twin)
        a_twin[i, r, :] = b_twin[i, j, :]


# ---------------------------------------------------------------------------------- finish


@njit(cache=True)
def display_bins(k0, k1, n_bins):
    """Fine bins per shown bar, ``max(1, round(span / n_bins))`` (half up), and the number of
    bars, for the fine range k0..k1."""
    span = k1 - k0 + 1
    g = max(np.int64(1), (2 * span + n_bins) // (2 * n_bins))
    return g, (span + g - 1) // g


@njit(cache=True)
def finish_hist(lo, hi, ex, bins, rh, ra, rloc, n_bins):
    """Displayed histograms and spectrum samples of every neuron. Returns (per neuron) the first
    fine bin ``k0``, group size ``g``, displayed-bin offsets into ``counts``, the counts, and
    sample offsets with per sample: displayed bin, hash (signed order), activation, sequence,
    position (per bar ordered by activation, then hash)."""
    d = lo.shape[0]
    S = rh.shape[2]
    k0 = np.zeros(d, np.int64)
    gs = np.ones(d, np.int64)
    boff = np.zeros(d + 1, np.int64)
    for i in range(d):
        nd = 0
        if lo[i] <= hi[i]:
            k0[i] = _k(lo[i], ex[i])
            gs[i], nd = display_bins(k0[i], _k(hi[i], ex[i]), n_bins)
        boff[i + 1] = boff[i] + nd
    counts = np.zeros(boff[d], np.int64)
    soff = np.zeros(d + 1, np.int64)
    cap = boff[d] * S
    s_bin = np.empty(cap, np.int64)
    s_h = np.empty(cap, np.int64)
    s_a = np.empty(cap, np.float32)
    s_seq = np.empty(cap, np.int64)
    s_pos = np.empty(cap, np.int64)
    pick = np.empty(S, np.int64)  # sl * S + j of the bar's smallest hashes so far, ascending
    ph = np.empty(S, np.int64)
    m = 0
    for i in range(d):
        nd = boff[i + 1] - boff[i]
        g = gs[i]
        kmax = _k(hi[i], ex[i]) if nd else k0[i] - 1
        for b in range(nd):
            n = 0
            for k in range(k0[i] + b * g, min(k0[i] + (b + 1) * g, kmax + 1)):
                sl = k & MASK
                counts[boff[i] + b] += bins[i, sl, 0]
                for j in range(min(bins[i, sl, 0], S)):
                    h = rh[i, sl, j]
                    if n == S and h > ph[S - 1]:
                        continue
                    q = n if n < S else S - 1
                    while q > 0 and ph[q - 1] > h:
                        pick[q] = pick[q - 1]
                        ph[q] = ph[q - 1]
                        q -= 1
                    pick[q] = sl * S + j
                    ph[q] = h
                    n = min(n + 1, S)
            m0 = m
            for c in range(n):  # by activation (insertion), ties stay in hash order
                sl, j = pick[c] // S, pick[c] % S
                a = ra[i, sl, j]
                q = m
                while q > m0 and s_a[q - 1] > a:
                    s_h[q] = s_h[q - 1]
                    s_a[q] = s_a[q - 1]
                    s_seq[q] = s_seq[q - 1]
                    s_pos[q] = s_pos[q - 1]
                    q -= 1
                s_h[q] = ph[c]
                s_a[q] = a
                s_seq[q] = rloc[i, sl, j] >> LOC_BITS
                s_pos[q] = rloc[i, sl, j] & ((1 << LOC_BITS) - 1)
                s_bin[m] = b
                m += 1
        soff[i + 1] = m
    return k0, gs, boff, counts, soff, s_bin[:m], s_h[:m], s_a[:m], s_seq[:m], s_pos[:m]


@njit(cache=True)
def top_tokens(tsum, tcount, min_count, n_top):
    """Per neuron the ``n_top`` tracked rows with the highest mean (``tsum [tracked, d] / tcount``,
    ``tsum`` in units of 2^-TSUM_FRAC_BITS;
    rows seen at least ``min_count`` times), ties to the smaller row (rows are in token-id order)."""
    n_tok, d = tsum.shape
    ids = np.full((d, n_top), -1, np.int64)
    means = np.zeros((d, n_top), np.float64)
    if n_top == 0:  # nothing asked (the insertion below would index column -1 of an empty array)
        return ids, means
    ok = np.zeros(n_tok, np.bool_)
    for t in range(n_tok):
        ok[t] = tcount[t] >= min_count and tcount[t] > 0
    for i in range(d):
        k = 0
        for t in range(n_tok):
            if not ok[t]:
                continue
            mt = np.float64(tsum[t, i]) / TSUM_SCALE / tcount[t]
            if k == n_top and not mt > means[i, n_top - 1]:
                continue
            p = k if k < n_top else n_top - 1
            while p > 0 and mt > means[i, p - 1]:
                if p < n_top:
                    means[i, p] = means[i, p - 1]
                    ids[i, p] = ids[i, p - 1]
                p -= 1
            means[i, p] = mt
            ids[i, p] = t
            if k < n_top:
                k += 1
    return ids, means


@njit(cache=True)
def contexts(useq, flat, base, lens, seq, pos, before, after):
    """Context windows of samples: sequence ``useq[u]`` is ``flat[base[u] : base[u] + lens[u]]``
    (``useq`` sorted). Returns per sample the token's index in its window, the window's length,
    and the windows (-1 padded)."""
    n = pos.shape[0]
    width = before + after + 1
    at = np.empty(n, np.int16)
    n_ctx = np.empty(n, np.int16)
    ctx = np.empty((n, width), np.int32)
    for m in range(n):
        u = np.searchsorted(useq, seq[m])
        st = max(0, pos[m] - before)
        en = min(lens[u], pos[m] + after + 1)
        at[m] = pos[m] - st
        n_ctx[m] = en - st
        for t in range(st, en):
            ctx[m, t - st] = flat[base[u] + t]
        for t in range(en - st, width):
            ctx[m, t] = -1
    return at, n_ctx, ctx


@njit(cache=True)
def select_top_all(off, cand_v, cand_k, cand_r, cand_p, cb, ca, tn, tv, tk, tseq, tpos, tws, twl, twin, seq_idx,
                   lengths):
    """``select_top`` for every neuron (neuron i's candidates are ``off[i]:off[i + 1]``) without
    copying windows. Returns the entries to fill: neuron, row in its list, batch row, window start
    and length."""
    d = off.shape[0] - 1
    K = tv.shape[1]
    out_i = np.empty(d * K, np.int64)
    out_j = np.empty(d * K, np.int64)
    out_r = np.empty(d * K, np.int64)
    m = 0
    dummy = np.zeros((1, 1, 1), np.float32)
    for i in range(d):
        a, b = off[i], off[i + 1]
        if a == b:
            continue
        filled, nk = select_top(i, cand_v[a:b], cand_k[a:b], cand_r[a:b], cand_p[a:b], b - a, cb, tn, tv, tk, tseq,
                                tpos, tws, twl, twin, seq_idx, lengths, ca, dummy, False)
        for f in range(nk):
            out_i[m] = i
            out_j[m] = filled[f]
            m += 1
    for q in range(m):
        out_r[q] = -1
        for r in range(seq_idx.shape[0]):
            if seq_idx[r] == tseq[out_i[q], out_j[q]]:
                out_r[q] = r
                break
    return out_i[:m], out_j[:m], out_r[:m]


# ---------------------------------------------------------------------------------- torch backend
# The same update in torch ops on the model's device: reductions there, only top-example
# candidates and the windows of new entries cross to the CPU (the top lists live there).

_DEVICE = ("lo", "hi", "ex", "mean", "m2", "npos", "bins", "rh", "ra", "rloc", "tsum")


def torch_from_numpy(state: dict, device) -> dict:
    """The histogram, moment and token-sum arrays of every layer as device tensors."""
    import torch

    return {layer: {name: torch.from_numpy(np.ascontiguousarray(getattr(st, name))).to(device) for name in _DEVICE}
            for layer, st in state.items()}


def torch_to_numpy(dev: dict, state: dict) -> None:
    for layer, t in dev.items():
        for name in _DEVICE:
            setattr(state[layer], name, t[name].cpu().numpy().copy())


def _t_fits(torch, lo, hi, e):
    s = torch.ldexp(torch.ones_like(lo, dtype=torch.float64), -e)
    kl = torch.floor(lo.double() * s)
    kh = torch.floor(hi.double() * s)
    return (kl >= -K_LIMIT) & (kl + (N_FINE - 1) <= K_LIMIT) & (kh - kl < N_FINE)


def _t_k(torch, x, e):
    return torch.floor(x.double() * torch.ldexp(torch.ones_like(e, dtype=torch.float64), -e)).long()


def _t_keep_smallest(torch, group, h, S):
    """Order entries by (group, hash) and keep the first S of each group: (order, rank)."""
    o = torch.argsort(h, stable=True)
    o = o[torch.argsort(group[o], stable=True)]
    g = group[o]
    n = g.numel()
    start = torch.ones(n, dtype=torch.bool, device=g.device)
    if n > 1:
        start[1:] = g[1:] != g[:-1]
    idx = torch.arange(n, device=g.device)
    first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
    rank = idx - first
    keep = rank < S
    return o[keep], rank[keep]


def _t_write_reservoirs(torch, rh, ra, rl, bins, groups, group, hh, aa, ll, S):
    """Reservoirs (flattened to [neuron * N_FINE + slot, S]) of ``groups`` := the S smallest
    hashes of the entries (``group``, ``hh``, ``aa``, ``ll``); thresholds from the counts."""
    o, rank = _t_keep_smallest(torch, group, hh, S)
    rh[groups] = EMPTY
    g = group[o]
    rh[g, rank] = hh[o]
    ra[g, rank] = aa[o]
    rl[g, rank] = ll[o]
    full = bins.view(-1, 2)[groups, 0] >= S
    bins.view(-1, 2)[groups, 1] = torch.where(full, rh[groups].max(1).values, EMPTY)


def _t_regrid(torch, t, idx, e_new, S):
    """Re-bin neurons ``idx`` (non-empty) to exponents ``e_new``."""
    if idx.numel() == 0:
        return
    dev = idx.device
    U = idx.numel()
    e_old = t["ex"][idx]
    kmin = _t_k(torch, t["lo"][idx], e_old)
    slots = torch.arange(N_FINE, device=dev)
    k = kmin[:, None] + ((slots[None, :] - kmin[:, None]) & MASK)
    d = (e_new - e_old)[:, None]
    kn = torch.where(d >= 63, torch.where(k >= 0, 0, -1), k >> torch.clamp(d, max=62))
    ns = kn & MASK
    cnt = t["bins"][idx, :, 0]
    bins = torch.zeros((U, N_FINE, 2), dtype=torch.int64, device=dev)
    bins[:, :, 0].scatter_add_(1, ns, cnt)
    valid = torch.arange(S, device=dev)[None, None, :] < torch.clamp(cnt, max=S)[:, :, None]
    u, sl, j = torch.nonzero(valid, as_tuple=True)
    rh = torch.full((U * N_FINE, S), EMPTY, dtype=torch.int64, device=dev)
    ra = torch.zeros((U * N_FINE, S), dtype=torch.float32, device=dev)
    rl = torch.zeros((U * N_FINE, S), dtype=torch.int64, device=dev)
    _t_write_reservoirs(torch, rh, ra, rl, bins, torch.arange(U * N_FINE, device=dev), u * N_FINE + ns[u, sl],
                        t["rh"][idx][u, sl, j], t["ra"][idx][u, sl, j], t["rloc"][idx][u, sl, j], S)
    t["bins"][idx] = bins
    t["rh"][idx] = rh.view(U, N_FINE, S)
    t["ra"][idx] = ra.view(U, N_FINE, S)
    t["rloc"][idx] = rl.view(U, N_FINE, S)


def torch_update(t: dict, st: LayerState, x, r_np, p_np, key, hashes, loc, tt, seq_idx, lengths, n_before, M, cb, ca):
    """``update_block`` for a whole layer in torch ops: ``t`` the layer's device tensors, ``st``
    its numpy state (the top lists live there), ``x`` [batch, pos, d] on the device; the
    batch's scored tokens as for ``update_block``."""
    import torch

    dev = x.device
    B, T, d = x.shape
    S = st.rh.shape[2]
    n_b = len(r_np)
    X = x.reshape(B * T, d).index_select(0, torch.from_numpy(r_np * T + p_np).to(dev)).float()  # [N, d]
    if not bool(torch.isfinite(X).all()):
        raise ValueError("the model produced a non-finite neuron activation")
    keys = torch.from_numpy(key).to(dev)
    h = torch.from_numpy(hashes).to(dev)
    loc = torch.from_numpy(loc).to(dev)
    ts = torch.from_numpy(tt).to(dev)
    neuron = torch.arange(d, device=dev)

    # range: widen the bins of neurons whose new min..max no longer fits
    lo = torch.minimum(t["lo"], X.min(0).values)
    hi = torch.maximum(t["hi"], X.max(0).values)
    e = t["ex"].clone()
    while True:
        ok = _t_fits(torch, lo, hi, e)
        if bool(ok.all()):
            break
        e = torch.where(ok, e, e + 1)
    grew = torch.nonzero((e != t["ex"]) & (t["lo"] <= t["hi"])).flatten()
    _t_regrid(torch, t, grew, e[grew], S)
    t["ex"].copy_(e)
    t["lo"].copy_(lo)
    t["hi"].copy_(hi)

    # moments: shifted sums, then Chan's formula
    shift = t["mean"] if n_before > 0 else X[0].double()
    xd = X.double() - shift
    s1 = xd.sum(0)
    s2 = (xd * xd).sum(0)
    mb = shift + s1 / n_b
    m2b = s2 - s1 * s1 / n_b
    if n_before == 0:
        t["mean"].copy_(mb)
        t["m2"].copy_(m2b)
    else:
        n = n_before + n_b
        delta = mb - t["mean"]
        t["mean"].add_(delta * n_b / n)
        t["m2"].add_(m2b + delta * delta * (n_before * (n_b / n)))
    t["npos"].add_((X > 0).sum(0))

    # fine bins and reservoirs: the S smallest hashes of a bin's old entries and this batch's
    gid = neuron[None, :] * N_FINE + (_t_k(torch, X, t["ex"][None, :].expand_as(X)) & MASK)
    bins = t["bins"].view(-1, 2)
    old_cnt = bins[:, 0].clone()
    bins[:, 0] += torch.bincount(gid.flatten(), minlength=d * N_FINE)
    tok, nrn = torch.nonzero(h[:, None] <= bins[:, 1][gid], as_tuple=True)
    if tok.numel():
        g_new = gid[tok, nrn]
        groups = torch.unique(g_new)
        gi, j = torch.nonzero(torch.arange(S, device=dev)[None, :] < torch.clamp(old_cnt[groups], max=S)[:, None],
                              as_tuple=True)
        rh, ra, rl = t["rh"].view(-1, S), t["ra"].view(-1, S), t["rloc"].view(-1, S)
        old = groups[gi]
        _t_write_reservoirs(torch, rh, ra, rl, t["bins"], groups, torch.cat([old, g_new]),
                            torch.cat([rh[old, j], h[tok]]), torch.cat([ra[old, j], X[tok, nrn]]),
                            torch.cat([rl[old, j], loc[tok]]), S)

    # per-token sums
    tracked = ts >= 0
    t["tsum"].index_add_(0, ts[tracked], torch.round(X[tracked].double() * TSUM_SCALE).long())

    # top and bottom candidates (the bottom list is the top list of the negated activations)
    _t_top(torch, X, x, keys, st.top_arrays(), r_np, p_np, seq_idx, lengths, M, cb, ca)
    _t_top(torch, -X, x, keys, st.bottom_arrays(), r_np, p_np, seq_idx, lengths, M, cb, ca)


def _t_top(torch, X, x, keys, top, r_np, p_np, seq_idx, lengths, M, cb, ca):
    """Tokens of ``X`` [N, d] ahead of each neuron's K-th kept example (at most M per neuron) into
    the list ``top`` (numpy, on the CPU); windows of new entries from ``x`` [batch, pos, d]."""
    tn, tv, tk, tseq, tpos, tws, twl, twin = top
    dev = x.device
    B, T, d = x.shape
    K = tv.shape[1]
    full = torch.from_numpy(tn == K).to(dev)
    fv = torch.where(full, torch.from_numpy(tv[:, K - 1]).to(dev), -torch.inf)
    fk = torch.where(full, torch.from_numpy(tk[:, K - 1]).to(dev), NO_KEY)
    tok, nrn = torch.nonzero((X > fv) | ((X == fv) & (keys[:, None] < fk)), as_tuple=True)
    if tok.numel() == 0:
        return
    v = X[tok, nrn]
    kk = keys[tok]
    o = torch.argsort(kk, stable=True)
    o = o[torch.argsort(-v[o], stable=True)]
    o = o[torch.argsort(nrn[o], stable=True)]
    nrn, tok, v, kk = nrn[o], tok[o], v[o], kk[o]
    n_per = torch.bincount(nrn, minlength=d)
    keep = torch.arange(nrn.numel(), device=dev) - (torch.cumsum(n_per, 0) - n_per)[nrn] < M
    nrn, tok, v, kk = (a[keep].cpu().numpy() for a in (nrn, tok, v, kk))
    off = np.concatenate([[0], np.cumsum(np.bincount(nrn, minlength=d))]).astype(np.int64)
    ins_i, ins_j, ins_r = select_top_all(off, v.astype(np.float64), kk, r_np[tok], p_np[tok].astype(np.int64), cb, ca,
                                         tn, tv, tk, tseq, tpos, tws, twl, twin, seq_idx, lengths)
    if len(ins_i):  # the windows of the new entries, from the device
        W = twin.shape[2]
        ws = tws[ins_i, ins_j].astype(np.int64)
        wl = twl[ins_i, ins_j].astype(np.int64)
        pos = np.minimum(ws[:, None] + np.arange(W)[None, :], T - 1)
        flat = (ins_r[:, None] * T + pos) * d + ins_i[:, None]
        win = x.reshape(-1)[torch.from_numpy(flat).to(dev)].float().cpu().numpy()
        win[np.arange(W)[None, :] >= wl[:, None]] = 0.0
        twin[ins_i, ins_j] = win
