"""A corpus tokenised into model inputs: one sequence per story chunk, BOS first when the run prepends it.

Positions are indices into a sequence's ``ids`` exactly as the model saw them, so position 0
is the BOS token when ``prepend_bos`` is true. ``scored`` excludes BOS positions: statistics and
top examples never count the BOS token (it would dominate them), but it stays visible in
every context shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

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

    @property
    def n_tokens(self) -> int:
        return int(sum(len(s) for s in self.ids))

    @property
    def n_scored(self) -> int:
        return self.n_tokens - (len(self.ids) if self.prepend_bos else 0)

    def first_scored(self) -> int:
        return 1 if self.prepend_bos else 0


def tokenize(lm, corpus: Corpus, ctx_len: int | None = None, max_tokens: int | None = None,
             prepend_bos: bool | None = None) -> Sequences:
    """Tokenise stories and cut each into chunks of at most ``ctx_len`` tokens (BOS included).

    Every chunk starts with BOS when ``prepend_bos`` (default: yes when the tokenizer has one).
    ``max_tokens`` caps the total number of tokens fed to the model (whole chunks are kept).
    """
    ctx_len = min(ctx_len or lm.n_ctx, lm.n_ctx)
    bos = lm.bos_id if (prepend_bos is None or prepend_bos) else None
    if prepend_bos and lm.bos_id is None:
        raise CorpusError("--prepend-bos asked for, but this tokenizer has no BOS or EOS token")
    use_bos = bos is not None
    body = ctx_len - (1 if use_bos else 0)
    if body < 1:
        raise CorpusError(f"context length {ctx_len} leaves no room for tokens")
    ids_out, sids, offs = [], [], []
    total = 0
    # tokenise in chunks of stories so a token cap stops early on large corpora
    step = 256
    for start in range(0, len(corpus.stories), step):
        batch = list(corpus.stories[start : start + step])
        enc = lm.tokenizer(batch, add_special_tokens=False)["input_ids"]
        for j, toks in enumerate(enc):
            for off in range(0, len(toks), body):
                piece = toks[off : off + body]
                seq = ([bos] if use_bos else []) + list(piece)
                if len(seq) < 2:
                    continue
                if max_tokens is not None and total + len(seq) > max_tokens:
                    seq = seq[: max_tokens - total]
                    if len(seq) < 2:
                        break
                ids_out.append(np.asarray(seq, dtype=np.int32))
                sids.append(start + j)
                offs.append(off)
                total += len(seq)
                if max_tokens is not None and total >= max_tokens:
                    break
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    if not ids_out:
        raise CorpusError(f"corpus {corpus.name!r} gives no tokens to score")
    return Sequences(
        corpus_name=corpus.name,
        synthetic=corpus.synthetic,
        prepend_bos=use_bos,
        bos_id=lm.bos_id,
        ids=tuple(ids_out),
        story_ids=tuple(sids),
        offsets=tuple(offs),
    )


@dataclass(frozen=True)
class Batch:
    seq_idx: list[int]  # which sequences, in row order
    ids: torch.Tensor  # [batch, pos], right-padded with the first token's id
    lengths: list[int]


def batches(seqs: Sequences, batch_size: int, max_batch_tokens: int | None = None) -> Iterator[Batch]:
    """Sequences grouped by similar length (little padding), right-padded.

    Right padding needs no attention mask in a causal model: a real token never attends to a
    later (padded) position, so its activations equal those of the unpadded sequence.
    """
    order = sorted(range(len(seqs.ids)), key=lambda i: -len(seqs.ids[i]))
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
        yield Batch(seq_idx=chunk, ids=torch.from_numpy(arr), lengths=lengths)
