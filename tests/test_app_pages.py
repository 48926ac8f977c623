"""The overview and neuron pages through Streamlit's AppTest (no browser), against ``neurons_db``."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "app" / "main.py")
MODEL = "stories260K"


@pytest.fixture
def db(monkeypatch, neurons_db):
    """Point the app at the test database (app/state.py read TINYSCOPE_DB when first imported)."""
    import app.state

    monkeypatch.setenv("TINYSCOPE_DB", neurons_db)
    monkeypatch.setattr(app.state, "DB_URL", neurons_db)
    return neurons_db


def open_page(page: str, **params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(MAIN, default_timeout=120)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    at.switch_page(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def test_neuron_page_shows_the_stored_numbers(db):
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import neuron_page

    with open_store(db, create=False).session() as s:
        want = neuron_page(s, MODEL, 2, 5)
    at = open_page("views/neuron.py", model=MODEL, layer=2, neuron=5)
    assert not errors(at)
    assert at.title[0].value == f"{MODEL} · L2 N5"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["max"] == f"{want.stats.max:.3f}"
    assert metrics["firing (> 0)"] == f"{want.stats.frac_pos:.1%}"
    html = "".join(h.proto.body for h in at.get("html"))
    assert f"activation <b>{want.examples[0].act:.3f}</b>" in html
    assert html.count('class="example"') == min(5, len(want.examples))
    code = at.code[0].value
    assert "neuron?model=stories260K&layer=2&neuron=5" in code


def test_hypothesis_share_and_url_state(db):
    from app.hypothesis import Hypothesis, explained_share
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import neuron_page

    with open_store(db, create=False).session() as s:
        p = neuron_page(s, MODEL, 1, 3)
    top = p.examples[0].tokens[p.examples[0].max_index].text.strip()
    at = open_page("views/neuron.py", model=MODEL, layer=1, neuron=3, hyp=top, log=1, top=10)
    ex = explained_share(p, Hypothesis(top, "list"), 0.10)
    label = next(m for m in at.metric if "explained by the hypothesis" in m.label)
    assert label.value == f"{ex.share:.0%}"
    assert at.checkbox[0].value is True  # log y from the URL
    assert at.text_input[0].value == top


def test_bad_regex_is_a_warning_not_a_traceback(db):
    at = open_page("views/neuron.py", model=MODEL, layer=0, neuron=0, hyp="([", mode="regex")
    assert any("not a valid regular expression" in w.value for w in at.warning)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(model=MODEL, layer=5, neuron=0), "layer=5 is out of range (0-4)"),
        (dict(model=MODEL, layer=0, neuron=172), "neuron=172 is out of range (0-171)"),
        (dict(model=MODEL, layer=-1, neuron=0), "layer=-1 is out of range"),
        (dict(model=MODEL, layer="x", neuron=0), "layer='x' is not a whole number"),
        (dict(model="gpt-17", layer=0, neuron=0), "model 'gpt-17' is not in this database (models: stories260K)"),
    ],
)
def test_bad_links_give_a_message_and_a_way_back(db, params, message):
    at = open_page("views/neuron.py", **params)
    assert any(message in e for e in errors(at)), errors(at)
    assert not at.title  # the page stopped before drawing anything
    links = [pl.proto.label for pl in at.get("page_link")]
    assert "Go to the model overview" in links


def test_live_prompt_is_coloured_and_long_prompts_are_truncated(db, lm260k):
    from app.live import neuron_on_text

    text = "Once upon a time there was a dog. " * 80  # > 512 tokens
    want = neuron_on_text(lm260k, text, 3, 11, prepend_bos=True)
    assert want.truncated and len(want.ids) == lm260k.n_ctx
    at = open_page("views/neuron.py", model=MODEL, layer=3, neuron=11, prompt=text)
    assert any("only the first 512 are used" in w.value for w in at.warning)
    md = " ".join(m.value for m in at.markdown)
    assert f"Max activation **{want.acts[want.max_pos]:.3f}** at position **{want.max_pos}**" in md
    html = "".join(h.proto.body for h in at.get("html"))
    assert html.count('class="tok') >= 512


def test_overview_lists_runs_and_finds_neurons_by_token(db):
    at = open_page("views/overview.py", q="the")
    assert not errors(at)
    frames = [d.value for d in at.dataframe]
    models, runs = frames[0], frames[1]
    assert list(models["model"]) == [MODEL]
    assert list(runs["job"]) == ["neurons"] and runs["BOS"].iloc[0] == "prepended"
    search = frames[2]
    assert len(search) > 0 and set(search["token"]) <= {"'the'", "' the'"}
    layer0 = frames[3]
    assert len(layer0) == 172 and list(layer0["max"]) == sorted(layer0["max"], reverse=True)
    assert layer0["link"].iloc[0].startswith("neuron?model=stories260K&layer=0&neuron=")


def test_overview_unknown_model(db):
    at = open_page("views/overview.py", model="nope")
    assert any("model 'nope' is not in this database" in e for e in errors(at))


def test_missing_database_shows_the_build_command(monkeypatch, tmp_path):
    import app.state

    url = f"sqlite:///{tmp_path / 'absent.db'}"
    monkeypatch.setattr(app.state, "DB_URL", url)
    for page in ("views/overview.py", "views/neuron.py"):
        at = open_page(page, model=MODEL, layer=0, neuron=0)
        assert any("no database at" in e for e in errors(at)), errors(at)
        assert any("precompute run" in c.value for c in at.code)
        assert not (tmp_path / "absent.db").exists()  # looking never creates a database


def test_bottom_examples_bands_bos_and_an_empty_bin(db):
    """stories260K L0 N66 fires far higher on BOS than on any scored token: the page says so."""
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import neuron_page

    with open_store(db, create=False).session() as s:
        p = neuron_page(s, MODEL, 0, 66)
    assert p.bos_above_max and p.bottom_examples and p.bands
    empty = next(i for i, c in enumerate(p.histogram.counts) if c == 0)
    at = open_page("views/neuron.py", model=MODEL, layer=0, neuron=66, bin=empty, hyp="the", log=1)
    assert not errors(at)
    html = "".join(h.proto.body for h in at.get("html"))
    assert html.count('class="example-low"') == min(5, len(p.bottom_examples))
    assert f"activation <b>{p.bottom_examples[0].act:.3f}</b>" in html
    assert html.count('class="band-sample"') == sum(len(b.samples) for b in p.bands)
    assert f"{p.bands[0].samples[0].act:+.3f}" in html
    warning = " ".join(w.value for w in at.warning)
    assert f"On BOS this neuron reaches {p.bos_act:.3f}" in warning and f"({p.stats.max:.3f})" in warning
    assert any(f"asks for bin {empty}, which has no tokens" in i.value for i in at.info)
    e = p.examples[0]  # the story id and position once; the sequence only when it is another number
    seq = "" if e.seq_idx == e.story_id else f" (sequence {e.seq_idx})"
    assert f"story {e.story_id}{seq}, position {e.pos}</div>" in html
    # previous / next keep the hypothesis and the log scale
    links = {pl.proto.label: pl.proto.query_string for pl in at.get("page_link")}
    nxt = next(q for label, q in links.items() if label.endswith("→") and label.startswith("L"))
    assert "neuron=67" in nxt and "hyp=the" in nxt and "log=1" in nxt and "bin=" not in nxt


def test_logit_effects_only_seen_tokens_unless_asked(db):
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import neuron_page

    with open_store(db, create=False).session() as s:
        p = neuron_page(s, MODEL, 1, 7)
    at = open_page("views/neuron.py", model=MODEL, layer=1, neuron=7)
    box = next(c for c in at.checkbox if c.label == "include tokens never seen in the corpus")
    assert box.value is False and all(t.count > 0 for t in p.logit_top_seen)
    at = open_page("views/neuron.py", model=MODEL, layer=1, neuron=7, alltok=1)
    assert next(c for c in at.checkbox if c.label == "include tokens never seen in the corpus").value is True


def test_search_neurons_by_a_phrase(db, lm260k):
    """The overview's phrase search against plain forward hooks on the same tokens."""
    import numpy as np
    import torch

    from precompute.jobs.neurons.tables import layer_neurons
    from precompute.store.db import open_store

    phrase = "The little dog barked at the cat."
    with open_store(db, create=False).session() as s:
        summ = layer_neurons(s, MODEL)
    ids = lm260k.encode(phrase, prepend_bos=True)
    seen = {}
    hooks = [lm260k.model.model.layers[l].mlp.down_proj.register_forward_pre_hook(
        lambda m, a, l=l: seen.__setitem__(l, a[0][0, 1:].numpy().copy())) for l in range(5)]
    try:
        with torch.no_grad():
            lm260k.model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    scored = []
    for x in summ:
        best = float(seen[x.layer][:, x.neuron].max())
        if x.max > 0:
            scored.append((best / x.max, x.layer, x.neuron, best))
    scored.sort(key=lambda t: (-t[0], t[1], t[2]))
    at = open_page("views/overview.py", model=MODEL, phrase=phrase)
    assert not errors(at)
    table = next(df.value for df in at.dataframe if "of corpus max" in df.value.columns or "share" in df.value.columns)
    assert list(table["neuron"][:5]) == [f"L{l} N{n}" for _, l, n, _ in scored[:5]]
    np.testing.assert_allclose(table["act"][:5], [b for *_, b in scored[:5]], atol=1e-4)


def test_lowercase_note_only_for_a_lowercasing_tokenizer(stories260k_path):
    from app.state import lowercase_note

    assert "lowercases" in lowercase_note(str(ROOT / "data" / "models" / "tinystories-4l"))
    assert lowercase_note(str(stories260k_path)) is None
