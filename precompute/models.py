"""Load Hugging Face causal LMs and describe where their parts live.

One adapter per architecture family: a declarative map from our names to module paths.
A *neuron* is one coordinate of the input of the MLP's output projection (TransformerLens'
``hook_post``): for GPT-2 ``mlp.c_proj``, GPT-Neo ``mlp.c_proj``, GPT-NeoX ``mlp.dense_4h_to_h``
and Llama ``mlp.down_proj`` (for gated MLPs this is ``act(gate(x)) * up(x)``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import one_line

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = str(REPO_ROOT / "data" / "models" / "tinystories-4l")


class ModelError(ValueError):
    """A model that cannot be loaded or used; the message is one line for the user."""


@dataclass(frozen=True)
class Adapter:
    """Where one architecture family keeps its modules (paths relative to the HF model)."""

    family: str
    layers: str  # ModuleList of transformer blocks
    mlp_out: str  # in a block: the MLP output projection; its input is the neuron vector
    attn_out: str  # in a block: the attention output projection; its input is the heads' z
    final_norm: str  # norm before the unembedding (embeddings come from HF's get_*_embeddings)
    n_heads_attr: str = "num_attention_heads"


ADAPTERS: dict[str, Adapter] = {
    "GPT2LMHeadModel": Adapter(
        family="gpt2",
        layers="transformer.h",
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        final_norm="transformer.ln_f",
        n_heads_attr="n_head",
    ),
    "GPTNeoForCausalLM": Adapter(
        family="gpt_neo",
        layers="transformer.h",
        mlp_out="mlp.c_proj",
        attn_out="attn.attention.out_proj",
        final_norm="transformer.ln_f",
    ),
    "GPTNeoXForCausalLM": Adapter(
        family="gpt_neox",
        layers="gpt_neox.layers",
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
    ),
    "LlamaForCausalLM": Adapter(
        family="llama",
        layers="model.layers",
        mlp_out="mlp.down_proj",
        attn_out="self_attn.o_proj",
        final_norm="model.norm",
    ),
}


def adapter_for(architecture: str) -> Adapter:
    try:
        return ADAPTERS[architecture]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ModelError(f"unsupported architecture {architecture!r} (supported: {known})") from None


def _weight_in_out(module: nn.Module) -> Tensor:
    """The module's weight as [d_in, d_out] (HF Conv1D stores it that way, Linear transposed)."""
    w = module.weight
    if type(module).__name__ == "Conv1D":
        return w
    return w.T


@dataclass
class LoadedModel:
    """A model, its tokenizer and its adapter, with the shapes every job needs."""

    model_id: str
    model: nn.Module
    tokenizer: object
    adapter: Adapter
    architecture: str
    device: str = "cpu"
    prepend_bos: bool = True
    _display: list[str] | None = field(default=None, repr=False)
    # One model object is shared by every app session (threads): hooks and forward passes hold
    # this lock, so one session's hooks never act on another session's forward pass.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    # -- shapes -----------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_heads(self) -> int:
        return int(getattr(self.config, self.adapter.n_heads_attr))

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def d_mlp(self) -> int:
        return int(self.mlp_out(0).weight.numel() // self.d_model)

    @property
    def vocab_size(self) -> int:
        return int(self.unembed.weight.shape[0])

    @property
    def n_ctx(self) -> int:
        cfg = self.config
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            if getattr(cfg, attr, None):
                return int(getattr(cfg, attr))
        return 2048

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def bos_id(self) -> int | None:
        tok = self.tokenizer
        if tok.bos_token_id is not None:
            return int(tok.bos_token_id)
        if tok.eos_token_id is not None:  # GPT-2 style: <|endoftext|> separates documents
            return int(tok.eos_token_id)
        return None

    # -- modules ----------------------------------------------------------------------------
    @cached_property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.adapter.layers)

    def mlp_out(self, layer: int) -> nn.Module:
        return self.blocks[self.check_layer(layer)].get_submodule(self.adapter.mlp_out)

    def attn_out(self, layer: int) -> nn.Module:
        return self.blocks[self.check_layer(layer)].get_submodule(self.adapter.attn_out)

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.adapter.final_norm)

    def check_layer(self, layer: int) -> int:
        if not 0 <= int(layer) < len(self.blocks):
            raise ModelError(f"layer {layer} out of range: this model has layers 0-{len(self.blocks) - 1}")
        return int(layer)

    def check_neuron(self, layer: int, neuron: int) -> None:
        self.check_layer(layer)
        if not 0 <= int(neuron) < self.d_mlp:
            raise ModelError(f"neuron {neuron} out of range: layer {layer} has neurons 0-{self.d_mlp - 1}")

    def check_head(self, layer: int, head: int) -> None:
        self.check_layer(layer)
        if not 0 <= int(head) < self.n_heads:
            raise ModelError(f"head {head} out of range: layer {layer} has heads 0-{self.n_heads - 1}")

    # -- weights ----------------------------------------------------------------------------
    def w_out(self, layer: int) -> Tensor:
        """Neuron output directions: [d_mlp, d_model]."""
        return _weight_in_out(self.mlp_out(layer)).detach()

    @torch.no_grad()
    def w_u(self) -> Tensor:
        """Unembedding with the final norm's scale folded in (TransformerLens fold_ln): [d_model, d_vocab]."""
        w = _weight_in_out(self.unembed).detach()
        scale = getattr(self.final_norm, "weight", None)
        if scale is not None:
            w = w * scale.detach()[:, None]
        return w

    @torch.no_grad()
    def neuron_logit_effects(self, layer: int) -> Tensor:
        """Direct effect of each neuron on the logits, ``W_out @ W_U`` (final norm scale folded): [d_mlp, d_vocab]."""
        return self.w_out(layer).float() @ self.w_u().float()

    # -- tokens -----------------------------------------------------------------------------
    def encode(self, text: str, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; the BOS id first when ``prepend_bos`` (default: the model's policy)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = self.prepend_bos if prepend_bos is None else prepend_bos
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    @property
    def special_ids(self) -> set[int]:
        return set(int(i) for i in self.tokenizer.all_special_ids)

    def display_vocab(self) -> list[str]:
        """A readable string for every token id; special tokens keep their visible name (``<s>``)."""
        if self._display is None:
            tok = self.tokenizer
            raw = tok.convert_ids_to_tokens(list(range(self.vocab_size)))
            special = self.special_ids
            out = []
            for i, t in enumerate(raw):
                if t is None:
                    out.append(f"<{i}>")
                elif i in special:
                    out.append(t)
                elif t.startswith("<0x") and t.endswith(">") and len(t) == 6:  # sentencepiece byte
                    try:
                        out.append(bytes([int(t[3:5], 16)]).decode("utf-8"))
                    except UnicodeDecodeError:
                        out.append(t)
                elif "▁" in t:  # sentencepiece word boundary
                    out.append(t.replace("▁", " "))
                else:
                    try:
                        out.append(tok.convert_tokens_to_string([t]))
                    except Exception:  # noqa: BLE001 - any tokenizer failure falls back to the raw piece
                        out.append(t)
            self._display = out
        return self._display

    def token_strs(self, ids) -> list[str]:
        vocab = self.display_vocab()
        return [vocab[int(i)] if 0 <= int(i) < len(vocab) else f"<{int(i)}>" for i in ids]

    # -- running ----------------------------------------------------------------------------
    def forward(self, ids: Tensor, **kwargs):
        """The HF forward pass on token ids [batch, pos], holding the model's lock."""
        with self.lock:
            return self.model(input_ids=ids.to(self.device), **kwargs)

    def trunk(self, ids: Tensor, **kwargs):
        """The HF base model (every block and the final norm, no unembedding) on token ids
        [batch, pos], holding the model's lock: for sweeps that need no logits."""
        with self.lock:
            return self.model.base_model(input_ids=ids.to(self.device), **kwargs)

    @torch.inference_mode()
    def logits(self, ids: Tensor) -> Tensor:
        """Logits for a batch of token ids [batch, pos] -> [batch, pos, d_vocab]."""
        return self.forward(ids).logits


def _resolve_model_id(model_id: str) -> str:
    if model_id in ("default", "bundled", ""):
        return DEFAULT_MODEL
    return model_id


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub endpoint does not answer a TCP connect."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_architecture(model_id: str) -> str:
    path = Path(model_id)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ModelError(f"{model_id}: folder has no config.json, not a Hugging Face model")
        archs = json.loads(cfg_file.read_text()).get("architectures") or []
        if not archs:
            raise ModelError(f"{model_id}: config.json names no architecture")
        return archs[0]
    if path.suffix or model_id.startswith((".", "/")):
        raise ModelError(f"model {model_id!r} not found: no such folder")
    from transformers import AutoConfig

    if not _hub_reachable():
        raise ModelError(f"model {model_id!r} is not a local folder, and the Hugging Face hub cannot be reached (offline?)")
    try:
        cfg = AutoConfig.from_pretrained(model_id)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, bad config: all one line for the user
        raise ModelError(f"model {model_id!r} could not be loaded (not a local folder; hub: {one_line(e, 160)})") from None
    archs = getattr(cfg, "architectures", None) or []
    if not archs:
        raise ModelError(f"model {model_id!r}: config names no architecture")
    return archs[0]


def load_model(model_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM from a local folder or hub id, with eager attention so patterns can be read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id = _resolve_model_id(str(model_id))
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but no CUDA GPU is available here")
    architecture = _read_architecture(model_id)
    adapter = adapter_for(architecture)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, attn_implementation="eager", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model {model_id!r} could not be loaded: {one_line(e)}") from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        model_id=model_id,
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        architecture=architecture,
        device=device,
    )


def model_name(model_id: str) -> str:
    """Short display name: the folder name or hub id."""
    model_id = _resolve_model_id(model_id)
    p = Path(model_id)
    return p.name if p.is_dir() else model_id
