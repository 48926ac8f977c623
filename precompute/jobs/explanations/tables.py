"""Explanation rows, their writer, the reader of a neuron run's rows, and the queries behind the
neuron page's explanations, the overview's best explanation per neuron and the search."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Float, ForeignKey, Index, Integer, String, insert, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from ...store.base import Base, from_blob
from ...store.queries import NotFound, RunInfo, get_model, latest_run, list_runs
from ..neurons.tables import SAMPLE_DTYPE, NeuronStatsRow
from .job import NeuronData


class ExplanationRow(Base):
    __tablename__ = "neuron_explanations"
    __table_args__ = (Index("ix_neuron_explanations_lookup", "run_id", "layer", "neuron"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    layer: Mapped[int] = mapped_column(Integer)
    neuron: Mapped[int] = mapped_column(Integer)  # the unit's index: neuron, or feature of ``sae_id``
    sae_id: Mapped[int | None] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), nullable=True, default=None)
    rank: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(2100))
    mode: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(String(2100))
    score: Mapped[float] = mapped_column(Float)  # F1
    recall: Mapped[float] = mapped_column(Float)  # the page's explained share
    precision: Mapped[float] = mapped_column(Float)
    n_top: Mapped[int] = mapped_column(Integer)


def write_explanations(s: Session, run_id: int, result) -> None:
    rows = [dict(run_id=run_id, layer=e.layer, neuron=e.neuron, sae_id=result.sae_id, rank=e.rank, kind=e.kind, label=e.label, mode=e.mode,
                 text=e.text, score=e.score, recall=e.recall, precision=e.precision, n_top=e.n_top)
            for e in result.explanations]
    for i in range(0, len(rows), 5000):
        s.execute(insert(ExplanationRow), rows[i : i + 5000])


def read_neurons(s: Session, run_id: int) -> list[NeuronData]:
    """Every neuron of a neuron run, as the explanation job reads it."""
    q = select(NeuronStatsRow.layer, NeuronStatsRow.neuron, NeuronStatsRow.hist, NeuronStatsRow.hist_edges,
               NeuronStatsRow.spectrum, NeuronStatsRow.top_tokens, NeuronStatsRow.logit_top
               ).where(NeuronStatsRow.run_id == run_id).order_by(NeuronStatsRow.layer, NeuronStatsRow.neuron)
    return [NeuronData(l, n, from_blob(e, np.float64), from_blob(h, np.int64), from_blob(sp, SAMPLE_DTYPE), tt or [], lt or [])
            for l, n, h, e, sp, tt, lt in s.execute(q)]


# ---------------------------------------------------------------------------------------------
# queries


@dataclass(frozen=True)
class ExplanationView:
    layer: int
    neuron: int
    rank: int
    kind: str
    label: str
    mode: str
    text: str
    score: float
    recall: float
    precision: float
    n_top: int
    top_pct: int  # the "top %" it was scored with
    unit: str = "neuron"  # or "feature" (``neuron`` is then the feature's index)


EXPLANATION_JOBS = ("explanations", "feature-explanations")  # of a neuron run, of a feature run


def explanations_run(s: Session, model: str, neurons_run: int | None = None) -> RunInfo | None:
    """The newest complete explanation run made from ``neurons_run`` (a neuron or a feature run;
    default: the newest neuron run of ``model``); None when there is none."""
    if neurons_run is None:
        neurons_run = latest_run(s, model, "neurons").id
    runs = [r for job in EXPLANATION_JOBS for r in list_runs(s, model, job)]
    for r in sorted(runs, key=lambda r: -r.id):
        if r.params.get("source_run") == neurons_run:
            return r
    return None


def _view(r: ExplanationRow, top_pct: int) -> ExplanationView:
    return ExplanationView(r.layer, r.neuron, r.rank, r.kind, r.label, r.mode, r.text, r.score, r.recall, r.precision,
                           r.n_top, top_pct, "neuron" if r.sae_id is None else "feature")


def neuron_explanations(s: Session, model: str, layer: int, neuron: int, neurons_run: int | None = None) -> list[ExplanationView]:
    """A neuron's stored explanations, best first ([] when no explanation run covers its neuron run)."""
    run = explanations_run(s, model, neurons_run)
    if run is None:
        return []
    rows = s.scalars(select(ExplanationRow).where(
        ExplanationRow.run_id == run.id, ExplanationRow.layer == int(layer), ExplanationRow.neuron == int(neuron)
    ).order_by(ExplanationRow.rank)).all()
    return [_view(r, run.params.get("top_pct", 20)) for r in rows]


def best_explanations(s: Session, model: str, neurons_run: int | None = None) -> dict[tuple[int, int], ExplanationView]:
    """(layer, neuron) -> its best explanation, for the overview."""
    run = explanations_run(s, model, neurons_run)
    if run is None:
        return {}
    rows = s.scalars(select(ExplanationRow).where(ExplanationRow.run_id == run.id, ExplanationRow.rank == 0)).all()
    return {(r.layer, r.neuron): _view(r, run.params.get("top_pct", 20)) for r in rows}


def search_explanations(s: Session, model: str, words: str, limit: int = 50, neurons_run: int | None = None) -> list[ExplanationView]:
    """Explanations whose label contains every word of ``words`` (case ignored), best score first;
    a neuron appears once (its best matching explanation)."""
    want = [w for w in words.lower().split() if w]
    run = explanations_run(s, model, neurons_run)
    if run is None or not want:
        return []
    best: dict[tuple[int, int], ExplanationRow] = {}
    for r in s.scalars(select(ExplanationRow).where(ExplanationRow.run_id == run.id)):
        label = r.label.lower()
        if all(w in label for w in want):
            k = (r.layer, r.neuron)
            if k not in best or r.score > best[k].score:
                best[k] = r
    rows = sorted(best.values(), key=lambda r: (-r.score, r.layer, r.neuron))[:limit]
    return [_view(r, run.params.get("top_pct", 20)) for r in rows]


@dataclass(frozen=True)
class UnitScores:
    """Neurons vs SAE features of one layer, by the best stored explanation's F1 of each unit (0
    when no candidate scored above 0). Units that never fire above 0 (dead) are left out and
    counted: they have no top range to explain."""

    layer: int
    neurons_run: int
    features_run: int
    sae_run: int
    neurons: tuple[float, ...]
    features: tuple[float, ...]
    dead_neurons: int
    dead_features: int

    @staticmethod
    def _median(x) -> float | None:
        return float(np.median(x)) if len(x) else None

    @property
    def median_neurons(self) -> float | None:
        return self._median(self.neurons)

    @property
    def median_features(self) -> float | None:
        return self._median(self.features)


def unit_scores(s: Session, model: str, layer: int) -> UnitScores | None:
    """The neurons-vs-features comparison of ``layer``: from the newest neuron run and the newest
    feature run of the layer's SAE, each with its explanation run; None when any is missing."""
    from ..neurons.tables import feature_runs

    frun = feature_runs(s, model).get(int(layer))
    runs = list_runs(s, model, "neurons")
    if frun is None or not runs:
        return None
    nrun = runs[0]
    out = {}
    for unit, run in (("neurons", nrun), ("features", frun)):
        erun = explanations_run(s, model, run.id)
        if erun is None:
            return None
        best = dict(s.execute(select(ExplanationRow.neuron, ExplanationRow.score).where(
            ExplanationRow.run_id == erun.id, ExplanationRow.layer == int(layer), ExplanationRow.rank == 0)).all())
        maxes = s.execute(select(NeuronStatsRow.neuron, NeuronStatsRow.max).where(
            NeuronStatsRow.run_id == run.id, NeuronStatsRow.layer == int(layer)).order_by(NeuronStatsRow.neuron)).all()
        if not maxes:
            return None
        live = [n for n, mx in maxes if mx > 0]
        out[unit] = (tuple(float(best.get(n, 0.0)) for n in live), len(maxes) - len(live))
    return UnitScores(int(layer), nrun.id, frun.id, int(frun.params["sae"]["run"]), out["neurons"][0],
                      out["features"][0], out["neurons"][1], out["features"][1])


# ---------------------------------------------------------------------------------------------
# `precompute show explanations`


def _add_show(p) -> None:
    from ...store.db import DEFAULT_DB

    p.add_argument("--model", required=True)
    p.add_argument("--layer", type=int, default=None, help="with --neuron: one neuron's explanations")
    p.add_argument("--neuron", type=int, default=None)
    p.add_argument("--search", default=None, help="neurons whose explanation contains these words")
    p.add_argument("--db", default=DEFAULT_DB)


def _show(args, store) -> int:
    from ...output import print_json

    with store.session() as s:
        if args.search:
            print_json([e.__dict__ for e in search_explanations(s, args.model, args.search)])
        elif args.layer is not None and args.neuron is not None:
            info = get_model(s, args.model)
            if not 0 <= args.layer < info.n_layers or not 0 <= args.neuron < info.d_mlp:
                raise NotFound(f"L{args.layer} N{args.neuron} is out of range for {info.name}")
            print_json([e.__dict__ for e in neuron_explanations(s, args.model, args.layer, args.neuron)])
        else:
            raise ValueError("give --layer and --neuron, or --search")
    return 0


SHOW_EXPLANATIONS = (_add_show, _show)
