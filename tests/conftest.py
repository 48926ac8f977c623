"""Shared fixtures. Tests that need ../shared skip with a reason when it is absent (a user's clone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TINYSCOPE_SHARED", ROOT.parent / "shared"))
STORIES260K = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "corpora" / "tinystories"
BUNDLED = ROOT / "data" / "models" / "tinystories-4l"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (shared models/corpora live beside the repo in ../shared)")
    return path


@pytest.fixture(scope="session")
def stories260k_path() -> Path:
    return _need(STORIES260K)


@pytest.fixture(scope="session")
def valid_corpus() -> Path:
    return _need(TINYSTORIES / "valid-head.txt")


@pytest.fixture(scope="session")
def train1097_corpus() -> Path:
    return _need(TINYSTORIES / "train-1097.txt")


@pytest.fixture(scope="session")
def lm260k(stories260k_path):
    from precompute.models import load_model

    return load_model(str(stories260k_path))


@pytest.fixture(scope="session")
def bundled_lm():
    from precompute.models import load_model

    return load_model(str(_need(BUNDLED / "model.safetensors").parent))


@pytest.fixture(scope="session")
def seqs260k(lm260k, valid_corpus):
    """~4,000 tokens of valid-head.txt as stories260K's sequences."""
    from precompute.corpus import read_text_corpus
    from precompute.sequences import tokenize

    return tokenize(lm260k, read_text_corpus(valid_corpus, max_stories=400), ctx_len=128, max_tokens=4000)


@pytest.fixture(scope="session")
def neurons_db(tmp_path_factory, stories260k_path, valid_corpus):
    """A database with one complete neuron run of stories260K (URL string), made by `precompute run`
    on the same ~4,000 tokens as ``seqs260k``."""
    from precompute.cli import main

    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'neurons.db'}"
    assert main(["run", "--model", str(stories260k_path), "--corpus", str(valid_corpus), "--db", url, "--jobs", "neurons",
                 "--ctx-len", "128", "--max-tokens", "4000", "--top-k", "10"]) == 0
    return url


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a server of this test session's own (tests/pg_server.py), skipped where none can run


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL server (127.0.0.1, a free port); ``pg_server.create_database(name)`` -> URL."""
    from pg_server import PgServer, unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    server = PgServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_url(pg_server) -> str:
    """``postgresql+psycopg://tinyscope@127.0.0.1:PORT/tinyscope``: an empty database on that server."""
    return pg_server.create_database("tinyscope")
