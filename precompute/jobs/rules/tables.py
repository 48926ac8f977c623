"""Rules tables (n-gram rule matches), their writer and the queries behind the rules pages and
`precompute show rules`.

One ``rules_runs`` row per run (rule set, distance, templates, aggregates), written at the end
(``write_rules``), and one ``rules_sequences`` row per sequence holding every predicted token's
match as a structured array, written as the sweep drains them (``write_rule_sequences``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from sqlalchemy import JSON, ForeignKey, Integer, LargeBinary, String, UniqueConstraint, delete, insert, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from ...ngrams.templates import MAX_N
from ...ngrams.views import TokenMatch, token_matches
from ...store.base import Base, from_blob, to_blob
from ...store.queries import NotFound, RunInfo, get_model, latest_run, sequence_tokens, vocab
from ...store.tables import SequenceRow


def token_dtype(k: int) -> np.dtype:
    return np.dtype([
        ("pos", "<i4"), ("ctx_len", "i1"), ("rule", "<i2"), ("dist", "<f4"), ("support", "<i4"), ("agree", "<f4"),
        ("model_correct", "u1"), ("backoff_n", "i1"), ("backoff_agree", "<f4"), ("backoff_correct", "<f4"),
        ("best_rule", "<i2", (MAX_N,)), ("best_dist", "<f4", (MAX_N,)), ("agree_upto", "<f4", (MAX_N,)),
        ("rule_top_ids", "<i4", (k,)), ("rule_top_q", "<f4", (k,)), ("model_top_ids", "<i4", (k,)), ("model_top_p", "<f4", (k,)),
    ])


class RulesRunRow(Base):
    __tablename__ = "rules_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), unique=True, index=True)
    rule_set: Mapped[str] = mapped_column(String(16))
    distance: Mapped[str] = mapped_column(String(16))
    ngram_corpus: Mapped[str] = mapped_column(String(1000))
    index_tokens: Mapped[int] = mapped_column(Integer)
    top_k: Mapped[int] = mapped_column(Integer)
    templates: Mapped[list] = mapped_column(JSON)
    aggregates: Mapped[dict] = mapped_column(JSON)


class RulesSequenceRow(Base):
    __tablename__ = "rules_sequences"
    __table_args__ = (UniqueConstraint("run_id", "seq_idx"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    seq_idx: Mapped[int] = mapped_column(Integer)
    n_defined: Mapped[int] = mapped_column(Integer)
    mean_dist: Mapped[float | None] = mapped_column(nullable=True)
    agreement: Mapped[float | None] = mapped_column(nullable=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # token_dtype(top_k) records, one per predicted token


def write_rule_sequences(s: Session, run_id: int, part) -> None:
    """One ``rules_sequences`` row per sequence of ``part`` (a drained ``RulesChunk``, or a result's
    undrained tokens), sorted by (sequence, position), in the caller's transaction."""
    if part is None or not len(part.seq):
        return
    m = part.matches
    dt = token_dtype(part.matches.rule_top_ids.shape[1])
    rec = np.zeros(len(m), dtype=dt)
    rec["pos"] = part.pos
    rec["ctx_len"] = part.ctx_len
    for f in dt.names:
        if f in ("pos", "ctx_len"):
            continue
        rec[f] = getattr(m, f)
    bounds = np.flatnonzero(np.diff(part.seq)) + 1
    rows = []
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(part.seq)]):
        chunk = rec[a:b]
        d = chunk["rule"] >= 0
        rows.append(dict(
            run_id=run_id, seq_idx=int(part.seq[a]), n_defined=int(d.sum()),
            mean_dist=float(chunk["dist"][d].mean()) if d.any() else None,
            agreement=float(chunk["agree"][d].mean()) if d.any() else None, data=to_blob(chunk),
        ))
    for i in range(0, len(rows), 2000):
        s.execute(insert(RulesSequenceRow), rows[i : i + 2000])


def discard_rule_sequences(s: Session, run_id: int, first_seq: int) -> None:
    """Drop the ``rules_sequences`` rows of sequences >= ``first_seq`` (a resumed sweep writes them again)."""
    s.execute(delete(RulesSequenceRow).where(RulesSequenceRow.run_id == run_id, RulesSequenceRow.seq_idx >= first_seq))


def write_rules(s: Session, run_id: int, result) -> None:
    """The run row of a rules-job result and its undrained sequences, in the caller's transaction."""
    s.add(RulesRunRow(
        run_id=run_id, rule_set=result.config.rule_set, distance=result.config.distance,
        ngram_corpus=result.config.ngram_corpus, index_tokens=int(result.index_tokens), top_k=result.config.top_k,
        templates=list(result.templates), aggregates=result.aggregates,
    ))
    write_rule_sequences(s, run_id, result)


# ---------------------------------------------------------------------------------------------
# queries


@dataclass(frozen=True)
class RuleCount:
    rule: int
    template: str
    count: int
    agreement: float


@dataclass(frozen=True)
class SequenceSummary:
    seq_idx: int
    story_id: int
    n_defined: int
    mean_dist: float | None
    agreement: float | None
    preview: str


@dataclass(frozen=True)
class RulesOverview:
    run: RunInfo
    rule_set: str
    distance: str
    ngram_corpus: str
    index_tokens: int
    n_rules: int
    n_predictions: int
    n_defined: int
    agreement: float | None  # top-1 agreement of the optimal rule with the model
    model_top1: float | None  # the model's top-1 accuracy on the same predictions
    backoff_agreement: float | None
    backoff_top1: float | None
    mean_distance: float | None
    agreement_vs_n: tuple[float | None, ...]  # N = 1..7: rule set restricted to lengths <= N
    best_distance_mean_by_length: tuple[float | None, ...]
    hist_edges: tuple[float, ...]
    hist_counts: tuple[int, ...]
    by_rule: tuple[RuleCount, ...]
    sequences: tuple[SequenceSummary, ...]
    split: str = "story"  # training text: whole stories or paragraphs (runs before the option: whole stories)
    split_source: str = "not recorded (runs before the option counted whole stories)"


@dataclass(frozen=True)
class StoryToken:
    pos: int
    id: int
    text: str
    special: bool


@dataclass(frozen=True)
class RulesStory:
    run: RunInfo
    rule_set: str
    distance: str
    seq_idx: int
    story_id: int
    n_sequences: int
    tokens: tuple[StoryToken, ...]  # every token the model saw (BOS first when prepended)
    matches: tuple[TokenMatch, ...]  # one per predicted token (pos >= 1), in position order

    def match_at(self, pos: int) -> TokenMatch | None:
        for m in self.matches:
            if m.pos == pos:
                return m
        return None


def _rules_run(s: Session, run: RunInfo) -> RulesRunRow:
    row = s.scalar(select(RulesRunRow).where(RulesRunRow.run_id == run.id))
    if row is None:
        raise NotFound(f"run {run.id} has no rule matches")
    return row


def rules_overview(s: Session, model: str, run_id: int | None = None, max_sequences: int = 500) -> RulesOverview:
    """Aggregates of the newest complete rules run of ``model`` (or ``run_id``)."""
    run = latest_run(s, model, "rules", run_id)
    row = _rules_run(s, run)
    a = row.aggregates
    voc = vocab(s, model)
    seqs = s.execute(
        select(RulesSequenceRow.seq_idx, RulesSequenceRow.n_defined, RulesSequenceRow.mean_dist, RulesSequenceRow.agreement,
               SequenceRow.story_id, SequenceRow.token_ids)
        .join(SequenceRow, (SequenceRow.run_id == RulesSequenceRow.run_id) & (SequenceRow.seq_idx == RulesSequenceRow.seq_idx))
        .where(RulesSequenceRow.run_id == run.id).order_by(RulesSequenceRow.seq_idx).limit(max_sequences)
    ).all()
    summaries = tuple(
        SequenceSummary(int(k), int(sid), int(nd), md, ag, "".join(voc[t] for t in from_blob(blob, np.int32)[:16]).strip())
        for k, nd, md, ag, sid, blob in seqs
    )
    return RulesOverview(
        run=run, rule_set=row.rule_set, distance=row.distance, ngram_corpus=row.ngram_corpus, index_tokens=row.index_tokens,
        n_rules=len(row.templates), n_predictions=a["n_predictions"], n_defined=a["n_defined"], agreement=a["agreement"],
        model_top1=a["model_top1"], backoff_agreement=a["backoff_agreement"], backoff_top1=a["backoff_top1"],
        mean_distance=a["mean_distance"], agreement_vs_n=tuple(a["agreement_vs_n"]),
        best_distance_mean_by_length=tuple(a["best_distance_mean_by_length"]),
        hist_edges=tuple(a["dist_hist"]["edges"]), hist_counts=tuple(a["dist_hist"]["counts"]),
        by_rule=tuple(RuleCount(x["rule"], x["template"], x["count"], x["agreement"]) for x in a["by_rule"]),
        sequences=summaries, split=a.get("split", "story"),
        split_source=a.get("split_source", "not recorded (runs before the option counted whole stories)"),
    )


def rules_story(s: Session, model: str, seq_idx: int, run_id: int | None = None) -> RulesStory:
    """Every predicted token of one sequence with its optimal rule, rule of each length and both
    distributions' top tokens."""
    run = latest_run(s, model, "rules", run_id)
    row = _rules_run(s, run)
    info = get_model(s, model)
    seq_idx = int(seq_idx)
    if not 0 <= seq_idx < run.n_sequences:
        raise NotFound(f"story {seq_idx} out of range: run {run.id} has stories 0-{run.n_sequences - 1}")
    blob = s.scalar(select(RulesSequenceRow.data).where(RulesSequenceRow.run_id == run.id, RulesSequenceRow.seq_idx == seq_idx))
    ids = sequence_tokens(s, run.id, [seq_idx]).get(seq_idx)
    if blob is None or ids is None:
        raise NotFound(f"story {seq_idx} has no rule matches in run {run.id}")
    story_id = s.scalar(select(SequenceRow.story_id).where(SequenceRow.run_id == run.id, SequenceRow.seq_idx == seq_idx))
    rec = from_blob(blob, token_dtype(row.top_k))
    voc = vocab(s, model)
    special = set(info.special_ids)
    arrs = SimpleNamespace(**{f: rec[f] for f in rec.dtype.names})
    arrs.dist = np.where(rec["rule"] >= 0, rec["dist"].astype(np.float64), np.nan)
    arrs.best_dist = np.where(rec["best_rule"] >= 0, rec["best_dist"].astype(np.float64), np.nan)
    arrs.model_correct = rec["model_correct"].astype(bool)
    matches = token_matches(tuple(row.templates), ids, voc, rec["pos"], rec["ctx_len"], arrs)
    tokens = tuple(StoryToken(i, int(t), voc[int(t)], int(t) in special) for i, t in enumerate(ids))
    return RulesStory(run, row.rule_set, row.distance, seq_idx, int(story_id or 0), run.n_sequences, tokens, tuple(matches))


# ---------------------------------------------------------------------------------------------
# `precompute show rules`


def _add_show_rules(p) -> None:
    from ...store.db import DEFAULT_DB

    p.add_argument("--model", required=True)
    p.add_argument("--story", type=int, default=None, help="one sequence's per-token matches instead of the overview")
    p.add_argument("--run", type=int, default=None)
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--json", action="store_true", help="print JSON (the only format)")


def _show_rules(args, store) -> int:
    from ...output import print_json

    with store.session() as s:
        if args.story is None:
            print_json(rules_overview(s, args.model, args.run))
        else:
            print_json(rules_story(s, args.model, args.story, args.run))
    return 0


SHOW_RULES = (_add_show_rules, _show_rules)
