"""Command line: ``precompute train | run | show | runs``.

Bad input gets one line on stderr and exit code 2; nothing in the database is changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime

from .corpus import CorpusError
from .models import DEFAULT_MODEL, ModelError
from .store.db import DEFAULT_DB, StoreError
from .store.queries import NotFound

DEFAULT_JOBS = "neurons"


def _jobs():
    from .jobs import JOBS

    return JOBS


def _add_train(sub):
    p = sub.add_parser("train", help="train a small GPT-2-style model from scratch on a text corpus")
    p.add_argument("--corpus", required=True, help="text file of stories")
    p.add_argument("--val-corpus", help="text file for the validation loss")
    p.add_argument("--out", required=True, help="output folder (Hugging Face format + model card)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-mlp", type=int, default=None, help="MLP width (default 4 x d-model)")
    p.add_argument("--n-ctx", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--cased", action="store_true", help="keep case (default: lowercasing tokenizer)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; the LR schedule follows it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def _add_run(sub):
    p = sub.add_parser("run", help="run precompute jobs over a corpus and cache the results")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local folder or hub id (default: the bundled model)")
    p.add_argument("--corpus", default=None, help="text file or hf:<dataset>[:split]; default: stories sampled from the model")
    p.add_argument("--separator", default="auto", choices=["auto", "eot", "newline", "blank"])
    p.add_argument("--db", default=DEFAULT_DB, help="SQLAlchemy URL (default: data/tinyscope.db)")
    p.add_argument("--jobs", default=DEFAULT_JOBS, help="comma-separated: " + ", ".join(_jobs()))
    p.add_argument("--max-tokens", type=int, default=50_000, help="tokens fed to the model (BOS included)")
    p.add_argument("--ctx-len", type=int, default=256, help="tokens per sequence (BOS included)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to each sequence")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--sample-stories", type=int, default=200, help="stories to sample when no corpus is given")
    p.add_argument("--seed", type=int, default=0)
    for factory in _jobs().values():
        spec = factory()
        if spec.add_args is not None:
            spec.add_args(p)


def _add_show(sub):
    p = sub.add_parser("show", help="print cached data as JSON (what the pages show)")
    what = p.add_subparsers(dest="what", required=True)
    n = what.add_parser("neuron")
    n.add_argument("--model", required=True)
    n.add_argument("--layer", type=int, required=True)
    n.add_argument("--neuron", type=int, required=True)
    n.add_argument("--run", type=int, default=None)
    n.add_argument("--db", default=DEFAULT_DB)
    n.add_argument("--json", action="store_true", help="print JSON (the only format)")
    for name, (add, _handler) in SHOWS.items():
        add(what.add_parser(name))


def _add_runs(sub):
    p = sub.add_parser("runs", help="list the complete runs in a database")
    p.add_argument("--db", default=DEFAULT_DB)


def _json_default(o):
    if isinstance(o, datetime):
        return o.isoformat(timespec="seconds")
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(type(o).__name__)


def print_json(obj) -> None:
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    print(json.dumps(data, default=_json_default, indent=1))


def cmd_train(args) -> int:
    from .train import TrainConfig, run

    cfg = TrainConfig(
        corpus=args.corpus, val_corpus=args.val_corpus, out=args.out, n_layers=args.layers, d_model=args.d_model,
        n_heads=args.heads, d_mlp=args.d_mlp, n_ctx=args.n_ctx, vocab_size=args.vocab_size, lowercase=not args.cased,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        max_minutes=args.max_minutes, threads=args.threads,
    )
    r = run(cfg)
    print(f"saved {r.out}: {r.n_params:,} parameters, train loss {r.final_train_loss:.3f}, "
          f"validation loss {r.val_loss}, {r.seconds / 60:.1f} min")
    return 0


def cmd_run(args) -> int:
    from .corpus import load_corpus, sample_corpus
    from .models import load_model
    from .sequences import tokenize
    from .store.db import now, open_store, write_run

    jobs = _jobs()
    names = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in names if j not in jobs]
    if unknown or not names:
        raise ValueError(f"unknown job {', '.join(unknown) or '(none)'}; jobs: {', '.join(jobs)}")
    store = open_store(args.db)  # refuse a foreign/old database before any work
    lm = load_model(args.model, device=args.device)
    if args.layers:
        for l in args.layers.split(","):
            lm.check_layer(int(l))
    if args.corpus:
        corpus = load_corpus(args.corpus, args.separator)
    else:
        print(f"no --corpus given: sampling {args.sample_stories} stories from the model (seed {args.seed})", file=sys.stderr)
        corpus = sample_corpus(lm, n_stories=args.sample_stories, seed=args.seed)
    seqs = tokenize(lm, corpus, ctx_len=args.ctx_len, max_tokens=args.max_tokens, prepend_bos=False if args.no_bos else None)
    print(f"{lm.model_id}: {len(seqs.ids)} sequences, {seqs.n_tokens:,} tokens "
          f"({'BOS prepended' if seqs.prepend_bos else 'no BOS'}) from {corpus.name}", file=sys.stderr)
    for name in names:
        spec = jobs[name]()
        cfg = spec.make_config(args)
        started = now()
        result = spec.run(lm, seqs, cfg)
        params = cfg.params() if hasattr(cfg, "params") else dataclasses.asdict(cfg)
        params.update(ctx_len=args.ctx_len, max_tokens=args.max_tokens, device=args.device)
        with store.session.begin() as s:
            run = write_run(s, lm, name, seqs, params, started, spec.summary(result))
            spec.write(s, run.id, result)
            run_id = run.id
        print(f"{name}: run {run_id} complete ({seqs.n_scored:,} tokens scored) in {args.db}")
    return 0


def cmd_show(args) -> int:
    from .store.db import cached_store

    store = cached_store(args.db)
    if args.what == "neuron":
        from .store.neurons import neuron_page

        with store.session() as s:
            print_json(neuron_page(s, args.model, args.layer, args.neuron, args.run))
        return 0
    return SHOWS[args.what][1](args, store)


# `precompute show NAME`: NAME -> (add_arguments(parser), handler(args, store) -> exit code).
# Each handler prints JSON of the same query the page uses.
SHOWS: dict = {}
from .store.heads_tables import SHOW_HEAD, SHOW_HEADS  # noqa: E402

SHOWS["head"] = SHOW_HEAD
SHOWS["heads"] = SHOW_HEADS
from .store.rules_tables import SHOW_RULES  # noqa: E402

SHOWS["rules"] = SHOW_RULES
from .store.embeddings_tables import SHOW_RETRIEVAL  # noqa: E402

SHOWS["retrieval"] = SHOW_RETRIEVAL


def cmd_runs(args) -> int:
    from .store.db import cached_store
    from .store.queries import list_runs

    with cached_store(args.db).session() as s:
        for r in list_runs(s):
            print(f"{r.id:4d}  {r.model:24s} {r.job:11s} {r.n_tokens:9,d} tokens  {r.corpus}  ({r.finished_at:%Y-%m-%d %H:%M})")
    return 0


COMMANDS = {"train": cmd_train, "run": cmd_run, "show": cmd_show, "runs": cmd_runs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="precompute", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_run(sub)
    _add_show(sub)
    _add_runs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ModelError, CorpusError, StoreError, NotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
