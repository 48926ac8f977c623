"""One pass of the model over the corpus for every job: the sweep.

A job is a frozen config, an accumulator and its tables (``JobSpec``). The sweep runs the model
once per batch, captures only what the jobs asked for (``Needs``: MLP neurons of some layers,
attention patterns, the final-norm residual, logits) and hands it to every accumulator::

    acc = spec.accumulator(lm, cfg)      # empty
    acc.update(batch, captured)          # one batch
    acc.merge(other)                     # another accumulator of the same job and config
    chunk = acc.drain()                  # per-token output to write now and forget (or None)
    result = acc.finish(lm, tokens)      # what the job's tables store

The corpus is cut into shards (``sequences.shards``). Every shard is swept by fresh accumulators,
which are then merged into the running total *in shard order*, whether the shard ran here or on
a Ray worker: so one worker and many give the same result, bit for bit, and a resumed run
equals an uninterrupted one. An accumulator may also offer ``next_shard()``: an accumulator for
the next shard that shares the state it can update in place exactly (order-free statistics) and
that ``merge`` recognises; the sweep here uses it so that the state is not held twice.
Accumulators must be picklable (Ray sends them back; checkpoints
pickle them); resources that are not (an n-gram index) are dropped on pickling and reloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch

from .hooks import forward_until, hook_name, hooked
from .models import LoadedModel
from .sequences import Batch, Sequences, batches


@dataclass(frozen=True)
class Needs:
    """What a job reads from each forward pass."""

    mlp_layers: frozenset[int] = frozenset()  # neuron activations (hook_post) of these layers
    attentions: bool = False  # attention patterns of every layer [batch, head, q, k]
    final: bool = False  # the residual stream after the final norm [batch, pos, d_model]
    logits: bool = False  # [batch, pos, vocab]

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(self.mlp_layers | other.mlp_layers, self.attentions or other.attentions,
                     self.final or other.final, self.logits or other.logits)

    @property
    def full_forward(self) -> bool:
        return self.attentions or self.final or self.logits


@dataclass
class Captured:
    """One batch's captured tensors, on the model's device. Read-only for accumulators."""

    mlp: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [batch, pos, d_mlp]
    attentions: tuple[torch.Tensor, ...] | None = None
    final: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class Accumulator(Protocol):
    needs: Needs

    def update(self, batch: Batch, cap: Captured) -> None: ...

    def merge(self, other: "Accumulator") -> None: ...

    def drain(self) -> Any | None: ...

    def finish(self, lm: LoadedModel, tokens: "TokenLookup") -> Any: ...


class TokenLookup(Protocol):
    """Token ids of any sequence of the run, for ``finish`` (example windows, sample contexts)."""

    def tokens(self, seq_idx: int) -> Any: ...


@dataclass(frozen=True)
class JobSpec:
    """How the command line builds, sweeps and stores one job."""

    name: str
    config: Callable[[Any], Any]  # argparse namespace -> frozen config (raises ValueError on bad options)
    accumulator: Callable[[LoadedModel, Any], Accumulator]  # an empty accumulator
    write: Callable[..., None]  # (session, run_id, result): the final rows
    write_chunk: Callable[..., None] | None = None  # (session, run_id, chunk): per-token rows, as the sweep goes
    discard_chunks: Callable[..., None] | None = None  # (session, run_id, first_seq): drop chunk rows of seqs >= first_seq
    summary: Callable[[Any], dict] = lambda result: {}
    sequences: Callable[[Any], Iterable[int] | None] = lambda result: ()  # seq indices the result shows; None: all
    add_args: Callable[[Any], None] | None = None  # extra `precompute run` options
    shows: dict = field(default_factory=dict)  # `precompute show NAME`: NAME -> (add_arguments, handler(args, store))
    prepare: Callable[[LoadedModel, Any, Sequences], Any] | None = None  # (lm, cfg, first shard) -> cfg, before any accumulator
    # a job that sweeps nothing but reads another job's stored run (``accumulator`` is None): the
    # name of that job, and (session, its RunInfo, cfg) -> result; it runs after the sweep
    after: str | None = None
    derive: Callable[[Any, Any, Any], Any] | None = None


def return_freed_memory() -> None:
    """Make glibc give large freed buffers back to the system at once. By default it raises its
    mmap threshold after each large free, so a sweep's per-batch buffers (attention patterns,
    activations) end up on the heap and the process keeps growing for many shards; a fixed 1 MB
    threshold keeps peak memory flat (measured: 1.23 -> 0.75 GB for heads + embeddings)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@torch.inference_mode()
def capture(lm: LoadedModel, ids: torch.Tensor, needs: Needs) -> Captured:
    """Run the model once on ``ids`` [batch, pos] and capture what ``needs`` asks for. When only
    neurons are needed the pass stops after the deepest of their layers."""
    cap = Captured()
    fns = {}
    for layer in sorted(needs.mlp_layers):
        def save(x, layer=layer):
            cap.mlp[layer] = x

        fns[hook_name(layer, "mlp.post")] = save
    stop = None if needs.full_forward or not needs.mlp_layers else max(needs.mlp_layers)
    handle = None
    if needs.final:
        def final_hook(module, args, output):
            cap.final = output[0] if isinstance(output, tuple) else output

        handle = lm.final_norm.register_forward_hook(final_hook)
    try:
        with hooked(lm, fns, stop_after=stop):
            if needs.full_forward:  # the unembedding (the largest matmul) only when logits are needed
                out = (lm.forward if needs.logits else lm.trunk)(ids, output_attentions=needs.attentions)
                cap.logits = out.logits if needs.logits else None
                cap.attentions = tuple(out.attentions) if needs.attentions else None
            elif fns:
                forward_until(lm, ids)
    finally:
        if handle is not None:
            handle.remove()
    return cap


def sweep_shard(lm: LoadedModel, shard: Sequences, accs: list, batch_size: int, progress: Callable[[int], None] | None = None) -> list:
    """Sweep one shard with (fresh) accumulators; returns them."""
    needs = Needs()
    for a in accs:
        needs = needs | a.needs
    for b in batches(shard, batch_size):
        cap = capture(lm, b.ids.to(lm.device), needs)
        for a in accs:
            a.update(b, cap)
        del cap
        if progress is not None:
            progress(sum(b.lengths))
    return accs


def run_jobs(lm: LoadedModel, seqs: Sequences, specs_cfgs: list[tuple[JobSpec, Any]], batch_size: int = 32,
             tokens: TokenLookup | None = None) -> list:
    """Sweep an in-memory ``Sequences`` with the given jobs and return their results (no store,
    one shard: the programmatic API behind each job's ``run``)."""
    accs = [spec.accumulator(lm, cfg) for spec, cfg in specs_cfgs]
    sweep_shard(lm, seqs, accs, batch_size)
    lookup = tokens or SeqsLookup(seqs)
    return [a.finish(lm, lookup) for a in accs]


class SeqsLookup:
    """``TokenLookup`` over an in-memory ``Sequences`` (its indices are global ones)."""

    def __init__(self, seqs: Sequences):
        self.seqs = seqs

    def tokens(self, seq_idx: int):
        return self.seqs.ids[seq_idx - self.seqs.first_seq]
