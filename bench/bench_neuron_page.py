"""How fast the neuron page gets its data, and how fast "test this neuron" runs (CPU).

    python bench/bench_neuron_page.py                 # builds a temporary database first
    python bench/bench_neuron_page.py --db sqlite:///data/tinyscope.db --neurons 50

The database holds a neuron run of every model found (stories260K from ../shared and the
bundled data/models/tinystories-4l when it exists; a model is never entered twice under two
names). Page data = ``neuron_page`` + ``layer_neurons`` for the neuron's layer, in a fresh
session, uncached (the app caches them with st.cache_data, so a revisit costs nothing); the
median is over ``--neurons`` random neurons per model. Live = ``app.live.neuron_on_text`` on a
128-token prompt, median of 10 after one warm-up. Targets: page <= 50 ms, live <= 300 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import available_models, need_corpus  # noqa: E402

PROMPT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "dog, Max. One day, Lily saw a big red ball under a tree. She ran to get it, but a bird flew down and "
    "took it away. Lily was sad, but Max barked and chased the bird. The bird dropped the ball and Lily "
    "laughed. They played all day until the sun went down, and then they walked home together, happy and "
    "tired. Her mom made them a warm dinner and read a story about a brave little fox who found a shiny "
    "key in the forest and opened a secret door to a garden full of flowers and singing frogs."
)


def build(db: str, models: dict[str, Path], tokens: int) -> None:
    from precompute.cli import main

    for name, path in models.items():
        t = time.perf_counter()
        rc = main(["run", "--model", str(path), "--corpus", str(need_corpus()), "--db", db,
                   "--max-tokens", str(tokens), "--jobs", "neurons"])
        if rc:
            sys.exit(f"precompute run failed for {name}")
        print(f"built {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)


def prompt_ids(lm, n: int) -> str:
    """A prompt that tokenizes to exactly ``n`` tokens (BOS included), for this model."""
    text = PROMPT
    while len(lm.encode(text)) < n:
        text += " " + PROMPT
    ids = lm.encode(text)[:n]
    return lm.tokenizer.decode(ids[1:] if lm.prepend_bos and lm.bos_id is not None else ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=None, help="an existing database (default: build a temporary one)")
    ap.add_argument("--tokens", type=int, default=20_000, help="tokens per model when building")
    ap.add_argument("--neurons", type=int, default=50)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", default="1,2", help="torch CPU threads for the live test, comma-separated")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    from app.live import neuron_on_text
    from precompute.models import load_model
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import layer_neurons, neuron_page
    from precompute.store.queries import list_models

    models = available_models()
    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory()
        args.db = f"sqlite:///{Path(tmp.name) / 'bench.db'}"
        build(args.db, models, args.tokens)
    store = open_store(args.db, create=False)
    with store.session() as s:
        infos = {m.name: m for m in list_models(s)}
    rng = random.Random(0)
    rows = []
    for name, info in infos.items():
        picks = [(rng.randrange(info.n_layers), rng.randrange(info.d_mlp)) for _ in range(args.neurons)]
        with store.session() as s:  # warm-up: first connection, SQLite page cache
            neuron_page(s, name, *picks[0])
        times = []
        for layer, neuron in picks:
            t = time.perf_counter()
            with store.session() as s:
                p = neuron_page(s, name, layer, neuron)
                table = layer_neurons(s, name, layer)
            times.append((time.perf_counter() - t) * 1000)
            assert p.stats.neuron == neuron and len(table) == info.d_mlp
        live_ms = {t: float("nan") for t in threads}
        n_live = 0
        try:
            lm = load_model(info.source)
            text = prompt_ids(lm, 128)
            for th in threads:
                torch.set_num_threads(th)
                r = neuron_on_text(lm, text, info.n_layers - 1, 0)
                live = []
                for i in range(args.runs):
                    t = time.perf_counter()
                    r = neuron_on_text(lm, text, i % info.n_layers, i)
                    live.append((time.perf_counter() - t) * 1000)
                live_ms[th] = statistics.median(live)
            n_live = len(r.ids)
        except Exception as e:  # noqa: BLE001 - a model folder that moved: report, keep the page numbers
            print(f"{name}: live test skipped ({e})", file=sys.stderr)
        times.sort()
        rows.append((name, info.n_layers, info.d_mlp, p.run.n_tokens, len(p.examples), statistics.median(times),
                     times[int(0.9 * (len(times) - 1))], n_live, live_ms))
    import os

    print(f"\nneuron page data ({args.neurons} random neurons per model, uncached) and live test of a "
          f"128-token prompt (median of {args.runs}); database: {len(infos)} model(s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    live_cols = "".join(f"{f'live {t} thr':>12s}" for t in threads)
    print(f"{'model':26s} {'layers':>6s} {'d_mlp':>6s} {'tokens':>8s} {'examples':>8s} {'page median':>12s} "
          f"{'page p90':>9s} {'live tokens':>11s}{live_cols}")
    for name, nl, dm, nt, ne, med, p90, nlive, lms in rows:
        lc = "".join(f"{lms[t]:10.1f}ms" for t in threads)
        print(f"{name:26s} {nl:6d} {dm:6d} {nt:8,d} {ne:8d} {med:10.1f}ms {p90:7.1f}ms {nlive:11d}{lc}")
    print("targets: page median <= 50 ms; live <= 300 ms")
    if tmp is not None:
        store.engine.dispose()
        tmp.cleanup()


if __name__ == "__main__":
    main()
