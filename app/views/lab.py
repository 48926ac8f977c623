"""Lab: type text and see what a model does with it, live: next-token predictions, the most
active neurons, where every head looks, the n-gram rule, and what an ablation changes.

URL: ``/lab?model=A&model2=B&prompt=...&pos=P&pos2=P2&ablate=neuron:L:N:zero&ablate2=head:L:H:mean
&k=10&n=20&temp=0&seed=0``. ``pos``/``ablate`` belong to the first model, ``pos2``/``ablate2`` to
the second (two tokenizers cut the same text differently).
"""

from __future__ import annotations

import math
from html import escape as html_escape
from urllib.parse import urlencode

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import limits, state
from app.render import color, tokens_html, visible_text
from precompute.live import (
    ABLATION_KINDS,
    ABLATION_MODES,
    ablate,
    analyse,
    continue_text,
    format_ablation,
    neuron_corpus_mean,
    parse_ablation,
)
from precompute.models import DEFAULT_MODEL, ModelError, model_name

MAX_TOKENS = 256  # longer prompts are cut (a notice says so)
EXAMPLE = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
NONE = "(none)"
LOSS_VMAX = 5.0  # nats that get full colour in the token strip


# ---------------------------------------------------------------------------------------------
# cached work


@st.cache_data(ttl=60, show_spinner=False)
def model_choices(db_url: str) -> dict[str, str]:
    """Model name -> source: the models in the store, plus the bundled model when it exists."""
    from pathlib import Path

    from precompute.store.db import StoreError
    from precompute.store.queries import list_models

    out: dict[str, str] = {}
    try:
        store = state.get_store(db_url)
        with store.session() as s:
            out = {m.name: m.source for m in list_models(s)}
    except StoreError:
        pass
    if (Path(DEFAULT_MODEL) / "config.json").exists() and model_name(DEFAULT_MODEL) not in out:
        out[model_name(DEFAULT_MODEL)] = DEFAULT_MODEL
    return out


@st.cache_data(max_entries=32, show_spinner=False)
def cached_analysis(source: str, text: str, top_k: int):
    return analyse(state.get_model(source), text, top_k=top_k, max_tokens=MAX_TOKENS)


@st.cache_data(max_entries=32, show_spinner=False)
def cached_continuation(source: str, text: str, n: int, temp: float, seed: int):
    return continue_text(state.get_model(source), text, n_tokens=n, temperature=temp, seed=seed)


@st.cache_data(max_entries=32, show_spinner=False)
def cached_ablation(source: str, text: str, spec: str, mean_value: float | None, top_k: int):
    kind, layer, index, mode = parse_ablation(spec)
    return ablate(state.get_model(source), text, kind, layer, index, mode, mean_value=mean_value, top_k=top_k,
                  max_tokens=MAX_TOKENS)


@st.cache_data(ttl=60, show_spinner=False)
def corpus_mean(db_url: str, model: str, layer: int, neuron: int) -> float | None:
    from precompute.store.db import StoreError

    try:
        store = state.get_store(db_url)
    except StoreError:
        return None
    with store.session() as s:
        return neuron_corpus_mean(s, model, layer, neuron)


# ---------------------------------------------------------------------------------------------
# URL state: widgets start from the URL, and the URL follows the widgets


def _init(key: str, value) -> None:
    if key not in st.session_state:
        st.session_state[key] = value


def _url_int(name: str, default: int, lo: int, hi: int) -> int:
    raw = st.query_params.get(name)
    try:
        v = int(raw) if raw not in (None, "") else default
    except ValueError:
        st.warning(f"URL parameter {name}={raw!r} is not a whole number; using {default}")
        return default
    if not lo <= v <= hi:
        st.warning(f"URL parameter {name}={v} is out of range ({lo}-{hi}); using {min(max(v, lo), hi)}")
        v = min(max(v, lo), hi)
    return v


def _url_float(name: str, default: float, lo: float, hi: float) -> float:
    raw = st.query_params.get(name)
    try:
        v = float(raw) if raw not in (None, "") else default
    except ValueError:
        st.warning(f"URL parameter {name}={raw!r} is not a number; using {default}")
        return default
    if not math.isfinite(v) or not lo <= v <= hi:
        st.warning(f"URL parameter {name}={raw} is out of range ({lo}-{hi}); using {default}")
        v = default
    return v


def link(page: str, **params) -> str:
    """A relative link to another page with its URL parameters (works under any base path)."""
    return f"{page}?{urlencode(params)}"


# ---------------------------------------------------------------------------------------------
# page


def main() -> None:
    st.set_page_config(page_title="tinyscope · lab", layout="wide")
    st.title("Lab")
    choices = model_choices(state.DB_URL)
    if not choices:
        st.info(
            "No model to run yet. Build the database with `precompute run --model PATH --jobs neurons` "
            "or train the bundled model with `precompute train`."
        )
        st.stop()
    names = list(choices)
    bundled = model_name(DEFAULT_MODEL)

    qp = st.query_params
    want1 = qp.get("model") or (bundled if bundled in choices else names[0])
    want2 = qp.get("model2") or NONE
    for key, want in (("model", want1), ("model2", want2)):
        if want != NONE and want not in choices:
            st.error(f"model {want!r} is not available here (models: {', '.join(names)})")
            want = names[0] if key == "model" else NONE
        _init(f"lab_{key}", want)
    _init("lab_prompt", qp.get("prompt", ""))
    _init("lab_k", _url_int("k", 10, 1, 50))
    _init("lab_n", _url_int("n", 20, 1, 200))
    _init("lab_temp", _url_float("temp", 0.0, 0.0, 5.0))
    _init("lab_seed", _url_int("seed", 0, 0, 2**31 - 1))

    c1, c2, c3, c4, c5, c6 = st.columns([3, 3, 1, 1.3, 1.3, 1.2])
    c1.selectbox("Model", names, key="lab_model")
    c2.selectbox("Compare with", [NONE] + names, key="lab_model2")
    c3.number_input("Top-k", 1, 50, key="lab_k")
    c4.number_input("Continue (tokens)", 1, 200, key="lab_n")
    c5.number_input("Temperature", 0.0, 5.0, step=0.1, key="lab_temp", help="0 = greedy; above 0 = sampled")
    c6.number_input("Seed", 0, 2**31 - 1, key="lab_seed")

    def use_example():
        st.session_state["lab_prompt"] = EXAMPLE

    st.session_state["lab_prompt"], clipped = limits.clip_prompt(st.session_state["lab_prompt"])
    st.text_area(
        "Prompt", key="lab_prompt", height=90, placeholder="Type some text, e.g. Once upon a time",
        help=f"Prompts longer than {MAX_TOKENS} tokens (or the model's context) are cut.",
        max_chars=limits.MAX_PROMPT_CHARS,
    )
    for m_ in dict.fromkeys([st.session_state["lab_model"], st.session_state["lab_model2"]]):
        if m_ != NONE and state.lowercase_note(choices[m_]):
            st.caption(f"{m_}: {state.lowercase_note(choices[m_])}")
    st.caption(f"{limits.describe()} The model reads at most {MAX_TOKENS} tokens.")
    if clipped:
        st.warning(clipped)
    text = st.session_state["lab_prompt"]
    models = [st.session_state["lab_model"]]
    if st.session_state["lab_model2"] != NONE:
        models.append(st.session_state["lab_model2"])

    params = {"model": models[0]}
    if len(models) > 1:
        params["model2"] = models[1]
    if text:
        params["prompt"] = text
    for key, default in (("k", 10), ("n", 20), ("temp", 0.0), ("seed", 0)):
        v = st.session_state[f"lab_{key}"]
        if v != default:
            params[key] = v

    if not text:
        st.info("Type a prompt above (finish with Ctrl+Enter) to see the model's predictions, neurons and heads.")
        st.button("Try an example", on_click=use_example)
        _sync_url(params, models)
        return

    cols = st.columns(len(models)) if len(models) > 1 else [st.container()]
    for i, (col, name) in enumerate(zip(cols, models)):
        suffix = "" if i == 0 else "2"
        with col:
            with limits.live_slot():  # one live request: the panel's model runs and their rendering
                _model_panel(name, choices[name], text, suffix, params)
    _sync_url(params, models)


def _sync_url(params: dict, models: list[str]) -> None:
    want = {k: str(v) for k, v in params.items()}
    if dict(st.query_params) != want:
        st.query_params.from_dict(want)


def _model_panel(name: str, source: str, text: str, suffix: str, params: dict) -> None:
    k, two = int(st.session_state["lab_k"]), "lab_model2" in st.session_state and st.session_state["lab_model2"] != NONE
    st.subheader(name)
    try:
        lm = state.get_model(source)
        a = cached_analysis(source, text, k)
    except (ModelError, ValueError) as e:
        st.error(str(e))
        return
    if a.notice:
        st.warning(a.notice)

    # -- tokens, coloured by the loss on each token -------------------------------------------
    losses = [None] + [float(x) for x in a.losses]
    special = [t in lm.special_ids for t in a.ids]
    pos_key = f"lab_pos{suffix}"
    _init(pos_key, _url_int(f"pos{suffix}", a.n - 1, 0, a.n - 1))
    if st.session_state[pos_key] >= a.n:  # the prompt got shorter
        st.session_state[pos_key] = a.n - 1
    pos = int(st.session_state[pos_key])
    titles = [
        f"position {p}: {t!r}" + ("" if losses[p] is None else f"  loss {losses[p]:.2f} (p = {math.exp(-losses[p]):.3f})")
        for p, t in enumerate(a.token_strs)
    ]
    mean = f"mean loss {a.mean_loss:.3f} nats over {len(a.losses)} predictions" if a.mean_loss is not None else ""
    st.caption(f"{a.n} tokens · {mean}")
    st.html(tokens_html(list(a.token_strs), losses, special=special, vmax=LOSS_VMAX, highlight=pos, titles=titles))
    st.html(_loss_legend(LOSS_VMAX))
    if a.n > 1:
        st.select_slider(
            "Selected token", options=list(range(a.n)), key=pos_key,
            format_func=lambda p: f"{p}: {a.token_strs[p]!r}",
        )
        pick_key = f"lab_pick{suffix}"

        def picked(pick_key=pick_key, pos_key=pos_key):  # a clicked token becomes the selected one
            if st.session_state.get(pick_key) is not None:
                st.session_state[pos_key] = st.session_state[pick_key]
                st.session_state[pick_key] = None

        st.pills("…or click a token", options=list(range(a.n)), key=pick_key, on_change=picked,
                 format_func=lambda p: visible_text(a.token_strs[p])[0])
    if pos != a.n - 1 or suffix:
        params[f"pos{suffix}"] = pos

    left, right = (st.container(), st.container()) if two else st.columns(2, gap="large")
    with left:
        _next_token(a, pos, suffix)
        _continuation(source, text)
    with right:
        _neurons(a, name, text, pos)
        _ngram_rule(lm, name, source, text, pos)

    # -- attention ---------------------------------------------------------------------------------
    _attention(a, name, pos, two)

    # -- intervention ----------------------------------------------------------------------------
    _intervention(lm, name, source, text, a, pos, suffix, params)


def _loss_legend(vmax: float) -> str:
    cells = " ".join(
        f'<span style="background:{color(v, vmax)};padding:0 5px;">{v:g}</span>' for v in (0.5, 1, 2, 3, 4, vmax)
    )
    return (
        f'<div style="font-size:0.8em;color:#555;">colour: loss on this token (nats; {vmax:g}+ full) {cells} · '
        "dashed box: special token · outlined: the selected token · hover a token for its loss</div>"
    )


def _next_token(a, pos: int, suffix: str) -> None:
    st.markdown(f"**Next token after position {pos}** ({a.token_strs[pos]!r})")
    nxt = a.next_token(pos)
    if nxt is not None:
        loss = a.loss(pos)
        st.markdown(f"Actual next token {nxt!r}: loss **{loss:.3f}** nats (p = {math.exp(-loss):.4f})")
    else:
        st.markdown("This is the last token: the table is the model's prediction for what comes next.")
    top = pd.DataFrame(
        [{"rank": r + 1, "token": repr(t.text), "id": t.id, "prob": t.prob} for r, t in enumerate(a.top(pos))]
    )
    st.dataframe(
        top, hide_index=True,
        column_config={"prob": st.column_config.ProgressColumn("prob", format="%.4f", min_value=0.0, max_value=1.0)},
        key=f"lab_top{suffix}",
    )
    with st.expander("Predictions at every position"):
        rows = []
        for p in range(a.n):
            t = a.top(p)
            rows.append({
                "pos": p, "token": repr(a.token_strs[p]), "actual next": repr(a.next_token(p)) if p + 1 < a.n else "",
                "loss": a.loss(p), "top 1": repr(t[0].text), "p(top 1)": t[0].prob,
                f"top {min(5, a.top_k)}": " ".join(repr(x.text) for x in t[:5]),
            })
        st.dataframe(pd.DataFrame(rows), hide_index=True)


def _continuation(source: str, text: str) -> None:
    n, temp, seed = int(st.session_state["lab_n"]), float(st.session_state["lab_temp"]), int(st.session_state["lab_seed"])
    cont = cached_continuation(source, text, n, temp, seed)
    how = "greedy" if temp == 0 else f"sampled at temperature {temp:g}, seed {seed}"
    st.markdown(f"**Continuation** ({how}, {len(cont.new_ids)} tokens, stopped: {cont.stopped})")
    st.html(tokens_html(list(cont.new_strs), [float(p) for p in cont.probs], vmax=1.0,
                        titles=[f"{t!r}  p = {p:.3f}" for t, p in zip(cont.new_strs, cont.probs)]))
    st.caption("colour: the probability each chosen token had (at temperature 1)")


def _neurons(a, name: str, text: str, pos: int) -> None:
    st.markdown(f"**Most active neurons at position {pos}** (top {a.neuron_ids.shape[-1]} per layer; "
                "a link opens the neuron page with this prompt)")
    lines = []
    for hits in a.neurons(pos):
        items = [
            f"[N{h.neuron}]({link('neuron', model=name, layer=h.layer, neuron=h.neuron, prompt=text)}) {h.act:+.2f}"
            for h in hits
        ]
        lines.append(f"- L{hits[0].layer}: " + " · ".join(items))
    st.markdown("\n".join(lines))


def _attention(a, name: str, pos: int, two: bool) -> None:
    st.markdown(f"**Attention from position {pos}** (every head; click a chart or a link for the head page)")
    att = a.attention_from(pos)  # [layer, head, pos + 1]
    n_layers, n_heads, n_keys = att.shape
    rows = []
    for l in range(n_layers):
        for h in range(n_heads):
            href = link("head", model=name, layer=l, head=h)
            for kp in range(n_keys):
                rows.append({"layer": l, "head": h, "key": kp, "token": a.token_strs[kp], "weight": float(att[l, h, kp]),
                             "href": href, "label": f"{kp} {visible_text(a.token_strs[kp])[0]}"})
    df = pd.DataFrame(rows)
    width = max(24, min(150, (330 if two else 800) // n_heads - 8))  # the facet grid must fit its column
    chart = (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("label:N", sort=alt.EncodingSortField("key"), title=None,  # "position token", under the last row
                    axis=alt.Axis(labelAngle=-90, labelFontSize=9, labelLimit=70, labelOverlap=False)),
            y=alt.Y("weight:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(title=None, tickCount=2, labels=False)),
            color=alt.Color("weight:Q", scale=alt.Scale(scheme="oranges", domain=[0, 1]), legend=None),
            href="href:N",
            tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("head:O"), alt.Tooltip("key:O", title="position"),
                     alt.Tooltip("token:N"), alt.Tooltip("weight:Q", format=".3f")],
        )
        .properties(width=width, height=45)
        .facet(row=alt.Row("layer:O", title="layer"), column=alt.Column("head:O", title="head"), spacing=4)
    )
    st.altair_chart(chart, width="content")
    lines = []
    for l in range(n_layers):
        items = []
        for h in range(n_heads):
            kp = int(att[l, h].argmax())
            items.append(f"[H{h}]({link('head', model=name, layer=l, head=h)})→{a.token_strs[kp]!r} {att[l, h, kp]:.2f}")
        lines.append(f"- L{l}: " + " · ".join(items))
    with st.expander("Heads: where each one looks most (links to head pages)"):
        st.markdown("\n".join(lines))


@st.cache_data(ttl=60, show_spinner=False)
def rules_setup(db_url: str, model: str) -> tuple[dict | None, str]:
    """(the newest rules run's n-gram settings, "") or (None, why there are none)."""
    from pathlib import Path

    from precompute.store.db import StoreError
    from precompute.store.queries import NotFound, latest_run

    why = f"No n-gram index is available for {model}: build one with `precompute run --jobs rules --ngram-corpus TRAINING_TEXT`."
    try:
        store = state.get_store(db_url)
        with store.session() as s:
            run = latest_run(s, model, "rules")
    except (StoreError, NotFound):
        return None, why
    corpus = run.params.get("ngram_corpus") or ""
    if not corpus or (not corpus.startswith("hf:") and not Path(corpus).exists()):
        return None, f"No n-gram index is available for {model}: the rules run's training text {corpus!r} is not on this machine."
    split = (run.summary or {}).get("split") or run.params.get("split") or "story"  # runs before the option: whole stories
    return {"corpus": corpus, "rule_set": run.params.get("rule_set", "subgram"), "split": split,
            "distance": run.params.get("distance", "variational"), "run": run.id}, ""


@st.cache_resource(show_spinner="Loading the n-gram index (first time only)…", max_entries=4)
def ngram_index(source: str, corpus: str, rule_set: str, split: str):
    from precompute.ngrams.training import open_index

    return open_index(state.get_model(source), corpus, rule_set, split, progress=False)


@st.cache_data(max_entries=32, show_spinner=False)
def cached_rules(source: str, corpus: str, rule_set: str, distance: str, text: str, split: str = "story"):
    from precompute.jobs.rules import match_prompt

    lm = state.get_model(source)
    index = ngram_index(source, corpus, rule_set, split)
    return match_prompt(lm, index, text, rule_set, distance)


def _ngram_rule(lm, name: str, source: str, text: str, pos: int) -> None:
    st.markdown(f"**Optimal n-gram rule for the prediction at position {pos}**")
    setup, why = rules_setup(state.DB_URL, name)
    if setup is None:
        st.caption(why)
        return
    try:
        matches = cached_rules(source, setup["corpus"], setup["rule_set"], setup["distance"], text, setup["split"])
    except (ValueError, LookupError, OSError) as e:
        st.caption(f"No n-gram rule: {e}")
        return
    m = next((x for x in matches if x.pos == pos + 1), None)
    if m is None:
        st.caption("No actual next token here (the last position): pick an earlier token to see its rule.")
        return
    if m.optimal is None:
        st.markdown(f"No rule of the {setup['rule_set']} set has support for this context in the training text.")
        return
    o = m.optimal
    ctx = "".join(m.context)
    st.html(
        f'<div style="font-family:ui-monospace,Menlo,Consolas,monospace;">{o.html} '
        f"<b>{html_escape(repr(m.token))}</b></div>"
    )
    st.markdown(
        f"template `{o.template}` ({setup['rule_set']} rules) · {setup['distance']} distance **{o.distance:.3f}** · "
        f"support {m.support} · top-1 agreement {m.agreement:.2f} · model top-1 {'right' if m.model_correct else 'wrong'}"
    )
    rule_top = ", ".join(f"{t!r} {q:.2f}" for _i, t, q in m.rule_top[:5])
    st.caption(f"context {ctx!r}; the rule predicts {rule_top} (from the rules run {setup['run']}'s training text)")


def _intervention(lm, name: str, source: str, text: str, a, pos: int, suffix: str, params: dict) -> None:
    st.markdown("**Intervention** (ablate one neuron or head at every position, compare next-token log-probs)")
    key = f"ablate{suffix}"
    raw = st.query_params.get(key)
    parsed = None
    if raw:
        try:
            parsed = parse_ablation(raw)
        except ValueError as e:
            st.error(str(e))
    kind0, layer0, index0, mode0 = parsed or ("neuron", 0, 0, "zero")
    _init(f"lab_abl_on{suffix}", parsed is not None)
    _init(f"lab_abl_kind{suffix}", kind0)
    _init(f"lab_abl_layer{suffix}", layer0)
    _init(f"lab_abl_index{suffix}", index0)
    _init(f"lab_abl_mode{suffix}", mode0)
    two = st.session_state.get("lab_model2", NONE) != NONE
    c = st.columns([1.2, 1, 1]) + st.columns(2) if two else st.columns([1.2, 1, 1, 1, 1])
    c[0].toggle("Ablate", key=f"lab_abl_on{suffix}")
    c[1].selectbox("What", list(ABLATION_KINDS), key=f"lab_abl_kind{suffix}")
    c[2].selectbox("Mode", list(ABLATION_MODES), key=f"lab_abl_mode{suffix}")
    c[3].number_input("Layer", min_value=0, step=1, key=f"lab_abl_layer{suffix}")
    c[4].number_input("Neuron / head", min_value=0, step=1, key=f"lab_abl_index{suffix}")
    if not st.session_state[f"lab_abl_on{suffix}"]:
        st.caption("Switch on Ablate to see what changes.")
        return
    kind = st.session_state[f"lab_abl_kind{suffix}"]
    layer, index = int(st.session_state[f"lab_abl_layer{suffix}"]), int(st.session_state[f"lab_abl_index{suffix}"])
    mode = st.session_state[f"lab_abl_mode{suffix}"]
    spec = format_ablation(kind, layer, index, mode)
    params[key] = spec
    try:
        if kind == "neuron":
            lm.check_neuron(layer, index)
        else:
            lm.check_head(layer, index)
    except ModelError as e:
        st.error(f"Cannot ablate: {e}")
        return
    mean_value = corpus_mean(state.DB_URL, name, layer, index) if (kind == "neuron" and mode == "mean") else None
    try:
        r = cached_ablation(source, text, spec, mean_value, int(st.session_state["lab_k"]))
    except (ModelError, ValueError) as e:
        st.error(f"Cannot ablate: {e}")
        return
    if mode == "mean":
        if kind == "neuron":
            where = "the corpus (newest neuron run)" if r.mean_source == "corpus" else "this prompt (no neuron run in the database for this model)"
            st.caption(f"Neuron set to its mean {r.mean_value:+.4f} over {where}, BOS excluded.")
        else:
            st.caption("Head z set at every position to its mean z vector over this prompt's positions (BOS excluded).")
    m = st.columns(3)
    an = r.actual_next(pos)
    if an is not None:
        d = an.d_logprob
        m[0].metric(f"Δ log p(next {an.text!r})", f"{d:+.4f}" if abs(d) >= 1e-3 or d == 0 else f"{d:+.1e}",
                    help="log-probability of the actual next token after the selected position: ablated minus clean")
    m[1].metric("mean Δ loss", f"{r.mean_loss_change:+.4f}" if r.mean_loss_change is not None else "-",
                help="mean change of the loss on the actual next tokens over the whole prompt; positive: the ablation hurts")
    kl = float(r.kl[pos])
    m[2].metric("KL here", f"{kl:.4f}" if kl >= 1e-3 else f"{kl:.1e}",
                help="KL(clean ‖ ablated) of the next-token distribution at the selected position, nats")

    if r.n > 1:
        d = pd.DataFrame({"pos": range(r.n - 1), "token": [repr(t) for t in r.token_strs[:-1]],
                          "next": [repr(t) for t in r.token_strs[1:]], "Δ log p(actual next)": r.next_delta})
        bar = alt.Chart(d).mark_bar().encode(
            x=alt.X("pos:O", title="position (selected in black)"), y=alt.Y("Δ log p(actual next):Q", title="Δ log p(next)"),
            color=alt.condition(alt.datum.pos == pos, alt.value("#111"), alt.value("#4c78a8")),
            tooltip=["pos", "token", "next", alt.Tooltip("Δ log p(actual next):Q", format="+.4f")],
        ).properties(height=140)
        st.altair_chart(bar)

    def table(changes):
        return pd.DataFrame([
            {"token": repr(c.text), "clean p": np.exp(c.clean_logprob), "ablated p": np.exp(c.ablated_logprob),
             "Δ p": c.d_prob, "Δ log p": c.d_logprob} for c in changes
        ])

    fmt = {c: st.column_config.NumberColumn(format="%.4f") for c in ("clean p", "ablated p")}
    fmt["Δ p"] = st.column_config.NumberColumn(format="%+.2e")  # small changes stay visible
    fmt["Δ log p"] = st.column_config.NumberColumn(format="%+.4f")
    st.markdown(f"Clean top-{r.top_k} next tokens at position {pos}, before and after")
    st.dataframe(table(r.clean_top(pos)), hide_index=True, column_config=fmt, width="stretch")
    up, down = r.most_changed(pos, k=5)
    u, dn = st.columns(2)
    u.markdown("Most raised (by Δ p, the change of probability)")
    u.dataframe(table(up), hide_index=True, column_config=fmt, width="stretch")
    dn.markdown("Most lowered (by Δ p)")
    dn.dataframe(table(down), hide_index=True, column_config=fmt, width="stretch")


main()
