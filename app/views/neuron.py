"""Neuron page: ``/neuron?model=M&layer=L&neuron=N``; an SAE feature's page:
``/neuron?model=M&layer=L&unit=feature&neuron=F`` (feature F of the SAE of layer L, from its newest
feature run: everything below, with the feature's activation = the SAE's encoding of hook_post).

Every view state is in the URL, so a copied link reopens the same view: ``page`` / ``lpage``
(page of the top / bottom examples), ``hyp`` + ``mode`` (hypothesis, ``list``, ``regex`` or
``context``), ``log`` (log-y spectrum), ``bin`` (chosen spectrum bin), ``top`` (percent of the
activation range counted as "top"), ``alltok`` (logit effects over every token, not only those
seen in the corpus), ``prompt`` (live test). Previous/next keep the view state that is not about
one neuron.
"""

from __future__ import annotations

import html
import math

import altair as alt
import pandas as pd
import streamlit as st

from app import cached, explanations, limits, render, url
from app.hypothesis import MAX_PATTERN, MODES, TOP_CHOICES, Hypothesis, bin_shares, explained_share, sample_matches
from app.live import neuron_on_text
from app.state import DB_URL, bad_param, get_model, note_lowercase, param_int
from precompute.models import ModelError
from precompute.store.queries import NotFound

PAGE_SIZE = 5
CARRIED = ("unit", "hyp", "mode", "log", "top", "alltok", "prompt")  # view state kept by previous/next/go to


def carried() -> dict[str, str]:
    return {k: st.query_params[k] for k in CARRIED if st.query_params.get(k)}


def where(e) -> str:
    """Where an example is: the story, its sequence only when it differs, the position."""
    seq = "" if e.seq_idx == e.story_id else f" (sequence {e.seq_idx})"
    return f"story {e.story_id}{seq}, position {e.pos}"


def show_examples(examples, param: str, cls: str, vmax: float) -> None:
    """One block per example (``cls`` names them), ``PAGE_SIZE`` a page, the page in ``param``."""
    n_pages = max(1, math.ceil(len(examples) / PAGE_SIZE))
    page_no = param_int(param, 1, 1, n_pages)
    head = st.columns([3, 2])
    head[0].html(render.legend_html(vmax))
    if n_pages > 1:
        page_no = head[1].radio(
            f"{cls} page", list(range(1, n_pages + 1)), index=page_no - 1, horizontal=True,
            format_func=lambda i: f"{(i - 1) * PAGE_SIZE + 1}-{min(i * PAGE_SIZE, len(examples))}",
            label_visibility="collapsed",
        )
        url.sync(param, page_no, 1)
    blocks = []
    for e in examples[(page_no - 1) * PAGE_SIZE : page_no * PAGE_SIZE]:
        tok = e.tokens[e.max_index]
        blocks.append(
            f'<div class="{cls}" style="margin:0.2em 0 0.9em 0;"><div style="font-size:0.85em;color:#444;">'
            f"<b>#{e.rank + 1}</b> · activation <b>{e.act:.3f}</b> on {html.escape(repr(tok.text))} · "
            f"{where(e)}</div>"
            + render.tokens_html(
                [t.text for t in e.tokens], list(e.acts), special=[t.special for t in e.tokens],
                vmax=vmax, highlight=e.max_index,
            )
            + "</div>"
        )
    st.html("".join(blocks))


def symlog_ticks(top: float) -> list[float]:
    """0, 1, 10, 100, ... up to ``top``: the ticks a symlog count axis can label readably."""
    ticks, t = [0.0], 1.0
    while t <= max(top, 1.0) * 1.0001:
        ticks.append(t)
        t *= 10
    return ticks


@st.cache_data(show_spinner="Running the model…", max_entries=128)
def live_acts(source: str, text: str, layer: int, neuron: int, prepend_bos: bool, sae_of: tuple | None = None):
    """``sae_of``: (model, SAE run) when ``neuron`` is a feature of that SAE."""
    sae = None if sae_of is None else cached.load_sae(DB_URL, sae_of[0], layer, sae_of[1])
    return neuron_on_text(get_model(source), text, layer, neuron, prepend_bos, sae)


def token_label(text: str, tid: int, dupes: set[str]) -> str:
    shown, _ = render.visible_text(text)
    shown = f"'{shown}'"
    return f"{shown} #{tid}" if text in dupes else shown


# -------------------------------------------------------------------------------- what to show
model, info, V = cached.page_model("neurons")
layer = param_int("layer", 0, 0, info.n_layers - 1)
unit = url.get_choice("unit", ("neuron", "feature"), "neuron")
feature = unit == "feature"
U = "F" if feature else "N"  # L2 F5 / L2 N5
what = "feature" if feature else "neuron"
# a feature's range is its SAE's, known once its run is found (the query says so in one line)
neuron = param_int("neuron", 0, 0, None if feature else info.d_mlp - 1)
try:
    p = cached.neuron_page(DB_URL, model, layer, neuron, V, unit)
except NotFound as e:
    bad_param(str(e))
S = p.stats
sae = p.run.params.get("sae") if feature else None
# same-page links (previous/next) change the view but not the address bar: write the state back
st.query_params.update(url.neuron_params(model, layer, neuron, **carried()))

# -------------------------------------------------------------------------------- header
st.title(f"{model} · L{layer} {U}{neuron}")
run = p.run
corpus = f"{run.corpus} (synthetic: stories sampled from the model)" if run.corpus_synthetic else run.corpus
if feature:
    st.caption(
        f"Feature {neuron} of the sparse autoencoder on layer {layer}'s MLP hook_post (SAE run {sae['run']}: "
        f"{sae['n_features']} features, TopK k={sae['k']}; a feature's activation is the SAE's encoding of hook_post). "
        f"Feature run {run.id}: {run.n_tokens:,} tokens scored from {corpus}; "
        f"{'BOS prepended (never scored)' if run.prepend_bos else 'no BOS'}; {run.finished_at:%Y-%m-%d %H:%M}."
    )
    # previous/next stay among this SAE's features
    prev_l, prev_n, next_l, next_n = layer, (neuron - 1) % p.n_units, layer, (neuron + 1) % p.n_units
else:
    st.caption(
        f"Neuron {neuron} of layer {layer} (MLP hook_post; {info.d_mlp} neurons × {info.n_layers} layers). "
        f"Neuron run {run.id}: {run.n_tokens:,} tokens scored from {corpus}; "
        f"{'BOS prepended (never scored)' if run.prepend_bos else 'no BOS'}; {run.finished_at:%Y-%m-%d %H:%M}."
    )
    total = p.n_layers * p.d_mlp
    idx = layer * p.d_mlp + neuron
    prev_l, prev_n = divmod((idx - 1) % total, p.d_mlp)
    next_l, next_n = divmod((idx + 1) % total, p.d_mlp)
nav_box = st.container()  # filled at the end, so the links carry the view state this run wrote

m = st.columns(5)
m[0].metric("max", f"{S.max:.3f}")
m[1].metric("mean", f"{S.mean:.3f}")
m[2].metric("std", f"{S.std:.3f}")
m[3].metric("min", f"{S.min:.3f}")
m[4].metric("firing (> 0)", f"{S.frac_pos:.1%}")
if p.bos_above_max:
    ratio = f", {p.bos_act / S.max:.1f}× its scored max" if S.max > 0 else ""
    st.warning(
        f"On BOS this {what} reaches {p.bos_act:.3f}{ratio} ({S.max:.3f}). BOS (position 0) is never scored: "
        "the numbers, histogram and examples on this page leave it out."
    )
elif p.bos_act is not None:
    st.caption(f"Activation on BOS (position 0, never scored): {p.bos_act:.3f}.")
link_box = st.container()  # filled at the end, once every widget has written its state to the URL

# -------------------------------------------------------------------------------- examples
st.subheader("Max-activating examples")
if not p.examples:
    st.info(f"This run stored no examples for this {what}.")
else:
    show_examples(p.examples, "page", "example", max(S.max, 1e-6))
st.subheader("Min-activating examples")
if not p.bottom_examples:
    st.info(f"This run stored no bottom examples for this {what}.")
elif S.min >= 0 and feature:
    st.caption(f"An SAE feature is never negative: its minimum, {S.min:.3f}, is where it is silent "
               f"({1 - S.frac_pos:.1%} of tokens), so there are no min-activating examples to show.")
else:
    st.caption("The lowest activations (most negative first), by the same rule as the top ones: no two within "
               f"{p.run.params.get('ctx_before', 24)} positions of each other in a sequence.")
    show_examples(p.bottom_examples, "lpage", "example-low", max(-S.min, abs(S.max), 1e-6))

# -------------------------------------------------------------------------------- quantile bands
st.subheader("Examples by activation band")
if not p.bands:
    st.caption(f"This {what} never fires above 0: no positive bands.")
else:
    st.caption(
        "The positive range 0 to max cut into tenths, each made of whole histogram bars: per band a uniform random "
        "sample of its tokens (the bars' stored samples with the smallest hashes), highest first."
    )
    tabs = st.tabs([f"{b.lo:.2f} to {b.hi:.2f}" for b in p.bands])
    for tab, b in zip(tabs, p.bands):
        with tab:
            st.caption(f"Activations {b.lo:.3f} to {b.hi:.3f}: {b.count:,} tokens, {len(b.samples)} shown.")
            st.html("".join(
                f'<div class="band-sample" style="margin:2px 0;"><span style="display:inline-block;width:5.5em;'
                f'color:#444;">{smp.act:+.3f}</span>{render.context_html(smp.context, smp.token.text)}</div>'
                for smp in b.samples
            ))

# -------------------------------------------------------------------------------- explanations
explained = explanations.neuron_explanations(DB_URL, model, layer, neuron, run.id, V)
if explained:
    st.subheader("Explanations")
    explanations.show_list(model, layer, neuron, explained)

# -------------------------------------------------------------------------------- spectrum
st.subheader("Activation spectrum")
c = st.columns([3, 2, 1, 1])
mode = url.get_choice("mode", MODES, "list")
hyp_text = c[0].text_input(
    f"Hypothesis: the {what} fires on…", url.get_str("hyp"),
    placeholder="tokens, comma-separated (dog, cat, bird) or a regex (^ [A-Z])",
)
mode = c[1].radio("as", list(MODES), index=list(MODES).index(mode), format_func=MODES.get, horizontal=True)
log_y = c[2].checkbox("log y", url.get_str("log") == "1")
top_pct = int(url.get_choice("top", [str(t) for t in TOP_CHOICES], "20"))
top_pct = c[3].selectbox("top %", TOP_CHOICES, index=TOP_CHOICES.index(top_pct), help="share of the activation range counted as 'top bins'")
url.sync("hyp", hyp_text, "")
url.sync("mode", mode, "list")
url.sync("log", "1" if log_y else None)
url.sync("top", top_pct, 20)
if mode != "list":
    st.caption(f"A regex is at most {MAX_PATTERN} characters, RE2 syntax: no backreferences or lookaround."
               + (" In context mode it is searched in the sample's context as listed below: up to 12 tokens before, "
                  "the token in [[ ]], up to 3 after (`\\]\\] dog` : before ' dog')." if mode == "context" else ""))

hyp = None
try:
    hyp = Hypothesis(hyp_text, mode) if hyp_text else None
except ValueError as e:
    st.warning(f"Hypothesis ignored: {e}")
rows = bin_shares(p, hyp)
long = []
for r in rows:  # stacked by hand: "matches" from 0, "other" on top of it
    for group, y0, y1 in (("matches hypothesis", 0.0, r.est_matching), ("other", r.est_matching, float(r.count))):
        long.append(dict(bin=r.bin, lo=r.lo, hi=r.hi, group=group, y0=y0, y1=y1, tokens=y1 - y0, count=r.count,
                         sampled=r.n_sampled, matching_sampled=r.n_matching))
df = pd.DataFrame(long)
pick = alt.selection_point(fields=["bin"], name="pick", on="click")
yscale = alt.Scale(type="symlog") if log_y else alt.Scale()
yaxis = alt.Axis(values=symlog_ticks(max(p.histogram.counts, default=1)), format="~s") if log_y else alt.Axis()
chart = (
    alt.Chart(df)
    .mark_bar()
    .encode(
        x=alt.X("lo:Q", title="activation", scale=alt.Scale(nice=False)),
        x2="hi:Q",
        y=alt.Y("y1:Q", scale=yscale, axis=yaxis, title="tokens" + (" (symlog scale)" if log_y else "")),
        y2="y0:Q",
        color=alt.Color("group:N", scale=alt.Scale(domain=["matches hypothesis", "other"], range=["#ff7600", "#9aa5b1"]),
                        legend=alt.Legend(orient="top", title=None)),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.55)),
        tooltip=[alt.Tooltip("bin:Q"), alt.Tooltip("lo:Q", format=".3f", title="from"), alt.Tooltip("hi:Q", format=".3f", title="to"),
                 alt.Tooltip("count:Q", title="tokens in bin"), alt.Tooltip("sampled:Q", title="sampled"),
                 alt.Tooltip("matching_sampled:Q", title="sampled matching"), alt.Tooltip("tokens:Q", format=".1f", title="estimated")],
    )
    .add_params(pick)
    .properties(height=260)
)
event = st.altair_chart(chart, on_select="rerun", selection_mode="pick", key=f"spectrum-{model}-{layer}-{unit}-{neuron}")
st.caption(
    f"Bars: the full histogram ({sum(p.histogram.counts):,} tokens, {len(rows)} bins). The colour split is estimated "
    "from the stored sample of up to 10 random tokens per bin: each sampled token stands for count / n_sampled "
    "tokens of its bin (exact where a bin has no more tokens than its sample). Click a bar to list its sample."
)

nonempty = [r.bin for r in rows if r.count > 0]
default_bin = nonempty[-1] if nonempty else 0
chosen = param_int("bin", default_bin, 0, len(rows) - 1)
clicked = (getattr(event, "selection", None) or {}).get("pick") or []
clicked_bin = int(clicked[0]["bin"]) if clicked and "bin" in clicked[0] else None
if url.new_selection(f"spectrum-{model}-{layer}-{unit}-{neuron}", clicked_bin) is not None:
    chosen = clicked_bin

if hyp is not None:
    ex = explained_share(p, hyp, top_pct / 100)
    share = "no tokens" if ex.share is None else f"{ex.share:.0%}"
    mc = st.columns([3, 1, 1])
    mc[0].metric(
        f"Share of the top {top_pct}% of the activation range (≥ {ex.threshold:.3f}) explained by the hypothesis",
        share,
        help=f"{ex.n_tokens:,} tokens in those bins; {ex.n_matching_sampled} of {ex.n_sampled} sampled tokens match, "
        "weighted by their bins' counts.",
    )
    mc[1].metric("precision", "no match" if ex.precision is None else f"{ex.precision:.0%}",
                 help=f"Estimated share of the matching tokens ({ex.est_matching:,.0f}, all bins) that are in the top range.")
    mc[2].metric("score (F1)", "–" if ex.f1 is None else f"{ex.f1:.2f}", help="2 × precision × share / (precision + share)")

labels = {r.bin: f"bin {r.bin}: {r.lo:.3f} to {r.hi:.3f} · {r.count:,} tokens, {r.n_sampled} sampled" for r in rows}
opts = nonempty or [0]
if chosen not in opts:
    st.info(f"The link asks for bin {chosen}, which has no tokens for this {what}; showing bin {default_bin} "
            "(the highest one with tokens) instead.")
    chosen = default_bin
chosen = st.selectbox("Sampled tokens of bin", opts, index=opts.index(chosen) if chosen in opts else 0, format_func=labels.get)
url.sync("bin", chosen, default_bin)
samples = sorted((smp for smp in p.spectrum if smp.bin == chosen), key=lambda smp: -smp.act)
if samples:
    lines = []
    for smp in samples:
        flag = " ✓" if hyp is not None and sample_matches(hyp, smp) else ""
        lines.append(
            f'<div class="sample" style="margin:2px 0;"><span style="display:inline-block;width:5.5em;color:#444;">'
            f"{smp.act:+.3f}{flag}</span>{render.context_html(smp.context, smp.token.text)}</div>"
        )
    st.html("".join(lines))
else:
    st.caption("No tokens in this bin.")

# -------------------------------------------------------------------------------- logits, tokens
left, right = st.columns(2)
with left:
    st.subheader("Direct logit effects")
    has_seen = bool(p.logit_top_seen or p.logit_bottom_seen)
    all_tokens = st.checkbox("include tokens never seen in the corpus", url.get_str("alltok") == "1" or not has_seen,
                             disabled=not has_seen)
    url.sync("alltok", "1" if all_tokens and has_seen else None)
    if all_tokens:
        effects = [("promotes", t) for t in p.logit_top] + [("suppresses", t) for t in p.logit_bottom]
    else:
        effects = [("promotes", t) for t in p.logit_top_seen] + [("suppresses", t) for t in p.logit_bottom_seen]
    texts = [t.token.text for _, t in effects]
    dupes = {x for x in texts if texts.count(x) > 1}
    ldf = pd.DataFrame(
        [dict(token=token_label(t.token.text, t.token.id, dupes) + (" (never seen)" if t.count == 0 else ""),
              id=t.token.id, effect=t.value, seen=("unknown" if t.count < 0 else f"{t.count:,}"),
              kind=k if t.count != 0 else "never seen in the corpus") for k, t in effects]
    )
    if len(ldf):
        lchart = (
            alt.Chart(ldf)
            .mark_bar()
            .encode(
                y=alt.Y("token:N", sort=alt.EncodingSortField("effect", order="descending"), title=None,
                        axis=alt.Axis(labelOverlap=False, labelLimit=160, labelFontSize=12)),
                x=alt.X("effect:Q", title="logit effect (W_dec[f] · W_out · W_U)" if feature else "logit effect (W_out[n] · W_U)"),
                color=alt.Color("kind:N", scale=alt.Scale(domain=["promotes", "suppresses", "never seen in the corpus"],
                                                          range=["#ff7600", "#2870ff", "#b8b8b8"]),
                                legend=alt.Legend(orient="top", title=None)),
                tooltip=["token", "id", alt.Tooltip("effect:Q", format=".4f"),
                         alt.Tooltip("seen:N", title="times in the corpus")],
            )
            .properties(height=max(200, 20 * len(ldf)))
        )
        st.altair_chart(lchart, width="stretch")
        st.caption(("Direct path only: the feature's decoder direction through the MLP's out projection, times the "
                    "unembedding (final norm scale folded in). " if feature else
                    "Direct path only: the neuron's output direction times the unembedding (final norm scale folded in). ")
                   + ("Every token of the vocabulary; grey ones never occur in the corpus." if all_tokens else
                      "Only tokens that occur in the corpus (tick the box for all)."))
with right:
    st.subheader("Top tokens by mean activation")
    if p.top_tokens:
        st.dataframe(
            pd.DataFrame(
                [dict(token=f"'{render.visible_text(t.token.text)[0]}'", id=t.token.id, mean=t.value, count=t.count) for t in p.top_tokens]
            ),
            hide_index=True,
            column_config={"mean": st.column_config.NumberColumn("mean activation", format="%.3f"),
                           "count": st.column_config.NumberColumn("times seen")},
        )
        st.caption(f"Tokens seen at least {run.params.get('min_token_count', 3)} times in the corpus.")
    else:
        st.caption("No token was seen often enough.")

# -------------------------------------------------------------------------------- live test
st.subheader(f"Test this {what}")
prompt, clipped = limits.clip_prompt(url.get_str("prompt"))
with st.form("live"):
    prompt = st.text_area("Prompt", prompt, placeholder="Once upon a time, there was a little dog…", height=90,
                          max_chars=limits.MAX_PROMPT_CHARS)
    submitted = st.form_submit_button("Run")
note_lowercase(info.source)
st.caption(limits.describe())
url.sync("prompt", prompt, "")
if clipped:
    st.warning(clipped)
if prompt:
    with limits.live_slot():  # one live request: the model run and its rendering
        try:
            live = live_acts(info.source, prompt, layer, neuron, run.prepend_bos, (model, sae["run"]) if feature else None)
        except ModelError as e:
            st.error(f"Cannot run {model} live: {e}")
            live = None
        if live is not None and live.acts:
            if live.truncated:
                st.warning(
                    f"The prompt is {live.n_prompt_tokens:,} tokens; {model}'s context is {live.n_ctx}, "
                    f"so only the first {live.n_ctx} are used."
                )
            mp = live.max_pos
            vmax = max([S.max] + [abs(a) for a in live.acts]) or 1.0
            st.markdown(
                f"Max activation **{live.acts[mp]:.3f}** at position **{mp}** (token `{render.visible_text(live.tokens[mp])[0]}`)"
                f"{' · position 0 is BOS' if live.special and live.special[0] else ''} · corpus max {S.max:.3f}."
            )
            st.html('<div class="live">' + render.tokens_html(list(live.tokens), list(live.acts), special=list(live.special), vmax=vmax, highlight=mp) + "</div>")
            with st.expander("Values per token"):
                st.dataframe(
                    pd.DataFrame(dict(position=range(len(live.ids)), token=[render.visible_text(t)[0] for t in live.tokens],
                                      id=live.ids, activation=live.acts)),
                    hide_index=True,
                )
        elif live is not None:
            st.caption("The prompt has no tokens.")

# -------------------------------------------------------------------------------- navigation, the link
with nav_box:
    keep = carried()
    nav = st.columns([1, 1, 1.3, 2.7])
    nav[0].page_link("views/neuron.py", label=f"← L{prev_l} {U}{prev_n}",
                     query_params=url.neuron_params(model, prev_l, prev_n, **keep))
    nav[1].page_link("views/neuron.py", label=f"L{next_l} {U}{next_n} →",
                     query_params=url.neuron_params(model, next_l, next_n, **keep))
    nav[2].page_link("views/overview.py", label="↑ Model overview",
                     query_params={"model": model, "layer": str(layer), **({"unit": "feature"} if feature else {})})
    with nav[3].form("goto", border=False):
        g = st.columns([1, 1, 1])
        gl = g[0].number_input("layer", 0, info.n_layers - 1, layer, label_visibility="collapsed")
        gn = g[1].number_input(what, 0, p.n_units - 1, neuron, label_visibility="collapsed")
        if g[2].form_submit_button(f"Go to L/{U}"):
            st.switch_page("views/neuron.py", query_params=url.neuron_params(model, int(gl), int(gn), **keep))
with link_box:
    st.caption("Link to this view (copy it with the button at its right):")
    st.code(url.full_url("neuron"), language=None)
