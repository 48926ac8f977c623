"""Retrieval latency for one prompt and a 10-step test-time fine-tuning sandbox run, on CPU.

    python bench/bench_retrieval.py [--tokens 20000] [--window 32] [--n 8] [--steps 10] [--threads 1]

For stories260K and (when it exists) the bundled model: the embeddings job over ``--tokens``
tokens of valid-head.txt (tokens/s), then for one prompt the median ms (of 5) of embedding the
prompt, nearest-neighbour search, SIFT over the top-200 candidates, and one sandbox run each in
fine-tune mode (``--steps`` Adam steps on the SIFT picks) and in-context mode; every time also
as a ratio to one plain forward pass of the prompt. A last row times exact numpy search over a
synthetic 200k-window corpus (the size where the FAISS backend would take over). One run, one table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import available_models, need_corpus, peak_rss_mb

from precompute.corpus import read_text_corpus
from precompute.jobs.embeddings import EmbeddingsConfig, embed_ids, run
from precompute.models import load_model
from precompute.retrieval.index import VectorIndex
from precompute.retrieval.sift import select
from precompute.sequences import tokenize
from precompute.ttt import SandboxConfig, run_sandbox

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play in the park with her"
CONT = " friends."


def median_ms(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    corpus = read_text_corpus(need_corpus(), max_stories=3000)
    rows = []
    for name, path in available_models().items():
        lm = load_model(str(path))
        seqs = tokenize(lm, corpus, ctx_len=256, max_tokens=args.tokens)
        t = time.perf_counter()
        emb = run(lm, seqs, EmbeddingsConfig(window=args.window, min_tokens=max(1, args.window // 4)))
        t_job = time.perf_counter() - t
        index = VectorIndex(emb.vectors)
        ids = lm.encode(PROMPT)
        x = torch.tensor([ids])
        with torch.inference_mode():
            fwd = median_ms(lambda: lm.model(input_ids=x))
        q = embed_ids(lm, ids, centre=emb.centre)[0]
        t_embed = median_ms(lambda: embed_ids(lm, ids, centre=emb.centre))
        t_nn = median_ms(lambda: select(index, q, args.n, "nn"))
        t_sift = median_ms(lambda: select(index, q, args.n, "sift", m=200))
        sel = select(index, q, args.n, "sift", m=200)
        w = emb.windows
        ex = [[int(t) for t in seqs.ids[w["seq"][r]][w["start"][r] : w["end"][r]]] for r in sel.rows]
        t0 = time.perf_counter()
        res = run_sandbox(lm, PROMPT, CONT, ex, SandboxConfig(steps=args.steps, lr=1e-3))
        t_ft = 1000 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        res_ic = run_sandbox(lm, PROMPT, CONT, ex, SandboxConfig(mode="in_context"))
        t_ic = 1000 * (time.perf_counter() - t0)
        print(f"{name}: {len(emb.vectors)} windows; fine-tune: continuation loss {res.loss_before:.3f} -> "
              f"{res.loss_after:.3f}, loss on picks {res.train_losses[0]:.3f} -> {res.train_losses[-1]:.3f}; "
              f"in-context: continuation loss -> {res_ic.loss_after:.3f}; SIFT variance after {args.n} picks "
              f"{sel.picks[-1].variance:.3f}")
        rows.append((name, "embeddings job", f"{seqs.n_tokens / t_job:,.0f} tok/s", t_job * 1000 / max(1, len(emb.vectors)), None))
        for what, ms in (("forward pass (prompt)", fwd), ("embed prompt", t_embed), (f"nearest neighbours (n={args.n})", t_nn),
                         (f"SIFT (n={args.n}, M=200)", t_sift), ("embed + NN + SIFT", t_embed + t_nn + t_sift),
                         (f"sandbox fine-tune {args.steps} steps", t_ft), ("sandbox in-context", t_ic)):
            rows.append((name, what, f"{ms:,.1f} ms", None, ms / fwd))
        rows.append((name, "peak RSS", f"{peak_rss_mb():,.0f} MB", None, None))
    # exact numpy search at the scale where FAISS would take over
    rng = np.random.default_rng(0)
    big = rng.standard_normal((200_000, 128)).astype(np.float16)
    big_index = VectorIndex(big, backend="numpy")
    qq = rng.standard_normal(128).astype(np.float32)
    ms = median_ms(lambda: big_index.search(qq, 200))
    rows.append(("synthetic 200k x 128", "numpy exact top-200", f"{ms:,.1f} ms", None, None))
    print()
    print(f"{'model':26s} {'what':32s} {'time':>14s} {'x forward':>10s}")
    for name, what, val, _per, ratio in rows:
        print(f"{name:26s} {what:32s} {val:>14s} {'' if ratio is None else f'{ratio:,.1f}':>10s}")


if __name__ == "__main__":
    main()
