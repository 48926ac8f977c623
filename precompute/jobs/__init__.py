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
    needs_sequences: bool = True


def _neurons() -> JobSpec:
    from ..store.neurons import write_neurons
    from . import neurons

    def make(args):
        layers = tuple(int(x) for x in args.layers.split(",")) if getattr(args, "layers", None) else None
        return neurons.NeuronsConfig(top_k=args.top_k, batch_size=args.batch_size, layers=layers, seed=args.seed)

    return JobSpec("neurons", make, neurons.run, write_neurons, lambda r: {"n_scored": r.n_scored})


# name -> factory (imported lazily so one job's dependencies never slow another's start)
JOBS: dict[str, Callable[[], JobSpec]] = {
    "neurons": _neurons,
}
