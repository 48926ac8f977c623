"""Explanation job time against the neuron job's, same model, same 50,000 tokens.

    python bench/bench_explanations.py [--tokens 50000] [--rounds 3] [--models bundled]

The neuron job is its whole streaming sweep (``run``: forward passes, per-batch update, finish);
the explanation job is reading the neuron run's rows back from SQLite plus ``explain`` (every
candidate of every neuron scored). The neuron run is written once with `precompute run`; then the
two alternate for ``--rounds`` rounds (a slow spell of the shared machine hits both) and the
ratio is the median of the rounds' (target <= 0.5).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import available_models, need_corpus

from precompute.cli import main as cli
from precompute.corpus import read_text_corpus
from precompute.jobs.explanations import explain, read_neurons
from precompute.jobs.neurons import NeuronsConfig, run
from precompute.models import load_model
from precompute.sequences import tokenize
from precompute.store.db import open_store
from precompute.store.queries import get_model, latest_run, vocab


def explain_from_db(url: str, model: str):
    with open_store(url, create=False).session() as s:
        r = latest_run(s, model, "neurons")
        info = get_model(s, model)
        neurons = read_neurons(s, r.id)
        voc = vocab(s, model)
    return explain(neurons, voc, set(info.special_ids), info.bos_id, source_run=r.id)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default=None, help="comma-separated subset of the models (default: all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    corpus_path = need_corpus()
    corpus = read_text_corpus(corpus_path)
    rows = []
    for name, path in available_models(args.models).items():
        lm = load_model(str(path))
        seqs = tokenize(lm, corpus, ctx_len=256, max_tokens=args.tokens)
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            assert cli(["run", "--model", str(path), "--corpus", str(corpus_path), "--db", url, "--jobs", "neurons",
                        "--max-tokens", str(args.tokens)]) == 0
            model = path.name
            neu, exp = [], []
            for _ in range(args.rounds):
                t = time.perf_counter()
                run(lm, seqs, NeuronsConfig())
                neu.append(time.perf_counter() - t)
                t = time.perf_counter()
                res = explain_from_db(url, model)
                exp.append(time.perf_counter() - t)
        ratio = statistics.median(e / n for e, n in zip(exp, neu))
        rows.append((name, seqs.n_tokens, res.n_neurons, statistics.median(neu), statistics.median(exp), ratio,
                     len(res.explanations)))
    print(f"\n{'model':26s} {'tokens':>8s} {'neurons':>8s} {'neuron job s':>12s} {'explain s':>10s} {'ratio':>6s} {'stored':>7s}")
    for r in rows:
        print(f"{r[0]:26s} {r[1]:8,d} {r[2]:8,d} {r[3]:12.2f} {r[4]:10.2f} {r[5]:6.2f} {r[6]:7,d}")


if __name__ == "__main__":
    main()
