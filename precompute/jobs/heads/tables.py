"""Attention-head tables, their writer and the queries behind the heads pages and `show head(s)`.

Definitions of every score are in ``precompute/jobs/heads.py``; ``SCORE_DEFINITIONS`` below
repeats them in one sentence each for the pages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Float, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint, insert, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from ...store.base import Base, from_blob, to_blob
from ...store.queries import NotFound, RunInfo, Token, get_model, latest_run, sequence_stories, sequence_tokens, vocab


class HeadStatsRow(Base):
    __tablename__ = "head_stats"
    __table_args__ = (UniqueConstraint("run_id", "layer", "head"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int] = mapped_column(Integer)
    head: Mapped[int] = mapped_column(Integer)
    prev_token: Mapped[float] = mapped_column(Float)
    first_token: Mapped[float] = mapped_column(Float)
    duplicate_token: Mapped[float | None] = mapped_column(Float, nullable=True)
    induction: Mapped[float] = mapped_column(Float)
    mean_distance: Mapped[float] = mapped_column(Float)
    entropy: Mapped[float] = mapped_column(Float)
    distance_r2: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    profile: Mapped[bytes] = mapped_column(LargeBinary)  # float64 mean weight per distance d = 0..max
    profile_counts: Mapped[bytes] = mapped_column(LargeBinary)  # int64 queries that see each distance


class HeadExampleRow(Base):
    __tablename__ = "head_examples"
    __table_args__ = (Index("ix_head_examples_lookup", "run_id", "layer", "head"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    layer: Mapped[int] = mapped_column(Integer)
    head: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    seq_idx: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(Integer)  # the pattern covers tokens 0..n_tokens-1 of the sequence
    pattern: Mapped[bytes] = mapped_column(LargeBinary)  # float16 [n_tokens, n_tokens], query x key


def _f(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def write_heads(s: Session, run_id: int, result) -> None:
    """All rows of a heads-job result, in the caller's transaction."""
    stats, examples = [], []
    for L in result.layers:
        counts = to_blob(np.asarray(L.profile_counts, np.int64))
        for h in range(len(L.labels)):
            stats.append(
                dict(
                    run_id=run_id, layer=L.layer, head=h, prev_token=float(L.prev_token[h]),
                    first_token=float(L.first_token[h]), duplicate_token=_f(L.duplicate_token[h]),
                    induction=float(L.induction[h]), mean_distance=float(L.mean_distance[h]),
                    entropy=float(L.entropy[h]), distance_r2=float(L.distance_r2[h]), label=L.labels[h],
                    profile=to_blob(np.asarray(L.profile[h], np.float64)), profile_counts=counts,
                )
            )
            for rank, e in enumerate(L.examples[h]):
                examples.append(
                    dict(
                        run_id=run_id, layer=L.layer, head=h, rank=rank, seq_idx=int(e.seq_idx),
                        n_tokens=int(e.pattern.shape[0]), pattern=to_blob(np.asarray(e.pattern, np.float16)),
                    )
                )
    if stats:
        s.execute(insert(HeadStatsRow), stats)
    if examples:
        s.execute(insert(HeadExampleRow), examples)


# ---------------------------------------------------------------------------------------------
# queries

SCORE_DEFINITIONS: dict[str, str] = {
    "distance_r2": "Share of the variance of this head's attention weights (BOS key left out) explained by "
    "the distance q-k alone, i.e. by its mean profile: near 1 = distance head, near 0 = attends by content.",
    "prev_token": "Mean attention weight on the previous token (distance 1).",
    "first_token": "Mean attention weight on the first token of the sequence (the BOS token when prepended).",
    "duplicate_token": "For tokens that already occurred earlier in the sequence, the mean attention weight "
    "on those earlier copies.",
    "induction": "On random tokens repeated twice, the mean attention from each second-half token to the "
    "token right after its earlier copy.",
    "mean_distance": "Mean number of tokens back that the head looks (attention-weighted q-k).",
    "entropy": "Mean entropy of a query's attention distribution in nats (0 = one key only).",
}
SCORE_TITLES: dict[str, str] = {
    "distance_r2": "distance R²",
    "prev_token": "previous-token",
    "first_token": "first-token (BOS)",
    "duplicate_token": "duplicate-token",
    "induction": "induction",
    "mean_distance": "mean distance",
    "entropy": "entropy",
}
# a head is tagged with a role when the role's score is at least this (shown in the overview)
ROLE_THRESHOLDS: dict[str, float] = {
    "prev_token": 0.4,
    "induction": 0.3,
    "duplicate_token": 0.3,
    "first_token": 0.5,
}
ROLE_NAMES: dict[str, str] = {
    "prev_token": "previous-token",
    "induction": "induction",
    "duplicate_token": "duplicate-token",
    "first_token": "BOS sink",
}


@dataclass(frozen=True)
class HeadSummary:
    layer: int
    head: int
    label: str  # distance / mixed / semantic (from distance_r2)
    distance_r2: float
    prev_token: float
    first_token: float
    duplicate_token: float | None  # None when no token of the corpus repeats
    induction: float
    mean_distance: float
    entropy: float
    roles: tuple[str, ...]  # ROLE_NAMES of the scores at or above ROLE_THRESHOLDS


def roles_of(scores: dict) -> tuple[str, ...]:
    return tuple(ROLE_NAMES[k] for k, thr in ROLE_THRESHOLDS.items() if scores.get(k) is not None and scores[k] >= thr)


@dataclass(frozen=True)
class HeadsOverview:
    run: RunInfo
    n_layers: int
    n_heads: int
    heads: tuple[HeadSummary, ...]  # sorted by (layer, head)
    label_thresholds: dict
    induction_len: int


@dataclass(frozen=True)
class PatternExample:
    rank: int
    seq_idx: int
    story_id: int
    tokens: tuple[Token, ...]  # the first n tokens of the sequence as the model saw them (BOS first)
    pattern: tuple[tuple[float, ...], ...]  # [query][key], n x n, 0 above the diagonal


@dataclass(frozen=True)
class HeadPage:
    run: RunInfo
    n_layers: int
    n_heads: int
    summary: HeadSummary
    profile: tuple[float, ...]  # mean weight at distance d = 0..len-1
    profile_counts: tuple[int, ...]  # queries that see distance d
    examples: tuple[PatternExample, ...]
    label_thresholds: dict
    induction_len: int


def _summary(r: HeadStatsRow) -> HeadSummary:
    scores = dict(
        distance_r2=r.distance_r2, prev_token=r.prev_token, first_token=r.first_token,
        duplicate_token=r.duplicate_token, induction=r.induction, mean_distance=r.mean_distance, entropy=r.entropy,
    )
    return HeadSummary(layer=r.layer, head=r.head, label=r.label, roles=roles_of(scores), **scores)


def _thresholds() -> dict:
    from .job import LABEL_THRESHOLDS

    return dict(LABEL_THRESHOLDS)


def check_head_range(model, layer: int, head: int) -> None:
    """NotFound (one line) when ``layer``/``head`` are outside ``model`` (a ModelInfo)."""
    if not 0 <= layer < model.n_layers:
        raise NotFound(f"layer {layer} out of range: {model.name} has layers 0-{model.n_layers - 1}")
    if not 0 <= head < model.n_heads:
        raise NotFound(f"head {head} out of range: {model.name} has heads 0-{model.n_heads - 1} in each layer")


def heads_overview(s: Session, model: str, run_id: int | None = None) -> HeadsOverview:
    """Every head's scores and label, from the newest complete heads run of ``model``."""
    info = get_model(s, model)
    run = latest_run(s, model, "heads", run_id)
    rows = s.scalars(
        select(HeadStatsRow).where(HeadStatsRow.run_id == run.id).order_by(HeadStatsRow.layer, HeadStatsRow.head)
    ).all()
    return HeadsOverview(
        run=run, n_layers=info.n_layers, n_heads=info.n_heads, heads=tuple(_summary(r) for r in rows),
        label_thresholds=_thresholds(), induction_len=int(run.summary.get("induction_len", 0)),
    )


def head_page(s: Session, model: str, layer: int, head: int, run_id: int | None = None) -> HeadPage:
    """Everything the head page shows that comes from the cache."""
    layer, head = int(layer), int(head)
    info = get_model(s, model)
    check_head_range(info, layer, head)
    run = latest_run(s, model, "heads", run_id)
    row = s.scalar(
        select(HeadStatsRow).where(HeadStatsRow.run_id == run.id, HeadStatsRow.layer == layer, HeadStatsRow.head == head)
    )
    if row is None:
        raise NotFound(f"run {run.id} has no data for layer {layer} (it covered layers {run.params.get('layers')})")
    voc = vocab(s, model)
    special = set(info.special_ids)
    ex_rows = s.scalars(
        select(HeadExampleRow)
        .where(HeadExampleRow.run_id == run.id, HeadExampleRow.layer == layer, HeadExampleRow.head == head)
        .order_by(HeadExampleRow.rank)
    ).all()
    toks = sequence_tokens(s, run.id, {e.seq_idx for e in ex_rows})
    story = sequence_stories(s, run.id, [e.seq_idx for e in ex_rows])
    examples = []
    for e in ex_rows:
        n = e.n_tokens
        pat = from_blob(e.pattern, np.float16).astype(np.float32).reshape(n, n)
        ids = toks[e.seq_idx][:n]
        examples.append(
            PatternExample(
                rank=e.rank, seq_idx=e.seq_idx, story_id=int(story.get(e.seq_idx, -1)),
                tokens=tuple(Token(int(t), voc[int(t)] if 0 <= t < len(voc) else f"<{int(t)}>", int(t) in special) for t in ids),
                pattern=tuple(tuple(round(float(x), 5) for x in r) for r in pat),
            )
        )
    profile = from_blob(row.profile, np.float64)
    counts = from_blob(row.profile_counts, np.int64)
    return HeadPage(
        run=run, n_layers=info.n_layers, n_heads=info.n_heads, summary=_summary(row),
        profile=tuple(float(x) for x in profile), profile_counts=tuple(int(c) for c in counts),
        examples=tuple(examples), label_thresholds=_thresholds(),
        induction_len=int(run.summary.get("induction_len", 0)),
    )


# ---------------------------------------------------------------------------------------------
# `precompute show head | heads` (registered in cli.SHOWS)


def _add_common(p) -> None:
    from ...store.db import DEFAULT_DB

    p.add_argument("--model", required=True)
    p.add_argument("--run", type=int, default=None)
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--json", action="store_true", help="print JSON (the only format)")


def _add_show_head(p) -> None:
    _add_common(p)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--head", type=int, required=True)


def _show_head(args, store) -> int:
    from ...output import print_json

    with store.session() as s:
        print_json(head_page(s, args.model, args.layer, args.head, args.run))
    return 0


def _show_heads(args, store) -> int:
    from ...output import print_json

    with store.session() as s:
        print_json(heads_overview(s, args.model, args.run))
    return 0


SHOW_HEAD = (_add_show_head, _show_head)
SHOW_HEADS = (_add_common, _show_heads)
