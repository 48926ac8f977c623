"""Explanation job: for every neuron of a complete neuron run, candidate explanations from the
neuron's own stored data, each scored exactly as the neuron page scores a hypothesis typed by
hand, and the best few kept.

It sweeps nothing: it reads the neuron run's rows (histogram, spectrum sample with contexts, top
tokens, direct logit effects). The candidates of a neuron:

- **token**: the set of tokens (list mode: case and surrounding spaces ignored) that best explains
  the top range of its spectrum sample, grown greedily (below), and its top tokens by mean;
- **prev** / **ngram**: the token(s) right before, as a context regex (``" the\\[\\["``);
- **next**: the next token, among the tokens it promotes most (direct logit effects);
- **class**: capitalised word, punctuation, a name (common story names), inside a quote (an odd
  number of ``"`` in the stored context before the token), start of a sentence, start of a story
  (BOS within the stored context, i.e. the first 12 tokens of a sequence).

A set is chosen from per-item estimates: each sampled token stands for ``count / n_sampled``
tokens of its bar, so the estimated top-range and total counts of a set are sums over its items,
and for F1 = ``2 T / (A + N)`` (``T`` matching tokens in the top range, ``A`` matching tokens, ``N``
tokens in the top range) the best set of any size is a prefix of the items sorted by ``T / A``;
the prefix with the best F1 is kept, at most ``max_items`` long.

Every candidate is then scored by ``app.hypothesis.score`` on the matches of its ``Hypothesis``
(the same ``matches``/``matches_context`` the page calls, on the same context strings), so a
stored score equals what the page shows for that hypothesis and "top %". Recall is the page's
explained share; candidates are ranked by F1.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from app.hypothesis import TOP_CHOICES, Hypothesis, MAX_LIST, MAX_PATTERN, score, sample_weights

Kind = Literal["token", "top-mean", "prev", "ngram", "next", "class"]
KINDS: dict[Kind, str] = {
    "token": "the token itself (the best set from the spectrum sample)",
    "top-mean": "the token itself (its top tokens by mean activation)",
    "prev": "the token before",
    "ngram": "the two tokens before",
    "next": "the next token, among those it promotes",
    "class": "a simple class of tokens or contexts",
}
# common names in TinyStories; matched as a token list (case ignored)
NAMES = ("lily", "tom", "tim", "timmy", "ben", "sue", "sam", "max", "mia", "anna", "jack", "lucy", "sara", "sarah",
         "amy", "bob", "jane", "billy", "joe", "kitty", "spot", "mary", "emma", "john", "lila", "jill", "molly", "bella",
         "daisy", "rosie", "zoe", "leo", "mike", "tommy", "jenny", "susie", "ellie", "lola", "bobo", "pip")


@dataclass(frozen=True)
class ExplanationsConfig:
    top_pct: int = 20  # percent of the activation range counted as "top" (one of the page's choices)
    n_keep: int = 5  # explanations stored per neuron
    max_items: int = 6  # tokens in a set

    def __post_init__(self):
        if self.top_pct not in TOP_CHOICES:
            raise ValueError(f"--explain-top must be one of {', '.join(map(str, TOP_CHOICES))} (the neuron page's choices)")
        if self.n_keep < 1 or self.max_items < 1:
            raise ValueError("--explanations must be at least 1")

    def params(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Explanation:
    layer: int
    neuron: int
    rank: int  # 0 = best
    kind: Kind
    label: str  # plain text, searchable
    mode: str  # the hypothesis as the page takes it (``mode`` and ``hyp`` URL parameters)
    text: str
    score: float  # F1
    recall: float  # the page's "explained share"
    precision: float
    n_top: int  # tokens in the top range

    def hypothesis(self) -> Hypothesis:
        return Hypothesis(self.text, self.mode)


@dataclass
class ExplanationsResult:
    config: ExplanationsConfig
    source_run: int
    explanations: list[Explanation] = field(default_factory=list)
    n_neurons: int = 0
    seconds: float = 0.0
    sae_id: int | None = None  # the units are this SAE's features (None: MLP neurons)


@dataclass
class NeuronData:
    """What the job reads of one neuron (a row of the neuron run)."""

    layer: int
    neuron: int
    edges: np.ndarray
    counts: np.ndarray
    samples: np.ndarray  # SAMPLE_DTYPE records
    top_tokens: list  # [[token_id, mean, count], ...]
    logit_top: list  # [[token_id, effect, count in the corpus], ...]


# ---------------------------------------------------------------------------------- text helpers


def quoted(text: str) -> str:
    return "'" + text.replace("\n", "⏎").replace("\t", "⇥") + "'"


_META = set("\\.^$|?*+()[]{}")


def re_escape(text: str) -> str:
    """``text`` as a literal in RE2 syntax (its metacharacters escaped; newline and tab as \\n, \\t)."""
    return "".join("\\n" if c == "\n" else "\\t" if c == "\t" else "\\" + c if c in _META else c for c in text)


list_key = Hypothesis.item


def listable(key: str) -> bool:
    return bool(key) and "," not in key


def token_set_hypothesis(keys: list[str]) -> tuple[str, str]:
    """(mode, text) matching tokens whose ``list_key`` is one of ``keys``: a token list when every
    key can be a list item, else a case-insensitive regex."""
    if all(listable(k) for k in keys):
        return "list", ", ".join(keys)
    return "regex", "(?i)^\\s*(?:" + "|".join(re_escape(k) for k in keys) + ")\\s*$"


def prev_hypothesis(texts: list[str]) -> str:
    return "(?:" + "|".join(re_escape(t) for t in texts) + ")\\[\\[" if len(texts) > 1 else re_escape(texts[0]) + "\\[\\["


def next_hypothesis(texts: list[str]) -> str:
    return "\\]\\](?:" + "|".join(re_escape(t) for t in texts) + ")" if len(texts) > 1 else "\\]\\]" + re_escape(texts[0])


def class_hypotheses(bos_text: str | None) -> list[tuple[str, str, str]]:
    """(label, mode, text) of the class explanations."""
    out = [
        ("capitalised word", "regex", "^\\s?[A-Z]"),
        ("punctuation", "regex", "^\\s*[[:punct:]]+\\s*$"),
        ("a name", "list", ", ".join(NAMES)),
        ("inside a quote", "context", '^[^"]*"(?:[^"]*"[^"]*")*[^"]*\\[\\['),
        ("start of a sentence", "context", '(?:[.!?]["\']?' + (f"|^{re_escape(bos_text)}" if bos_text else "") + ")\\[\\["),
    ]
    if bos_text:
        out.append(("start of a story", "context", "^" + re_escape(bos_text)))
    return out


# ---------------------------------------------------------------------------------- the samples


class SampleIndex:
    """Every distinct sampled corpus position of the run, once: its token, the tokens around it
    and its context string (exactly as the neuron page builds it), and per hypothesis a cache of
    matches (token hypotheses by token id, context ones by position)."""

    def __init__(self, neurons: list[NeuronData], voc: list[str], special: set[int]):
        self.voc = voc
        recs = [n.samples for n in neurons]
        allr = np.concatenate(recs) if recs else np.zeros(0, dtype=neurons[0].samples.dtype if neurons else None)
        loc = (allr["seq"].astype(np.int64) << 24) | allr["pos"].astype(np.int64)
        uloc, first, inv = np.unique(loc, return_index=True, return_inverse=True)
        self.of_neuron = np.split(inv.astype(np.int64), np.cumsum([len(r) for r in recs])[:-1]) if recs else []
        u = allr[first]
        ctx, at, n = u["ctx"].astype(np.int64), u["at"].astype(np.int64), u["n_ctx"].astype(np.int64)
        rows = np.arange(len(u))

        def pick(off: int) -> np.ndarray:
            j = at + off
            ok = (j >= 0) & (j < n)
            return np.where(ok, ctx[rows, np.clip(j, 0, ctx.shape[1] - 1)], -1)

        self.tok, self.prev, self.prev2, self.next = pick(0), pick(-1), pick(-2), pick(1)
        text = [self.text(t) for t in range(len(voc))]
        self.contexts = []
        for c, a, m in zip(ctx.tolist(), at.tolist(), n.tolist()):
            c = c[:m]
            self.contexts.append("".join(text[t] if 0 <= t < len(voc) else f"<{t}>" for t in c[:a]) + "[[" +
                                 (text[c[a]] if 0 <= c[a] < len(voc) else f"<{c[a]}>") + "]]" +
                                 "".join(text[t] if 0 <= t < len(voc) else f"<{t}>" for t in c[a + 1 :]))
        keys = [list_key(t) for t in voc]
        self.key_names = sorted(set(keys))
        kid = {k: i for i, k in enumerate(self.key_names)}
        self.key_of = np.array([kid[k] for k in keys], np.int64)  # token id -> list key id
        self.key_id = kid
        self._tok_cache: dict[tuple[str, str], np.ndarray] = {}
        self._ctx_cache: dict[str, np.ndarray] = {}

    def text(self, tid: int) -> str:
        return self.voc[tid] if 0 <= tid < len(self.voc) else f"<{tid}>"

    def matches(self, hyp: Hypothesis, idx: np.ndarray, joined: tuple[str, np.ndarray] | None = None) -> np.ndarray:
        """Whether each of the distinct positions ``idx`` matches ``hyp``, as the page decides
        (``Hypothesis.matches`` on the token, ``matches_context`` on the context string).

        A token list compares ``Hypothesis.item`` of the token with its items. A context regex
        that can match neither ``^``/``$`` nor NUL (``joined`` given: the contexts of ``idx``
        joined by NUL, and where each starts) runs once over them all: a search finds a match in
        a context exactly when the scan of the joined text finds one inside it."""
        if hyp.on_context:
            if joined is not None:
                text, starts = joined
                hits = np.array([m.start() for m in hyp.regex.finditer(text)], np.int64)
                out = np.zeros(len(idx), bool)
                out[np.searchsorted(starts, hits, side="right") - 1] = True
                return out
            cache = self._ctx_cache.setdefault(hyp.text, np.full(len(self.contexts), -1, np.int8))
            todo = idx[cache[idx] < 0]
            if len(todo):
                cache[todo] = [hyp.matches_context(self.contexts[i]) for i in todo.tolist()]
            return cache[idx] == 1
        tids = self.tok[idx]
        if hyp.mode == "list":
            items = [self.key_id[k] for k in hyp.items() if k in self.key_id]
            return np.isin(self.key_of[tids], np.array(items, np.int64))
        cache = self._tok_cache.get((hyp.mode, hyp.text))
        if cache is None:
            cache = np.full(len(self.voc), -1, np.int8)
            self._tok_cache[(hyp.mode, hyp.text)] = cache
        todo = np.unique(tids[cache[tids] < 0])
        if len(todo):
            cache[todo] = [hyp.matches(self.voc[t]) for t in todo.tolist()]
        return cache[tids] == 1

    def joined(self, idx: np.ndarray) -> tuple[str, np.ndarray] | None:
        """The contexts of ``idx`` joined by NUL and where each starts (None when one holds a NUL)."""
        parts = [self.contexts[i] for i in idx.tolist()]
        if any("\x00" in c for c in parts):
            return None
        lens = np.fromiter((len(c) + 1 for c in parts), np.int64, len(parts))
        return "\x00".join(parts), np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)


# ---------------------------------------------------------------------------------- candidates


def best_prefix(keys: np.ndarray, w: np.ndarray, top: np.ndarray, n_top: int, max_items: int) -> list[int]:
    """The items (``keys``: one per sample, -1 none) of the best-F1 set: a prefix of the items
    with matches in the top range, sorted by their estimated precision (ties by key)."""
    ok = keys >= 0
    if not ok.any() or n_top == 0:
        return []
    if keys.max() < 1 << 16:  # small keys: counted densely, no sort
        inv = keys[ok]
        uk = np.arange(int(inv.max()) + 1)
    else:
        uk, inv = np.unique(keys[ok], return_inverse=True)
    A = np.bincount(inv, weights=w[ok], minlength=len(uk))
    T = np.bincount(inv, weights=(w * top)[ok], minlength=len(uk))
    sel = np.nonzero(T > 0)[0]
    if not len(sel):
        return []
    order = sel[np.lexsort((uk[sel], -(T[sel] / A[sel])))][:max_items]
    f1 = 2 * np.cumsum(T[order]) / (np.cumsum(A[order]) + n_top)
    return [int(k) for k in uk[order[: int(np.argmax(f1)) + 1]]]


def candidates(nd: NeuronData, idx: np.ndarray, ix: SampleIndex, cfg: ExplanationsConfig,
               classes: list[tuple[str, str, str]], weights) -> list[tuple[Kind, str, str, str]]:
    """(kind, label, mode, text) of one neuron's candidate explanations; the context regexes
    of kinds prev, ngram and next are literals (no anchors, no NUL)."""
    w, top, _thr, n_top = weights
    out: list[tuple[Kind, str, str, str]] = []
    # the token itself: the best set of list keys
    keys = best_prefix(ix.key_of[ix.tok[idx]], w, top, n_top, cfg.max_items)
    names = [ix.key_names[k] for k in keys]
    while names and len(", ".join(names)) > MAX_LIST:
        names.pop()
    if names:
        mode, text = token_set_hypothesis(names)
        if mode == "list" or len(text) <= MAX_PATTERN:
            out.append(("token", "token " + ", ".join(quoted(k) for k in names), mode, text))
    # its top tokens by mean activation: the best one and the best three
    means = [ix.voc[int(t)] for t, _m, _c in (nd.top_tokens or []) if 0 <= int(t) < len(ix.voc)]
    for k in (1, 3):
        names = list(dict.fromkeys(list_key(t) for t in means[:k]))
        if len(means) >= k and names:
            mode, text = token_set_hypothesis(names)
            if mode == "list" or len(text) <= MAX_PATTERN:
                out.append(("top-mean", "token " + ", ".join(quoted(n) for n in names), mode, text))
    # the token before, the two before
    prev = best_prefix(ix.prev[idx], w, top, n_top, min(cfg.max_items, 4))
    if prev:
        texts = [ix.text(t) for t in prev]
        text = prev_hypothesis(texts)
        if len(text) <= MAX_PATTERN:
            out.append(("prev", "after " + ", ".join(quoted(t) for t in texts), "context", text))
    V = max(len(ix.voc), 1)
    pair = np.where((ix.prev2[idx] >= 0) & (ix.prev[idx] >= 0), ix.prev2[idx] * V + ix.prev[idx], -1)
    bigram = best_prefix(pair, w, top, n_top, 1)
    if bigram:
        texts = [ix.text(bigram[0] // V) + ix.text(bigram[0] % V)]
        text = prev_hypothesis(texts)
        if len(text) <= MAX_PATTERN:
            out.append(("ngram", "after " + quoted(texts[0]), "context", text))
    # the next token, among the ones it promotes
    promoted = np.array([int(e[0]) for e in (nd.logit_top or [])], np.int64)
    nxt = ix.next[idx]
    nxt = np.where(np.isin(nxt, promoted), nxt, -1)
    after = best_prefix(nxt, w, top, n_top, min(cfg.max_items, 4))
    if after:
        texts = [ix.text(t) for t in after]
        text = next_hypothesis(texts)
        if len(text) <= MAX_PATTERN:
            out.append(("next", "before " + ", ".join(quoted(t) for t in texts) + " (tokens it promotes)", "context", text))
    out += [("class", label, mode, text) for label, mode, text in classes]
    return out


def explain(neurons: list[NeuronData], voc: list[str], special: set[int], bos_id: int | None,
            cfg: ExplanationsConfig = ExplanationsConfig(), source_run: int = 0) -> ExplanationsResult:
    """Score every candidate of every neuron; keep the ``n_keep`` best by F1 (ties: recall, then
    the shorter hypothesis) with F1 > 0."""
    t0 = time.perf_counter()
    res = ExplanationsResult(config=cfg, source_run=source_run, n_neurons=len(neurons))
    if not neurons:
        return res
    ix = SampleIndex(neurons, voc, special)
    bos_text = voc[bos_id] if bos_id is not None and 0 <= bos_id < len(voc) else None
    classes = class_hypotheses(bos_text)
    hyps: dict[tuple[str, str], Hypothesis] = {}
    for nd, idx in zip(neurons, ix.of_neuron):
        scored = []
        seen = set()
        weights = sample_weights(nd.edges, nd.counts, nd.samples["bin"], cfg.top_pct / 100)
        joined = ix.joined(idx)
        for kind, label, mode, text in candidates(nd, idx, ix, cfg, classes, weights):
            if (mode, text) in seen:
                continue
            seen.add((mode, text))
            hyp = hyps.get((mode, text))
            if hyp is None:
                hyp = hyps[(mode, text)] = Hypothesis(text, mode)
            literal = kind in ("prev", "ngram", "next")
            matched = ix.matches(hyp, idx, joined if literal else None)
            ex = score(nd.edges, nd.counts, nd.samples["bin"], matched, cfg.top_pct / 100, weights)
            if ex.f1:
                scored.append((ex, kind, label, mode, text))
        scored.sort(key=lambda c: (-c[0].f1, -(c[0].share or 0.0), len(c[4])))
        for rank, (ex, kind, label, mode, text) in enumerate(scored[: cfg.n_keep]):
            res.explanations.append(Explanation(nd.layer, nd.neuron, rank, kind, label, mode, text, float(ex.f1),
                                                float(ex.share), float(ex.precision), int(ex.n_tokens)))
    res.seconds = time.perf_counter() - t0
    return res
