"""Views shared by the retrieval page and (for diverse examples) the neuron page.

``show_diverse_examples(model, layer, neuron)`` puts a neuron's plain top examples (by activation)
next to the same examples re-selected greedily by SIFT (near-duplicates give way to other
contexts). It needs the live model (examples are embedded with it) and a neuron run.
"""

from __future__ import annotations

import streamlit as st

from .render import tokens_html
from .state import DB_URL, get_model, get_store


@st.cache_data(show_spinner="Embedding the examples…", max_entries=64)
def _diverse(url: str, model: str, source: str, layer: int, neuron: int, lam: float, v: float = 0.0):
    from precompute.retrieval.support import diverse_examples

    lm = get_model(source)
    with get_store(url).session() as s:
        return diverse_examples(s, lm, model, layer, neuron, None, lam)


def _example_html(e) -> str:
    return tokens_html(
        [t.text for t in e.tokens], list(e.acts), special=[t.special for t in e.tokens], highlight=e.max_index
    )


def show_diverse_examples(model: str, source: str, layer: int, neuron: int, lam: float = 0.1, n_show: int = 10,
                          url: str = DB_URL) -> None:
    """Plain vs diverse top examples of one neuron, side by side (errors shown as one line)."""
    from precompute.models import ModelError
    from precompute.store.queries import NotFound

    from .cached import db_version

    try:
        d = _diverse(url, model, source, int(layer), int(neuron), float(lam), db_version(url))
    except (NotFound, ModelError, ValueError) as e:
        st.info(str(e))
        return
    rank = {(e.seq_idx, e.pos): i for i, e in enumerate(d.plain)}
    left, right = st.columns(2)
    with left:
        st.markdown("**Top examples by activation**")
        for e in d.plain[:n_show]:
            st.caption(f"#{rank[(e.seq_idx, e.pos)] + 1} · act {e.act:.3f} · seq {e.seq_idx}")
            st.html(_example_html(e))
    with right:
        st.markdown("**Diverse re-selection (SIFT, no repeats)**")
        for e, p in list(zip(d.diverse, d.selection.picks))[:n_show]:
            st.caption(f"pick {p.step} = #{rank[(e.seq_idx, e.pos)] + 1} · act {e.act:.3f} · "
                       f"redundancy {p.redundancy:.2f} · coverage left {p.variance:.2f}")
            st.html(_example_html(e))
    st.caption(
        "The diverse list covers all top examples (weighted by activation) with as few picks as "
        "possible: once a context is picked, its near-duplicates add little and other contexts come "
        "first. 'Coverage left' is the surrogate's remaining variance over the examples (1 = none covered)."
    )
