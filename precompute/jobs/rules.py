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
bundled lowercase model) and cached under data/cache/ngrams/.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models import LoadedModel
from ..ngrams.index import NgramIndex
from ..ngrams.matcher import DISTANCES, Distance, Matcher, Matches, contexts_of
from ..ngrams.templates import MAX_N, RULE_SETS, RuleSet, rule_set
from ..ngrams.views import RuleFit, TokenMatch, token_matches  # noqa: F401 - re-exported
from ..sequences import Sequences, batches

N_HIST_BINS = 20


@dataclass(frozen=True)
class RulesConfig:
    ngram_corpus: str = ""
    rule_set: RuleSet = "subgram"
    distance: Distance = "variational"
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
class RulesResult:
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


def load_index(lm: LoadedModel, cfg: RulesConfig) -> NgramIndex:
    return NgramIndex.for_corpus(lm, cfg.ngram_corpus, cache=cfg.cache, cache_root=Path(cfg.cache_dir) if cfg.cache_dir else None)


@torch.inference_mode()
def model_probs(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Next-token distributions [batch, pos, vocab] (float32)."""
    logits = lm.forward(ids).logits
    return torch.softmax(logits.float(), dim=-1).cpu()


def run(lm: LoadedModel, seqs: Sequences, cfg: RulesConfig, index: NgramIndex | None = None) -> RulesResult:
    templates = rule_set(cfg.rule_set)
    t0 = time.perf_counter()
    if index is None:
        index = load_index(lm, cfg)
    if index.vocab_size != lm.vocab_size:
        raise ValueError(f"the n-gram index has vocabulary {index.vocab_size}, the model {lm.vocab_size}")
    matcher = Matcher(index, templates, cfg.distance, cfg.top_k)
    t_index = time.perf_counter() - t0
    first = seqs.first_scored()
    bos = seqs.bos_id if seqs.prepend_bos else None
    parts: list[tuple] = []
    pend_p, pend_meta = [], []
    n_pend = 0
    t_fwd = t_match = 0.0

    def flush():
        nonlocal pend_p, pend_meta, n_pend, t_match
        if not pend_p:
            return
        t1 = time.perf_counter()
        P = np.concatenate(pend_p)
        sq, ps, tg, cx, cl = (np.concatenate([m[i] for m in pend_meta]) for i in range(5))
        parts.append((sq, ps, tg, cl, matcher.match(P, cx, cl, tg, chunk=cfg.chunk)))
        t_match += time.perf_counter() - t1
        pend_p, pend_meta, n_pend = [], [], 0

    for b in batches(seqs, cfg.batch_size):
        t1 = time.perf_counter()
        probs = model_probs(lm, b.ids).numpy()
        t_fwd += time.perf_counter() - t1
        for r, (k, n) in enumerate(zip(b.seq_idx, b.lengths)):
            ids = np.asarray(seqs.ids[k], dtype=np.int64)
            ctx, clen = contexts_of(ids, bos, first=first)
            t = np.arange(1, n)  # predicted positions; the prediction is made at t-1
            pend_p.append(probs[r, t - 1])
            pend_meta.append((np.full(len(t), k), t, ids[t], ctx[t], clen[t]))
            n_pend += len(t)
        if n_pend >= cfg.chunk:
            flush()
    flush()
    # sequences come out of batches() in length order: put them back in corpus order
    seq = np.concatenate([p[0] for p in parts])
    pos = np.concatenate([p[1] for p in parts])
    order = np.lexsort((pos, seq))
    m = _concat_matches([p[4] for p in parts], templates, order)
    res = RulesResult(
        config=cfg, templates=templates, seq=seq[order].astype(np.int32), pos=pos[order].astype(np.int32),
        target=np.concatenate([p[2] for p in parts])[order].astype(np.int32),
        ctx_len=np.concatenate([p[3] for p in parts])[order].astype(np.int8), matches=m,
        index_tokens=len(index),
    )
    res.timings = {"index_s": round(t_index, 3), "forward_s": round(t_fwd, 3), "match_s": round(t_match, 3)}
    res.aggregates = aggregates(res)
    return res


def _concat_matches(ms: list[Matches], templates, order) -> Matches:
    fields = [f for f in Matches.__dataclass_fields__ if f != "templates"]
    return Matches(templates=templates, **{f: np.concatenate([getattr(m, f) for m in ms])[order] for f in fields})


def aggregates(res: RulesResult) -> dict:
    m = res.matches
    d = m.defined
    nd = int(d.sum())
    mean = lambda x: float(np.mean(x)) if len(x) else None  # noqa: E731
    by_rule = []
    if nd:
        cnt = np.bincount(m.rule[d], minlength=len(res.templates))
        agr = np.bincount(m.rule[d], weights=m.agree[d], minlength=len(res.templates))
        for r in np.argsort(-cnt, kind="stable"):
            if cnt[r] == 0:
                break
            by_rule.append({"rule": int(r), "template": res.templates[r], "count": int(cnt[r]), "agreement": float(agr[r] / cnt[r])})
    hist, edges = np.histogram(m.dist[d], bins=N_HIST_BINS, range=(0.0, 1.0))
    best_mean = []
    for n in range(MAX_N):
        x = m.best_dist[d, n]
        x = x[~np.isnan(x)]
        best_mean.append(float(x.mean()) if len(x) else None)
    return {
        "n_predictions": int(len(m)),
        "n_defined": nd,
        "agreement": mean(m.agree[d]),
        "model_top1": mean(m.model_correct[d]),
        "model_top1_all": mean(m.model_correct),
        "backoff_agreement": mean(m.backoff_agree[d]),
        "backoff_top1": mean(m.backoff_correct[d]),
        "mean_distance": mean(m.dist[d]),
        "agreement_vs_n": [mean(m.agree_upto[d, n]) for n in range(MAX_N)],
        "best_distance_mean_by_length": best_mean,
        "dist_hist": {"edges": [float(e) for e in edges], "counts": [int(c) for c in hist]},
        "by_rule": by_rule,
        "rule_set": res.config.rule_set,
        "distance": res.config.distance,
        "n_rules": len(res.templates),
    }


def summary(res: RulesResult) -> dict:
    a = res.aggregates
    return {k: a[k] for k in ("n_predictions", "n_defined", "agreement", "model_top1", "backoff_agreement", "rule_set", "distance")} | {
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
