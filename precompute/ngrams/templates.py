"""Rule templates (Nguyen, "Understanding Transformers via N-gram Statistics", NeurIPS 2024).

The *context* of a prediction is its last <= 7 tokens, oldest first, never crossing the start of a
story (BOS). A *template* is a string over the last ``n`` context positions, oldest first:

- ``+`` kept: the training text must have this very token here;
- ``-`` dropped: the position is removed, the tokens around it close up;
- ``*`` marginalised: any token here (the position stays, its token is free).

The first (oldest) symbol is always ``+`` so the length ``n`` is what the template says.
Applying a template to a context gives a *query*: the kept tokens and ``*`` wildcards left after
removing the ``-`` positions, e.g. ``+-*+`` on ``(there, was, a, big)`` -> ``(there, *, big)``.
The rule's prediction is the next-token distribution after every occurrence of the query in the
training corpus.

Rule sets:

- ``suffix``: ``+``, ``++``, ..., ``+++++++`` (classic n-grams, 7 rules);
- ``subgram``: ``+`` then ``+``/``-`` (2**0 + ... + 2**6 = 127 rules);
- ``all``: ``+`` then ``+``/``-``/``*`` (3**0 + ... + 3**6 = 1,093 strings), de-duplicated.

Equivalence in ``all``: two templates are the same rule when they give the same query for every
context. A query is fixed by the kept positions and, between two consecutive kept positions
(and after the last one), by how many ``*`` the gap holds: the order of ``-`` and ``*`` inside a
gap does not matter (``+*-+`` and ``+-*+`` both give ``(c1, *, c4)``). The canonical form puts the
``-`` of a gap first. A gap of length g has g+1 classes instead of 2**g strings, which leaves
**609** distinct rules (of 1,093 strings). Leading ``-``/``*`` before the first ``+`` never occur
(the first symbol is ``+`` by definition; a leading ``*`` would only ask that some token precede,
and a leading ``-`` is a shorter template).

Order: every rule set is ordered by length ``n``, then by the symbols left to right with
``+`` < ``-`` < ``*``. Ties between rules at the same distance go to the earliest rule.
"""

from __future__ import annotations

import html
import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

RuleSet = Literal["suffix", "subgram", "all"]
RULE_SETS: dict[str, str] = {
    "suffix": "R_suffix: all kept (classic n-grams)",
    "subgram": "R_subgram: kept or dropped",
    "all": "R_all: kept, dropped or marginalised (de-duplicated)",
}
MAX_N = 7
_SYMBOL_ORDER = {"+": 0, "-": 1, "*": 2}
_VALID = re.compile(r"^\+[+\-*]{0,6}$")


def check_template(t: str) -> str:
    if not isinstance(t, str) or not _VALID.match(t):
        raise ValueError(f"bad rule template {t!r}: 1-{MAX_N} symbols of + - *, the first one +")
    return t


def canonical(t: str) -> str:
    """The representative of ``t``'s equivalence class: inside each run of non-``+`` symbols,
    the ``-`` come first."""
    check_template(t)
    return re.sub(r"[-*]+", lambda m: "-" * m.group().count("-") + "*" * m.group().count("*"), t)


def _sort_key(t: str):
    return (len(t), [_SYMBOL_ORDER[c] for c in t])


@lru_cache(maxsize=None)
def rule_set(name: str, max_n: int = MAX_N) -> tuple[str, ...]:
    """The templates of a rule set, in the set's order (see the module doc)."""
    if name not in RULE_SETS:
        raise ValueError(f"unknown rule set {name!r}; choose one of {', '.join(RULE_SETS)}")
    if not 1 <= max_n <= MAX_N:
        raise ValueError(f"max_n must be 1-{MAX_N}")
    symbols = {"suffix": "+", "subgram": "+-", "all": "+-*"}[name]
    out: set[str] = set()
    for n in range(1, max_n + 1):
        for rest in itertools.product(symbols, repeat=n - 1):
            out.add(canonical("+" + "".join(rest)))
    return tuple(sorted(out, key=_sort_key))


@dataclass(frozen=True)
class Pattern:
    """What a template asks of the training text, independent of the context.

    ``offsets``: for each kept token, its distance back from the predicted token in the
    training text (1 = the token just before). ``span``: how many tokens the query covers
    (kept + ``*``); the oldest is always kept, so ``span == max(offsets)``.
    ``ctx_pos``: for each kept token, its distance back in the *context* (1 = last context token),
    in the same order as ``offsets`` (oldest first)."""

    template: str
    offsets: tuple[int, ...]
    ctx_pos: tuple[int, ...]

    @property
    def span(self) -> int:
        return self.offsets[0]

    @property
    def n(self) -> int:
        return len(self.template)


@lru_cache(maxsize=None)
def pattern(t: str) -> Pattern:
    check_template(t)
    n = len(t)
    eff = [(i, c) for i, c in enumerate(t) if c != "-"]  # positions left after dropping
    span = len(eff)
    offsets, ctx_pos = [], []
    for j, (i, c) in enumerate(eff):
        if c == "+":
            offsets.append(span - j)
            ctx_pos.append(n - i)
    return Pattern(t, tuple(offsets), tuple(ctx_pos))


def query(t: str, context) -> tuple:
    """The query of template ``t`` on ``context`` (oldest first): kept tokens and ``None`` for ``*``."""
    n = len(t)
    if len(context) < n:
        raise ValueError(f"template {t!r} needs {n} context tokens, got {len(context)}")
    ctx = list(context)[-n:]
    return tuple(ctx[i] if c == "+" else None for i, c in enumerate(t) if c != "-")


def render_rule(t: str, context_strs, html_out: bool = False, arrow: bool = True) -> str:
    """A readable rule on its context, e.g. ``there * a ->`` (dropped tokens struck through).

    Plain text strikes dropped tokens with U+0336; HTML wraps them in ``<del>`` (token text escaped)."""
    ctx = list(context_strs)[-len(t):]
    if len(ctx) < len(t):
        raise ValueError(f"template {t!r} needs {len(t)} context tokens, got {len(ctx)}")
    parts = []
    for c, s in zip(t, ctx):
        shown = s.strip() or repr(s)
        if c == "+":
            parts.append(html.escape(shown) if html_out else shown)
        elif c == "*":
            parts.append("<b>*</b>" if html_out else "*")
        else:
            parts.append(f"<del>{html.escape(shown)}</del>" if html_out else "".join(ch + "\u0336" for ch in shown))
    if arrow:
        parts.append("&rarr;" if html_out else "->")
    return " ".join(parts)


def length_of(t: str) -> int:
    return len(t)
