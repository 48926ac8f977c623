"""Neuron job: for every MLP neuron of the chosen layers, over the whole corpus, in one streaming
sweep (``sweep.py``) whose memory depends on the model, not on the corpus.

BOS positions are fed to the model but never scored. A token's *key* is its global corpus-order
index (``Batch.keys[r] + pos``). Every statistic below is exact and mergeable: an accumulator
folds batches in (``update``), shards merge in order (``merge``), and the result does not depend
on how the corpus was cut into shards or batches (floating-point sums aside, see 4 and 5).

1. **Top-K examples**: all scored tokens ordered by activation descending, ties by key
   ascending; greedily, a token within ``ctx_before`` positions of an already kept one of the same
   sequence is dropped; the first ``top_k`` kept. Since overlaps never cross sequences and a
   sequence lies in one batch, this is the best K (same order) of the union over sequences of
   each sequence's own greedy-kept tokens, and the greedy decisions of tokens ahead of a
   threshold depend only on tokens ahead of it. So per batch only tokens ahead of a neuron's
   current K-th kept example are candidates (at most ``top_k * (2 * ctx_before + 1)`` of them
   matter: that many candidates hold at least K kept ones); while it has fewer than K, those
   ahead of a fine-bin edge of the histogram, lowered until K kept ones are above it. Each kept
   example stores the activation of every token of its window
   ``[pos - ctx_before, pos + ctx_after]`` (clipped to the sequence, BOS included), copied when it
   enters the list. Merge: the best K of the union.
2. **Histogram**: fine bins of width ``2^e``, bin ``k = floor(x / 2^e)`` (exact in float64). ``e`` is
   the smallest integer ``>= E_MIN`` (-40) for which ``floor(max / 2^e) - floor(min / 2^e) < 256``
   (and ``|k| < 2^50``): a function of the neuron's min and max only, so any sharding gives the
   same ``e``. When a value does not fit, ``e`` grows and the counts re-bin exactly
   (``k -> k >> d``). Shown: ``g = max(1, round(span / n_bins))`` consecutive fine bins per bar
   (``span = kmax - kmin + 1``, round half up), from ``kmin``; edges ``(kmin + i * g) * 2^e`` for
   ``i = 0 .. ceil(span / g)`` (about 43-58 bars covering min..max). Counts are exact int64 and
   sum to the number of scored tokens.
3. **Spectrum sample**: per shown bar, the ``samples_per_bin`` tokens with the smallest
   ``splitmix64(key ^ splitmix64(seed))`` (a bijection, so no ties): a uniform random subset of
   the bar, the same for any sharding. Each fine bin keeps the S smallest (re-binning merges
   them exactly); a bar takes the S smallest over its fine bins. Stored with the token's context
   (12 tokens before, 3 after, clipped to the sequence), read at ``finish``.
4. **Moments**: mean and M2 in float64 per batch (sums shifted by the running mean), combined
   with Chan's parallel formula in batch and shard order; ``std = sqrt(M2 / n)`` (population, as
   ``np.std``); min, max, count above zero. Different shardings agree to about 1e-15 relative.
5. **Top tokens**: per (token, neuron) sum of the activations each rounded to a multiple of
   ``2^-24`` (half to even), kept as an int64 count of those units (exact in any order, and far
   finer than the shown means), and an int64 count of the token; the ``n_top_tokens`` highest
   means among tokens seen ``>= min_token_count`` times, ties by token id. Dense over the vocabulary
   when ``vocab * d_mlp * layers * 8`` bytes fit ``token_sums_mb``; otherwise only the ``M`` most
   frequent tokens of the first shard (ties by id; ``prepare``) are tracked, and the result says so
   (``top_tokens_among``).
6. **Direct logit effects**: the top and bottom entries of ``W_out[neuron] @ W_U`` (final norm
   folded), at ``finish``: among all tokens, and among the tokens seen in the corpus (a tracked
   token with a count above zero; scored tokens are exactly the prediction targets).
7. **Bottom-K examples**: definition 1 on the negated activations (lowest first, ties by key),
   by the same kernels (``scan._top_step`` with ``low``: the histogram floor comes from the low
   end), so they merge exactly too.
8. **BOS activation**: each neuron's activation at position 0 of the sequence with the smallest
   index that has a BOS (every BOS is the same token at the same position); never scored.

**Units.** By default the units are the MLP neurons (hook_post) of the chosen layers. With
``cfg.sae`` (a stored SAE, ``precompute.sae.model.FeatureUnits``) they are that SAE's features on
its one layer: each batch's hook_post is encoded by the SAE, and everything above runs on the
feature activations unchanged; a feature's direct logit effect is ``W_dec[f] @ W_out @ W_U``.

The per-batch update is one compiled kernel per layer (``scan.update_block``) run over neuron
blocks on threads (``backend="numba"``, the CPU default), or torch ops on the model's device
(``"torch"``, the CUDA default), which reduce there so only small results reach the CPU.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from ...models import LoadedModel
from ...sae.model import FeatureUnits
from ...sequences import Batch, Sequences
from ...sweep import Captured, Needs
from ..compiled import kernel_pool, notice_compiling
from . import scan

Backend = Literal["auto", "numba", "torch"]
BACKENDS: dict[str, str] = {"auto": "numba on CPU, torch on CUDA", "numba": "compiled CPU kernels",
                            "torch": "torch ops on the model's device"}
CTX_BEFORE, CTX_AFTER = 12, 3  # a spectrum sample's stored context
STATE_LAYOUT = 3  # of a pickled accumulator (checkpoints): 3 keeps the per-token sums [tracked tokens, d] as int64
TILE = 16  # neurons per tile of the compiled update (one 64-byte line of a float32 row)


@dataclass(frozen=True)
class NeuronsConfig:
    top_k: int = 20
    ctx_before: int = 24
    ctx_after: int = 4
    n_bins: int = 50  # target number of shown histogram bars
    samples_per_bin: int = 10
    n_top_tokens: int = 10
    min_token_count: int = 3
    n_logit_tokens: int = 10
    batch_size: int = 32
    layers: tuple[int, ...] | None = None
    token_sums_mb: int = 1024  # budget of the per-(token, neuron) sums
    tracked_tokens: tuple[int, ...] | None = None  # set by ``prepare`` when dense sums exceed the budget
    backend: Backend = "auto"
    seed: int = 0
    sae: FeatureUnits | None = None  # units: this SAE's features (on its layer), not the MLP neurons

    def __post_init__(self):
        for name in ("top_k", "n_bins", "samples_per_bin", "batch_size", "token_sums_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.ctx_before < 0 or self.ctx_after < 0:
            raise ValueError("context sizes must be >= 0")
        if self.n_top_tokens < 0 or self.min_token_count < 1:
            raise ValueError("n_top_tokens must be >= 0 and min_token_count >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
        if self.sae is not None and self.layers not in (None, (self.sae.layer,)):
            raise ValueError(f"the SAE's features are on layer {self.sae.layer} only")

    def params(self) -> dict:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        out["tracked_tokens"] = None if self.tracked_tokens is None else len(self.tracked_tokens)
        out["sae"] = None if self.sae is None else self.sae.params()
        if self.sae is not None:
            out["layers"] = [self.sae.layer]
        return out


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
    mean: np.ndarray  # float64
    std: np.ndarray  # float64, population (as np.std)
    max: np.ndarray
    min: np.ndarray
    frac_pos: np.ndarray
    hist: list[np.ndarray]  # per neuron: int64 counts of the shown bars
    hist_edges: list[np.ndarray]  # per neuron: float64 bar edges (one more than bars)
    hist_exp: np.ndarray  # per neuron: fine bin width 2^e
    hist_k0: np.ndarray  # first fine bin (floor(min / 2^e))
    hist_group: np.ndarray  # fine bins per shown bar
    examples: ExampleTable
    bottom: ExampleTable  # the lowest activations (the same rule as ``examples`` on -activation), lowest first
    bos: np.ndarray  # float32 activation on the BOS of the corpus's first sequence (NaN: no BOS); never scored
    spectrum: list[np.ndarray]  # per neuron: SAMPLE_DTYPE records, by bar, then activation
    top_tokens: np.ndarray  # [d_mlp, n] token ids (-1: none)
    top_token_means: np.ndarray
    top_token_counts: np.ndarray
    logit_top: np.ndarray  # [d_mlp, n] token ids
    logit_top_values: np.ndarray
    logit_bottom: np.ndarray
    logit_bottom_values: np.ndarray
    logit_top_seen: np.ndarray  # the same among tokens seen in the corpus (-1 pads)
    logit_top_seen_values: np.ndarray
    logit_bottom_seen: np.ndarray
    logit_bottom_seen_values: np.ndarray


@dataclass
class NeuronsResult:
    config: NeuronsConfig
    layers: list[LayerNeurons] = field(default_factory=list)
    n_scored: int = 0
    top_tokens_among: int | None = None  # top tokens were ranked among this many tracked tokens (None: all)
    token_counts: np.ndarray | None = None  # per token id: scored occurrences in the corpus (-1: not tracked)


# ---------------------------------------------------------------------------------- tracked tokens


def _layers(lm: LoadedModel, cfg: NeuronsConfig) -> list[int]:
    if cfg.sae is not None:
        layers = [cfg.sae.layer]
    else:
        layers = list(cfg.layers) if cfg.layers is not None else list(range(lm.n_layers))
    for layer in layers:
        lm.check_layer(layer)
    return layers


def _width(lm: LoadedModel, cfg: NeuronsConfig) -> int:
    """Units per layer: the MLP's neurons, or the SAE's features (checked against the model)."""
    from ...models import model_name

    if cfg.sae is None:
        return lm.d_mlp
    cfg.sae.check_model(model_name(lm.model_id), lm.d_mlp)
    return cfg.sae.n_features


def _n_trackable(lm: LoadedModel, cfg: NeuronsConfig) -> int:
    """How many tokens' sums fit ``token_sums_mb``."""
    return cfg.token_sums_mb * 2**20 // (_width(lm, cfg) * len(_layers(lm, cfg)) * 8)


def prepare(lm: LoadedModel, cfg: NeuronsConfig, first_shard: Sequences) -> NeuronsConfig:
    """When dense per-token sums exceed the budget, track the most frequent tokens of the first
    shard (ties by id), the same whichever worker sweeps what."""
    m = _n_trackable(lm, cfg)
    if cfg.tracked_tokens is not None or lm.vocab_size <= m:
        return cfg
    first = first_shard.first_scored()
    toks = np.concatenate([np.asarray(s[first:], np.int64) for s in first_shard.ids] + [np.zeros(0, np.int64)])
    counts = np.bincount(toks[toks < lm.vocab_size], minlength=lm.vocab_size)
    best = np.lexsort((np.arange(lm.vocab_size), -counts))[:m]
    return replace(cfg, tracked_tokens=tuple(int(t) for t in np.sort(best)))


# ---------------------------------------------------------------------------------- accumulator


@dataclass
class _TokenBatch:
    """A batch's scored tokens, in sample-hash order."""

    lengths: np.ndarray  # per row
    seq_idx: np.ndarray  # per row: global sequence index
    r: np.ndarray  # row
    p: np.ndarray  # position
    key: np.ndarray  # global corpus-order key
    hash: np.ndarray  # spectrum-sample hash, signed order
    loc: np.ndarray  # seq << LOC_BITS | pos
    tt: np.ndarray  # the token's row in the per-token sums (-1: untracked)


class NeuronsAccumulator:
    """The neuron job's running state (see the module docstring): one ``scan.LayerState`` per
    layer, the scored-token count and the tracked tokens' counts."""

    def __init__(self, lm: LoadedModel, cfg: NeuronsConfig = NeuronsConfig()):
        self.cfg = cfg
        self.layers = _layers(lm, cfg)
        self.needs = Needs(mlp_layers=frozenset(self.layers))
        self.d = _width(lm, cfg)
        if cfg.tracked_tokens is not None:
            self.tracked = np.unique(np.asarray(cfg.tracked_tokens, np.int64))
        elif lm.vocab_size <= _n_trackable(lm, cfg):
            self.tracked = np.arange(lm.vocab_size, dtype=np.int64)
        else:
            raise ValueError(f"per-token sums of {lm.vocab_size} tokens exceed token_sums_mb={cfg.token_sums_mb}: "
                             "call the job's prepare() with the first shard")
        self.tmap = np.full(max(lm.vocab_size, int(self.tracked.max(initial=-1)) + 1), -1, np.int64)
        self.tmap[self.tracked] = np.arange(len(self.tracked))
        self.backend = cfg.backend
        if cfg.backend == "auto":
            self.backend = "torch" if str(lm.device).startswith("cuda") else "numba"
        W = cfg.ctx_before + cfg.ctx_after + 1
        self.state = {l: scan.LayerState.empty(self.d, cfg.samples_per_bin, cfg.top_k, W, len(self.tracked))
                      for l in self.layers}
        self.n = 0  # scored tokens
        self.bos_seq = np.iinfo(np.int64).max  # the sequence whose BOS activations ``bos`` holds (the first)
        self.bos = {l: np.full(self.d, np.nan, np.float32) for l in self.layers}
        self.tcount = np.zeros(len(self.tracked), np.int64)
        self.threads = max(1, torch.get_num_threads())
        self._dev = None  # torch backend: the state's tensors on the device

    @property
    def m_cand(self) -> int:
        """Candidates per neuron and batch that certainly hold the batch's K best kept ones."""
        return self.cfg.top_k * (2 * self.cfg.ctx_before + 1)

    def __getstate__(self):
        self._sync()
        d = dict(self.__dict__)
        d["_dev"] = None
        d["layout"] = STATE_LAYOUT
        return d

    def __setstate__(self, d: dict) -> None:
        if d.pop("layout", 1) != STATE_LAYOUT:
            raise ValueError("this run's checkpoint holds neuron statistics in an older layout: "
                             "start the run again (without --resume)")
        self.__dict__.update(d)

    def _sync(self) -> None:
        """Bring the torch backend's device state back into ``self.state`` (numpy)."""
        if self._dev is not None:
            scan.torch_to_numpy(self._dev, self.state)
            self._dev = None

    def _units(self, cap: Captured) -> dict[int, torch.Tensor]:
        """Each layer's unit activations [batch, pos, units]: hook_post, or its SAE encoding."""
        if self.cfg.sae is None:
            return cap.mlp
        return {l: self.cfg.sae.encode(cap.mlp[l]) for l in self.layers}

    def update(self, batch: Batch, cap: Captured) -> None:
        acts = self._units(cap)
        lengths = np.asarray(batch.lengths, np.int64)
        first = int(batch.first)
        ids = batch.ids.cpu().numpy().astype(np.int64, copy=False)
        T = ids.shape[1]
        if lengths.max(initial=0) >= 1 << scan.LOC_BITS:
            raise ValueError(f"sequences longer than {1 << scan.LOC_BITS} tokens")
        # the scored tokens in (row, position) order, and what each kernel needs of them
        r, p = np.nonzero((np.arange(T)[None, :] >= first) & (np.arange(T)[None, :] < lengths[:, None]))
        seq_idx = np.asarray(batch.seq_idx, np.int64)
        if first > 0 and len(seq_idx) and seq_idx.min() < self.bos_seq:  # BOS: stored, never scored
            row = int(np.argmin(seq_idx))
            self.bos_seq = int(seq_idx[row])
            self.bos = {l: acts[l][row, 0].detach().to("cpu", torch.float32).numpy().copy() for l in self.layers}
        if len(r) == 0:
            return
        key = np.asarray(batch.keys, np.int64)[r] + p
        tok = ids[r, p]
        tt = np.where(tok < len(self.tmap), self.tmap[np.minimum(tok, len(self.tmap) - 1)], -1)
        self.tcount += np.bincount(tt[tt >= 0], minlength=len(self.tracked))
        h = scan.to_signed(scan.sample_hash(key, self.cfg.seed))
        o = np.argsort(h)  # sample-hash order (results do not depend on it; the reservoirs run faster)
        r, p, key, h, tt = r[o], p[o], key[o], h[o], tt[o]
        tok_batch = _TokenBatch(lengths=lengths, seq_idx=seq_idx, r=r, p=p, key=key, hash=h,
                                loc=(seq_idx[r] << scan.LOC_BITS) | p, tt=tt)
        if self.backend == "torch":
            self._update_torch(acts, tok_batch)
        else:
            self._update_numba(acts, tok_batch)
        self.n += len(r)

    def _update_numba(self, acts: dict[int, torch.Tensor], tb: "_TokenBatch") -> None:
        self._sync()
        notice_compiling("neurons", [scan.update_block], "preparing the update kernel")
        cb, ca = self.cfg.ctx_before, self.cfg.ctx_after
        tasks = []
        width = TILE * max(1, -(-self.d // (self.threads * TILE)))  # whole tiles: threads share no sums' line
        for layer in self.layers:
            A = acts[layer].detach().to("cpu", torch.float32).contiguous().numpy()
            st = self.state[layer]
            for i0 in range(0, self.d, width):
                tasks.append((A, st, i0, min(self.d, i0 + width)))

        def one(t):
            A, st, i0, i1 = t
            return scan.update_block(A, tb.r, tb.p, tb.key, tb.hash, tb.loc, tb.tt, tb.seq_idx, tb.lengths, i0, i1,
                                     self.n, st.lo, st.hi, st.ex, st.mean, st.m2, st.npos, st.bins, st.rh, st.ra,
                                     st.rloc, *st.top_arrays(), *st.bottom_arrays(), st.tsum, self.m_cand, cb, ca,
                                     TILE)

        if len(tasks) == 1:
            status = [one(tasks[0])]
        else:
            status = list(kernel_pool(self.threads).map(one, tasks))
        if any(status):
            raise ValueError("the model produced a non-finite neuron activation")

    def _update_torch(self, acts: dict[int, torch.Tensor], tb: "_TokenBatch") -> None:
        if self._dev is None:
            self._dev = scan.torch_from_numpy(self.state, acts[self.layers[0]].device)
        for layer in self.layers:
            scan.torch_update(self._dev[layer], self.state[layer], acts[layer].detach(), tb.r, tb.p, tb.key, tb.hash,
                              tb.loc, tb.tt, tb.seq_idx, tb.lengths, self.n, self.m_cand, self.cfg.ctx_before,
                              self.cfg.ctx_after)

    def next_shard(self) -> "NeuronsAccumulator":
        """The accumulator for the next shard of a sweep in this process: it updates this one's
        order-free state (range, histogram, reservoirs, top and bottom examples, the integer
        per-token sums) in place and keeps its own moments and token counts, which ``merge`` then
        folds in exactly as for a fresh shard (so the result is bit-identical to merging a fresh
        accumulator, at a fraction of the memory)."""
        self._sync()
        nxt = object.__new__(NeuronsAccumulator)
        nxt.__dict__.update(self.__dict__)
        nxt.state = {l: replace(st, mean=np.zeros_like(st.mean), m2=np.zeros_like(st.m2),
                            npos=np.zeros_like(st.npos))
                     for l, st in self.state.items()}
        nxt.n, nxt.tcount, nxt._dev = 0, np.zeros_like(self.tcount), None
        return nxt

    def merge(self, other: "NeuronsAccumulator") -> None:
        """Fold in ``other``, the accumulator of the *next* shard (it is consumed)."""
        if other.cfg != self.cfg or other.layers != self.layers:
            raise ValueError("merging neuron accumulators of different configs")
        self._sync()
        other._sync()
        for layer in self.layers:
            a, b = self.state[layer], other.state[layer]
            if b.bins is a.bins:  # from next_shard(): only the moments are its own
                scan.merge_moments(self.n, other.n, a.mean, a.m2, a.npos, b.mean, b.m2, b.npos)
                continue
            scan.merge_layer(self.n, other.n, a.lo, a.hi, a.ex, a.mean, a.m2, a.npos, a.bins, a.rh, a.ra, a.rloc,
                             *a.top_arrays(), *a.bottom_arrays(), b.lo, b.hi, b.ex, b.mean, b.m2, b.npos, b.bins,
                             b.rh, b.ra, b.rloc, *b.top_arrays(), *b.bottom_arrays())
            a.tsum += b.tsum
        if other.bos_seq < self.bos_seq:
            self.bos_seq, self.bos = other.bos_seq, other.bos
        self.tcount += other.tcount
        self.n += other.n

    def drain(self) -> None:
        return None

    def finish(self, lm: LoadedModel, tokens) -> NeuronsResult:
        from .tables import SAMPLE_DTYPE

        self._sync()
        notice_compiling("neurons", [scan.finish_hist, scan.top_tokens, scan.contexts], "preparing the finishing kernel")
        if self.n == 0:
            raise ValueError("the corpus has no tokens to score (every sequence is only a BOS)")
        cfg = self.cfg
        counts_all = np.full(max(lm.vocab_size, len(self.tmap)), -1, np.int64)
        counts_all[self.tracked] = self.tcount
        res = NeuronsResult(config=cfg, n_scored=self.n,
                            top_tokens_among=None if cfg.tracked_tokens is None else len(self.tracked),
                            token_counts=counts_all)
        for layer in self.layers:  # one layer at a time: GPT-2 small's samples are 0.1 GB a layer
            st = self.state[layer]
            k0, g, boff, counts, soff, s_bin, s_h, s_a, s_seq, s_pos = scan.finish_hist(*st.hist_arrays(), cfg.n_bins)
            nd = np.diff(boff)
            m = len(s_bin)
            rec = np.zeros(m, dtype=SAMPLE_DTYPE)
            rec["seq"], rec["pos"], rec["act"], rec["bin"], rec["hash"] = s_seq, s_pos, s_a, s_bin, s_h
            rec["at"], rec["n_ctx"], rec["ctx"] = _contexts(tokens, s_seq, s_pos)
            del s_bin, s_h, s_a, s_seq, s_pos
            edges = [np.ldexp((k0[i] + np.arange(nd[i] + 1) * g[i]).astype(np.float64), int(st.ex[i]))
                     for i in range(self.d)]
            n_top = min(cfg.n_top_tokens, len(self.tracked))
            tt, tt_mean = scan.top_tokens(st.tsum, self.tcount, cfg.min_token_count, n_top)
            # the integer sums are exact while |sum| < 2^63 units; a neuron whose largest token
            # count times its largest |activation| could pass that shows no top tokens, not wrong ones
            maxabs = np.maximum(np.abs(st.lo), np.abs(st.hi)).astype(np.float64)
            risky = maxabs * max(1, int(self.tcount.max(initial=0))) * scan.TSUM_SCALE >= 2.0**62
            if risky.any():
                tt[risky], tt_mean[risky] = -1, 0.0
                print(f"neurons: layer {layer}: {int(risky.sum())} units' activations are too large for exact "
                      "per-token sums; their top tokens are not shown", file=sys.stderr)
            found = tt >= 0
            effects = lm.neuron_logit_effects(layer).float().cpu()
            if cfg.sae is not None:
                effects = cfg.sae.logit_effects(effects)
            nl = min(cfg.n_logit_tokens, effects.shape[1])
            top_v, top_i = torch.topk(effects, nl, dim=1)
            bot_v, bot_i = torch.topk(effects, nl, dim=1, largest=False)
            seen = torch.zeros(effects.shape[1], dtype=torch.bool)
            known = counts_all[: effects.shape[1]]
            seen[: len(known)] = torch.from_numpy(known > 0)
            seen_top = _top_where(effects, seen, nl)
            seen_bot = _top_where(effects, seen, nl, lowest=True)
            del effects
            res.layers.append(LayerNeurons(
                layer=layer,
                mean=st.mean.copy(),
                std=np.sqrt(np.maximum(st.m2, 0.0) / self.n),
                max=st.hi.copy(),
                min=st.lo.copy(),
                frac_pos=(st.npos / self.n).astype(np.float32),
                hist=np.split(counts, boff[1:-1]),
                hist_edges=edges,
                hist_exp=st.ex.copy(),
                hist_k0=k0,
                hist_group=g,
                examples=_examples(st.top_arrays(), 1.0),
                bottom=_examples(st.bottom_arrays(), -1.0),
                bos=self.bos[layer].copy(),
                spectrum=np.split(rec, soff[1:-1]),
                top_tokens=np.where(found, self.tracked[np.maximum(tt, 0)], -1),
                top_token_means=tt_mean.astype(np.float32),
                top_token_counts=np.where(found, self.tcount[np.maximum(tt, 0)], 0),
                logit_top=top_i.numpy(),
                logit_top_values=top_v.numpy(),
                logit_bottom=bot_i.numpy(),
                logit_bottom_values=bot_v.numpy(),
                logit_top_seen=seen_top[0],
                logit_top_seen_values=seen_top[1],
                logit_bottom_seen=seen_bot[0],
                logit_bottom_seen_values=seen_bot[1],
            ))
        return res


def _top_where(effects: torch.Tensor, mask: torch.Tensor, n: int, lowest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per row the ``n`` highest entries (with ``lowest``, the ``n`` lowest) among the columns
    ``mask``, best first, ties to the smaller id (as ``torch.topk`` on CPU does not promise): ids
    (-1 pads) and the entries (NaN pads)."""
    cols = torch.nonzero(mask).flatten()
    m = min(n, cols.numel())
    ids = np.full((effects.shape[0], n), -1, np.int64)
    vals = np.full((effects.shape[0], n), np.nan, np.float32)
    if m:
        key = effects[:, cols].numpy()  # columns are in id order; a copy, ordered ascending (best first)
        if not lowest:
            np.negative(key, out=key)
        # the m best of each row by partition, then ordered by (key, id); a row whose m-th key
        # ties with columns left out is sorted whole (stable), so ties always go to the smaller id
        part = np.sort(np.argpartition(key, m - 1, axis=1)[:, :m], axis=1)
        pk = np.take_along_axis(key, part, 1)
        order = np.take_along_axis(part, np.argsort(pk, axis=1, kind="stable"), 1)
        tied = np.nonzero((key <= pk.max(axis=1, keepdims=True)).sum(axis=1) > m)[0]
        if len(tied):
            order[tied] = np.argsort(key[tied], axis=1, kind="stable")[:, :m]
        ids[:, :m] = cols.numpy()[order]
        vals[:, :m] = np.take_along_axis(key, order, 1) * (1 if lowest else -1)
    return ids, vals


def _examples(arrays, sign: float) -> ExampleTable:
    """A top list as an ``ExampleTable``; ``sign`` -1 for the bottom list (stored negated)."""
    tn, tv, _tk, tseq, tpos, tws, twl, twin = arrays
    taken = np.arange(tv.shape[1])[None, :] < tn[:, None]
    off = np.concatenate([[0], np.cumsum(tn)]).astype(np.int64)
    return ExampleTable(offsets=off, seq=tseq[taken].astype(np.int64), pos=tpos[taken].astype(np.int64),
                        act=(sign * tv[taken]).astype(np.float32), win_start=tws[taken].astype(np.int64),
                        win_len=twl[taken].astype(np.int64), win=twin[taken])


def _contexts(tokens, seq: np.ndarray, pos: np.ndarray):
    """Per sample: the index of its token in the context, the context's length, and the context
    (``CTX_BEFORE`` tokens before, ``CTX_AFTER`` after, clipped to the sequence; -1 padded)."""
    useq = np.unique(seq)
    parts = [np.asarray(tokens.tokens(int(s)), np.int64) for s in useq]
    lens = np.array([len(p) for p in parts], np.int64)
    flat = np.concatenate(parts + [np.zeros(0, np.int64)])
    base = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return scan.contexts(useq, flat, base, lens, seq, pos, CTX_BEFORE, CTX_AFTER)


def run(lm: LoadedModel, seqs: Sequences, cfg: NeuronsConfig = NeuronsConfig()) -> NeuronsResult:
    """Compute everything the neuron pages show, for ``cfg.layers`` (default all): one sweep."""
    from . import JOB
    from ...sweep import run_jobs

    cfg = prepare(lm, cfg, seqs)
    return run_jobs(lm, seqs, [(JOB, cfg)], cfg.batch_size)[0]
