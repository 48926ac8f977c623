"""Run a model live on a prompt and read one neuron or one head: the neuron page's "test this
neuron" box and the head page's live pattern (no Streamlit here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from precompute.hooks import neuron_acts, run_with_patterns
from precompute.models import LoadedModel


@dataclass(frozen=True)
class LiveActs:
    ids: tuple[int, ...]  # exactly what the model saw (BOS first when prepended)
    tokens: tuple[str, ...]
    special: tuple[bool, ...]
    acts: tuple[float, ...]  # this neuron's activation at every position
    n_prompt_tokens: int  # before truncation
    n_ctx: int

    @property
    def truncated(self) -> bool:
        return self.n_prompt_tokens > len(self.ids)

    @property
    def max_pos(self) -> int:
        return max(range(len(self.acts)), key=lambda i: self.acts[i]) if self.acts else -1


def neuron_on_ids(lm: LoadedModel, ids: list[int], layer: int, neuron: int, sae=None) -> list[float]:
    """Activation of ``layer``/``neuron`` at every position of one sequence (no truncation); with
    ``sae`` (a ``TopKSAE`` of that layer) of its feature ``neuron``: the SAE's encoding of hook_post."""
    x = torch.tensor([list(ids)], dtype=torch.long)
    if sae is None:
        lm.check_neuron(layer, neuron)
        return neuron_acts(lm, x, [layer])[layer][0, :, neuron].float().tolist()
    lm.check_layer(layer)
    if not 0 <= neuron < sae.n_features:
        raise ValueError(f"feature {neuron} out of range: the SAE has features 0-{sae.n_features - 1}")
    with torch.inference_mode():
        return sae.encode(neuron_acts(lm, x, [layer])[layer][0].float().cpu())[:, neuron].tolist()


def neuron_on_text(lm: LoadedModel, text: str, layer: int, neuron: int, prepend_bos: bool | None = None,
                   sae=None) -> LiveActs:
    """Tokenize ``text`` (BOS first when ``prepend_bos``, default the model's policy), keep the first
    ``n_ctx`` tokens and return the neuron's (``sae``: the SAE feature's) activation at each."""
    ids = lm.encode(text, prepend_bos=prepend_bos)
    n = len(ids)
    ids = ids[: lm.n_ctx]
    if not ids:
        return LiveActs((), (), (), (), 0, lm.n_ctx)
    acts = neuron_on_ids(lm, ids, layer, neuron, sae)
    special = lm.special_ids
    return LiveActs(
        ids=tuple(ids), tokens=tuple(lm.token_strs(ids)), special=tuple(i in special for i in ids),
        acts=tuple(acts), n_prompt_tokens=n, n_ctx=lm.n_ctx,
    )


@dataclass(frozen=True)
class LivePattern:
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    special: tuple[bool, ...]
    pattern: np.ndarray  # [q, k] float32, 0 above the diagonal


def head_on_text(lm: LoadedModel, text: str, layer: int, head: int, prepend_bos: bool | None = None) -> LivePattern:
    """One head's attention pattern on the first ``n_ctx`` tokens of ``text`` (the head page's live prompt)."""
    lm.check_head(layer, head)
    ids = lm.encode(text, prepend_bos=prepend_bos)[: lm.n_ctx]
    if not ids:
        return LivePattern((), (), (), np.zeros((0, 0), np.float32))
    _, patterns = run_with_patterns(lm, torch.tensor([ids], dtype=torch.long))
    special = lm.special_ids
    return LivePattern(
        ids=tuple(ids), tokens=tuple(lm.token_strs(ids)), special=tuple(i in special for i in ids),
        pattern=patterns[int(layer)][0, int(head)].float().cpu().numpy(),
    )


@dataclass(frozen=True)
class PhraseHit:
    layer: int
    neuron: int
    act: float  # its highest activation on the phrase's tokens (BOS left out)
    share: float  # act / the neuron's corpus max (nan when that max is <= 0)
    token: str  # the token where it is highest


def neurons_on_phrase(lm: LoadedModel, text: str, corpus_max: dict[int, np.ndarray], prepend_bos: bool | None = None,
                      limit: int = 30) -> tuple[tuple[str, ...], list[PhraseHit]]:
    """The neurons that fire most on any token of ``text``: per neuron its highest activation over
    the text's tokens (BOS, never scored in the corpus, left out), ranked by that value as a share
    of the neuron's corpus max (``corpus_max[layer][neuron]``), then by the value. Returns the
    tokens and the best ``limit`` neurons."""
    ids = lm.encode(text, prepend_bos=prepend_bos)[: lm.n_ctx]
    first = 1 if ids and ids[0] in lm.special_ids and ids[0] == lm.bos_id else 0
    tokens = tuple(lm.token_strs(ids[first:]))
    if not tokens:
        return (), []
    layers = sorted(corpus_max)
    acts = neuron_acts(lm, torch.tensor([ids], dtype=torch.long), layers)
    rows = []
    for layer in layers:
        a = acts[layer][0, first:].float().cpu().numpy()  # [pos, d_mlp]
        best_pos = a.argmax(0)
        best = a.max(0)
        mx = np.asarray(corpus_max[layer], np.float64)
        share = np.where(mx > 0, best / np.where(mx > 0, mx, 1.0), np.nan)
        for n in range(a.shape[1]):
            rows.append(PhraseHit(layer, n, float(best[n]), float(share[n]), tokens[int(best_pos[n])]))
    rows.sort(key=lambda h: (-(h.share if h.share == h.share else -np.inf), -h.act, h.layer, h.neuron))
    return tokens, rows[:limit]
