"""Heads job: what every attention head of every layer attends to, over a corpus.

Patterns are read with ``output_attentions=True`` (eager attention), one batch at a time, and
reduced at once to running sums, so memory is bounded by one batch's patterns. Batches are
right-padded: only queries ``q < length`` of their row are counted (a real query never sees a
padded key in a causal model). Query positions holding BOS are not scored; the BOS *key* is
attended to as usual (that is the first-token score).

Definitions (``A[q, k]`` is a head's attention weight from query ``q`` to key ``k <= q``; a
*scored query* is a non-BOS position of a corpus sequence; ``d = q - k`` is the distance):

- ``profile[d]``: mean of ``A[q, q - d]`` over the scored queries with ``q >= d`` (those that
  can see distance ``d``); ``profile_counts[d]`` is that number of queries. Since each row of
  ``A`` sums to 1, ``sum_d profile[d] * profile_counts[d]`` equals the number of scored queries.
- ``mean_distance``: mean over scored queries of ``sum_k A[q, k] * (q - k)``.
- ``entropy``: mean over scored queries of ``-sum_k A[q, k] ln A[q, k]`` (nats).
- ``prev_token``: ``profile[1]``, the mean weight on the previous token.
- ``first_token``: mean over scored queries of ``A[q, 0]`` (the BOS token when prepended).
- ``duplicate_token``: over scored queries whose token occurs earlier in the sequence, the mean
  total weight on those earlier copies.
- ``induction``: on ``induction_batch`` sequences ``[BOS] + r + r`` where ``r`` is
  ``induction_len`` distinct random non-special token ids (seed ``seed``; distinct, so every
  token has exactly one earlier copy), the mean over second-half positions ``q`` of the weight on
  the token right after the earlier copy, ``A[q, q - induction_len + 1]``.
- ``distance_r2`` (distance vs semantic): the share of the variance of the attention weights
  explained by distance alone, ``R^2 = 1 - SS_res / SS_tot`` over all (scored query, key) pairs
  of the causal triangle, where the prediction for a pair is the head's mean weight at that pair's
  distance (the per-distance mean over the same pairs) and ``SS_tot`` is taken around the overall
  mean weight. The BOS key (position 0 when the run prepends BOS) is left out of these pairs:
  attention to BOS is a sink, measured by ``first_token``, and depends on where the query is,
  not on what is at distance ``d``. Labels: ``distance`` when ``R^2 >= 0.5``, ``semantic`` when
  ``R^2 < 0.2``, else ``mixed`` (``LABEL_THRESHOLDS``).

The job also keeps ``n_examples`` example patterns per head: the first ``example_len`` tokens
of the first ``n_examples`` corpus sequences (global ``seq_idx < n_examples``; float16).

Streaming (``HeadsAccumulator``, see ``precompute/sweep.py``): every statistic above is a sum
(float64 on the host) or a count, so shards merge by adding them; the example patterns merge
by union (each belongs to one sequence). On the CPU one compiled pass over each head's causal
triangle makes the sums (``scan.reduce_heads``, heads shared among threads; ``backend="numba"``);
on a GPU torch ops reduce on the device (``_accumulate``, ``"torch"``). Profile arrays are sized by the run's longest possible
sequence (``max_len``: ``--ctx-len`` capped by the model's context) and cut, at ``finish``, after
the longest distance any query saw. Nothing is per token: ``drain`` returns None. The induction
test is its own forward pass, run once at ``finish``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from ...models import LoadedModel
from ...sequences import Batch, Sequences
from ...sweep import Captured, Needs
from ..compiled import kernel_pool, notice_compiling
from . import scan

HeadLabel = Literal["distance", "mixed", "semantic"]
# distance_r2 at or above "distance" -> distance head; below "semantic" -> semantic head; else mixed
LABEL_THRESHOLDS: dict[str, float] = {"distance": 0.5, "semantic": 0.2}


def label_for(r2: float) -> HeadLabel:
    if r2 >= LABEL_THRESHOLDS["distance"]:
        return "distance"
    if r2 < LABEL_THRESHOLDS["semantic"]:
        return "semantic"
    return "mixed"


@dataclass(frozen=True)
class HeadsConfig:
    batch_size: int = 16
    n_examples: int = 3
    example_len: int = 40
    induction_len: int = 50  # length of the random half; the sequence is BOS + 2 x this
    induction_batch: int = 16
    layers: tuple[int, ...] | None = None
    seed: int = 0
    max_len: int | None = None  # longest sequence of the run (--ctx-len); None: the model's context
    backend: str = "auto"  # "numba": the compiled CPU kernel; "torch": torch ops on the model's device; auto: by device

    def __post_init__(self):
        if self.backend not in ("auto", "numba", "torch"):
            raise ValueError("backend must be one of auto, numba, torch")
        for name in ("batch_size", "example_len", "induction_len", "induction_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.n_examples < 0:
            raise ValueError("n_examples must be >= 0")
        if self.induction_len < 2:
            raise ValueError("induction_len must be at least 2")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError("max_len must be at least 1")

    def params(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class HeadExample:
    seq_idx: int
    pattern: np.ndarray  # [n, n] float16, the first n tokens of the sequence (n <= example_len)


@dataclass
class LayerHeads:
    """Per-head statistics of one layer (arrays are indexed by head)."""

    layer: int
    profile: np.ndarray  # [n_heads, max_d + 1] float64
    profile_counts: np.ndarray  # [max_d + 1] int64 (the same for every head)
    mean_distance: np.ndarray
    entropy: np.ndarray
    prev_token: np.ndarray
    first_token: np.ndarray
    duplicate_token: np.ndarray  # NaN when no query has an earlier copy of its token
    induction: np.ndarray
    distance_r2: np.ndarray
    labels: list[HeadLabel]
    examples: list[list[HeadExample]]  # per head


@dataclass
class HeadsResult:
    config: HeadsConfig
    layers: list[LayerHeads] = field(default_factory=list)
    n_queries: int = 0  # scored queries (BOS positions excluded)
    n_dup_queries: int = 0  # scored queries whose token occurs earlier in its sequence
    induction_len: int = 0  # the half length actually used (capped by the model's context)


class _Sums:
    """Running sums for one layer (float64), fed one batch of patterns at a time; merge by adding."""

    def __init__(self, n_heads: int, max_len: int):
        z = lambda *s: torch.zeros(s, dtype=torch.float64)  # noqa: E731
        self.w = z(n_heads, max_len)  # sum of A[q, q-d] over queries that see d
        self.n = torch.zeros(max_len, dtype=torch.int64)
        self.w_nb = z(n_heads, max_len)  # the same without the BOS key (for R^2)
        self.w2_nb = z(n_heads, max_len)  # sum of squares without the BOS key
        self.n_nb = torch.zeros(max_len, dtype=torch.int64)
        self.ent = z(n_heads)
        self.first = z(n_heads)
        self.dup = z(n_heads)
        self.n_q = 0
        self.n_dup = 0

    def add(self, o: "_Sums") -> None:
        for k in ("w", "n", "w_nb", "w2_nb", "n_nb", "ent", "first", "dup"):
            getattr(self, k).add_(getattr(o, k))
        self.n_q += o.n_q
        self.n_dup += o.n_dup

    def add_batch(self, w, w2, bos_d, bos2_d, ent, first, dup, n_seen, n_q_at, n_dup: int, skip_bos_key: bool) -> None:
        """Add one batch (CPU tensors): per head and distance ``w`` and ``w2`` [H, T], and the key 0's
        part of them ``bos_d``, ``bos2_d`` (key 0 sits at distance q); per head ``ent``, ``first``,
        ``dup``; the scored queries that see each distance ``n_seen`` and at each position ``n_q_at``."""
        T = w.shape[1]
        self.w[:, :T] += w
        self.n[:T] += n_seen
        if skip_bos_key:
            self.w_nb[:, :T] += w - bos_d
            self.w2_nb[:, :T] += w2 - bos2_d
            self.n_nb[:T] += n_seen - n_q_at
        else:
            self.w_nb[:, :T] += w
            self.w2_nb[:, :T] += w2
            self.n_nb[:T] += n_seen
        self.ent += ent
        self.first += first
        self.dup += dup
        self.n_q += int(n_q_at.sum())
        self.n_dup += n_dup

    def cut(self, n: int) -> "_Sums":
        """The same sums for distances 0..n-1 only (all later ones must be empty)."""
        out = _Sums.__new__(_Sums)
        for k in ("w", "w_nb", "w2_nb"):
            setattr(out, k, getattr(self, k)[:, :n].clone())
        for k in ("n", "n_nb"):
            setattr(out, k, getattr(self, k)[:n].clone())
        for k in ("ent", "first", "dup", "n_q", "n_dup"):
            setattr(out, k, getattr(self, k))
        return out


def _masks(ids: torch.Tensor, lengths: list[int], first: int):
    """Index and masks shared by all layers of one batch (T = padded length), on ``ids``' device."""
    B, T = ids.shape
    dev = ids.device
    k = torch.arange(T, device=dev)[:, None] - torch.arange(T, device=dev)[None, :]  # [T(q), T(d)] key of (q, d)
    pos = torch.arange(T, device=dev)[None, :]
    qvalid = (pos >= first) & (pos < torch.tensor(lengths, device=dev)[:, None])  # [B, T] scored queries
    same = (ids[:, :, None] == ids[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device=dev).tril(-1)[None]
    same &= qvalid[:, :, None]  # [B, q, k]: earlier copies of the query's token
    return dict(
        gather_idx=k.clamp(min=0),
        tri=(k >= 0).float(),  # [q, d]: query q sees distance d
        qmask=qvalid[:, None, :, None].float(),
        n_q_at=qvalid.sum(0).cpu(),  # [T]: scored queries at each position
        n_seen=(qvalid[:, :, None] & (k >= 0)[None]).sum((0, 1)).cpu(),  # [T(d)]: scored queries that see d
        dup_pairs=same.nonzero(as_tuple=True),  # (b, q, k) of every earlier copy
        n_dup=int(same.any(-1).sum()),
    )


def _diag_sums(S: torch.Tensor, m: dict) -> torch.Tensor:
    """S [H, q, k] -> [H, d]: sum over q of S[:, q, q - d]."""
    H, T, _ = S.shape
    return (torch.gather(S, 2, m["gather_idx"].expand(H, T, T)) * m["tri"]).sum(1).double().cpu()


def _accumulate(acc: _Sums, A: torch.Tensor, m: dict, skip_bos_key: bool) -> None:
    """Add one batch's patterns A [B, H, T, T] to ``acc`` (A itself is left as it is)."""
    A = A.float() * m["qmask"]  # rows of unscored queries -> 0 (a copy: the sweep's tensors are shared)
    w = _diag_sums(A.sum(0), m)  # [H, T(d)]
    w2 = _diag_sums(torch.einsum("bhqk,bhqk->hqk", A, A), m)  # sum over the batch of A^2
    bos = A[..., 0].double().cpu()  # [B, H, q]: weight on key 0, which sits at distance d = q
    ent = torch.special.entr(A).sum((0, 2, 3)).double().cpu()  # entr(x) = -x ln x, 0 at 0
    b, q, k = m["dup_pairs"]
    dup = A[b, :, q, k].sum(0).double().cpu()  # A[b, :, q, k] is [n_pairs, H]
    acc.add_batch(w, w2, bos.sum(0), bos.square().sum(0), ent, bos.sum((0, 2)), dup, m["n_seen"], m["n_q_at"],
                  m["n_dup"], skip_bos_key)


def _accumulate_numba(sums: dict, layers: list[int], attentions, ids: torch.Tensor, lengths: list[int], first: int,
                      threads: int) -> None:
    """The same as ``_accumulate`` for every layer, by the compiled kernel (``scan.reduce_heads``),
    heads shared among ``threads`` threads."""
    ids_np = ids.cpu().numpy()
    B, T = ids_np.shape
    L = np.asarray(lengths, np.int64)
    pos = np.arange(T)
    qvalid = (pos[None, :] >= first) & (pos[None, :] < L[:, None])  # [B, T] scored queries
    n_q_at = qvalid.sum(0)
    n_seen = np.cumsum(n_q_at[::-1])[::-1].copy()  # [T(d)]: scored queries q >= d
    same = (ids_np[:, :, None] == ids_np[:, None, :]) & np.tri(T, T, -1, dtype=bool)[None] & qvalid[:, :, None]
    b, q, k = np.nonzero(same)  # earlier copies of each query's token, in (row, query, key) order
    dup_off = np.zeros(B * T + 1, np.int64)
    np.cumsum(np.bincount(b * T + q, minlength=B * T), out=dup_off[1:])
    dup_k = k.astype(np.int64)
    n_dup = int(same.any(-1).sum())
    tasks, out = [], {}
    for l in layers:
        A = attentions[l].detach()
        if A.dtype != torch.float32 or not A.is_contiguous():
            A = A.float().contiguous()
        H = A.shape[1]
        z = [np.zeros((H, T)) for _ in range(4)] + [np.zeros(H) for _ in range(3)]
        out[l] = z
        step = max(1, -(-H // threads))
        tasks += [(A.numpy(), h0, min(H, h0 + step), z) for h0 in range(0, H, step)]

    def one(t):
        A, h0, h1, z = t
        scan.reduce_heads(A, L, first, dup_off, dup_k, h0, h1, *z)

    if threads > 1 and len(tasks) > 1:
        list(kernel_pool(threads).map(one, tasks))
    else:
        for t in tasks:
            one(t)
    n_seen_t, n_q_t = torch.from_numpy(n_seen), torch.from_numpy(n_q_at)
    for l in layers:
        sums[l].add_batch(*(torch.from_numpy(x) for x in out[l]), n_seen_t, n_q_t, n_dup, skip_bos_key=first > 0)


def _r2(acc: _Sums) -> np.ndarray:
    """1 - SS_res/SS_tot of the weights (BOS key left out) against their per-distance means."""
    n = acc.n_nb.double()
    ok = n > 0
    ss_res = (acc.w2_nb - torch.where(ok, acc.w_nb**2 / n.clamp(min=1), torch.zeros_like(acc.w_nb))).sum(1)
    N = n.sum()
    ss_tot = acc.w2_nb.sum(1) - acc.w_nb.sum(1) ** 2 / N.clamp(min=1)
    r2 = torch.where(ss_tot > 1e-12, 1 - ss_res / ss_tot.clamp(min=1e-30), torch.ones_like(ss_tot))
    return r2.clamp(max=1.0).numpy()


def induction_tokens(lm: LoadedModel, half: int, batch: int, seed: int) -> torch.Tensor:
    """[batch, 1 + 2 * half] ids: BOS (when the model has one) then ``r + r``, ``r`` distinct random
    non-special tokens. Without a BOS id the sequence is ``r + r`` (no leading token)."""
    gen = torch.Generator().manual_seed(seed)
    special = lm.special_ids
    pool = torch.tensor([i for i in range(lm.vocab_size) if i not in special])
    if len(pool) < half:
        raise ValueError(f"induction_len {half} needs that many distinct tokens; the vocabulary has {len(pool)}")
    rows = []
    for _ in range(batch):
        r = pool[torch.randperm(len(pool), generator=gen)[:half]]
        head = [torch.tensor([lm.bos_id])] if lm.bos_id is not None else []
        rows.append(torch.cat(head + [r, r]))
    return torch.stack(rows)


@torch.inference_mode()
def induction_scores(lm: LoadedModel, half: int, batch: int, seed: int) -> dict[int, np.ndarray]:
    """{layer: [n_heads]} mean weight from each second-half token to the token after its earlier copy."""
    ids = induction_tokens(lm, half, batch, seed)
    off = ids.shape[1] - 2 * half  # 1 with BOS, else 0
    out = lm.forward(ids, output_attentions=True)
    q = torch.arange(off + half, off + 2 * half)
    k = q - half + 1
    return {l: a[:, :, q, k].float().mean((0, 2)).cpu().double().numpy() for l, a in enumerate(out.attentions)}


class HeadsAccumulator:
    """Sums of every statistic in the module docstring, per layer, for ``cfg.layers`` (default
    all) and every head, plus the example patterns. Picklable (tensors and arrays only)."""

    needs = Needs(attentions=True)

    def __init__(self, lm: LoadedModel, cfg: HeadsConfig = HeadsConfig()):
        self.cfg = cfg
        self.layers = list(cfg.layers) if cfg.layers is not None else list(range(lm.n_layers))
        for l in self.layers:
            lm.check_layer(l)
        self.n_heads = lm.n_heads
        self.max_len = min(cfg.max_len or lm.n_ctx, lm.n_ctx)
        self.sums = {l: _Sums(lm.n_heads, self.max_len) for l in self.layers}
        self.examples: dict[int, dict[int, np.ndarray]] = {l: {} for l in self.layers}  # layer -> seq_idx -> [H, n, n]
        self.backend = cfg.backend
        if cfg.backend == "auto":
            self.backend = "numba" if str(lm.device) == "cpu" else "torch"
        self.threads = max(1, torch.get_num_threads())

    @torch.inference_mode()
    def update(self, batch: Batch, cap: Captured) -> None:
        T = batch.ids.shape[1]
        if T > self.max_len:
            raise ValueError(f"a sequence of {T} tokens is longer than the heads job's max_len {self.max_len}")
        for l in self.layers:
            A = cap.attentions[l]  # [B, H, T, T] on the model's device
            for r, (k, n) in enumerate(zip(batch.seq_idx, batch.lengths)):
                if k < self.cfg.n_examples:
                    m = min(n, self.cfg.example_len)
                    self.examples[l][k] = A[r, :, :m, :m].to(torch.float16).cpu().numpy().copy()
        if self.backend == "numba":
            notice_compiling("heads", [scan.reduce_heads], "preparing the pattern kernel")
            _accumulate_numba(self.sums, self.layers, cap.attentions, batch.ids, batch.lengths, batch.first, self.threads)
            return
        ids = batch.ids.to(cap.attentions[0].device)
        masks = _masks(ids, batch.lengths, batch.first)
        for l in self.layers:  # reduced on the model's device
            _accumulate(self.sums[l], cap.attentions[l], masks, skip_bos_key=batch.first > 0)

    def merge(self, other: "HeadsAccumulator") -> None:
        for l in self.layers:
            self.sums[l].add(other.sums[l])
            self.examples[l].update(other.examples[l])

    def drain(self) -> None:
        return None  # nothing per token

    def finish(self, lm: LoadedModel, tokens=None) -> HeadsResult:
        cfg = self.cfg
        half = min(cfg.induction_len, (lm.n_ctx - 1) // 2)
        ind = induction_scores(lm, half, cfg.induction_batch, cfg.seed)
        result = HeadsResult(config=cfg, induction_len=half)
        for l in self.layers:
            seen = torch.nonzero(self.sums[l].n).flatten()
            acc = self.sums[l].cut(int(seen[-1]) + 1 if len(seen) else 1)  # the run's longest distance + 1
            max_len = acc.n.shape[0]
            n = acc.n.double()
            profile = torch.where(n > 0, acc.w / n.clamp(min=1), torch.zeros_like(acc.w))
            nq = max(acc.n_q, 1)
            dist = torch.arange(max_len, dtype=torch.float64)
            r2 = _r2(acc)
            ex = [[HeadExample(seq_idx=k, pattern=self.examples[l][k][h]) for k in sorted(self.examples[l])]
                  for h in range(self.n_heads)]
            result.layers.append(
                LayerHeads(
                    layer=l,
                    profile=profile.numpy(),
                    profile_counts=acc.n.numpy(),
                    mean_distance=((acc.w * dist).sum(1) / nq).numpy(),
                    entropy=(acc.ent / nq).numpy(),
                    prev_token=profile[:, 1].numpy() if max_len > 1 else np.zeros(self.n_heads),
                    first_token=(acc.first / nq).numpy(),
                    duplicate_token=(acc.dup / acc.n_dup).numpy() if acc.n_dup else np.full(self.n_heads, np.nan),
                    induction=ind[l],
                    distance_r2=r2,
                    labels=[label_for(float(x)) for x in r2],
                    examples=ex,
                )
            )
            result.n_queries = acc.n_q
            result.n_dup_queries = acc.n_dup
        return result


def example_sequences(result: HeadsResult) -> list[int]:
    """The sequences whose tokens the stored example patterns show."""
    return sorted({e.seq_idx for L in result.layers for per_head in L.examples for e in per_head})


def run(lm: LoadedModel, seqs: Sequences, cfg: HeadsConfig = HeadsConfig()) -> HeadsResult:
    """Every statistic in the module docstring over an in-memory ``Sequences`` (one shard)."""
    from . import JOB
    from ...sweep import run_jobs

    return run_jobs(lm, seqs, [(JOB, cfg)], cfg.batch_size)[0]


@torch.inference_mode()
def head_pattern(lm: LoadedModel, ids: list[int], layer: int, head: int) -> np.ndarray:
    """One head's attention pattern on one sequence of token ids: [q, k] float32 (0 above the diagonal)."""
    lm.check_head(layer, head)
    if not ids:
        return np.zeros((0, 0), np.float32)
    out = lm.forward(torch.tensor([list(ids)], dtype=torch.long), output_attentions=True)
    return out.attentions[layer][0, head].float().cpu().numpy()
