"""What was planted in the synth stories beside what the tool finds in a model trained on them.

- heads: the heads job's induction score (repeated random tokens) and previous-token score (on
  synth stories), the same induction pattern measured on the planted names, next to the rise of the loss on later name
  mentions and on the repeated secret words when the head's output is zeroed (a forward pre-hook on the attention
  output projection);
- the phase change: when, in training, the loss on the repeated secret words fell (``phase_change``);
- rules: for the last token of each planted phrase family (fixed by the token k back), the
  rules job's optimal rule length and its top-1 agreement with the model;
- neurons: per planted label, the neuron whose top range (activations >= max - 0.2 (max - min),
  the Neuron page's "explained" range) is most made of tokens with that label.

Everything is computed on held-out stories (``eval_seed``, never the training seed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from ..models import LoadedModel
from .grammar import GRAMMAR_VERSION, PHRASES, Story, SynthConfig, generate, write_corpus
from .labels import ALL_LABELS, batch_of, label_losses, token_losses

TOP_FRAC = 0.2  # the Neuron page's top range
MIN_TOP = 20  # a neuron's top range must hold at least this many tokens to count
CACHE = Path(__file__).resolve().parents[2] / "data" / "cache" / "synth" / f"v{GRAMMAR_VERSION}"  # regenerated corpora (git-ignored)
NEURON_LABELS = ("quote", "name_later", "pronoun", "phrase", "secret_later")


@dataclass(frozen=True)
class HeadFact:
    layer: int
    head: int
    induction: float  # heads job, repeated random tokens
    prev_token: float  # heads job's mean weight on the previous token, on synth stories
    name_loss_rise: float  # loss on later name mentions with this head zeroed, minus the intact loss
    secret_loss_rise: float  # the same on the repeated secret words
    name_induction: float = float("nan")  # induction on the names: see name_induction_scores


@dataclass(frozen=True)
class RuleFact:
    k: int  # planted: the token k back fixes the phrase's last token
    n_tokens: int
    share_length_k: float  # optimal rule of length exactly k
    mean_length: float
    agreement: float  # mean top-1 agreement of the optimal rule with the model
    model_correct: float  # the model's top-1 is the true token


@dataclass(frozen=True)
class NeuronFact:
    label: str
    layer: int
    neuron: int
    share: float  # of the tokens in the neuron's top range, the share with the label
    base_rate: float  # the label's share of all scored tokens
    n_top: int


@dataclass(frozen=True)
class PhaseChange:
    """The sudden drop of the loss on one planted label during training (training.json's
    per-label probe). ``steepest``: the step ending the logged interval with the largest drop (the
    first interval, from step 0, left out); ``before``: the highest loss in the 5 logged steps before
    it; with ``total`` = before - final, ``start`` is the last step before ``steepest`` still at
    final + 0.9 total or more and ``end`` the first from ``steepest`` on at final + 0.1 total or less."""

    label: str
    start: int
    end: int
    steepest: int
    before: float  # the loss at ``start``
    after: float  # the loss at ``end``
    final: float

    @property
    def formed(self) -> bool:
        """The drop more than halved the loss: a mechanism formed (not a drift)."""
        return self.final <= 0.5 * self.before


def phase_change(curve: list[dict], label: str = "secret_later") -> PhaseChange | None:
    pts = [(h["step"], h["probe"][label]) for h in curve if h["step"] > 0 and label in h.get("probe", {})]
    if len(pts) < 3:
        return None
    steep = max(range(1, len(pts)), key=lambda i: pts[i - 1][1] - pts[i][1])
    final = pts[-1][1]
    total = max(x for _, x in pts[max(0, steep - 5) : steep]) - final
    start = max(i for i in range(max(0, steep - 5), steep) if pts[i][1] >= final + 0.9 * total)
    end = next(i for i in range(steep, len(pts)) if pts[i][1] <= final + 0.1 * total)
    return PhaseChange(label, pts[start][0], pts[end][0], pts[steep][0], pts[start][1], pts[end][1], final)


@dataclass(frozen=True)
class GroundTruth:
    model: str
    eval_seed: int
    n_stories: int
    n_tokens: int
    label_loss: dict[str, float]
    heads: list[HeadFact]
    rules: list[RuleFact]
    neurons: list[NeuronFact]
    curve: list[dict] = field(default_factory=list)  # training.json's history (with planted-label losses)
    training: dict = field(default_factory=dict)  # training.json's config (corpus seed, size, steps)

    def head(self, layer: int, head: int) -> HeadFact:
        return next(h for h in self.heads if (h.layer, h.head) == (layer, head))

    def induction_head(self) -> HeadFact:
        return max(self.heads, key=lambda h: h.induction)

    def most_harmful(self) -> HeadFact:
        return max(self.heads, key=lambda h: h.name_loss_rise)

    def most_harmful_secret(self) -> HeadFact:
        return max(self.heads, key=lambda h: h.secret_loss_rise)

    def previous_token_head(self, before_layer: int) -> HeadFact | None:
        """The head with the highest previous-token score in a layer before ``before_layer``."""
        return max((h for h in self.heads if h.layer < before_layer), key=lambda h: h.prev_token, default=None)

    def phase_change(self, label: str = "secret_later") -> PhaseChange | None:
        return phase_change(self.curve, label)


def eval_stories(seed: int, n: int) -> list[Story]:
    return list(islice(generate(SynthConfig(seed=seed)), n))


def training_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def training_corpus(model_dir: str | Path, cache_dir: str | Path = CACHE) -> Path:
    """The model's training text, regenerated from the seed and size in its training.json
    (``synth-<seed>-<tokens>.txt``; written once, then reused)."""
    cfg = training_info(model_dir).get("config", {})
    seed, tokens = synth_spec(cfg.get("corpus", ""))
    out = Path(cache_dir) / f"synth-{seed}-{tokens}.txt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        write_corpus(SynthConfig(seed=seed, tokens=tokens), tmp)
        tmp.replace(out)
    return out


def synth_spec(corpus: str) -> tuple[int, int]:
    """(seed, tokens) from a synth corpus file name ``synth-<seed>-<tokens>.txt``."""
    parts = Path(corpus).stem.split("-")
    if len(parts) != 3 or parts[0] != "synth" or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ValueError(f"{corpus!r} is not a synth corpus name (synth-<seed>-<tokens>.txt)")
    return int(parts[1]), int(parts[2])


@torch.inference_mode()
def ablated_losses(lm: LoadedModel, ids: torch.Tensor, layer: int, head: int) -> np.ndarray:
    """Per-token losses with head ``head`` of ``layer`` zeroed (its slice of the attention output
    projection's input)."""
    d_head = lm.d_model // lm.n_heads

    def zero(_mod, args):
        z = args[0].clone()
        z[..., head * d_head : (head + 1) * d_head] = 0
        return (z,) + args[1:]

    handle = lm.attn_out(layer).register_forward_pre_hook(zero)
    try:
        return token_losses(lm.model, ids)
    finally:
        handle.remove()


def head_facts(lm: LoadedModel, stories: list[Story]) -> tuple[list[HeadFact], dict[str, float]]:
    from ..jobs.heads import HeadsConfig, induction_scores
    from ..jobs.heads import run as heads_run

    ids, real, masks = batch_of(lm.tokenizer, stories, lm.n_ctx)
    base = token_losses(lm.model, ids)
    names = masks["name_later"] & real
    secret = masks["secret_later"] & real
    seqs = sequences_of(lm, ids, real)
    heads = heads_run(lm, seqs, HeadsConfig(n_examples=1))
    half = min(50, (lm.n_ctx - 1) // 2)
    ind = induction_scores(lm, half, 16, 0)
    on_names = name_induction_scores(lm, ids, names)
    out = []
    for lh in heads.layers:
        for h in range(lm.n_heads):
            ab = ablated_losses(lm, ids, lh.layer, h)
            out.append(HeadFact(lh.layer, h, float(ind[lh.layer][h]), float(lh.prev_token[h]),
                                float(ab[names].mean() - base[names].mean()),
                                float(ab[secret].mean() - base[secret].mean()) if secret.any() else float("nan"),
                                float(on_names[lh.layer, h])))
    return out, label_losses(base, real, masks)


@torch.inference_mode()
def name_induction_scores(lm: LoadedModel, ids: torch.Tensor, names: np.ndarray) -> np.ndarray:
    """[layer, head] mean attention from a later name token at q to the position right after the
    first earlier occurrence of the same token (the induction pattern, on the planted names
    rather than on repeated random tokens)."""
    att = lm.forward(ids, output_attentions=True).attentions
    rows, qs, ks = [], [], []
    for r, q in zip(*np.nonzero(names)):
        earlier = np.nonzero(ids[r, 1:q].numpy() == int(ids[r, q]))[0]
        if len(earlier):
            rows.append(r), qs.append(q), ks.append(int(earlier[0]) + 2)  # +1 for the slice, +1 for "after"
    if not rows:
        return np.full((len(att), att[0].shape[1]), np.nan)
    r, q, k = (torch.tensor(x) for x in (rows, qs, ks))
    return np.stack([a[r, :, q, k].float().mean(0).cpu().numpy() for a in att])


def sequences_of(lm: LoadedModel, ids: torch.Tensor, real: np.ndarray):
    from ..sequences import Sequences

    rows = tuple(ids[r, : 1 + int(real[r].sum())].numpy().astype(np.int32) for r in range(len(ids)))
    return Sequences(corpus_name="synth", synthetic=False, prepend_bos=True, bos_id=lm.bos_id, ids=rows,
                     story_ids=tuple(range(len(rows))), offsets=(0,) * len(rows))


def rule_facts(lm: LoadedModel, stories: list[Story], ngram_corpus: str | Path) -> list[RuleFact]:
    from ..jobs.rules import RulesConfig
    from ..jobs.rules import run as rules_run
    from ..ngrams.templates import length_of

    ids, real, masks = batch_of(lm.tokenizer, stories, lm.n_ctx)
    res = rules_run(lm, sequences_of(lm, ids, real), RulesConfig(ngram_corpus=str(ngram_corpus)))
    m = res.matches
    lengths = np.array([length_of(t) for t in res.templates])
    out = []
    for k in sorted(PHRASES):
        sel = masks[f"phrase_end_k{k}"][res.seq, res.pos] & m.defined
        # a phrase's last word may be several tokens: score its first token (the one k back decides)
        first = sel & ~masks[f"phrase_end_k{k}"][res.seq, res.pos - 1]
        if not first.any():
            continue
        n = lengths[m.rule[first]]
        out.append(RuleFact(k, int(first.sum()), float((n == k).mean()), float(n.mean()),
                            float(m.agree[first].mean()), float(m.model_correct[first].mean())))
    return out


@torch.inference_mode()
def neuron_facts(lm: LoadedModel, stories: list[Story]) -> list[NeuronFact]:
    ids, real, masks = batch_of(lm.tokenizer, stories, lm.n_ctx)
    acts: dict[int, list[torch.Tensor]] = {l: [] for l in range(lm.n_layers)}
    handles = [lm.mlp_out(l).register_forward_pre_hook(lambda _m, a, l=l: acts[l].append(a[0].float()))
               for l in range(lm.n_layers)]
    try:
        for b in range(0, len(ids), 32):
            lm.model(input_ids=ids[b : b + 32])
    finally:
        for h in handles:
            h.remove()
    out = []
    for label in NEURON_LABELS:
        lab = torch.tensor(masks[label][real])
        best = None
        for l, parts in acts.items():
            a = torch.cat(parts)[torch.tensor(real)]  # [tokens, d_mlp], BOS left out
            hi, lo = a.max(0).values, a.min(0).values
            top = a >= (hi - TOP_FRAC * (hi - lo))
            share = (top & lab[:, None]).sum(0) / top.sum(0).clamp(min=1)
            share[top.sum(0) < MIN_TOP] = 0
            n = int(share.argmax())
            if best is None or share[n] > best.share:
                best = NeuronFact(label, l, n, float(share[n]), float(lab.float().mean()), int(top[:, n].sum()))
        out.append(best)
    return out


def ground_truth(lm: LoadedModel, model_dir: str | Path, eval_seed: int = 1000, n_stories: int = 200,
                 cache_dir: str | Path = CACHE) -> GroundTruth:
    stories = eval_stories(eval_seed, n_stories)
    info = training_info(model_dir)
    heads, label_loss = head_facts(lm, stories)
    rules = rule_facts(lm, stories, training_corpus(model_dir, cache_dir))
    ids, real, _ = batch_of(lm.tokenizer, stories, lm.n_ctx)
    return GroundTruth(
        model=str(model_dir), eval_seed=eval_seed, n_stories=n_stories, n_tokens=int(real.sum()),
        label_loss={k: round(v, 4) for k, v in label_loss.items()}, heads=heads, rules=rules,
        neurons=neuron_facts(lm, stories), curve=info.get("result", {}).get("history", []),
        training=info.get("config", {}),
    )


__all__ = ["ALL_LABELS", "GroundTruth", "HeadFact", "NeuronFact", "PhaseChange", "RuleFact", "ground_truth", "phase_change"]
