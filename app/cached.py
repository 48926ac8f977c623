"""The pages' read-only queries, cached with ``st.cache_data``.

Each wrapper opens a session on the cached store and calls one query of ``precompute.store``
(the same functions `precompute show` uses). The key includes the database URL and, for a
SQLite file, its modification time, so a rebuilt database is never served from a stale cache.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from sqlalchemy import func, select

from precompute.jobs.neurons import tables as nq
from precompute.store import queries as q
from precompute.store.tables import RunRow

from .state import get_store


def db_version(url: str) -> float:
    """Changes whenever a new run completes: a SQLite file's modification time; on a database
    server, the newest complete run's id (one small query)."""
    if url.startswith("sqlite:///"):
        try:
            return Path(url[len("sqlite:///") :]).stat().st_mtime
        except OSError:
            return 0.0
    try:
        with _session(url) as s:
            return float(s.scalar(select(func.max(RunRow.id)).where(RunRow.status == "complete")) or 0)
    except Exception:  # noqa: BLE001 - the page reports an unusable database itself
        return 0.0


def _session(url: str):
    return get_store(url).session()


@st.cache_data(show_spinner=False, max_entries=32)
def list_models(url: str, v: float = 0.0) -> list[q.ModelInfo]:
    with _session(url) as s:
        return q.list_models(s)


@st.cache_data(show_spinner=False, max_entries=64)
def list_runs(url: str, model: str | None, v: float = 0.0) -> list[q.RunInfo]:
    with _session(url) as s:
        return q.list_runs(s, model)


@st.cache_data(show_spinner=False, max_entries=64)
def get_model(url: str, model: str, v: float = 0.0) -> q.ModelInfo:
    with _session(url) as s:
        return q.get_model(s, model)


@st.cache_data(show_spinner=False, max_entries=16)
def vocab(url: str, model: str, v: float = 0.0) -> list[str]:
    with _session(url) as s:
        return q.vocab(s, model)


@st.cache_data(show_spinner=False, max_entries=32)
def latest_run(url: str, model: str, job: str, v: float = 0.0) -> q.RunInfo:
    with _session(url) as s:
        return q.latest_run(s, model, job)


@st.cache_data(show_spinner=False, max_entries=256)
def neuron_page(url: str, model: str, layer: int, neuron: int, v: float = 0.0, unit: str = "neuron") -> nq.NeuronPage:
    with _session(url) as s:
        return nq.neuron_page(s, model, layer, neuron, unit=unit)


@st.cache_data(show_spinner=False, max_entries=64)
def layer_neurons(url: str, model: str, layer: int | None, v: float = 0.0, unit: str = "neuron") -> list[nq.NeuronSummary]:
    with _session(url) as s:
        return nq.layer_neurons(s, model, layer, unit=unit)


@st.cache_data(show_spinner=False, max_entries=64)
def unit_run(url: str, model: str, layer: int, unit: str, v: float = 0.0) -> q.RunInfo:
    """The run holding a layer's units (neurons, or its SAE's features); NotFound: one line."""
    with _session(url) as s:
        return nq.unit_run(s, model, layer, unit)


@st.cache_data(show_spinner=False, max_entries=32)
def feature_runs(url: str, model: str, v: float = 0.0) -> dict[int, q.RunInfo]:
    """Layer -> its newest SAE feature run."""
    with _session(url) as s:
        return nq.feature_runs(s, model)


@st.cache_resource(show_spinner=False, max_entries=8)
def load_sae(url: str, model: str, layer: int, sae_run: int):
    """A stored SAE as a module (the feature page's live test)."""
    from precompute.sae.tables import load_sae as load

    with _session(url) as s:
        return load(s, model, layer, sae_run)


@st.cache_data(show_spinner=False, max_entries=64)
def neurons_for_tokens(url: str, model: str, token_ids: tuple[int, ...], limit: int = 30, v: float = 0.0):
    """Neurons whose top tokens include any of ``token_ids`` (best mean activation first)."""
    with _session(url) as s:
        return nq.neurons_for_tokens(s, model, list(token_ids), limit)


def page_model(build_jobs: str) -> tuple[str, q.ModelInfo, float]:
    """The model a page shows (``?model=``, default the first stored with a run of the job that
    ``build_jobs`` names first), its info and the database
    version for the cache keys. No database, no models or an unknown model: a message, and the
    page stops. ``build_jobs`` goes into the build command the message suggests."""
    from . import url
    from .state import DB_URL, bad_param, store_or_stop

    store_or_stop()
    v = db_version(DB_URL)
    models = list_models(DB_URL, v)
    if not models:
        bad_param(f"The database holds no models yet; build it with `precompute run --jobs {build_jobs}`.")
    job = build_jobs.split()[0]  # default: the first model that has a run of the page's job
    with_job = [m.name for m in models if any(r.job == job for r in list_runs(DB_URL, m.name, v))]
    model = url.get_str("model") or (with_job or [models[0].name])[0]
    try:
        info = get_model(DB_URL, model, v)
    except q.NotFound as e:
        bad_param(str(e))
    return model, info, v
