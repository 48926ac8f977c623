"""Embeddings job: one vector per training context window, for retrieval (issue 7).

What a row is (the choices, in one place):

- **Windows**: every sequence (a corpus chunk of at most ``ctx_len`` tokens, BOS first) is cut
  into fixed windows of ``window`` tokens (default 64) over its non-BOS positions
  ``[1, 1 + window)``, ``[1 + window, 1 + 2 window)``, ...; a last window shorter than
  ``min_tokens`` is merged into the previous one (or kept alone when it is the only one).
  Windows are finer than chunks, so a retrieved example is a passage a reader can take in, and
  fine-tuning on it trains on that passage.
- **Vector**: the model's own final-layer residual stream *after the final norm* (HF
  ``hidden_states[-1]``; exactly what the unembedding reads, so the SIFT surrogate "logits
  linear in fixed embeddings" is literal), computed with the whole chunk as causal context
  (a token sees everything before it in its chunk), mean-pooled over the window's tokens
  (BOS never counted), minus the corpus centre, then L2-normalised. Stored as float16.
- **Centre** (``center=True``, the default): the mean of all pooled window vectors of the run is
  subtracted before normalising, and stored with the run. Raw final-norm residuals of a small
  LM share one large common direction (cosine similarity ~0.9 between any two stories for
  stories260K), which would make every window look relevant to every prompt and the SIFT
  variance meaninglessly low; removing the mean (as in "all-but-the-top", Mu & Viswanath 2018)
  makes the cosine reflect what differs between contexts.
- A **prompt** is embedded the same way (mean over its non-BOS tokens, after the final norm,
  minus the run's centre, normalised): ``embed_text``/``embed_ids`` with ``centre=``.

Streaming (``EmbeddingsAccumulator``, see ``precompute/sweep.py``): each window's raw pooled
vector (float32) is computed at ``update``; ``drain`` hands the windows seen so far and their raw
vectors to the store (``tables.write_embedding_chunk``: float32 rows marked not normalised) and
forgets them. The centre is a mergeable sum: every raw vector in fixed point
(``round(x * 2**CENTRE_FRAC_BITS)`` as int64, exact and independent of the order of addition)
and the window count. ``finish`` returns the centre and whatever was not drained, normalised
(``normalise_rows``); the store's ``write_embeddings`` then rewrites the drained raw rows with
the same function, one chunk row at a time. Swept without draining (``run``), the result holds
every window and its final vector, as before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ...models import LoadedModel
from ...sequences import Batch, Sequences
from ...sweep import Captured, Needs

CENTRE_FRAC_BITS = 24  # fixed-point resolution of the centre's running sum (2^-24 per component)

# structured dtype of a window: which sequence, and its positions [start, end) in that sequence
WINDOW_DTYPE = np.dtype([("seq", "<i4"), ("start", "<i4"), ("end", "<i4")])


@dataclass(frozen=True)
class EmbeddingsConfig:
    window: int = 64
    min_tokens: int = 16
    batch_size: int = 32
    center: bool = True

    def __post_init__(self):
        if self.window < 1:
            raise ValueError("window must be at least 1 token")
        if not 1 <= self.min_tokens <= self.window:
            raise ValueError(f"min_tokens must be between 1 and window ({self.window})")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")

    def params(self) -> dict:
        return asdict(self)


@dataclass
class EmbeddingsResult:
    """``vectors``/``windows`` are the rows not drained to the store during the sweep (all of them
    when swept in memory), from row ``first_row`` on; ``n_windows`` counts every row of the run."""

    config: EmbeddingsConfig
    vectors: np.ndarray  # [n, d_model] float16, rows L2-normalised
    windows: np.ndarray  # WINDOW_DTYPE records, one per row
    centre: np.ndarray  # [d_model] float32, subtracted before normalising (zeros when center=False)
    n_windows: int = 0
    first_row: int = 0
    pooling: str = "final_norm_mean"


def window_spans(length: int, first: int, window: int, min_tokens: int) -> list[tuple[int, int]]:
    """Windows [start, end) over positions ``first .. length-1`` of one sequence."""
    spans = [(s, min(s + window, length)) for s in range(first, length, window)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < min_tokens:
        last = spans.pop()
        spans[-1] = (spans[-1][0], last[1])
    return spans


class _FinalNorm:
    """Captures the final norm's output (the residual stream the unembedding reads)."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.out: torch.Tensor | None = None

    def __enter__(self):
        def hook(module, args, output):
            self.out = output[0] if isinstance(output, tuple) else output

        self.handle = self.lm.final_norm.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def embed_ids(lm: LoadedModel, ids, spans: list[tuple[int, int]] | None = None, bos: bool | None = None,
              centre: np.ndarray | None = None) -> np.ndarray:
    """Normalised float32 embeddings of windows of one token sequence (BOS first if it has one).

    ``spans``: [start, end) windows (default: all non-BOS tokens as one window). ``bos``: whether
    position 0 is BOS (default: it is when it equals the model's BOS id). ``centre``: the run's
    centre, subtracted before normalising.
    """
    pooled = pool_ids(lm, ids, spans, bos)
    if centre is not None:
        pooled = pooled - np.asarray(centre, dtype=np.float32)
    return _normalise(pooled)


@torch.inference_mode()
def pool_ids(lm: LoadedModel, ids, spans: list[tuple[int, int]] | None = None, bos: bool | None = None) -> np.ndarray:
    """Mean final-norm residual over each span [start, end) of one sequence: [n_spans, d_model] float32."""
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("nothing to embed: no tokens")
    if bos is None:
        bos = lm.bos_id is not None and ids[0] == lm.bos_id
    first = 1 if bos else 0
    if spans is None:
        if len(ids) <= first:
            raise ValueError("nothing to embed: the prompt has no tokens besides BOS")
        spans = [(first, len(ids))]
    x = torch.tensor([ids], dtype=torch.long, device=lm.device)
    with _FinalNorm(lm) as cap:
        lm.forward(x)
    h = cap.out[0].float().cpu().numpy()
    return np.stack([h[s:e].mean(0) for s, e in spans])


def embed_text(lm: LoadedModel, text: str, centre: np.ndarray | None = None) -> np.ndarray:
    """A prompt's embedding [d_model] (BOS prepended per the model's policy, never pooled)."""
    return embed_ids(lm, lm.encode(text), centre=centre)[0]


def normalise_rows(raw: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Stored form of raw pooled vectors: ``(raw - centre) / norm`` as float16 (the one place)."""
    return _normalise(np.asarray(raw, np.float32) - np.asarray(centre, np.float32)).astype(np.float16)


@dataclass
class EmbeddingsChunk:
    """Drained windows (corpus order) and their raw pooled vectors; row ``first_row`` onwards."""

    first_row: int
    windows: np.ndarray  # WINDOW_DTYPE
    raw: np.ndarray  # [n, d_model] float32, not centred, not normalised


class EmbeddingsAccumulator:
    """Raw pooled window vectors (until drained) and the centre's fixed-point sum. Picklable."""

    needs = Needs(final=True)

    def __init__(self, lm: LoadedModel, cfg: EmbeddingsConfig = EmbeddingsConfig()):
        self.cfg = cfg
        self.d_model = lm.d_model
        self.pending: dict[int, tuple[list[tuple[int, int]], np.ndarray]] = {}  # seq -> (spans, raw [n, d])
        self.n_drained = 0  # rows handed out by drain so far
        self.n_rows = 0  # windows seen (drained or not)
        self.centre_sum = np.zeros(lm.d_model, np.int64)  # sum of round(raw * 2^CENTRE_FRAC_BITS)

    @torch.inference_mode()
    def update(self, batch: Batch, cap: Captured) -> None:
        h = cap.final.float().cpu()
        for i, (k, n) in enumerate(zip(batch.seq_idx, batch.lengths)):
            spans = window_spans(n, batch.first, self.cfg.window, self.cfg.min_tokens)
            if not spans:
                continue
            raw = torch.stack([h[i, s:e].mean(0) for s, e in spans]).numpy()
            self.pending[int(k)] = (spans, raw)
            self.n_rows += len(spans)
            self.centre_sum += np.rint(raw.astype(np.float64) * 2.0**CENTRE_FRAC_BITS).astype(np.int64).sum(0)

    def merge(self, other: "EmbeddingsAccumulator") -> None:
        self.pending.update(other.pending)
        self.n_rows += other.n_rows
        self.centre_sum += other.centre_sum

    def _take(self) -> EmbeddingsChunk:
        """The pending windows in corpus order, then forgotten."""
        rows, vecs = [], []
        for k in sorted(self.pending):
            spans, raw = self.pending[k]
            rows.extend((k, s, e) for s, e in spans)
            vecs.append(raw)
        chunk = EmbeddingsChunk(first_row=self.n_drained, windows=np.array(rows, dtype=WINDOW_DTYPE),
                                raw=np.concatenate(vecs) if vecs else np.zeros((0, self.d_model), np.float32))
        self.pending = {}
        self.n_drained += len(chunk.windows)
        return chunk

    def drain(self) -> EmbeddingsChunk | None:
        return self._take() if self.pending else None

    def centre(self) -> np.ndarray:
        if not self.cfg.center or self.n_rows <= 1:
            return np.zeros(self.d_model, np.float32)
        return (self.centre_sum.astype(np.float64) / 2.0**CENTRE_FRAC_BITS / self.n_rows).astype(np.float32)

    def finish(self, lm: LoadedModel | None = None, tokens=None) -> "EmbeddingsResult":
        centre = self.centre()
        left = self._take()  # empty when every shard was drained
        return EmbeddingsResult(config=self.cfg, vectors=normalise_rows(left.raw, centre), windows=left.windows,
                                centre=centre, n_windows=self.n_rows, first_row=left.first_row)


def run(lm: LoadedModel, seqs: Sequences, cfg: EmbeddingsConfig = EmbeddingsConfig()) -> "EmbeddingsResult":
    """Every window of an in-memory ``Sequences`` (one shard, nothing drained): all rows in the result."""
    from . import JOB
    from ...sweep import run_jobs

    return run_jobs(lm, seqs, [(JOB, cfg)], cfg.batch_size)[0]
