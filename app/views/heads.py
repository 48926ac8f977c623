"""Heads overview: ``/heads?model=M&score=S``.

A layer x head heatmap of one score (``score``), the distance / mixed / semantic labels, and a
sortable table of every head. Clicking a cell or a table row opens that head's page.
"""

from __future__ import annotations

from urllib.parse import urlencode

import altair as alt
import pandas as pd
import streamlit as st

from app import cached, url
from app.state import DB_URL, bad_param, store_or_stop
from precompute.jobs.heads import tables as hq
from precompute.store.queries import NotFound

LABEL_COLORS = {"distance": "#2870ff", "mixed": "#9aa5b1", "semantic": "#ff7600"}


@st.cache_data(show_spinner=False, max_entries=32)
def heads_overview(db: str, model: str, v: float = 0.0) -> hq.HeadsOverview:
    with cached._session(db) as s:
        return hq.heads_overview(s, model)


def head_params(model: str, layer: int, head: int) -> dict[str, str]:
    return {"model": model, "layer": str(int(layer)), "head": str(int(head))}


def head_link(model: str, layer: int, head: int) -> str:
    return "head?" + urlencode(head_params(model, layer, head))


# -------------------------------------------------------------------------------- what to show
store_or_stop()
V = cached.db_version(DB_URL)
models = cached.list_models(DB_URL, V)
if not models:
    bad_param("The database holds no models yet; build it with `precompute run --jobs heads`.")
names = [m.name for m in models]
with_heads = [n for n in names if any(r.job == "heads" for r in cached.list_runs(DB_URL, n, V))]
model = url.get_str("model") or (with_heads or names)[0]
if model not in names:
    bad_param(f"model {model!r} is not in this database (models: {', '.join(names)})")
try:
    ov = heads_overview(DB_URL, model, V)
except NotFound as e:
    bad_param(str(e))

st.title(f"{model} · attention heads")
if len(names) > 1:
    choice = st.selectbox("Model", names, index=names.index(model))
    if choice != model:
        st.query_params["model"] = choice
        st.rerun()
run = ov.run
th = ov.label_thresholds
counts = {k: sum(1 for h in ov.heads if h.label == k) for k in LABEL_COLORS}
st.caption(
    f"{ov.n_layers} layers × {ov.n_heads} heads. Heads run {run.id}: {run.n_tokens:,} query tokens from "
    f"{run.corpus}{' (synthetic)' if run.corpus_synthetic else ''}; "
    f"{'BOS prepended (BOS queries not scored)' if run.prepend_bos else 'no BOS'}; "
    f"induction test on 2 × {ov.induction_len} random tokens."
)
st.markdown(
    f"**{counts['distance']} distance heads**, **{counts['mixed']} mixed**, **{counts['semantic']} semantic heads** "
    f"(distance R² ≥ {th['distance']:g} → distance, < {th['semantic']:g} → semantic)."
)

# -------------------------------------------------------------------------------- heatmap
scores = list(hq.SCORE_TITLES)
score = url.get_choice("score", scores, "distance_r2")
score = st.selectbox("Heatmap score", scores, index=scores.index(score), format_func=hq.SCORE_TITLES.get)
url.sync("score", score, "distance_r2")
st.caption(hq.SCORE_DEFINITIONS[score])
df = pd.DataFrame(
    [
        dict(layer=h.layer, head=h.head, value=getattr(h, score), label=h.label, mark=h.label[0].upper(),
             roles=", ".join(h.roles) or "-", r2=h.distance_r2, prev=h.prev_token, ind=h.induction)
        for h in ov.heads
    ]
)
bounded = score not in ("mean_distance", "entropy")
scale = alt.Scale(scheme="viridis", domain=[0, 1]) if bounded else alt.Scale(scheme="viridis")
pick = alt.selection_point(fields=["layer", "head"], name="pick", on="click")
base = alt.Chart(df).encode(
    x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0, labelOverlap=False)),
    y=alt.Y("layer:O", title="layer", axis=alt.Axis(labelOverlap=False)),
)
cells = base.mark_rect(stroke="white").encode(
    color=alt.Color("value:Q", title=hq.SCORE_TITLES[score], scale=scale),
    tooltip=[
        "layer", "head", alt.Tooltip("value:Q", format=".3f", title=hq.SCORE_TITLES[score]), "label", "roles",
        alt.Tooltip("r2:Q", format=".3f", title="distance R²"), alt.Tooltip("prev:Q", format=".3f", title="previous-token"),
        alt.Tooltip("ind:Q", format=".3f", title="induction"),
    ],
).add_params(pick)
text = base.mark_text(fontSize=11).encode(
    text="mark:N",
    color=alt.condition(alt.datum.value > (0.5 if bounded else float(df["value"].median())), alt.value("black"), alt.value("white")),
)
chart = (cells + text).properties(
    height=36 * ov.n_layers + 40, width=min(900, 60 * ov.n_heads + 120), title=f"{model}: {hq.SCORE_TITLES[score]} per head"
)
ev = st.altair_chart(chart, on_select="rerun", selection_mode="pick", key=f"heads-heat-{model}-{score}", width="content")
st.caption("Letters: D = distance head, M = mixed, S = semantic. Click a cell to open that head.")
sel = url.new_selection(f"heads-heat-{model}-{score}", (getattr(ev, "selection", None) or {}).get("pick") or [])
if sel and "layer" in sel[0] and "head" in sel[0]:
    st.switch_page("views/head.py", query_params=head_params(model, int(sel[0]["layer"]), int(sel[0]["head"])))

# -------------------------------------------------------------------------------- table
tdf = pd.DataFrame(
    [
        dict(head=f"L{h.layer} H{h.head}", link=head_link(model, h.layer, h.head), label=h.label, roles=", ".join(h.roles),
             distance_r2=h.distance_r2, prev_token=h.prev_token, first_token=h.first_token,
             duplicate_token=h.duplicate_token, induction=h.induction, mean_distance=h.mean_distance, entropy=h.entropy)
        for h in ov.heads
    ]
)
num = lambda title: st.column_config.NumberColumn(title, format="%.3f")  # noqa: E731
table = st.dataframe(
    tdf,
    hide_index=True,
    width="stretch",
    on_select="rerun",
    selection_mode="single-row",
    key=f"heads-table-{model}",
    column_config={
        "link": st.column_config.LinkColumn("open", display_text="open ↗", width="small"),
        "roles": st.column_config.TextColumn("roles", width="small"),
        **{k: num(hq.SCORE_TITLES[k]) for k in hq.SCORE_TITLES},
    },
)
st.caption("Click a column header to sort; select a row (or click open ↗) to open the head.")
rows = url.new_selection(f"heads-table-{model}", (getattr(table, "selection", None) or {}).get("rows") or [])
if rows:
    h = ov.heads[int(rows[0])]
    st.switch_page("views/head.py", query_params=head_params(model, h.layer, h.head))
