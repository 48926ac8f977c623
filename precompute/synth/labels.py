"""Planted labels per token, for any tokenizer with offsets, and the loss of a model on the
tokens of each label (the training curve of the toy model and the Ground truth page)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .grammar import LABELS, PHRASES, Story

ALL_LABELS = LABELS + tuple(f"phrase_end_k{k}" for k in PHRASES)


def token_labels(tokenizer, story: Story) -> tuple[list[int], dict[str, np.ndarray]]:
    """Token ids of ``story`` (no BOS) and, per label, which tokens overlap one of its spans."""
    enc = tokenizer(story.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    out = {label: np.zeros(len(ids), bool) for label in ALL_LABELS}
    for a, b, label in story.spans:
        for i, (s, e) in enumerate(offsets):
            if s < b and e > a and story.text[s:e].strip():
                out[label][i] = True
    return ids, out


def batch_of(tokenizer, stories: Sequence[Story], n_ctx: int):
    """[BOS] + tokens of each story, cut to ``n_ctx``: ids [batch, pos] (padded with BOS), a
    mask of real tokens and each label's mask, aligned with the ids."""
    bos = tokenizer.bos_token_id
    rows = [token_labels(tokenizer, s) for s in stories]
    n = min(n_ctx, max(1 + len(ids) for ids, _ in rows))
    ids = np.full((len(rows), n), bos, np.int64)
    real = np.zeros((len(rows), n), bool)
    masks = {label: np.zeros((len(rows), n), bool) for label in ALL_LABELS}
    for r, (toks, lab) in enumerate(rows):
        toks = toks[: n - 1]
        ids[r, 1 : 1 + len(toks)] = toks
        real[r, 1 : 1 + len(toks)] = True
        for label, m in lab.items():
            masks[label][r, 1 : 1 + len(toks)] = m[: len(toks)]
    return torch.tensor(ids), real, masks


@torch.no_grad()
def token_losses(model, ids: torch.Tensor, batch: int = 32, **forward_kwargs) -> np.ndarray:
    """Next-token loss of every token [batch, pos] (position 0, BOS, gets NaN)."""
    out = np.full(ids.shape, np.nan)
    for b in range(0, len(ids), batch):
        x = ids[b : b + batch].to(model.device)
        logits = model(input_ids=x, **forward_kwargs).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
        out[b : b + batch, 1:] = (-lp).cpu().numpy()
    return out


def label_losses(losses: np.ndarray, real: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean loss over all real tokens and over the tokens of each label (labels with no token left out)."""
    out = {"all": float(losses[real].mean())}
    for label, m in masks.items():
        if m.any():
            out[label] = float(losses[m & real].mean())
    return out


def probe(model, tokenizer, stories: Sequence[Story], n_ctx: int) -> dict[str, float]:
    """``label_losses`` of ``model`` on ``stories`` (rounded): what training logs at each evaluation."""
    was_training = model.training
    model.eval()
    ids, real, masks = batch_of(tokenizer, stories, n_ctx)
    res = label_losses(token_losses(model, ids), real, masks)
    model.train(was_training)
    return {k: round(v, 4) for k, v in res.items()}
