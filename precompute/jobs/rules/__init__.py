"""Rules job: every prediction's closest n-gram rule (``job.py``), its tables and pages' queries
(``tables.py``), and ``JOB``, how `precompute run` builds, sweeps and stores it."""

from __future__ import annotations

from pathlib import Path

from ...sweep import JobSpec
from .job import (
    RulesAccumulator,
    RulesChunk,
    RulesConfig,
    RulesResult,
    aggregates,
    load_index,
    match_prompt,
    model_probs,
    probs_of,
    run,
    summary,
)
from .tables import SHOW_RULES, discard_rule_sequences, write_rule_sequences, write_rules

__all__ = [
    "JOB", "RulesAccumulator", "RulesChunk", "RulesConfig", "RulesResult", "aggregates", "load_index",
    "match_prompt", "model_probs", "probs_of", "run", "summary",
]


def _config(args) -> RulesConfig:
    ngram_corpus = getattr(args, "ngram_corpus", None) or ""
    if ngram_corpus and not ngram_corpus.startswith("hf:") and Path(ngram_corpus).is_file():
        ngram_corpus = str(Path(ngram_corpus).resolve())  # stored absolute: the story page reopens it
    return RulesConfig(
        ngram_corpus=ngram_corpus, rule_set=getattr(args, "rule_set", "subgram"),
        distance=getattr(args, "distance", "variational"), split=getattr(args, "ngram_split", "auto"), batch_size=args.batch_size,
    )


def _add_args(p) -> None:
    p.add_argument("--ngram-corpus", default=None,
                   help="rules job (required): the model's training text for the n-gram index, e.g. train-1097.txt for stories260K")
    p.add_argument("--rule-set", default="subgram", choices=["subgram", "all", "suffix"],
                   help="rules job: R_subgram (127 rules, on-disk suffix array, any corpus size), R_all (609, with marginalised "
                        "tokens; in-memory tables, at most 4M training tokens) or R_suffix (7 n-grams)")
    p.add_argument("--ngram-split", default="auto", choices=["auto", "story", "paragraph"],
                   help="rules job: count rules in whole training stories or in paragraphs; auto: what the model card "
                        "says, else whole stories")
    p.add_argument("--distance", default="variational", choices=["variational", "linf"],
                   help="rules job: distance between the model and a rule")


JOB = JobSpec(
    name="rules",
    config=_config,
    accumulator=RulesAccumulator,
    write=write_rules,
    write_chunk=write_rule_sequences,
    discard_chunks=discard_rule_sequences,
    summary=summary,
    sequences=lambda result: None,  # the rules pages list and open every sequence
    add_args=_add_args,
    shows={"rules": SHOW_RULES},
)
