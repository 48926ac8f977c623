"""Neuron job: for every MLP neuron of every layer, over the whole corpus,

- top-K max-activating examples (windows around the max token, with every token's activation),
  overlapping windows of one neuron dropped so one passage cannot fill the list;
- a histogram on ``n_bins`` equal bins from the neuron's min to max, and mean/std/max/min and
  the fraction of tokens above zero;
- a spectrum sample: up to ``samples_per_bin`` tokens drawn at random (seeded) from every bin,
  so a page can colour the whole distribution by a hypothesis (Neel Nanda's spectrum plot);
- the tokens with the highest mean activation (tokens seen at least ``min_token_count`` times);
- direct logit effects: the top and bottom entries of ``W_out[neuron] @ W_U``.

BOS positions are fed to the model but never scored. Activations are kept in memory in float32
for a group of layers at a time (``memory_budget_mb``); more groups cost more forward passes,
each stopped after its deepest layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..hooks import forward_until, hook_name, hooked
from ..models import LoadedModel
from ..sequences import Sequences, batches


@dataclass(frozen=True)
class NeuronsConfig:
    top_k: int = 20
    ctx_before: int = 24
    ctx_after: int = 4
    n_bins: int = 50
    samples_per_bin: int = 10
    n_top_tokens: int = 10
    min_token_count: int = 3
    n_logit_tokens: int = 10
    batch_size: int = 32
    layers: tuple[int, ...] | None = None
    memory_budget_mb: int = 2048
    seed: int = 0

    def __post_init__(self):
        for name in ("top_k", "n_bins", "samples_per_bin", "batch_size", "memory_budget_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.ctx_before < 0 or self.ctx_after < 0:
            raise ValueError("context sizes must be >= 0")

    def params(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class Example:
    seq: int
    pos: int
    act: float
    win_start: int
    acts: np.ndarray  # float32 activation of every token in the window


@dataclass
class LayerNeurons:
    layer: int
    mean: np.ndarray
    std: np.ndarray
    max: np.ndarray
    min: np.ndarray
    frac_pos: np.ndarray
    hist: np.ndarray  # [d_mlp, n_bins] int64
    hist_lo: np.ndarray
    hist_hi: np.ndarray
    examples: list[list[Example]]
    spectrum: list[np.ndarray]  # per neuron: SAMPLE_DTYPE records
    top_tokens: np.ndarray  # [d_mlp, n] token ids (-1: none)
    top_token_means: np.ndarray
    top_token_counts: np.ndarray
    logit_top: np.ndarray  # [d_mlp, n] token ids
    logit_top_values: np.ndarray
    logit_bottom: np.ndarray
    logit_bottom_values: np.ndarray


@dataclass
class NeuronsResult:
    config: NeuronsConfig
    layers: list[LayerNeurons] = field(default_factory=list)
    n_scored: int = 0


class _Index:
    """Flat token index over all sequences: row r of the activation buffer is (seq, pos)."""

    def __init__(self, seqs: Sequences):
        lengths = np.array([len(s) for s in seqs.ids])
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.lengths = lengths
        self.n = int(lengths.sum())
        self.seq = np.repeat(np.arange(len(lengths)), lengths)
        self.pos = np.arange(self.n) - np.repeat(self.starts, lengths)
        self.tok = np.concatenate(seqs.ids).astype(np.int64)
        first = seqs.first_scored()
        self.scored = np.nonzero(self.pos >= first)[0]


def _layer_groups(lm: LoadedModel, layers: list[int], n_rows: int, budget_mb: int) -> list[list[int]]:
    per_layer = n_rows * lm.d_mlp * 4 / 2**20
    per_group = max(1, int(budget_mb // max(per_layer, 1e-9)))
    return [layers[i : i + per_group] for i in range(0, len(layers), per_group)]


@torch.inference_mode()
def _collect(lm: LoadedModel, seqs: Sequences, index: _Index, layers: list[int], cfg: NeuronsConfig, bar) -> torch.Tensor:
    """Activations of ``layers`` for every token: [n_rows, len(layers), d_mlp] float32 on CPU."""
    buf = torch.empty((index.n, len(layers), lm.d_mlp), dtype=torch.float32)
    current: dict[int, torch.Tensor] = {}

    def save(slot):
        def fn(x):
            current[slot] = x

        return fn

    fns = {hook_name(l, "mlp.post"): save(i) for i, l in enumerate(layers)}
    with hooked(lm, fns, stop_after=max(layers)):
        for b in batches(seqs, cfg.batch_size):
            forward_until(lm, b.ids)
            for slot in range(len(layers)):
                acts = current[slot].float().cpu()
                for r, (k, n) in enumerate(zip(b.seq_idx, b.lengths)):
                    s = index.starts[k]
                    buf[s : s + n, slot] = acts[r, :n]
            bar.update(sum(b.lengths))
    return buf


def _top_examples(a: torch.Tensor, index: _Index, scored: torch.Tensor, full: torch.Tensor, cfg: NeuronsConfig) -> list[list[Example]]:
    """Top-k per neuron without overlapping windows. ``a``: [n_scored, d] acts of scored rows;
    ``full``: [n_rows, d] acts of all rows (for windows, BOS included)."""
    n_cand = min(a.shape[0], cfg.top_k * 8)
    vals, idx = torch.topk(a, n_cand, dim=0)  # [n_cand, d]
    rows = scored[idx].numpy()
    cand_seq, cand_pos = index.seq[rows].T.tolist(), index.pos[rows].T.tolist()
    vals_t = vals.T.tolist()
    full_np = full.numpy()
    out = []
    for n in range(a.shape[1]):
        kept: list[Example] = []
        seqs, poss, vs = cand_seq[n], cand_pos[n], vals_t[n]
        for c in range(n_cand):
            k, p = seqs[c], poss[c]
            if any(e.seq == k and abs(e.pos - p) <= cfg.ctx_before for e in kept):
                continue
            start = max(0, p - cfg.ctx_before)
            end = min(int(index.lengths[k]), p + cfg.ctx_after + 1)
            base = int(index.starts[k])
            kept.append(Example(k, p, vs[c], start, full_np[base + start : base + end, n].copy()))
            if len(kept) == cfg.top_k:
                break
        out.append(kept)
    return out


def _histograms(a: torch.Tensor, n_bins: int, chunk: int = 8192):
    """Counts on ``n_bins`` equal bins from each neuron's min to max, and every token's bin."""
    lo = a.min(dim=0).values
    hi = a.max(dim=0).values
    width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    d = a.shape[1]
    offsets = torch.arange(d, dtype=torch.int64) * n_bins
    counts = torch.zeros(d * n_bins, dtype=torch.int64)
    bins = torch.empty(a.shape, dtype=torch.int16)
    for s in range(0, a.shape[0], chunk):
        b = ((a[s : s + chunk] - lo) / width * n_bins).floor_().clamp_(0, n_bins - 1).to(torch.int64)
        bins[s : s + chunk] = b
        counts += torch.bincount((b + offsets).flatten(), minlength=d * n_bins)
    return counts.view(d, n_bins), lo, hi, bins


def _spectrum(bins: torch.Tensor, a: torch.Tensor, scored: torch.Tensor, index: _Index, cfg: NeuronsConfig, gen) -> list[np.ndarray]:
    """Up to ``samples_per_bin`` rows per histogram bin, per neuron, uniformly at random.

    Every token gets a random rank (one permutation shared by all neurons); each pass picks,
    for every (neuron, bin), the unpicked token of smallest rank (``scatter_reduce`` amin), so
    ``samples_per_bin`` passes give the first tokens of each bin in random order.
    """
    from ..store.base import SAMPLE_DTYPE

    n, d = bins.shape
    n_bins = cfg.n_bins
    perm = torch.randperm(n, generator=gen)  # rank -> row
    dtype = torch.float32 if n < 2**24 else torch.float64  # ranks must be exact
    rank = torch.empty(n, dtype=dtype)
    rank[perm] = torch.arange(n, dtype=dtype)  # row -> rank
    out = []
    for c0 in range(0, d, 256):
        b = bins[:, c0 : c0 + 256].T.to(torch.int64).contiguous()  # [chunk, n]
        key = rank.expand(b.shape[0], n).clone()
        picks = []
        for _ in range(cfg.samples_per_bin):
            m = torch.full((b.shape[0], n_bins), torch.inf, dtype=dtype)
            m.scatter_reduce_(1, b, key, reduce="amin", include_self=True)
            ok = torch.isfinite(m)
            if not ok.any():
                break
            rows = perm[m.clamp(max=n - 1).long()]  # [chunk, n_bins] picked rows
            picks.append(torch.where(ok, rows, torch.full_like(rows, -1)))
            key.scatter_(1, rows, torch.where(ok, torch.inf, key.gather(1, rows)))
        picked = torch.stack(picks, dim=2).view(b.shape[0], -1) if picks else torch.empty((b.shape[0], 0), dtype=torch.long)
        for j in range(b.shape[0]):
            sel = picked[j][picked[j] >= 0]
            sel = sel[torch.argsort(a[sel, c0 + j])]
            rows = scored[sel].numpy()
            rec = np.empty(len(rows), dtype=SAMPLE_DTYPE)
            rec["seq"] = index.seq[rows]
            rec["pos"] = index.pos[rows]
            rec["act"] = a[sel, c0 + j].numpy()
            out.append(rec)
    return out


def _top_tokens(a: torch.Tensor, toks: torch.Tensor, vocab: int, cfg: NeuronsConfig):
    sums = torch.zeros((vocab, a.shape[1]), dtype=torch.float64)
    sums.index_add_(0, toks, a.double())
    counts = torch.bincount(toks, minlength=vocab)
    means = sums / counts.clamp(min=1)[:, None]
    means[counts < cfg.min_token_count] = -torch.inf
    k = min(cfg.n_top_tokens, vocab)
    vals, ids = torch.topk(means, k, dim=0)  # [k, d]
    ids = torch.where(torch.isfinite(vals), ids, torch.full_like(ids, -1))
    return ids.T.numpy(), vals.T.float().numpy(), counts[ids.clamp(min=0)].T.numpy() * (ids.T.numpy() >= 0)


def run(lm: LoadedModel, seqs: Sequences, cfg: NeuronsConfig = NeuronsConfig()) -> NeuronsResult:
    """Compute everything the neuron pages show, for ``cfg.layers`` (default all)."""
    layers = list(cfg.layers) if cfg.layers is not None else list(range(lm.n_layers))
    for l in layers:
        lm.check_layer(l)
    index = _Index(seqs)
    scored = torch.from_numpy(index.scored)
    toks = torch.from_numpy(index.tok[index.scored])
    gen = torch.Generator().manual_seed(cfg.seed)
    groups = _layer_groups(lm, layers, index.n, cfg.memory_budget_mb)
    result = NeuronsResult(config=cfg, n_scored=len(index.scored))
    with tqdm(total=index.n * len(groups), desc="neurons", unit="tok", unit_scale=True) as bar:
        for group in groups:
            buf = _collect(lm, seqs, index, group, cfg, bar)
            for slot, layer in enumerate(group):
                full = buf[:, slot]
                a = full[scored]
                counts, lo, hi, bins = _histograms(a, cfg.n_bins)
                effects = lm.neuron_logit_effects(layer).cpu()
                nl = min(cfg.n_logit_tokens, effects.shape[1])
                top_v, top_i = torch.topk(effects, nl, dim=1)
                bot_v, bot_i = torch.topk(-effects, nl, dim=1)
                tt_ids, tt_means, tt_counts = _top_tokens(a, toks, lm.vocab_size, cfg)
                result.layers.append(
                    LayerNeurons(
                        layer=layer,
                        mean=a.mean(0).numpy(),
                        std=a.std(0).numpy() if a.shape[0] > 1 else np.zeros(a.shape[1], np.float32),
                        max=hi.numpy(),
                        min=lo.numpy(),
                        frac_pos=(a > 0).float().mean(0).numpy(),
                        hist=counts.numpy(),
                        hist_lo=lo.numpy(),
                        hist_hi=hi.numpy(),
                        examples=_top_examples(a, index, scored, full, cfg),
                        spectrum=_spectrum(bins, a, scored, index, cfg, gen),
                        top_tokens=tt_ids,
                        top_token_means=tt_means,
                        top_token_counts=tt_counts,
                        logit_top=top_i.numpy(),
                        logit_top_values=top_v.numpy(),
                        logit_bottom=bot_i.numpy(),
                        logit_bottom_values=(-bot_v).numpy(),
                    )
                )
            del buf
    return result
