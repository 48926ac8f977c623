"""Story view of n-gram rule matches: ``/story?model=M&story=S&pos=P`` (a stored sequence of the
newest rules run) or ``/story?model=M&prompt=...&pos=P`` (live: a prompt typed by the user).

Each token is coloured by the distance of the optimal rule for *predicting it* (the model's
distribution at the previous position): transparent = some rule fits exactly, orange = no rule
fits well, blue = no rule is defined (the context never occurs in the training data). Selecting a
token shows the model's top tokens beside the optimal rule's distribution, the rule marked on its
context, its support and the best rule of each length.
"""

from __future__ import annotations

import html

import altair as alt
import pandas as pd
import streamlit as st

from app import cached, limits, render, url
from app.state import DB_URL, bad_param, get_model, note_lowercase, param_int
from precompute.errors import one_line
from precompute.models import ModelError
from precompute.ngrams.views import TokenMatch
from precompute.jobs.rules import tables as rq
from precompute.store.queries import NotFound

@st.cache_data(show_spinner=False, max_entries=64)
def story(db: str, model: str, seq: int, v: float = 0.0) -> rq.RulesStory:
    with cached._session(db) as s:
        return rq.rules_story(s, model, seq)


@st.cache_data(show_spinner=False, max_entries=32)
def overview(db: str, model: str, v: float = 0.0) -> rq.RulesOverview:
    with cached._session(db) as s:
        return rq.rules_overview(s, model)


@st.cache_resource(show_spinner="Building the n-gram index (once per model and corpus)…", max_entries=4)
def get_index(source: str, corpus: str, rule_set: str, split: str):
    from precompute.ngrams.training import open_index

    return open_index(get_model(source), corpus, rule_set, split, progress=False)


@st.cache_data(show_spinner="Running the model and matching rules…", max_entries=64)
def live_matches(source: str, corpus: str, text: str, rule_set: str, distance: str, split: str):
    from precompute.jobs.rules import match_prompt

    lm = get_model(source)
    ids = lm.encode(text)[: lm.n_ctx]
    special = lm.special_ids
    toks = tuple((t, s in special) for t, s in zip(lm.token_strs(ids), ids))
    return toks, tuple(match_prompt(lm, get_index(source, corpus, rule_set, split), text, rule_set, distance))


def rule_html(m: TokenMatch) -> str:
    """The optimal rule on its context: kept tokens boxed, `*` for marginalised, dropped struck."""
    fit = m.optimal
    ctx = list(m.context)
    n = len(fit.template)
    older = ctx[: len(ctx) - n]
    parts = [f'<span style="color:#bbb">{html.escape(render.visible_text(t)[0])}</span>' for t in older]
    for c, t in zip(fit.template, ctx[-n:]):
        text = html.escape(render.visible_text(t)[0])
        if c == "+":
            parts.append(f'<span class="rule-kept" style="background:#d7f0d2;border:1px solid #4a4;padding:0 3px;border-radius:3px">{text}</span>')
        elif c == "*":
            parts.append(f'<span class="rule-any" title="any token ({text} here)" style="background:#ffe9a8;border:1px dashed #b80;padding:0 3px;border-radius:3px">*</span>')
        else:
            parts.append(f'<del class="rule-dropped" style="color:#999">{text}</del>')
    return ('<div class="rule" style="font-family:ui-monospace,Menlo,monospace;font-size:1.05em;line-height:2">'
            + " ".join(parts) + " &rarr; ?</div>")


def bars(rows: list[tuple[int, str, float]], title: str, color: str, highlight: int) -> alt.Chart:
    df = pd.DataFrame([dict(token=f"{render.visible_text(t)[0]!r}", p=q, actual=(i == highlight)) for i, t, q in rows])
    return (
        alt.Chart(df, title=title).mark_bar(color=color).encode(
            x=alt.X("p:Q", scale=alt.Scale(domain=[0, 1]), title="probability"),
            y=alt.Y("token:N", sort=None, title=None, axis=alt.Axis(labelFont="monospace", labelOverlap=False)),
            opacity=alt.condition("datum.actual", alt.value(1.0), alt.value(0.65)),
            tooltip=["token", alt.Tooltip("p:Q", format=".3f")],
        ).properties(height=24 * max(3, len(df)) + 30)
    )


def show(tokens: tuple[tuple[str, bool], ...], matches: tuple[TokenMatch, ...], pos_default: int | None, distance: str) -> None:
    """Colour the tokens, let the user pick one, and show its match (stored and live alike)."""
    by_pos = {m.pos: m for m in matches}
    values, titles = [], []
    for i, (t, special) in enumerate(tokens):
        m = by_pos.get(i)
        if m is None or special or not m.context:
            values.append(None)
            titles.append(f"{t!r} pos {i}" + (": no context before it" if m is not None and not special else ""))
        elif m.optimal is None:
            values.append(-0.6)
            titles.append(f"{t!r} pos {i}: no rule defined")
        else:
            values.append(max(m.optimal.distance, 1e-6))
            titles.append(f"{t!r} pos {i}: {m.optimal.rendered} distance {m.optimal.distance:.3f}, support {m.support}")
    choices = [m.pos for m in matches]
    if not choices:
        st.warning("Nothing to show: the text needs at least two tokens.")
        return
    if pos_default not in choices:
        defined = [m.pos for m in matches if m.optimal is not None]
        pos_default = defined[min(len(defined) - 1, 8)] if defined else choices[0]
    pos = st.selectbox(
        "Token (the prediction of it, made at the previous position)", choices, index=choices.index(pos_default),
        format_func=lambda i: f"{i}: {render.visible_text(tokens[i][0])[0]}",
    )
    url.sync("pos", pos)
    st.html(render.tokens_html([t for t, _ in tokens], values, special=[s for _, s in tokens], vmax=1.0, highlight=pos, titles=titles))
    st.caption(f"Colour: {distance} distance of the optimal rule for predicting each token — clear = a rule fits exactly, "
               "orange = no rule fits well (1 = disjoint), blue = no rule defined, dashed = special token.")
    m = by_pos[pos]
    st.subheader(f"Predicting {render.visible_text(m.token)[0]!r} (position {pos})")
    top = m.model_top[0] if m.model_top else None
    if top:
        st.markdown(f"Model's top token: `{render.visible_text(top[1])[0]}` ({top[2]:.3f}) — "
                    + ("**correct**" if m.model_correct else "not the true next token"))
    if m.optimal is None:
        st.warning("No rule is defined here: no template's modified context occurs in the training corpus.")
        return
    st.html(rule_html(m))
    st.markdown(
        f"Optimal rule `{m.optimal.template}` (length {m.optimal.n}): {m.optimal.distance:.3f} {distance} distance, "
        f"support **{m.support:,}** occurrences, top-1 agreement **{m.agreement:.2f}** · "
        f"stupid backoff: {m.backoff_n}-gram, agreement {m.backoff_agreement:.2f}"
    )
    st.caption("Green = kept token, `*` = any token, struck through = dropped, grey = context the rule ignores.")
    left, right = st.columns(2)
    with left:
        st.altair_chart(bars(list(m.model_top), "Model: top tokens", "#4c78a8", m.token_id), use_container_width=True)
    with right:
        st.altair_chart(bars(list(m.rule_top), f"Rule {m.optimal.template}: training-data next tokens", "#f58518", m.token_id),
                        use_container_width=True)
    st.markdown("**Best rule of each length**")
    rows = []
    for n, fit in enumerate(m.best_by_length, start=1):
        rows.append(dict(length=n, rule="–" if fit is None else fit.rendered, template="" if fit is None else fit.template,
                         distance=None if fit is None else round(fit.distance, 4)))
    st.dataframe(pd.DataFrame(rows), hide_index=True, use_container_width=True)


# -------------------------------------------------------------------------------- page
model, info, V = cached.page_model("rules --ngram-corpus ...")
try:
    ov = overview(DB_URL, model, V)
except NotFound as e:
    bad_param(str(e))

st.title(f"Rule matches · {model}")
st.caption("Rules describe the model's predictions (chosen after seeing them); they do not explain them. "
           f"Rule set {ov.rule_set}, n-gram corpus {ov.ngram_corpus} split into "
           f"{'paragraphs' if ov.split == 'paragraph' else 'whole stories'}.")
mode = st.radio("Text", ["story", "live prompt"], horizontal=True,
                index=1 if url.get_str("prompt") else 0)
if mode == "story":
    if "prompt" in st.query_params:
        del st.query_params["prompt"]
    seq = param_int("story", 0, 0, ov.run.n_sequences - 1)
    seq = st.number_input("Story (sequence of the run)", 0, ov.run.n_sequences - 1, seq, step=1)
    url.sync("story", int(seq), 0)
    try:
        data = story(DB_URL, model, int(seq), V)
    except NotFound as e:
        bad_param(str(e))
    st.caption(f"Sequence {data.seq_idx} (story {data.story_id} of {ov.run.corpus}), {len(data.tokens)} tokens.")
    show(tuple((t.text, t.special) for t in data.tokens), data.matches, param_int("pos", None, 0, len(data.tokens) - 1), data.distance)
else:
    if "story" in st.query_params:
        del st.query_params["story"]
    text, clipped = limits.clip_prompt(url.get_str("prompt", "Once upon a time, there was a little girl named Lily."))
    text = st.text_area("Prompt", text, max_chars=limits.MAX_PROMPT_CHARS)
    note_lowercase(info.source)
    st.caption(limits.describe())
    url.sync("prompt", text)
    if clipped:
        st.warning(clipped)
    with limits.live_slot():  # one live request: the model run, the rule matching and their rendering
        try:
            toks, matches = live_matches(info.source, ov.ngram_corpus, text, ov.rule_set, ov.distance, ov.split)
        except (ModelError, ValueError, OSError) as e:
            st.error(one_line(e))
            st.stop()
        show(toks, matches, param_int("pos", None, 0, 100_000), ov.distance)
