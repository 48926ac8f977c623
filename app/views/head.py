"""Head page: ``/head?model=M&layer=L&head=H``.

The head's distance profile (``logx=1``: symlog distance axis), its scores with one-sentence
definitions, the stored example patterns, and a live prompt (``prompt``) drawn as a query x key
heatmap plus token highlighting for one query position (``q``). All view state is in the URL.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from app import cached, limits, render, url
from app.live import head_on_text
from app.state import DB_URL, bad_param, get_model, note_lowercase, param_int
from precompute.models import ModelError
from precompute.jobs.heads import tables as hq
from precompute.store.queries import NotFound

MIN_QUERIES = 20  # profile points seen by fewer queries are noise; not drawn
MAX_LIVE = 128  # live heatmap: at most this many tokens (the highlighting uses them all)


@st.cache_data(show_spinner=False, max_entries=256)
def head_page(db: str, model: str, layer: int, head: int, v: float = 0.0) -> hq.HeadPage:
    with cached._session(db) as s:
        return hq.head_page(s, model, layer, head)


@st.cache_data(show_spinner="Running the model…", max_entries=64)
def live_pattern(source: str, text: str, layer: int, head: int, prepend_bos: bool):
    r = head_on_text(get_model(source), text, layer, head, prepend_bos)
    return r.ids, r.tokens, r.special, r.pattern


def head_params(model: str, layer: int, head: int) -> dict[str, str]:
    return {"model": model, "layer": str(int(layer)), "head": str(int(head))}


def pattern_chart(tokens: list[str], pattern, title: str, cell: int = 14) -> alt.Chart:
    """Query (rows) x key (columns) heatmap of a causal pattern; axis labels are 'position token'."""
    n = len(tokens)
    labels = [f"{i} {render.visible_text(t)[0]}" for i, t in enumerate(tokens)]
    rows = [dict(q=labels[q], k=labels[k], qi=q, ki=k, w=float(pattern[q][k])) for q in range(n) for k in range(q + 1)]
    return (
        alt.Chart(pd.DataFrame(rows), title=title)
        .mark_rect()
        .encode(
            x=alt.X("k:O", sort=labels, title="key (attended to)", axis=alt.Axis(labelFontSize=9, labelAngle=-60, labelOverlap=n > 48)),
            y=alt.Y("q:O", sort=labels, title="query", axis=alt.Axis(labelFontSize=9, labelOverlap=n > 48)),
            color=alt.Color("w:Q", title="weight", scale=alt.Scale(scheme="oranges", domain=[0, 1])),
            tooltip=[alt.Tooltip("q:N", title="query"), alt.Tooltip("k:N", title="key"), alt.Tooltip("w:Q", format=".3f", title="weight")],
        )
        .properties(width=cell * n + 10, height=cell * n + 10)
    )


# -------------------------------------------------------------------------------- what to show
model, info, V = cached.page_model("heads")
layer = param_int("layer", 0, 0, info.n_layers - 1)
head = param_int("head", 0, 0, info.n_heads - 1)
try:
    p = head_page(DB_URL, model, layer, head, V)
except NotFound as e:
    bad_param(str(e))
S = p.summary
run = p.run

# -------------------------------------------------------------------------------- header
st.title(f"{model} · L{layer} H{head}")
st.caption(
    f"Attention head {head} of layer {layer} ({info.n_heads} heads × {info.n_layers} layers). Heads run {run.id}: "
    f"{run.n_tokens:,} query tokens from {run.corpus}{' (synthetic)' if run.corpus_synthetic else ''}; "
    f"{'BOS prepended (BOS queries not scored)' if run.prepend_bos else 'no BOS'}."
)
total = p.n_layers * p.n_heads
idx = layer * p.n_heads + head
pl, ph = divmod((idx - 1) % total, p.n_heads)
nl, nh = divmod((idx + 1) % total, p.n_heads)
nav = st.columns([1, 1, 1, 3])
nav[0].page_link("views/head.py", label=f"← L{pl} H{ph}", query_params=head_params(model, pl, ph))
nav[1].page_link("views/head.py", label=f"L{nl} H{nh} →", query_params=head_params(model, nl, nh))
nav[2].page_link("views/heads.py", label="↑ All heads", query_params={"model": model})
th = p.label_thresholds
roles = f" · roles: **{', '.join(S.roles)}**" if S.roles else ""
st.markdown(
    f"Label: **{S.label} head** (distance R² = {S.distance_r2:.3f}; ≥ {th['distance']:g} distance, "
    f"< {th['semantic']:g} semantic){roles}"
)

# -------------------------------------------------------------------------------- scores
left, right = st.columns([2, 3])
with left:
    st.subheader("Scores")
    defs = dict(hq.SCORE_DEFINITIONS)
    defs["induction"] = defs["induction"].rstrip(".") + f" (2 × {p.induction_len} tokens after BOS)."
    lines = []
    for k, title in hq.SCORE_TITLES.items():
        v = getattr(S, k)
        shown = "n/a" if v is None else f"{v:.3f}"
        lines.append(f'<div class="score" style="margin-bottom:0.6em;"><b>{title}</b>: <code>{shown}</code><br>'
                     f'<span style="color:#555;font-size:0.9em;">{defs[k]}</span></div>')
    st.html("".join(lines))

# -------------------------------------------------------------------------------- profile
with right:
    st.subheader("Distance profile")
    logx = st.checkbox("log distance axis", value=url.get_str("logx") == "1")
    url.sync("logx", "1" if logx else "", "")
    prof = pd.DataFrame(dict(distance=range(len(p.profile)), weight=p.profile, queries=p.profile_counts))
    prof = prof[prof["queries"] >= MIN_QUERIES]
    xscale = alt.Scale(type="symlog") if logx else alt.Scale()
    line = (
        alt.Chart(prof)
        .mark_line(point=alt.OverlayMarkDef(size=18))
        .encode(
            x=alt.X("distance:Q", scale=xscale, title="distance d = query − key" + (" (symlog)" if logx else "")),
            y=alt.Y("weight:Q", title="mean attention weight"),
            tooltip=["distance", alt.Tooltip("weight:Q", format=".4f"), alt.Tooltip("queries:Q", title="queries that see d")],
        )
        .properties(height=300)
    )
    st.altair_chart(line, width="stretch")
    st.caption(
        f"Mean weight on the key d tokens back, over the queries that can see d (d = 0 is the token itself; "
        f"distances seen by fewer than {MIN_QUERIES} queries are not drawn). Mean distance {S.mean_distance:.1f} tokens."
    )

# -------------------------------------------------------------------------------- examples
st.subheader("Example patterns")
if not p.examples:
    st.caption("This run stored no example patterns.")
else:
    tabs = st.tabs([f"sequence {e.seq_idx}" for e in p.examples])
    for tab, e in zip(tabs, p.examples):
        with tab:
            st.altair_chart(
                pattern_chart([t.text for t in e.tokens], e.pattern, f"sequence {e.seq_idx} (story {e.story_id})"),
                width="content",
            )
    st.caption(f"The first {len(p.examples[0].tokens)} tokens of corpus sequences; rows are queries, columns keys. "
               "Hover a cell for its weight.")

# -------------------------------------------------------------------------------- live
st.subheader("Try a prompt")
prompt, clipped = limits.clip_prompt(url.get_str("prompt"))
with st.form("live"):
    prompt = st.text_area("Prompt", prompt, placeholder="Once upon a time, Lily saw a dog. Lily said hi to the dog.", height=90,
                          max_chars=limits.MAX_PROMPT_CHARS)
    st.form_submit_button("Run")
note_lowercase(info.source)
st.caption(limits.describe())
url.sync("prompt", prompt, "")
if clipped:
    st.warning(clipped)
if prompt:
    with limits.live_slot():  # one live request: the model run and its rendering
        try:
            ids, toks, special, pat = live_pattern(info.source, prompt, layer, head, run.prepend_bos)
        except ModelError as e:
            st.error(f"Cannot run {model} live: {e}")
            ids = ()
        if ids:
            n = len(ids)
            choices = list(range(n))
            raw = url.get_str("q")
            q = min(int(raw), n - 1) if raw.isdigit() else n - 1  # a link's q may outlast a shorter prompt
            q = st.selectbox(
                "Query token: what does it attend to?", choices, index=q,
                format_func=lambda i: f"{i}: {render.visible_text(toks[i])[0]}",
            )
            url.sync("q", q, n - 1)
            weights = [float(pat[q][k]) if k <= q else None for k in range(n)]
            top = max(range(q + 1), key=lambda k: pat[q][k])
            st.markdown(
                f"Position **{q}** (`{render.visible_text(toks[q])[0]}`) puts its largest weight, **{pat[q][top]:.3f}**, "
                f"on position **{top}** (`{render.visible_text(toks[top])[0]}`, {q - top} back)."
            )
            st.html(
                '<div class="live-attn">'
                + render.tokens_html(list(toks), weights, special=list(special), vmax=1.0, highlight=q,
                                     titles=[f"{render.visible_text(t)[0]!r} pos {k}" + (f"  weight {weights[k]:.3f}" if weights[k] is not None else "  (after the query)")
                                             for k, t in enumerate(toks)])
                + "</div>"
            )
            st.caption("Each token's colour is the weight the outlined query puts on it (full orange = 1).")
            m = min(n, MAX_LIVE)
            pick = alt.selection_point(fields=["qi"], name="pick", on="click")
            chart = pattern_chart(list(toks[:m]), pat[:m, :m], "this head on the prompt", cell=14 if m <= 48 else 8).add_params(pick)
            key = f"live-{model}-{layer}-{head}"
            ev = st.altair_chart(chart, on_select="rerun", selection_mode="pick", key=key, width="content")
            st.caption("Click a row of the heatmap to make that token the query.")
            sel = url.new_selection(key, (getattr(ev, "selection", None) or {}).get("pick") or [])
            if sel and "qi" in sel[0] and int(sel[0]["qi"]) != q:
                url.sync("q", int(sel[0]["qi"]), n - 1)
                st.rerun()
            if n > MAX_LIVE:
                st.caption(f"The heatmap shows the first {MAX_LIVE} of {n} tokens.")

with st.expander("Link to this view"):
    st.code(url.full_url("head"), language=None)
