"""An on-disk suffix-array index of a training corpus for R_suffix and R_subgram rules.

Every rule without ``*`` asks for a *contiguous* run of kept tokens in the training text (the
dropped positions close up), so one suffix array over the training tokens answers all of them:
the suffixes that start with a query form one range of the array, and, inside that range, the
suffixes are sorted by the token that follows the query. Stories are written one after another
with a separator token (id ``vocab_size``, never part of a query) after each, so no query crosses
a story start, and an occurrence at a story's end (next token: the separator) is not counted,
as in the in-memory tables of ``index.py``.

Files (``data/cache/ngrams/sa-<hash>/``, one folder per tokenizer, corpus and split):
``tokens.bin`` (uint16 little-endian, uint32 above 65,535 tokens) and ``table.bin`` (the suffix
array, uint64 positions), both written and sorted by ``tokengrams`` (Rust, memory-mapped,
EleutherAI); ``first.npy`` (where each token's suffixes start) and ``meta.json``. Build memory:
the stories are tokenised and appended to ``tokens.bin`` 512 at a time; tokengrams sorts the
positions in one array of 8 bytes per token. Queries read both files through ``np.memmap``.

Why not tokengrams' own ``count_next``: it answers one query per Python call with a list of the
whole vocabulary; a chunk of 4,096 predictions asks up to 127 queries each. Here the queries of a
chunk are answered together, level by level as a trie (deduplicated; a query that never occurs
ends its branch), and each level becomes a small ``PatternTable`` of the same layout as the
in-memory ones. Inside a query's range the suffixes are sorted by the next token, so its
next-token counts are runs, found by galloping (a compiled loop, ``_next_runs``); a query of k+1
tokens gets its range from its parent's counts, without a search.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from numba import njit

from .index import PatternTable, pack_keys
from .templates import MAX_N, pattern


@dataclass(frozen=True)
class ChunkTables:
    """The tables answering one chunk of predictions: per pattern (offsets), and optionally each
    (position, template)'s segment in them (-1: the query does not occur), else the matcher finds it."""

    tables: dict[tuple[int, ...], PatternTable]
    segments: np.ndarray | None = None  # [C, R] int64


@dataclass(frozen=True)
class SuffixIndexInfo:
    """What ``meta.json`` records about one built index."""

    corpus: str
    split: str
    n_tokens: int  # training tokens (separators not counted)
    n_stories: int  # stories (or paragraphs) written
    vocab_size: int
    build_seconds: float
    disk_bytes: int


@contextlib.contextmanager
def _quiet_stdout():
    """tokengrams prints "Sorting indices..." from Rust: send file descriptor 1 to /dev/null meanwhile."""
    try:
        fd = os.dup(1)
    except OSError:  # no stdout at all
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(fd, 1)
        os.close(fd)


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size + 1 <= 1 << 16 else np.uint32


def build_suffix_index(folder: Path, token_batches: Iterable[Sequence[Sequence[int]]], vocab_size: int, corpus: str,
                       split: str, progress: bool = True) -> "SuffixIndex":
    """Write ``tokens.bin`` from batches of token lists (one list per story), then sort the
    suffix array with tokengrams. Files appear under their final names only when complete; a
    failed build leaves nothing behind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = f".{os.getpid()}.tmp"
    parts = {name: folder / f"{name}{tmp}" for name in ("tokens.bin", "table.bin", "first.npy", "meta.json")}
    try:
        info = _build(parts, token_batches, vocab_size, corpus, split, progress)
        for name in ("first.npy", "table.bin", "tokens.bin", "meta.json"):  # meta.json last: it marks a complete index
            os.replace(parts[name], folder / name)
    finally:
        for p in parts.values():
            p.unlink(missing_ok=True)
    return SuffixIndex(folder)


def _build(parts: dict[str, Path], token_batches, vocab_size: int, corpus: str, split: str, progress: bool) -> SuffixIndexInfo:
    import tokengrams
    from tqdm import tqdm

    dtype = _token_dtype(vocab_size)
    sep = vocab_size
    counts = np.zeros(vocab_size + 1, dtype=np.int64)
    n_tok = n_stories = 0
    t0 = time.perf_counter()
    with open(parts["tokens.bin"], "wb") as f, tqdm(desc="n-gram index: tokenising", unit=" tok", unit_scale=True,
                                                    disable=not progress) as bar:
        for batch in token_batches:
            arrs = []
            for s in batch:
                if len(s):
                    arrs.append(np.asarray(s, dtype=np.int64))
                    arrs.append(np.array([sep]))
            if not arrs:
                continue
            flat = np.concatenate(arrs)
            real = np.ones(len(flat), dtype=bool)
            real[np.cumsum([len(a) for a in arrs])[1::2] - 1] = False
            if flat[real].min() < 0 or flat[real].max() >= sep:
                raise ValueError(f"token ids outside 0-{vocab_size - 1} in the n-gram corpus")
            counts += np.bincount(flat, minlength=vocab_size + 1)
            flat.astype(dtype).tofile(f)
            n_stories += len(arrs) // 2
            n_tok += len(flat) - len(arrs) // 2
            bar.update(len(flat) - len(arrs) // 2)
    if n_tok == 0:
        raise ValueError("the n-gram corpus has no tokens")
    if progress:
        print(f"n-gram index: sorting the suffix array of {n_tok:,} tokens (tokengrams)", file=sys.stderr, flush=True)
    with _quiet_stdout():
        tokengrams.MemmapIndex.build(str(parts["tokens.bin"]), str(parts["table.bin"]), vocab=int(vocab_size + 1), verbose=False)
    # suffixes are sorted by their first token: token t's suffixes start at first[t]
    with open(parts["first.npy"], "wb") as f:
        np.save(f, np.concatenate(([0], np.cumsum(counts))).astype(np.int64))
    info = SuffixIndexInfo(corpus=corpus, split=split, n_tokens=int(n_tok), n_stories=int(n_stories), vocab_size=int(vocab_size),
                           build_seconds=round(time.perf_counter() - t0, 3),
                           disk_bytes=sum(parts[n].stat().st_size for n in ("tokens.bin", "table.bin", "first.npy")))
    parts["meta.json"].write_text(json.dumps(info.__dict__))
    return info


def is_built(folder: Path) -> bool:
    return all((Path(folder) / n).exists() for n in ("tokens.bin", "table.bin", "first.npy", "meta.json"))


class SuffixIndex:
    """A built suffix-array index, memory-mapped; answers contiguous patterns only."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not is_built(self.folder):
            raise FileNotFoundError(f"no suffix-array index in {self.folder}")
        self.info = SuffixIndexInfo(**json.loads((self.folder / "meta.json").read_text()))
        self.vocab_size = self.info.vocab_size
        self.bits = max(1, int(self.vocab_size - 1).bit_length())
        self.name = self.info.corpus
        self.sep = self.vocab_size
        # plain ndarray views of the mappings (numpy's memmap subclass slows every fancy index down)
        self.tokens = np.asarray(np.memmap(self.folder / "tokens.bin", dtype=_token_dtype(self.vocab_size), mode="r"))
        self.table = np.asarray(np.memmap(self.folder / "table.bin", dtype=np.uint64, mode="r"))
        if len(self.table) != len(self.tokens):
            raise ValueError(f"the suffix-array index in {self.folder} is damaged (rebuild it: delete the folder)")
        self.first = np.load(self.folder / "first.npy")
        self.build_seconds = self.info.build_seconds

    def __len__(self) -> int:
        return self.info.n_tokens

    def nbytes(self) -> int:
        """Bytes on disk (the files are memory-mapped, not held)."""
        return self.info.disk_bytes

    # -- the matcher's interface ------------------------------------------------------------
    def prepare(self, templates: Iterable[str]) -> None:
        for t in templates:
            off = pattern(t).offsets
            if off != tuple(range(off[0], 0, -1)):
                raise ValueError(f"rule {t!r} has a marginalised (*) token: the suffix-array index answers R_suffix "
                                 "and R_subgram only; R_all uses the in-memory tables")

    def chunk_tables(self, templates: Sequence[str], cx: np.ndarray, cl: np.ndarray) -> ChunkTables:
        """One small table per kept-token count k (offsets ``(k, ..., 1)``) holding every query of
        ``templates`` on contexts ``cx`` [C, 7] (right-aligned, -1 pad), ``cl`` [C] that occurs
        in the training text, keyed exactly as the matcher keys its queries, and the segment of
        each (position, template) in its table (the matcher then needs no look-up).

        Level by level: the queries of k kept tokens (deduplicated) get their range of the suffix
        array and their next-token counts; a query of k+1 tokens is one of them followed by one
        more token, so its range is read off its parent's next-token counts (no search)."""
        plan = _plan(tuple(templates))
        cxt = np.ascontiguousarray(np.asarray(cx, dtype=np.int64).T)  # [7, C]: j back = row 7 - j
        cl = np.asarray(cl, dtype=np.int64)
        C = len(cl)
        W = self.vocab_size + 1
        out: dict[tuple[int, ...], PatternTable] = {}
        segs: list[np.ndarray] = []  # per level: [paths, C] segment of each position in the level's table (-1: none)
        node = None  # the previous level's [paths, C] nodes (-1: none)
        prev = None  # the previous level: (tokens [U, k], lo, starts, next, count, count before each entry)
        for k, (rows, need, parent) in enumerate(plan.levels, start=1):
            tok = cxt[rows]  # [paths, C]: each path's newest kept token at every position
            ok = cl[None, :] >= need[:, None]
            if k > 1:
                pn = node[parent]
                ok &= pn >= 0
                tok = pn * W + tok
            live = ok.ravel()
            uniq, inv = _dedupe(tok.ravel()[live], (len(prev[0]) if k > 1 else 1) * W)
            if k == 1:
                toks, lo, hi = uniq[:, None], self.first[uniq], self.first[uniq + 1]
            else:
                ptoks, plo, pstarts, pnext, pcount, pbefore = prev
                if len(pnext) == 0:  # nothing follows any shorter query
                    break
                par, tk = uniq // W, uniq % W
                e = _find_in_segments(pstarts, pnext, par, tk)
                found = e >= 0
                e = np.where(found, e, 0)
                lo = plo[par] + np.where(found, pbefore[e], 0)
                hi = lo + np.where(found, pcount[e], 0)
                toks = np.concatenate([ptoks[par], tk[:, None]], axis=1)
            alive = hi > lo
            qkeys = pack_keys([toks[alive, j] for j in range(k)], self.bits)
            order = np.argsort(qkeys)  # nodes in key order: their segments are the table's
            rank = np.full(len(uniq), -1, dtype=np.int64)
            rank[np.flatnonzero(alive)[order]] = np.arange(len(order))
            flat = np.full(live.size, -1, dtype=np.int64)
            flat[live] = rank[inv]
            node = flat.reshape(len(rows), C)
            toks, lo, hi, qkeys = toks[alive][order], lo[alive][order], hi[alive][order], qkeys[order]
            if len(toks) == 0:
                break
            starts, nxt, cnt = self._next_counts(k, lo, hi)
            out[tuple(range(k, 0, -1))] = _table(k, qkeys, starts, nxt, cnt)
            has = np.diff(starts) > 0
            seg = np.append(np.where(has, np.cumsum(has) - 1, -1), -1)  # node -> segment; node -1 -> -1
            segs.append(seg[node])
            cum = np.concatenate(([0], np.cumsum(cnt)))  # counts of the segment's entries before each entry:
            before = cum[:-1] - np.repeat(cum[starts[:-1]], np.diff(starts))  # where a child's range starts
            prev = (toks, lo, starts, nxt, cnt, before)
        SEG = np.full((C, len(plan.where)), -1, dtype=np.int64)
        for r, (lv, i) in enumerate(plan.where):
            if lv < len(segs):
                SEG[:, r] = segs[lv][i]
        return ChunkTables(out, SEG)

    # -- next-token counts ---------------------------------------------------------------
    def _next_counts(self, k: int, lo: np.ndarray, hi: np.ndarray):
        """Next-token counts of the ranges [lo, hi) at depth k as CSR (starts, token, count), one
        segment per range (empty when only story ends follow), separators dropped."""
        cap = int(np.minimum(hi - lo, self.vocab_size).sum())
        return _next_runs(self.tokens, self.table, k, lo.astype(np.int64), hi.astype(np.int64), self.sep, cap)

    # -- convenience (tests, pages) --------------------------------------------------------
    def counts(self, template: str, context: Sequence[int]) -> dict[int, int]:
        """Next-token counts of one rule on one context (oldest first; >= len(template) tokens)."""
        p = pattern(template)
        if len(context) < p.n:
            raise ValueError(f"template {template!r} needs {p.n} context tokens")
        self.prepare([template])
        ctx = np.full((1, MAX_N), -1, dtype=np.int64)
        c = list(context)[-MAX_N:]
        ctx[0, MAX_N - len(c):] = c
        ct = self.chunk_tables([template], ctx, np.array([len(c)]))
        tab = ct.tables.get(p.offsets)
        if tab is None:
            return {}
        seg = int(ct.segments[0, 0])
        if seg < 0:
            return {}
        a, b = tab.starts[seg], tab.starts[seg + 1]
        return {int(x): int(y) for x, y in zip(tab.next[a:b], tab.count[a:b])}


@njit(cache=True, nogil=True)
def _next_runs(tokens, table, depth, lo, hi, sep, cap):
    """For each suffix-array range [lo[i], hi[i]) whose suffixes share their first ``depth`` tokens:
    the distinct tokens at ``depth`` (ascending, the order of the array) and how many suffixes
    have each, as CSR. Each run of equal tokens is found by galloping then bisecting, so a range
    costs about D log(R / D) reads for D distinct tokens among R suffixes. The separator (the
    largest id, last in a range) ends the walk: a story end is not a next token."""
    n = len(lo)
    starts = np.zeros(n + 1, dtype=np.int64)
    nxt = np.empty(cap, dtype=np.int32)
    cnt = np.empty(cap, dtype=np.int64)
    e = 0
    for i in range(n):
        s = lo[i]
        h = hi[i]
        while s < h:
            v = tokens[np.int64(table[s]) + depth]
            if v == sep:
                break
            a = s  # the token at a is v; gallop while it still is
            step = 1
            while a + step < h and tokens[np.int64(table[a + step]) + depth] == v:
                a += step
                step *= 2
            l = a + 1  # the run ends in (a, min(a + step, h)]: bisect for the first token > v
            r = min(a + step, h)
            while l < r:
                m = (l + r) >> 1
                if tokens[np.int64(table[m]) + depth] > v:
                    r = m
                else:
                    l = m + 1
            nxt[e] = v
            cnt[e] = l - s
            e += 1
            s = l
        starts[i + 1] = e
    return starts, nxt[:e], cnt[:e]


@dataclass(frozen=True)
class _Plan:
    """The query paths of a template set, by level: each template's kept context positions (oldest
    first) and their prefixes. ``levels[k-1]``: (row of ``cx.T`` holding each path's newest kept
    token, the context length the path needs, the index of its parent path one level up);
    ``where[r]``: (level - 1, path index) of template r."""

    levels: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]
    where: tuple[tuple[int, int], ...]


@lru_cache(maxsize=16)
def _plan(templates: tuple[str, ...]) -> _Plan:
    paths: set[tuple[int, ...]] = set()
    for t in templates:
        cp = pattern(t).ctx_pos
        paths.update(cp[:k] for k in range(1, len(cp) + 1))
    by_level = [sorted(p for p in paths if len(p) == k) for k in range(1, MAX_N + 1)]
    by_level = [lv for lv in by_level if lv]
    index = [{p: i for i, p in enumerate(lv)} for lv in by_level]
    levels = tuple(
        (np.array([MAX_N - p[-1] for p in lv]), np.array([p[0] for p in lv]),
         np.array([index[k - 1][p[:-1]] if k else 0 for p in lv]))
        for k, lv in enumerate(by_level)
    )
    where = tuple((len(pattern(t).ctx_pos) - 1, index[len(pattern(t).ctx_pos) - 1][pattern(t).ctx_pos]) for t in templates)
    return _Plan(levels, where)


def _dedupe(keys: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` for keys in [0, bound): by marking a dense array
    when that is cheaper than sorting."""
    if bound > 16 * len(keys) + 4096:
        return np.unique(keys, return_inverse=True)
    mark = np.zeros(bound, dtype=bool)
    mark[keys] = True
    uniq = np.flatnonzero(mark)
    pos = np.empty(bound, dtype=np.int64)  # only read where marked
    pos[uniq] = np.arange(len(uniq))
    return uniq, pos[keys]


def _find_in_segments(starts: np.ndarray, nxt: np.ndarray, seg: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """Entry of token ``tok`` in CSR segment ``seg`` (tokens ascending inside a segment), -1 if absent."""
    lo, hi = starts[seg], starts[seg + 1]
    n = hi - lo
    while len(n) and n.max() > 0:
        half = n >> 1
        mid = np.minimum(lo + half, len(nxt) - 1)
        go = (n > 0) & (nxt[mid] < tok)
        lo = np.where(go, lo + half + 1, lo)
        n = np.where(go, n - half - 1, half)
    ok = lo < hi
    ok[ok] = nxt[lo[ok]] == tok[ok]
    return np.where(ok, lo, -1)


def _table(k: int, keys: np.ndarray, starts: np.ndarray, nxt: np.ndarray, cnt: np.ndarray) -> PatternTable:
    """A PatternTable of one level: segments in key order; empty segments (queries followed only by
    story ends, which do not occur as rules) dropped (their entries are none, so none move)."""
    sizes = np.diff(starts)
    has = sizes > 0
    keys, st = keys[has], starts[:-1][has]
    starts = np.append(st, len(nxt)).astype(np.int64)
    sizes = sizes[has]
    ct32 = cnt.astype(np.int32)
    if len(keys):
        support = np.add.reduceat(cnt, st).astype(np.int64)
        max_count = np.maximum.reduceat(ct32, st)
        n_argmax = np.add.reduceat((ct32 == np.repeat(max_count, sizes)).astype(np.int32), st)
    else:
        support = np.zeros(0, np.int64)
        max_count = n_argmax = np.zeros(0, np.int32)
    return PatternTable(tuple(range(k, 0, -1)), keys, starts, nxt, ct32, support, max_count.astype(np.int32),
                        n_argmax.astype(np.int32))


def story_batches(tokenizer, texts: Iterator[str], batch: int = 512) -> Iterator[list[list[int]]]:
    """Token lists of ``texts``, ``batch`` at a time (no special tokens: a story start is a boundary)."""
    buf: list[str] = []
    for s in texts:
        buf.append(s)
        if len(buf) >= batch:
            yield tokenizer(buf, add_special_tokens=False, verbose=False)["input_ids"]
            buf = []
    if buf:
        yield tokenizer(buf, add_special_tokens=False, verbose=False)["input_ids"]
