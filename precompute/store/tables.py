"""Core tables: schema metadata, models, runs and the token sequences a run read."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base


class MetaRow(Base):
    __tablename__ = "tinyscope_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class ModelRow(Base):
    """One model (by short name, e.g. the folder name). ``vocab`` holds display strings per token id."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    source: Mapped[str] = mapped_column(String(1000))
    architecture: Mapped[str] = mapped_column(String(100))
    n_layers: Mapped[int] = mapped_column(Integer)
    n_heads: Mapped[int] = mapped_column(Integer)
    d_model: Mapped[int] = mapped_column(Integer)
    d_mlp: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    n_ctx: Mapped[int] = mapped_column(Integer)
    n_params: Mapped[int] = mapped_column(BigInteger)  # past 2^31 for 7B models; PostgreSQL's INTEGER is 32-bit
    bos_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    special_ids: Mapped[list] = mapped_column(JSON)
    vocab: Mapped[list] = mapped_column(JSON)
    card: Mapped[str] = mapped_column(Text, default="")


class RunRow(Base):
    """One job over one corpus. Written in the same transaction as its results, so a run that
    exists with status ``complete`` has all its rows, and a killed job leaves nothing."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    job: Mapped[str] = mapped_column(String(32), index=True)
    corpus: Mapped[str] = mapped_column(String(1000))
    corpus_synthetic: Mapped[bool] = mapped_column(default=False)
    n_tokens: Mapped[int] = mapped_column(Integer)  # tokens scored (BOS positions excluded)
    n_sequences: Mapped[int] = mapped_column(Integer)
    prepend_bos: Mapped[bool] = mapped_column()
    params: Mapped[dict] = mapped_column(JSON)
    code_version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="complete")
    summary: Mapped[dict] = mapped_column(JSON, default=dict)


class SequenceRow(Base):
    """The exact token ids one run fed the model (BOS first when the run prepended it)."""

    __tablename__ = "sequences"
    __table_args__ = (UniqueConstraint("run_id", "seq_idx"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    seq_idx: Mapped[int] = mapped_column(Integer)
    story_id: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(Integer)  # index of the first non-BOS token within the story
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32
