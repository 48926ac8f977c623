"""Train a small GPT-2-style model from scratch on a text corpus, with its own BPE tokenizer.

``precompute train --corpus C --out DIR`` writes a Hugging Face folder (safetensors weights,
tokenizer.json, config) and a model card (README.md) with the corpus, the recipe, train and
validation loss and a greedy sample. The same command trains series of models for the
TinyStories width-versus-depth comparison (``--layers 1 --d-model 64`` etc.).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .corpus import Separator, load_corpus

EOT = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    corpus: str
    out: str
    val_corpus: str | None = None
    separator: Separator = "auto"
    lowercase: bool = True
    vocab_size: int = 2048
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int | None = None  # default 4 * d_model
    n_ctx: int = 256
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.0
    eval_every: int = 250
    eval_tokens: int = 32768
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    max_minutes: float | None = None  # wall-clock budget: the schedule follows time when it runs short
    sample_prompt: str = "once upon a time"
    synth_probe: int | None = None  # seed of held-out synth stories: log the loss on each planted label

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"--d-model {self.d_model} is not divisible by --heads {self.n_heads}")
        if self.n_layers < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("--layers, --steps and --batch-size must be positive")
        if self.vocab_size < 300:
            raise ValueError("--vocab-size must be at least 300 (256 bytes + merges + specials)")


@dataclass(frozen=True)
class TrainResult:
    out: str
    n_params: int
    train_tokens: int
    val_tokens: int
    final_train_loss: float
    val_loss: float | None
    seconds: float
    sample: str
    history: list[dict]
    steps: int = 0


def train_tokenizer(stories, vocab_size: int, lowercase: bool):
    """Byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stories, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, model_max_length=1_000_000
    )


def encode_stream(tokenizer, stories) -> np.ndarray:
    """Stories as one token stream, each preceded by BOS (``<|endoftext|>``)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer(list(stories), add_special_tokens=False)["input_ids"]
    out = []
    for row in ids:
        out.append(bos)
        out.extend(row)
    return np.asarray(out, dtype=np.int64)


def _progress(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Fraction of training done: by steps, or by wall-clock time when ``max_minutes`` is set and binds."""
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.max_minutes:
        t = max(t, elapsed / (cfg.max_minutes * 60))
    return min(1.0, t)


def _lr_at(cfg: TrainConfig, step: int, elapsed: float = 0.0) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = _progress(cfg, step, elapsed)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def eval_loss(model, stream: np.ndarray, n_ctx: int, max_tokens: int, device: str, batch: int = 16) -> float:
    """Mean next-token loss (nats) over consecutive non-overlapping windows of ``stream``."""
    model.eval()
    n_win = max(1, min(len(stream) - 1, max_tokens) // n_ctx)
    total, count = 0.0, 0
    for b in range(0, n_win, batch):
        rows = [stream[i * n_ctx : i * n_ctx + n_ctx + 1] for i in range(b, min(n_win, b + batch))]
        rows = [r for r in rows if len(r) == n_ctx + 1]
        if not rows:
            break
        x = torch.tensor(np.stack(rows), device=device)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / max(1, count)


def run(cfg: TrainConfig) -> TrainResult:
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    corpus = load_corpus(cfg.corpus, cfg.separator)
    tokenizer = train_tokenizer(corpus.stories, cfg.vocab_size, cfg.lowercase)
    train = encode_stream(tokenizer, corpus.stories)
    val = None
    if cfg.val_corpus:
        val = encode_stream(tokenizer, load_corpus(cfg.val_corpus, cfg.separator).stories)
    if len(train) < cfg.n_ctx + 2:
        raise ValueError(f"corpus {cfg.corpus!r} has only {len(train)} tokens, fewer than one context")

    mcfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_mlp or 4 * cfg.d_model,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(mcfg).to(cfg.device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    history: list[dict] = []
    probe = None
    if cfg.synth_probe is not None:
        from itertools import islice

        from .synth import SynthConfig, generate
        from .synth.labels import probe as synth_probe

        probe_stories = list(islice(generate(SynthConfig(seed=cfg.synth_probe)), 256))
        probe = lambda: synth_probe(model, tokenizer, probe_stories, cfg.n_ctx)  # noqa: E731
        history.append({"step": 0, "train_loss_ema": None, "seconds": round(time.time() - t0, 1), "probe": probe()})
    ema = None
    bar = tqdm(range(cfg.steps), desc="train", unit="step")
    t_train = time.time()
    steps_done = 0
    for step in bar:
        elapsed = time.time() - t_train
        if step > cfg.warmup and _progress(cfg, step, elapsed) >= 1.0:
            tqdm.write(f"time budget of {cfg.max_minutes} min reached after {step} steps")
            break
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step, elapsed)
        starts = rng.integers(0, len(train) - cfg.n_ctx - 1, size=cfg.batch_size)
        x = torch.tensor(np.stack([train[s : s + cfg.n_ctx + 1] for s in starts]), device=cfg.device)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
        steps_done = step + 1
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            rec = {"step": step + 1, "train_loss_ema": round(ema, 4), "seconds": round(time.time() - t0, 1)}
            if val is not None:
                rec["val_loss"] = round(eval_loss(model, val, cfg.n_ctx, cfg.eval_tokens, cfg.device), 4)
            if probe is not None:
                rec["probe"] = probe()
            history.append(rec)
            tqdm.write(json.dumps(rec))

    if not history or history[-1]["step"] != steps_done:
        rec = {"step": steps_done, "train_loss_ema": round(ema, 4), "seconds": round(time.time() - t0, 1)}
        if probe is not None:
            rec["probe"] = probe()
        history.append(rec)
    final_train = eval_loss(model, train, cfg.n_ctx, cfg.eval_tokens * 4, cfg.device)
    val_loss = eval_loss(model, val, cfg.n_ctx, len(val), cfg.device) if val is not None else None
    model.eval()
    prompt_ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(cfg.sample_prompt)["input_ids"]], device=cfg.device)
    with torch.no_grad():
        gen = model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=max(1, min(80, cfg.n_ctx - prompt_ids.shape[1])),
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    sample = tokenizer.decode(gen[0, 1:], skip_special_tokens=False)
    seconds = time.time() - t0

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out)
    result = TrainResult(
        out=str(out),
        n_params=sum(p.numel() for p in model.parameters()),
        train_tokens=int(len(train)),
        val_tokens=int(len(val)) if val is not None else 0,
        final_train_loss=round(final_train, 4),
        val_loss=round(val_loss, 4) if val_loss is not None else None,
        seconds=round(seconds, 1),
        sample=sample,
        history=history,
        steps=steps_done,
    )
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), "result": asdict(result)}, indent=2))
    (out / "README.md").write_text(model_card(cfg, result))
    return result


def _portable_tokenizer_config(out: Path) -> None:
    """Name the generic fast tokenizer class, which every transformers version loads."""
    path = out / "tokenizer_config.json"
    conf = json.loads(path.read_text())
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(conf, indent=2) + "\n")


def rewrite_card(out: str | Path) -> None:
    """Regenerate README.md from training.json (after the card's wording changes)."""
    out = Path(out)
    data = json.loads((out / "training.json").read_text())
    cfg = TrainConfig(**data["config"])
    r = TrainResult(**data["result"])
    (out / "README.md").write_text(model_card(cfg, r))


def model_card(cfg: TrainConfig, r: TrainResult) -> str:
    val = f"{r.val_loss:.3f} nats/token on `{Path(cfg.val_corpus).name}`" if r.val_loss is not None else "not measured"
    curve = "\n".join(
        f"| {h['step']} | {h['train_loss_ema']:.3f} | {h.get('val_loss', float('nan')):.3f} | {h['seconds']:.0f} |"
        for h in r.history
        if h.get("train_loss_ema") is not None
    )
    return f"""# {Path(cfg.out).name}

A small GPT-2-style language model trained from scratch by `precompute train` (tinyscope).

| field | value |
|---|---|
| architecture | GPT2LMHeadModel: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, MLP width {cfg.d_mlp or 4 * cfg.d_model} (neurons per layer), context {cfg.n_ctx} |
| parameters | {r.n_params:,} |
| tokenizer | byte-level BPE, {cfg.vocab_size} tokens, {"lowercasing" if cfg.lowercase else "cased"}, trained on the same corpus; `<\\|endoftext\\|>` is BOS and EOS and is prepended to every story |
| training corpus | `{Path(cfg.corpus).name}` ({r.train_tokens:,} tokens) |
| recipe | {r.steps} steps{f" (wall-clock budget {cfg.max_minutes:g} min)" if cfg.max_minutes else ""} x {cfg.batch_size} x {cfg.n_ctx} tokens, AdamW lr {cfg.lr} (warmup {cfg.warmup}, cosine to {cfg.min_lr_frac:g}x), weight decay {cfg.weight_decay}, dropout {cfg.dropout}, seed {cfg.seed}, device {cfg.device} |
| train loss (end) | {r.final_train_loss:.3f} nats/token (first {cfg.eval_tokens * 4:,} training tokens) |
| validation loss | {val} (all {r.val_tokens:,} validation tokens) |
| training time | {r.seconds / 60:.1f} min |

{_corpus_note(cfg, r)}

Greedy continuation of "{cfg.sample_prompt}":

> {r.sample.replace(chr(10), " ")}

Loss during training (validation column: the first {cfg.eval_tokens:,} validation tokens only, so it
differs from the full-set number above):

| step | train loss (EMA) | validation loss | seconds |
|---|---|---|---|
{curve}

{_synth_section(cfg, r)}
Reproduce: {_synth_command(cfg)}`precompute train --corpus {cfg.corpus} --val-corpus {cfg.val_corpus} --out {cfg.out} --layers {cfg.n_layers} --d-model {cfg.d_model} --heads {cfg.n_heads} --steps {cfg.steps}{f" --max-minutes {cfg.max_minutes:g}" if cfg.max_minutes else ""} --batch-size {cfg.batch_size} --vocab-size {cfg.vocab_size}{_extra_args(cfg)}`
"""


def _corpus_note(cfg: TrainConfig, r: TrainResult) -> str:
    seen = f"The model saw the training corpus about {r.steps * cfg.batch_size * cfg.n_ctx / max(1, r.train_tokens):.0f} times."
    if cfg.synth_probe is not None:
        return f"One story per line, each preceded by BOS. {seen}"
    return ("Validation text is split into paragraphs (the file marks stories and paragraphs alike with a\n"
            "blank line), each preceded by BOS, so paragraph starts count as story starts: this slightly\n"
            f"overstates the loss. The training corpus is small (about 1M tokens). {seen}")


def _extra_args(cfg: TrainConfig) -> str:
    """Options the reproduce line needs when they differ from the defaults."""
    default = TrainConfig(corpus="", out="")
    out = ""
    for name, flag in (("n_ctx", "--n-ctx"), ("lr", "--lr"), ("threads", "--threads"), ("eval_every", "--eval-every"),
                       ("synth_probe", "--synth-probe")):
        if getattr(cfg, name) != getattr(default, name):
            out += f" {flag} {getattr(cfg, name)}"
    return out


def _synth_command(cfg: TrainConfig) -> str:
    from .synth.facts import synth_spec

    out = ""
    for corpus in (cfg.corpus, cfg.val_corpus):
        try:
            seed, tokens = synth_spec(corpus or "")
        except ValueError:
            continue
        out += f"`precompute corpus synth --seed {seed} --tokens {tokens} --out {corpus}`, then "
    return out


def _synth_section(cfg: TrainConfig, r: TrainResult) -> str:
    """The planted facts and the loss on each planted label during training (``--synth-probe``)."""
    if cfg.synth_probe is None:
        return ""
    from .synth.facts import phase_change, synth_spec
    from .synth.grammar import N_NAMES, N_SECRET, PHRASES, SECRET_REPEATS

    try:
        seed, tokens = synth_spec(cfg.corpus)
        corpus = f"seed {seed}, {tokens:,} words and punctuation marks"
    except ValueError:
        corpus = f"`{cfg.corpus}`"
    cols = ("all", "name_first", "name_later", "pronoun", "quote", "phrase_end_k2", "phrase_end_k4", "phrase_end_k6",
            "secret_later")
    pc = phase_change(r.history)
    around = range(pc.start - 500, pc.end + 501) if pc is not None else range(0)
    rows = "\n".join(f"| {h['step']} | " + " | ".join(f"{h['probe'].get(c, float('nan')):.3f}" for c in cols) + " |"
                      for h in r.history if "probe" in h and (h["step"] <= 1000 or h["step"] % 500 == 0
                                                              or h["step"] in around or h is r.history[-1]))
    phrases = "; ".join(f"k = {k}: " + ", ".join(" ".join(p) for p in fam) for k, fam in PHRASES.items())
    return f"""
## Planted structure

The training text is `precompute corpus synth` stories ({corpus}; regenerated from the seed,
byte for byte, so it needs no download). Planted in every story:

- two **names** (a character and a friend) drawn from {N_NAMES:,} made-up names, introduced in the
  first two sentences and repeated later: a later mention is predictable only by copying (with two
  names in play, each name token after the first is fixed by the token before it: induction);
- fixed **phrases** whose last word is fixed by the word k back and not by the k - 1 words
  before it ({phrases});
- **pronouns** she/her or he/his that follow the gender given in the first sentence;
- **quotes** `said, "..."` that open and close;
- {N_SECRET} **secret words** (made-up words drawn like the names) told once and repeated {SECRET_REPEATS} times at the
  end, each repeat starting from a random one of them and wrapping round: after a repeat's first word only
  copying the word that followed it before predicts the next (induction); counting from the start does not.

{_phase_note(pc, cfg)}

Loss (nats/token) on the tokens of each planted label, 256 held-out stories of seed {cfg.synth_probe}
(every 100 steps up to 1,000 and from 500 steps before the phase change to 500 after it, else every 500; all of
them in training.json):

| step | {" | ".join(cols)} |
|---|{"---|" * len(cols)}
{rows}
"""


def _phase_note(pc, cfg: TrainConfig) -> str:
    """One line on the phase change of the loss on the repeated secret words, if there was one."""
    if pc is None or not pc.formed:
        return ("The loss on the repeated secret words never fell to half its level: no copying of arbitrary\n"
                "sequences (induction) formed.\n")
    tokens = cfg.batch_size * cfg.n_ctx
    return (f"**Phase change**: the loss on the repeated secret words sat at {pc.before:.2f} nats/token until step "
            f"{pc.start:,} ({pc.start * tokens / 1e6:.1f}M tokens),\nthen fell to {pc.after:.2f} by step {pc.end:,} "
            f"({pc.end * tokens / 1e6:.1f}M tokens; steepest in the {cfg.eval_every} steps up to {pc.steepest:,}); "
            f"{pc.final:.3f} at the end.\n")
