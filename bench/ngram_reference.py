"""A straightforward n-gram rule matcher: dicts of Counters, one position at a time.

It shares nothing with precompute/ngrams/ but the template strings: queries, counting, distances,
ties and agreement are written out here again, plainly, so tests can use it as an independent
computation and bench/bench_rules.py as the baseline.

Definitions (see precompute/ngrams/templates.py): a template over the last n context tokens,
oldest first; '+' keep, '-' drop, '*' any token. The query is the tuple left after removing the
'-' positions, with None for '*'. Counts are taken over every position of every training story
whose story has at least len(query) tokens before it.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

TOL = 1e-9


def query_of(template: str, context) -> tuple:
    ctx = list(context)[-len(template):]
    return tuple(ctx[i] if c == "+" else None for i, c in enumerate(template) if c != "-")


def shape_of(template: str) -> tuple:
    """Which slots of the query are kept (True) or free (False)."""
    return tuple(c == "+" for c in template if c != "-")


class ReferenceIndex:
    def __init__(self, stories, templates):
        self.shapes = sorted({shape_of(t) for t in templates})
        self.table: dict[tuple, dict[tuple, Counter]] = {s: defaultdict(Counter) for s in self.shapes}
        for story in stories:
            story = [int(x) for x in story]
            for i in range(1, len(story)):
                for shape in self.shapes:
                    L = len(shape)
                    if i < L:
                        continue
                    window = story[i - L : i]
                    q = tuple(w if keep else None for w, keep in zip(window, shape))
                    self.table[shape][q][story[i]] += 1

    def counts(self, template: str, context) -> Counter:
        if len(context) < len(template):
            return Counter()
        return self.table[shape_of(template)].get(query_of(template, context), Counter())


def match_position(ref: ReferenceIndex, templates, p: np.ndarray, context, distance: str = "variational"):
    """(optimal rule index or -1, distance, support, agreement, best distance per length 1..7 (nan: none))."""
    p = np.asarray(p, dtype=np.float64)
    a = int(np.argmax(p))
    best = None
    per_len = [np.nan] * 7
    for r, t in enumerate(templates):
        c = ref.counts(t, context)
        if not c:
            continue
        total = sum(c.values())
        q = np.zeros_like(p)
        for tok, n in c.items():
            q[tok] = n / total
        d = 0.5 * np.abs(p - q).sum() if distance == "variational" else np.abs(p - q).max()
        L = len(t) - 1
        if np.isnan(per_len[L]) or d < per_len[L] - TOL:
            per_len[L] = d
        if best is None or d < best[1] - TOL:
            best = (r, d, total, c)
    if best is None:
        return -1, np.nan, 0, 0.0, per_len
    r, d, total, c = best
    top = max(c.values())
    argmax_set = [tok for tok, n in c.items() if n == top]
    agree = 1.0 / len(argmax_set) if a in argmax_set else 0.0
    return r, d, total, agree, per_len
