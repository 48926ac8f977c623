"""How long the lab's live work takes for a 128-token prompt on CPU (median of 10 runs).

    python bench/bench_live.py                       # the bundled model, else stories260K
    python bench/bench_live.py --model PATH --tokens 128 --runs 10

Prints one table: median ms of a plain forward pass, ``analyse`` (top-k, loss, top neurons,
all attention patterns), ``ablate`` (a clean and an ablated pass) and a 20-token greedy
``continue_text``, each also as a ratio to the plain forward pass. The target: ``analyse``
well under a second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from precompute.live import ablate, analyse, continue_text  # noqa: E402
from precompute.models import DEFAULT_MODEL, load_model  # noqa: E402

STORIES260K = ROOT.parent / "shared" / "models" / "stories260K"
TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She ran to get it, but a small dog got there first. "
)


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = DEFAULT_MODEL if (Path(DEFAULT_MODEL) / "config.json").exists() else str(STORIES260K)
    ap.add_argument("--model", default=default)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    text = TEXT
    while len(lm.encode(text)) < args.tokens:
        text += TEXT
    a = analyse(lm, text, max_tokens=args.tokens)
    text = lm.tokenizer.decode(list(a.ids[1 if lm.prepend_bos else 0 :]))
    n = len(analyse(lm, text, max_tokens=args.tokens).ids)
    ids = torch.tensor([lm.encode(text)[: args.tokens]])

    def plain():
        with torch.inference_mode():
            lm.model(input_ids=ids)

    rows = [
        ("plain forward", median_ms(plain, args.runs)),
        ("analyse", median_ms(lambda: analyse(lm, text, max_tokens=args.tokens), args.runs)),
        ("ablate neuron (zero)", median_ms(lambda: ablate(lm, text, "neuron", 0, 0, "zero", max_tokens=args.tokens), args.runs)),
        ("ablate head (mean)", median_ms(lambda: ablate(lm, text, "head", 0, 0, "mean", max_tokens=args.tokens), args.runs)),
        ("continue 20 tokens", median_ms(lambda: continue_text(lm, text, 20), args.runs)),
    ]
    base = rows[0][1]
    print(f"model {Path(args.model).name} ({lm.n_layers} layers, {lm.n_heads} heads, d_mlp {lm.d_mlp}, vocab {lm.vocab_size}); "
          f"prompt {n} tokens; {args.runs} runs; {torch.get_num_threads()} threads")
    print(f"{'step':<24}{'median ms':>12}{'x forward':>12}")
    for name, ms in rows:
        print(f"{name:<24}{ms:>12.1f}{ms / base:>12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
