"""Heads-job throughput against the bare forward pass with ``output_attentions=True`` on the same batches.

    python bench/bench_heads.py [--tokens 10000] [--batch-size 16] [--repeats 2]

For stories260K and (when it exists) the bundled model: tokens/s of the bare forward pass that
returns every layer's attention patterns, tokens/s of the whole heads job (the same forward
passes plus the streamed statistics, the example patterns and the induction test), their ratio
(job / bare, 1.0 = the statistics are free), the same ratio in CPU seconds of this process (steadier on a shared machine), and the process's
peak RSS after each model.
One run, one printed table; about half a minute on a loaded 2-core CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import available_models, need_corpus, peak_rss_mb

from precompute.corpus import read_text_corpus
from precompute.jobs.heads import HeadsConfig, run
from precompute.models import load_model
from precompute.sequences import batches, tokenize


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is less disturbed by other processes."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def bare_forward(lm, seqs, batch_size: int) -> None:
    with torch.inference_mode():
        for b in batches(seqs, batch_size):
            lm.model(input_ids=b.ids, output_attentions=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ctx-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    corpus = read_text_corpus(need_corpus(), max_stories=3000)
    rows = []
    for name, path in available_models().items():
        lm = load_model(str(path))
        seqs = tokenize(lm, corpus, ctx_len=args.ctx_len, max_tokens=args.tokens)
        cfg = HeadsConfig(batch_size=args.batch_size)
        bare_forward(lm, seqs, args.batch_size)  # burn-in
        bare, job = [], []
        for _ in range(args.repeats):  # interleaved, best of each: a busy machine slows both alike
            bare.append(timed(lambda: bare_forward(lm, seqs, args.batch_size)))
            job.append(timed(lambda: run(lm, seqs, cfg)))
        (wb, cb), (wj, cj) = (min(x[0] for x in bare), min(x[1] for x in bare)), (min(x[0] for x in job), min(x[1] for x in job))
        n = seqs.n_tokens
        rows.append((name, n, lm.n_layers * lm.n_heads, n / wb, n / wj, wb / wj, cb / cj, peak_rss_mb()))
    print(f"\nctx_len {args.ctx_len}, batch size {args.batch_size}, {torch.get_num_threads()} torch threads")
    print(f"{'model':26s} {'tokens':>8s} {'heads':>6s} {'bare+attn tok/s':>16s} {'job tok/s':>10s} {'ratio':>6s} {'CPU-time ratio':>14s} {'peak RSS MB':>11s}")
    for r in rows:
        print(f"{r[0]:26s} {r[1]:8,d} {r[2]:6d} {r[3]:16,.0f} {r[4]:10,.0f} {r[5]:6.2f} {r[6]:14.2f} {r[7]:11,.0f}")


if __name__ == "__main__":
    main()
