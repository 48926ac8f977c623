"""A user's hypothesis about a neuron ("it fires on animal names") checked against its spectrum.

The stored histogram counts every scored token but has no token identity; the stored spectrum
sample holds up to ``samples_per_bin`` random tokens per bin. So the matching share of a bin is
estimated from its sample and scaled to the bin's real count: each sampled token stands for
``count / n_sampled`` tokens of its bin (exact when the bin has no more tokens than the sample).

A regex hypothesis comes from a URL anyone can share, so it runs on RE2 (``google-re2``), whose
matching time is linear in the text: no pattern can stall the server. RE2 takes Python's syntax
except backreferences and lookaround (refused with a one-line reason); ``\\w``, ``\\d``, ``\\s``
and ``\\b`` are ASCII-only there. Patterns are at most ``MAX_PATTERN`` characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import re2

Mode = Literal["list", "regex"]
MODES: dict[Mode, str] = {"list": "token list (comma-separated)", "regex": "regular expression"}
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
        if self.mode == "regex":
            self.regex  # noqa: B018 - compiles now, so a bad pattern fails here with its reason
        elif len(self.text) > MAX_LIST:
            raise ValueError(f"the token list is {len(self.text)} characters long; the limit is {MAX_LIST}")

    @cached_property
    def regex(self):
        return compile_regex(self.text)

    @property
    def empty(self) -> bool:
        return not self.text.strip() if self.mode == "list" else self.text == ""

    def items(self) -> frozenset[str]:
        return self._items

    @cached_property
    def _items(self) -> frozenset[str]:
        return frozenset(t.strip().lower() for t in self.text.split(",") if t.strip())

    def matches(self, token: str) -> bool:
        """Token list: the token without surrounding whitespace, case-insensitive, is one of the
        items. Regex: an RE2 search on the token text as the model saw it (leading space included)."""
        if self.empty:
            return False
        if self.mode == "regex":
            return self.regex.search(token) is not None
        return token.strip().lower() in self._items


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
        if hyp is not None and hyp.matches(smp.token.text):
            n_m[smp.bin] += 1
    out = []
    for b, c in enumerate(counts):
        est = c * n_m[b] / n_s[b] if n_s[b] else 0.0
        out.append(BinShare(b, edges[b], edges[b + 1], int(c), n_s[b], n_m[b], float(est)))
    return out


@dataclass(frozen=True)
class Explained:
    share: float | None  # estimated fraction of tokens in the top bins that match (None: no tokens)
    top_frac: float
    threshold: float  # activations >= this are "top"
    n_tokens: int  # tokens in the top bins
    n_sampled: int
    n_matching_sampled: int


def explained_share(page, hyp: Hypothesis, top_frac: float = 0.2) -> Explained:
    """Estimated share of the tokens in the top ``top_frac`` of the activation range (whole bins
    whose lower edge is at or above ``max - top_frac * (max - min)``) that the hypothesis matches."""
    if not 0 < top_frac <= 1:
        raise ValueError("top_frac must be in (0, 1]")
    edges = page.histogram.edges
    threshold = edges[-1] - top_frac * (edges[-1] - edges[0])
    rows = [r for r in bin_shares(page, hyp) if r.lo >= threshold - 1e-9 * max(1.0, abs(threshold))]
    total = sum(r.count for r in rows)
    est = sum(r.est_matching for r in rows)
    return Explained(
        share=est / total if total else None, top_frac=top_frac, threshold=threshold, n_tokens=total,
        n_sampled=sum(r.n_sampled for r in rows), n_matching_sampled=sum(r.n_matching for r in rows),
    )
