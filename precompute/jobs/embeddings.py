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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..models import LoadedModel
from ..sequences import Sequences, batches

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
    config: EmbeddingsConfig
    vectors: np.ndarray  # [n_windows, d_model] float16, rows L2-normalised
    windows: np.ndarray  # WINDOW_DTYPE records, one per row
    centre: np.ndarray  # [d_model] float32, subtracted before normalising (zeros when center=False)
    pooling: str = "final_norm_mean"


def window_spans(length: int, first: int, window: int, min_tokens: int) -> list[tuple[int, int]]:
    """Windows [start, end) over positions ``first .. length-1`` of one sequence."""
    spans = [(s, min(s + window, length)) for s in range(first, length, window)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < min_tokens:
        last = spans.pop()
        spans[-1] = (spans[-1][0], last[1])
    return spans


def make_windows(seqs: Sequences, cfg: EmbeddingsConfig) -> np.ndarray:
    first = seqs.first_scored()
    rows = []
    for k, ids in enumerate(seqs.ids):
        for s, e in window_spans(len(ids), first, cfg.window, cfg.min_tokens):
            rows.append((k, s, e))
    return np.array(rows, dtype=WINDOW_DTYPE)


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


@torch.inference_mode()
def run(lm: LoadedModel, seqs: Sequences, cfg: EmbeddingsConfig = EmbeddingsConfig()) -> EmbeddingsResult:
    windows = make_windows(seqs, cfg)
    raw = np.zeros((len(windows), lm.d_model), dtype=np.float32)
    # window rows of each sequence, in order
    by_seq: dict[int, list[int]] = {}
    for r, k in enumerate(windows["seq"]):
        by_seq.setdefault(int(k), []).append(r)
    with _FinalNorm(lm) as cap, tqdm(total=seqs.n_tokens, desc="embeddings", unit="tok", unit_scale=True) as bar:
        for b in batches(seqs, cfg.batch_size):
            lm.forward(b.ids)
            h = cap.out.float().cpu()
            for i, k in enumerate(b.seq_idx):
                rows = by_seq.get(int(k), [])
                if not rows:
                    continue
                raw[rows] = torch.stack([h[i, windows["start"][r] : windows["end"][r]].mean(0) for r in rows]).numpy()
            bar.update(sum(b.lengths))
    centre = raw.mean(0) if cfg.center and len(raw) > 1 else np.zeros(lm.d_model, np.float32)
    out = _normalise(raw - centre).astype(np.float16)
    return EmbeddingsResult(config=cfg, vectors=out, windows=windows, centre=centre.astype(np.float32))
