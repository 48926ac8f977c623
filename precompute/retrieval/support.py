"""Glue between the store, the model and the selection rules: what the retrieval page calls.

- ``prompt_support``: embed a live prompt, then nearest neighbours and SIFT over a stored
  embeddings run, side by side, with the readable windows.
- ``diverse_examples``: a neuron's stored top examples re-ordered by the same greedy rule (targets =
  all its top examples weighted by activation, candidates = the same examples, no repeats), so
  near-duplicates give way to the other contexts the neuron fires on. Example windows are
  embedded like corpus windows, centred with the newest embeddings run's centre when the model
  has one, else with the examples' own mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from ..jobs.embeddings import embed_ids
from ..models import LoadedModel
from ..jobs.embeddings.tables import Embeddings, window_views
from .index import VectorIndex
from .sift import DEFAULT_CANDIDATES, DEFAULT_LAMBDA, Method, Selection, select, sift_candidates

# posterior variance (prior 1) above which we tell the user the corpus has little relevant data
HIGH_VARIANCE = 0.5


@dataclass(frozen=True)
class Support:
    prompt_ids: tuple[int, ...]
    selections: dict  # method -> Selection
    windows: dict  # row -> WindowView for every picked row
    n_windows: int
    backend: str

    def final_variance(self, method: Method) -> float:
        sel = self.selections[method]
        return sel.picks[-1].variance if sel.picks else sel.prior_variance


def prompt_support(
    s: Session, lm: LoadedModel, model: str, emb: Embeddings, prompt: str, n: int = 8,
    lam: float = DEFAULT_LAMBDA, m: int = DEFAULT_CANDIDATES, index: VectorIndex | None = None,
) -> Support:
    """NN and SIFT picks for ``prompt`` from the embeddings run ``emb`` (``index``: a prebuilt one)."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if emb.vectors.shape[1] != lm.d_model:
        raise ValueError(f"embeddings have dimension {emb.vectors.shape[1]}, the model {lm.d_model}: another model's run?")
    ids = lm.encode(prompt)
    q = embed_ids(lm, ids, centre=emb.centre)[0]
    index = index or VectorIndex(emb.vectors)
    sels = {meth: select(index, q, n, meth, lam, m) for meth in ("nn", "sift")}
    rows = sorted({r for sel in sels.values() for r in sel.rows})
    views = {v.row: v for v in window_views(s, model, emb.run.id, emb.windows, rows)}
    return Support(tuple(ids), sels, views, emb.n, index.backend)


def example_ids(support: Support, method: Method) -> list[list[int]]:
    """Token ids of the picked windows in pick order (repeats kept: a repeat is trained on again)."""
    return [list(support.windows[r].token_ids) for r in support.selections[method].rows]


# ---------------------------------------------------------------------------------------------
# diverse max-activating examples


def diverse_order(vectors: np.ndarray, acts: np.ndarray, n: int | None = None, lam: float = DEFAULT_LAMBDA) -> Selection:
    """Greedy SIFT re-selection of examples (rows of ``vectors``, L2-normalised) without repeats:
    the targets are the examples themselves weighted by their (positive part of) activation."""
    v = np.asarray(vectors, dtype=np.float64)
    w = np.clip(np.asarray(acts, dtype=np.float64), 0, None)
    if len(v) == 0:
        raise ValueError("no examples to re-select")
    if w.sum() <= 0:
        w = np.ones(len(v))
    return sift_candidates(v, v, len(v) if n is None else n, lam, weights=w, allow_repeats=False)


@dataclass(frozen=True)
class DiverseExamples:
    plain: tuple  # ExampleView, by activation (the stored order)
    diverse: tuple  # ExampleView, in greedy order
    selection: Selection  # rows index ``plain``
    similarity: tuple[tuple[float, ...], ...]  # cosine similarity between plain examples


def example_vectors(lm: LoadedModel, s: Session, run_id: int, examples, centre: np.ndarray | None = None) -> np.ndarray:
    """Embeddings of neuron example windows, pooled the way the embeddings job pools: final-norm
    residual over the window's tokens, with the whole sequence before it as context, minus
    ``centre`` (default: the examples' own mean), L2-normalised."""
    from ..jobs.embeddings import pool_ids
    from ..store.queries import sequence_tokens

    toks = sequence_tokens(s, run_id, {e.seq_idx for e in examples})
    raw = []
    for e in examples:
        seq = toks[e.seq_idx]
        start = max(e.win_start, 1 if (lm.bos_id is not None and seq[0] == lm.bos_id) else 0)
        end = e.win_start + len(e.tokens)
        start = min(start, end - 1)
        raw.append(pool_ids(lm, seq[:end], spans=[(start, end)])[0])
    raw = np.stack(raw)
    c = raw.mean(0) if centre is None else np.asarray(centre, dtype=np.float32)
    v = raw - c
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def diverse_examples(s: Session, lm: LoadedModel, model: str, layer: int, neuron: int, n: int | None = None,
                     lam: float = DEFAULT_LAMBDA, run_id: int | None = None) -> DiverseExamples:
    """A neuron's top examples (neuron run) next to their diverse re-selection (needs the model)."""
    from ..jobs.neurons.tables import neuron_page

    page = neuron_page(s, model, layer, neuron, run_id)
    ex = list(page.examples)
    if not ex:
        raise ValueError(f"layer {layer} neuron {neuron} has no stored examples")
    from ..jobs.embeddings.tables import embedding_centre
    from ..store.queries import NotFound

    try:  # the corpus centre of the newest embeddings run, when there is one
        centre = embedding_centre(s, model)
        centre = centre if len(centre) == lm.d_model else None
    except NotFound:
        centre = None
    vecs = example_vectors(lm, s, page.run.id, ex, centre)
    sel = diverse_order(vecs, np.array([e.act for e in ex]), n, lam)
    sim = vecs @ vecs.T
    return DiverseExamples(tuple(ex), tuple(ex[r] for r in sel.rows), sel, tuple(tuple(float(x) for x in r) for r in sim))
