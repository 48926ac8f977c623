"""The sweep driver on stories260K: a killed run resumes to the uninterrupted result, a locked
database loses nothing, Ray workers give the same result as one process, and only the
sequences a page shows are stored."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text

from precompute.cli import main

ROWS_SKIP = {"id", "run_id"}


def _args(model, corpus, db, *extra):
    return ["run", "--model", str(model), "--corpus", str(corpus), "--db", db, "--jobs", "neurons,heads",
            "--max-tokens", "6000", "--shard-tokens", "1500", "--ctx-len", "128", "--top-k", "8", *extra]


def _cli(args, env=None):
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "precompute.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _runs(url: str) -> dict[str, tuple[int, str]]:
    """job -> (run id, status) of the newest run of each job."""
    eng = create_engine(url)
    with eng.connect() as c:
        rows = c.execute(text("select id, job, status from runs order by id")).all()
    eng.dispose()
    return {job: (rid, status) for rid, job, status in rows}


def _contents(url: str) -> dict[str, list]:
    """Every job table's rows of the complete runs, keyed by job and table, ids left out."""
    eng = create_engine(url)
    out = {}
    with eng.connect() as c:
        runs = dict(c.execute(text("select id, job from runs where status = 'complete'")).all())
        for table in inspect(c).get_table_names():
            cols = [col["name"] for col in inspect(c).get_columns(table)]
            if "run_id" not in cols:
                continue
            keep = [x for x in cols if x not in ROWS_SKIP]
            for rid, job in runs.items():
                rows = c.execute(text(f"select {', '.join(keep)} from {table} where run_id = :r"), {"r": rid}).all()
                out[f"{job}/{table}"] = sorted(tuple(r) for r in rows)
    eng.dispose()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stories260k_path, valid_corpus):
    url = f"sqlite:///{tmp_path_factory.mktemp('ref') / 'ref.db'}"
    assert main(_args(stories260k_path, valid_corpus, url)) == 0
    return _contents(url)


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert len(a[k]) == len(b[k]), k
        assert a[k] == b[k], k


def test_resume_after_stop_equals_uninterrupted(tmp_path, stories260k_path, valid_corpus, reference):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    env_work = {"TINYSCOPE_WORK": str(tmp_path / "work")}
    p = _cli(_args(stories260k_path, valid_corpus, url, "--stop-after-shards", "2"), env={**os.environ, **env_work})
    _, err = p.communicate(timeout=600)
    assert p.returncode == 3, err
    runs = _runs(url)
    assert {s for _, s in runs.values()} == {"running"}
    assert _contents(url) == {}  # nothing is visible to pages yet
    rid = min(r for r, _ in runs.values())
    # a checkpoint from an older layout of the neuron statistics: a one-line error, nothing lost
    from precompute.jobs.neurons import job as neurons_job
    from precompute.runs import Checkpoint

    (folder,) = (tmp_path / "work").iterdir()
    good = (folder / "checkpoint.pkl").read_bytes()
    ck = Checkpoint.load(folder)
    layout, neurons_job.STATE_LAYOUT = neurons_job.STATE_LAYOUT, 1
    try:
        ck.save(folder)
    finally:
        neurons_job.STATE_LAYOUT = layout
    p = _cli(["run", "--resume", str(rid), "--db", url], env={**os.environ, **env_work})
    _, err = p.communicate(timeout=600)
    assert p.returncode != 0 and "older layout" in err and "Traceback" not in err, err
    (folder / "checkpoint.pkl").write_bytes(good)
    p = _cli(["run", "--resume", str(rid), "--db", url], env={**os.environ, **env_work})
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert "resuming run" in err and "2 shards" in err
    _assert_same(_contents(url), reference)
    assert not any((tmp_path / "work").iterdir())  # the work folder is removed once stored


def test_sigkill_mid_run_then_resume(tmp_path, stories260k_path, valid_corpus, reference):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    env = {**os.environ, "TINYSCOPE_WORK": str(tmp_path / "work")}
    p = _cli(_args(stories260k_path, valid_corpus, url), env=env)
    deadline = time.monotonic() + 300
    killed = False
    while time.monotonic() < deadline and p.poll() is None:
        try:
            con = sqlite3.connect(tmp_path / "k.db", timeout=1)
            done = con.execute("select summary from runs").fetchall()
            con.close()
        except sqlite3.Error:
            done = []
        if any('"shards_done": 1' in (s or "") for (s,) in done):
            os.kill(p.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    p.communicate(timeout=60)
    if not killed:
        pytest.fail("the run finished before it could be killed")
    runs = _runs(url)
    rid = min(r for r, _ in runs.values())
    assert all(s == "running" for _, s in runs.values())
    q = _cli(["run", "--resume", str(rid), "--db", url], env=env)
    _, err = q.communicate(timeout=600)
    assert q.returncode == 0, err
    _assert_same(_contents(url), reference)


def test_locked_database_loses_nothing(tmp_path, stories260k_path, valid_corpus, reference):
    path = tmp_path / "l.db"
    url = f"sqlite:///{path}"
    env = {**os.environ, "TINYSCOPE_WORK": str(tmp_path / "work")}
    p = _cli(_args(stories260k_path, valid_corpus, url, "--lock-wait", "1"), env=env)
    deadline = time.monotonic() + 300
    lock = None
    while time.monotonic() < deadline and p.poll() is None:
        try:
            con = sqlite3.connect(path, timeout=0.2, isolation_level=None)
            if con.execute("select count(*) from runs").fetchone()[0]:
                con.execute("BEGIN EXCLUSIVE")  # another writer holds the database from now on
                lock = con
                break
            con.close()
        except sqlite3.Error:
            pass
        time.sleep(0.02)
    assert lock is not None, "the run never created its run rows"
    _, err = p.communicate(timeout=600)
    lock.rollback()
    lock.close()
    assert p.returncode == 2, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "locked" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in err
    rid = min(r for r, _ in _runs(url).values())
    q = _cli(["run", "--resume", str(rid), "--db", url], env=env)
    _, err = q.communicate(timeout=600)
    assert q.returncode == 0, err
    _assert_same(_contents(url), reference)


def test_ray_workers_equal_one_process(tmp_path, stories260k_path, valid_corpus, reference):
    pytest.importorskip("ray", reason="Ray is the optional extra tinyscope[ray]")
    import torch

    url = f"sqlite:///{tmp_path / 'r.db'}"
    # the reference ran with this process's thread count: the same count per worker keeps the
    # float32 matrix products bit-identical (see precompute/ray_sweep.py)
    env = {**os.environ, "TINYSCOPE_WORKER_THREADS": str(torch.get_num_threads())}
    p = _cli(_args(stories260k_path, valid_corpus, url, "--workers", "3"), env=env)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    _assert_same(_contents(url), reference)


def test_only_shown_sequences_are_stored(tmp_path, stories260k_path, valid_corpus):
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["run", "--model", str(stories260k_path), "--corpus", str(valid_corpus), "--db", url, "--jobs", "neurons",
                 "--max-tokens", "4000", "--ctx-len", "64", "--top-k", "3", "--layers", "1"]) == 0
    eng = create_engine(url)
    with eng.connect() as c:
        rid, n_seqs = c.execute(text("select id, n_sequences from runs")).one()
        stored = {r[0] for r in c.execute(text("select seq_idx from sequences where run_id = :r"), {"r": rid})}
        shown = {r[0] for r in c.execute(text("select seq_idx from neuron_examples where run_id = :r"), {"r": rid})}
    eng.dispose()
    assert stored == shown and len(stored) < n_seqs


def test_tokens_of_a_shard_keep_their_global_keys(lm260k, valid_corpus):
    """Shards are consecutive: global sequence indices and token keys continue across them."""
    from precompute.corpus import read_text_corpus
    from precompute.sequences import shards, tokenize

    corpus = read_text_corpus(valid_corpus, max_stories=300)
    whole = tokenize(lm260k, corpus, ctx_len=64, max_tokens=5000)
    parts = list(shards(lm260k, corpus, 700, ctx_len=64, max_tokens=5000))
    assert len(parts) > 3 and [p.index for p in parts] == list(range(len(parts)))
    ids = [s for p in parts for s in p.ids]
    assert len(ids) == len(whole.ids) and all((a == b).all() for a, b in zip(ids, whole.ids))
    keys = np.concatenate([p.keys() for p in parts])
    np.testing.assert_array_equal(keys, whole.keys())
    assert [p.first_seq for p in parts] == list(np.cumsum([0] + [len(p.ids) for p in parts[:-1]]))


def test_worker_threads_share_the_cores(monkeypatch):
    from precompute.ray_sweep import worker_threads

    monkeypatch.delenv("TINYSCOPE_WORKER_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert [worker_threads(n, None, 16) for n in (1, 2, 3, 16, 40)] == [16, 8, 5, 1, 1]  # local: a share each
    assert worker_threads(4, "10.0.0.1:6379", 6) == 6  # a joined cluster: this process's count
    monkeypatch.setenv("TINYSCOPE_WORKER_THREADS", "3")
    assert worker_threads(2, None, 16) == 3 and worker_threads(2, "10.0.0.1:6379", 6) == 3
