"""Neuron-job throughput against the bare forward pass of the same model on the same batches.

    python bench/bench_neurons.py [--tokens 50000] [--backend auto|numba|torch]

The job is the whole streaming sweep (``run``: forward passes stopped after the deepest layer,
the per-batch update, and ``finish`` with its spectrum contexts and logit effects). Prints
tokens/s for both and their ratio (target >= 0.75 on CPU), peak memory, and the time of the
first call in a process (a job on 8 sequences), which loads the compiled kernels from numba's
on-disk cache (or compiles them, about 30 s, the first time after an install or a code change).
Bare forward and job alternate for ``--rounds`` rounds; the ratio is the median of the rounds'.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

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


def timed(f, *args) -> float:
    t = time.perf_counter()
    f(*args)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="auto", choices=["auto", "numba", "torch"])
    ap.add_argument("--models", default=None, help="comma-separated subset of the models (default: all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    corpus = read_text_corpus(need_corpus())
    rows = []
    for name, path in available_models(args.models).items():
        lm = load_model(str(path))
        seqs = tokenize(lm, corpus, ctx_len=256, max_tokens=args.tokens)
        cfg = NeuronsConfig(batch_size=args.batch_size, backend=args.backend)
        bare_forward(lm, seqs, args.batch_size)  # burn-in
        t = time.perf_counter()
        head = replace(seqs, ids=seqs.ids[:8], story_ids=seqs.story_ids[:8], offsets=seqs.offsets[:8])
        run(lm, head, cfg)  # burn-in: loads the compiled kernels (numba's on-disk cache)
        t_start = time.perf_counter() - t
        # bare and job alternate, so a slow spell of the machine hits both; medians over rounds
        bare, job = [], []
        for _ in range(args.rounds):
            bare.append(bare_forward(lm, seqs, args.batch_size))
            job.append(timed(run, lm, seqs, cfg))
        t_bare, t_job = statistics.median(bare), statistics.median(job)
        ratio = statistics.median(b / j for b, j in zip(bare, job))
        n = seqs.n_tokens
        rows.append((name, n, lm.n_layers * lm.d_mlp, n / t_bare, n / t_job, ratio, peak_rss_mb(), t_start))
    print(f"\n{'model':26s} {'tokens':>8s} {'neurons':>8s} {'bare tok/s':>11s} {'job tok/s':>10s} {'ratio':>6s} {'peak RSS MB':>11s} {'first call s':>12s}")
    for r in rows:
        print(f"{r[0]:26s} {r[1]:8,d} {r[2]:8,d} {r[3]:11,.0f} {r[4]:10,.0f} {r[5]:6.2f} {r[6]:11,.0f} {r[7]:12.2f}")


if __name__ == "__main__":
    main()
