"""A vector index over L2-normalised embeddings: inner product = cosine similarity.

``VectorIndex(vectors)`` picks its backend: exact search in numpy (a float32 matrix product and
a partial sort) by default, or FAISS when ``faiss`` is importable and the corpus has at least
``FAISS_MIN_ROWS`` rows (``IndexFlatIP``, exact; ``IndexHNSWFlat`` approximate above
``HNSW_MIN_ROWS``). Both answer ``search(queries, k) -> (similarities, rows)`` with rows sorted
by decreasing similarity, so callers never see the difference.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Backend = Literal["auto", "numpy", "faiss"]
FAISS_MIN_ROWS = 50_000
HNSW_MIN_ROWS = 1_000_000


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class VectorIndex:
    def __init__(self, vectors: np.ndarray, backend: Backend = "auto"):
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or len(v) == 0:
            raise ValueError("a vector index needs a non-empty [n, dim] matrix")
        if backend not in ("auto", "numpy", "faiss"):
            raise ValueError(f"unknown index backend {backend!r} (auto, numpy, faiss)")
        if backend == "faiss" and not faiss_available():
            raise ValueError("index backend 'faiss' asked for, but faiss is not installed (pip install faiss-cpu)")
        if backend == "auto":
            backend = "faiss" if len(v) >= FAISS_MIN_ROWS and faiss_available() else "numpy"
        self.backend: Literal["numpy", "faiss"] = backend
        self.vectors = v
        self._faiss = None
        if backend == "faiss":
            import faiss

            if len(v) >= HNSW_MIN_ROWS:
                idx = faiss.IndexHNSWFlat(v.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
                idx.hnsw.efSearch = 256
            else:
                idx = faiss.IndexFlatIP(v.shape[1])
            idx.add(v)
            self._faiss = idx

    @property
    def n(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query: (similarities [q, k] float32, rows [q, k] int64), best first.

        A 1-d query gives 1-d answers. ``k`` larger than the corpus is cut to its size.
        """
        q = np.asarray(queries, dtype=np.float32)
        single = q.ndim == 1
        q = np.atleast_2d(q)
        if q.shape[1] != self.dim:
            raise ValueError(f"query has dimension {q.shape[1]}, the index {self.dim}")
        k = max(0, min(int(k), self.n))
        if k == 0:
            sims, rows = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        elif self._faiss is not None:
            sims, rows = self._faiss.search(np.ascontiguousarray(q), k)
            rows = rows.astype(np.int64)
        else:
            s = q @ self.vectors.T  # [q, n]
            if k < self.n:
                part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            else:
                part = np.tile(np.arange(self.n), (len(q), 1))
            ps = np.take_along_axis(s, part, axis=1)
            order = np.argsort(-ps, axis=1, kind="stable")
            rows = np.take_along_axis(part, order, axis=1).astype(np.int64)
            sims = np.take_along_axis(ps, order, axis=1)
        return (sims[0], rows[0]) if single else (sims, rows)
