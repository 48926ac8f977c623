"""Test-time fine-tuning sandbox: what a few optimiser steps on chosen examples change.

``run_sandbox`` deep-copies the loaded model under its lock, so no other session's hooks come
along (the original is never touched: its parameters stay bit-for-bit equal and keep
``requires_grad=False``), then either

- ``finetune``: takes ``steps`` Adam steps (learning rate ``lr``) on the selected examples, all of
  them in one batch per step, next-token loss on every example token; each example is one
  retrieved window fed as its own short document (BOS first when the model uses one); or
- ``in_context``: changes no weight, and instead puts the examples' tokens in front of the
  prompt (BOS, examples in order, prompt), cut from the left to fit the context;

and reports before/after: the loss on a continuation the user gives, the top next tokens after
the prompt, the neurons whose activation on the prompt tokens changed most, how much each head's
attention pattern on the prompt moved (mean total-variation distance over the prompt's query
positions; in context mode the mass moved onto the added examples counts as change), and, when
a rule function is given, the optimal n-gram rule per prompt token. The copy is dropped at the end.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .hooks import neuron_acts, run_with_patterns
from .models import LoadedModel

Mode = Literal["finetune", "in_context"]
MODES: dict[Mode, str] = {
    "finetune": "fine-tune a copy of the model on the examples",
    "in_context": "no weight change: put the examples in the context before the prompt",
}
MAX_STEPS = 200


@dataclass(frozen=True)
class SandboxConfig:
    mode: Mode = "finetune"
    steps: int = 10
    lr: float = 1e-3
    top_k: int = 10
    n_neurons: int = 10
    n_heads: int = 10

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown sandbox mode {self.mode!r} ({', '.join(MODES)})")
        if not 0 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 0 and {MAX_STEPS}")
        if not (0 < self.lr <= 1.0) or not np.isfinite(self.lr):
            raise ValueError("learning rate must be in (0, 1]")
        if self.top_k < 1 or self.n_neurons < 1 or self.n_heads < 1:
            raise ValueError("top_k, n_neurons and n_heads must be at least 1")


@dataclass(frozen=True)
class TopToken:
    id: int
    text: str
    prob: float


@dataclass(frozen=True)
class NeuronChange:
    layer: int
    neuron: int
    pos: int  # index into the prompt ids (BOS is 0) where the change is largest
    before: float
    after: float

    @property
    def change(self) -> float:
        return self.after - self.before


@dataclass(frozen=True)
class HeadChange:
    layer: int
    head: int
    change: float  # mean total-variation distance of the prompt's attention rows, 0..1
    context_mass: float  # in-context mode: mean attention on the added examples (0 otherwise)


@dataclass(frozen=True)
class SandboxResult:
    mode: Mode
    steps: int
    lr: float
    n_examples: int
    prompt_ids: tuple[int, ...]
    prompt_tokens: tuple[str, ...]
    continuation_tokens: tuple[str, ...]
    loss_before: float | None  # mean NLL (nats/token) of the continuation after the prompt
    loss_after: float | None
    train_losses: tuple[float, ...]  # loss on the examples before each step, then after the last
    top_before: tuple[TopToken, ...]
    top_after: tuple[TopToken, ...]
    neurons: tuple[NeuronChange, ...]
    heads: tuple[HeadChange, ...]
    rules_before: tuple | None
    rules_after: tuple | None
    context_len: int  # in-context mode: tokens of examples put before the prompt
    seconds: float


def _strip_bos(lm: LoadedModel, ids) -> list[int]:
    ids = [int(t) for t in ids]
    if ids and lm.bos_id is not None and ids[0] == lm.bos_id:
        ids = ids[1:]
    return ids


def _training_batch(lm: LoadedModel, examples: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [n, L] inputs and labels (-100 on padding) for next-token loss."""
    bos = [lm.bos_id] if (lm.prepend_bos and lm.bos_id is not None) else []
    seqs = [(bos + _strip_bos(lm, e))[: lm.n_ctx] for e in examples]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("no example has at least two tokens to train on")
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), seqs[0][0], dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    return ids, labels


def _lm_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def private_copy(lm: LoadedModel) -> LoadedModel:
    """A deep copy of the shared model with its own lock. The copy is taken holding ``lm.lock``:
    another session's hooks exist only while its thread holds that lock, so none is copied."""
    with lm.lock:
        model = copy.deepcopy(lm.model)
    return replace(lm, model=model, _display=lm._display, lock=threading.RLock())


def finetune_copy(lm: LoadedModel, examples: list[list[int]], steps: int, lr: float) -> tuple[LoadedModel, list[float]]:
    """A fine-tuned deep copy of ``lm`` and the example loss before each step and after the last
    (no examples, zero steps: an unchanged copy and no losses)."""
    if not examples:
        return private_copy(lm), []
    ids, labels = _training_batch(lm, examples)
    ids, labels = ids.to(lm.device), labels.to(lm.device)
    copied = private_copy(lm)
    model = copied.model
    model.eval()  # no dropout: the change comes from the steps only
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = _lm_loss(model, ids, labels)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    with torch.inference_mode():
        losses.append(float(_lm_loss(model, ids, labels)))
    return copied, losses


@torch.inference_mode()
def _continuation_loss(lm: LoadedModel, prefix: list[int], cont: list[int]) -> float | None:
    if not cont:
        return None
    ids = (prefix + cont)[-lm.n_ctx :]
    n_cont = min(len(cont), len(ids) - 1)
    logits = lm.logits(torch.tensor([ids]))[0].float()
    logp = torch.log_softmax(logits[:-1], -1)
    tgt = torch.tensor(ids[1:])
    nll = -logp[torch.arange(len(tgt)), tgt]
    return float(nll[-n_cont:].mean())


@torch.inference_mode()
def _top(lm: LoadedModel, ids: list[int], k: int) -> tuple[np.ndarray, tuple[TopToken, ...]]:
    probs = torch.softmax(lm.logits(torch.tensor([ids]))[0].float(), -1)  # [pos, vocab]
    p, t = torch.topk(probs[-1], min(k, probs.shape[-1]))
    strs = lm.token_strs(t.tolist())
    return probs.numpy(), tuple(TopToken(int(i), s, float(v)) for i, s, v in zip(t.tolist(), strs, p.tolist()))


def _acts(lm: LoadedModel, ids: list[int], positions: list[int]) -> torch.Tensor:
    acts = neuron_acts(lm, torch.tensor([ids]))
    return torch.stack([acts[l][0, positions].float() for l in range(lm.n_layers)], 1)  # [pos, layer, d_mlp]


def ngram_rule_fn(index, rule_set_name: str = "subgram", distance: str = "variational", top_k: int = 5):
    """A ``rules`` function for ``run_sandbox``: the n-gram matcher's per-token optimal rule for
    given next-token probabilities (the same steps as ``precompute.jobs.rules.match_prompt``,
    which computes the probabilities itself). Entry ``i`` is the prediction of token ``i + 1``."""

    def fn(lm: LoadedModel, ids, probs: np.ndarray) -> tuple:
        from .ngrams.matcher import Matcher, contexts_of
        from .ngrams.templates import rule_set
        from .ngrams.views import token_matches

        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) < 2:
            return ()
        matcher = Matcher(index, rule_set(rule_set_name), distance, top_k)
        first_is_bos = lm.bos_id is not None and ids[0] == lm.bos_id
        ctx, clen = contexts_of(ids, lm.bos_id if first_is_bos else None, first=1 if first_is_bos else 0)
        t = np.arange(1, len(ids))
        m = matcher.match(np.asarray(probs, dtype=np.float32)[t - 1], ctx[t], clen[t], ids[t])
        return tuple(token_matches(matcher.templates, ids, lm.display_vocab(), t, clen[t], m))

    return fn


def run_sandbox(
    lm: LoadedModel,
    prompt: str | list[int],
    continuation: str | list[int] = "",
    examples: list[list[int]] = (),
    cfg: SandboxConfig = SandboxConfig(),
    rules: Callable[[LoadedModel, list[int], np.ndarray], tuple] | None = None,
) -> SandboxResult:
    """Before/after of one sandbox run (see the module docstring). ``examples``: token ids of
    the selected windows. ``rules(lm, ids, probs[pos, vocab])``: optimal n-gram rule per token."""
    t0 = time.perf_counter()
    p_ids = lm.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if len(_strip_bos(lm, p_ids)) == 0:
        raise ValueError("the prompt has no tokens")
    if len(p_ids) > lm.n_ctx:
        raise ValueError(f"the prompt has {len(p_ids)} tokens, the model's context is {lm.n_ctx}")
    cont = lm.encode(continuation, prepend_bos=False) if isinstance(continuation, str) else [int(t) for t in continuation]
    examples = [list(e) for e in examples]
    if not examples and not (cfg.mode == "finetune" and cfg.steps == 0):
        raise ValueError("no examples selected: the sandbox needs examples to train on or to put in context")

    has_bos = lm.bos_id is not None and p_ids[0] == lm.bos_id
    first = 1 if has_bos else 0
    positions = list(range(first, len(p_ids)))

    # before
    loss_before = _continuation_loss(lm, p_ids, cont)
    probs_before, top_before = _top(lm, p_ids, cfg.top_k)
    acts_before = _acts(lm, p_ids, positions)
    _, pat_before = run_with_patterns(lm, torch.tensor([p_ids]))

    # after
    if cfg.mode == "finetune":
        after_lm, train_losses = finetune_copy(lm, examples, cfg.steps, cfg.lr)
        a_ids, offset, ctx_len = p_ids, 0, 0
    else:
        after_lm, train_losses = lm, []
        body = p_ids[first:]
        ctx = [t for e in examples for t in _strip_bos(lm, e)]
        room = lm.n_ctx - len(p_ids)
        ctx = ctx[len(ctx) - room :] if room > 0 else []
        a_ids = p_ids[:first] + ctx + body
        offset, ctx_len = len(ctx), len(ctx)
    a_positions = [p + offset for p in positions]
    try:
        loss_after = _continuation_loss(after_lm, a_ids, cont)
        probs_after, top_after = _top(after_lm, a_ids, cfg.top_k)
        acts_after = _acts(after_lm, a_ids, a_positions)
        _, pat_after = run_with_patterns(after_lm, torch.tensor([a_ids]))
        rules_before = rules_after = None
        if rules is not None:
            rules_before = tuple(rules(lm, p_ids, probs_before))
            after_probs_prompt = np.concatenate([probs_after[:first], probs_after[offset + first :]])
            rules_after = tuple(rules(lm, p_ids, after_probs_prompt))
    finally:
        if after_lm is not lm:
            del after_lm  # the copy is dropped here

    # neurons: largest |after - before| over the prompt's tokens
    diff = (acts_after - acts_before).abs()  # [pos, layer, d_mlp]
    best_pos = diff.argmax(0)  # [layer, d_mlp]
    score = diff.max(0).values.flatten()
    n_top = min(cfg.n_neurons, score.numel())
    neurons = []
    for flat in torch.topk(score, n_top).indices.tolist():
        l, n = divmod(flat, lm.d_mlp)
        pi = int(best_pos[l, n])
        neurons.append(NeuronChange(l, n, positions[pi], float(acts_before[pi, l, n]), float(acts_after[pi, l, n])))

    # heads: total-variation distance of the prompt's attention rows (keys mapped to the new layout)
    key_map = torch.tensor(list(range(first)) + [p + offset for p in positions])
    heads = []
    ctx_keys = torch.zeros(len(a_ids), dtype=torch.bool)
    ctx_keys[first : first + offset] = True
    for l in range(lm.n_layers):
        b = pat_before[l][0][:, positions].float()  # [head, q, k_before]
        a = pat_after[l][0][:, a_positions].float()  # [head, q, k_after]
        b_full = torch.zeros_like(a)
        b_full[:, :, key_map] = b
        tv = 0.5 * (a - b_full).abs().sum(-1).mean(-1)  # [head]
        mass = a[:, :, ctx_keys].sum(-1).mean(-1) if offset else torch.zeros(a.shape[0])
        for h in range(a.shape[0]):
            heads.append(HeadChange(l, h, float(tv[h]), float(mass[h])))
    heads.sort(key=lambda h: -h.change)

    return SandboxResult(
        mode=cfg.mode, steps=cfg.steps if cfg.mode == "finetune" else 0, lr=cfg.lr, n_examples=len(examples),
        prompt_ids=tuple(p_ids), prompt_tokens=tuple(lm.token_strs(p_ids)), continuation_tokens=tuple(lm.token_strs(cont)),
        loss_before=loss_before, loss_after=loss_after, train_losses=tuple(train_losses),
        top_before=top_before, top_after=top_after, neurons=tuple(neurons), heads=tuple(heads[: cfg.n_heads]),
        rules_before=rules_before, rules_after=rules_after, context_len=ctx_len,
        seconds=time.perf_counter() - t0,
    )
