"""Stored SAEs: one row per trained SAE (its weights and quality), under a run of job ``sae``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import JSON, Float, ForeignKey, Integer, LargeBinary, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from ..store.base import Base, from_blob, to_blob
from ..store.queries import NotFound, list_runs
from .model import TopKSAE
from .train import SaeResult, as_arrays


class SaeRow(Base):
    __tablename__ = "saes"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int] = mapped_column(Integer)
    d_in: Mapped[int] = mapped_column(Integer)
    n_features: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    W_enc: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [d_in, n_features]
    b_enc: Mapped[bytes] = mapped_column(LargeBinary)
    W_dec: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [n_features, d_in]
    b_dec: Mapped[bytes] = mapped_column(LargeBinary)
    variance_explained: Mapped[float] = mapped_column(Float)
    dead_share: Mapped[float] = mapped_column(Float)
    clean_loss: Mapped[float] = mapped_column(Float)
    spliced_loss: Mapped[float] = mapped_column(Float)
    zero_loss: Mapped[float] = mapped_column(Float)
    n_train_tokens: Mapped[int] = mapped_column(Integer)
    n_eval_tokens: Mapped[int] = mapped_column(Integer)
    curve: Mapped[list] = mapped_column(JSON)  # [[step, batch FVU], ...]


def write_sae(s: Session, run_id: int, r: SaeResult) -> None:
    w = as_arrays(r.sae)
    s.add(SaeRow(run_id=run_id, layer=r.config.layer, d_in=r.sae.d_in, n_features=r.sae.n_features, k=r.sae.k,
                 W_enc=to_blob(w["W_enc"]), b_enc=to_blob(w["b_enc"]), W_dec=to_blob(w["W_dec"]), b_dec=to_blob(w["b_dec"]),
                 variance_explained=r.variance_explained, dead_share=r.dead_share, clean_loss=r.clean_loss,
                 spliced_loss=r.spliced_loss, zero_loss=r.zero_loss, n_train_tokens=r.n_train_tokens,
                 n_eval_tokens=r.n_eval_tokens, curve=[list(c) for c in r.curve]))


@dataclass(frozen=True)
class SaeInfo:
    run_id: int
    layer: int
    d_in: int
    n_features: int
    k: int
    variance_explained: float
    dead_share: float
    clean_loss: float
    spliced_loss: float
    zero_loss: float
    n_train_tokens: int
    n_eval_tokens: int
    curve: tuple[tuple[int, float], ...]


def _row(s: Session, model: str, layer: int, run_id: int | None) -> SaeRow:
    for run in list_runs(s, model, "sae"):
        if run_id is not None and run.id != run_id:
            continue
        row = s.scalar(select(SaeRow).where(SaeRow.run_id == run.id, SaeRow.layer == int(layer)))
        if row is not None:
            return row
    raise NotFound(f"no SAE of layer {layer} of {model!r}" + (f" in run {run_id}" if run_id else "")
                   + "; train one with `precompute train-sae`")


def sae_info(s: Session, model: str, layer: int, run_id: int | None = None) -> SaeInfo:
    """The newest SAE of a layer (or run ``run_id``'s): its shape and quality."""
    r = _row(s, model, layer, run_id)
    return SaeInfo(r.run_id, r.layer, r.d_in, r.n_features, r.k, r.variance_explained, r.dead_share, r.clean_loss,
                   r.spliced_loss, r.zero_loss, r.n_train_tokens, r.n_eval_tokens, tuple(tuple(c) for c in r.curve))


def load_sae(s: Session, model: str, layer: int, run_id: int | None = None) -> TopKSAE:
    """The newest SAE of a layer as a module, ready to encode hook_post activations."""
    r = _row(s, model, layer, run_id)
    sae = TopKSAE(r.d_in, r.n_features, r.k)
    shapes = {"W_enc": (r.d_in, r.n_features), "b_enc": (r.n_features,), "W_dec": (r.n_features, r.d_in), "b_dec": (r.d_in,)}
    sae.load_state_dict({k: torch.from_numpy(from_blob(getattr(r, k), "<f4").reshape(v).copy()) for k, v in shapes.items()})
    return sae.eval()


def feature_units(s: Session, sae_run: int) -> "FeatureUnits":
    """The SAE stored by run ``sae_run`` (`precompute runs` lists it) as the neuron job's units."""
    from ..store.tables import ModelRow, RunRow
    from .model import FeatureUnits

    run = s.get(RunRow, int(sae_run))
    if run is None or run.job != "sae" or run.status != "complete":
        raise NotFound(f"run {sae_run} is not a complete SAE run; `precompute runs` lists them (job sae)")
    row = s.scalar(select(SaeRow).where(SaeRow.run_id == run.id))
    if row is None:
        raise NotFound(f"SAE run {sae_run} stored no SAE")
    model = s.get(ModelRow, run.model_id).name
    return FeatureUnits(row.id, run.id, model, row.layer, load_sae(s, model, row.layer, run.id))
