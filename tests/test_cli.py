"""Bad input gets one clear line and exit code 2, and nothing in the database is lost."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from precompute.cli import main


def _snapshot(url: str) -> dict:
    """Row counts of what pages can see: complete runs and their rows (an unfinished run's rows
    stay invisible until it completes, and can be resumed)."""
    path = url[len("sqlite:///") :]
    con = sqlite3.connect(path)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        out = {}
        for t in tables:
            cols = [r[1] for r in con.execute(f"pragma table_info({t})")]
            if t == "runs":
                q = "select count(*) from runs where status = 'complete'"
            elif "run_id" in cols:
                q = f"select count(*) from {t} where run_id in (select id from runs where status = 'complete')"
            else:
                q = f"select count(*) from {t}"
            out[t] = con.execute(q).fetchone()[0]
        return out
    finally:
        con.close()


@pytest.fixture()
def db(tmp_path, neurons_db):
    path = tmp_path / "copy.db"
    shutil.copy(neurons_db[len("sqlite:///") :], path)
    return f"sqlite:///{path}"


@pytest.fixture()
def small_corpus(tmp_path, valid_corpus):
    text = valid_corpus.read_text().split("\n\n")[:40]
    p = tmp_path / "small.txt"
    p.write_text("\n\n".join(text))
    return p


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_bad_corpora(capsys, tmp_path, db, stories260k_path):
    before = _snapshot(db)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02 some bytes \xff\xfe" * 20)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    cases = [
        (empty, "is empty"),
        (binary, "looks binary"),
        (latin, "not UTF-8"),
        (tmp_path / "missing.txt", "not found"),
    ]
    for path, msg in cases:
        rc, err = _run(capsys, "run", "--model", str(stories260k_path), "--corpus", str(path), "--db", db)
        assert rc == 2 and err.startswith("error:") and msg in err, err
    assert _snapshot(db) == before


def test_bad_model_and_job(capsys, tmp_path, db, small_corpus):
    before = _snapshot(db)
    rc, err = _run(capsys, "run", "--model", str(tmp_path / "nope"), "--corpus", str(small_corpus), "--db", db)
    assert rc == 2 and "not found" in err
    rc, err = _run(capsys, "run", "--jobs", "nonsense", "--corpus", str(small_corpus), "--db", db)
    assert rc == 2 and "unknown job nonsense" in err
    assert _snapshot(db) == before


def test_show_out_of_range_and_unknown(capsys, db):
    rc, err = _run(capsys, "show", "neuron", "--model", "stories260K", "--layer", "7", "--neuron", "0", "--db", db)
    assert rc == 2 and "layer 7 out of range" in err
    rc, err = _run(capsys, "show", "neuron", "--model", "stories260K", "--layer", "0", "--neuron", "172", "--db", db)
    assert rc == 2 and "neuron 172 out of range" in err
    rc, err = _run(capsys, "show", "neuron", "--model", "gpt7", "--layer", "0", "--neuron", "0", "--db", db)
    assert rc == 2 and "'gpt7' is not in this database" in err
    rc, err = _run(capsys, "show", "neuron", "--model", "stories260K", "--layer", "0", "--neuron", "0", "--run", "999", "--db", db)
    assert rc == 2 and "run 999" in err


def test_show_neuron_json(capsys, db):
    assert main(["show", "neuron", "--model", "stories260K", "--layer", "1", "--neuron", "2", "--db", db, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stats"]["layer"] == 1 and data["stats"]["neuron"] == 2
    assert sum(data["histogram"]["counts"]) == data["run"]["n_tokens"]
    assert data["run"]["prepend_bos"] is True
    assert len(data["examples"]) == 10 and data["spectrum"] and data["logit_top"]


def test_foreign_older_and_missing_databases(capsys, tmp_path, small_corpus):
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("create table customers (id integer)")
    con.commit()
    con.close()
    rc, err = _run(capsys, "run", "--corpus", str(small_corpus), "--db", f"sqlite:///{foreign}")
    assert rc == 2 and "not a tinyscope database" in err
    older = tmp_path / "older.db"
    con = sqlite3.connect(older)
    con.execute("create table tinyscope_meta (key varchar primary key, value varchar)")
    con.execute("insert into tinyscope_meta values ('schema_version', '0')")
    con.commit()
    con.close()
    rc, err = _run(capsys, "show", "neuron", "--model", "m", "--layer", "0", "--neuron", "0", "--db", f"sqlite:///{older}")
    assert rc == 2 and "schema version 0" in err
    rc, err = _run(capsys, "runs", "--db", f"sqlite:///{tmp_path / 'absent.db'}")
    assert rc == 2 and "no database" in err
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    rc, err = _run(capsys, "runs", "--db", f"sqlite:///{garbage}")
    assert rc == 2 and "not a readable database" in err


def test_locked_database(capsys, db, stories260k_path, small_corpus):
    before = _snapshot(db)
    con = sqlite3.connect(db[len("sqlite:///") :], isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        rc, err = _run(capsys, "run", "--model", str(stories260k_path), "--corpus", str(small_corpus), "--db", db)
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert rc == 2 and "locked" in err
    assert _snapshot(db) == before


def test_failure_while_writing_rolls_back(monkeypatch, db, stories260k_path, small_corpus):
    from dataclasses import replace

    import precompute.jobs.neurons as neurons_job

    real = neurons_job.JOB.write

    def half_then_die(s, run_id, result):
        result.layers = result.layers[:2]
        real(s, run_id, result)  # rows are in the transaction ...
        raise RuntimeError("disk on fire")  # ... and then the job dies

    before = _snapshot(db)
    monkeypatch.setattr(neurons_job, "JOB", replace(neurons_job.JOB, write=half_then_die))
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["run", "--model", str(stories260k_path), "--corpus", str(small_corpus), "--db", db, "--max-tokens", "800"])
    assert _snapshot(db) == before


def test_killed_run_leaves_store_as_before_and_can_rerun(db, stories260k_path, small_corpus):
    before = _snapshot(db)
    cmd = [sys.executable, "-m", "precompute.cli", "run", "--model", str(stories260k_path), "--corpus",
           str(small_corpus), "--db", db, "--max-tokens", "3000", "--batch-size", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait until it is computing, then kill it without warning
    deadline = time.time() + 60
    line = ""
    while time.time() < deadline and "shards of" not in line:
        line = proc.stderr.readline()
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _snapshot(db) == before
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    after = _snapshot(db)
    assert after["runs"] == before["runs"] + 1
    assert after["neuron_stats"] == before["neuron_stats"] + 5 * 172
