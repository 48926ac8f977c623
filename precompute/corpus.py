"""Corpora: plain text files split into stories, Hugging Face datasets, or stories sampled from a model.

Story separators in text files (``--separator auto`` picks):
- ``eot``: ``<|endoftext|>`` between stories (TinyStoriesV2);
- ``newline``: a single newline between stories, blank lines inside a story (the shared
  train-*.txt files);
- ``blank``: a blank line between stories (valid-head.txt, where paragraphs are blank-line
  separated too, so each paragraph counts as a story).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import one_line

Separator = Literal["auto", "eot", "newline", "blank"]
EOT = "<|endoftext|>"
_LONE_NEWLINE = re.compile(r"(?<!\n)\n(?!\n)")
_BLANK = re.compile(r"\n\s*\n")


class CorpusError(ValueError):
    """A corpus that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Corpus:
    name: str  # what the run records: a path, a dataset id, or "sampled:<model>"
    stories: tuple[str, ...]
    synthetic: bool = False  # sampled from a model, not real training text

    def __post_init__(self):
        if not self.stories:
            raise CorpusError(f"corpus {self.name!r} has no stories")


def split_stories(text: str, separator: Separator = "auto") -> list[str]:
    text = text.replace("\r\n", "\n")
    if separator == "auto":
        if EOT in text:
            separator = "eot"
        elif len(_LONE_NEWLINE.findall(text.strip())) >= 0.1 * len(_BLANK.findall(text)):
            # lone newlines are common: they separate stories and blank lines are paragraphs
            separator = "newline"
        else:
            separator = "blank"
    if separator == "eot":
        parts = text.split(EOT)
    elif separator == "newline":
        parts = _LONE_NEWLINE.split(text)
    else:
        parts = _BLANK.split(text)
    return [p.strip() for p in parts if p.strip()]


def read_text_corpus(path: str | Path, separator: Separator = "auto", max_stories: int | None = None) -> Corpus:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus {str(path)!r} not found")
    if path.is_dir():
        raise CorpusError(f"corpus {str(path)!r} is a folder; give a text file")
    raw = path.read_bytes()
    if not raw.strip():
        raise CorpusError(f"corpus {str(path)!r} is empty")
    if b"\x00" in raw[:65536]:
        raise CorpusError(f"corpus {str(path)!r} looks binary (NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    stories = split_stories(text, separator)
    if max_stories is not None:
        stories = stories[:max_stories]
    return Corpus(name=str(path), stories=tuple(stories))


def read_hf_dataset(spec: str, max_stories: int | None = None) -> Corpus:
    """``hf:<dataset id>[:split]`` e.g. ``hf:roneneldan/TinyStories:validation`` (needs ``datasets`` and a network)."""
    body = spec[3:]
    dataset_id, _, split = body.partition(":")
    split = split or "validation"
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise CorpusError("Hugging Face datasets need `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split, streaming=True)
        stories = []
        for row in ds:
            text = row.get("text") or ""
            if text.strip():
                stories.append(text.strip())
            if max_stories is not None and len(stories) >= max_stories:
                break
    except Exception as e:  # noqa: BLE001 - offline or unknown id: one line
        raise CorpusError(f"dataset {dataset_id!r} could not be loaded: {one_line(e, 160)}") from None
    return Corpus(name=spec, stories=tuple(stories))


def load_corpus(spec: str, separator: Separator = "auto", max_stories: int | None = None) -> Corpus:
    if spec.startswith("hf:"):
        return read_hf_dataset(spec, max_stories)
    return read_text_corpus(spec, separator, max_stories)


def sample_corpus(lm, n_stories: int = 200, max_new_tokens: int = 200, seed: int = 0, prompt: str = "") -> Corpus:
    """Stories sampled from ``lm`` (temperature 1, fixed seed): the offline fallback corpus."""
    import torch

    from .models import model_name

    torch.manual_seed(seed)
    bos = lm.bos_id
    if bos is None:
        raise CorpusError("cannot sample a corpus from a model whose tokenizer has no BOS/EOS token")
    stories: list[str] = []
    batch = 50
    prefix = lm.encode(prompt, prepend_bos=True) if prompt else [bos]
    with torch.inference_mode():
        while len(stories) < n_stories:
            n = min(batch, n_stories - len(stories))
            ids = torch.tensor([prefix] * n, device=lm.device)
            out = lm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                eos_token_id=lm.tokenizer.eos_token_id,
                pad_token_id=lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else bos,
            )
            for row in out[:, len(prefix):].tolist():
                # cut at the first end-of-text / BOS the model produced
                cut = [i for i, t in enumerate(row) if t in (bos, lm.tokenizer.eos_token_id)]
                row = row[: cut[0]] if cut else row
                text = (prompt + lm.tokenizer.decode(row, skip_special_tokens=True)).strip()
                if text:
                    stories.append(text)
    return Corpus(name=f"sampled:{model_name(lm.model_id)}:seed{seed}", stories=tuple(stories), synthetic=True)
