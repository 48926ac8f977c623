"""`precompute train-sae`: a TopK SAE on one layer's MLP neurons over a corpus, and its quality.

The corpus is tokenised as for a sweep (BOS first when the tokenizer has one); the last
``holdout`` share of its sequences is held out. Activations of the training sequences (BOS
positions left out) are collected once, then the SAE trains with Adam on shuffled batches for
``epochs`` passes (the decoder rows renormalised after every step); the training curve is the
batch's fraction of variance unexplained every ``curve_every`` steps. Quality, on the held-out
sequences unless said:

- **variance explained**: ``1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2`` over their tokens;
- **dead share**: features that are never among a token's active ones over all training tokens;
- **losses**: mean next-token cross-entropy of the clean model, with the layer's hook_post
  replaced by the SAE's reconstruction (spliced), and by zeros (zero-ablated: the scale), every
  position's prediction of the next token.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..hooks import forward_until, hook_name, hooked
from ..models import LoadedModel
from ..sequences import Sequences, batches
from .model import TopKSAE


@dataclass(frozen=True)
class SaeConfig:
    layer: int
    n_features: int | None = None  # default 4 x d_mlp
    k: int = 32
    epochs: int = 4
    batch_size: int = 1024  # tokens per step
    lr: float = 1e-3
    holdout: float = 0.1  # share of the sequences held out for the quality
    curve_every: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.layer < 0:
            raise ValueError("--layer must be >= 0")
        if self.n_features is not None and self.n_features < 1:
            raise ValueError("--features must be at least 1")
        if self.k < 1 or self.epochs < 1 or self.batch_size < 1 or self.curve_every < 1:
            raise ValueError("--k, --epochs and --batch-size must be at least 1")
        if not self.lr > 0:
            raise ValueError("--lr must be positive")
        if not 0 < self.holdout < 1:
            raise ValueError("--holdout must be between 0 and 1")

    def params(self) -> dict:
        return asdict(self)


@dataclass
class SaeResult:
    config: SaeConfig
    sae: TopKSAE
    n_train_tokens: int
    n_eval_tokens: int
    variance_explained: float
    dead_share: float
    clean_loss: float
    spliced_loss: float
    zero_loss: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, batch FVU)
    seconds: float = 0.0

    @property
    def loss_recovered(self) -> float:
        """Share of the zero-ablation loss increase that splicing the SAE in avoids."""
        gap = self.zero_loss - self.clean_loss
        return (self.zero_loss - self.spliced_loss) / gap if gap else float("nan")


def split(seqs: Sequences, holdout: float) -> tuple[Sequences, Sequences]:
    from dataclasses import replace

    n = len(seqs.ids)
    n_eval = max(1, int(round(n * holdout)))
    if n - n_eval < 1:
        raise ValueError(f"the corpus gave {n} sequences: too few to hold {holdout:.0%} out (use more --max-tokens)")
    cut = n - n_eval

    def part(a, b):
        return replace(seqs, ids=seqs.ids[a:b], story_ids=seqs.story_ids[a:b], offsets=seqs.offsets[a:b],
                       first_seq=seqs.first_seq + a)

    return part(0, cut), part(cut, n)


@torch.inference_mode()
def collect(lm: LoadedModel, seqs: Sequences, layer: int, batch_size: int = 32) -> torch.Tensor:
    """hook_post of ``layer`` at every scored token of ``seqs``: [tokens, d_mlp], float32, CPU."""
    out = []

    def save(x):
        cache.append(x.detach())

    for b in batches(seqs, batch_size):
        cache: list = []
        with hooked(lm, {hook_name(layer, "mlp.post"): save}, stop_after=layer):
            forward_until(lm, b.ids.to(lm.device))
        acts = cache[0].float().cpu()
        for r, n in enumerate(b.lengths):
            out.append(acts[r, b.first : n])
    return torch.cat(out) if out else torch.zeros(0, lm.d_mlp)


@torch.inference_mode()
def losses(lm: LoadedModel, seqs: Sequences, layer: int, replace=None, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over ``seqs`` (every position predicting the next), with the
    layer's hook_post passed through ``replace`` (None: clean)."""
    total, count = 0.0, 0
    fns = {} if replace is None else {hook_name(layer, "mlp.post"): lambda x: replace(x.float()).to(x.dtype)}
    for b in batches(seqs, batch_size):
        ids = b.ids.to(lm.device)
        with hooked(lm, fns):
            logits = lm.model(input_ids=ids).logits.float()
        for r, n in enumerate(b.lengths):
            if n > 1:
                ce = torch.nn.functional.cross_entropy(logits[r, : n - 1], ids[r, 1:n], reduction="sum")
                total += float(ce)
                count += n - 1
    if count == 0:
        raise ValueError("no sequence is longer than one token")
    return total / count


def variance_explained(sae: TopKSAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        err = (x - sae(x)).pow(2).sum()
        var = (x - x.mean(0)).pow(2).sum()
    return float(1 - err / var) if var > 0 else float("nan")


def dead_share(sae: TopKSAE, x: torch.Tensor, chunk: int = 8192) -> float:
    fired = torch.zeros(sae.n_features, dtype=torch.bool)
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            fired |= (sae.encode(x[i : i + chunk]) > 0).any(0)
    return float(1 - fired.float().mean())


def train(lm: LoadedModel, seqs: Sequences, cfg: SaeConfig, log=lambda m: None) -> SaeResult:
    """Train on all but the held-out sequences and measure the quality (module docstring)."""
    lm.check_layer(cfg.layer)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train_seqs, eval_seqs = split(seqs, cfg.holdout)
    x = collect(lm, train_seqs, cfg.layer)
    if len(x) < cfg.batch_size:
        raise ValueError(f"{len(x)} training tokens are fewer than one batch ({cfg.batch_size}); use more --max-tokens")
    n_features = cfg.n_features or 4 * lm.d_mlp
    sae = TopKSAE(lm.d_mlp, n_features, min(cfg.k, n_features))
    sae.init_from(x, cfg.seed)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    curve, step = [], 0
    var_tok = float((x - x.mean(0)).pow(2).sum(1).mean())
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - cfg.batch_size + 1, cfg.batch_size):
            xb = x[order[i : i + cfg.batch_size]]
            loss = (sae(xb) - xb).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sae.normalize_decoder()
            if step % cfg.curve_every == 0:
                curve.append((step, round(float(loss.detach()) / var_tok, 5)))
            step += 1
        log(f"epoch {epoch + 1}/{cfg.epochs}: batch FVU {float(loss.detach()) / var_tok:.3f}")
    sae.eval()
    x_eval = collect(lm, eval_seqs, cfg.layer)
    with torch.no_grad():
        res = SaeResult(
            config=cfg, sae=sae, n_train_tokens=len(x), n_eval_tokens=len(x_eval),
            variance_explained=variance_explained(sae, x_eval), dead_share=dead_share(sae, x),
            clean_loss=losses(lm, eval_seqs, cfg.layer), spliced_loss=losses(lm, eval_seqs, cfg.layer, sae),
            zero_loss=losses(lm, eval_seqs, cfg.layer, torch.zeros_like), curve=curve,
        )
    res.seconds = time.perf_counter() - t0
    return res


def as_arrays(sae: TopKSAE) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype("<f4") for k, v in sae.state_dict().items()}
