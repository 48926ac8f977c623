"""Rules job: describe every next-token prediction of the model by its closest n-gram rule
(Nguyen, "Understanding Transformers via N-gram Statistics", NeurIPS 2024).

For every token ``t`` of the evaluation corpus (the prediction made at ``t-1``): the optimal rule
of the rule set (templates over the last <= 7 context tokens, never crossing BOS), its distance to
the model's distribution, its support in the training corpus, the top-1 agreement (1/|A| when the
model's argmax is in the rule's argmax set A), the best rule and distance of each length 1-7,
the model's top-1 correctness and the stupid-backoff baseline (longest suffix with support).
Aggregates: agreement overall and by rule, histogram of optimal distances, agreement vs N.

The optimal rule is chosen *after* seeing the model's output: rules describe predictions, they do
not explain them.

The n-gram index is built from ``ngram_corpus`` tokenised with the model's tokenizer (it should be
the model's training text: train-1097.txt for stories260K, train-5511-lowercase.txt for the
bundled lowercase model), split into whole stories or paragraphs (``split``; ``auto``: what the
model card says, see ``ngrams/training.py``), and kept under data/cache/ngrams/: an on-disk suffix
array for R_suffix and R_subgram, exact in-memory tables built from it for R_all (bounded).

Streaming (``RulesAccumulator``, see ``precompute/sweep.py``): ``update`` turns a batch's logits
into distributions (``probs_of``, the softmax ``model_probs`` uses) and matches them, in groups
of ``chunk`` predictions, against the n-gram index (loaded once per process, cached by
``load_index``; dropped when the accumulator is pickled). Per-token matches wait until
``drain``, which returns them sorted by (sequence, position) for the ``rules_sequences`` rows
and forgets them. The aggregates are mergeable sums (``_Totals``): counts, a histogram, and
sums of per-token values in fixed point (``round(x * 2**FRAC_BITS)``, exact integers, so shards
merge in any grouping to the same bits); ``finish`` turns them into the same aggregates as
``aggregates(result)`` computes from all tokens at once. Swept without draining (``run``), the
result also holds every token's match.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...models import LoadedModel
from ...ngrams.index import NgramIndex
from ...ngrams.suffix import SuffixIndex
from ...ngrams.training import SPLITS, SplitChoice, open_index, resolve_split
from ...ngrams.matcher import DISTANCES, Distance, Matcher, Matches, contexts_of
from ...ngrams.templates import MAX_N, RULE_SETS, RuleSet, rule_set
from ...ngrams.views import RuleFit, TokenMatch, token_matches  # noqa: F401 - re-exported
from ...sequences import Batch, Sequences
from ...sweep import Captured, Needs

N_HIST_BINS = 20
FRAC_BITS = 40  # per-token values in [0, 1] are summed as integers in units of 2^-FRAC_BITS


@dataclass(frozen=True)
class RulesConfig:
    ngram_corpus: str = ""
    rule_set: RuleSet = "subgram"
    distance: Distance = "variational"
    split: str = "auto"  # training text: "story", "paragraph" or "auto" (the model card's)
    top_k: int = 10
    batch_size: int = 32
    chunk: int = 4096
    cache: bool = True
    cache_dir: str | None = None

    def __post_init__(self):
        if not self.ngram_corpus:
            raise ValueError(
                "the rules job needs --ngram-corpus: the model's training text (e.g. "
                "../shared/corpora/tinystories/train-1097.txt for stories260K, train-5511-lowercase.txt for the bundled model)"
            )
        if self.rule_set not in RULE_SETS:
            raise ValueError(f"unknown rule set {self.rule_set!r}; choose one of {', '.join(RULE_SETS)}")
        if self.split != "auto" and self.split not in SPLITS:
            raise ValueError(f"unknown training-text split {self.split!r}; choose auto, {', '.join(SPLITS)}")
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; choose one of {', '.join(DISTANCES)}")
        for name in ("top_k", "batch_size", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.ngram_corpus.startswith("hf:") and not Path(self.ngram_corpus).is_file():
            raise ValueError(f"n-gram corpus {self.ngram_corpus!r} not found (give a text file)")

    def params(self) -> dict:
        return asdict(self)


@dataclass
class RulesChunk:
    """Per-token matches of whole sequences, sorted by (sequence, position): what ``drain`` hands
    to the store (one ``rules_sequences`` row per sequence)."""

    seq: np.ndarray  # [N] global sequence index of each predicted token
    pos: np.ndarray  # [N] its position in the sequence (BOS = 0)
    target: np.ndarray  # [N] the token id at that position
    ctx_len: np.ndarray  # [N] context length used (0-7)
    matches: Matches


@dataclass
class RulesResult:
    """The aggregates over the whole run; ``seq`` .. ``matches`` are the tokens not drained to the
    store during the sweep (every token when swept in memory, none after a streamed run)."""

    config: RulesConfig
    templates: tuple[str, ...]
    seq: np.ndarray  # [N] sequence index of each predicted token
    pos: np.ndarray  # [N] its position in the sequence (BOS = 0)
    target: np.ndarray  # [N] the token id at that position
    ctx_len: np.ndarray  # [N] context length used (0-7)
    matches: Matches
    aggregates: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    index_tokens: int = 0


_INDEXES: dict[tuple, NgramIndex | SuffixIndex] = {}  # one per process and (tokenizer, corpus, split, kind)


def load_index(lm: LoadedModel, cfg: RulesConfig) -> NgramIndex | SuffixIndex:
    """The n-gram index answering ``cfg.rule_set`` on ``cfg.ngram_corpus`` for ``lm``'s tokenizer,
    built or read once per process (``cache=False``: built in a temporary folder)."""
    kind = "memory" if cfg.rule_set == "all" else "suffix"
    key = (str(lm.model_id), lm.vocab_size, cfg.ngram_corpus, cfg.split, kind, cfg.cache, cfg.cache_dir)
    if key not in _INDEXES:
        root = Path(cfg.cache_dir) if cfg.cache_dir else None
        if not cfg.cache:
            import atexit
            import shutil
            import tempfile

            root = Path(tempfile.mkdtemp(prefix="tinyscope-ngrams-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
        _INDEXES[key] = open_index(lm, cfg.ngram_corpus, cfg.rule_set, cfg.split, cache_root=root)
    return _INDEXES[key]


def split_of(lm: LoadedModel, cfg: RulesConfig) -> SplitChoice:
    return resolve_split(cfg.split, str(lm.model_id))


def probs_of(logits: torch.Tensor) -> torch.Tensor:
    """Next-token distributions (float32, on the CPU) from logits [batch, pos, vocab]."""
    return torch.softmax(logits.float(), dim=-1).cpu()


@torch.inference_mode()
def model_probs(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Next-token distributions [batch, pos, vocab] (float32)."""
    return probs_of(lm.forward(ids).logits)


def _concat_matches(ms: list[Matches], templates, order) -> Matches:
    fields = [f for f in Matches.__dataclass_fields__ if f != "templates"]
    return Matches(templates=templates, **{f: np.concatenate([getattr(m, f) for m in ms])[order] for f in fields})


def _no_matches(templates, k: int) -> Matches:
    """Zero predictions, with the dtypes and trailing shapes ``Matcher.match`` gives."""
    z = lambda dt, *shape: np.zeros((0, *shape), dt)  # noqa: E731
    return Matches(
        templates=tuple(templates), rule=z(np.int32), dist=z(np.float64), support=z(np.int64), agree=z(np.float64),
        best_rule=z(np.int32, MAX_N), best_dist=z(np.float64, MAX_N), agree_upto=z(np.float64, MAX_N),
        backoff_n=z(np.int8), backoff_agree=z(np.float64), backoff_correct=z(np.float64), model_argmax=z(np.int64),
        model_correct=z(bool), rule_top_ids=z(np.int32, k), rule_top_q=z(np.float32, k), model_top_ids=z(np.int32, k),
        model_top_p=z(np.float32, k),
    )


def _fixed(x: np.ndarray, axis=None):
    """Exact sum of values in [0, 1] in units of 2^-FRAC_BITS: a Python int (or an object array of
    them along the axes left)."""
    q = np.rint(np.asarray(x, np.float64) * 2.0**FRAC_BITS).astype(np.int64)  # <= 2^40 each: no int64 overflow per group
    s = q.sum(axis=axis)
    return int(s) if axis is None else s.astype(object)


def _mean(total: int, n: int) -> float | None:
    return total / (n << FRAC_BITS) if n else None  # int / int: correctly rounded


class _Totals:
    """Everything ``aggregates`` needs, as sums that merge exactly (ints and fixed-point ints)."""

    def __init__(self, n_rules: int):
        self.n = self.n_def = self.correct_def = self.correct_all = 0
        self.agree = self.backoff_agree = self.backoff_correct = self.dist = 0
        self.agree_upto = np.zeros(MAX_N, dtype=object)
        self.best_sum = np.zeros(MAX_N, dtype=object)
        self.best_n = np.zeros(MAX_N, dtype=np.int64)
        self.hist = np.zeros(N_HIST_BINS, dtype=np.int64)
        self.rule_n = np.zeros(n_rules, dtype=np.int64)
        self.rule_agree = np.zeros(n_rules, dtype=object)

    def add(self, m: Matches) -> "_Totals":
        d = m.defined
        self.n += len(m)
        self.n_def += int(d.sum())
        self.correct_def += int(m.model_correct[d].sum())
        self.correct_all += int(m.model_correct.sum())
        self.agree += _fixed(m.agree[d])
        self.backoff_agree += _fixed(m.backoff_agree[d])
        self.backoff_correct += _fixed(m.backoff_correct[d])
        self.dist += _fixed(m.dist[d])
        self.agree_upto = self.agree_upto + _fixed(m.agree_upto[d], axis=0)
        bd = m.best_dist[d]
        ok = ~np.isnan(bd)
        self.best_sum = self.best_sum + _fixed(np.where(ok, bd, 0.0), axis=0)
        self.best_n += ok.sum(0)
        self.hist += np.histogram(m.dist[d], bins=N_HIST_BINS, range=(0.0, 1.0))[0]
        rules = m.rule[d]
        self.rule_n += np.bincount(rules, minlength=len(self.rule_n))
        q = np.zeros(len(self.rule_n), np.int64)
        np.add.at(q, rules, np.rint(m.agree[d] * 2.0**FRAC_BITS).astype(np.int64))
        self.rule_agree = self.rule_agree + q.astype(object)
        return self

    def merge(self, o: "_Totals") -> None:
        for k, v in vars(o).items():
            setattr(self, k, getattr(self, k) + v)

    def aggregates(self, templates, cfg: RulesConfig) -> dict:
        by_rule = []
        for r in np.argsort(-self.rule_n, kind="stable"):
            if self.rule_n[r] == 0:
                break
            by_rule.append({"rule": int(r), "template": templates[r], "count": int(self.rule_n[r]),
                            "agreement": _mean(int(self.rule_agree[r]), int(self.rule_n[r]))})
        edges = np.histogram(np.zeros(0), bins=N_HIST_BINS, range=(0.0, 1.0))[1]
        nd = self.n_def
        return {
            "n_predictions": int(self.n),
            "n_defined": int(nd),
            "agreement": _mean(self.agree, nd),
            "model_top1": self.correct_def / nd if nd else None,
            "model_top1_all": self.correct_all / self.n if self.n else None,
            "backoff_agreement": _mean(self.backoff_agree, nd),
            "backoff_top1": _mean(self.backoff_correct, nd),
            "mean_distance": _mean(self.dist, nd),
            "agreement_vs_n": [_mean(int(x), nd) for x in self.agree_upto],
            "best_distance_mean_by_length": [_mean(int(s), int(c)) for s, c in zip(self.best_sum, self.best_n)],
            "dist_hist": {"edges": [float(e) for e in edges], "counts": [int(c) for c in self.hist]},
            "by_rule": by_rule,
            "rule_set": cfg.rule_set,
            "distance": cfg.distance,
            "n_rules": len(templates),
        }


class RulesAccumulator:
    """Per-token rule matches (until drained) and the aggregates' sums. Picklable: the model and
    the matcher (the n-gram index) are dropped, after matching what is pending."""

    needs = Needs(logits=True)

    def __init__(self, lm: LoadedModel, cfg: RulesConfig):
        self.cfg = cfg
        self.templates = rule_set(cfg.rule_set)
        self.bos_id = lm.bos_id
        self.vocab_size = lm.vocab_size
        self.index_tokens = 0
        self.split = split_of(lm, cfg)  # recorded in the aggregates: which training text the rules count in
        self.totals = _Totals(len(self.templates))
        self.timings = {"index_s": 0.0, "probs_s": 0.0, "match_s": 0.0}
        self.pending: list[tuple] = []  # (probs, seq, pos, target, ctx, ctx_len) not matched yet
        self.n_pending = 0
        self.parts: list[tuple] = []  # (seq, pos, target, ctx_len, Matches) matched, not drained
        self._lm: LoadedModel | None = lm
        self._matcher: Matcher | None = None

    def __getstate__(self):
        self._flush()
        state = dict(self.__dict__)
        state["_lm"] = state["_matcher"] = None
        return state

    def matcher(self) -> Matcher:
        if self._matcher is None:
            if self._lm is None:
                raise RuntimeError("an unpickled rules accumulator cannot match: sweep with a fresh one")
            t0 = time.perf_counter()
            index = load_index(self._lm, self.cfg)
            if index.vocab_size != self.vocab_size:
                raise ValueError(f"the n-gram index has vocabulary {index.vocab_size}, the model {self.vocab_size}")
            self._matcher = Matcher(index, self.templates, self.cfg.distance, self.cfg.top_k)
            self.index_tokens = len(index)
            self.timings["index_s"] += time.perf_counter() - t0
        return self._matcher

    @torch.inference_mode()
    def update(self, batch: Batch, cap: Captured) -> None:
        t0 = time.perf_counter()
        probs = probs_of(cap.logits).numpy()
        self.timings["probs_s"] += time.perf_counter() - t0
        bos = self.bos_id if batch.first > 0 else None
        for r, (k, n) in enumerate(zip(batch.seq_idx, batch.lengths)):
            ids = batch.ids[r, :n].numpy().astype(np.int64)
            ctx, clen = contexts_of(ids, bos, first=batch.first)
            t = np.arange(1, n)  # predicted positions; the prediction is made at t-1
            self.pending.append((probs[r, t - 1], np.full(len(t), k), t, ids[t], ctx[t], clen[t]))
            self.n_pending += len(t)
        if self.n_pending >= self.cfg.chunk:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        matcher = self.matcher()
        t0 = time.perf_counter()
        P, sq, ps, tg, cx, cl = (np.concatenate([p[i] for p in self.pending]) for i in range(6))
        m = matcher.match(P, cx, cl, tg, chunk=self.cfg.chunk)
        self.parts.append((sq, ps, tg, cl, m))
        self.totals.add(m)
        self.pending, self.n_pending = [], 0
        self.timings["match_s"] += time.perf_counter() - t0

    def merge(self, other: "RulesAccumulator") -> None:
        self._flush()
        other._flush()
        self.parts.extend(other.parts)
        self.totals.merge(other.totals)
        self.index_tokens = max(self.index_tokens, other.index_tokens)
        for k, v in other.timings.items():
            self.timings[k] += v

    def _take(self) -> RulesChunk:
        """Every matched token not handed out yet, in (sequence, position) order; then forgotten."""
        self._flush()
        k = self.cfg.top_k
        if not self.parts:
            e = np.zeros(0, np.int32)
            return RulesChunk(e, e, e, e.astype(np.int8), _no_matches(self.templates, k))
        seq = np.concatenate([p[0] for p in self.parts])
        pos = np.concatenate([p[1] for p in self.parts])
        order = np.lexsort((pos, seq))  # batches come in length order: back to corpus order
        chunk = RulesChunk(
            seq=seq[order].astype(np.int32), pos=pos[order].astype(np.int32),
            target=np.concatenate([p[2] for p in self.parts])[order].astype(np.int32),
            ctx_len=np.concatenate([p[3] for p in self.parts])[order].astype(np.int8),
            matches=_concat_matches([p[4] for p in self.parts], self.templates, order),
        )
        self.parts = []
        return chunk

    def drain(self) -> RulesChunk | None:
        self._flush()
        return self._take() if self.parts else None

    def _split_fields(self) -> dict:
        return {"split": self.split.split, "split_source": self.split.source}

    def finish(self, lm: LoadedModel | None = None, tokens=None) -> RulesResult:
        left = self._take()
        res = RulesResult(
            config=self.cfg, templates=self.templates, seq=left.seq, pos=left.pos, target=left.target,
            ctx_len=left.ctx_len, matches=left.matches, index_tokens=self.index_tokens,
            aggregates=self.totals.aggregates(self.templates, self.cfg) | self._split_fields(),
        )
        res.timings = {k: round(v, 3) for k, v in self.timings.items()}
        return res


def run(lm: LoadedModel, seqs: Sequences, cfg: RulesConfig) -> RulesResult:
    """Every token of an in-memory ``Sequences`` (one shard, nothing drained): the result holds
    all matches and the aggregates."""
    from . import JOB
    from ...sweep import run_jobs

    return run_jobs(lm, seqs, [(JOB, cfg)], cfg.batch_size)[0]


def aggregates(res: RulesResult) -> dict:
    """The aggregates of the tokens a result holds (all of them after ``run``)."""
    kept = {k: res.aggregates[k] for k in ("split", "split_source") if k in res.aggregates}
    return _Totals(len(res.templates)).add(res.matches).aggregates(res.templates, res.config) | kept


def summary(res: RulesResult) -> dict:
    a = res.aggregates
    return {k: a.get(k) for k in ("n_predictions", "n_defined", "agreement", "model_top1", "backoff_agreement", "rule_set", "distance",
                                  "split")} | {
        "timings": res.timings, "index_tokens": res.index_tokens}


# ---------------------------------------------------------------------------------------------
# live: one prompt


def match_prompt(lm: LoadedModel, index: NgramIndex, text: str, rule_set_name: RuleSet = "subgram",
                 distance: Distance = "variational", top_k: int = 10) -> list[TokenMatch]:
    """Per-token rule matches of a prompt typed by the user (BOS prepended when the model uses one).
    Entry ``i`` describes the prediction of token ``pos = i + 1``."""
    if not text or not text.strip():
        raise ValueError("type a prompt first")
    ids = np.asarray(lm.encode(text), dtype=np.int64)
    if len(ids) < 2:
        raise ValueError("the prompt needs at least two tokens")
    ids = ids[: lm.n_ctx]
    matcher = Matcher(index, rule_set(rule_set_name), distance, top_k)
    probs = model_probs(lm, torch.from_numpy(ids)[None])[0].numpy()
    first_is_bos = lm.prepend_bos and lm.bos_id is not None and ids[0] == lm.bos_id
    ctx, clen = contexts_of(ids, lm.bos_id if first_is_bos else None, first=1 if first_is_bos else 0)
    t = np.arange(1, len(ids))
    m = matcher.match(probs[t - 1], ctx[t], clen[t], ids[t])
    return token_matches(matcher.templates, ids, lm.display_vocab(), t, clen[t], m)
