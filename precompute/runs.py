"""A precompute run: the sweep over a corpus, progress committed shard by shard, resumable.

``execute`` drives one sweep for several jobs (one run row each):

1. the run rows are created with status ``running`` (pages only ever read ``complete`` runs);
2. for every shard, in order: the shard is swept (here, or on a Ray worker), its accumulators
   are merged into the totals, per-token output is written to the store in one transaction,
   and the totals are checkpointed (pickled, written atomically) in the run's work folder,
   together with the shard's tokens (``TokenFile``);
3. at the end every job finishes and its results, the sequences its pages show, and the run
   rows' status ``complete`` are written in one transaction.

A killed run is continued by ``precompute run --resume RUN``: the checkpoint says how many
shards are done, their per-token rows stay, rows of later shards are dropped, and the sweep goes
on from the next shard. Shards are merged in order and every shard starts from empty
accumulators (or, here, from ``next_shard()``, which is exactly equivalent), so the result equals
an uninterrupted run's.

When the database stays locked (another process writing) the driver waits, visibly, up to
``lock_wait`` seconds; if the final write still fails nothing is lost: the work folder keeps
everything and ``--resume`` writes it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from .errors import one_line
from .sequences import Sequences
from .store.base import to_blob
from .store.db import REPO_ROOT, Store, StoreError, code_version, now, shown_url, upsert_model
from .store.queries import latest_run
from .store.tables import RunRow, SequenceRow
from .sweep import JobSpec, sweep_shard

DEFAULT_WORK = REPO_ROOT / "data" / "cache" / "runs"
# options that describe where and how fast a run goes, not what it computes (not fixed on resume)
PLACE_OPTIONS = ("db", "resume", "workers", "ray_address", "device", "lock_wait", "work_dir", "command", "stop_after_shards")


class TokenFile:
    """Every sequence the sweep fed the model, on disk: ``tokens.i32`` (all ids, appended) and
    ``seqs.i64`` (start, length, story id, offset per sequence). ``tokens(i)`` reads one back,
    for ``finish`` and for storing the sequences a page shows."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tok_path, self.seq_path = folder / "tokens.i32", folder / "seqs.i64"
        self._tok = self._seq = None

    def truncate(self, n_seqs: int, n_tokens: int) -> None:
        for path, size in ((self.tok_path, n_tokens * 4), (self.seq_path, n_seqs * 32)):
            with open(path, "ab") as f:
                f.truncate(size)
        self._close()

    def append(self, shard: Sequences, n_tokens_before: int) -> None:
        lens = np.array([len(s) for s in shard.ids], dtype=np.int64)
        starts = n_tokens_before + np.concatenate([[0], np.cumsum(lens)[:-1]])
        meta = np.stack([starts, lens, np.array(shard.story_ids, np.int64), np.array(shard.offsets, np.int64)], 1)
        with open(self.tok_path, "ab") as f:
            f.write(np.concatenate(shard.ids).astype(np.int32).tobytes())
        with open(self.seq_path, "ab") as f:
            f.write(np.ascontiguousarray(meta, dtype=np.int64).tobytes())
        self._close()

    def _open(self):
        if self._seq is None:
            self._seq = np.fromfile(self.seq_path, dtype=np.int64).reshape(-1, 4)
            self._tok = open(self.tok_path, "rb")
        return self._tok, self._seq

    def _close(self) -> None:
        if getattr(self, "_tok", None) is not None:
            self._tok.close()
        self._tok = self._seq = None

    __del__ = _close

    @property
    def n_seqs(self) -> int:
        return len(self._open()[1])

    def tokens(self, seq_idx: int) -> np.ndarray:
        # read, not memory-mapped: a mapped page that was read stays in the process's resident
        # memory, so storing every sequence would add 4 bytes a token of the corpus to the peak
        f, seq = self._open()
        start, length = int(seq[seq_idx, 0]), int(seq[seq_idx, 1])
        return np.frombuffer(os.pread(f.fileno(), 4 * length, 4 * start), dtype=np.int32)

    def meta(self, seq_idx: int) -> tuple[int, int]:
        """(story id, offset) of a sequence."""
        seq = self._open()[1]
        return int(seq[seq_idx, 2]), int(seq[seq_idx, 3])


@dataclass
class Checkpoint:
    shards_done: int = 0
    n_seqs: int = 0
    n_tokens: int = 0
    n_scored: int = 0
    totals: list | None = None  # one accumulator per job, in job order
    prepared: list | None = None  # the job configs after ``prepare`` (from the first shard)

    @staticmethod
    def load(folder: Path) -> "Checkpoint":
        path = folder / "checkpoint.pkl"
        if not path.exists():
            return Checkpoint()
        with open(path, "rb") as f:
            return pickle.load(f)

    def save(self, folder: Path) -> None:
        tmp = folder / "checkpoint.pkl.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / "checkpoint.pkl")


def work_folder(db_url: str, first_run_id: int, root: Path | None = None) -> Path:
    key = hashlib.sha1(db_url.encode()).hexdigest()[:10]
    return Path(root or os.environ.get("TINYSCOPE_WORK") or DEFAULT_WORK) / f"{key}-run{first_run_id}"


def retrying(store: Store, fn: Callable[[Any], Any], what: str, lock_wait: float) -> Any:
    """Run ``fn(session)`` in one transaction; while the database is locked, wait and say so,
    up to ``lock_wait`` seconds. Then one line (StoreError)."""
    t0 = time.monotonic()
    delay = 0.5
    said = False
    while True:
        try:
            with store.session.begin() as s:
                return fn(s)
        except OperationalError as e:
            msg = one_line(getattr(e, "orig", None) or e)
            locked = "locked" in msg or "busy" in msg
            if not locked or time.monotonic() - t0 > lock_wait:
                raise StoreError(f"could not {what}: {_describe(msg)}") from None
            if not said:
                print(f"the database is locked by another process; waiting up to {lock_wait:.0f} s to {what}", file=sys.stderr)
                said = True
            time.sleep(delay)
            delay = min(5.0, delay * 1.5)


def _describe(msg: str) -> str:
    if "locked" in msg or "busy" in msg:
        return "the database stayed locked by another process"
    if "readonly" in msg or "read-only" in msg:
        return "the database is read-only"
    return msg


@dataclass
class RunSetup:
    """What ``execute`` needs: the loaded model, the jobs with their configs, how to shard."""

    lm: Any
    jobs: list[tuple[JobSpec, Any]]
    shards: Callable[[], Iterator[Sequences]]  # a fresh iterator over every shard, from the first
    batch_size: int
    corpus_name: str
    synthetic: bool
    prepend_bos: bool
    params: dict  # the sweep's options (what `--resume` needs to rebuild it)
    lock_wait: float = 60.0
    sweep_shards: Callable | None = None  # (shards, prepared jobs, bar, totals) -> iterator of (shard, accs); default: here
    work_root: Path | None = None
    stop_after_shards: int | None = None  # testing aid: exit as if killed after this many shards
    run_ids: dict = field(default_factory=dict)  # job -> run id, when resuming


def create_runs(store: Store, setup: RunSetup) -> dict[str, int]:
    """One run row per job, status ``running``, all in one transaction."""

    def make(s):
        model = upsert_model(s, setup.lm)
        ids = {}
        for spec, cfg in setup.jobs:
            params = cfg.params() if hasattr(cfg, "params") else {}
            row = RunRow(model_id=model.id, job=spec.name, corpus=setup.corpus_name, corpus_synthetic=setup.synthetic,
                         n_tokens=0, n_sequences=0, prepend_bos=setup.prepend_bos, params=dict(params),
                         code_version=code_version(), started_at=now(), finished_at=None, status="running", summary={})
            s.add(row)
            s.flush()
            ids[spec.name] = row.id
        for spec, _ in setup.jobs:
            s.execute(update(RunRow).where(RunRow.id == ids[spec.name]).values(
                params={**s.get(RunRow, ids[spec.name]).params, "sweep": {**setup.params, "runs": ids}}))
        return ids

    return retrying(store, make, "create the run", setup.lock_wait)


def _local_sweep(setup: RunSetup):
    from tqdm import tqdm

    def go(shards: Iterator[Sequences], jobs: list[tuple[JobSpec, Any]], bar: tqdm, totals: Callable[[], list | None]):
        for shard in shards:
            # after the first shard, a job may hand out an accumulator that updates its totals in
            # place where that is exact (``next_shard``), instead of a second copy of its state.
            # No reference is kept here: once merged, a shard's accumulators are freed before the
            # next shard's are made
            yield shard, sweep_shard(setup.lm, shard,
                                     [t.next_shard() if hasattr(t, "next_shard") else spec.accumulator(setup.lm, cfg)
                                      for (spec, cfg), t in zip(jobs, totals() or [None] * len(jobs))],
                                     setup.batch_size, bar.update)

    return go


def _sweep(store, setup, jobs_box, run_ids, ck, tokens, folder, totals, log):
    """Sweep the shards after the checkpoint; commit and checkpoint each. Returns the totals."""
    from tqdm import tqdm

    go = setup.sweep_shards or _local_sweep(setup)
    names = [spec.name for spec, _ in jobs_box[0]]
    first_id = min(run_ids.values())

    def shard_iter() -> Iterator[Sequences]:
        for shard in setup.shards():
            if shard.index == 0 and ck.prepared is None:
                jobs_box[0] = [(spec, spec.prepare(setup.lm, cfg, shard) if getattr(spec, "prepare", None) else cfg)
                               for spec, cfg in jobs_box[0]]
                ck.prepared = [cfg for _, cfg in jobs_box[0]]
            if shard.index < ck.shards_done:
                continue
            yield shard

    with tqdm(desc=f"sweep ({', '.join(names)})", unit="tok", unit_scale=True, initial=ck.n_tokens) as bar:
        shards = shard_iter()
        # the first shard is read before the sweep starts, so that ``prepare`` has seen it
        first = next(shards, None)
        if first is not None:
            def chained():
                yield first
                yield from shards

            for shard, accs in go(chained(), jobs_box[0], bar, lambda: totals):
                totals = accs if totals is None else _merged(totals, accs)
                del accs  # merged: freed now, not kept through the next shard's sweep
                chunks = [t.drain() for t in totals]

                def commit(s, chunks=chunks, shard=shard):
                    for (spec, _), chunk in zip(jobs_box[0], chunks):
                        if chunk is not None and spec.write_chunk is not None:
                            spec.write_chunk(s, run_ids[spec.name], chunk)
                    done = {"shards_done": shard.index + 1, "tokens_done": ck.n_tokens + shard.n_tokens}
                    s.execute(update(RunRow).where(RunRow.id.in_(list(run_ids.values()))).values(summary=done))

                retrying(store, commit, f"store shard {shard.index}", setup.lock_wait)
                tokens.append(shard, ck.n_tokens)
                ck.shards_done = shard.index + 1
                ck.n_seqs += len(shard.ids)
                ck.n_tokens += shard.n_tokens
                ck.n_scored += shard.n_scored
                ck.totals = totals
                ck.save(folder)
                if setup.stop_after_shards is not None and ck.shards_done >= setup.stop_after_shards:
                    log(f"stopping after {ck.shards_done} shards (as asked); continue with --resume {first_id}")
                    os._exit(3)
    return totals


def _merged(totals: list, accs: list) -> list:
    """Fold one shard's accumulators into the totals (in job order)."""
    for t, a in zip(totals, accs):
        t.merge(a)
    return totals


def execute(store: Store, setup: RunSetup, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, int]:
    """Sweep, checkpoint and store; returns job -> run id. Raises StoreError (one line) when the
    database cannot be written; the work folder then keeps what was computed."""
    resuming = bool(setup.run_ids)
    run_ids = setup.run_ids or create_runs(store, setup)
    first_id = min(run_ids.values())
    folder = work_folder(store.url, first_id, setup.work_root)
    folder.mkdir(parents=True, exist_ok=True)
    ck = Checkpoint.load(folder) if resuming else Checkpoint()
    tokens = TokenFile(folder)
    tokens.truncate(ck.n_seqs, ck.n_tokens)
    chunked = [(spec, run_ids[spec.name]) for spec, _ in setup.jobs if spec.discard_chunks is not None]
    if chunked:  # rows of shards after the checkpoint (a kill between commit and checkpoint)
        first_seq = ck.n_seqs

        def discard(s):
            for spec, rid in chunked:
                spec.discard_chunks(s, rid, first_seq)

        retrying(store, discard, "drop the rows of unfinished shards", setup.lock_wait)
    if resuming:
        log(f"resuming run {first_id}: {ck.shards_done} shards ({ck.n_tokens:,} tokens) already done")

    jobs_box = [list(setup.jobs)]  # replaced once ``prepare`` has seen the first shard
    if ck.prepared is not None:
        jobs_box[0] = [(spec, cfg) for (spec, _), cfg in zip(setup.jobs, ck.prepared)]
    totals = ck.totals
    try:
        totals = _sweep(store, setup, jobs_box, run_ids, ck, tokens, folder, totals, log)
    except StoreError as e:
        raise StoreError(f"{e}. Progress up to shard {ck.shards_done} is kept; continue with "
                         f"`precompute run --resume {first_id} --db {shown_url(store.url)}`") from None
    jobs = jobs_box[0]
    if totals is None:
        raise ValueError("the corpus gave no tokens to score")
    log(f"{ck.shards_done} shards, {ck.n_seqs:,} sequences, {ck.n_tokens:,} tokens; finishing")
    results = [t.finish(setup.lm, tokens) for t in totals]

    def final(s):
        for (spec, _), result in zip(jobs, results):
            rid = run_ids[spec.name]
            spec.write(s, rid, result)
            n_seqs = write_sequences(s, rid, tokens, spec.sequences(result))
            row = s.get(RunRow, rid)
            summary = dict(spec.summary(result))
            summary.update(shards=ck.shards_done, sequences_stored=n_seqs)
            row.n_tokens, row.n_sequences = ck.n_scored, ck.n_seqs
            row.finished_at, row.status, row.summary = now(), "complete", summary

    try:
        retrying(store, final, "store the results", setup.lock_wait)
    except StoreError as e:
        raise StoreError(f"{e}. Nothing is lost: the results are kept in {folder}; "
                         f"write them with `precompute run --resume {first_id} --db {shown_url(store.url)}`") from None
    _remove(folder)
    return run_ids


def execute_derived(store: Store, spec: JobSpec, cfg: Any, model: str, source_run: int | None = None,
                    lock_wait: float = 60.0) -> int:
    """Run a job that reads another job's stored run (``spec.after``: run ``source_run``, default the
    newest complete one of ``model``) and store its result as a complete run of its own, in one
    transaction; returns its run id."""
    with store.session() as s:
        source = latest_run(s, model, spec.after, source_run)
        model_id = s.get(RunRow, source.id).model_id
        result = spec.derive(s, source, cfg)
    params = {**(cfg.params() if hasattr(cfg, "params") else {}), "source_run": source.id}

    def write(s):
        row = RunRow(model_id=model_id, job=spec.name, corpus=source.corpus, corpus_synthetic=source.corpus_synthetic,
                     n_tokens=source.n_tokens, n_sequences=source.n_sequences, prepend_bos=source.prepend_bos, params=params,
                     code_version=code_version(), started_at=now(), finished_at=now(), status="complete",
                     summary=dict(spec.summary(result)))
        s.add(row)
        s.flush()
        spec.write(s, row.id, result)
        return row.id

    return retrying(store, write, f"store the {spec.name} run", lock_wait)


def write_sequences(s, run_id: int, tokens: TokenFile, which) -> int:
    """Store the sequences a job's pages show (``which``: seq indices, or None for all), in chunks."""
    idx = np.arange(tokens.n_seqs) if which is None else np.unique(np.fromiter((int(i) for i in which), dtype=np.int64))
    for i in range(0, len(idx), 2000):
        rows = []
        for k in idx[i : i + 2000]:
            sid, off = tokens.meta(int(k))
            rows.append(dict(run_id=run_id, seq_idx=int(k), story_id=sid, offset=off, token_ids=to_blob(tokens.tokens(int(k)).astype(np.int32))))
        s.execute(SequenceRow.__table__.insert(), rows)
    return int(len(idx))


def _remove(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


def find_sweep(store: Store, run_id: int) -> tuple[dict, dict[str, int]]:
    """The options and run ids of the sweep that run ``run_id`` belongs to (for ``--resume``)."""
    with store.session() as s:
        row = s.get(RunRow, run_id)
        if row is None:
            raise ValueError(f"run {run_id} not found in this database")
        sweep = (row.params or {}).get("sweep")
        if not sweep:
            raise ValueError(f"run {run_id} was not made by a resumable sweep")
        runs = {k: int(v) for k, v in sweep["runs"].items()}
        states = dict(s.execute(select(RunRow.id, RunRow.status).where(RunRow.id.in_(list(runs.values())))).all())
    if any(states.get(i) == "complete" for i in runs.values()):
        raise ValueError(f"run {run_id} is already complete")
    if len(states) != len(runs):
        raise ValueError(f"run {run_id}'s sweep lost some of its run rows; start it again")
    return {k: v for k, v in sweep.items() if k != "runs"}, runs
