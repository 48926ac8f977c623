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
each stopped after its deepest layer. The per-neuron statistics are one compiled scan per
layer (``neuron_scan``), run over neurons in parallel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..hooks import forward_until, hook_name, hooked
from ..models import LoadedModel
from ..sequences import Batch, Sequences, batches


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


@dataclass(slots=True)
class Example:
    seq: int
    pos: int
    act: float
    win_start: int
    acts: np.ndarray  # float32 activation of every token in the window


@dataclass
class ExampleTable:
    """One layer's top examples, column by column: neuron ``i``'s examples are the rows
    ``offsets[i]:offsets[i + 1]``, best first; ``win[e, :win_len[e]]`` are the activations of the
    window's tokens. ``table[i]`` gives them as ``Example`` objects."""

    offsets: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    act: np.ndarray
    win_start: np.ndarray
    win_len: np.ndarray
    win: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[Example]:
        return [Example(int(self.seq[e]), int(self.pos[e]), float(self.act[e]), int(self.win_start[e]),
                        self.win[e, : self.win_len[e]]) for e in range(self.offsets[i], self.offsets[i + 1])]


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
    examples: ExampleTable
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
    """Where every token lives. Rows of the corpus are (seq, pos) in corpus order; the scored
    tokens (BOS excluded) are the "columns" of the activation buffers, numbered in the order the
    batches visit them, so one batch fills one contiguous block of columns. Each sequence's
    scored tokens stay contiguous (its first one at ``col_start[seq]``); ``col_key`` is a
    column's place in corpus order, used to break ties the way a stable sort would."""

    def __init__(self, seqs: Sequences, plan: list[Batch]):
        lengths = np.array([len(s) for s in seqs.ids])
        self.lengths = lengths
        self.n = int(lengths.sum())
        self.first = first = seqs.first_scored()
        n_scored = lengths - first
        key_start = np.concatenate([[0], np.cumsum(n_scored)[:-1]])  # corpus-order column of (k, first)
        order = np.array([k for b in plan for k in b.seq_idx], dtype=np.int64)
        self.col_start = np.empty(len(lengths), dtype=np.int64)
        self.col_start[order] = np.concatenate([[0], np.cumsum(n_scored[order])[:-1]])
        self.n_scored = int(n_scored.sum())
        self.col_seq = np.repeat(order, n_scored[order]).astype(np.int32)
        self.col_pos = (np.arange(self.n_scored) - np.repeat(self.col_start[order], n_scored[order]) + first).astype(np.int32)
        self.col_key = key_start[self.col_seq] + self.col_pos - first
        flat = np.concatenate(seqs.ids).astype(np.int64)
        row_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        col_tok = flat[row_start[self.col_seq] + self.col_pos]
        self.tokens, self.tok_u, self.tok_count = np.unique(col_tok, return_inverse=True, return_counts=True)
        self.tok_u = self.tok_u.astype(np.int64)  # token of every column, numbered within ``tokens``


def _layer_groups(lm: LoadedModel, layers: list[int], n_rows: int, budget_mb: int) -> list[list[int]]:
    per_layer = n_rows * lm.d_mlp * 4 / 2**20
    per_group = max(1, int(budget_mb // max(per_layer, 1e-9)))
    return [layers[i : i + per_group] for i in range(0, len(layers), per_group)]


@torch.inference_mode()
def _collect(lm: LoadedModel, plan: list[Batch], index: _Index, layers: list[int], bar):
    """Activations of ``layers``, token-major in batch order (one row per scored token, the
    model's own layout, so storing them is a plain row copy): ``[len(layers), n_scored, d_mlp]``
    and, when sequences start with BOS, the BOS rows ``[len(layers), n_seqs, d_mlp]`` (shown
    only inside example windows)."""
    first = index.first
    acts = torch.empty((len(layers), index.n_scored, lm.d_mlp), dtype=torch.float32)
    bos = torch.empty((len(layers), len(index.lengths), lm.d_mlp), dtype=torch.float32) if first else None
    current: dict[int, torch.Tensor] = {}

    def save(slot):
        def fn(x):
            current[slot] = x

        return fn

    fns = {hook_name(l, "mlp.post"): save(i) for i, l in enumerate(layers)}
    with hooked(lm, fns, stop_after=max(layers)):
        for b in plan:
            forward_until(lm, b.ids)
            T = b.ids.shape[1]
            rows = torch.from_numpy(np.concatenate([r * T + np.arange(first, n) for r, n in enumerate(b.lengths)]))
            c0 = int(index.col_start[b.seq_idx[0]])
            for slot in range(len(layers)):
                x = current[slot]
                flat, dst = x.reshape(-1, lm.d_mlp), acts[slot, c0 : c0 + len(rows)]
                if flat.device.type == "cpu" and flat.dtype == torch.float32:
                    torch.index_select(flat, 0, rows, out=dst)
                else:  # take the rows on the device
                    dst.copy_(flat.index_select(0, rows.to(flat.device)))
                if first:
                    bos[slot][b.seq_idx] = x[:, 0].float().cpu()
            bar.update(sum(b.lengths))
    return acts, bos


def _layer(a: torch.Tensor, bos: torch.Tensor | None, index: _Index, cfg: NeuronsConfig,
           gen: torch.Generator, threads: int) -> dict:
    """Everything one layer's pages show except logit effects, from its token-major acts ``a``
    (the scan runs on ``threads`` threads, one block of neurons each)."""
    from ..store.base import SAMPLE_DTYPE
    from .neuron_scan import scan

    n = a.shape[0]
    rank_key = np.empty(n, dtype=np.int64)  # rank of every corpus-order token in a seeded permutation
    rank_key[torch.randperm(n, generator=gen).numpy()] = np.arange(n)
    rank = rank_key[index.col_key]
    perm = np.empty(n, dtype=np.int64)
    perm[rank] = np.arange(n)
    an = a.numpy()
    lo, hi, mean, std, n_pos, hist, sp_n, sp_col, sp_act, ex_n, ex_col, tt_u, tt_mean = scan(
        an, perm, rank, min(n, max(4096, n // 4)), index.col_key, index.col_seq, index.col_pos,
        index.tok_u, index.tok_count, cfg.min_token_count, min(cfg.n_top_tokens, len(index.tokens)),
        cfg.n_bins, cfg.samples_per_bin, min(n, cfg.top_k * 8), cfg.top_k, cfg.ctx_before, threads)
    taken = np.arange(sp_col.shape[1]) < sp_n[:, None]
    cols = sp_col[taken]
    rec = np.empty(len(cols), dtype=SAMPLE_DTYPE)
    rec["seq"], rec["pos"], rec["act"] = index.col_seq[cols], index.col_pos[cols], sp_act[taken]
    found = tt_u >= 0
    return dict(
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        max=hi,
        min=lo,
        frac_pos=(n_pos / n).astype(np.float32),
        hist=hist,
        hist_lo=lo.copy(),
        hist_hi=hi.copy(),
        spectrum=np.split(rec, np.cumsum(sp_n)[:-1]),
        top_tokens=np.where(found, index.tokens[np.maximum(tt_u, 0)], -1),
        top_token_means=tt_mean.astype(np.float32),
        top_token_counts=np.where(found, index.tok_count[np.maximum(tt_u, 0)], 0),
        examples=_examples(an, bos, ex_n, ex_col, index, cfg),
    )


def _examples(an: np.ndarray, bos: torch.Tensor | None, ex_n: np.ndarray, ex_col: np.ndarray, index: _Index,
              cfg: NeuronsConfig) -> ExampleTable:
    """The kept top examples (``ex_col[i, :ex_n[i]]``, best first) with every window token's activation."""
    from .neuron_scan import windows

    taken = np.arange(ex_col.shape[1]) < ex_n[:, None]
    cols = ex_col[taken]
    nrn = np.nonzero(taken)[0]
    bos_a = bos.numpy() if bos is not None else np.zeros((1, an.shape[1]), np.float32)
    off, start, length, win = windows(an, bos_a, ex_n, ex_col, index.col_seq, index.col_pos, index.col_start,
                                      index.lengths, index.first, cfg.ctx_before, cfg.ctx_after)
    return ExampleTable(offsets=off, seq=index.col_seq[cols].astype(np.int64), pos=index.col_pos[cols].astype(np.int64),
                        act=an[cols, nrn], win_start=start, win_len=length, win=win)


def run(lm: LoadedModel, seqs: Sequences, cfg: NeuronsConfig = NeuronsConfig()) -> NeuronsResult:
    """Compute everything the neuron pages show, for ``cfg.layers`` (default all)."""
    layers = list(cfg.layers) if cfg.layers is not None else list(range(lm.n_layers))
    for l in layers:
        lm.check_layer(l)
    plan = list(batches(seqs, cfg.batch_size))
    index = _Index(seqs, plan)
    if index.n_scored == 0:
        raise ValueError("the corpus has no tokens to score (every sequence is only a BOS)")
    gen = torch.Generator().manual_seed(cfg.seed)
    threads = max(1, torch.get_num_threads())
    groups = _layer_groups(lm, layers, index.n, cfg.memory_budget_mb)
    result = NeuronsResult(config=cfg, n_scored=index.n_scored)
    with tqdm(total=index.n * len(groups), desc="neurons", unit="tok", unit_scale=True) as bar:
        for group in groups:
            acts, bos = _collect(lm, plan, index, group, bar)
            for slot, layer in enumerate(group):
                st = _layer(acts[slot], None if bos is None else bos[slot], index, cfg, gen, threads)
                effects = lm.neuron_logit_effects(layer).cpu()
                nl = min(cfg.n_logit_tokens, effects.shape[1])
                top_v, top_i = torch.topk(effects, nl, dim=1)
                bot_v, bot_i = torch.topk(-effects, nl, dim=1)
                result.layers.append(
                    LayerNeurons(
                        layer=layer,
                        logit_top=top_i.numpy(),
                        logit_top_values=top_v.numpy(),
                        logit_bottom=bot_i.numpy(),
                        logit_bottom_values=(-bot_v).numpy(),
                        **st,
                    )
                )
            del acts, bos
    return result
