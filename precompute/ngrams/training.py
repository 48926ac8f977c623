"""The training text a model's rules are counted in: how it is split, where its index lives, and
which index answers a rule set.

Split (``Split``): ``story`` tokenises each story whole (a paragraph break is two newline tokens and
the paragraph's first word keeps no leading-space marker), ``paragraph`` tokenises each paragraph
(blank-line separated) on its own, so a paragraph start is a story start. ``auto`` takes what the
model saw in training when its folder says so: ``training.json`` of ``precompute train`` (whole
stories) or a model-card line ``training text split: paragraph`` (or ``story``); otherwise whole
stories, as llama2.c (stories260K) and ``precompute train`` tokenise. The resolved split and where
it came from are recorded in the rules run.

Indexes (``open_index``): R_suffix and R_subgram read the on-disk suffix array (``suffix.py``),
built once per (tokenizer, corpus, split) under ``data/cache/ngrams/sa-<hash>/``. R_all needs
patterns with ``*``, which a suffix array cannot answer: it builds exact in-memory tables
(``index.py``) from the same token file, up to ``R_ALL_MAX_TOKENS`` training tokens.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from .index import DEFAULT_CACHE, NgramIndex, tokenizer_fingerprint
from .suffix import SuffixIndex, build_suffix_index, is_built, story_batches
from .templates import MAX_N

Split = Literal["story", "paragraph"]
SPLITS: dict[str, str] = {
    "story": "whole stories (paragraph breaks inside a story are newline tokens)",
    "paragraph": "paragraphs (each paragraph tokenised on its own, its start a story start)",
}
# R_all's in-memory tables: peak 1.3 GB at 0.47M training tokens, 2.1 GB at 1M, 3.5 GB at 2M
# (bench/bench_rules_index.py, about 1.3-1.7 KB more per token): 4M extrapolates to about 6.2 GB,
# inside 8 GB with room for the model and the sweep.
R_ALL_MAX_TOKENS = 4_000_000
_BLANK = re.compile(r"\n\s*\n")
_CARD_SPLIT = re.compile(r"training text split\W+(whole stor|stor|paragraph)", re.IGNORECASE)


class TrainingIndexError(ValueError):
    """An n-gram index that cannot be built or used; the message is one line for the user."""


@dataclass(frozen=True)
class SplitChoice:
    split: Split
    source: str  # why this split: what the user asked, or what the model card says


def resolve_split(requested: str, model_id: str | None) -> SplitChoice:
    """``story``/``paragraph`` as asked; ``auto``: the model folder's word, else whole stories."""
    if requested in SPLITS:
        return SplitChoice(requested, "asked for")
    if requested != "auto":
        raise ValueError(f"unknown training-text split {requested!r}; choose auto, {', '.join(SPLITS)}")
    folder = Path(model_id) if model_id else None
    if folder is not None and folder.is_dir():
        card = folder / "README.md"
        if card.is_file():
            m = _CARD_SPLIT.search(card.read_text(errors="replace"))
            if m:
                return SplitChoice("paragraph" if m.group(1).lower().startswith("p") else "story", "model card")
        tj = folder / "training.json"
        if tj.is_file():
            try:
                cfg = json.loads(tj.read_text()).get("config", {})
            except (OSError, ValueError):
                cfg = {}
            if cfg.get("text_split") in SPLITS:
                return SplitChoice(cfg["text_split"], "training.json")
            if "corpus" in cfg:
                return SplitChoice("story", "training.json (precompute train uses whole stories)")
    return SplitChoice("story", "default: the model card does not say; whole stories, as llama2.c tokenises")


def split_texts(stories: Iterator[str], split: Split) -> Iterator[str]:
    for s in stories:
        if split == "story":
            yield s
        else:
            for p in _BLANK.split(s):
                p = p.strip()
                if p:
                    yield p


def _corpus_digest(spec: str, separator: str) -> str:
    """What identifies the training text: a file's bytes, or a dataset spec."""
    h = hashlib.sha256(f"{separator}\x00".encode())
    p = Path(spec)
    if not spec.startswith("hf:") and p.is_file():
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(4 << 20), b""):
                h.update(block)
    else:
        h.update(spec.encode())
    return h.hexdigest()


def index_folder(tokenizer, vocab_size: int, corpus_spec: str, split: Split, separator: str = "auto",
                 cache_root: Path | None = None) -> Path:
    h = hashlib.sha256()
    for part in (tokenizer_fingerprint(tokenizer), str(vocab_size), split, _corpus_digest(corpus_spec, separator)):
        h.update(part.encode())
        h.update(b"\x00")
    return Path(cache_root or DEFAULT_CACHE) / f"sa-{h.hexdigest()[:20]}"


def suffix_index(tokenizer, vocab_size: int, corpus_spec: str, split: Split, separator: str = "auto",
                 cache_root: Path | None = None, progress: bool = True) -> SuffixIndex:
    """The suffix-array index of a training text, built on first use (bounded memory) and reused."""
    from ..corpus import load_corpus

    folder = index_folder(tokenizer, vocab_size, corpus_spec, split, separator, cache_root)
    if is_built(folder):
        return SuffixIndex(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:  # one builder at a time (sweep workers, app sessions)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(folder):  # another process built it meanwhile
            return SuffixIndex(folder)
        corpus = load_corpus(corpus_spec, separator)
        texts = split_texts(corpus.iter_stories(), split)
        return build_suffix_index(folder, story_batches(tokenizer, texts), vocab_size, corpus.name, split, progress)


def memory_index(sa: SuffixIndex, max_tokens: int | None = None) -> NgramIndex:
    """In-memory tables (R_all) over a suffix index's tokens; refuses corpora above ``max_tokens``."""
    limit = R_ALL_MAX_TOKENS if max_tokens is None else max_tokens
    if len(sa) > limit:
        raise TrainingIndexError(
            f"R_all keeps exact tables in memory and accepts at most {limit:,} training tokens (about 8 GB); "
            f"{sa.name} has {len(sa):,}: use --rule-set subgram, answered from the on-disk suffix array at any size"
        )
    flat = np.asarray(sa.tokens, dtype=np.int64)
    is_sep = flat == sa.sep
    n = np.arange(len(flat))
    last_sep = np.maximum.accumulate(np.where(is_sep, n, -1))
    depth = np.minimum(n - last_sep - 1, MAX_N)
    keep = ~is_sep
    return NgramIndex(flat[keep].astype(np.int32), depth[keep].astype(np.uint8), sa.vocab_size, sa.name)


def open_index(lm, corpus_spec: str, rule_set: str, split: str = "auto", cache_root: Path | None = None,
               progress: bool = True, max_all_tokens: int | None = None) -> SuffixIndex | NgramIndex:
    """The index that answers ``rule_set`` for ``lm`` on ``corpus_spec``: the on-disk suffix array
    (suffix, subgram) or the bounded in-memory tables built from its tokens (all)."""
    choice = resolve_split(split, getattr(lm, "model_id", None))
    sa = suffix_index(lm.tokenizer, lm.vocab_size, corpus_spec, choice.split, cache_root=cache_root, progress=progress)
    return memory_index(sa, max_all_tokens) if rule_set == "all" else sa
