"""What every page shares: the database handle, cached model loads, and URL parameters.

Page state lives in the URL (``st.query_params``) so a copied link reopens the same view.
"""

from __future__ import annotations

import os

import streamlit as st

from precompute.store.db import DEFAULT_DB, StoreError
from precompute.store.db import open_readonly

DB_URL = os.environ.get("TINYSCOPE_DB", DEFAULT_DB)


@st.cache_resource(show_spinner=False)
def get_store(url: str = DB_URL):
    """The database, read-only: no page can change it."""
    return open_readonly(url)


def store_or_stop():
    """The store, or a message saying how to build it (and the page stops)."""
    try:
        return get_store(DB_URL)
    except StoreError as e:
        st.error(str(e))
        st.write("Build it (the bundled model on stories it samples itself; add `--corpus your.txt` for real text):")
        db = "" if DB_URL == DEFAULT_DB else f" --db '{DB_URL}'"
        st.code(f"precompute run --jobs neurons,heads{db}", language="bash")
        st.stop()


@st.cache_resource(show_spinner="Loading model…")
def get_model(source: str):
    import torch

    from precompute.models import load_model

    lm = load_model(source)
    if lm.n_params < 50_000_000:
        # a small model's forward pass is faster on one thread than on threads fighting the
        # app's other work for two cores (measured: 11 ms vs 133 ms for 128 tokens of stories260K)
        torch.set_num_threads(1)
    return lm


def param_int(name: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int | None:
    """An integer URL parameter; out of range or malformed -> a clear message and the page stops."""
    raw = st.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        bad_param(f"URL parameter {name}={raw!r} is not a whole number")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bad_param(f"URL parameter {name}={v} is out of range ({lo}-{hi})")
    return v


def bad_param(message: str):
    st.error(message)
    st.page_link("views/overview.py", label="Go to the model overview")
    st.stop()


@st.cache_data(show_spinner=False)
def lowercase_note(source: str) -> str | None:
    """A note for every box where the user types text for this model, when its tokenizer lowercases
    (a ``Lowercase`` normalizer in its tokenizer.json); None otherwise or when there is no such file."""
    import json
    from pathlib import Path

    try:
        norm = json.loads((Path(source) / "tokenizer.json").read_text()).get("normalizer")
    except (OSError, ValueError):
        return None
    if '"Lowercase"' in json.dumps(norm):
        return "This model lowercases text: what you type is lowercased before the model sees it."
    return None


def note_lowercase(source: str) -> None:
    """The lowercase note as a caption under a text box (nothing for a model that keeps case)."""
    note = lowercase_note(source)
    if note:
        st.caption(note)
