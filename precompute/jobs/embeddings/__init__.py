"""Embeddings job: one vector per training window for retrieval (``job.py``), its tables and
queries (``tables.py``), and ``JOB``, how `precompute run` builds, sweeps and stores it."""

from __future__ import annotations

from ...sweep import JobSpec
from .job import (
    WINDOW_DTYPE,
    EmbeddingsAccumulator,
    EmbeddingsChunk,
    EmbeddingsConfig,
    EmbeddingsResult,
    embed_ids,
    embed_text,
    normalise_rows,
    pool_ids,
    run,
    window_spans,
)
from .tables import SHOW_RETRIEVAL, discard_embedding_chunks, write_embedding_chunk, write_embeddings

__all__ = [
    "JOB", "WINDOW_DTYPE", "EmbeddingsAccumulator", "EmbeddingsChunk", "EmbeddingsConfig", "EmbeddingsResult",
    "embed_ids", "embed_text", "normalise_rows", "pool_ids", "run", "window_spans",
]


def _config(args) -> EmbeddingsConfig:
    w = getattr(args, "embed_window", 64)
    return EmbeddingsConfig(window=w, min_tokens=max(1, min(16, w // 4)), batch_size=args.batch_size)


def _add_args(p) -> None:
    p.add_argument("--embed-window", type=int, default=64, help="embeddings job: tokens per retrieval window")


def _summary(r: EmbeddingsResult) -> dict:
    return {"n_windows": int(r.n_windows), "dim": int(len(r.centre))}


JOB = JobSpec(
    name="embeddings",
    config=_config,
    accumulator=EmbeddingsAccumulator,
    write=write_embeddings,
    write_chunk=write_embedding_chunk,
    discard_chunks=discard_embedding_chunks,
    summary=_summary,
    sequences=lambda result: None,  # windows point into every sequence
    add_args=_add_args,
    shows={"retrieval": SHOW_RETRIEVAL},
)
