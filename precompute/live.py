"""Live analysis of one prompt: what the model predicts, which neurons fire, where heads look,
and what changes when a neuron or head is ablated. Plain functions (no Streamlit) behind the lab page.

Positions are indices into the exact ids the model saw (BOS at 0 when the model prepends it).
Every forward pass here goes through ``precompute.hooks.hooked``, so hooks never outlive a call.

Ablation conventions (TransformerLens names):

- a *neuron* is one coordinate of ``blocks.L.mlp.hook_post`` (the input of the MLP output
  projection). Zero-ablation sets it to 0 at every position; mean-ablation sets it to its mean
  activation over the corpus (a neuron run in the store, passed in as ``mean_value``) or, when
  none is given, over the prompt's positions (BOS excluded, as the neuron job excludes it).
- a *head* is one slice of ``blocks.L.attn.hook_z`` ([pos, head, d_head], the input of the
  attention output projection). Zero-ablation zeroes the head's z at every position;
  mean-ablation replaces it at every position by its mean z vector over the prompt's positions
  (BOS excluded when there is another position), so the head still writes its average output.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .hooks import hook_name, hooked, run_with_patterns
from .models import LoadedModel

AblationKind = Literal["neuron", "head"]
AblationMode = Literal["zero", "mean"]
ABLATION_KINDS: dict[AblationKind, str] = {"neuron": "mlp.post", "head": "attn.z"}
ABLATION_MODES: dict[AblationMode, str] = {
    "zero": "set to 0 at every position",
    "mean": "set to its mean at every position",
}
N_TOP_NEURONS = 5


# ---------------------------------------------------------------------------------------------
# tokens


@dataclass(frozen=True)
class PromptTokens:
    ids: tuple[int, ...]  # what the model sees (BOS first when the model prepends it)
    n_original: int  # token count before truncation
    max_tokens: int

    @property
    def truncated(self) -> bool:
        return self.n_original > len(self.ids)

    @property
    def notice(self) -> str | None:
        if not self.truncated:
            return None
        return (
            f"The prompt is {self.n_original} tokens long; only the first {len(self.ids)} are used "
            f"(limit {self.max_tokens} tokens)."
        )


def prompt_tokens(lm: LoadedModel, text: str, max_tokens: int | None = None) -> PromptTokens:
    """Token ids of ``text`` as the model sees them, cut to ``max_tokens`` (default: the context)."""
    limit = lm.n_ctx if max_tokens is None else min(int(max_tokens), lm.n_ctx)
    if limit < 1:
        raise ValueError("max_tokens must be at least 1")
    ids = lm.encode(text)
    if not text or not ids:
        raise ValueError("the prompt is empty: type some text")
    return PromptTokens(ids=tuple(int(i) for i in ids[:limit]), n_original=len(ids), max_tokens=limit)


def _first_scored(ids: tuple[int, ...], lm: LoadedModel) -> int:
    """First position that is not the prepended BOS (0 when there is no BOS or nothing else)."""
    return 1 if len(ids) > 1 and lm.prepend_bos and lm.bos_id is not None and ids[0] == lm.bos_id else 0


# ---------------------------------------------------------------------------------------------
# analysis


@dataclass(frozen=True)
class TokenProb:
    id: int
    text: str
    prob: float


@dataclass(frozen=True)
class NeuronHit:
    layer: int
    neuron: int
    act: float


@dataclass(frozen=True)
class PromptAnalysis:
    """Everything the lab shows for one prompt. Arrays are indexed by position first."""

    text: str
    tokens: PromptTokens
    token_strs: tuple[str, ...]
    top_k: int
    top_ids: np.ndarray  # [pos, k] int64: next-token predictions at each position, most likely first
    top_probs: np.ndarray  # [pos, k] float32
    losses: np.ndarray  # [pos - 1] float32: -log p(actual next token) at positions 0..n-2
    neuron_ids: np.ndarray  # [layer, pos, 5] int64: the most active neurons (highest activation)
    neuron_acts: np.ndarray  # [layer, pos, 5] float32
    patterns: np.ndarray  # [layer, head, q, k] float32 attention patterns
    vocab: tuple[str, ...]  # display strings of the vocabulary (for the token ids above)

    @property
    def ids(self) -> tuple[int, ...]:
        return self.tokens.ids

    @property
    def n(self) -> int:
        return len(self.tokens.ids)

    @property
    def notice(self) -> str | None:
        return self.tokens.notice

    @property
    def mean_loss(self) -> float | None:
        """Mean loss over the predicted positions (the prediction made at BOS included)."""
        return float(self.losses.mean()) if len(self.losses) else None

    def check_pos(self, pos: int) -> int:
        if not 0 <= int(pos) < self.n:
            raise ValueError(f"position {pos} out of range: the prompt has positions 0-{self.n - 1}")
        return int(pos)

    def top(self, pos: int) -> list[TokenProb]:
        p = self.check_pos(pos)
        return [TokenProb(int(t), self.vocab[int(t)], float(q)) for t, q in zip(self.top_ids[p], self.top_probs[p])]

    def loss(self, pos: int) -> float | None:
        """Loss on the actual next token after ``pos`` (None at the last position)."""
        p = self.check_pos(pos)
        return float(self.losses[p]) if p < len(self.losses) else None

    def next_token(self, pos: int) -> str | None:
        p = self.check_pos(pos)
        return self.token_strs[p + 1] if p + 1 < self.n else None

    def neurons(self, pos: int) -> list[list[NeuronHit]]:
        """Per layer, the most active neurons at ``pos`` (highest activation first)."""
        p = self.check_pos(pos)
        return [
            [NeuronHit(l, int(n), float(a)) for n, a in zip(self.neuron_ids[l, p], self.neuron_acts[l, p])]
            for l in range(self.neuron_ids.shape[0])
        ]

    def attention_from(self, pos: int) -> np.ndarray:
        """Attention of every head from ``pos`` to positions 0..pos: [layer, head, pos + 1]."""
        p = self.check_pos(pos)
        return self.patterns[:, :, p, : p + 1]


def _vocab(lm: LoadedModel) -> tuple[str, ...]:
    return tuple(lm.display_vocab())


@torch.inference_mode()
def analyse(lm: LoadedModel, text: str, top_k: int = 10, max_tokens: int | None = None) -> PromptAnalysis:
    """One forward pass over ``text``: next-token top-k, loss, top neurons per layer, all patterns."""
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    toks = prompt_tokens(lm, text, max_tokens)
    ids = torch.tensor([toks.ids], dtype=torch.long)
    k_neurons = min(N_TOP_NEURONS, lm.d_mlp)
    top_n: dict[int, tuple[Tensor, Tensor]] = {}

    def grab(layer):
        def fn(x):
            v, i = torch.topk(x[0].float(), k_neurons, dim=-1)
            top_n[layer] = (i, v)

        return fn

    with hooked(lm, {hook_name(l, "mlp.post"): grab(l) for l in range(lm.n_layers)}):
        logits, patterns = run_with_patterns(lm, ids)
    logp = torch.log_softmax(logits[0].float(), dim=-1)  # [pos, vocab]
    k = min(int(top_k), lm.vocab_size)
    top_lp, top_ids = torch.topk(logp, k, dim=-1)
    nxt = ids[0, 1:].to(logp.device)
    losses = -logp[:-1].gather(-1, nxt[:, None])[:, 0]
    return PromptAnalysis(
        text=text,
        tokens=toks,
        token_strs=tuple(lm.token_strs(toks.ids)),
        top_k=k,
        top_ids=top_ids.cpu().numpy(),
        top_probs=top_lp.exp().cpu().numpy().astype(np.float32),
        losses=losses.cpu().numpy().astype(np.float32),
        neuron_ids=torch.stack([top_n[l][0] for l in range(lm.n_layers)]).cpu().numpy(),
        neuron_acts=torch.stack([top_n[l][1] for l in range(lm.n_layers)]).cpu().numpy().astype(np.float32),
        patterns=torch.stack([patterns[l][0] for l in range(lm.n_layers)]).float().cpu().numpy(),
        vocab=_vocab(lm),
    )


# ---------------------------------------------------------------------------------------------
# continuation


@dataclass(frozen=True)
class Continuation:
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    new_strs: tuple[str, ...]
    probs: tuple[float, ...]  # probability of each chosen token when it was chosen (at temperature 1)
    temperature: float
    seed: int
    stopped: str  # "length", "end of text" or "context full"

    @property
    def text(self) -> str:
        return "".join(self.new_strs)


@cache
def _cache_arg(model_class: type) -> str:
    """The forward argument (and output field) of the KV cache: ``cache`` from transformers 5 on,
    where the old ``past_key_values`` warns on every call; ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@torch.inference_mode()
def continue_text(
    lm: LoadedModel, text: str, n_tokens: int = 20, temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True
) -> Continuation:
    """Greedy (temperature 0) or sampled continuation of ``text``, reproducible for a seed."""
    if n_tokens < 1:
        raise ValueError("n_tokens must be at least 1")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    toks = prompt_tokens(lm, text)
    gen = torch.Generator().manual_seed(int(seed))
    eos = lm.tokenizer.eos_token_id
    ids = list(toks.ids)
    new, probs = [], []
    stopped = "length"
    past = None
    cache_arg = _cache_arg(type(lm.model))
    step_in = torch.tensor([ids], dtype=torch.long)
    for _ in range(int(n_tokens)):
        if len(ids) >= lm.n_ctx:
            stopped = "context full"
            break
        out = lm.forward(step_in, use_cache=True, **{cache_arg: past})
        past = getattr(out, cache_arg)
        logits = out.logits[0, -1].float().cpu()
        p1 = torch.softmax(logits, -1)
        if temperature == 0:
            t = int(torch.argmax(logits))
        else:
            t = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        ids.append(t)
        new.append(t)
        probs.append(float(p1[t]))
        step_in = torch.tensor([[t]], dtype=torch.long)
        if stop_at_eos and eos is not None and t == eos:
            stopped = "end of text"
            break
    return Continuation(
        prompt_ids=toks.ids, new_ids=tuple(new), new_strs=tuple(lm.token_strs(new)), probs=tuple(probs),
        temperature=float(temperature), seed=int(seed), stopped=stopped,
    )


# ---------------------------------------------------------------------------------------------
# interventions


@dataclass(frozen=True)
class TokenChange:
    id: int
    text: str
    clean_logprob: float
    ablated_logprob: float
    d_logprob: float
    d_logit: float
    d_prob: float = 0.0  # ablated p - clean p: the change weighted by probability (most_changed ranks by it)


@dataclass(frozen=True)
class AblationResult:
    """Clean vs ablated next-token predictions for one prompt."""

    kind: AblationKind
    layer: int
    index: int
    mode: AblationMode
    mean_value: float | None  # the value a neuron was set to (mean mode)
    mean_source: str | None  # "corpus" (given by the caller), "prompt" or None (zero mode)
    tokens: PromptTokens
    token_strs: tuple[str, ...]
    clean_logits: np.ndarray  # [pos, vocab] float32
    ablated_logits: np.ndarray  # [pos, vocab] float32
    top_k: int
    vocab: tuple[str, ...]

    @property
    def label(self) -> str:
        what = f"L{self.layer} N{self.index}" if self.kind == "neuron" else f"L{self.layer} H{self.index}"
        how = "zero" if self.mode == "zero" else f"mean ({self.mean_source})"
        return f"{self.kind} {what}, {how}-ablated"

    @property
    def n(self) -> int:
        return len(self.tokens.ids)

    @cached_property
    def clean_logprobs(self) -> np.ndarray:
        return _log_softmax(self.clean_logits)

    @cached_property
    def ablated_logprobs(self) -> np.ndarray:
        return _log_softmax(self.ablated_logits)

    def _logp(self) -> tuple[np.ndarray, np.ndarray]:
        return self.clean_logprobs, self.ablated_logprobs

    @property
    def next_logprob_clean(self) -> np.ndarray:
        """log p(actual next token) at positions 0..n-2, clean run."""
        lp = self.clean_logprobs
        return lp[np.arange(self.n - 1), np.asarray(self.tokens.ids[1:], dtype=np.int64)]

    @property
    def next_logprob_ablated(self) -> np.ndarray:
        lp = self.ablated_logprobs
        return lp[np.arange(self.n - 1), np.asarray(self.tokens.ids[1:], dtype=np.int64)]

    @property
    def next_delta(self) -> np.ndarray:
        """Change (ablated - clean) of log p(actual next token) at positions 0..n-2."""
        return self.next_logprob_ablated - self.next_logprob_clean

    @property
    def mean_loss_change(self) -> float | None:
        """Mean change of the loss on the actual next tokens (positive: ablation hurts)."""
        return float(-self.next_delta.mean()) if self.n > 1 else None

    @property
    def kl(self) -> np.ndarray:
        """KL(clean || ablated) of the next-token distribution at every position [pos]."""
        a, b = self._logp()
        return (np.exp(a) * (a - b)).sum(-1)

    def _change(self, p: int, t: int, a: np.ndarray, b: np.ndarray) -> TokenChange:
        return TokenChange(
            id=int(t), text=self.vocab[int(t)], clean_logprob=float(a[p, t]), ablated_logprob=float(b[p, t]),
            d_logprob=float(b[p, t] - a[p, t]), d_logit=float(self.ablated_logits[p, t] - self.clean_logits[p, t]),
            d_prob=float(np.exp(b[p, t]) - np.exp(a[p, t])),
        )

    def _pos(self, pos: int) -> int:
        if not 0 <= int(pos) < self.n:
            raise ValueError(f"position {pos} out of range: the prompt has positions 0-{self.n - 1}")
        return int(pos)

    def actual_next(self, pos: int) -> TokenChange | None:
        p = self._pos(pos)
        if p + 1 >= self.n:
            return None
        a, b = self._logp()
        return self._change(p, self.tokens.ids[p + 1], a, b)

    def clean_top(self, pos: int) -> list[TokenChange]:
        """The clean run's top-k next tokens at ``pos`` and how their log-probs changed."""
        p = self._pos(pos)
        a, b = self._logp()
        order = np.argsort(-a[p], kind="stable")[: self.top_k]
        return [self._change(p, t, a, b) for t in order]

    def most_changed(self, pos: int, k: int | None = None) -> tuple[list[TokenChange], list[TokenChange]]:
        """Tokens whose probability at ``pos`` rose most and fell most under the ablation, ranked
        by the change of probability (``p_ablated - p_clean``), so a token at log p -18 whose log p
        doubles does not outrank one that lost 0.2 of the mass; only tokens that changed appear."""
        p = self._pos(pos)
        k = k or self.top_k
        a, b = self._logp()
        d = np.exp(b[p]) - np.exp(a[p])
        up = [t for t in np.argsort(-d, kind="stable")[:k] if d[t] > 0]
        down = [t for t in np.argsort(d, kind="stable")[:k] if d[t] < 0]
        return [self._change(p, t, a, b) for t in up], [self._change(p, t, a, b) for t in down]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def parse_ablation(spec: str) -> tuple[AblationKind, int, int, AblationMode]:
    """``"neuron:L:N:zero"`` / ``"head:L:H:mean"`` -> (kind, layer, index, mode); ValueError when malformed."""
    parts = str(spec).split(":")
    if len(parts) != 4 or parts[0] not in ABLATION_KINDS or parts[3] not in ABLATION_MODES:
        raise ValueError(f"ablation {spec!r} is not of the form neuron:LAYER:INDEX:zero|mean or head:LAYER:INDEX:zero|mean")
    try:
        layer, index = int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"ablation {spec!r}: layer and index must be whole numbers") from None
    return parts[0], layer, index, parts[3]  # type: ignore[return-value]


def format_ablation(kind: AblationKind, layer: int, index: int, mode: AblationMode) -> str:
    return f"{kind}:{int(layer)}:{int(index)}:{mode}"


@torch.inference_mode()
def ablate(
    lm: LoadedModel,
    text: str,
    kind: AblationKind,
    layer: int,
    index: int,
    mode: AblationMode = "zero",
    mean_value: float | None = None,
    top_k: int = 10,
    max_tokens: int | None = None,
) -> AblationResult:
    """Run ``text`` clean and with one neuron or head ablated at every position.

    ``mean_value``: for neuron mean-ablation, the neuron's corpus mean (see ``neuron_corpus_mean``);
    without it the mean over the prompt's positions is used (``mean_source`` says which).
    """
    if kind not in ABLATION_KINDS:
        raise ValueError(f"unknown ablation kind {kind!r} (neuron or head)")
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r} (zero or mean)")
    if kind == "neuron":
        lm.check_neuron(layer, index)
    else:
        lm.check_head(layer, index)
        if mean_value is not None:
            raise ValueError("mean_value applies to neurons only; a head is mean-ablated with its mean z over the prompt")
    layer, index = int(layer), int(index)
    toks = prompt_tokens(lm, text, max_tokens)
    ids = torch.tensor([toks.ids], dtype=torch.long)
    first = _first_scored(toks.ids, lm)
    name = hook_name(layer, ABLATION_KINDS[kind])
    captured: dict[str, Tensor] = {}

    def capture(x):
        captured["x"] = x.detach().clone()

    with hooked(lm, {name: capture}):
        clean = lm.forward(ids).logits[0].float()

    mean_source = None
    value: Tensor | float | None = None
    if mode == "mean":
        x = captured["x"][0, first:]  # [pos, d_mlp] or [pos, head, d_head]
        if kind == "neuron":
            if mean_value is not None:
                value, mean_source = float(mean_value), "corpus"
            else:
                value, mean_source = float(x[:, index].mean()), "prompt"
        else:
            value, mean_source = x[:, index].mean(0), "prompt"

    def intervene(x):
        x = x.clone()
        if kind == "neuron":
            x[..., index] = 0.0 if value is None else value
        else:
            x[..., index, :] = 0.0 if value is None else value
        return x

    with hooked(lm, {name: intervene}):
        ablated = lm.forward(ids).logits[0].float()

    return AblationResult(
        kind=kind, layer=layer, index=index, mode=mode,
        mean_value=(float(value) if isinstance(value, float) else None), mean_source=mean_source,
        tokens=toks, token_strs=tuple(lm.token_strs(toks.ids)),
        clean_logits=clean.cpu().numpy().astype(np.float32), ablated_logits=ablated.cpu().numpy().astype(np.float32),
        top_k=min(int(top_k), lm.vocab_size), vocab=_vocab(lm),
    )


def neuron_corpus_mean(s, model: str, layer: int, neuron: int) -> float | None:
    """The neuron's mean activation over the corpus from the newest neuron run, or None when no run covers it."""
    from .jobs.neurons.tables import layer_neurons
    from .store.queries import NotFound

    try:
        for row in layer_neurons(s, model, int(layer)):
            if row.neuron == int(neuron):
                return float(row.mean)
    except NotFound:
        return None
    return None
