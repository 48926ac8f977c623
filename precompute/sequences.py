"""A corpus tokenised into model inputs: one sequence per story chunk, BOS first when the run prepends it.

Positions are indices into a sequence's ``ids`` exactly as the model saw them, so position 0
is the BOS token when ``prepend_bos`` is true. ``scored`` excludes BOS positions: statistics and
top examples never count the BOS token (it would dominate them), but it stays visible in
every context shown.

The corpus is tokenised lazily (``stream``) and cut into **shards**: runs of consecutive
sequences of about ``shard_tokens`` tokens. A shard is a ``Sequences`` that knows where it sits
in the corpus: ``first_seq`` is the global index of its first sequence and ``first_key`` the
corpus-order index of its first token, so every token has a global *key*
(``first_key + tokens of earlier sequences in the shard + position``) that orders ties and
seeds random draws the same way whichever worker sees the shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from .corpus import Corpus, CorpusError


@dataclass(frozen=True)
class Sequences:
    corpus_name: str
    synthetic: bool
    prepend_bos: bool
    bos_id: int | None
    ids: tuple[np.ndarray, ...]  # int32 token ids per sequence
    story_ids: tuple[int, ...]
    offsets: tuple[int, ...]  # index of the first non-BOS token within the story's tokens
    first_seq: int = 0  # global index of ids[0] (a shard of a longer corpus)
    first_key: int = 0  # corpus-order index of the first token of ids[0]
    index: int = 0  # shard number

    @property
    def n_tokens(self) -> int:
        return int(sum(len(s) for s in self.ids))

    @property
    def n_scored(self) -> int:
        return self.n_tokens - (len(self.ids) if self.prepend_bos else 0)

    def first_scored(self) -> int:
        return 1 if self.prepend_bos else 0

    def keys(self) -> np.ndarray:
        """Global key of position 0 of every sequence."""
        lens = np.array([len(s) for s in self.ids], dtype=np.int64)
        return self.first_key + np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)


@dataclass(frozen=True)
class SeqPiece:
    ids: np.ndarray
    story_id: int
    offset: int


def _resolve_bos(lm, prepend_bos: bool | None) -> int | None:
    bos = lm.bos_id if (prepend_bos is None or prepend_bos) else None
    if prepend_bos and lm.bos_id is None:
        raise CorpusError("--prepend-bos asked for, but this tokenizer has no BOS or EOS token")
    return bos


def stream(lm, stories: Iterable[str], ctx_len: int | None = None, max_tokens: int | None = None,
           prepend_bos: bool | None = None) -> Iterator[SeqPiece]:
    """Tokenise stories lazily and cut each into chunks of at most ``ctx_len`` tokens (BOS included).

    Every chunk starts with BOS when ``prepend_bos`` (default: yes when the tokenizer has one).
    ``max_tokens`` caps the total number of tokens fed to the model (None: the whole corpus).
    """
    ctx_len = min(ctx_len or lm.n_ctx, lm.n_ctx)
    bos = _resolve_bos(lm, prepend_bos)
    use_bos = bos is not None
    body = ctx_len - (1 if use_bos else 0)
    if body < 1:
        raise CorpusError(f"context length {ctx_len} leaves no room for tokens")
    total = 0
    sid = 0
    batch: list[str] = []
    it = iter(stories)
    while True:
        batch.clear()
        for text in it:
            batch.append(text)
            if len(batch) == 256:
                break
        if not batch:
            return
        enc = lm.tokenizer(batch, add_special_tokens=False)["input_ids"]
        for toks in enc:
            for off in range(0, len(toks), body):
                seq = ([bos] if use_bos else []) + list(toks[off : off + body])
                if len(seq) < 2:
                    continue
                if max_tokens is not None and total + len(seq) > max_tokens:
                    seq = seq[: max_tokens - total]
                    if len(seq) < 2:
                        return
                yield SeqPiece(np.asarray(seq, dtype=np.int32), sid, off)
                total += len(seq)
                if max_tokens is not None and total >= max_tokens:
                    return
            sid += 1


def shards(lm, corpus: Corpus, shard_tokens: int, ctx_len: int | None = None, max_tokens: int | None = None,
           prepend_bos: bool | None = None) -> Iterator[Sequences]:
    """The corpus as consecutive shards of about ``shard_tokens`` tokens (whole sequences)."""
    use_bos = _resolve_bos(lm, prepend_bos) is not None
    pieces: list[SeqPiece] = []
    n = first_seq = first_key = index = 0

    def make() -> Sequences:
        return Sequences(corpus.name, corpus.synthetic, use_bos, lm.bos_id, tuple(p.ids for p in pieces),
                         tuple(p.story_id for p in pieces), tuple(p.offset for p in pieces), first_seq, first_key, index)

    for p in stream(lm, corpus.iter_stories(), ctx_len, max_tokens, prepend_bos):
        pieces.append(p)
        n += len(p.ids)
        if n >= shard_tokens:
            yield make()
            first_seq += len(pieces)
            first_key += n
            index += 1
            pieces, n = [], 0
    if pieces:
        yield make()
    elif index == 0:
        raise CorpusError(f"corpus {corpus.name!r} gives no tokens to score")


def tokenize(lm, corpus: Corpus, ctx_len: int | None = None, max_tokens: int | None = None,
             prepend_bos: bool | None = None) -> Sequences:
    """The whole (capped) corpus as one in-memory ``Sequences`` (tests, small corpora)."""
    pieces = list(stream(lm, corpus.iter_stories(), ctx_len, max_tokens, prepend_bos))
    if not pieces:
        raise CorpusError(f"corpus {corpus.name!r} gives no tokens to score")
    return Sequences(
        corpus_name=corpus.name,
        synthetic=corpus.synthetic,
        prepend_bos=_resolve_bos(lm, prepend_bos) is not None,
        bos_id=lm.bos_id,
        ids=tuple(p.ids for p in pieces),
        story_ids=tuple(p.story_id for p in pieces),
        offsets=tuple(p.offset for p in pieces),
    )


@dataclass(frozen=True)
class Batch:
    seq_idx: list[int]  # global sequence index of every row
    ids: torch.Tensor  # [batch, pos], right-padded with the first token's id
    lengths: list[int]
    keys: list[int]  # global key of position 0 of every row (corpus order of tokens)
    first: int = 0  # first scored position (1 when sequences start with BOS)


def batches(seqs: Sequences, batch_size: int, max_batch_tokens: int | None = None) -> Iterator[Batch]:
    """Sequences grouped by similar length (little padding), right-padded.

    Right padding needs no attention mask in a causal model: a real token never attends to a
    later (padded) position, so its activations equal those of the unpadded sequence.
    """
    order = sorted(range(len(seqs.ids)), key=lambda i: -len(seqs.ids[i]))
    keys = seqs.keys()
    i = 0
    while i < len(order):
        longest = len(seqs.ids[order[i]])
        n = batch_size
        if max_batch_tokens:
            n = max(1, min(n, max_batch_tokens // max(1, longest)))
        chunk = order[i : i + n]
        i += n
        lengths = [len(seqs.ids[k]) for k in chunk]
        arr = np.full((len(chunk), longest), seqs.ids[chunk[0]][0], dtype=np.int64)
        for r, k in enumerate(chunk):
            arr[r, : lengths[r]] = seqs.ids[k]
        yield Batch(seq_idx=[seqs.first_seq + k for k in chunk], ids=torch.from_numpy(arr), lengths=lengths,
                    keys=[int(keys[k]) for k in chunk], first=seqs.first_scored())
