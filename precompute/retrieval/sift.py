"""SIFT selection and the nearest-neighbour baseline.

After Hübotter et al., "Efficiently Learning at Test-Time: Active Fine-Tuning of LLMs"
(arXiv 2410.08020). The surrogate: logits linear in fixed, L2-normalised embeddings phi, with a
Gaussian prior on the weights, i.e. a Gaussian process with kernel k(x, x') = <phi(x), phi(x')>
and observation noise ``lam`` (the paper's lambda). After observing examples X_n (repeats
allowed), the uncertainty about the prompt x* is the posterior variance

    sigma^2_n(x*) = k(x*, x*) - k_n(x*)^T (K_n + lam I)^{-1} k_n(x*)

and SIFT greedily picks ``x_{n+1} = argmin_x sigma^2_{n+1}(x*)`` (with x added). The first pick
maximises k(x*, x)^2 / (1 + lam): the nearest neighbour (when the best similarity is positive,
which it is among the top-M candidates); later picks trade relevance to the prompt against
redundancy with what was already chosen. A repeat of an earlier pick is allowed (it means
"train on it again") and still lowers the variance, but less each time.

Implementation: the posterior covariance over the candidates and the prompt is kept explicitly
and updated by rank-one steps (adding x with noise lam: k' (a, b) = k(a, b) - k(a, x) k(x, b) /
(k(x, x) + lam)), which is exact and costs O(M^2) per pick. As in the paper's implementation,
candidates are first cut to the prompt's top-``m`` nearest neighbours.

Several targets (rows of ``query`` with ``weights``) minimise the weighted sum of their
variances: that is what diverse max-activating examples use (targets = the neuron's top
examples weighted by activation).

``lam`` sets the trade-off: small values let SIFT reach for examples far from the prompt that
cancel what earlier picks got wrong; large values make it repeat the nearest neighbours (more
weight on data it is sure about). The default 0.1 sits between; the page exposes it.

The variance is a statement about a linear surrogate in the model's own embedding space, not a
calibrated probability; it says how much of the prompt's direction the chosen examples cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .index import VectorIndex

Method = Literal["nn", "sift"]
DEFAULT_LAMBDA = 0.1
DEFAULT_CANDIDATES = 200


@dataclass(frozen=True)
class Pick:
    step: int  # 1-based
    row: int  # index into the searched vectors (a corpus window row)
    variance: float  # weighted posterior variance at the target(s) after this pick
    relevance: float  # similarity to the prompt (weighted mean over targets)
    redundancy: float  # max similarity to the earlier picks (0 for the first; 1 for a repeat)
    repeat: bool  # the same row was picked before


@dataclass(frozen=True)
class Selection:
    method: Method
    picks: tuple[Pick, ...]
    prior_variance: float  # before any pick (1 for one normalised prompt)
    lam: float
    n_candidates: int

    @property
    def rows(self) -> list[int]:
        return [p.row for p in self.picks]

    @property
    def variances(self) -> list[float]:
        return [p.variance for p in self.picks]


def _targets(query: np.ndarray, weights) -> tuple[np.ndarray, np.ndarray]:
    q = np.atleast_2d(np.asarray(query, dtype=np.float64))
    if weights is None:
        w = np.full(len(q), 1.0 / len(q))
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if len(w) != len(q) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("weights must be non-negative, one per target, not all zero")
        w = w / w.sum()
    return q, w


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not lam > 0 or not np.isfinite(lam):
        raise ValueError(f"lambda must be a positive number, got {lam}")
    return lam


def _picks(method: Method, chosen: list[int], rows: np.ndarray, variances: list[float], rel: np.ndarray,
           kc: np.ndarray, prior: float, lam: float) -> Selection:
    out = []
    for i, c in enumerate(chosen):
        earlier = chosen[:i]
        red = float(max(kc[c, e] for e in earlier)) if earlier else 0.0
        out.append(Pick(i + 1, int(rows[c]), float(variances[i]), float(rel[c]), red, c in earlier))
    return Selection(method, tuple(out), float(prior), lam, len(rows))


def sift_candidates(query: np.ndarray, cand: np.ndarray, n: int, lam: float = DEFAULT_LAMBDA,
                    weights=None, allow_repeats: bool = True, rows=None) -> Selection:
    """Greedy SIFT over candidate vectors ``cand`` [M, d] (rows of the result index ``rows``,
    default 0..M-1). ``query``: [d] or [T, d] targets (``weights`` per target)."""
    lam = _check_lam(lam)
    q, w = _targets(query, weights)
    c = np.asarray(cand, dtype=np.float64)
    m = len(c)
    rows = np.arange(m) if rows is None else np.asarray(rows)
    if n < 0:
        raise ValueError("n must be >= 0")
    if not allow_repeats:
        n = min(n, m)
    kc = c @ c.T  # prior kernel among candidates [M, M]
    cov_q = q @ c.T  # prior k(target_j, candidate) [T, M]
    var_q = np.einsum("td,td->t", q, q)  # prior k(target_j, target_j) [T]
    prior = float(w @ var_q)
    rel = w @ cov_q  # relevance: weighted similarity to the target(s)
    post = kc.copy()
    chosen: list[int] = []
    variances: list[float] = []
    used = np.zeros(m, dtype=bool)
    for _ in range(n if m else 0):
        denom = np.diag(post) + lam
        gain = (w @ (cov_q**2)) / denom  # variance reduction of adding each candidate
        if not allow_repeats:
            gain = np.where(used, -np.inf, gain)
        x = int(np.argmax(gain))
        d = post[x, x] + lam
        col = post[:, x].copy()
        var_q = var_q - cov_q[:, x] ** 2 / d
        cov_q = cov_q - np.outer(cov_q[:, x], col) / d
        post = post - np.outer(col, col) / d
        chosen.append(x)
        used[x] = True
        variances.append(float(w @ var_q))
    return _picks("sift", chosen, rows, variances, rel, kc, prior, lam)


def variance_path(query: np.ndarray, picked: np.ndarray, lam: float = DEFAULT_LAMBDA, weights=None) -> list[float]:
    """Weighted posterior variance at the target(s) after each prefix of ``picked`` [n, d]."""
    lam = _check_lam(lam)
    q, w = _targets(query, weights)
    p = np.asarray(picked, dtype=np.float64).reshape(-1, q.shape[1])
    post = p @ p.T
    cov_q = q @ p.T
    var_q = np.einsum("td,td->t", q, q)
    out = []
    for x in range(len(p)):
        d = post[x, x] + lam
        col = post[:, x].copy()
        var_q = var_q - cov_q[:, x] ** 2 / d
        cov_q = cov_q - np.outer(cov_q[:, x], col) / d
        post = post - np.outer(col, col) / d
        out.append(float(w @ var_q))
    return out


def select(index: VectorIndex, query: np.ndarray, n: int, method: Method = "sift", lam: float = DEFAULT_LAMBDA,
           m: int = DEFAULT_CANDIDATES, allow_repeats: bool = True) -> Selection:
    """``n`` examples for one prompt embedding ``query`` [d]: nearest neighbours or SIFT over
    the prompt's top-``m`` neighbours. Both report the surrogate's variance after each pick."""
    if method not in ("nn", "sift"):
        raise ValueError(f"unknown selection method {method!r} (nn, sift)")
    if n < 1:
        raise ValueError("n must be at least 1")
    lam = _check_lam(lam)
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    if method == "nn":
        sims, rows = index.search(q, n)
        cand = index.vectors[rows].astype(np.float64)
        variances = variance_path(q, cand, lam)
        kc = cand @ cand.T
        return _picks("nn", list(range(len(rows))), rows, variances, cand @ q, kc, float(q @ q), lam)
    _sims, rows = index.search(q, max(m, 1))
    sel = sift_candidates(q, index.vectors[rows], n, lam, allow_repeats=allow_repeats, rows=rows)
    return sel
