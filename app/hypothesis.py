"""A user's hypothesis about a neuron ("it fires on animal names") checked against its spectrum.

The stored histogram counts every scored token but has no token identity; the stored spectrum
sample holds up to ``samples_per_bin`` random tokens per bin. So the matching share of a bin is
estimated from its sample and scaled to the bin's real count: each sampled token stands for
``count / n_sampled`` tokens of its bin (exact when the bin has no more tokens than the sample).

A hypothesis is a token list or a regex on the token's text (both look at the token alone), or a
regex on the sample's *context* as stored and shown: up to 12 tokens before, the token in
``[[ ]]``, up to 3 after (``" the[[ dog]] ran"``), which can say what precedes or follows it.

``score`` turns the sampled tokens that match into estimated counts and scores them against
"activation in the top range": recall (the explained share, what the page shows first),
precision and F1. The explanation job (``precompute/jobs/explanations``) calls the same
function, so a stored score is exactly what the page computes for the same hypothesis.

A regex hypothesis comes from a URL anyone can share, so it runs on RE2 (``google-re2``), whose
matching time is linear in the text: no pattern can stall the server. RE2 takes Python's syntax
except backreferences and lookaround (refused with a one-line reason); ``\\w``, ``\\d``, ``\\s``
and ``\\b`` are ASCII-only there. Patterns are at most ``MAX_PATTERN`` characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import re2

Mode = Literal["list", "regex", "context"]
MODES: dict[Mode, str] = {"list": "token list (comma-separated)", "regex": "regular expression",
                          "context": "regex on the context"}
TOP_CHOICES = (5, 10, 20, 30, 50)  # percent of the activation range counted as "top"
MAX_PATTERN = 200  # characters of a regex hypothesis
MAX_LIST = 2000  # characters of a token-list hypothesis


def _re2_options() -> re2.Options:
    opts = re2.Options()
    opts.log_errors = False  # a refused pattern is the user's message, not a server log line
    return opts


def _to_re2(pattern: str) -> str:
    """Python's end-of-text ``\\Z`` is RE2's ``\\z``; everything else is passed through."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            out.append("\\z" if pattern[i + 1] == "Z" else pattern[i : i + 2])
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


def compile_regex(pattern: str):
    """A linear-time RE2 regex for ``pattern``, or ValueError with a one-line reason."""
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"the regular expression is {len(pattern)} characters long; the limit is {MAX_PATTERN}")
    try:
        return re2.compile(_to_re2(pattern), _re2_options())
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None
    except RecursionError:
        raise ValueError("not a valid regular expression: nested too deeply") from None
    if any(op in why for op in ("(?=", "(?!", "(?<")) or "(?P=" in pattern or re.search(r"escape sequence: \\\d", why):
        why += "; backreferences and lookaround cannot be matched in linear time"
    raise ValueError(f"regular expression not supported: {why}")


@dataclass(frozen=True)
class Hypothesis:
    text: str
    mode: Mode

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"hypothesis mode {self.mode!r} unknown (modes: {', '.join(MODES)})")
        if self.mode != "list":
            self.regex  # noqa: B018 - compiles now, so a bad pattern fails here with its reason
        elif len(self.text) > MAX_LIST:
            raise ValueError(f"the token list is {len(self.text)} characters long; the limit is {MAX_LIST}")

    @cached_property
    def regex(self):
        return compile_regex(self.text)

    @property
    def empty(self) -> bool:
        return not self.text.strip() if self.mode == "list" else self.text == ""

    @property
    def on_context(self) -> bool:
        return self.mode == "context"

    def items(self) -> frozenset[str]:
        return self._items

    @cached_property
    def _items(self) -> frozenset[str]:
        return frozenset(self.item(t) for t in self.text.split(",") if t.strip())

    @staticmethod
    def item(token: str) -> str:
        """A token as a token list compares it: without surrounding whitespace, lower case."""
        return token.strip().lower()

    def matches(self, token: str) -> bool:
        """Token list: the token without surrounding whitespace, case-insensitive, is one of the
        items. Regex: an RE2 search on the token text as the model saw it (leading space included).
        A context hypothesis needs the context: ``matches_sample``."""
        if self.on_context:
            raise ValueError("a context hypothesis matches a sample's context, not a token alone")
        if self.empty:
            return False
        if self.mode == "regex":
            return self.regex.search(token) is not None
        return self.item(token) in self._items

    def matches_context(self, context: str) -> bool:
        """Context mode: an RE2 search on ``before[[token]]after``."""
        return not self.empty and self.regex.search(context) is not None


def sample_matches(hyp, smp) -> bool:
    """Whether a spectrum sample (``.token.text``, ``.context``) matches: a context hypothesis
    reads the context, the others the token alone."""
    if getattr(hyp, "on_context", False):
        return hyp.matches_context(smp.context)
    return hyp.matches(smp.token.text)


@dataclass(frozen=True)
class BinShare:
    bin: int
    lo: float
    hi: float
    count: int  # tokens in the bin (the full histogram)
    n_sampled: int
    n_matching: int  # sampled tokens that match
    est_matching: float  # count * n_matching / n_sampled

    @property
    def est_other(self) -> float:
        return self.count - self.est_matching


def bin_shares(page, hyp: Hypothesis | None) -> list[BinShare]:
    """One row per histogram bin of a ``NeuronPage``: its count and the estimated matching part."""
    edges, counts = page.histogram.edges, page.histogram.counts
    n_s = [0] * len(counts)
    n_m = [0] * len(counts)
    for smp in page.spectrum:
        n_s[smp.bin] += 1
        if hyp is not None and sample_matches(hyp, smp):
            n_m[smp.bin] += 1
    out = []
    for b, c in enumerate(counts):
        est = c * n_m[b] / n_s[b] if n_s[b] else 0.0
        out.append(BinShare(b, edges[b], edges[b + 1], int(c), n_s[b], n_m[b], float(est)))
    return out


@dataclass(frozen=True)
class Explained:
    share: float | None  # recall: estimated fraction of tokens in the top bins that match (None: no tokens)
    top_frac: float
    threshold: float  # activations >= this are "top"
    n_tokens: int  # tokens in the top bins
    n_sampled: int  # sampled tokens in the top bins
    n_matching_sampled: int  # of those, matching
    precision: float | None = None  # estimated fraction of the matching tokens (all bins) in the top bins
    f1: float | None = None  # 2 PR / (P + R); 0 when nothing in the top bins matches
    est_matching: float = 0.0  # estimated matching tokens, all bins


def top_threshold(edges: Sequence[float], top_frac: float) -> float:
    if not 0 < top_frac <= 1:
        raise ValueError("top_frac must be in (0, 1]")
    return edges[-1] - top_frac * (edges[-1] - edges[0])


def sample_weights(edges: Sequence[float], counts: Sequence[int], bins, top_frac: float):
    """Per sampled token (``bins``: its histogram bar): the tokens it stands for (its bar's count
    over the bar's number of samples) and whether its bar is a top bar (whole bars whose lower
    edge is at or above ``max - top_frac * (max - min)``). Also the threshold and the top bars'
    total count."""
    threshold = top_threshold(edges, top_frac)
    counts = np.asarray(counts, np.float64)
    bins = np.asarray(bins, np.int64)
    n_s = np.bincount(bins, minlength=len(counts))
    w = counts[bins] / np.maximum(n_s[bins], 1)
    top_bar = np.asarray(edges[:-1], np.float64) >= threshold - 1e-9 * max(1.0, abs(threshold))
    return w, top_bar[bins], threshold, int(counts[top_bar].sum())


def score(edges: Sequence[float], counts: Sequence[int], bins, matched, top_frac: float = 0.2, weights=None) -> Explained:
    """Score a hypothesis from which sampled tokens match it (``matched``, one bool per sample,
    ``bins`` their bars): each matching sample stands for its bar's count over the bar's samples.
    ``weights``: ``sample_weights`` of the same arguments, when already computed."""
    w, top, threshold, n_top = weights or sample_weights(edges, counts, bins, top_frac)
    m = np.asarray(matched, bool).reshape(len(w))
    est_top = float(np.sum(w[m & top]))
    est_all = float(np.sum(w[m]))
    recall = est_top / n_top if n_top else None
    precision = est_top / est_all if est_all > 0 else None
    if recall is None:
        f1 = None
    elif precision is None or precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return Explained(
        share=recall, top_frac=top_frac, threshold=threshold, n_tokens=n_top, n_sampled=int(top.sum()),
        n_matching_sampled=int((m & top).sum()), precision=precision, f1=f1, est_matching=est_all,
    )


def explained_share(page, hyp: Hypothesis, top_frac: float = 0.2) -> Explained:
    """How well ``hyp`` explains the top ``top_frac`` of a ``NeuronPage``'s activation range:
    recall (``share``), precision and F1, estimated from the stored sample (``score``)."""
    top_threshold(page.histogram.edges, top_frac)  # a bad top_frac fails before any matching
    matched = [sample_matches(hyp, smp) for smp in page.spectrum]
    return score(page.histogram.edges, page.histogram.counts, [smp.bin for smp in page.spectrum], matched, top_frac)
