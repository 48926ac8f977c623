"""Embedding tables (one float16 vector per training window), their writers and queries.

Vectors are stored in chunks of at most ``CHUNK_ROWS`` rows: one table row holds a matrix blob
and the WINDOW_DTYPE records (sequence, [start, end) positions) of its rows, so a large corpus
never needs one huge blob and a reader can load everything with one query.

During a sweep (``write_embedding_chunk``) a chunk row holds *raw* pooled vectors (float32,
``normalised`` false): the centre is only known at the end. ``write_embeddings`` (the job's
final write, in the transaction that completes the run) stores the centre and rewrites every raw
chunk row of the run as ``(raw - centre) / norm`` in float16, one chunk row at a time, so a
complete run only ever has normalised float16 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Boolean, ForeignKey, Integer, LargeBinary, UniqueConstraint, delete, func, insert, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from .job import WINDOW_DTYPE, normalise_rows
from ...store.base import Base, from_blob, to_blob
from ...store.queries import NotFound, RunInfo, get_model, latest_run, sequence_tokens, vocab

CHUNK_ROWS = 4096


class EmbeddingRunRow(Base):
    """Per run: the centre subtracted from every pooled vector (and from a prompt's) before normalising."""

    __tablename__ = "embedding_runs"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    n_rows: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    centre: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [dim]


class EmbeddingChunkRow(Base):
    __tablename__ = "embedding_chunks"
    __table_args__ = (UniqueConstraint("run_id", "chunk"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    chunk: Mapped[int] = mapped_column(Integer)
    first_row: Mapped[int] = mapped_column(Integer)
    n_rows: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    first_seq: Mapped[int] = mapped_column(Integer)  # sequence of the first window (resuming drops seqs >= a shard's first)
    normalised: Mapped[bool] = mapped_column(Boolean)  # false while the sweep runs: raw float32 vectors
    vectors: Mapped[bytes] = mapped_column(LargeBinary)  # normalised: float16 [n_rows, dim], rows L2-normalised; else raw float32
    windows: Mapped[bytes] = mapped_column(LargeBinary)  # WINDOW_DTYPE records


def _insert_chunks(s: Session, run_id: int, first_row: int, vectors: np.ndarray, windows: np.ndarray, normalised: bool) -> None:
    """Rows ``first_row ..`` as chunk rows numbered after the run's last one."""
    if not len(vectors):
        return
    next_chunk = s.scalar(select(func.coalesce(func.max(EmbeddingChunkRow.chunk) + 1, 0)).where(EmbeddingChunkRow.run_id == run_id))
    w = np.ascontiguousarray(windows, dtype=WINDOW_DTYPE)
    rows = []
    for c, start in enumerate(range(0, len(vectors), CHUNK_ROWS)):
        part = vectors[start : start + CHUNK_ROWS]
        wp = w[start : start + CHUNK_ROWS]
        rows.append(
            dict(run_id=run_id, chunk=int(next_chunk) + c, first_row=first_row + start, n_rows=len(part), dim=vectors.shape[1],
                 first_seq=int(wp["seq"][0]), normalised=normalised, vectors=to_blob(part), windows=to_blob(wp))
        )
    for i in range(0, len(rows), 50):
        s.execute(insert(EmbeddingChunkRow), rows[i : i + 50])


def write_embedding_chunk(s: Session, run_id: int, chunk) -> None:
    """A drained ``EmbeddingsChunk``: raw float32 rows, normalised by ``write_embeddings`` at the end."""
    if chunk is not None:
        _insert_chunks(s, run_id, chunk.first_row, np.ascontiguousarray(chunk.raw, dtype="<f4"), chunk.windows, False)


def discard_embedding_chunks(s: Session, run_id: int, first_seq: int) -> None:
    """Drop the chunk rows of sequences >= ``first_seq`` (a resumed sweep writes them again).
    Chunk rows never straddle a drain, hence never a shard boundary."""
    s.execute(delete(EmbeddingChunkRow).where(EmbeddingChunkRow.run_id == run_id, EmbeddingChunkRow.first_seq >= first_seq))


def write_embeddings(s: Session, run_id: int, result) -> None:
    """The run's centre, the result's undrained rows, and every raw chunk row normalised, in the
    caller's transaction. Memory: one chunk row at a time besides the result's own rows."""
    dim = int(np.asarray(result.centre).shape[0])
    centre = np.asarray(result.centre, dtype="<f4")
    s.execute(insert(EmbeddingRunRow), [dict(run_id=run_id, n_rows=int(result.n_windows), dim=dim, centre=to_blob(centre))])
    raw_ids = s.scalars(
        select(EmbeddingChunkRow.id).where(EmbeddingChunkRow.run_id == run_id, EmbeddingChunkRow.normalised.is_(False))
        .order_by(EmbeddingChunkRow.chunk)
    ).all()
    for cid in raw_ids:
        n, d, blob = s.execute(
            select(EmbeddingChunkRow.n_rows, EmbeddingChunkRow.dim, EmbeddingChunkRow.vectors).where(EmbeddingChunkRow.id == cid)
        ).one()
        v = normalise_rows(from_blob(blob, "<f4").reshape(n, d), centre)
        s.execute(update(EmbeddingChunkRow).where(EmbeddingChunkRow.id == cid).values(
            vectors=to_blob(np.ascontiguousarray(v, dtype="<f2")), normalised=True))
    _insert_chunks(s, run_id, int(result.first_row), np.ascontiguousarray(result.vectors, dtype="<f2"), result.windows, True)


# ---------------------------------------------------------------------------------------------
# queries


@dataclass(frozen=True, eq=False)
class Embeddings:
    """A run's whole embedding matrix (float16) and the window each row covers."""

    run: RunInfo
    vectors: np.ndarray  # [n, dim] float16
    windows: np.ndarray  # WINDOW_DTYPE
    centre: np.ndarray  # [dim] float32: subtract from a pooled prompt vector before normalising

    @property
    def n(self) -> int:
        return len(self.vectors)


@dataclass(frozen=True)
class WindowToken:
    id: int
    text: str
    special: bool


@dataclass(frozen=True)
class WindowView:
    row: int
    seq_idx: int
    story_id: int
    start: int  # position in the sequence the model saw (BOS is position 0)
    end: int  # exclusive
    token_ids: tuple[int, ...]  # the window's tokens, seq[start:end]
    tokens: tuple[WindowToken, ...]

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


def load_embeddings(s: Session, model: str, run_id: int | None = None) -> Embeddings:
    """The newest complete embeddings run of ``model`` (or ``run_id``), all rows."""
    run = latest_run(s, model, "embeddings", run_id)
    chunks = s.execute(
        select(EmbeddingChunkRow.n_rows, EmbeddingChunkRow.dim, EmbeddingChunkRow.vectors, EmbeddingChunkRow.windows)
        .where(EmbeddingChunkRow.run_id == run.id)
        .order_by(EmbeddingChunkRow.chunk)
    ).all()
    if not chunks:
        raise NotFound(f"embeddings run {run.id} of {model!r} has no rows")
    if s.scalar(select(func.count()).where(EmbeddingChunkRow.run_id == run.id, EmbeddingChunkRow.normalised.is_(False))):
        raise NotFound(f"embeddings run {run.id} of {model!r} was not finished (raw rows left)")
    centre = s.scalar(select(EmbeddingRunRow.centre).where(EmbeddingRunRow.run_id == run.id))
    vecs = [from_blob(b, "<f2").reshape(n, d) for n, d, b, _ in chunks]
    wins = [from_blob(b, WINDOW_DTYPE) for _n, _d, _b, b in chunks]
    v = np.concatenate(vecs)
    c = from_blob(centre, "<f4") if centre is not None else np.zeros(v.shape[1], np.float32)
    return Embeddings(run=run, vectors=v, windows=np.concatenate(wins), centre=c)


def embedding_centre(s: Session, model: str, run_id: int | None = None) -> np.ndarray:
    """Only the centre of the newest embeddings run (cheap: no vectors are read)."""
    run = latest_run(s, model, "embeddings", run_id)
    c = s.scalar(select(EmbeddingRunRow.centre).where(EmbeddingRunRow.run_id == run.id))
    if c is None:
        raise NotFound(f"embeddings run {run.id} of {model!r} has no centre row")
    return from_blob(c, "<f4")


def window_views(s: Session, model: str, run_id: int, windows: np.ndarray, rows) -> list[WindowView]:
    """Readable tokens of the given rows (indices into ``windows``), in the order given."""
    from ...store.tables import SequenceRow

    rows = [int(r) for r in rows]
    if any(not 0 <= r < len(windows) for r in rows):
        raise NotFound(f"window row out of range (run {run_id} has {len(windows)} windows)")
    need = {int(windows["seq"][r]) for r in rows}
    toks = sequence_tokens(s, run_id, need)
    stories = dict(
        s.execute(select(SequenceRow.seq_idx, SequenceRow.story_id).where(
            SequenceRow.run_id == run_id, SequenceRow.seq_idx.in_(sorted(need))
        )).all()
    )
    voc = vocab(s, model)
    special = set(get_model(s, model).special_ids)
    out = []
    for r in rows:
        k, a, b = (int(x) for x in windows[r])
        ids = tuple(int(t) for t in toks[k][a:b])
        out.append(
            WindowView(
                row=r, seq_idx=k, story_id=int(stories.get(k, -1)), start=a, end=b, token_ids=ids,
                tokens=tuple(WindowToken(t, voc[t] if 0 <= t < len(voc) else f"<{t}>", t in special) for t in ids),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# `precompute show retrieval` (prints what the retrieval page shows; loads the model)


def _add_show_retrieval(p) -> None:
    from ...store.db import DEFAULT_DB

    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=8, help="picks per method")
    p.add_argument("--lam", type=float, default=None, help="SIFT noise lambda (default 0.1)")
    p.add_argument("--candidates", type=int, default=200, help="SIFT candidates: the prompt's nearest windows")
    p.add_argument("--run", type=int, default=None)
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--json", action="store_true", help="print JSON (the only format)")


def _show_retrieval(args, store) -> int:
    from ...output import print_json
    from ...models import load_model
    from ...retrieval.sift import DEFAULT_LAMBDA
    from ...retrieval.support import prompt_support

    lam = DEFAULT_LAMBDA if args.lam is None else args.lam
    with store.session() as s:
        info = get_model(s, args.model)
        emb = load_embeddings(s, args.model, args.run)
        lm = load_model(info.source)
        sup = prompt_support(s, lm, args.model, emb, args.prompt, args.n, lam, args.candidates)
    windows = {r: dict(seq_idx=w.seq_idx, story_id=w.story_id, start=w.start, end=w.end, text=w.text)
               for r, w in sup.windows.items()}
    print_json(dict(run=emb.run.id, n_windows=sup.n_windows, backend=sup.backend, prompt_ids=sup.prompt_ids,
                    selections=sup.selections, windows=windows))
    return 0


SHOW_RETRIEVAL = (_add_show_retrieval, _show_retrieval)
