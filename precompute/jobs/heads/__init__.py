"""Heads job: what every attention head attends to (``job.py``), its tables and pages' queries
(``tables.py``), and ``JOB``, how `precompute run` builds, sweeps and stores it."""

from __future__ import annotations

from ...sweep import JobSpec
from .job import (
    LABEL_THRESHOLDS,
    HeadExample,
    HeadsAccumulator,
    HeadsConfig,
    HeadsResult,
    LayerHeads,
    example_sequences,
    head_pattern,
    induction_scores,
    induction_tokens,
    label_for,
    run,
)
from .tables import SHOW_HEAD, SHOW_HEADS, write_heads

__all__ = [
    "JOB", "LABEL_THRESHOLDS", "HeadExample", "HeadsAccumulator", "HeadsConfig", "HeadsResult", "LayerHeads",
    "example_sequences", "head_pattern", "induction_scores", "induction_tokens", "label_for", "run",
]


def _config(args) -> HeadsConfig:
    layers = tuple(int(x) for x in args.layers.split(",")) if getattr(args, "layers", None) else None
    return HeadsConfig(
        batch_size=args.batch_size, n_examples=getattr(args, "head_examples", 3),
        induction_len=getattr(args, "induction_len", 50), layers=layers, seed=getattr(args, "seed", 0),
        max_len=getattr(args, "ctx_len", None),  # capped by the model's context in the accumulator
    )


def _add_args(p) -> None:
    p.add_argument("--head-examples", type=int, default=3, help="heads job: example patterns stored per head")
    p.add_argument("--induction-len", type=int, default=50, help="heads job: random tokens per half of the induction test")


def _summary(r: HeadsResult) -> dict:
    return {"n_queries": r.n_queries, "n_dup_queries": r.n_dup_queries, "induction_len": r.induction_len}


JOB = JobSpec(
    name="heads",
    config=_config,
    accumulator=HeadsAccumulator,
    write=write_heads,
    summary=_summary,
    sequences=example_sequences,
    add_args=_add_args,
    shows={"head": SHOW_HEAD, "heads": SHOW_HEADS},
)
