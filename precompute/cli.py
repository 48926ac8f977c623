"""Command line: ``precompute train | corpus | run | show | runs``.

Bad input gets one line on stderr and exit code 2; nothing in the database is changed.
"""

from __future__ import annotations

import argparse
import sys

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
    p.add_argument("--eval-every", type=int, default=250, help="steps between loss evaluations")
    p.add_argument("--synth-probe", type=int, default=None, metavar="SEED",
                   help="log the loss on each planted label of synth stories of this seed (see corpus synth)")


def _add_corpus(sub):
    p = sub.add_parser("corpus", help="write a corpus")
    what = p.add_subparsers(dest="what", required=True)
    s = what.add_parser("synth", help="generated stories with planted structure (names, phrases, quotes), one per line")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tokens", type=int, default=1_000_000, help="about this many words and punctuation marks")
    s.add_argument("--out", required=True, help="text file, one story per line")
    s.add_argument("--labels", default=None, help="also write the planted spans as JSON lines")


def _add_run(sub):
    p = sub.add_parser("run", help="sweep a model over a corpus once for all the jobs and cache the results")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local folder or hub id (default: the bundled model)")
    p.add_argument("--corpus", default=None, help="text file or hf:<dataset>[:split]; default: stories sampled from the model")
    p.add_argument("--separator", default="auto", choices=["auto", "eot", "newline", "blank"])
    p.add_argument("--db", default=DEFAULT_DB, help="SQLAlchemy URL (default: data/tinyscope.db)")
    p.add_argument("--jobs", default=DEFAULT_JOBS, help="comma-separated: " + ", ".join(_jobs()))
    p.add_argument("--max-tokens", type=int, default=50_000, help="tokens fed to the model, BOS included (0: the whole corpus)")
    p.add_argument("--ctx-len", type=int, default=256, help="tokens per sequence (BOS included)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-tokens", type=int, default=500_000,
                   help="tokens per shard: the unit of progress, of resuming and of work sent to a Ray worker")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to each sequence")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--sample-stories", type=int, default=200, help="stories to sample when no corpus is given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=int, default=None, metavar="RUN",
                   help="continue the killed sweep that run RUN belongs to (its other options are taken from the run)")
    p.add_argument("--workers", type=int, default=1, help="sweep shards on a local Ray cluster of N workers (pip install tinyscope[ray])")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster (e.g. ray://host:10001 or auto)")
    p.add_argument("--lock-wait", type=float, default=60.0, help="seconds to wait for a locked database before giving up")
    p.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)  # tests: act as if killed
    for factory in _jobs().values():
        spec = factory()
        if spec.add_args is not None:
            spec.add_args(p)


def _add_show(sub):
    p = sub.add_parser("show", help="print cached data as JSON (what the pages show)")
    what = p.add_subparsers(dest="what", required=True)
    for name, (add, _handler) in _shows().items():
        add(what.add_parser(name))


def _add_train_sae(sub):
    p = sub.add_parser("train-sae", help="train a TopK sparse autoencoder on one layer's MLP neurons and store it with its quality")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local folder or hub id (default: the bundled model)")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--corpus", required=True, help="text file or hf:<dataset>[:split]")
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--max-tokens", type=int, default=200_000, help="tokens fed to the model, BOS included (0: the whole corpus)")
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--features", type=int, default=None, help="dictionary size (default 4 x d_mlp)")
    p.add_argument("--k", type=int, default=32, help="active features per token")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per training step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def cmd_train_sae(args) -> int:
    from .corpus import load_corpus
    from .models import load_model
    from .runs import retrying
    from .sae.tables import write_sae
    from .sae.train import SaeConfig, train
    from .sequences import tokenize
    from .store.db import check_writable, code_version, now, open_store, shown_url, upsert_model
    from .store.tables import RunRow

    cfg = SaeConfig(layer=args.layer, n_features=args.features, k=args.k, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    corpus = load_corpus(args.corpus)
    lm = load_model(args.model, device=args.device)
    lm.check_layer(args.layer)
    store = open_store(args.db)
    check_writable(store)
    seqs = tokenize(lm, corpus, ctx_len=args.ctx_len, max_tokens=args.max_tokens or None)
    r = train(lm, seqs, cfg, log=lambda m: print(m, file=sys.stderr))

    def write(s):
        row = RunRow(model_id=upsert_model(s, lm).id, job="sae", corpus=corpus.name, corpus_synthetic=corpus.synthetic,
                     n_tokens=r.n_train_tokens, n_sequences=len(seqs.ids), prepend_bos=seqs.prepend_bos,
                     params={**cfg.params(), "max_tokens": args.max_tokens, "ctx_len": args.ctx_len},
                     code_version=code_version(), started_at=now(), finished_at=now(), status="complete",
                     summary=dict(variance_explained=round(r.variance_explained, 4), dead_share=round(r.dead_share, 4),
                                  clean_loss=round(r.clean_loss, 4), spliced_loss=round(r.spliced_loss, 4),
                                  zero_loss=round(r.zero_loss, 4), seconds=round(r.seconds, 1)))
        s.add(row)
        s.flush()
        write_sae(s, row.id, r)
        return row.id

    rid = retrying(store, write, "store the SAE", 60.0)
    print(f"sae: run {rid} complete in {shown_url(args.db)}: layer {args.layer}, {r.sae.n_features} features, k={r.sae.k}, "
          f"{r.n_train_tokens:,} training tokens, {r.seconds:.0f} s; held out ({r.n_eval_tokens:,} tokens): "
          f"variance explained {r.variance_explained:.3f}, dead features {r.dead_share:.1%}, loss clean {r.clean_loss:.4f} "
          f"/ spliced {r.spliced_loss:.4f} / zero-ablated {r.zero_loss:.4f} ({r.loss_recovered:.1%} recovered)")
    return 0


def _add_runs(sub):
    p = sub.add_parser("runs", help="list the complete runs in a database")
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--all", action="store_true", help="also list unfinished (running or killed) runs")


def cmd_train(args) -> int:
    from .train import TrainConfig, run

    cfg = TrainConfig(
        corpus=args.corpus, val_corpus=args.val_corpus, out=args.out, n_layers=args.layers, d_model=args.d_model,
        n_heads=args.heads, d_mlp=args.d_mlp, n_ctx=args.n_ctx, vocab_size=args.vocab_size, lowercase=not args.cased,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        max_minutes=args.max_minutes, threads=args.threads, synth_probe=args.synth_probe,
        eval_every=args.eval_every,
    )
    r = run(cfg)
    print(f"saved {r.out}: {r.n_params:,} parameters, train loss {r.final_train_loss:.3f}, "
          f"validation loss {r.val_loss}, {r.seconds / 60:.1f} min")
    return 0


def cmd_corpus(args) -> int:
    import time

    from .synth import SynthConfig, write_corpus

    t0 = time.time()
    n, units = write_corpus(SynthConfig(seed=args.seed, tokens=args.tokens), args.out, args.labels)
    print(f"wrote {n:,} stories ({units:,} words and marks, seed {args.seed}) to {args.out} in {time.time() - t0:.1f} s")
    return 0


def cmd_run(args) -> int:
    from .corpus import load_corpus, sample_corpus
    from .models import load_model
    from .runs import PLACE_OPTIONS, RunSetup, execute, find_sweep
    from .sequences import shards
    from .store.db import check_writable, open_store, shown_url
    from .sweep import return_freed_memory

    return_freed_memory()
    store = None
    run_ids: dict = {}
    if args.resume is not None:
        store = open_store(args.db, create=False)
        saved, run_ids = find_sweep(store, args.resume)
        for k, v in saved.items():
            if k not in PLACE_OPTIONS:
                setattr(args, k, v)
    jobs = _jobs()
    names = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in names if j not in jobs]
    if unknown or not names:
        raise ValueError(f"unknown job {', '.join(unknown) or '(none)'}; jobs: {', '.join(jobs)}")
    if args.shard_tokens < 1 or args.batch_size < 1:
        raise ValueError("--shard-tokens and --batch-size must be at least 1")
    specs = [jobs[n]() for n in names]
    configs = [(spec, spec.config(args)) for spec in specs]  # bad options fail before any work
    derived = [(spec, cfg) for spec, cfg in configs if spec.after is not None]  # read a stored run, after the sweep
    configs = [(spec, cfg) for spec, cfg in configs if spec.after is None]
    names = [spec.name for spec, _ in configs]
    if not configs:
        return _run_derived(args, derived, {})
    corpus = load_corpus(args.corpus, args.separator) if args.corpus else None  # checked before the database
    lm = load_model(args.model, device=args.device)
    if args.layers:
        for layer in str(args.layers).split(","):
            lm.check_layer(int(layer))
    if store is None:  # only once the input is known good: a bad corpus or model creates no database
        store = open_store(args.db)  # refuses a foreign or other-version database
    check_writable(store)
    if corpus is None:
        print(f"no --corpus given: sampling {args.sample_stories} stories from the model (seed {args.seed})", file=sys.stderr)
        corpus = sample_corpus(lm, n_stories=args.sample_stories, seed=args.seed)
    max_tokens = args.max_tokens or None
    bos = False if args.no_bos else None

    def all_shards():
        return shards(lm, corpus, args.shard_tokens, ctx_len=args.ctx_len, max_tokens=max_tokens, prepend_bos=bos)

    params = {k: v for k, v in vars(args).items() if k not in PLACE_OPTIONS and k != "func"}
    params["model"] = str(lm.model_id)
    setup = RunSetup(
        lm=lm, jobs=configs, shards=all_shards, batch_size=args.batch_size, corpus_name=corpus.name,
        synthetic=corpus.synthetic, prepend_bos=lm.bos_id is not None and not args.no_bos, params=params,
        lock_wait=args.lock_wait, stop_after_shards=args.stop_after_shards, run_ids=run_ids,
    )
    if args.workers > 1 or args.ray_address:
        from .ray_sweep import ray_sweep

        setup.sweep_shards = ray_sweep(args, names)
    print(f"{lm.model_id}: {', '.join(names)} over {corpus.name} "
          f"({'BOS prepended' if setup.prepend_bos else 'no BOS'}, shards of {args.shard_tokens:,} tokens)", file=sys.stderr)
    done = execute(store, setup)
    for name, rid in done.items():
        print(f"{name}: run {rid} complete in {shown_url(args.db)}")
    return _run_derived(args, derived, done, store)


def _run_derived(args, derived: list, done: dict, store=None) -> int:
    """Jobs that read another job's stored run: the one this sweep made, else the newest."""
    from .runs import execute_derived
    from .store.db import check_writable, open_store, shown_url
    from .store.queries import get_model

    if not derived:
        return 0
    if store is None:
        open_store(args.db, create=False)  # an absent or empty database is not created
        store = open_store(args.db)  # creates the tables this version adds
        check_writable(store)
    with store.session() as s:
        model = get_model(s, args.model).name
    for spec, cfg in derived:
        rid = execute_derived(store, spec, cfg, model, done.get(spec.after), args.lock_wait)
        print(f"{spec.name}: run {rid} complete in {shown_url(args.db)}")
    return 0


def _shows() -> dict:
    """`precompute show NAME`: NAME -> (add_arguments(parser), handler(args, store) -> exit code),
    from every job's spec. Each handler prints JSON of the same query the page uses."""
    out = {}
    for factory in _jobs().values():
        out.update(factory().shows)
    return out


def cmd_show(args) -> int:
    from .store.db import cached_store

    return _shows()[args.what][1](args, cached_store(args.db))


def cmd_runs(args) -> int:
    from .store.db import cached_store
    from .store.queries import list_runs

    with cached_store(args.db).session() as s:
        for r in list_runs(s, include_incomplete=args.all):
            when = f"{r.finished_at:%Y-%m-%d %H:%M}" if r.finished_at else f"{r.status}, resume with --resume {r.id}"
            print(f"{r.id:4d}  {r.model:24s} {r.job:11s} {r.n_tokens:9,d} tokens  {r.corpus}  ({when})")
    return 0


COMMANDS = {"train": cmd_train, "corpus": cmd_corpus, "run": cmd_run, "show": cmd_show, "runs": cmd_runs, "train-sae": cmd_train_sae}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="precompute", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_corpus(sub)
    _add_run(sub)
    _add_show(sub)
    _add_runs(sub)
    _add_train_sae(sub)
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
