"""Explanation job (``job.py``: candidates and their scores; ``tables.py``: rows, reader and the
pages' queries) and its ``JOB`` spec: it sweeps nothing, it reads a complete neuron run, so
`precompute run --jobs neurons,explanations` makes both and `--jobs explanations` explains the
newest neuron run already stored."""

from __future__ import annotations

from ...sweep import JobSpec
from .job import Explanation, ExplanationsConfig, ExplanationsResult, NeuronData, explain
from .tables import SHOW_EXPLANATIONS, read_neurons, write_explanations


def _config(args) -> ExplanationsConfig:
    return ExplanationsConfig(top_pct=getattr(args, "explain_top", 20), n_keep=getattr(args, "explanations", 5))


def _add_args(p) -> None:
    p.add_argument("--explain-top", type=int, default=20,
                   help="explanations job: percent of the activation range counted as 'top' (5, 10, 20, 30 or 50)")
    p.add_argument("--explanations", type=int, default=5, help="explanations job: how many to keep per neuron")


def _derive(s, source, cfg: ExplanationsConfig) -> ExplanationsResult:
    from ...store.queries import get_model, vocab

    info = get_model(s, source.model)
    neurons = read_neurons(s, source.id)
    res = explain(neurons, vocab(s, source.model), set(info.special_ids), info.bos_id if source.prepend_bos else None,
                  cfg, source.id)
    res.sae_id = (source.params.get("sae") or {}).get("id")  # a feature run's SAE
    return res


def _summary(r: ExplanationsResult) -> dict:
    best = {}
    for e in r.explanations:
        if e.rank == 0:
            best[(e.layer, e.neuron)] = e.score
    return {"n_neurons": r.n_neurons, "n_explained": len(best), "mean_best_score": round(sum(best.values()) / max(len(best), 1), 4),
            "seconds": round(r.seconds, 2)}


JOB = JobSpec(
    name="explanations",
    config=_config,
    accumulator=None,
    write=write_explanations,
    summary=_summary,
    add_args=_add_args,
    shows={"explanations": SHOW_EXPLANATIONS},
    after="neurons",
    derive=_derive,
)

__all__ = ["JOB", "Explanation", "ExplanationsConfig", "ExplanationsResult", "NeuronData", "explain"]
