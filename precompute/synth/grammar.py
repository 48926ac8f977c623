"""Short children's-story-like texts with planted structure, deterministic from a seed.

Every story is one line (lowercase, so the lowercasing tokenizer changes nothing) and carries
character spans of what was planted:

- ``name_first`` / ``name_later``: the main character's name and a friend's, each drawn from
  ``N_NAMES`` made-up two-syllable names, introduced in the first two sentences; the later
  mentions are predictable only by copying (with two names in play, a token of a name is
  fixed by the token before it at the first mention: an induction head's job);
- ``pronoun``: she/he/her/his, set by the character's gender given in the first sentence;
- ``quote``: the text between an opening and its closing double quote;
- ``phrase``: a planted fixed phrase; ``phrase_end_k{k}``: its last word, which the previous
  ``k`` words determine and the previous ``k - 1`` do not (the phrases of one family share
  everything but their first and last word, and no phrase word occurs outside the phrases);
- ``secret_first`` / ``secret_later``: five random words said once and repeated at the end
  (a copy of an arbitrary sequence: what an induction head does).

``python -m precompute.cli corpus synth --seed 0 --tokens 1000000 --out synth.txt`` writes one
story per line; ``--labels`` adds a JSON-lines file of the spans.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

LABELS = ("name_first", "name_later", "pronoun", "quote", "phrase", "secret_first", "secret_later")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "l", "r")


def _names() -> tuple[str, ...]:
    """Two-syllable made-up names (first syllable open, second may close), minus real words."""
    syl1 = [o + v for o in _ONSETS for v in _VOWELS]
    syl2 = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    taken = set(_WORDS)
    return tuple(a + b for a in syl1 for b in syl2 if a + b not in taken)


# Families of planted phrases: members share every word but the first and the last, so the last
# word is fixed by the first, k words back (k = number of words after the first).
PHRASES: dict[int, tuple[tuple[str, ...], ...]] = {
    2: (("the", "sun", "is", "hot"), ("the", "snow", "is", "cold"), ("the", "sea", "is", "deep")),
    4: (("the", "cow", "jumped", "over", "the", "moon"), ("the", "dog", "jumped", "over", "the", "log"),
        ("the", "cat", "jumped", "over", "the", "fence")),
    6: (("a", "bird", "sang", "a", "song", "about", "the", "sky"),
        ("a", "frog", "sang", "a", "song", "about", "the", "pond"),
        ("a", "bee", "sang", "a", "song", "about", "the", "flowers")),
}
PHRASE_START = {2: 1, 4: 1, 6: 1}  # index of the word that picks the family member

_ADJ = ("little", "happy", "kind", "brave", "shy", "small", "funny", "clever")
_PLACES = ("park", "garden", "forest", "beach", "house", "river", "hill", "shop", "school", "farm")
_THINGS = ("ball", "hat", "book", "box", "kite", "toy", "cake", "boat", "tree", "flower", "rock", "shell")
_COLORS = ("red", "blue", "green", "yellow", "pink", "big", "shiny", "old")
_SECRET = ("apple", "button", "candle", "dragon", "feather", "mango", "honey", "island", "jelly", "ladder",
           "marble", "needle", "orange", "pepper", "rabbit", "ribbon", "silver", "spoon", "tiger", "turtle",
           "violin", "wagon", "window", "zebra", "pillow", "pocket", "puppy", "rocket", "carrot", "cookie",
           "basket", "bucket", "lemon", "mitten", "noodle", "pebble", "pickle", "teapot", "tulip", "walnut")
_SAY = ("i like this", "let us play", "look at that", "this is fun", "i am happy", "come with me",
        "i want to go home", "thank you", "can we go now")
_WORDS = set(_ADJ + _PLACES + _THINGS + _COLORS + _SECRET) | {w for s in _SAY for w in s.split()} | {
    w for fam in PHRASES.values() for p in fam for w in p}
NAMES = _names()
N_NAMES = len(NAMES)


# bumped whenever the same seed would generate other text: cached corpora live in a folder per
# version (``facts.CACHE``), so a change never reuses a stale file
GRAMMAR_VERSION = 2

N_SECRET = 6  # secret words (made-up words from NAMES), told once and repeated at the end
SECRET_REPEATS = 3  # times the secret words are repeated at the end, each from a random word on (wrapping round)


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    tokens: int = 1_000_000  # approximate: words and punctuation marks, about the BPE token count

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError("--tokens must be at least 1")


@dataclass
class Story:
    text: str
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, label), character offsets
    name: str = ""
    gender: str = ""
    friend: str = ""

    def n_units(self) -> int:
        """Words plus punctuation marks: close to the token count of a word-level tokenizer."""
        return sum(1 for c in self.text if c in '.,"') + len(self.text.split())


class _Builder:
    def __init__(self):
        self.parts: list[str] = []
        self.n = 0
        self.spans: list[tuple[int, int, str]] = []

    def word(self, w: str, *labels: str) -> None:
        sep = "" if not self.parts or self._glue else " "
        self._glue = False
        self._add(sep + w, labels)

    _glue = False

    def punct(self, p: str, *labels: str) -> None:
        self._add(p, labels)

    def open_quote(self) -> None:
        self._add(' "', ())
        self._glue = True

    def _add(self, s: str, labels) -> None:
        start = self.n + (len(s) - len(s.lstrip(" ")))
        self.parts.append(s)
        self.n += len(s)
        for label in labels:
            self.spans.append((start, self.n, label))

    def text(self) -> str:
        return "".join(self.parts)


def _story(rng: random.Random) -> Story:
    name = rng.choice(NAMES)
    girl = rng.random() < 0.5
    subj, poss = ("she", "her") if girl else ("he", "his")
    b = _Builder()
    for w in ("once", "upon", "a", "time", "there", "was", "a", rng.choice(_ADJ), "girl" if girl else "boy", "named"):
        b.word(w)
    b.word(name, "name_first")
    b.punct(".")
    friend = rng.choice(NAMES)
    for w in (poss, "friend", "was", "named"):
        b.word(w, *(("pronoun",) if w == poss else ()))
    b.word(friend, "name_first")
    b.punct(".")
    secret = rng.sample(NAMES, N_SECRET)
    said_secret = False
    kinds = ["go", "see", "like", "phrase", "say", "play", "secret"]  # short stories: more of each is copying
    rng.shuffle(kinds)
    if "secret" in kinds:  # the secret is told in the first half and repeated at the end
        kinds.remove("secret")
        kinds.insert(rng.randint(0, len(kinds) // 2), "secret")

    def subject():
        if rng.random() < 0.5:
            b.word(name, "name_later")
        else:
            b.word(subj, "pronoun")

    for kind in kinds:
        if kind == "go":
            subject()
            for w in ("went", "to", "the", rng.choice(_PLACES)):
                b.word(w)
        elif kind == "see":
            subject()
            for w in ("saw", "a", rng.choice(_COLORS), rng.choice(_THINGS)):
                b.word(w)
        elif kind == "like":
            subject()
            b.word("liked")
            b.word(poss, "pronoun")
            b.word(rng.choice(_THINGS))
        elif kind == "play":
            subject()
            for w in ("played", "with"):
                b.word(w)
            b.word(friend, "name_later")
        elif kind == "phrase":
            k = rng.choice(list(PHRASES))
            words = rng.choice(PHRASES[k])
            for i, w in enumerate(words):
                end = i == len(words) - 1
                b.word(w, "phrase", *((f"phrase_end_k{k}",) if end else ()))
        elif kind == "say":
            subject()
            b.word("said")
            b.punct(",")
            b.open_quote()
            for w in rng.choice(_SAY).split():
                b.word(w, "quote")
            b.punct('"')
        elif kind == "secret":
            b.word(poss, "pronoun")
            for w in ("secret", "words", "were"):
                b.word(w)
            for w in secret:
                b.word(w, "secret_first")
            said_secret = True
        b.punct(".")
    for i in range(SECRET_REPEATS if said_secret else 0):
        for w in ("at", "the", "end") if i == 0 else ("then",):
            b.word(w)
        subject()
        for w in ("said", "the", "secret", "words") + (("again",) if i else ()):
            b.word(w)
        j = rng.randrange(N_SECRET)  # where in the list the repeat starts: copying, not counting, continues it
        for w in secret[j:] + secret[:j]:
            b.word(w, "secret_later")
        b.punct(".")
    return Story(text=b.text(), spans=b.spans, name=name, gender="girl" if girl else "boy", friend=friend)


def generate(cfg: SynthConfig):
    """Stories until about ``cfg.tokens`` words and punctuation marks; the same seed gives the same stories."""
    rng = random.Random(cfg.seed)
    n = 0
    while n < cfg.tokens:
        s = _story(rng)
        n += s.n_units()
        yield s


def write_corpus(cfg: SynthConfig, out: str | Path, labels: str | Path | None = None) -> tuple[int, int]:
    """One story per line to ``out`` (and its spans as JSON lines to ``labels``); returns (stories, units)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_stories = n_units = 0
    lab = open(labels, "w") if labels else None
    try:
        with open(out, "w") as f:
            for s in generate(cfg):
                f.write(s.text + "\n")
                if lab:
                    lab.write(json.dumps({"name": s.name, "friend": s.friend, "gender": s.gender, "spans": s.spans}) + "\n")
                n_stories += 1
                n_units += s.n_units()
    finally:
        if lab:
            lab.close()
    return n_stories, n_units
