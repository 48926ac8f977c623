"""Stored neuron explanations in the pages: the cached queries (``precompute/jobs/explanations``)
and the neuron page's list, each explanation a link that opens it as the spectrum's hypothesis."""

from __future__ import annotations

import re

import streamlit as st

from precompute.jobs.explanations import tables as eq

from . import url
from .state import get_store

_MD = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>$])")


def md_escape(text: str) -> str:
    """``text`` shown literally where Streamlit reads Markdown (a link's label)."""
    return _MD.sub(r"\\\1", text)


@st.cache_data(show_spinner=False, max_entries=256)
def neuron_explanations(db_url: str, model: str, layer: int, neuron: int, neurons_run: int, v: float = 0.0):
    with get_store(db_url).session() as s:
        return eq.neuron_explanations(s, model, layer, neuron, neurons_run)


@st.cache_data(show_spinner=False, max_entries=32)
def best_explanations(db_url: str, model: str, v: float = 0.0, neurons_run: int | None = None):
    """(layer, unit) -> best explanation, of the newest neuron run (or of run ``neurons_run``: a feature run's)."""
    with get_store(db_url).session() as s:
        return eq.best_explanations(s, model, neurons_run)


@st.cache_data(show_spinner=False, max_entries=32)
def unit_scores(db_url: str, model: str, layer: int, v: float = 0.0):
    """Neurons vs SAE features of a layer by best-explanation F1 (None: not both explained)."""
    with get_store(db_url).session() as s:
        return eq.unit_scores(s, model, layer)


@st.cache_data(show_spinner=False, max_entries=64)
def search(db_url: str, model: str, words: str, limit: int = 50, v: float = 0.0):
    with get_store(db_url).session() as s:
        return eq.search_explanations(s, model, words, limit)


def hypothesis_params(e: eq.ExplanationView) -> dict[str, str]:
    """URL parameters that open explanation ``e`` as the neuron page's hypothesis (a feature's: its page)."""
    return dict(**({"unit": "feature"} if e.unit == "feature" else {}), hyp=e.text, mode=e.mode, top=str(e.top_pct))


def hypothesis_link(model: str, e: eq.ExplanationView) -> str:
    return url.neuron_link(model, e.layer, e.neuron, **hypothesis_params(e))


def scores_text(e: eq.ExplanationView) -> str:
    return (f"score {e.score:.2f} · explains {e.recall:.0%} of the top {e.top_pct}% "
            f"({e.n_top:,} tokens) · precision {e.precision:.0%}")


def show_list(model: str, layer: int, neuron: int, explanations: list[eq.ExplanationView]) -> None:
    """The neuron page's list: one link per explanation (it opens as the hypothesis) and its scores."""
    for e in explanations:
        c = st.columns([2, 3])
        with c[0]:
            st.page_link("views/neuron.py", label=md_escape(e.label),
                         query_params=url.neuron_params(model, layer, neuron, **hypothesis_params(e)))
        c[1].caption(scores_text(e))
    st.caption("Found offline from its own stored data and scored on its spectrum sample as the "
               "hypothesis below scores what you type: F1 of precision and recall of 'activation in the top range'. "
               "Click one to see it on the spectrum.")
