"""An n-gram index over a tokenised training corpus that answers, for many contexts at once,
"what follows this rule's query, and how often".

Structure (numpy only, memory linear in the corpus). The corpus is one flat token array plus,
per position, how many tokens of the same story precede it (capped at 7), so no query ever
crosses a story start. A rule's query depends on the training text only through its *pattern*:
the distances back from the predicted token of its kept tokens (``Pattern.offsets``; ``*``
positions are free, ``-`` positions are gone). R_subgram needs only 7 patterns (contiguous
windows of 1-7 tokens), R_all 127, whatever the number of rules.

For one pattern, every corpus position whose story has enough tokens before it gets a 64-bit key
of its kept tokens (exact bit-packing when they fit, else a 64-bit mixing hash; collisions then
have probability ~n^2/2^64). Keys are sorted with the next token as the secondary key and run-length
encoded into: sorted unique keys, a CSR segment per key of (next token, count) sorted by token,
the segment's support (total count), max count and the size of its argmax set. A batch of
queries is answered with one ``np.searchsorted``.

Built once per (tokenizer, corpus) and cached under ``data/cache/ngrams/<hash>/`` (the hash covers
the tokenizer's definition and the corpus text): the tokens, and the 7 contiguous-window tables
R_subgram needs. Tables of patterns with ``*`` (R_all: 120 more) are rebuilt in memory on first
use: that takes ~3 s for 470k tokens, less than reading ~1 GB of them back from disk.

The rules job, the pages and the lab use these tables for R_all only (``training.memory_index``
builds them from the suffix-array index's token file, up to ``R_ALL_MAX_TOKENS``); R_suffix and
R_subgram read the on-disk suffix array (``suffix.py``). ``for_corpus`` stays as the reference
tests and benchmarks compare the suffix array with.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .templates import MAX_N, pattern

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / "data" / "cache" / "ngrams"
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 arrays, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * _M2
        h = h ^ (h >> np.uint64(27))
        h = h * _M3
        h = h ^ (h >> np.uint64(31))
    return h


def pack_keys(cols: Sequence[np.ndarray], bits: int) -> np.ndarray:
    """64-bit keys of token columns (oldest first): exact packing when ``len(cols) * bits <= 64``."""
    n = len(cols[0])
    key = np.zeros(n, dtype=np.uint64)
    if len(cols) * bits <= 64:
        for j, c in enumerate(cols):
            key |= c.astype(np.uint64) << np.uint64(bits * j)
        return key
    with np.errstate(over="ignore"):
        for c in cols:
            key = _mix(key * _M1 + c.astype(np.uint64) + np.uint64(1))
    return key


@dataclass
class PatternTable:
    offsets: tuple[int, ...]
    keys: np.ndarray  # [U] uint64 sorted unique query keys
    starts: np.ndarray  # [U+1] int64 CSR starts into next/count
    next: np.ndarray  # [E] int32 next token, ascending inside a segment
    count: np.ndarray  # [E] int32
    support: np.ndarray  # [U] int64 occurrences of the query
    max_count: np.ndarray  # [U] int32
    n_argmax: np.ndarray  # [U] int32 tokens reaching max_count

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Segment of each key, -1 where the query never occurs."""
        if len(self.keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        order = np.argsort(keys)  # sorted needles search ~4x faster (numpy reuses the last bound)
        ks = keys[order]
        i = np.minimum(np.searchsorted(self.keys, ks), len(self.keys) - 1)
        out = np.empty(len(keys), dtype=np.int64)
        out[order] = np.where(self.keys[i] == ks, i, -1)
        return out

    def count_of(self, seg: np.ndarray, tok: np.ndarray) -> np.ndarray:
        """How often token ``tok`` follows segment ``seg``'s query (seg >= 0)."""
        lo = self.starts[seg]
        hi = self.starts[seg + 1]
        tok = np.asarray(tok).astype(self.next.dtype, copy=False)
        # vectorised branchless lower bound inside each segment (sorted by token, never empty):
        # the answer stays in [lo, lo + n) while n shrinks to 1
        n = hi - lo
        while len(n) and n.max() > 1:
            half = n >> 1
            mid = lo + half
            lo = np.where(self.next[mid] < tok, mid, lo)
            n -= half
        lo = lo + (self.next[lo] < tok)
        out = np.zeros(len(seg), dtype=np.int64)
        hit = np.nonzero(lo < hi)[0]
        hit = hit[self.next[lo[hit]] == tok[hit]]
        out[hit] = self.count[lo[hit]]
        return out

    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in ("keys", "starts", "next", "count", "support", "max_count", "n_argmax"))


def _pattern_name(offsets: tuple[int, ...]) -> str:
    return "p" + "_".join(str(o) for o in offsets)


class NgramIndex:
    """Tokens of a training corpus and the pattern tables built over them so far."""

    def __init__(self, tokens: np.ndarray, depth: np.ndarray, vocab_size: int, name: str = "", cache_dir: Path | None = None):
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self.depth = np.ascontiguousarray(depth, dtype=np.uint8)
        self.vocab_size = int(vocab_size)
        self.bits = max(1, int(self.vocab_size - 1).bit_length())
        self.name = name
        self.cache_dir = cache_dir
        self._tables: dict[tuple[int, ...], PatternTable] = {}
        self._tokens64: np.ndarray | None = None  # tokens as uint64, for packing keys while building
        self.build_seconds = 0.0

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_stories(cls, stories: Iterable[Sequence[int]], vocab_size: int, name: str = "", cache_dir: Path | None = None) -> "NgramIndex":
        """From token-id lists, one per story (no BOS: a story start is a boundary by itself)."""
        arrs = [np.asarray(s, dtype=np.int32) for s in stories if len(s)]
        if not arrs:
            raise ValueError("the n-gram corpus has no tokens")
        tokens = np.concatenate(arrs)
        depth = np.concatenate([np.minimum(np.arange(len(a)), MAX_N).astype(np.uint8) for a in arrs])
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(f"token ids outside 0-{vocab_size - 1} in the n-gram corpus")
        return cls(tokens, depth, vocab_size, name, cache_dir)

    @classmethod
    def for_corpus(cls, lm, corpus_spec: str, cache: bool = True, cache_root: Path | None = None, separator: str = "auto") -> "NgramIndex":
        """The index of ``corpus_spec`` (a text file or hf:id) tokenised with ``lm``'s tokenizer,
        from the disk cache when it was built before."""
        from ..corpus import load_corpus

        corpus = load_corpus(corpus_spec, separator)
        return cls.for_stories_text(lm.tokenizer, corpus.stories, lm.vocab_size, corpus.name, cache, cache_root)

    @classmethod
    def for_stories_text(cls, tokenizer, stories: Sequence[str], vocab_size: int, name: str, cache: bool = True,
                         cache_root: Path | None = None) -> "NgramIndex":
        h = hashlib.sha256()
        h.update(tokenizer_fingerprint(tokenizer).encode())
        h.update(str(vocab_size).encode())
        for s in stories:
            h.update(s.encode())
            h.update(b"\x00")
        key = h.hexdigest()[:20]
        folder = Path(cache_root or DEFAULT_CACHE) / key if cache else None
        if folder is not None and (folder / "tokens.npy").exists():
            idx = cls(np.load(folder / "tokens.npy"), np.load(folder / "depth.npy"), vocab_size, name, folder)
            return idx
        t0 = time.perf_counter()
        toks = []
        for i in range(0, len(stories), 512):
            toks.extend(tokenizer(list(stories[i : i + 512]), add_special_tokens=False, verbose=False)["input_ids"])
        idx = cls.from_stories(toks, vocab_size, name, folder)
        idx.build_seconds += time.perf_counter() - t0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_save(folder / "tokens.npy", idx.tokens)
            _atomic_save(folder / "depth.npy", idx.depth)
            (folder / "meta.json").write_text(json.dumps({"corpus": name, "n_tokens": int(len(idx.tokens)), "vocab_size": vocab_size}))
        return idx

    def __len__(self) -> int:
        return len(self.tokens)

    # -- pattern tables -------------------------------------------------------------------
    def table(self, offsets: tuple[int, ...]) -> PatternTable:
        offsets = tuple(int(o) for o in offsets)
        t = self._tables.get(offsets)
        if t is None:
            t0 = time.perf_counter()
            contiguous = offsets == tuple(range(offsets[0], 0, -1))
            t = self._load(offsets) if contiguous else None
            if t is None:
                t = self._build(offsets)
                if contiguous:
                    self._save(t)
            self._tables[offsets] = t
            self.build_seconds += time.perf_counter() - t0
        return t

    def prepare(self, templates: Iterable[str]) -> None:
        """Build (or load) every table the templates need."""
        for off in sorted({pattern(t).offsets for t in templates}):
            self.table(off)

    def chunk_tables(self, templates: Sequence[str], cx: np.ndarray, cl: np.ndarray):
        """The tables the templates need (the same whatever the contexts: every query is in them)."""
        from .suffix import ChunkTables

        return ChunkTables({off: self.table(off) for off in {pattern(t).offsets for t in templates}})

    def _build(self, offsets: tuple[int, ...]) -> PatternTable:
        span = offsets[0]
        n_tok = max(len(self.tokens), span)  # (a corpus shorter than the span has no window)
        # the window of position i (i >= span) is tokens[i - o]: shifted views, no gathers; positions
        # whose story has fewer than ``span`` tokens before them are dropped after packing
        cols = [self.tokens[span - o : n_tok - o] for o in offsets]
        nxt = self.tokens[span:]
        full = self.depth[span:] >= span
        bits = np.uint64(self.bits)
        if (len(offsets) + 1) * self.bits <= 64:
            # one uint64 per position: the packed key (as pack_keys) above the next token; one sort
            # orders both
            if self._tokens64 is None:
                self._tokens64 = self.tokens.astype(np.uint64)
            comb = self._tokens64[span:].copy()
            col = np.empty_like(comb)
            for j, o in enumerate(offsets):
                np.left_shift(self._tokens64[span - o : n_tok - o], np.uint64(self.bits * (j + 1)), out=col)
                comb |= col
            comb = comb[full]
            comb.sort()
            n = len(comb)
            pair_start = np.concatenate(([0], np.flatnonzero(comb[1:] != comb[:-1]) + 1)) if n else np.zeros(0, np.int64)
            pval = comb[pair_start]
            pkey = pval >> bits
            pnext = (pval & np.uint64((1 << self.bits) - 1)).astype(np.int32)
        else:
            key = pack_keys(cols, self.bits)[full]
            nx = nxt[full]
            order = np.lexsort((nx, key))
            key_s, nxt_s = key[order], nx[order]
            n = len(key_s)
            new_pair = np.ones(n, dtype=bool)
            new_pair[1:] = (key_s[1:] != key_s[:-1]) | (nxt_s[1:] != nxt_s[:-1])
            pair_start = np.flatnonzero(new_pair)
            pkey, pnext = key_s[pair_start], nxt_s[pair_start].astype(np.int32)
        if n == 0:
            z = np.zeros(0, np.int64)
            return PatternTable(offsets, z.astype(np.uint64), np.zeros(1, np.int64), z.astype(np.int32), z.astype(np.int32),
                                z, z.astype(np.int32), z.astype(np.int32))
        count = np.diff(np.append(pair_start, n)).astype(np.int32)
        kstart = np.concatenate(([0], np.flatnonzero(pkey[1:] != pkey[:-1]) + 1))
        starts = np.append(kstart, len(pkey)).astype(np.int64)
        support = np.diff(np.append(pair_start[kstart], n)).astype(np.int64)  # occurrences of each key
        max_count = np.maximum.reduceat(count, kstart)
        at_max = np.cumsum(count == np.repeat(max_count, np.diff(starts)), dtype=np.int64)[starts[1:] - 1]
        n_argmax = np.diff(at_max, prepend=0).astype(np.int32)  # tokens reaching the max count, per key
        return PatternTable(offsets, pkey[kstart], starts, pnext, count, support, max_count.astype(np.int32), n_argmax)

    def _load(self, offsets) -> PatternTable | None:
        if self.cache_dir is None:
            return None
        f = self.cache_dir / f"{_pattern_name(offsets)}.npz"
        if not f.exists():
            return None
        try:
            with np.load(f) as z:
                return PatternTable(offsets, *(z[k] for k in ("keys", "starts", "next", "count", "support", "max_count", "n_argmax")))
        except (OSError, ValueError, KeyError):
            return None

    def _save(self, t: PatternTable) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        f = self.cache_dir / f"{_pattern_name(t.offsets)}.npz"
        tmp = f.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, keys=t.keys, starts=t.starts, next=t.next, count=t.count, support=t.support,
                 max_count=t.max_count, n_argmax=t.n_argmax)
        os.replace(tmp, f)

    def nbytes(self) -> int:
        return self.tokens.nbytes + self.depth.nbytes + sum(t.nbytes() for t in self._tables.values())

    # -- convenience (tests, pages) -------------------------------------------------------
    def counts(self, template: str, context: Sequence[int]) -> dict[int, int]:
        """Next-token counts of one template on one context (oldest first; >= len(template) tokens)."""
        p = pattern(template)
        if len(context) < p.n:
            raise ValueError(f"template {template!r} needs {p.n} context tokens")
        ctx = np.asarray(context, dtype=np.int64)
        key = pack_keys([ctx[[len(ctx) - c]] for c in p.ctx_pos], self.bits)
        t = self.table(p.offsets)
        seg = int(t.find(key)[0])
        if seg < 0:
            return {}
        a, b = t.starts[seg], t.starts[seg + 1]
        return {int(k): int(v) for k, v in zip(t.next[a:b], t.count[a:b])}


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def tokenizer_fingerprint(tokenizer) -> str:
    """A string that changes when the tokenizer's behaviour can change (vocab, merges, normaliser)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            return type(tokenizer).__name__ + backend.to_str()
        except Exception:  # noqa: BLE001 - fall back to the vocabulary
            pass
    vocab = sorted(tokenizer.get_vocab().items())
    return type(tokenizer).__name__ + json.dumps(vocab)
