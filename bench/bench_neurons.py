"""Neuron-job throughput against the bare forward pass of the same model on the same batches.

    python bench/bench_neurons.py [--tokens 50000]

Prints tokens/s for both and their ratio (target >= 0.6 on CPU), and peak memory.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import available_models, need_corpus, peak_rss_mb

from precompute.corpus import read_text_corpus
from precompute.jobs.neurons import NeuronsConfig, run
from precompute.models import load_model
from precompute.sequences import batches, tokenize


def bare_forward(lm, seqs, batch_size: int) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches(seqs, batch_size):
            lm.model(input_ids=b.ids)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    corpus = read_text_corpus(need_corpus())
    rows = []
    for name, path in available_models().items():
        lm = load_model(str(path))
        seqs = tokenize(lm, corpus, ctx_len=256, max_tokens=args.tokens)
        cfg = NeuronsConfig(batch_size=args.batch_size)
        bare_forward(lm, seqs, args.batch_size)  # burn-in
        t_bare = min(bare_forward(lm, seqs, args.batch_size) for _ in range(2))
        t = time.perf_counter()
        run(lm, seqs, cfg)
        t_job = time.perf_counter() - t
        n = seqs.n_tokens
        rows.append((name, n, lm.n_layers * lm.d_mlp, n / t_bare, n / t_job, t_bare / t_job, peak_rss_mb()))
    print(f"\n{'model':26s} {'tokens':>8s} {'neurons':>8s} {'bare tok/s':>11s} {'job tok/s':>10s} {'ratio':>6s} {'peak RSS MB':>11s}")
    for r in rows:
        print(f"{r[0]:26s} {r[1]:8,d} {r[2]:8,d} {r[3]:11,.0f} {r[4]:10,.0f} {r[5]:6.2f} {r[6]:11,.0f}")


if __name__ == "__main__":
    main()
