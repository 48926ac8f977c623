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

import math
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
    """Flat token index over all sequences: row r of the corpus is (seq, pos); scored rows
    (BOS excluded) are numbered 0..n_scored-1 in the same order ("columns" of the buffers)."""

    def __init__(self, seqs: Sequences):
        lengths = np.array([len(s) for s in seqs.ids])
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.lengths = lengths
        self.n = int(lengths.sum())
        self.seq = np.repeat(np.arange(len(lengths)), lengths)
        self.pos = np.arange(self.n) - np.repeat(self.starts, lengths)
        self.tok = np.concatenate(seqs.ids).astype(np.int64)
        self.first = first = seqs.first_scored()
        self.scored = np.nonzero(self.pos >= first)[0]
        self.col_start = self.starts - np.arange(len(lengths)) * first  # column of (k, first)
        self.col_seq = self.seq[self.scored].astype(np.int32)
        self.col_pos = self.pos[self.scored].astype(np.int32)


def _layer_groups(lm: LoadedModel, layers: list[int], n_rows: int, budget_mb: int) -> list[list[int]]:
    per_layer = n_rows * lm.d_mlp * 4 / 2**20
    per_group = max(1, int(budget_mb // max(per_layer, 1e-9)))
    return [layers[i : i + per_group] for i in range(0, len(layers), per_group)]


@torch.inference_mode()
def _collect(lm: LoadedModel, seqs: Sequences, index: _Index, layers: list[int], cfg: NeuronsConfig, bar):
    """Activations of ``layers``, neuron-major so every per-neuron reduction reads one contiguous
    row: scored tokens ``[len(layers), d_mlp, n_scored]`` and, when sequences start with BOS,
    the BOS tokens ``[len(layers), d_mlp, n_seqs]`` (only shown inside example windows)."""
    first = index.first
    acts = torch.empty((len(layers), lm.d_mlp, len(index.scored)), dtype=torch.float32)
    bos = torch.empty((len(layers), lm.d_mlp, len(index.lengths)), dtype=torch.float32) if first else None
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
                x = current[slot].float().cpu()
                dst = acts[slot]
                for r, (k, n) in enumerate(zip(b.seq_idx, b.lengths)):
                    c = int(index.col_start[k])
                    dst[:, c : c + n - first].copy_(x[r, first:n].T)
                if first:
                    bos[slot][:, b.seq_idx] = x[:, 0].T
            bar.update(sum(b.lengths))
    return acts, bos


def _top_candidates(a: torch.Tensor, n_cand: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``n_cand`` values of every row and their columns, ordered by value descending, then
    column ascending (so ties go to the earlier sequence/position, like a stable sort).

    Long rows go through block maxima: an element of the top ``n_cand`` lies in the tail or in
    a block whose max is at least the ``n_cand``-th value, and at most ``n_cand`` blocks have
    such a max, so the ``n_cand`` best blocks (plus the tail) hold all of them."""
    d, n = a.shape
    blk = 32
    nb = n // blk
    if nb >= 4 * n_cand:
        bm = a.as_strided((d, nb, blk), (a.stride(0), blk, 1)).amax(2)
        top_blocks = torch.topk(bm, n_cand, dim=1, sorted=False).indices
        cols = (top_blocks[:, :, None] * blk + torch.arange(blk)).view(d, -1)
        if n > nb * blk:
            cols = torch.cat([cols, torch.arange(nb * blk, n).expand(d, -1)], dim=1)
        vals, j = torch.topk(a.gather(1, cols), n_cand, dim=1, sorted=False)
        cols = cols.gather(1, j)
    else:
        vals, cols = torch.topk(a, n_cand, dim=1, sorted=False)
    cols, o = torch.sort(cols, dim=1)
    vals = vals.gather(1, o)
    vals, o = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, cols.gather(1, o)


def _top_examples(a: torch.Tensor, bos: torch.Tensor | None, index: _Index, cfg: NeuronsConfig) -> list[list[Example]]:
    """Top-k per neuron without overlapping windows (greedy over the candidates in order).
    ``a``: [d, n_scored] acts of scored tokens; ``bos``: [d, n_seqs] acts of the BOS tokens."""
    d, n = a.shape
    n_cand = min(n, cfg.top_k * 8)
    vals, cols = _top_candidates(a, n_cand)
    vals, cols = vals.numpy(), cols.numpy()
    cseq, cpos = index.col_seq[cols], index.col_pos[cols]  # [d, n_cand]
    kept = np.zeros((d, n_cand), dtype=bool)
    count = np.zeros(d, dtype=np.int64)
    live = np.arange(d)
    for c in range(n_cand):  # one step of every neuron's greedy scan at once
        s, p = cseq[live, c : c + 1], cpos[live, c : c + 1]
        clash = (cseq[live, :c] == s) & (np.abs(cpos[live, :c] - p) <= cfg.ctx_before) & kept[live, :c]
        ok = ~clash.any(1)
        kept[live[ok], c] = True
        count[live[ok]] += 1
        live = live[count[live] < cfg.top_k]
        if not len(live):
            break
    nn_, cc = np.nonzero(kept)  # row-major: per neuron, in candidate (value) order
    k, p = cseq[nn_, cc].astype(np.int64), cpos[nn_, cc].astype(np.int64)
    start = np.maximum(0, p - cfg.ctx_before)
    end = np.minimum(index.lengths[k], p + cfg.ctx_after + 1)
    w = np.arange(cfg.ctx_before + cfg.ctx_after + 1)
    wpos = start[:, None] + w
    wcol = np.clip(index.col_start[k][:, None] + wpos - index.first, 0, n - 1)
    win = a.numpy()[nn_[:, None], wcol]
    if bos is not None:
        at_bos = wpos == 0
        win[at_bos] = bos.numpy()[nn_[:, None], k[:, None]].repeat(len(w), 1)[at_bos]
    lens = (end - start).tolist()
    acts = vals[nn_, cc].tolist()
    out: list[list[Example]] = [[] for _ in range(d)]
    for e, (nrn, kk, pp, st) in enumerate(zip(nn_.tolist(), k.tolist(), p.tolist(), start.tolist())):
        out[nrn].append(Example(kk, pp, acts[e], st, win[e, : lens[e]].copy()))
    return out


def _pass(a: torch.Tensor, index: _Index, toks: torch.Tensor, vocab: int, cfg: NeuronsConfig, gen):
    """All order-free statistics and the spectrum sample of one layer, ``a`` [d, n] scored acts.

    Spectrum: one seeded random permutation of the tokens gives every token a rank; a bin's
    sample is its ``samples_per_bin`` tokens of smallest rank, i.e. the first ones met in a
    uniformly random order, which is a uniform random subset of the bin (the rule the
    previous implementation used too: the same permutation picks the same tokens). Found in
    two steps with exactly that result: (1) scan the tokens of the first ``m`` ranks in rank
    order; a bin that meets ``samples_per_bin`` tokens there is done (a later rank cannot beat
    them); (2) for every other bin (the sparse ones), collect all its tokens and keep the
    smallest ranks (see the comments there). So the sample stays exactly uniform within each bin; only the work done
    to find it depends on ``m``.
    """
    from ..store.base import SAMPLE_DTYPE

    d, n = a.shape
    nb, S = cfg.n_bins, cfg.samples_per_bin
    lo, hi = a.amin(1), a.amax(1)
    width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    bdt = torch.uint8 if nb <= 256 else torch.int16 if nb <= 2**15 else torch.int32
    bins = torch.empty((d, n), dtype=bdt)  # every token's histogram bin
    tsums = torch.zeros((d, vocab), dtype=torch.float64)  # per-token sums (top tokens, mean)
    pos_count = torch.zeros(d, dtype=torch.float64)
    C = max(1, 2**20 // max(n, 1))
    for r0 in range(0, d, C):
        x = a[r0 : r0 + C]
        bins[r0 : r0 + C] = ((x - lo[r0 : r0 + C, None]) / width[r0 : r0 + C, None] * nb).clamp_(0, nb - 1).to(bdt)
        tsums[r0 : r0 + C].index_add_(1, toks, x.double())
        pos_count[r0 : r0 + C] = x.clamp(min=0).sign_().sum(1) if n < 2**24 else x.gt(0).sum(1).double()
    mean = (tsums.sum(1) / n).float()
    std = torch.zeros(d, dtype=torch.float32)
    if n > 1:
        for r0 in range(0, d, C):
            std[r0 : r0 + C] = torch.linalg.vector_norm(a[r0 : r0 + C] - mean[r0 : r0 + C, None], dim=1)
        std /= math.sqrt(n - 1)
    hist = torch.stack([torch.bincount(bins[i].int() if bdt != torch.uint8 else bins[i], minlength=nb) for i in range(d)]) if d else torch.zeros((0, nb), dtype=torch.int64)

    # spectrum step 1: the first m ranks, in rank order
    perm = torch.randperm(n, generator=gen)  # rank -> column
    m = min(n, max(4096, n // 4))
    prefix = perm[:m].numpy()
    bp = bins.index_select(1, perm[:m]).numpy()
    ar = np.arange(S)
    picks_r, picks_c = [], []
    need = np.zeros((d, nb), dtype=bool)
    for i in range(d):
        row = bp[i]
        order = np.argsort(row, kind="stable")
        cnt = np.bincount(row, minlength=nb)
        full = cnt >= S
        need[i] = ~full
        sel = order[((np.cumsum(cnt) - cnt)[full][:, None] + ar).ravel()]
        picks_c.append(prefix[sel])
        picks_r.append(np.full(len(sel), i))
    # step 2: all tokens of the unfinished bins, smallest ranks kept. Unfinished bins below the
    # first finished bin and above the last are tails (two comparisons); unfinished bins between
    # finished ones get a per-neuron lookup.
    done = ~need
    any_done = done.any(1)
    first_done = np.where(any_done, done.argmax(1), nb)
    last_done = np.where(any_done, nb - 1 - done[:, ::-1].argmax(1), -1)
    bn = bins.numpy()
    flat = []
    for r0 in range(0, d, C):
        blk = bn[r0 : r0 + C]
        mask = (blk < first_done[r0 : r0 + C, None]) | (blk > last_done[r0 : r0 + C, None])
        flat.append(np.flatnonzero(mask) + r0 * n)
    mid = need & (np.arange(nb) > first_done[:, None]) & (np.arange(nb) < last_done[:, None])
    flat += [np.flatnonzero(mid[i][bn[i]]) + i * n for i in np.nonzero(mid.any(1))[0]]
    flat = np.concatenate(flat)
    if len(flat):
        rr, cc = np.divmod(flat, n)
        grp = rr * nb + bn.ravel()[flat]
        rank = np.empty(n, dtype=np.int64)
        rank[perm.numpy()] = np.arange(n)
        o = np.lexsort((rank[cc], grp))
        grp, rr, cc = grp[o], rr[o], cc[o]
        keep = np.arange(len(grp)) - np.searchsorted(grp, grp, side="left") < S
        picks_r.append(rr[keep])
        picks_c.append(cc[keep])

    # spectrum records, per neuron sorted by activation
    pr = np.concatenate(picks_r).astype(np.int64) if picks_r else np.zeros(0, np.int64)
    pc = np.concatenate(picks_c).astype(np.int64) if picks_c else np.zeros(0, np.int64)
    av = a.numpy()[pr, pc]
    o = np.argsort(av)
    o = o[np.argsort(pr[o].astype(np.uint16 if d <= 2**16 else np.int64), kind="stable")]  # by neuron, then act
    pr, pc, av = pr[o], pc[o], av[o]
    rec = np.empty(len(pr), dtype=SAMPLE_DTYPE)
    rec["seq"], rec["pos"], rec["act"] = index.col_seq[pc], index.col_pos[pc], av
    spectrum = [r.copy() for r in np.split(rec, np.searchsorted(pr, np.arange(1, d)))]

    # top tokens by mean activation
    counts = torch.bincount(toks, minlength=vocab)
    means = tsums / counts.clamp(min=1)
    means[:, counts < cfg.min_token_count] = -torch.inf
    k = min(cfg.n_top_tokens, vocab)
    tv, ti = torch.topk(means, k, dim=1)
    ti = torch.where(torch.isfinite(tv), ti, torch.full_like(ti, -1))
    top_tokens = (ti.numpy(), tv.float().numpy(), counts[ti.clamp(min=0)].numpy() * (ti.numpy() >= 0))
    return dict(
        mean=mean.numpy(),
        std=std.numpy(),
        max=hi.numpy(),
        min=lo.numpy(),
        frac_pos=(pos_count / n).float().numpy(),
        hist=hist.numpy(),
        hist_lo=lo.numpy(),
        hist_hi=hi.numpy(),
        spectrum=spectrum,
        top_tokens=top_tokens,
    )


def run(lm: LoadedModel, seqs: Sequences, cfg: NeuronsConfig = NeuronsConfig()) -> NeuronsResult:
    """Compute everything the neuron pages show, for ``cfg.layers`` (default all)."""
    layers = list(cfg.layers) if cfg.layers is not None else list(range(lm.n_layers))
    for l in layers:
        lm.check_layer(l)
    index = _Index(seqs)
    toks = torch.from_numpy(index.tok[index.scored])
    gen = torch.Generator().manual_seed(cfg.seed)
    groups = _layer_groups(lm, layers, index.n, cfg.memory_budget_mb)
    result = NeuronsResult(config=cfg, n_scored=len(index.scored))
    with tqdm(total=index.n * len(groups), desc="neurons", unit="tok", unit_scale=True) as bar:
        for group in groups:
            acts, bos = _collect(lm, seqs, index, group, cfg, bar)
            for slot, layer in enumerate(group):
                a = acts[slot]
                st = _pass(a, index, toks, lm.vocab_size, cfg, gen)
                tt_ids, tt_means, tt_counts = st.pop("top_tokens")
                effects = lm.neuron_logit_effects(layer).cpu()
                nl = min(cfg.n_logit_tokens, effects.shape[1])
                top_v, top_i = torch.topk(effects, nl, dim=1)
                bot_v, bot_i = torch.topk(-effects, nl, dim=1)
                result.layers.append(
                    LayerNeurons(
                        layer=layer,
                        examples=_top_examples(a, None if bos is None else bos[slot], index, cfg),
                        top_tokens=tt_ids,
                        top_token_means=tt_means,
                        top_token_counts=tt_counts,
                        logit_top=top_i.numpy(),
                        logit_top_values=top_v.numpy(),
                        logit_bottom=bot_i.numpy(),
                        logit_bottom_values=(-bot_v).numpy(),
                        **st,
                    )
                )
            del acts, bos
    return result
