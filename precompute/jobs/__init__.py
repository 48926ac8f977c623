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


def _heads() -> JobSpec:
    def make(args):
        from .heads import HeadsConfig

        layers = tuple(int(x) for x in args.layers.split(",")) if getattr(args, "layers", None) else None
        return HeadsConfig(
            batch_size=args.batch_size, n_examples=getattr(args, "head_examples", 3),
            induction_len=getattr(args, "induction_len", 50), layers=layers, seed=args.seed,
        )

    def run(lm, seqs, cfg):
        from .heads import run as run_heads

        return run_heads(lm, seqs, cfg)

    def write(s, run_id, result):
        from ..store.heads_tables import write_heads

        write_heads(s, run_id, result)

    def add_args(p):
        p.add_argument("--head-examples", type=int, default=3, help="heads job: example patterns stored per head")
        p.add_argument("--induction-len", type=int, default=50, help="heads job: random tokens per half of the induction test")

    def summary(r):
        return {"n_queries": r.n_queries, "n_dup_queries": r.n_dup_queries, "induction_len": r.induction_len}

    return JobSpec("heads", make, run, write, summary, add_args)


def _rules() -> JobSpec:
    def make(args):
        from .rules import RulesConfig

        return RulesConfig(
            ngram_corpus=getattr(args, "ngram_corpus", None) or "", rule_set=getattr(args, "rule_set", "subgram"),
            distance=getattr(args, "distance", "variational"), batch_size=args.batch_size,
        )

    def run(lm, seqs, cfg):
        from .rules import run as run_rules

        return run_rules(lm, seqs, cfg)

    def write(s, run_id, result):
        from ..store.rules_tables import write_rules

        write_rules(s, run_id, result)

    def summary(r):
        from .rules import summary as rules_summary

        return rules_summary(r)

    def add_args(p):
        p.add_argument("--ngram-corpus", default=None,
                       help="rules job (required): the model's training text for the n-gram index, e.g. train-1097.txt for stories260K")
        p.add_argument("--rule-set", default="subgram", choices=["subgram", "all", "suffix"],
                       help="rules job: R_subgram (127 rules), R_all (609, with marginalised tokens) or R_suffix (7 n-grams)")
        p.add_argument("--distance", default="variational", choices=["variational", "linf"],
                       help="rules job: distance between the model and a rule")

    return JobSpec("rules", make, run, write, summary, add_args)


# name -> factory (imported lazily so one job's dependencies never slow another's start)
JOBS: dict[str, Callable[[], JobSpec]] = {
    "neurons": _neurons,
    "embeddings": _embeddings,
    "heads": _heads,
    "rules": _rules,
}
