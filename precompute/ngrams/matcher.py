"""Match model next-token distributions against n-gram rules, vectorised over positions.

For each position: the model's distribution ``p`` (over the whole vocabulary) and its context
(last <= 7 tokens, oldest first, never crossing a story start/BOS). Every rule of the set whose
query occurs in the training corpus (support > 0) gives ``q``; rules with support 0 are
undefined there and skipped. Distances:

- ``variational``: 0.5 * sum_t |p_t - q_t| (computed as sum over q's support of max(q_t - p_t, 0),
  equal when both sum to 1; ``p`` is renormalised in float64 first);
- ``linf``: max_t |p_t - q_t|.

The optimal rule is the defined rule with the smallest distance; ties (within 1e-9) go to the
earliest rule in the set's order. Top-1 agreement = 1/|A| when the model's argmax is in the
optimal rule's argmax set A, else 0. The stupid-backoff baseline is the longest suffix rule
(``+``*n) with support; it is chosen without looking at the model.

Pruning (exact). Only the smallest distance of each rule length matters (the optimal rule, the best
rule of each length and the optimum among lengths <= N all pick among distances within TIE_TOL of
a per-length minimum). A rule whose query has many distinct next tokens ("long" segments: most of
the work in R_all, e.g. ``+******``) is therefore first *bounded*, and its distance is only
computed when the bound says it may be within TIE_TOL of the best of its length. With ``A`` the
model's top-j tokens (looked up in the segment one per round, j = 1..BOUND_TOKENS):

- variational: ``d = sum_t (p_t - q_t)+`` (same value as ``sum_t (q_t - p_t)+``, both sum to 1), so
  ``lb = sum_{t in A} (p_t - q_t)+ <= d <= lb + p(not A) = ub`` (each term outside A is <= p_t);
- linf: ``lb = max_{t in A} |p_t - q_t| <= d <= max(lb, max_{t not in A} p_t, max_t q_t) = ub``.

Before any look-up a free lower bound uses only the segment's largest count: ``q_t <= q_max`` for
every t, so ``d >= max_j (p(top j) - j * q_max)`` (variational) and ``d >= p_top1 - q_max`` (linf).
Segments shorter than LONG_SEGMENT are cheap enough to compute exactly right away; their exact
distances are the first ``best`` values.

A rule is dropped (distance left at +inf) when ``lb > best + TIE_TOL + PRUNE_MARGIN``, ``best``
being the smallest exact distance or upper bound of another rule of the same length at that
position. Then its true distance exceeds the length's minimum by more than TIE_TOL, so it can
be neither optimal nor tied with the optimum (for any length prefix either: a prefix minimum is
<= each length's minimum). PRUNE_MARGIN (1e-10, far above float64 rounding of sums of <= V terms
and far below any distance gap that matters) absorbs rounding, so every kept distance is computed
exactly as before and the results are bit-for-bit those of the unpruned computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from .index import NgramIndex, PatternTable, pack_keys
from .templates import MAX_N, pattern

Distance = Literal["variational", "linf"]
DISTANCES: dict[str, str] = {
    "variational": "variational distance 0.5·Σ|p−q|",
    "linf": "L∞ distance max|p−q|",
}
TIE_TOL = 1e-9
DENSE_FRACTION = 0.5  # segments with at least this fraction of the vocabulary are compared densely
LONG_SEGMENT = 32  # segments with at least this many distinct next tokens are bounded before computed
BOUND_TOKENS = 6  # at most this many of the model's top tokens are looked up for the bounds
PRUNE_MARGIN = 1e-10  # float rounding allowance of the pruning test (see the module doc)


@dataclass
class Matches:
    """Per position arrays (N positions). Rule ids index the rule set's template tuple; -1 = none."""

    templates: tuple[str, ...]
    rule: np.ndarray  # [N] int32 optimal rule
    dist: np.ndarray  # [N] float64 (nan: no rule defined)
    support: np.ndarray  # [N] int64 occurrences of the optimal rule's query
    agree: np.ndarray  # [N] float64 top-1 agreement (0 where no rule)
    best_rule: np.ndarray  # [N, 7] int32 best rule of each length n = 1..7
    best_dist: np.ndarray  # [N, 7] float64 (nan: no rule of that length defined)
    agree_upto: np.ndarray  # [N, 7] float64 agreement of the optimal rule among lengths <= N
    backoff_n: np.ndarray  # [N] int8 length of the longest suffix with support (0: none)
    backoff_agree: np.ndarray  # [N] float64 top-1 agreement of the backoff rule with the model
    backoff_correct: np.ndarray  # [N] float64 1/|A| when the true next token is in the backoff argmax set
    model_argmax: np.ndarray  # [N] int64
    model_correct: np.ndarray  # [N] bool (False where no target)
    rule_top_ids: np.ndarray  # [N, k] int32 optimal rule's most likely next tokens (-1 pad)
    rule_top_q: np.ndarray  # [N, k] float32
    model_top_ids: np.ndarray  # [N, k] int32
    model_top_p: np.ndarray  # [N, k] float32

    @property
    def defined(self) -> np.ndarray:
        return self.rule >= 0

    def __len__(self) -> int:
        return len(self.rule)


def contexts_of(ids: np.ndarray, bos_id: int | None, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Contexts of predicting each position ``t`` of one sequence: ``[len, 7]`` token ids,
    oldest first and right-aligned (-1 pad), and their lengths. Tokens before ``first`` and any
    BOS token are never part of a context (a BOS inside the sequence starts a new story)."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    # index of the first token a context may use, for each t
    start = np.full(n, first, dtype=np.int64)
    if bos_id is not None:
        is_bos = ids == bos_id
        last_bos = np.maximum.accumulate(np.where(is_bos, np.arange(n), -1))
        # context of t covers t-1 back to the token after the last BOS before t
        prev = np.concatenate([[-1], last_bos[:-1]])
        start = np.maximum(start, prev + 1)
    t = np.arange(n)
    clen = np.clip(t - start, 0, MAX_N)
    ctx = np.full((n, MAX_N), -1, dtype=np.int64)
    for j in range(1, MAX_N + 1):  # j tokens back -> column 7-j
        ok = clen >= j
        ctx[ok, MAX_N - j] = ids[t[ok] - j]
    return ctx, clen


def _expand(tab: PatternTable, seg: np.ndarray):
    """Entries of segments ``seg``: (pair index per entry, entry index, segment lengths)."""
    lo = tab.starts[seg]
    lens = tab.starts[seg + 1] - lo
    tot = int(lens.sum())
    pair = np.repeat(np.arange(len(seg)), lens)
    ent = np.arange(tot) + np.repeat(lo - (np.cumsum(lens) - lens), lens)
    return pair, ent, lens


def _distances(tab: PatternTable, seg: np.ndarray, rows: np.ndarray, P: np.ndarray, kind: Distance,
               top_tok: np.ndarray) -> np.ndarray:
    V = P.shape[1]
    out = np.empty(len(seg), dtype=np.float64)
    lens = tab.starts[seg + 1] - tab.starts[seg]
    dense = lens >= max(16, int(V * DENSE_FRACTION))
    sp = np.nonzero(~dense)[0]
    if len(sp):
        s, rr = seg[sp], rows[sp]
        pair, ent, lens = _expand(tab, s)
        q = tab.count[ent] / np.repeat(tab.support[s], lens)
        p = P.ravel()[np.repeat(rr * V, lens) + tab.next[ent]]
        if kind == "variational":
            out[sp] = np.bincount(pair, weights=np.maximum(q - p, 0.0), minlength=len(s))
        else:
            first = np.cumsum(tab.starts[s + 1] - tab.starts[s]) - (tab.starts[s + 1] - tab.starts[s])
            inside = np.maximum.reduceat(np.abs(q - p), first)
            outside = np.full(len(s), np.nan)
            todo = np.ones(len(s), dtype=bool)
            for j in range(top_tok.shape[1]):
                tj = top_tok[rr, j]
                in_s = np.bincount(pair, weights=(tab.next[ent] == tj[pair]), minlength=len(s)) > 0
                hit = todo & ~in_s
                outside[hit] = P[rr[hit], tj[hit]]
                todo &= in_s
                if not todo.any():
                    break
            for i in np.nonzero(todo)[0]:  # support covers all top tokens: exact dense fallback
                mask = np.ones(V, dtype=bool)
                a, b = tab.starts[s[i]], tab.starts[s[i] + 1]
                mask[tab.next[a:b]] = False
                outside[i] = P[rr[i], mask].max() if mask.any() else 0.0
            out[sp] = np.maximum(inside, outside)
    dn = np.nonzero(dense)[0]
    step = max(1, (1 << 22) // V)
    for c0 in range(0, len(dn), step):
        idx = dn[c0 : c0 + step]
        s, rr = seg[idx], rows[idx]
        pair, ent, _ = _expand(tab, s)
        Q = np.zeros((len(idx), V), dtype=np.float64)
        Q[pair, tab.next[ent]] = tab.count[ent] / tab.support[s][pair]
        diff = Q - P[rr]
        out[idx] = np.maximum(diff, 0.0).sum(1) if kind == "variational" else np.abs(diff).max(1)
    return out


class _LongPairs:
    """(position, rule) pairs of one table whose segments are long, while they are being bounded."""

    def __init__(self, tab: PatternTable, rows: np.ndarray, rcol: np.ndarray, seg: np.ndarray, length: np.ndarray):
        self.tab, self.rows, self.rcol, self.seg, self.length = tab, rows, rcol, seg, length
        self.alive = np.arange(len(seg))  # pairs not pruned yet
        self.lb = np.zeros(len(seg))  # lower bound from the tokens looked up so far
        self.lb_free = np.zeros(len(seg))  # lower bound from q's max alone
        self.qmax = np.zeros(len(seg))

    def prune(self, best: np.ndarray, tol: float) -> None:
        a = self.alive
        lb = np.maximum(self.lb[a], self.lb_free[a])
        self.alive = a[lb <= best[self.rows[a], self.length[a]] + tol]


def _first_within(D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the first column within TIE_TOL of the row minimum, and that minimum (inf: none)."""
    if D.shape[1] == 0:
        return np.full(D.shape[0], -1), np.full(D.shape[0], np.inf)
    dmin = D.min(1)
    col = np.argmax(D <= (dmin + TIE_TOL)[:, None], axis=1)
    col = np.where(np.isfinite(dmin), col, -1)
    return col, dmin


class Matcher:
    """Matches positions against one rule set on one index (tables built on first use)."""

    def __init__(self, index: NgramIndex, templates: Sequence[str], distance: Distance = "variational", top_k: int = 10):
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
        self.index = index
        self.templates = tuple(templates)
        self.distance = distance
        self.top_k = int(top_k)
        self.pats = [pattern(t) for t in self.templates]
        self.lengths = np.array([p.n for p in self.pats])
        if np.any(np.diff(self.lengths) < 0):
            raise ValueError("templates must be ordered by length")
        self.groups: dict[tuple[int, ...], list[int]] = {}
        for r, p in enumerate(self.pats):
            self.groups.setdefault(p.offsets, []).append(r)
        self.group_of = np.zeros(len(self.templates), dtype=np.int64)  # rule -> index into groups
        for g, rs in enumerate(self.groups.values()):
            self.group_of[rs] = g
        self.suffix = {n: self.templates.index("+" * n) for n in range(1, MAX_N + 1) if "+" * n in self.templates}
        index.prepare(self.templates)
        self.tables: list[PatternTable | None] = []  # per group: the table of the chunk being matched

    # ------------------------------------------------------------------------------------
    def match(self, probs: np.ndarray, ctx: np.ndarray, ctx_len: np.ndarray, targets: np.ndarray | None = None,
              chunk: int = 4096) -> Matches:
        """``probs`` [N, V] model distributions; ``ctx`` [N, 7] contexts (right-aligned, -1 pad);
        ``ctx_len`` [N]; ``targets`` [N] true next tokens (or None)."""
        N = len(probs)
        k = self.top_k
        R = len(self.templates)
        out = Matches(
            templates=self.templates,
            rule=np.full(N, -1, np.int32), dist=np.full(N, np.nan), support=np.zeros(N, np.int64),
            agree=np.zeros(N), best_rule=np.full((N, MAX_N), -1, np.int32), best_dist=np.full((N, MAX_N), np.nan),
            agree_upto=np.zeros((N, MAX_N)), backoff_n=np.zeros(N, np.int8), backoff_agree=np.zeros(N),
            backoff_correct=np.zeros(N), model_argmax=np.zeros(N, np.int64), model_correct=np.zeros(N, bool),
            rule_top_ids=np.full((N, k), -1, np.int32), rule_top_q=np.zeros((N, k), np.float32),
            model_top_ids=np.zeros((N, k), np.int32), model_top_p=np.zeros((N, k), np.float32),
        )
        cuts = [int(np.searchsorted(self.lengths, n, side="right")) for n in range(1, MAX_N + 1)]
        for c0 in range(0, N, chunk):
            sl = slice(c0, min(N, c0 + chunk))
            P = np.asarray(probs[sl], dtype=np.float64)
            P = P / P.sum(1, keepdims=True)
            C, V = P.shape
            cx = np.asarray(ctx[sl], dtype=np.int64)
            cl = np.asarray(ctx_len[sl], dtype=np.int64)
            kk = min(k, V)
            top = np.argpartition(-P, kk - 1, axis=1)[:, :kk]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(P, top, 1), axis=1, kind="stable"), 1)
            amax = P.argmax(1)
            top[:, 0] = np.where(np.take_along_axis(P, top[:, :1], 1)[:, 0] == P[np.arange(C), amax], top[:, 0], amax)
            ct = self.index.chunk_tables(self.templates, cx, cl)
            self.tables = [ct.tables.get(offsets) for offsets in self.groups]
            if ct.segments is None:
                parts = self._segments(cx, cl)
                SEG = np.full((C, R), -1, dtype=np.int64)
                for tab, rows, rcol, seg in parts:
                    SEG[rows, rcol] = seg
            else:  # the index found every query's segment itself
                SEG = ct.segments
                parts = self._parts(SEG)
            D = self._rule_distances(parts, P, top)
            opt, _ = _first_within(D)
            has = opt >= 0
            ar = np.arange(C)
            o = out
            o.model_argmax[sl] = amax
            o.model_top_ids[sl] = top[:, :k] if kk == k else np.pad(top, ((0, 0), (0, k - kk)), constant_values=-1)
            o.model_top_p[sl, :kk] = np.take_along_axis(P, top, 1)
            if targets is not None:
                o.model_correct[sl] = amax == np.asarray(targets[sl])
            o.rule[sl] = opt
            o.dist[sl] = np.where(has, D[ar, np.maximum(opt, 0)], np.nan)
            o.agree[sl] = self._agree(SEG, ar, opt, amax)
            o.support[sl] = self._support(SEG, ar, opt)
            for n in range(1, MAX_N + 1):
                lo = cuts[n - 2] if n > 1 else 0
                col, dmin = _first_within(D[:, lo : cuts[n - 1]])
                o.best_rule[sl, n - 1] = np.where(col >= 0, col + lo, -1)
                o.best_dist[sl, n - 1] = np.where(np.isfinite(dmin), dmin, np.nan)
                col_u, _ = _first_within(D[:, : cuts[n - 1]])
                o.agree_upto[sl, n - 1] = self._agree(SEG, ar, col_u, amax)
            # stupid backoff: longest suffix with support
            bn = np.zeros(C, dtype=np.int64)
            br = np.full(C, -1, dtype=np.int64)
            for n, r in self.suffix.items():
                ok = SEG[:, r] >= 0
                bn = np.where(ok, n, bn)
                br = np.where(ok, r, br)
            o.backoff_n[sl] = bn
            o.backoff_agree[sl] = self._agree(SEG, ar, br, amax)
            if targets is not None:
                o.backoff_correct[sl] = self._agree(SEG, ar, br, np.asarray(targets[sl], dtype=np.int64))
            ids, qs = self._top(SEG, ar, opt, k)
            o.rule_top_ids[sl] = ids
            o.rule_top_q[sl] = qs
        return out

    # ------------------------------------------------------------------------------------
    def _segments(self, cx: np.ndarray, cl: np.ndarray) -> list[tuple[PatternTable, np.ndarray, np.ndarray, np.ndarray]]:
        """Per pattern table: (table, positions, rules, segments) of every defined (position, rule)."""
        parts = []
        valid_n = [np.nonzero(cl >= n)[0] for n in range(MAX_N + 1)]  # positions with >= n context tokens
        cxt = np.ascontiguousarray(cx.T)  # [7, C]: context column j back = row MAX_N - j
        for tab, rs in zip(self.tables, self.groups.values()):
            if tab is None:  # no query of this pattern occurs in the training text
                continue
            rows_l, r_l, key_l = [], [], []
            for r in rs:
                p = self.pats[r]
                valid = valid_n[p.n]
                if not len(valid):
                    continue
                cols = [cxt[MAX_N - c][valid] for c in p.ctx_pos]
                rows_l.append(valid)
                r_l.append(np.full(len(valid), r))
                key_l.append(pack_keys(cols, self.index.bits))
            if not rows_l:
                continue
            rows = np.concatenate(rows_l)
            rcol = np.concatenate(r_l)
            seg = tab.find(np.concatenate(key_l))
            f = seg >= 0
            parts.append((tab, rows[f], rcol[f], seg[f]))
        return parts

    def _parts(self, SEG: np.ndarray) -> list[tuple[PatternTable, np.ndarray, np.ndarray, np.ndarray]]:
        """``_segments``' answer from segments the index found itself ([C, R], -1: undefined)."""
        parts = []
        for tab, rs in zip(self.tables, self.groups.values()):
            if tab is None:
                continue
            sub = SEG[:, rs]
            rows, j = np.nonzero(sub >= 0)
            parts.append((tab, rows, np.asarray(rs)[j], sub[rows, j]))
        return parts

    def _rule_distances(self, parts, P: np.ndarray, top: np.ndarray) -> np.ndarray:
        """[C, R] distances of the defined (position, rule) pairs; +inf where undefined or pruned
        (a pruned rule is provably farther than TIE_TOL from the best rule of its length; see the
        module doc)."""
        C, V = P.shape
        D = np.full((C, len(self.templates)), np.inf)
        long_parts = []
        for tab, rows, rcol, seg in parts:
            lens = tab.starts[seg + 1] - tab.starts[seg]
            is_long = lens >= LONG_SEGMENT
            sh = np.nonzero(~is_long)[0]
            if len(sh):
                D[rows[sh], rcol[sh]] = _distances(tab, seg[sh], rows[sh], P, self.distance, top)
            lg = np.nonzero(is_long)[0]
            if len(lg):
                long_parts.append(_LongPairs(tab, rows[lg], rcol[lg], seg[lg], self.lengths[rcol[lg]]))
        if not long_parts:
            return D
        # the model's top tokens, most likely first (one more than looked up: linf's bound needs it)
        K = min(BOUND_TOKENS, V - 1)
        btop = top[:, : K + 1] if top.shape[1] > K else np.argsort(-P, axis=1, kind="stable")[:, : K + 1]
        ptop = np.take_along_axis(P, btop, 1)
        cum = np.cumsum(ptop, axis=1)
        rest = np.maximum(1.0 - cum, 0.0)  # p outside the top j+1 tokens
        # best[c, n]: smallest exact distance or upper bound among rules of length n at position c
        best = np.full((C, MAX_N + 1), np.inf)
        for n in range(1, MAX_N + 1):
            cols = np.nonzero(self.lengths == n)[0]
            if len(cols):
                best[:, n] = D[:, cols[0] : cols[-1] + 1].min(1)
        tol = TIE_TOL + PRUNE_MARGIN
        for lp in long_parts:
            # free bound (no look-up): q_t <= q_max for every t
            lp.qmax = lp.tab.max_count[lp.seg] / lp.tab.support[lp.seg]
            if self.distance == "variational":  # sum_{t in A} (p_t - q_t) >= p(A) - |A| q_max
                lp.lb_free = np.maximum((cum[lp.rows, :K] - np.arange(1, K + 1) * lp.qmax[:, None]).max(1), 0.0)
            else:  # |p_t1 - q_t1| >= p_t1 - q_max
                lp.lb_free = np.maximum(ptop[lp.rows, 0] - lp.qmax, 0.0)
            lp.prune(best, tol)
        for j in range(K):  # look up q at the model's j-th token; tighten both bounds
            for lp in long_parts:
                a = lp.alive
                if not len(a):
                    continue
                r, sg = lp.rows[a], lp.seg[a]
                dj = ptop[r, j] - lp.tab.count_of(sg, btop[r, j]) / lp.tab.support[sg]
                if self.distance == "variational":
                    lp.lb[a] += np.maximum(dj, 0.0)
                    ub = lp.lb[a] + rest[r, j]
                else:
                    lp.lb[a] = np.maximum(lp.lb[a], np.abs(dj))
                    ub = np.maximum(lp.lb[a], np.maximum(ptop[r, j + 1], lp.qmax[a]))
                np.minimum.at(best, (r, lp.length[a]), ub)
            for lp in long_parts:
                lp.prune(best, tol)
        for lp in long_parts:
            a = lp.alive
            if len(a):
                D[lp.rows[a], lp.rcol[a]] = _distances(lp.tab, lp.seg[a], lp.rows[a], P, self.distance, top)
        return D

    def _by_table(self, SEG, rows, rule):
        """(table, positions into rows, segments) per pattern, for rows with rule >= 0."""
        sel = np.nonzero(rule >= 0)[0]
        grp = self.group_of[rule[sel]]
        order = np.argsort(grp, kind="stable")
        sel, grp = sel[order], grp[order]
        cuts = np.flatnonzero(np.diff(grp)) + 1
        for s_ in np.split(sel, cuts) if len(sel) else ():
            yield self.tables[self.group_of[rule[s_[0]]]], s_, SEG[rows[s_], rule[s_]]

    def _agree(self, SEG, rows, rule, tok) -> np.ndarray:
        out = np.zeros(len(rows))
        for tab, sel, seg in self._by_table(SEG, rows, rule):
            c = tab.count_of(seg, tok[sel])
            out[sel] = np.where(c == tab.max_count[seg], 1.0 / tab.n_argmax[seg], 0.0)
        return out

    def _support(self, SEG, rows, rule) -> np.ndarray:
        out = np.zeros(len(rows), dtype=np.int64)
        for tab, sel, seg in self._by_table(SEG, rows, rule):
            out[sel] = tab.support[seg]
        return out

    def _top(self, SEG, rows, rule, k):
        ids = np.full((len(rows), k), -1, dtype=np.int32)
        qs = np.zeros((len(rows), k), dtype=np.float32)
        for tab, sel, seg in self._by_table(SEG, rows, rule):
            pair, ent, lens = _expand(tab, seg)
            order = np.lexsort((tab.next[ent], -tab.count[ent], pair))
            pair, ent = pair[order], ent[order]
            first = np.cumsum(lens) - lens
            rank = np.arange(len(pair)) - first[pair]
            keep = rank < k
            ids[sel[pair[keep]], rank[keep]] = tab.next[ent[keep]]
            qs[sel[pair[keep]], rank[keep]] = tab.count[ent[keep]] / tab.support[seg[pair[keep]]]
        return ids, qs

    def rule_distribution(self, rule: int, context: Sequence[int]) -> tuple[int, dict[int, int]]:
        """Support and next-token counts of one rule on one context (oldest first)."""
        c = self.index.counts(self.templates[rule], context)
        return sum(c.values()), c
