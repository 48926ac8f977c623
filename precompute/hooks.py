"""Hooks that exist only inside a context manager.

Hook names follow TransformerLens and are built by one function::

    hook_name(3, "mlp.post") == "blocks.3.mlp.hook_post"   # neuron activations [batch, pos, d_mlp]
    hook_name(3, "attn.z")   == "blocks.3.attn.hook_z"     # per-head outputs  [batch, pos, head, d_head]

A hook function receives the activation and may return a replacement (for interventions) or
None (to only read it). Attention *patterns* are read with ``output_attentions=True`` on the
eager attention implementation (see ``run_with_patterns``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor

from .models import LoadedModel

HookPoint = Literal["mlp.post", "attn.z"]
HOOK_POINTS: dict[HookPoint, str] = {"mlp.post": "mlp.hook_post", "attn.z": "attn.hook_z"}
HookFn = Callable[[Tensor], Tensor | None]


def hook_name(layer: int, point: HookPoint) -> str:
    return f"blocks.{int(layer)}.{HOOK_POINTS[point]}"


def parse_hook_name(name: str) -> tuple[int, HookPoint]:
    for point, suffix in HOOK_POINTS.items():
        prefix = "blocks."
        if name.startswith(prefix) and name.endswith("." + suffix):
            return int(name[len(prefix) : -len(suffix) - 1]), point
    raise KeyError(f"unknown hook name {name!r}")


class StopForward(Exception):
    """Raised by a hook to end the forward pass once the deepest needed layer has run."""


@contextmanager
def hooked(lm: LoadedModel, fns: dict[str, HookFn], stop_after: int | None = None) -> Iterator[None]:
    """Register ``fns`` (hook name -> fn) on ``lm`` for the duration of the block.

    ``stop_after``: raise StopForward after this layer's MLP output projection has its input,
    so no later layer runs; wrap the forward call in ``forward_until`` to swallow it.
    """
    handles = []
    n_heads = lm.n_heads
    lm.lock.acquire()  # released in finally: hooks live only while this thread holds the model

    def mlp_pre(fn):
        def hook(module, args):
            out = fn(args[0])
            if out is not None:
                return (out,) + tuple(args[1:])
            return None

        return hook

    def attn_pre(fn):
        def hook(module, args):
            x = args[0]
            z = x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
            out = fn(z)
            if out is not None:
                return (out.reshape(x.shape),) + tuple(args[1:])
            return None

        return hook

    try:
        for name, fn in fns.items():
            layer, point = parse_hook_name(name)
            if point == "mlp.post":
                module = lm.mlp_out(layer)
                handles.append(module.register_forward_pre_hook(mlp_pre(fn)))
            else:
                module = lm.attn_out(layer)
                handles.append(module.register_forward_pre_hook(attn_pre(fn)))
        if stop_after is not None:

            def stop(module, args):
                raise StopForward

            # a pre-hook registered after the others: it fires once they have the input, and the
            # projection itself never runs
            handles.append(lm.mlp_out(stop_after).register_forward_pre_hook(stop))
        yield
    finally:
        for h in handles:
            h.remove()
        lm.lock.release()


def forward_until(lm: LoadedModel, ids: Tensor, **kwargs):
    """Run the model; returns its output, or None when a hook stopped it early."""
    try:
        return lm.forward(ids, **kwargs)
    except StopForward:
        return None


@torch.inference_mode()
def neuron_acts(lm: LoadedModel, ids: Tensor, layers: list[int] | None = None) -> dict[int, Tensor]:
    """Neuron activations per layer for ids [batch, pos]: {layer: [batch, pos, d_mlp]}."""
    layers = list(range(lm.n_layers)) if layers is None else [lm.check_layer(l) for l in layers]
    cache: dict[int, Tensor] = {}

    def save(layer):
        def fn(x):
            cache[layer] = x.detach()

        return fn

    with hooked(lm, {hook_name(l, "mlp.post"): save(l) for l in layers}, stop_after=max(layers)):
        forward_until(lm, ids)
    return cache


@torch.inference_mode()
def run_with_patterns(lm: LoadedModel, ids: Tensor):
    """Logits [batch, pos, vocab] and attention patterns {layer: [batch, head, q_pos, k_pos]}."""
    out = lm.forward(ids, output_attentions=True)
    return out.logits, {i: a for i, a in enumerate(out.attentions)}
