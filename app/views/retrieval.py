"""Retrieval page: ``/retrieval?model=M&prompt=...&n=8&lam=0.1``: which training windows support a prompt.

Nearest neighbours and SIFT (Hübotter et al. 2024) side by side, the linear surrogate's variance
after each pick, relevance vs redundancy per pick, a test-time fine-tuning sandbox
(``steps``, ``lr``, ``source`` = nn | sift | context, ``cont``, ``sandbox=1`` runs it) and, with
``layer`` + ``neuron``, a neuron's top examples next to their diverse re-selection.
"""

from __future__ import annotations

import math

import altair as alt
import pandas as pd
import streamlit as st

from app import cached, limits, url
from app.render import tokens_html
from app.retrieval_views import show_diverse_examples
from app.state import DB_URL, bad_param, get_model, get_store, note_lowercase, param_int
from precompute.models import ModelError
from precompute.retrieval.sift import DEFAULT_LAMBDA
from precompute.retrieval.support import HIGH_VARIANCE
from precompute.store.queries import NotFound

DEFAULT_PROMPT = "Once upon a time, there was a little dog named"
SOURCES = {"sift": "SIFT picks (fine-tune)", "nn": "nearest neighbours (fine-tune)", "context": "SIFT picks in the context (no training)"}


def param_float(name: str, default: float, lo: float, hi: float) -> float:
    raw = st.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        v = float(raw)
    except ValueError:
        bad_param(f"URL parameter {name}={raw!r} is not a number")
    if not (lo <= v <= hi) or not math.isfinite(v):
        bad_param(f"URL parameter {name}={v} is out of range ({lo}-{hi})")
    return v


@st.cache_resource(show_spinner="Loading the embeddings…", max_entries=4)
def embeddings_index(db: str, model: str, run_id: int, v: float):
    from precompute.retrieval.index import VectorIndex
    from precompute.jobs.embeddings.tables import load_embeddings

    with get_store(db).session() as s:
        emb = load_embeddings(s, model, run_id)
    return emb, VectorIndex(emb.vectors)


@st.cache_data(show_spinner="Retrieving…", max_entries=64)
def support(db: str, model: str, source: str, run_id: int, prompt: str, n: int, lam: float, m: int, v: float):
    from precompute.retrieval.support import prompt_support

    emb, index = embeddings_index(db, model, run_id, v)
    with get_store(db).session() as s:
        return prompt_support(s, get_model(source), model, emb, prompt, n, lam, m, index)


@st.cache_resource(show_spinner="Building the n-gram index of the corpus…", max_entries=2)
def ngram_index(source: str, corpus: str):
    """The n-gram index of the embeddings run's corpus (None when that corpus file is not here)."""
    from pathlib import Path

    from precompute.ngrams.training import open_index

    if not Path(corpus).exists():
        return None
    return open_index(get_model(source), corpus, "subgram", "auto", progress=False)


@st.cache_data(show_spinner="Fine-tuning a copy of the model…", max_entries=16)
def sandbox(source: str, corpus: str, prompt: str, cont: str, examples: tuple, mode: str, steps: int, lr: float):
    from precompute.ttt import SandboxConfig, ngram_rule_fn, run_sandbox

    cfg = SandboxConfig(mode=mode, steps=steps, lr=lr)
    lm = get_model(source)
    index = ngram_index(source, corpus)
    rules = ngram_rule_fn(index) if index is not None else None
    note = None if index is not None else f"Optimal n-gram rule per token: the corpus file {corpus} is not here."
    return run_sandbox(lm, prompt, cont, [list(e) for e in examples], cfg, rules), note


def window_html(w) -> str:
    return tokens_html([t.text for t in w.tokens], special=[t.special for t in w.tokens])


# -------------------------------------------------------------------------------- what to show
model, info, V = cached.page_model("embeddings")
try:
    run = cached.latest_run(DB_URL, model, "embeddings", V)
except NotFound as e:
    bad_param(str(e))
prompt, clipped = limits.clip_prompt(url.get_str("prompt", DEFAULT_PROMPT))
n = param_int("n", 8, 1, 32)
lam = param_float("lam", DEFAULT_LAMBDA, 1e-4, 100.0)
m = param_int("m", 200, 1, 5000)

st.title(f"{model} · training data behind a prediction")
st.caption(
    f"Embeddings run {run.id}: {run.summary.get('n_windows', '?')} windows of "
    f"{run.params.get('window', '?')} tokens from {run.corpus} ({run.n_tokens:,} tokens). "
    "A window's vector is the model's own last-layer residual (after the final norm), averaged over "
    "its tokens, centred on the corpus mean and normalised."
)

note_lowercase(info.source)
with st.form("query"):
    c1, c2, c3, c4 = st.columns([6, 1, 1, 1])
    new_prompt = c1.text_input("Prompt", prompt, max_chars=limits.MAX_PROMPT_CHARS)
    new_n = c2.number_input("picks", 1, 32, n)
    new_lam = c3.number_input("λ (noise)", 1e-4, 100.0, lam, format="%.3g")
    new_m = c4.number_input("candidates", 1, 5000, m)
    if st.form_submit_button("Retrieve"):
        url.sync("prompt", new_prompt, DEFAULT_PROMPT)
        url.sync("n", int(new_n), 8)
        url.sync("lam", float(new_lam), DEFAULT_LAMBDA)
        url.sync("m", int(new_m), 200)
        st.rerun()

st.caption(limits.describe())
if clipped:
    st.warning(clipped)
if not prompt.strip():
    bad_param("Type a prompt to retrieve supporting examples for.")
try:
    with limits.live_slot():
        sup = support(DB_URL, model, info.source, run.id, prompt, n, lam, m, V)
except (ModelError, NotFound, ValueError) as e:
    bad_param(str(e))

# -------------------------------------------------------------------------------- side by side
sel_nn, sel_sift = sup.selections["nn"], sup.selections["sift"]
final = sup.final_variance("sift")
if final > HIGH_VARIANCE:
    st.warning(
        f"After {n} SIFT picks the surrogate's variance is still {final:.2f} (of 1): this corpus has "
        "little data close to this prompt, so the examples below say little about it."
    )
cols = st.columns(2)
for col, sel, title in ((cols[0], sel_nn, "Nearest neighbours"), (cols[1], sel_sift, "SIFT")):
    with col:
        st.subheader(title)
        for p in sel.picks:
            w = sup.windows[p.row]
            again = " · **repeat** (train on it again)" if p.repeat else ""
            st.caption(
                f"pick {p.step} · relevance {p.relevance:.2f} · redundancy {p.redundancy:.2f} · "
                f"variance after {p.variance:.3f} · story {w.story_id}, tokens {w.start}-{w.end - 1}{again}"
            )
            st.html(window_html(w))

# -------------------------------------------------------------------------------- curves
# two hues far apart (and apart for red-green colour blindness): SIFT orange, nearest neighbours blue
METHOD_COLOR = alt.Color("method:N", title=None, legend=alt.Legend(orient="top"),
                         scale=alt.Scale(domain=["nearest neighbours", "SIFT"], range=["#1f4e9c", "#ff7600"]))
rows = []
for meth, sel in (("nearest neighbours", sel_nn), ("SIFT", sel_sift)):
    rows.append(dict(method=meth, pick=0, variance=sel.prior_variance, relevance=None, redundancy=None))
    rows += [dict(method=meth, pick=p.step, variance=p.variance, relevance=p.relevance, redundancy=p.redundancy)
             for p in sel.picks]
df = pd.DataFrame(rows)
c1, c2 = st.columns(2)
with c1:
    st.markdown("**Uncertainty left after each pick**")
    st.altair_chart(
        alt.Chart(df).mark_line(point=True).encode(
            x=alt.X("pick:Q", title="examples picked"),
            y=alt.Y("variance:Q", title="posterior variance (prior 1)", scale=alt.Scale(domain=[0, 1])),
            color=METHOD_COLOR,
            tooltip=["method", "pick", alt.Tooltip("variance:Q", format=".3f")],
        ),
        width="stretch",
    )
with c2:
    st.markdown("**Relevance vs redundancy per pick**")
    st.altair_chart(
        alt.Chart(df.dropna()).mark_point(filled=True, size=70).encode(
            x=alt.X("redundancy:Q", title="max similarity to earlier picks"),
            y=alt.Y("relevance:Q", title="similarity to the prompt"),
            color=METHOD_COLOR,
            tooltip=["method", "pick", alt.Tooltip("relevance:Q", format=".2f"), alt.Tooltip("redundancy:Q", format=".2f")],
        ),
        width="stretch",
    )
st.caption(
    "The variance comes from a linear surrogate (next-token logits linear in these embeddings, "
    f"Bayesian linear regression with noise λ={lam:g}): it says how much of the prompt's direction the "
    "picked windows cover, not a calibrated probability of anything. Nearest neighbours stall on "
    "near-duplicates; SIFT trades relevance against redundancy and may repeat a window (train on it twice)."
    f" Candidates: the prompt's {min(m, sup.n_windows)} nearest of {sup.n_windows:,} windows ({sup.backend} search)."
)

# -------------------------------------------------------------------------------- sandbox
st.header("Test-time fine-tuning sandbox")
steps = param_int("steps", 10, 0, limits.MAX_SANDBOX_STEPS)
lr = param_float("lr", 1e-3, 1e-6, 1.0)
source = url.get_choice("source", SOURCES, "sift")
cont = limits.clip_prompt(url.get_str("cont", ""))[0]
with st.form("sandbox"):
    c1, c2, c3 = st.columns([2, 1, 1])
    new_source = c1.radio("Examples", list(SOURCES), index=list(SOURCES).index(source), format_func=SOURCES.get, horizontal=True)
    new_steps = c2.number_input("Adam steps", 0, limits.MAX_SANDBOX_STEPS, steps,
                                help=f"At most {limits.MAX_SANDBOX_STEPS} steps.")
    new_lr = c3.number_input("learning rate", 1e-6, 1.0, lr, format="%.1e")
    new_cont = st.text_input("Continuation to score (loss before/after)", cont, max_chars=limits.MAX_PROMPT_CHARS)
    if st.form_submit_button("Run sandbox"):
        url.sync("source", new_source, "sift")
        url.sync("steps", int(new_steps), 10)
        url.sync("lr", float(new_lr), 1e-3)
        url.sync("cont", new_cont, "")
        st.query_params["sandbox"] = "1"
        st.rerun()

if st.query_params.get("sandbox") == "1":
    chosen = sel_nn if source == "nn" else sel_sift
    rows_used = chosen.rows if source != "context" else list(dict.fromkeys(chosen.rows))
    examples = tuple(tuple(sup.windows[r].token_ids) for r in rows_used)
    mode = "in_context" if source == "context" else "finetune"
    try:
        with limits.live_slot():
            res, note = sandbox(info.source, run.corpus, prompt, cont, examples, mode, steps, lr)
    except (ModelError, ValueError) as e:
        st.error(str(e))
        st.stop()
    what = (f"{res.steps} Adam steps (lr {res.lr:g}) on {res.n_examples} windows, on a copy of the model "
            "(the loaded model is untouched)" if mode == "finetune"
            else f"no training: {res.context_len} tokens of {res.n_examples} windows put before the prompt")
    st.caption(f"{what} · {res.seconds:.1f} s")
    m1, m2, m3 = st.columns(3)
    if res.loss_before is not None:
        m1.metric("continuation loss (nats/token)", f"{res.loss_after:.3f}", f"{res.loss_after - res.loss_before:+.3f}",
                  delta_color="inverse")
    else:
        m1.caption("Give a continuation to see its loss before/after.")
    if res.train_losses:
        m2.metric("loss on the picked windows", f"{res.train_losses[-1]:.3f}",
                  f"{res.train_losses[-1] - res.train_losses[0]:+.3f}", delta_color="inverse")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Top next tokens after the prompt**")
        st.dataframe(pd.DataFrame({
            "before": [f"{t.text!r} {t.prob:.3f}" for t in res.top_before],
            "after": [f"{t.text!r} {t.prob:.3f}" for t in res.top_after],
        }), hide_index=True, width="stretch")
    with c2:
        st.markdown("**Neurons whose activation on the prompt changed most**")
        st.dataframe(pd.DataFrame([
            dict(neuron=f"L{x.layer} N{x.neuron}", token=f"{res.prompt_tokens[x.pos]!r} (pos {x.pos})",
                 before=round(x.before, 3), after=round(x.after, 3), change=round(x.change, 3))
            for x in res.neurons
        ]), hide_index=True, width="stretch")
    st.markdown("**Heads whose attention on the prompt moved most**")
    st.dataframe(pd.DataFrame([
        dict(head=f"L{h.layer} H{h.head}", change=round(h.change, 3),
             **({"on the added examples": round(h.context_mass, 3)} if mode == "in_context" else {}))
        for h in res.heads
    ]), hide_index=True, width="stretch")
    st.caption("Change = mean total-variation distance between before/after attention rows of the prompt's "
               "tokens (0 = same pattern, 1 = disjoint).")
    if res.rules_before is not None:
        st.markdown("**Optimal n-gram rule per token** (the corpus rule closest to the model's prediction)")

        def fit(m):
            return "—" if m.optimal is None else f"{m.optimal.rendered}  (d={m.optimal.distance:.2f})"

        st.dataframe(pd.DataFrame([
            dict(token=repr(b.token), pos=b.pos, before=fit(b), after=fit(a))
            for b, a in zip(res.rules_before, res.rules_after)
        ]), hide_index=True, width="stretch")
    else:
        st.caption(note or "Optimal n-gram rule per token: not available.")
    if res.train_losses:
        st.altair_chart(
            alt.Chart(pd.DataFrame({"step": range(len(res.train_losses)), "loss": res.train_losses}))
            .mark_line(point=True).encode(x="step:Q", y=alt.Y("loss:Q", title="loss on the picked windows")),
            width="stretch",
        )

# -------------------------------------------------------------------------------- diverse examples
st.header("Diverse max-activating examples")
layer = param_int("layer", None, 0, info.n_layers - 1)
neuron = param_int("neuron", None, 0, info.d_mlp - 1)
if layer is None or neuron is None:
    st.caption("Add `layer` and `neuron` to the URL (e.g. `&layer=0&neuron=5`) to see a neuron's top examples "
               "next to their SIFT re-selection.")
else:
    show_diverse_examples(model, info.source, layer, neuron, lam)
