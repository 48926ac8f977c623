"""Corpora: plain text files split into stories, Hugging Face datasets, or stories sampled from a model.

Story separators in text files (``--separator auto`` picks):
- ``eot``: ``<|endoftext|>`` between stories (TinyStoriesV2);
- ``newline``: a single newline between stories, blank lines inside a story (the shared
  train-*.txt files);
- ``blank``: a blank line between stories (valid-head.txt, where paragraphs are blank-line
  separated too, so each paragraph counts as a story).
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

from .errors import one_line

Separator = Literal["auto", "eot", "newline", "blank"]
EOT = "<|endoftext|>"
_LONE_NEWLINE = re.compile(r"(?<!\n)\n(?!\n)")
_BLANK = re.compile(r"\n\s*\n")


class CorpusError(ValueError):
    """A corpus that cannot be used; the message is one line for the user."""


class Corpus:
    """Stories, read lazily: ``iter_stories()`` streams them (a large file never sits in memory);
    ``stories`` materialises them all (small corpora, the n-gram index, training)."""

    def __init__(self, name: str, stories: Iterable[str] | None = None, synthetic: bool = False,
                 reader: Callable[[], Iterator[str]] | None = None):
        self.name = name  # what the run records: a path, a dataset id, or "sampled:<model>"
        self.synthetic = synthetic  # sampled from a model, not real training text
        self._stories = tuple(stories) if stories is not None else None
        self._reader = reader
        if self._stories is not None and not self._stories:
            raise CorpusError(f"corpus {self.name!r} has no stories")

    def iter_stories(self) -> Iterator[str]:
        if self._stories is not None:
            return iter(self._stories)
        return self._reader()

    @property
    def stories(self) -> tuple[str, ...]:
        if self._stories is None:
            self._stories = tuple(self.iter_stories())
            if not self._stories:
                raise CorpusError(f"corpus {self.name!r} has no stories")
        return self._stories


def detect_separator(text: str) -> Separator:
    if EOT in text:
        return "eot"
    if len(_LONE_NEWLINE.findall(text.strip())) >= 0.1 * len(_BLANK.findall(text)):
        # lone newlines are common: they separate stories and blank lines are paragraphs
        return "newline"
    return "blank"


_SPLIT = {"eot": re.compile(re.escape(EOT)), "newline": _LONE_NEWLINE, "blank": _BLANK}


def split_stories(text: str, separator: Separator = "auto") -> list[str]:
    text = text.replace("\r\n", "\n")
    if separator == "auto":
        separator = detect_separator(text)
    return [p.strip() for p in _SPLIT[separator].split(text) if p.strip()]


BLOCK = 4 << 20  # bytes read at a time; the separator is guessed from the first block


def _iter_file_stories(path: Path, separator: Separator, max_stories: int | None) -> Iterator[str]:
    """Stories of a UTF-8 text file, read block by block. A block is split at its last separator
    that ends well before the block's end (so a separator cut by the block edge is never
    misread); the rest is carried into the next block."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    sep: Separator | None = None if separator == "auto" else separator
    carry = ""
    n = 0
    read = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(BLOCK)
            try:
                text = dec.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise CorpusError(f"corpus {str(path)!r} is not UTF-8 text (byte {read + e.start})") from None
            read += len(raw)
            buf = (carry + text).replace("\r\n", "\n")
            if sep is None:
                sep = detect_separator(buf)
            if raw:
                cut = None
                for m in _SPLIT[sep].finditer(buf):
                    if m.end() < len(buf) - 16:
                        cut = m
                if cut is None:
                    carry = buf
                    continue
                body, carry = buf[: cut.start()], buf[cut.end() :]
            else:
                body, carry = buf, ""
            for part in _SPLIT[sep].split(body):
                part = part.strip()
                if part:
                    yield part
                    n += 1
                    if max_stories is not None and n >= max_stories:
                        return
            if not raw:
                return


def read_text_corpus(path: str | Path, separator: Separator = "auto", max_stories: int | None = None) -> Corpus:
    """A text file's stories, streamed. The file is checked here (exists, not empty, not binary,
    UTF-8 at the start); a bad byte further on stops the run with one line."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus {str(path)!r} not found")
    if path.is_dir():
        raise CorpusError(f"corpus {str(path)!r} is a folder; give a text file")
    with open(path, "rb") as f:
        head = f.read(65536)
        if b"\x00" in head:
            raise CorpusError(f"corpus {str(path)!r} looks binary (NUL bytes); give a UTF-8 text file")
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 4:  # not just a character cut by the 64 KB edge
                raise CorpusError(f"corpus {str(path)!r} is not UTF-8 text (byte {e.start})") from None
        while not head.strip():
            if not head:
                raise CorpusError(f"corpus {str(path)!r} is empty")
            head = f.read(BLOCK)
    # the run records the absolute path, so the app (retrieval's sandbox, the rules pages) finds the
    # file from any working directory
    return Corpus(name=str(path.resolve()), reader=lambda: _iter_file_stories(path, separator, max_stories))


def read_hf_dataset(spec: str, max_stories: int | None = None) -> Corpus:
    """``hf:<dataset id>[:split]`` e.g. ``hf:roneneldan/TinyStories:validation`` (needs ``datasets`` and a network)."""
    body = spec[3:]
    dataset_id, _, split = body.partition(":")
    split = split or "validation"
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise CorpusError("Hugging Face datasets need `pip install datasets`") from None
    def rows() -> Iterator[str]:
        try:
            ds = datasets.load_dataset(dataset_id, split=split, streaming=True)
            n = 0
            for row in ds:
                text = (row.get("text") or "").strip()
                if text:
                    yield text
                    n += 1
                if max_stories is not None and n >= max_stories:
                    return
        except Exception as e:  # noqa: BLE001 - offline or unknown id: one line
            raise CorpusError(f"dataset {dataset_id!r} could not be loaded: {one_line(e, 160)}") from None

    corpus = Corpus(name=spec, reader=rows)
    first = next(iter(corpus.iter_stories()), None)  # fail now, not after the model is loaded
    if first is None:
        raise CorpusError(f"dataset {dataset_id!r} has no text rows")
    return corpus


def load_corpus(spec: str, separator: Separator = "auto", max_stories: int | None = None) -> Corpus:
    if spec.startswith("hf:"):
        return read_hf_dataset(spec, max_stories)
    return read_text_corpus(spec, separator, max_stories)


class _StepBar:
    """A ``generate`` streamer that moves a progress bar one step per generated token position."""

    def __init__(self, bar, n: int):
        self.bar, self.n, self.first = bar, n, True

    def put(self, value) -> None:
        if self.first:  # generate hands over the prompt first
            self.first = False
            return
        self.bar.update(self.n)

    def end(self) -> None:
        self.first = True


def sample_corpus(lm, n_stories: int = 200, max_new_tokens: int = 200, seed: int = 0, prompt: str = "",
                  progress: bool = True) -> Corpus:
    """Stories sampled from ``lm`` (temperature 1, fixed seed): the offline fallback corpus. With
    ``progress``, a bar on stderr counts sampled token positions (at most ``max_new_tokens`` a story)."""
    import torch
    from tqdm import tqdm

    from .models import model_name

    torch.manual_seed(seed)
    bos = lm.bos_id
    if bos is None:
        raise CorpusError("cannot sample a corpus from a model whose tokenizer has no BOS/EOS token")
    stories: list[str] = []
    batch = 50
    prefix = lm.encode(prompt, prepend_bos=True) if prompt else [bos]
    bar = tqdm(total=n_stories * max_new_tokens, desc=f"sampling {n_stories} stories", unit="tok", unit_scale=True,
               disable=not progress)
    with torch.inference_mode(), bar:
        while len(stories) < n_stories:
            n = min(batch, n_stories - len(stories))
            ids = torch.tensor([prefix] * n, device=lm.device)
            start = bar.n
            out = lm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                eos_token_id=lm.tokenizer.eos_token_id,
                pad_token_id=lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else bos,
                streamer=_StepBar(bar, n),
            )
            bar.update(start + n * max_new_tokens - bar.n)  # a batch whose stories all ended early
            for row in out[:, len(prefix):].tolist():
                # cut at the first end-of-text / BOS the model produced
                cut = [i for i, t in enumerate(row) if t in (bos, lm.tokenizer.eos_token_id)]
                row = row[: cut[0]] if cut else row
                text = (prompt + lm.tokenizer.decode(row, skip_special_tokens=True)).strip()
                if text:
                    stories.append(text)
    return Corpus(name=f"sampled:{model_name(lm.model_id)}:seed{seed}", stories=tuple(stories), synthetic=True)
