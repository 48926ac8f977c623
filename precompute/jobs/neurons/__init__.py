"""The neuron job (``job.py``: config, accumulator, result; ``scan.py``: its compiled kernels;
``tables.py``: rows, writer and the neuron-page queries) and its ``JOB`` spec."""

from ...sweep import JobSpec
from .job import (ExampleTable, Example, LayerNeurons, NeuronsAccumulator, NeuronsConfig, NeuronsResult, prepare,
                  run)
from . import tables
from .tables import SHOW_NEURON


def _config(args) -> NeuronsConfig:
    layers = getattr(args, "layers", None)
    return NeuronsConfig(
        top_k=getattr(args, "top_k", 20),
        batch_size=getattr(args, "batch_size", 32),
        layers=tuple(int(x) for x in str(layers).split(",") if x.strip()) if layers else None,
        seed=getattr(args, "seed", 0),
    )


def _write(s, run_id: int, result: NeuronsResult) -> None:
    tables.write_neurons(s, run_id, result)  # looked up at call time (tests replace it)


def _summary(r: NeuronsResult) -> dict:
    """The run's summary; ``top_tokens_among`` when top tokens were ranked among the tracked ones."""
    out = {"n_scored": r.n_scored}
    if r.top_tokens_among is not None:
        out["top_tokens_among"] = r.top_tokens_among
    return out


def _sequences(result: NeuronsResult) -> list[int]:
    """Sequences the stored top and bottom examples show (spectrum samples carry their own context)."""
    seqs = {int(s) for L in result.layers for t in (L.examples, L.bottom) for s in t.seq}
    return sorted(seqs)


JOB = JobSpec(
    name="neurons",
    config=_config,
    accumulator=lambda lm, cfg: NeuronsAccumulator(lm, cfg),
    write=_write,
    summary=_summary,
    sequences=_sequences,
    add_args=None,
    prepare=prepare,
    shows={"neuron": SHOW_NEURON},
)

__all__ = ["JOB", "Example", "ExampleTable", "LayerNeurons", "NeuronsAccumulator", "NeuronsConfig", "NeuronsResult",
           "prepare", "run"]
