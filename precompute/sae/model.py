"""A TopK sparse autoencoder on one layer's MLP neurons (hook_post), as in Gao et al. 2024:
``z = TopK(relu((x - b_dec) W_enc + b_enc))``, ``x_hat = z W_dec + b_dec``, decoder rows kept at
unit norm. Weights are float32; shapes in TransformerLens' names (``d_in`` = d_mlp)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, n_features: int, k: int):
        super().__init__()
        if not 1 <= k <= n_features:
            raise ValueError(f"k must be in 1..{n_features} (the number of features)")
        self.d_in, self.n_features, self.k = d_in, n_features, k
        self.W_enc = nn.Parameter(torch.zeros(d_in, n_features))  # [d_in, feature]
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.W_dec = nn.Parameter(torch.zeros(n_features, d_in))  # [feature, d_in]
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @torch.no_grad()
    def init_from(self, x: Tensor, seed: int) -> None:
        """Decoder rows random unit vectors, encoder their transpose, ``b_dec`` the data's mean."""
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(self.n_features, self.d_in, generator=g)
        self.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_dec.copy_(x.mean(0))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def encode(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> feature activations [..., n_features], at most k non-zero per token."""
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        v, i = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, i, v)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


class FeatureUnits:
    """A stored SAE's features as the units of the neuron job (``NeuronsConfig.sae``): a feature's
    activation is ``encode(hook_post)``, its direct logit effect ``W_dec[f] @ W_out @ W_U`` (its
    decoder row through the MLP's out projection, as a neuron's is its out-projection row).
    Compared by identity (``sae_id``), not by weights; pickled with its weights (checkpoints, Ray)."""

    def __init__(self, sae_id: int, run_id: int, model: str, layer: int, sae: TopKSAE):
        self.sae_id, self.run_id, self.model, self.layer, self.sae = int(sae_id), int(run_id), model, int(layer), sae

    @property
    def n_features(self) -> int:
        return self.sae.n_features

    def __eq__(self, other) -> bool:
        return isinstance(other, FeatureUnits) and (self.sae_id, self.run_id) == (other.sae_id, other.run_id)

    def __hash__(self) -> int:
        return hash((self.sae_id, self.run_id))

    def __repr__(self) -> str:
        return f"FeatureUnits(sae_id={self.sae_id}, run={self.run_id}, layer={self.layer}, n_features={self.n_features})"

    def check_model(self, model: str, d_mlp: int | None = None) -> None:
        """Refuse another model's SAE (by short name, and MLP width when given), in one line."""
        if self.model != model or (d_mlp is not None and self.sae.d_in != d_mlp):
            raise ValueError(f"SAE run {self.run_id} was trained on {self.model!r}, not on {model!r}; "
                             f"give --model {self.model} or another --sae")

    def params(self) -> dict:
        return {"id": self.sae_id, "run": self.run_id, "layer": self.layer, "n_features": self.n_features, "k": self.sae.k}

    @torch.inference_mode()
    def encode(self, hook_post: Tensor) -> Tensor:
        """[..., d_mlp] (any dtype and device) -> float32 feature activations [..., n_features]."""
        W = self.sae.W_enc
        if W.device != hook_post.device:
            self.sae = self.sae.to(hook_post.device)
        return self.sae.encode(hook_post.float())

    def logit_effects(self, neuron_effects: Tensor) -> Tensor:
        """[d_mlp, vocab] neuron effects (``W_out @ W_U``) -> [n_features, vocab]: ``W_dec @ W_out @ W_U``."""
        return self.sae.W_dec.detach().float().cpu() @ neuron_effects.float().cpu()
