"""Read-only queries shared by the app and `precompute show`. They return frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from .base import from_blob
from .tables import ModelRow, RunRow, SequenceRow


class NotFound(LookupError):
    """Something a URL or command asked for is not in the database; one line for the user."""


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    special: bool


@dataclass(frozen=True)
class ModelInfo:
    id: int
    name: str
    source: str
    architecture: str
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    n_params: int
    bos_id: int | None
    special_ids: tuple[int, ...]
    card: str


@dataclass(frozen=True)
class RunInfo:
    id: int
    model: str
    job: str
    corpus: str
    corpus_synthetic: bool
    n_tokens: int
    n_sequences: int
    prepend_bos: bool
    params: dict
    code_version: str
    started_at: datetime
    finished_at: datetime | None
    status: str
    summary: dict


def _model_info(r: ModelRow) -> ModelInfo:
    return ModelInfo(
        id=r.id, name=r.name, source=r.source, architecture=r.architecture, n_layers=r.n_layers,
        n_heads=r.n_heads, d_model=r.d_model, d_mlp=r.d_mlp, vocab_size=r.vocab_size, n_ctx=r.n_ctx,
        n_params=r.n_params, bos_id=r.bos_id, special_ids=tuple(r.special_ids or ()), card=r.card or "",
    )


def _run_info(r: RunRow, model: str) -> RunInfo:
    return RunInfo(
        id=r.id, model=model, job=r.job, corpus=r.corpus, corpus_synthetic=r.corpus_synthetic,
        n_tokens=r.n_tokens, n_sequences=r.n_sequences, prepend_bos=r.prepend_bos, params=dict(r.params or {}),
        code_version=r.code_version, started_at=r.started_at, finished_at=r.finished_at, status=r.status,
        summary=dict(r.summary or {}),
    )


def list_models(s: Session) -> list[ModelInfo]:
    return [_model_info(r) for r in s.scalars(select(ModelRow).order_by(ModelRow.name))]


def model_key(s: Session, name: str) -> str:
    """The name a model is stored under. ``precompute run --model PATH`` stores a local folder under
    its folder name, so the same PATH given to ``show`` (or a URL) finds it; a stored name wins."""
    try:
        is_dir = bool(name) and Path(name).is_dir()
    except (OSError, ValueError):  # a name too long or malformed to be a path
        is_dir = False
    if not is_dir or s.scalar(select(ModelRow.id).where(ModelRow.name == name)) is not None:
        return name
    from ..models import model_name

    return model_name(name)


def get_model(s: Session, name: str) -> ModelInfo:
    r = s.scalar(select(ModelRow).where(ModelRow.name == model_key(s, name)))
    if r is None:
        known = ", ".join(m.name for m in list_models(s)) or "none yet"
        raise NotFound(f"model {name!r} is not in this database (models: {known})")
    return _model_info(r)


def vocab(s: Session, model: str) -> list[str]:
    """Display string of every token id (special tokens keep their visible names)."""
    v = s.scalar(select(ModelRow.vocab).where(ModelRow.name == model_key(s, model)))
    if v is None:
        raise NotFound(f"model {model!r} is not in this database")
    return list(v)


def list_runs(s: Session, model: str | None = None, job: str | None = None, include_incomplete: bool = False) -> list[RunInfo]:
    """Complete runs, newest first (``include_incomplete``: running or killed ones too)."""
    q = select(RunRow, ModelRow.name).join(ModelRow, RunRow.model_id == ModelRow.id)
    if not include_incomplete:
        q = q.where(RunRow.status == "complete")
    if model is not None:
        q = q.where(ModelRow.name == model_key(s, model))
    if job is not None:
        q = q.where(RunRow.job == job)
    q = q.order_by(RunRow.id.desc())
    return [_run_info(r, name) for r, name in s.execute(q)]


def latest_run(s: Session, model: str, job: str, run_id: int | None = None) -> RunInfo:
    """The newest complete run of ``job`` for ``model`` (or the given run id, checked to match)."""
    runs = list_runs(s, model, job)
    if run_id is not None:
        for r in runs:
            if r.id == run_id:
                return r
        raise NotFound(f"run {run_id} is not a complete {job} run of {model!r}")
    if not runs:
        get_model(s, model)  # raises when the model itself is unknown
        raise NotFound(f"no complete {job} run for {model!r}; build one with `precompute run --model ... --jobs {job}`")
    return runs[0]


def sequence_tokens(s: Session, run_id: int, seq_idxs) -> dict[int, np.ndarray]:
    """Token ids of the given sequences of a run."""
    seq_idxs = sorted({int(i) for i in seq_idxs})
    out: dict[int, np.ndarray] = {}
    for i in range(0, len(seq_idxs), 500):
        q = select(SequenceRow.seq_idx, SequenceRow.token_ids).where(
            SequenceRow.run_id == run_id, SequenceRow.seq_idx.in_(seq_idxs[i : i + 500])
        )
        for k, blob in s.execute(q):
            out[k] = from_blob(blob, np.int32)
    return out


@dataclass(frozen=True)
class SequenceInfo:
    seq_idx: int
    story_id: int
    offset: int
    token_ids: tuple[int, ...]


def get_sequence(s: Session, run_id: int, seq_idx: int) -> SequenceInfo:
    r = s.scalar(select(SequenceRow).where(SequenceRow.run_id == run_id, SequenceRow.seq_idx == seq_idx))
    if r is None:
        raise NotFound(f"sequence {seq_idx} is not in run {run_id}")
    return SequenceInfo(r.seq_idx, r.story_id, r.offset, tuple(int(t) for t in from_blob(r.token_ids, np.int32)))


def count_sequences(s: Session, run_id: int) -> int:
    from sqlalchemy import func

    return int(s.scalar(select(func.count()).select_from(SequenceRow).where(SequenceRow.run_id == run_id)) or 0)


def sequence_stories(s: Session, run_id: int, seq_idxs) -> dict[int, int]:
    """Story id of the given sequences of a run (sequences not stored are left out)."""
    seq_idxs = sorted({int(i) for i in seq_idxs})
    q = select(SequenceRow.seq_idx, SequenceRow.story_id).where(
        SequenceRow.run_id == run_id, SequenceRow.seq_idx.in_(seq_idxs or [-1]))
    return dict(s.execute(q).all())
