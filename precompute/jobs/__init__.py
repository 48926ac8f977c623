"""The precompute jobs. Each is a frozen config dataclass, a ``run()`` and a result dataclass;
``JOBS`` maps the name used on the command line (``--jobs``) to how the CLI builds, runs and
stores it. Every job writes its run row and all its results in one transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class JobSpec:
    name: str
    make_config: Callable[[Any], Any]  # argparse namespace -> config dataclass
    run: Callable[..., Any]  # (lm, seqs, config) -> result
    write: Callable[..., None]  # (session, run_id, result) -> None
    summary: Callable[[Any], dict] = lambda result: {}
    add_args: Callable[[Any], None] | None = None  # extra `precompute run` options (argparse parser)


def _neurons() -> JobSpec:
    from ..store.neurons import write_neurons
    from . import neurons

    def make(args):
        layers = tuple(int(x) for x in args.layers.split(",")) if getattr(args, "layers", None) else None
        return neurons.NeuronsConfig(top_k=args.top_k, batch_size=args.batch_size, layers=layers, seed=args.seed)

    return JobSpec("neurons", make, neurons.run, write_neurons, lambda r: {"n_scored": r.n_scored})


def _embeddings() -> JobSpec:
    def make(args):
        from .embeddings import EmbeddingsConfig

        w = getattr(args, "embed_window", 64)
        return EmbeddingsConfig(window=w, min_tokens=max(1, min(16, w // 4)), batch_size=args.batch_size)

    def run(lm, seqs, cfg):
        from .embeddings import run as run_embeddings

        return run_embeddings(lm, seqs, cfg)

    def write(s, run_id, result):
        from ..store.embeddings_tables import write_embeddings

        write_embeddings(s, run_id, result)

    def add_args(p):
        p.add_argument("--embed-window", type=int, default=64, help="embeddings job: tokens per retrieval window")

    return JobSpec("embeddings", make, run, write, lambda r: {"n_windows": int(len(r.vectors)), "dim": int(r.vectors.shape[1])}, add_args)


# name -> factory (imported lazily so one job's dependencies never slow another's start)
JOBS: dict[str, Callable[[], JobSpec]] = {
    "neurons": _neurons,
    "embeddings": _embeddings,
}
