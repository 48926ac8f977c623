"""Rules overview: ``/rules?model=M``.

How well n-gram rules from the training data describe the model's next-token predictions
(Nguyen, "Understanding Transformers via N-gram Statistics", NeurIPS 2024): top-1 agreement of the
optimal rule next to the model's own top-1 accuracy, how often each rule is optimal, agreement vs
the longest context a rule may use, and the distribution of optimal distances.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from app import cached, url
from app.state import DB_URL, bad_param, store_or_stop
from precompute.jobs.rules import tables as rq
from precompute.store.queries import NotFound

SPLIT_WORDS = {"story": "whole stories", "paragraph": "paragraphs"}

DEFINITIONS = """
**Definitions.** The *context* of a prediction is its last ≤ 7 tokens (never crossing the start of a
story). A *rule* is a template over the context, oldest first: kept tokens must match, `*` stands for
any token, struck-through tokens are dropped (the others close up). Its prediction is the next-token
distribution after every occurrence of the modified context **in the training corpus** (rules with no
occurrence are undefined). The *optimal rule* is the defined rule closest to the model's distribution
(variational distance ½·Σ|p−q|, or L∞); *top-1 agreement* is 1/|A| when the model's top token is among
the rule's top tokens A, else 0.

**Rules describe predictions, they do not explain them:** the optimal rule is chosen *after* seeing the
model's output. A high agreement says the model's predictions look like training-data statistics of
some short template, not that the model computes them that way. The stupid-backoff baseline (longest
suffix that occurs in the training data, chosen without the model) is what a rule can predict on its own.
"""


@st.cache_data(show_spinner=False, max_entries=32)
def overview(db: str, model: str, v: float = 0.0) -> rq.RulesOverview:
    with cached._session(db) as s:
        return rq.rules_overview(s, model)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


store_or_stop()
V = cached.db_version(DB_URL)
models = cached.list_models(DB_URL, V)
if not models:
    bad_param("The database holds no models yet; build it with `precompute run --jobs rules --ngram-corpus ...`.")
with_rules = [m.name for m in models if any(r.job == "rules" for r in cached.list_runs(DB_URL, m.name, V))]
model = url.get_str("model") or (with_rules or [models[0].name])[0]
try:
    ov = overview(DB_URL, model, V)
except NotFound as e:
    st.title("N-gram rules")
    st.error(str(e))
    st.code(f"precompute run --model <path of {model}> --jobs rules --ngram-corpus <its training text>", language="bash")
    st.stop()

st.title(f"N-gram rules · {model}")
st.caption(
    f"Run {ov.run.id}: {ov.n_predictions:,} predictions of {ov.run.corpus} · rule set {ov.rule_set} ({ov.n_rules} rules) · "
    f"{ov.distance} distance · n-gram index: {ov.ngram_corpus} ({ov.index_tokens:,} tokens)"
)
st.caption(f"Training text split into **{SPLIT_WORDS.get(ov.split, ov.split)}** ({ov.split_source}). "
           "Rules are counted inside each piece, never across a piece's start.")
c1, c2, c3, c4 = st.columns(4)
c1.metric("Rule top-1 agreement", pct(ov.agreement), help="1/|A| when the model's top token is in the optimal rule's top set A")
c2.metric("Model top-1 accuracy", pct(ov.model_top1), help="the model's top token equals the true next token (same predictions)")
c3.metric("Backoff agreement", pct(ov.backoff_agreement), help="longest suffix n-gram with support, chosen without the model")
c4.metric("Mean optimal distance", "–" if ov.mean_distance is None else f"{ov.mean_distance:.3f}")
st.caption(f"{ov.n_defined:,} of {ov.n_predictions:,} predictions have at least one defined rule; the numbers above are over those.")
st.info("Rules **describe** the model's predictions (the optimal rule is picked after seeing the model's output); "
        "they do not explain how the model computes them.")

left, right = st.columns(2)
with left:
    st.subheader("How often each rule is optimal")
    top = pd.DataFrame([dict(rule=r.template, count=r.count, agreement=r.agreement) for r in ov.by_rule[:25]])
    if len(top):
        st.altair_chart(
            alt.Chart(top).mark_bar().encode(
                x=alt.X("count:Q", title="predictions where it is optimal"),
                y=alt.Y("rule:N", sort="-x", title="rule template (oldest token first)", axis=alt.Axis(labelFont="monospace")),
                color=alt.Color("agreement:Q", scale=alt.Scale(scheme="viridis", domain=[0, 1]), title="agreement"),
                tooltip=["rule", "count", alt.Tooltip("agreement:Q", format=".3f")],
            ),
            use_container_width=True,
        )
        st.caption("`+` kept token, `-` dropped, `*` any token; e.g. `+*+` = (token 3 back, any, last token) →. "
                   f"Top 25 of {len(ov.by_rule)} rules that are ever optimal.")
with right:
    st.subheader("Agreement vs longest context N")
    rows = [dict(N=n + 1, value=a, what="top-1 agreement (rules up to length N)") for n, a in enumerate(ov.agreement_vs_n) if a is not None]
    rows += [dict(N=n + 1, value=ov.model_top1, what="model top-1 accuracy") for n in range(7) if ov.model_top1 is not None]
    st.altair_chart(
        alt.Chart(pd.DataFrame(rows)).mark_line(point=True).encode(
            x=alt.X("N:O", title="rule set: templates of length ≤ N"),
            y=alt.Y("value:Q", title="fraction", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("what:N", title=None, legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=0),
                            scale=alt.Scale(domain=["top-1 agreement (rules up to length N)", "model top-1 accuracy"],
                                            range=["#ff7600", "#333333"])),
            tooltip=["N", alt.Tooltip("value:Q", format=".3f"), "what"],
        ),
        use_container_width=True,
    )
st.subheader("Distribution of optimal distances")
edges = ov.hist_edges
hist = pd.DataFrame([dict(lo=edges[i], hi=edges[i + 1], count=c) for i, c in enumerate(ov.hist_counts)])
st.altair_chart(
    alt.Chart(hist).mark_bar().encode(
        x=alt.X("lo:Q", bin="binned", title=f"{ov.distance} distance of the optimal rule (0 = exact fit)"),
        x2="hi:Q", y=alt.Y("count:Q", title="predictions"), tooltip=["lo", "hi", "count"],
    ).properties(height=220),
    use_container_width=True,
)
st.markdown(DEFINITIONS)

st.subheader("Stories")
st.caption("Open a story to see every token's optimal rule.")
df = pd.DataFrame([
    dict(story=s.seq_idx, start=s.preview, agreement=s.agreement, mean_distance=s.mean_dist,
         link=f"story?model={model}&story={s.seq_idx}")
    for s in ov.sequences
])
if len(df):
    st.dataframe(df, hide_index=True, use_container_width=True,
                 column_config={"link": st.column_config.LinkColumn("open", display_text="story view"),
                                "agreement": st.column_config.NumberColumn(format="%.3f"),
                                "mean_distance": st.column_config.NumberColumn(format="%.3f")})
st.page_link("views/story.py", label="Story view / live prompt →")
