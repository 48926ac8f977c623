"""What one rule match looks like to a page or `show`: plain frozen dataclasses built from match
arrays (a job result, a database row or a live prompt) - no torch, no database."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .templates import MAX_N, render_rule


@dataclass(frozen=True)
class RuleFit:
    rule: int
    template: str
    n: int
    distance: float
    rendered: str  # plain text, dropped tokens struck through (U+0336)
    html: str  # HTML with <del> for dropped tokens


@dataclass(frozen=True)
class TokenMatch:
    """One prediction: the model's distribution at ``pos - 1`` for the token at ``pos``."""

    pos: int
    token_id: int
    token: str
    context_ids: tuple[int, ...]  # oldest first, never including BOS
    context: tuple[str, ...]
    optimal: RuleFit | None
    support: int
    agreement: float
    model_correct: bool
    backoff_n: int
    backoff_agreement: float
    best_by_length: tuple[RuleFit | None, ...]  # n = 1..7
    model_top: tuple[tuple[int, str, float], ...]  # (token id, text, p)
    rule_top: tuple[tuple[int, str, float], ...]  # (token id, text, q)


def rule_fit(templates, rule: int, dist: float, context: tuple[str, ...]) -> RuleFit | None:
    if rule < 0 or not np.isfinite(dist):
        return None
    t = templates[rule]
    return RuleFit(int(rule), t, len(t), float(dist), render_rule(t, context), render_rule(t, context, html_out=True))


def token_matches(templates, ids, voc: list[str], pos, ctx_len, m, rows=None) -> list[TokenMatch]:
    """TokenMatch rows of one sequence ``ids`` from match arrays ``m`` (a Matches or anything with the
    same per-position arrays; ``rows``: which entries of m)."""
    rows = range(len(pos)) if rows is None else rows
    out = []
    for i in rows:
        p = int(pos[i])
        cl = int(ctx_len[i])
        cids = tuple(int(x) for x in ids[p - cl : p])
        cstr = tuple(voc[x] for x in cids)
        out.append(
            TokenMatch(
                pos=p, token_id=int(ids[p]), token=voc[int(ids[p])], context_ids=cids, context=cstr,
                optimal=rule_fit(templates, int(m.rule[i]), float(m.dist[i]), cstr),
                support=int(m.support[i]), agreement=float(m.agree[i]), model_correct=bool(m.model_correct[i]),
                backoff_n=int(m.backoff_n[i]), backoff_agreement=float(m.backoff_agree[i]),
                best_by_length=tuple(rule_fit(templates, int(m.best_rule[i, n]), float(m.best_dist[i, n]), cstr) for n in range(MAX_N)),
                model_top=tuple((int(t), voc[int(t)], float(q)) for t, q in zip(m.model_top_ids[i], m.model_top_p[i]) if t >= 0),
                rule_top=tuple((int(t), voc[int(t)], float(q)) for t, q in zip(m.rule_top_ids[i], m.rule_top_q[i]) if t >= 0),
            )
        )
    return out
