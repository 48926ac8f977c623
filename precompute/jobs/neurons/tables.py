"""Neuron tables, their writer and the queries behind the neuron pages and `show neuron`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, LargeBinary, UniqueConstraint, insert, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from ...sae import tables as _sae_tables  # noqa: F401 - the ``saes`` table, which ``sae_id`` points to
from ...store.base import Base, from_blob, to_blob
from ...store.queries import (NotFound, RunInfo, Token, get_model, latest_run, list_runs, sequence_stories, sequence_tokens,
                               vocab)

# A spectrum sample: where in the corpus, the activation there, its histogram bar, its context
# (``ctx[:n_ctx]``: up to 12 tokens before and 3 after, clipped to the sequence, BOS included; the
# token itself is ``ctx[at]``), so a page needs no sequence to show it, and its sample hash (signed
# order): a bar's samples are its tokens with the smallest hashes, so the smallest hashes among
# several bars' samples are a uniform random sample of those bars together (``quantile_bands``).
CTX_WIDTH = 16
SAMPLE_DTYPE = np.dtype([("seq", "<i4"), ("pos", "<i4"), ("act", "<f4"), ("bin", "<i2"), ("at", "<i2"),
                         ("n_ctx", "<i2"), ("ctx", "<i4", (CTX_WIDTH,)), ("hash", "<i8")])
TOP, BOTTOM = 1, -1  # NeuronExampleRow.side
UNITS = {"neuron": "MLP neuron (hook_post)", "feature": "feature of a sparse autoencoder on a layer's hook_post"}


def _sae_column():
    """Which unit a row is about: NULL for an MLP neuron, else the ``saes`` row whose feature it is."""
    return mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), nullable=True, default=None)


class NeuronStatsRow(Base):
    __tablename__ = "neuron_stats"
    __table_args__ = (UniqueConstraint("run_id", "layer", "neuron"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int] = mapped_column(Integer, index=True)
    neuron: Mapped[int] = mapped_column(Integer)  # the unit's index: neuron, or feature of ``sae_id``
    sae_id: Mapped[int | None] = _sae_column()
    mean: Mapped[float] = mapped_column(Float)
    std: Mapped[float] = mapped_column(Float)
    max: Mapped[float] = mapped_column(Float)
    min: Mapped[float] = mapped_column(Float)
    frac_pos: Mapped[float] = mapped_column(Float)
    bos_act: Mapped[float | None] = mapped_column(Float, nullable=True)  # on BOS (never scored); NULL: no BOS
    hist: Mapped[bytes] = mapped_column(LargeBinary)  # int64 counts of the shown bars
    hist_edges: Mapped[bytes] = mapped_column(LargeBinary)  # float64 bar edges, one more than bars
    spectrum: Mapped[bytes] = mapped_column(LargeBinary)  # SAMPLE_DTYPE records
    top_tokens: Mapped[list] = mapped_column(JSON)  # [[token_id, mean_act, count], ...]
    logit_top: Mapped[list] = mapped_column(JSON)  # [[token_id, effect, corpus count (-1: unknown)], ...]
    logit_bottom: Mapped[list] = mapped_column(JSON)
    logit_top_seen: Mapped[list] = mapped_column(JSON)  # the same among tokens seen in the corpus
    logit_bottom_seen: Mapped[list] = mapped_column(JSON)


class NeuronExampleRow(Base):
    __tablename__ = "neuron_examples"
    __table_args__ = (Index("ix_neuron_examples_lookup", "run_id", "layer", "neuron"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    layer: Mapped[int] = mapped_column(Integer)
    neuron: Mapped[int] = mapped_column(Integer)
    sae_id: Mapped[int | None] = _sae_column()
    side: Mapped[int] = mapped_column(Integer)  # TOP (highest first) or BOTTOM (lowest first)
    rank: Mapped[int] = mapped_column(Integer)
    seq_idx: Mapped[int] = mapped_column(Integer)
    pos: Mapped[int] = mapped_column(Integer)
    act: Mapped[float] = mapped_column(Float)
    win_start: Mapped[int] = mapped_column(Integer)
    acts: Mapped[bytes] = mapped_column(LargeBinary)  # float32, one per window token


def _r(x: float, nd: int = 5) -> float:
    return float(round(float(x), nd))


NEURONS_AT_ONCE = 500  # neurons whose rows are built, then inserted (GPT-2 small: 36,864 neurons)
ROWS_PER_INSERT = 5000


def write_neurons(s: Session, run_id: int, result) -> None:
    """All rows of a neuron-job result, in the caller's transaction, inserted a few thousand neurons
    at a time (building every row first would hold a second copy of the result's samples)."""
    stats, examples = [], []

    def flush():
        for table, rows in ((NeuronStatsRow, stats), (NeuronExampleRow, examples)):
            for i in range(0, len(rows), ROWS_PER_INSERT):
                s.execute(insert(table), rows[i : i + ROWS_PER_INSERT])
            rows.clear()

    counts = result.token_counts
    sae_id = None if result.config.sae is None else result.config.sae.sae_id

    def effects(ids, values):
        return [[int(t), _r(v), int(counts[t]) if counts is not None and t < len(counts) else -1]
                for t, v in zip(ids, values) if t >= 0]

    for L in result.layers:
        for n in range(len(L.mean)):
            tt = [
                [int(t), _r(m), int(c)]
                for t, m, c in zip(L.top_tokens[n], L.top_token_means[n], L.top_token_counts[n])
                if t >= 0
            ]
            stats.append(
                dict(
                    run_id=run_id, layer=L.layer, neuron=n, sae_id=sae_id, mean=float(L.mean[n]), std=float(L.std[n]),
                    max=float(L.max[n]), min=float(L.min[n]), frac_pos=float(L.frac_pos[n]),
                    bos_act=None if np.isnan(L.bos[n]) else float(L.bos[n]),
                    hist=to_blob(L.hist[n].astype("<i8")), hist_edges=to_blob(L.hist_edges[n].astype("<f8")),
                    spectrum=to_blob(L.spectrum[n].astype(SAMPLE_DTYPE)), top_tokens=tt,
                    logit_top=effects(L.logit_top[n], L.logit_top_values[n]),
                    logit_bottom=effects(L.logit_bottom[n], L.logit_bottom_values[n]),
                    logit_top_seen=effects(L.logit_top_seen[n], L.logit_top_seen_values[n]),
                    logit_bottom_seen=effects(L.logit_bottom_seen[n], L.logit_bottom_seen_values[n]),
                )
            )
            for side, ex in ((TOP, L.examples), (BOTTOM, L.bottom)):
                for rank, e in enumerate(range(ex.offsets[n], ex.offsets[n + 1])):
                    examples.append(
                        dict(
                            run_id=run_id, layer=L.layer, neuron=n, sae_id=sae_id, side=side, rank=rank, seq_idx=int(ex.seq[e]),
                            pos=int(ex.pos[e]), act=float(ex.act[e]), win_start=int(ex.win_start[e]),
                            acts=to_blob(ex.win[e, : ex.win_len[e]].astype(np.float32)),
                        )
                    )
            if len(stats) >= NEURONS_AT_ONCE:
                flush()
    flush()


# ---------------------------------------------------------------------------------------------
# queries


@dataclass(frozen=True)
class ExampleView:
    rank: int
    seq_idx: int
    story_id: int
    pos: int  # position in the sequence the model saw (BOS is position 0 when prepended)
    act: float
    win_start: int
    tokens: tuple[Token, ...]
    acts: tuple[float, ...]

    @property
    def max_index(self) -> int:
        """Index into ``tokens`` of the example's own (max) token."""
        return self.pos - self.win_start


@dataclass(frozen=True)
class NeuronStats:
    layer: int
    neuron: int
    mean: float
    std: float
    max: float
    min: float
    frac_pos: float


@dataclass(frozen=True)
class Histogram:
    edges: tuple[float, ...]  # one more than counts: multiples of the fine bin width, covering min..max
    counts: tuple[int, ...]


@dataclass(frozen=True)
class SpectrumSample:
    seq_idx: int
    pos: int
    act: float
    bin: int  # the histogram bar it was sampled from
    token: Token
    context: str  # up to 12 tokens before and 3 after, the token itself in [[ ]]


@dataclass(frozen=True)
class TokenScore:
    token: Token
    value: float
    count: int = 0  # times seen in the corpus (-1: not known, the token was not tracked)


@dataclass(frozen=True)
class Band:
    """Examples from one interval of the positive activation range (SAEDashboard's quantile
    groups): whole histogram bars whose lower edge, clipped at 0, falls in the band's tenth of
    0..max; a uniform random sample of their tokens (the smallest sample hashes)."""

    lo: float  # lower edge of its first bar
    hi: float  # upper edge of its last bar
    count: int  # tokens in its bars
    samples: tuple[SpectrumSample, ...]  # highest first


N_BANDS, PER_BAND = 10, 5


@dataclass(frozen=True)
class NeuronPage:
    run: RunInfo
    stats: NeuronStats
    d_mlp: int
    n_layers: int
    examples: tuple[ExampleView, ...]
    histogram: Histogram
    spectrum: tuple[SpectrumSample, ...]
    top_tokens: tuple[TokenScore, ...]
    logit_top: tuple[TokenScore, ...]  # among all tokens of the unembedding
    logit_bottom: tuple[TokenScore, ...]
    bottom_examples: tuple[ExampleView, ...] = ()  # lowest first
    bands: tuple[Band, ...] = ()  # highest first
    bos_act: float | None = None  # the activation on BOS (never scored); None: no BOS
    logit_top_seen: tuple[TokenScore, ...] = ()  # among tokens seen in the corpus
    logit_bottom_seen: tuple[TokenScore, ...] = ()
    unit: str = "neuron"  # or "feature" (of the SAE in ``run.params["sae"]``)
    n_units: int = 0  # units of this layer: d_mlp, or the SAE's features

    @property
    def bos_above_max(self) -> bool:
        """Does the unscored BOS activation exceed every scored one?"""
        return self.bos_act is not None and self.bos_act > self.stats.max


@dataclass(frozen=True)
class NeuronSummary:
    layer: int
    neuron: int
    max: float
    mean: float
    std: float
    frac_pos: float
    top_tokens: tuple[str, ...]


def _token(tid: int, voc: list[str], special: set[int]) -> Token:
    tid = int(tid)
    text = voc[tid] if 0 <= tid < len(voc) else f"<{tid}>"
    return Token(tid, text, tid in special)


def feature_runs(s: Session, model: str) -> dict[int, RunInfo]:
    """Layer -> the newest complete feature run (job ``features``) of an SAE of that layer."""
    out: dict[int, RunInfo] = {}
    for r in list_runs(s, model, "features"):  # newest first
        out.setdefault(int((r.params.get("sae") or {}).get("layer", -1)), r)
    return out


def unit_run(s: Session, model: str, layer: int, unit: str = "neuron", run_id: int | None = None) -> RunInfo:
    """The run whose rows hold a layer's units: the newest neuron run, or the newest feature run of
    an SAE of that layer (or run ``run_id``, checked to match). One-line ``NotFound`` otherwise."""
    if unit not in UNITS:
        raise NotFound(f"unit {unit!r} is not one of {', '.join(UNITS)}")
    info = get_model(s, model)
    if not 0 <= int(layer) < info.n_layers:
        raise NotFound(f"layer {layer} out of range: {info.name} has layers 0-{info.n_layers - 1}")
    if unit == "neuron":
        return latest_run(s, model, "neurons", run_id)
    runs = [r for r in list_runs(s, model, "features") if (r.params.get("sae") or {}).get("layer") == int(layer)]
    for r in runs:
        if run_id is None or r.id == run_id:
            return r
    if run_id is not None:
        raise NotFound(f"run {run_id} is not a complete feature run of layer {layer} of {model!r}")
    raise NotFound(f"no SAE feature run for layer {layer} of {model!r}; train an SAE with `precompute train-sae "
                   f"--layer {layer} ...`, then `precompute run --jobs features --sae RUN`")


def n_units(run: RunInfo, info) -> int:
    """Units per layer of a run: the model's d_mlp, or its SAE's features."""
    sae = run.params.get("sae")
    return int(sae["n_features"]) if sae else int(info.d_mlp)


def _stats_row(s: Session, run: RunInfo, layer: int, neuron: int, model) -> NeuronStatsRow:
    if not 0 <= layer < model.n_layers:
        raise NotFound(f"layer {layer} out of range: {model.name} has layers 0-{model.n_layers - 1}")
    n = n_units(run, model)
    if run.params.get("sae") and not 0 <= neuron < n:
        raise NotFound(f"feature {neuron} out of range: the SAE of layer {layer} (run {run.params['sae']['run']}) "
                       f"has features 0-{n - 1}")
    if not 0 <= neuron < n:
        raise NotFound(f"neuron {neuron} out of range: layer {layer} has neurons 0-{n - 1}")
    row = s.scalar(
        select(NeuronStatsRow).where(
            NeuronStatsRow.run_id == run.id, NeuronStatsRow.layer == layer, NeuronStatsRow.neuron == neuron
        )
    )
    if row is None:
        raise NotFound(f"run {run.id} has no data for layer {layer} (it covered layers {run.params.get('layers')})")
    return row


def neuron_page(s: Session, model: str, layer: int, neuron: int, run_id: int | None = None,
                unit: str = "neuron") -> NeuronPage:
    """Everything the neuron page shows, from the newest complete neuron run of ``model`` (``unit``
    "feature": the newest feature run of the layer's SAE; ``neuron`` is then the feature's index)."""
    info = get_model(s, model)
    run = unit_run(s, model, int(layer), unit, run_id)
    row = _stats_row(s, run, int(layer), int(neuron), info)
    voc = vocab(s, model)
    special = set(info.special_ids)
    table = [Token(i, text, i in special) for i, text in enumerate(voc)]  # one Token per id, looked up below

    def tok_(t) -> Token:
        t = int(t)
        return table[t] if 0 <= t < len(table) else _token(t, voc, special)
    ex_rows = s.scalars(
        select(NeuronExampleRow)
        .where(NeuronExampleRow.run_id == run.id, NeuronExampleRow.layer == layer, NeuronExampleRow.neuron == neuron)
        .order_by(NeuronExampleRow.side.desc(), NeuronExampleRow.rank)
    ).all()
    samples = from_blob(row.spectrum, SAMPLE_DTYPE)
    toks = sequence_tokens(s, run.id, {e.seq_idx for e in ex_rows})
    story = sequence_stories(s, run.id, [e.seq_idx for e in ex_rows])
    examples = {TOP: [], BOTTOM: []}
    for e in ex_rows:
        acts = from_blob(e.acts, np.float32)
        ids = toks[e.seq_idx][e.win_start : e.win_start + len(acts)]
        examples[e.side].append(
            ExampleView(
                rank=e.rank, seq_idx=e.seq_idx, story_id=int(story.get(e.seq_idx, -1)), pos=e.pos, act=e.act,
                win_start=e.win_start, tokens=tuple(tok_(t) for t in ids),
                acts=tuple(float(a) for a in acts),
            )
        )
    counts = from_blob(row.hist, np.int64)
    edges = from_blob(row.hist_edges, np.float64)
    spectrum = []
    for rec in samples:
        ctx = [int(t) for t in rec["ctx"][: rec["n_ctx"]]]
        at = int(rec["at"])
        before = "".join(tok_(t).text for t in ctx[:at])
        after = "".join(tok_(t).text for t in ctx[at + 1 :])
        tok = tok_(ctx[at])
        spectrum.append(
            SpectrumSample(
                seq_idx=int(rec["seq"]), pos=int(rec["pos"]), act=float(rec["act"]), bin=int(rec["bin"]), token=tok,
                context=f"{before}[[{tok.text}]]{after}",
            )
        )

    def effects(pairs):
        return tuple(TokenScore(tok_(t), v, c) for t, v, c in pairs)

    return NeuronPage(
        run=run,
        stats=NeuronStats(layer, neuron, row.mean, row.std, row.max, row.min, row.frac_pos),
        d_mlp=info.d_mlp,
        n_layers=info.n_layers,
        examples=tuple(examples[TOP]),
        bottom_examples=tuple(examples[BOTTOM]),
        bands=quantile_bands(edges, counts, samples["bin"], samples["hash"], spectrum, row.max),
        bos_act=row.bos_act,
        histogram=Histogram(tuple(float(x) for x in edges), tuple(int(c) for c in counts)),
        spectrum=tuple(spectrum),
        top_tokens=tuple(TokenScore(tok_(t), m, c) for t, m, c in row.top_tokens),
        logit_top=effects(row.logit_top),
        logit_bottom=effects(row.logit_bottom),
        logit_top_seen=effects(row.logit_top_seen),
        logit_bottom_seen=effects(row.logit_bottom_seen),
        unit=unit,
        n_units=n_units(run, info),
    )


def quantile_bands(edges, counts, s_bin, s_hash, spectrum, vmax: float, n_bands: int = N_BANDS,
                   per_band: int = PER_BAND) -> tuple[Band, ...]:
    """The positive range 0..``vmax`` cut into ``n_bands`` bands of whole histogram bars (a bar
    goes to the band of its lower edge clipped at 0; bars entirely <= 0 to none), highest first,
    empty bands left out. Each bar's stored samples are its tokens with the smallest hashes, so
    the ``per_band`` smallest hashes among a band's samples are a uniform random sample of the
    band's tokens, the same however the run was sharded."""
    if not vmax > 0:
        return ()
    members: dict[int, list[int]] = {}
    for b in range(len(counts)):
        if edges[b + 1] <= 0 or counts[b] == 0:
            continue
        members.setdefault(min(n_bands - 1, int(n_bands * max(edges[b], 0.0) / vmax)), []).append(b)
    out = []
    for band in sorted(members, reverse=True):
        bars = members[band]
        pick = np.nonzero(np.isin(s_bin, bars))[0]
        pick = pick[np.argsort(s_hash[pick], kind="stable")][:per_band]
        chosen = sorted((spectrum[i] for i in pick), key=lambda smp: -smp.act)
        out.append(Band(float(edges[bars[0]]), float(edges[bars[-1] + 1]), int(sum(counts[b] for b in bars)),
                        tuple(chosen)))
    return tuple(out)


def layer_neurons(s: Session, model: str, layer: int | None = None, run_id: int | None = None,
                  unit: str = "neuron") -> list[NeuronSummary]:
    """One summary row per neuron (all layers, or one), for the overview table and chart; ``unit``
    "feature": the features of ``layer``'s SAE (its newest feature run)."""
    info = get_model(s, model)
    if layer is not None and not 0 <= layer < info.n_layers:
        raise NotFound(f"layer {layer} out of range: {model} has layers 0-{info.n_layers - 1}")
    if unit != "neuron" and layer is None:
        raise NotFound("features are listed one layer at a time")
    run = latest_run(s, model, "neurons", run_id) if unit == "neuron" else unit_run(s, model, layer, unit, run_id)
    voc = vocab(s, model)
    q = select(
        NeuronStatsRow.layer, NeuronStatsRow.neuron, NeuronStatsRow.max, NeuronStatsRow.mean, NeuronStatsRow.std,
        NeuronStatsRow.frac_pos, NeuronStatsRow.top_tokens,
    ).where(NeuronStatsRow.run_id == run.id)
    if layer is not None:
        q = q.where(NeuronStatsRow.layer == layer)
    q = q.order_by(NeuronStatsRow.layer, NeuronStatsRow.neuron)
    return [
        NeuronSummary(l, n, mx, mn, sd, fp, tuple(voc[t[0]] for t in (tt or [])[:5]))
        for l, n, mx, mn, sd, fp, tt in s.execute(q)
    ]


def match_tokens(voc: list[str], text: str) -> list[int]:
    """Token ids whose display string is ``text`` with or without one leading space (``dog`` finds
    "dog" and " dog"); when none match exactly, the same ignoring case."""
    want = text.strip()
    if not want:
        return []
    forms = {want, " " + want}
    ids = [i for i, t in enumerate(voc) if t in forms]
    if not ids:
        low = {f.lower() for f in forms}
        ids = [i for i, t in enumerate(voc) if t.lower() in low]
    return ids


def neurons_for_tokens(s: Session, model: str, token_ids: list[int], limit: int = 20, run_id: int | None = None) -> list[tuple[NeuronSummary, float, int]]:
    """Neurons whose highest-mean tokens include any of ``token_ids``: (summary, that token's mean
    activation, token id), best first; a neuron appears once (its best matching token)."""
    want = {int(t) for t in token_ids}
    if not want:
        return []
    summaries = {(x.layer, x.neuron): x for x in layer_neurons(s, model, None, run_id)}
    run = latest_run(s, model, "neurons", run_id)
    hits = []
    for l, n, tt in s.execute(
        select(NeuronStatsRow.layer, NeuronStatsRow.neuron, NeuronStatsRow.top_tokens).where(NeuronStatsRow.run_id == run.id)
    ):
        best = max(((float(m), int(t)) for t, m, _c in tt or [] if int(t) in want), default=None)
        if best is not None:
            hits.append((summaries[(l, n)], best[0], best[1]))
    hits.sort(key=lambda h: -h[1])
    return hits[:limit]


# ---------------------------------------------------------------------------------------------
# `precompute show neuron` (registered through the job's spec)


def _add_show_neuron(p) -> None:
    from ...store.db import DEFAULT_DB

    p.add_argument("--model", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--neuron", type=int, required=True)
    p.add_argument("--run", type=int, default=None)
    p.add_argument("--unit", default="neuron", choices=list(UNITS),
                   help="feature: --neuron is a feature of the layer's SAE (its newest feature run)")
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--json", action="store_true", help="print JSON (the only format)")


def _show_neuron(args, store) -> int:
    from ...output import print_json

    with store.session() as s:
        print_json(neuron_page(s, args.model, args.layer, args.neuron, args.run, args.unit))
    return 0


SHOW_NEURON = (_add_show_neuron, _show_neuron)
