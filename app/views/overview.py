"""Home: the models and complete runs in the database, and every neuron of a model at a glance;
per layer with an SAE feature run, its features (``unit=feature``) and neurons vs features by their
best explanation's F1.

URL: ``?model=M&layer=L&stat=max&q=dog&explained=quote&unit=feature`` (all optional).
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import cached, explanations, render, url
from app.live import neurons_on_phrase
from app.state import DB_URL, bad_param, get_model, lowercase_note, param_int, store_or_stop
from precompute.models import ModelError
from precompute.store.db import DEFAULT_DB
from precompute.jobs.neurons.tables import match_tokens
from precompute.store.queries import NotFound

@st.cache_data(show_spinner="Running the model…", max_entries=64)
def phrase_hits(source: str, text: str, maxes: tuple, prepend_bos: bool | None):
    return neurons_on_phrase(get_model(source), text, {l: np.array(v) for l, v in maxes}, prepend_bos)


STATS = {"max": "max activation", "mean": "mean activation", "std": "standard deviation", "frac_pos": "fraction firing (> 0)"}


def build_command(jobs: str = "neurons") -> str:
    db = "" if DB_URL == DEFAULT_DB else f" --db {DB_URL}"
    return f"precompute run --model <folder or hub id> --corpus <text file>{db} --jobs {jobs}"


store_or_stop()
V = cached.db_version(DB_URL)
models = cached.list_models(DB_URL, V)
st.title("tinyscope")
if not models:
    st.info("The database is empty. Build it (the bundled model and stories sampled from it when no options are given):")
    st.code(build_command(), language="bash")
    st.stop()

# -------------------------------------------------------------------------------- models
st.subheader("Models")
st.dataframe(
    pd.DataFrame(
        [dict(model=m.name, architecture=m.architecture, parameters=m.n_params, layers=m.n_layers, heads=m.n_heads,
              d_model=m.d_model, neurons_per_layer=m.d_mlp, vocab=m.vocab_size, context=m.n_ctx, source=m.source)
         for m in models]
    ),
    hide_index=True,
    width="stretch",
    column_config={"parameters": st.column_config.NumberColumn(format="localized"),
                   "source": st.column_config.TextColumn("source", width="large")},
)
names = [m.name for m in models]
model = url.get_str("model") or names[0]
if model not in names:
    try:
        cached.get_model(DB_URL, model, V)
    except NotFound as e:
        bad_param(str(e))
model = st.selectbox("Model", names, index=names.index(model))
url.sync("model", model, names[0])
info = next(m for m in models if m.name == model)

with st.expander(f"Model card: {model}"):
    st.markdown(info.card if info.card.strip() else f"_No model card (README.md) in {info.source}._")

runs = cached.list_runs(DB_URL, model, V)
st.markdown(f"**Complete runs of {model}**")
if runs:
    st.dataframe(
        pd.DataFrame(
            [dict(run=r.id, job=r.job,
                  corpus=r.corpus + ("  (synthetic: sampled from the model)" if r.corpus_synthetic else ""),
                  tokens=r.n_tokens, sequences=r.n_sequences, BOS="prepended" if r.prepend_bos else "no",
                  finished=r.finished_at, code=r.code_version) for r in runs]
        ),
        hide_index=True,
        column_config={"tokens": st.column_config.NumberColumn("tokens scored", format="localized"),
                       "finished": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm")},
    )
if not any(r.job == "neurons" for r in runs):
    st.info(f"No complete neuron run for {model}. Build one with:")
    st.code(build_command().replace("<folder or hub id>", info.source), language="bash")
    st.stop()

# -------------------------------------------------------------------------------- search
st.subheader("Neurons")
q = st.text_input("Find neurons that fire most on a token", url.get_str("q"), placeholder="dog")
url.sync("q", q, "")
if q.strip():
    voc = cached.vocab(DB_URL, model, V)
    ids = match_tokens(voc, q)
    if not ids:
        st.warning(f"No token of {model}'s vocabulary is {q.strip()!r} (with or without a leading space).")
    else:
        hits = cached.neurons_for_tokens(DB_URL, model, tuple(ids), 30, V)
        shown = ", ".join(f"'{render.visible_text(voc[i])[0]}' (#{i})" for i in ids)
        if not hits:
            st.info(f"No neuron has {shown} among its top tokens by mean activation.")
        else:
            st.caption(f"Neurons with {shown} among their top tokens, by that token's mean activation:")
            st.dataframe(
                pd.DataFrame(
                    [dict(neuron=f"L{s.layer} N{s.neuron}", link=url.neuron_link(model, s.layer, s.neuron),
                          token=f"'{render.visible_text(voc[t])[0]}'", token_mean=m, max=s.max, mean=s.mean,
                          top_tokens=" ".join(f"'{render.visible_text(x)[0]}'" for x in s.top_tokens)) for s, m, t in hits]
                ),
                hide_index=True,
                column_config={"link": st.column_config.LinkColumn("open", display_text="open ↗"),
                               "token_mean": st.column_config.NumberColumn("mean on token", format="%.3f"),
                               "max": st.column_config.NumberColumn(format="%.3f"),
                               "mean": st.column_config.NumberColumn(format="%.3f"),
                               "top_tokens": st.column_config.TextColumn("top tokens", width="large")},
            )

best = explanations.best_explanations(DB_URL, model, V)
if best:
    words = st.text_input("Find neurons by their explanation", url.get_str("explained"), placeholder="quote")
    url.sync("explained", words, "")
    if words.strip():
        found = explanations.search(DB_URL, model, words, 50, V)
        if not found:
            st.info(f"No stored explanation of {model}'s neurons contains {words.strip()!r}.")
        else:
            st.caption(f"Neurons whose explanations contain every word of {words.strip()!r}, best score first "
                       "(open ↗ shows the explanation on the neuron's spectrum):")
            st.dataframe(
                pd.DataFrame([dict(neuron=f"L{e.layer} N{e.neuron}", link=explanations.hypothesis_link(model, e),
                                   explanation=e.label, score=e.score, explains=e.recall, precision=e.precision)
                              for e in found]),
                hide_index=True,
                column_config={"link": st.column_config.LinkColumn("open", display_text="open ↗"),
                               "score": st.column_config.NumberColumn("score (F1)", format="%.2f"),
                               "explains": st.column_config.NumberColumn("explains (top range)", format="percent"),
                               "precision": st.column_config.NumberColumn(format="percent")},
            )
phrase = st.text_input("…or on any token of a phrase (runs the model)", url.get_str("phrase"),
                       placeholder="the little dog barked")
if lowercase_note(info.source):
    st.caption(lowercase_note(info.source))
url.sync("phrase", phrase, "")
all_n = cached.layer_neurons(DB_URL, model, None, V)
if phrase.strip():
    maxes: dict[int, list[float]] = {}
    for s_ in all_n:
        maxes.setdefault(s_.layer, [0.0] * info.d_mlp)[s_.neuron] = s_.max
    prepend = next((r.prepend_bos for r in runs if r.job == "neurons"), None)
    try:
        toks, hits = phrase_hits(info.source, phrase, tuple((l, tuple(v)) for l, v in sorted(maxes.items())), prepend)
    except ModelError as e:
        st.error(f"Cannot run {model} live: {e}")
        toks, hits = (), []
    if toks:
        st.caption(f"Tokens: {' '.join(repr(t) for t in toks)}. Neurons ranked by their highest activation on these "
                   "tokens as a share of their corpus max (BOS left out):")
        st.dataframe(
            pd.DataFrame([dict(neuron=f"L{h.layer} N{h.neuron}", link=url.neuron_link(model, h.layer, h.neuron),
                               token=f"'{render.visible_text(h.token)[0]}'", act=h.act, share=h.share,
                               corpus_max=maxes[h.layer][h.neuron]) for h in hits]),
            hide_index=True,
            column_config={"link": st.column_config.LinkColumn("open", display_text="open ↗"),
                           "act": st.column_config.NumberColumn("activation", format="%.3f"),
                           "share": st.column_config.NumberColumn("of corpus max", format="percent"),
                           "corpus_max": st.column_config.NumberColumn("corpus max", format="%.3f")},
        )

# -------------------------------------------------------------------------------- chart
stat = url.get_choice("stat", STATS, "max")
stat = st.selectbox("Chart statistic", list(STATS), index=list(STATS).index(stat), format_func=STATS.get)
url.sync("stat", stat, "max")
TOP_PER_LAYER = 40
cdf = pd.DataFrame([dict(layer=s.layer, neuron=s.neuron, key=f"{s.layer}:{s.neuron}", value=getattr(s, stat),
                         top=" ".join(s.top_tokens[:3])) for s in all_n])
cdf = cdf.sort_values(["layer", "value", "neuron"], ascending=[True, False, True]).groupby("layer").head(TOP_PER_LAYER)
pick = alt.selection_point(fields=["layer", "neuron"], name="pick", on="click")
bars = (
    alt.Chart(cdf)
    .mark_bar()
    .encode(
        x=alt.X("key:N", sort=alt.EncodingSortField("value", order="descending"), title="neuron",
                axis=alt.Axis(labelExpr="'N' + split(datum.value, ':')[1]", labelAngle=-90, labelFontSize=10)),
        y=alt.Y("value:Q", title=stat),
        color=alt.Color("value:Q", title=stat, scale=alt.Scale(scheme="oranges"), legend=None),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.6)),
        tooltip=["layer", "neuron", alt.Tooltip("value:Q", format=".3f", title=STATS[stat]),
                 alt.Tooltip("top:N", title="top tokens")],
    )
    .properties(height=110, width=alt.Step(22))
    .add_params(pick)
    .facet(row=alt.Row("layer:O", title=None, header=alt.Header(labelExpr="'layer ' + datum.value", labelAngle=0,
                                                                  labelAlign="left", labelOrient="top")))
    .resolve_scale(x="independent")
)
ev = st.altair_chart(bars, on_select="rerun", selection_mode="pick", key=f"bars-{model}-{stat}")
st.caption(f"The {TOP_PER_LAYER} neurons with the highest {STATS[stat]} in each layer, highest first (the table below "
           "lists every neuron of a layer). Click a bar to open that neuron.")
sel = url.new_selection(f"bars-{model}-{stat}", (getattr(ev, "selection", None) or {}).get("pick") or [])
if sel and "layer" in sel[0] and "neuron" in sel[0]:
    st.switch_page("views/neuron.py", query_params=url.neuron_params(model, int(sel[0]["layer"]), int(sel[0]["neuron"])))

# -------------------------------------------------------------------------------- neurons vs features
f_runs = cached.feature_runs(DB_URL, model, V)
compared = [(l, explanations.unit_scores(DB_URL, model, l, V)) for l in sorted(f_runs)]
compared = [(l, u) for l, u in compared if u is not None]
if compared:
    st.subheader("Neurons vs SAE features")
    st.caption("Per layer with an SAE feature run: the best stored explanation's score (F1) of every neuron and of "
               "every feature, as a share of each (0 when no candidate explanation scored above 0). Features that "
               "never fire above 0 (dead) have nothing to explain and are left out, and counted.")
for l, u in compared:
    bins = np.linspace(0, 1, 21)
    hist = []
    for unit_name, scores in (("neurons", u.neurons), ("SAE features", u.features)):
        counts, _ = np.histogram(np.clip(scores, 0, 1), bins=bins)
        for i, c in enumerate(counts):
            hist.append(dict(unit=unit_name, bin=f"{bins[i]:.2f}-{bins[i + 1]:.2f}", lo=float(bins[i]), hi=float(bins[i + 1]), count=int(c),
                             share=float(c / max(len(scores), 1))))
    fchart = (
        alt.Chart(pd.DataFrame(hist))
        .mark_bar()
        .encode(
            x=alt.X("bin:N", sort=None, title=f"layer {l}: best explanation's score (F1)", axis=alt.Axis(labelAngle=-45)),
            xOffset=alt.XOffset("unit:N", sort=["neurons", "SAE features"]),
            y=alt.Y("share:Q", title="share of units", axis=alt.Axis(format="%")),
            color=alt.Color("unit:N", scale=alt.Scale(domain=["neurons", "SAE features"], range=["#2870ff", "#ff7600"]),
                            legend=alt.Legend(orient="top", title=None)),
            tooltip=["unit", alt.Tooltip("lo:Q", format=".2f", title="from"), alt.Tooltip("hi:Q", format=".2f", title="to"),
                     "count", alt.Tooltip("share:Q", format=".1%")],
        )
        .properties(height=220)
    )
    st.altair_chart(fchart, width="stretch", key=f"f1-{model}-{l}")
    dead = f"; {u.dead_features} dead, left out" if u.dead_features else ""
    st.markdown(
        f"Layer {l}: median best F1 **{u.median_neurons:.2f}** over {len(u.neurons)} neurons (neuron run "
        f"{u.neurons_run}), **{u.median_features:.2f}** over {len(u.features)} SAE features (feature run {u.features_run}, "
        f"SAE run {u.sae_run}{dead}).",
        help="The medians are of the same scores the chart bins; the neuron page shows each unit's explanations.",
    )

# -------------------------------------------------------------------------------- layer table
layer = param_int("layer", 0, 0, info.n_layers - 1)
layer = st.selectbox("Layer", list(range(info.n_layers)), index=layer)
url.sync("layer", layer, 0)
unit = url.get_choice("unit", ("neuron", "feature"), "neuron")
if layer in f_runs:
    sae = f_runs[layer].params["sae"]
    names_ = {"neuron": f"MLP neurons ({info.d_mlp})", "feature": f"SAE features ({sae['n_features']}, SAE run {sae['run']})"}
    unit = st.radio("Units", list(names_), index=list(names_).index(unit), format_func=names_.get, horizontal=True)
elif unit == "feature":
    st.info(f"Layer {layer} of {model} has no SAE feature run; showing its neurons. Make one with `precompute train-sae "
            f"--layer {layer} ...`, then `precompute run --jobs features,feature-explanations --sae RUN`.")
    unit = "neuron"
url.sync("unit", unit, "neuron")
feat = unit == "feature"
ulink = {"unit": "feature"} if feat else {}
if feat:
    rows = cached.layer_neurons(DB_URL, model, layer, V, "feature")
    best = explanations.best_explanations(DB_URL, model, V, f_runs[layer].id)
else:
    rows = [s for s in all_n if s.layer == layer]
tdf = pd.DataFrame(
    [dict(neuron=s.neuron, link=url.neuron_link(model, s.layer, s.neuron, **ulink), max=s.max, mean=s.mean, std=s.std,
          firing=s.frac_pos, top_tokens=" ".join(f"'{render.visible_text(x)[0]}'" for x in s.top_tokens),
          **({} if not best else dict(explanation=getattr(best.get((s.layer, s.neuron)), "label", ""),
                                      score=getattr(best.get((s.layer, s.neuron)), "score", None)))) for s in rows]
).sort_values("max", ascending=False)
table = st.dataframe(
    tdf,
    hide_index=True,
    width="stretch",
    on_select="rerun",
    selection_mode="single-row",
    key=f"table-{model}-{layer}-{unit}",
    column_config={
        "neuron": st.column_config.NumberColumn("feature" if feat else "neuron"),
        "link": st.column_config.LinkColumn("open", display_text="open ↗"),
        "max": st.column_config.NumberColumn(format="%.3f"),
        "mean": st.column_config.NumberColumn(format="%.3f"),
        "std": st.column_config.NumberColumn(format="%.3f"),
        "firing": st.column_config.ProgressColumn("fraction firing", format="percent", min_value=0.0, max_value=1.0),
        "explanation": st.column_config.TextColumn("best explanation"),
        "score": st.column_config.NumberColumn("score (F1)", format="%.2f"),
        "top_tokens": st.column_config.TextColumn("top tokens", width="large"),
    },
)
st.caption(f"Click a column header to sort; select a row (or click open ↗) to open the {unit}.")
chosen_rows = url.new_selection(f"table-{model}-{layer}-{unit}", (getattr(table, "selection", None) or {}).get("rows") or [])
if chosen_rows:
    n = int(tdf.iloc[chosen_rows[0]]["neuron"])
    st.switch_page("views/neuron.py", query_params=url.neuron_params(model, layer, n, **ulink))
