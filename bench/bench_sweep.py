"""The one-pass sweep at corpus scale: throughput against the bare forward pass, peak memory
against corpus size, and Ray workers against one process.

    python bench/bench_sweep.py throughput [--tokens 50000] [--as-cli]
    python bench/bench_sweep.py memory [--sizes 100000,1000000,10000000]
    python bench/bench_sweep.py ray [--tokens 400000] [--workers 2]
    python bench/bench_sweep.py gpt2 [--tokens 20000]

throughput: per model, the full sweep (neurons + heads + embeddings) and neurons alone, against
    the bare forward pass (``lm.model(input_ids)``) on the same batches; bare and sweep alternate
    for ``--rounds`` rounds and the ratio is the median of the rounds'. ``--as-cli`` first sets
    glibc's allocator as ``precompute run`` does (``sweep.return_freed_memory``: every buffer of
    1 MB or more is fresh, zeroed memory), for both.
memory: ``precompute run --jobs neurons,heads,embeddings --max-tokens N`` on the bundled model,
    each size in a fresh process, over a corpus made by repeating the shared training text
    (train-5511-lowercase.txt) in a new random order each time (``make_corpus``), so 10M tokens
    of real TinyStories text exist; peak RSS from the kernel (wait4).
gpt2: peak memory of the neuron job on a model of GPT-2 small's shapes with random weights
    (the target: within 8 GB).
ray: the same run in one process, on a local Ray cluster of ``--workers`` workers with a share of
    the cores each (one torch thread on 2 cores), and with as many threads each as this process
    (bit-identical results): wall-clock throughput, and which stored tables differ, if any.

Run with nothing else on the machine: timings of shared cores are meaningless.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_neurons import bare_forward
from common import ROOT, SHARED, available_models, need_corpus

from precompute.corpus import read_text_corpus
from precompute.models import load_model
from precompute.sequences import tokenize
from precompute.sweep import SeqsLookup, sweep_shard

TRAIN = SHARED / "corpora" / "tinystories" / "train-5511-lowercase.txt"
BUNDLED = ROOT / "data" / "models" / "tinystories-4l"


def sweep_time(lm, seqs, jobs: list[str], batch_size: int) -> float:
    from precompute.jobs import JOBS

    args = argparse.Namespace(top_k=20, batch_size=batch_size, layers=None, seed=0, ctx_len=256, head_examples=3,
                              induction_len=50, embed_window=64)
    t = time.perf_counter()
    accs = [JOBS[j]().accumulator(lm, JOBS[j]().config(args)) for j in jobs]
    sweep_shard(lm, seqs, accs, batch_size)
    for a in accs:
        a.drain()
        a.finish(lm, SeqsLookup(seqs))
    return time.perf_counter() - t


def throughput(args) -> None:
    if args.as_cli:
        from precompute.sweep import return_freed_memory

        return_freed_memory()
    corpus = read_text_corpus(need_corpus())
    print(f"\n{'model':26s} {'tokens':>8s} {'bare tok/s':>11s} {'what':>26s} {'tok/s':>9s} {'ratio':>6s}")
    for name, path in available_models().items():
        lm = load_model(str(path))
        seqs = tokenize(lm, corpus, ctx_len=256, max_tokens=args.tokens)
        bare_forward(lm, seqs, args.batch_size)  # burn-in
        sweep_time(lm, tokenize(lm, corpus, ctx_len=256, max_tokens=2000), ["neurons", "heads", "embeddings"], args.batch_size)
        for jobs in (["neurons", "heads", "embeddings"], ["neurons"]):
            bare, job = [], []
            for _ in range(args.rounds):
                bare.append(bare_forward(lm, seqs, args.batch_size))
                job.append(sweep_time(lm, seqs, jobs, args.batch_size))
            ratio = statistics.median(b / j for b, j in zip(bare, job))
            n = seqs.n_tokens
            print(f"{name:26s} {n:8,d} {n / statistics.median(bare):11,.0f} {'+'.join(jobs):>26s} "
                  f"{n / statistics.median(job):9,.0f} {ratio:6.2f}", flush=True)


def make_corpus(tokens: int, folder: Path) -> Path:
    """At least ``tokens`` tokens of TinyStories text (bundled tokenizer: about 4.1 characters a
    token): the training excerpt repeated, each copy in a new random order (seeded)."""
    if not TRAIN.exists():
        sys.exit(f"{TRAIN} is absent")
    path = folder / f"corpus-{tokens}.txt"
    if path.exists():
        return path
    stories = read_text_corpus(TRAIN).stories
    need_chars = tokens * 4.6
    rng = random.Random(0)
    written = 0
    with open(path, "w") as f:
        while written < need_chars:
            order = list(stories)
            rng.shuffle(order)
            for s in order:
                f.write(s.replace("\n", " ") + "\n")
                written += len(s) + 1
    return path


def _run_cli(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stderr) of one `precompute` process."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "precompute.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"precompute failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024, err


def memory(args) -> None:
    folder = Path(args.work or tempfile.mkdtemp(prefix="tinyscope-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.sizes.split(",")]
    corpus = make_corpus(max(sizes), folder)
    print(f"corpus: {corpus} ({corpus.stat().st_size / 2**20:.0f} MB)")
    print(f"\n{'tokens':>11s} {'seconds':>8s} {'tok/s':>8s} {'peak RSS MB':>12s}")
    for n in sizes:
        db = folder / f"mem-{n}.db"
        db.unlink(missing_ok=True)
        sec, rss, _ = _run_cli(["run", "--model", str(BUNDLED), "--corpus", str(corpus), "--db", f"sqlite:///{db}",
                                "--jobs", args.jobs, "--max-tokens", str(n), "--separator", "newline"])
        print(f"{n:11,d} {sec:8.0f} {n / sec:8,.0f} {rss:12,.0f}", flush=True)
        db.unlink(missing_ok=True)


def ray_compare(args) -> None:
    folder = Path(tempfile.mkdtemp(prefix="tinyscope-ray-"))
    corpus = make_corpus(args.tokens, folder)
    common = ["run", "--model", str(BUNDLED), "--corpus", str(corpus), "--jobs", args.jobs, "--max-tokens", str(args.tokens),
              "--separator", "newline", "--shard-tokens", str(args.shard_tokens)]
    threads = torch.get_num_threads()
    ray = ["--workers", str(args.workers)]
    configs = (("one process", [], {}),
               (f"Ray, {args.workers} workers", ray, {}),  # a share of the cores each (ray_sweep.worker_threads)
               (f"Ray, {args.workers} x {threads} threads", ray, {"TINYSCOPE_WORKER_THREADS": str(threads)}))
    sys.path.insert(0, str(ROOT / "tests"))
    from test_runs import _contents

    print(f"\n{'how':>24s} {'seconds':>8s} {'tok/s':>8s} {'vs one':>7s}  results vs one process")
    base = None
    for i, (how, extra, env) in enumerate(configs):
        db = folder / f"run{i}.db"
        sec, _, _ = _run_cli(common + ["--db", f"sqlite:///{db}", *extra], env)
        got = _contents(f"sqlite:///{db}")
        if base is None:
            base, base_sec, same = got, sec, ""
        elif got == base:
            same = "bit-identical"
        else:
            same = "differ: " + ", ".join(sorted(k for k in base if base[k] != got.get(k)))
        print(f"{how:>24s} {sec:8.1f} {args.tokens / sec:8,.0f} {base_sec / sec:7.2f}  {same}", flush=True)


def gpt2_memory(args) -> None:
    """The neuron job on a model of GPT-2 small's shapes (``GPT2Config()``: 12 layers, 3,072 neurons
    a layer, vocabulary 50,257) with random weights, which no network is needed for: its memory
    depends on the shapes, not the weights. The bundled tokenizer feeds it (ids < 2,048). Two shards,
    so a later shard's own token sums are counted too."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(args.work or tempfile.mkdtemp(prefix="tinyscope-gpt2s-"))
    model = folder / "gpt2-small-shaped"
    if not (model / "config.json").exists():
        GPT2LMHeadModel(GPT2Config()).save_pretrained(model)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(BUNDLED / f, model / f)
    db = folder / "gpt2.db"
    db.unlink(missing_ok=True)
    sec, rss, _ = _run_cli(["run", "--model", str(model), "--corpus", str(need_corpus()), "--db", f"sqlite:///{db}",
                              "--jobs", "neurons", "--max-tokens", str(args.tokens), "--shard-tokens", str(args.tokens // 2),
                              "--batch-size", str(args.batch_size)])
    print(f"GPT-2 small shapes, neuron job, {args.tokens:,} tokens in 2 shards, batch {args.batch_size}: "
          f"{sec:.0f} s, peak RSS {rss:,.0f} MB (target: 8 GB)")
    db.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["throughput", "memory", "ray", "gpt2"])
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--jobs", default="neurons,heads,embeddings")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-tokens", type=int, default=100_000)
    ap.add_argument("--as-cli", action="store_true", help="throughput: the allocator settings of precompute run")
    ap.add_argument("--work", default=None, help="folder for the generated corpus and databases")
    args = ap.parse_args()
    torch.manual_seed(0)
    {"throughput": throughput, "memory": memory, "ray": ray_compare, "gpt2": gpt2_memory}[args.what](args)


if __name__ == "__main__":
    main()
