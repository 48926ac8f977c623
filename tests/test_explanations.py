"""The explanation job: hand-built neurons with known answers, and on stories260K and the bundled
model, every stored score equal to what the neuron page computes for the same hypothesis."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from app.hypothesis import Hypothesis, explained_share, score
from precompute.jobs.explanations.job import (ExplanationsConfig, NeuronData, best_prefix, explain, next_hypothesis,
                                              prev_hypothesis, re_escape, token_set_hypothesis)
from precompute.jobs.neurons.tables import CTX_WIDTH, SAMPLE_DTYPE

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "app" / "main.py")
VOC = ["<s>", " the", " dog", " cat", ".", ' "', " Lily", " ran", " big", ",", " a"]
T = {t.strip() or t: i for i, t in enumerate(VOC)}  # "the" -> 1, '"' -> 5


def sample(bin_: int, ctx: list[str], at: int, seq: int, act: float | None = None):
    ids = [VOC.index(t) for t in ctx]
    rec = np.zeros(1, SAMPLE_DTYPE)[0]
    rec["seq"], rec["pos"], rec["act"], rec["bin"] = seq, at, bin_ + 0.5 if act is None else act, bin_
    rec["at"], rec["n_ctx"] = at, len(ids)
    rec["ctx"] = ids + [-1] * (CTX_WIDTH - len(ids))
    return rec


def neuron(counts, samples, layer=0, n=0, top_tokens=(), logit_top=()) -> NeuronData:
    edges = np.arange(len(counts) + 1, dtype=np.float64)
    return NeuronData(layer, n, edges, np.asarray(counts, np.int64), np.array(samples, SAMPLE_DTYPE),
                      [list(t) for t in top_tokens], [list(t) for t in logit_top])


def by_label(res, layer=0, n=0):
    return {e.label: e for e in res.explanations if (e.layer, e.neuron) == (layer, n)}


# ----------------------------------------------------------------------------- hand-built cases


def test_best_prefix_is_the_best_f1_set():
    # item 1: 10 top tokens of 10; item 2: 5 top of 20; item 3: 0 top; 20 tokens in the top range
    keys = np.array([1, 1, 2, 2, 3])
    w = np.array([5.0, 5.0, 5.0, 15.0, 50.0])
    top = np.array([True, True, True, False, False])
    # {1}: F1 = 2*10/(10+20) = .667; {1,2}: 2*15/(30+20) = .6 -> {1}
    assert best_prefix(keys, w, top, 20, 5) == [1]
    # with 40 top tokens: {1}: 20/50 = .4; {1,2}: 30/70 = .43 -> {1, 2}; item 3 never (nothing in the top)
    assert best_prefix(keys, w, top, 40, 5) == [1, 2]
    assert best_prefix(keys, w, top, 40, 1) == [1]
    assert best_prefix(np.array([-1, -1]), w[:2], top[:2], 10, 5) == []


def test_escaping_and_hypothesis_forms():
    for text in [" the", "a.b", "(x)*", "[[", "\\", 'say "hi"', "\n", "?|^$"]:
        hyp = Hypothesis(re_escape(text) + "$", "regex")
        assert hyp.matches("zz" + text) and not hyp.matches(text + "z")
    assert token_set_hypothesis(["dog", "cat"]) == ("list", "dog, cat")
    mode, text = token_set_hypothesis([",", "."])  # a comma cannot be a list item
    hyp = Hypothesis(text, mode)
    assert mode == "regex" and hyp.matches(",") and hyp.matches(" .") and not hyp.matches(" ,a")
    assert Hypothesis(prev_hypothesis([" the"]), "context").matches_context("once the[[ dog]] ran")
    assert not Hypothesis(prev_hypothesis([" the"]), "context").matches_context("bathe[[ dog]]")
    assert Hypothesis(next_hypothesis([" ran", "."]), "context").matches_context(" the[[ dog]]. The")


def test_a_dog_neuron():
    """Bins 0-4 of width 1; the top 20% is bin 4. Bin 4: 40 tokens, 4 sampled, all ' dog' after
    ' the'. Bin 0: 1,000 tokens, 10 sampled, one ' dog' (after ' a': 100 estimated) and ' the' before
    one ' cat'. Known: token dog: recall 1, precision 40 / 140; after ' the': recall 1, precision 40 / 140."""
    top = [sample(4, ["<s>", " the", " dog"], 2, s) for s in range(4)]
    low = [sample(0, ["<s>", " a", " dog"], 2, 10)] + [sample(0, ["<s>", " the", " cat"], 2, 11)]
    low += [sample(0, ["<s>", " big", " ran"], 2, 12 + i) for i in range(8)]
    nd = neuron([1000, 0, 0, 0, 40], top + low, top_tokens=[(2, 3.5, 44)], logit_top=[(7, 1.0)])
    res = explain([nd], VOC, {0}, 0, ExplanationsConfig(top_pct=20, n_keep=20))
    got = by_label(res)
    dog = got["token 'dog'"]
    assert (dog.mode, dog.text) == ("list", "dog")
    assert dog.recall == pytest.approx(1.0) and dog.precision == pytest.approx(40 / 140)
    assert dog.score == pytest.approx(2 * (40 / 140) / (1 + 40 / 140)) and dog.n_top == 40
    after = got["after ' the'"]
    assert after.mode == "context" and after.recall == pytest.approx(1.0) and after.precision == pytest.approx(40 / 140)
    story = got["start of a story"]  # every sample has BOS in its context
    assert story.recall == pytest.approx(1.0) and story.precision == pytest.approx(40 / 1040)
    assert res.explanations[0].rank == 0 and [e.rank for e in res.explanations] == list(range(len(res.explanations)))
    assert all(a.score >= b.score for a, b in zip(res.explanations, res.explanations[1:]))


def test_precise_set_beats_a_broad_one_and_classes():
    """Top bin (4): ' Lily' x2, ' dog' x2 in a quote; low bin: ' Lily' never, ' dog' 5 of 10 (of
    1,000): the name class explains half the top at precision 1; the quote explains all of it."""
    top = [sample(4, ["<s>", ' "', " Lily"], 2, 1), sample(4, ["<s>", ' "', " Lily"], 2, 2),
           sample(4, [" ran", ' "', " the", " dog"], 3, 3), sample(4, [" ran", ' "', " a", " dog"], 3, 4)]
    low = [sample(0, ["<s>", " the", " dog"], 2, 10 + i) for i in range(5)]
    low += [sample(0, ["<s>", " the", " cat"], 2, 20 + i) for i in range(5)]
    nd = neuron([1000, 0, 0, 0, 4], top + low)
    got = by_label(explain([nd], VOC, {0}, 0, ExplanationsConfig(n_keep=20)))
    name = got["a name"]
    assert name.recall == pytest.approx(0.5) and name.precision == pytest.approx(1.0)
    quote = got["inside a quote"]
    assert quote.recall == pytest.approx(1.0) and quote.precision == pytest.approx(1.0) and quote.score == pytest.approx(1.0)
    assert got["token 'lily'"].precision == pytest.approx(1.0)  # the best token set: Lily alone (dog is imprecise)
    story = got.get("start of a story")  # BOS in the context: 2 of 4 top samples, all 10 low ones
    assert story is not None and story.recall == pytest.approx(0.5) and story.precision == pytest.approx(2 / 1002)


def test_stored_scores_equal_the_page_on_hand_built_data():
    """The page's ``explained_share`` on a NeuronPage-like object with the same samples gives the
    stored numbers exactly, for every stored explanation."""
    from types import SimpleNamespace

    top = [sample(4, ["<s>", " the", " dog", "."], 2, s) for s in range(3)] + [sample(4, ["<s>", " big", " cat"], 2, 9)]
    mid = [sample(1, ["<s>", " a", " dog", " ran"], 2, 20 + i) for i in range(3)]
    nd = neuron([500, 30, 0, 0, 4], top + mid, logit_top=[(4, 2.0)])
    res = explain([nd], VOC, {0}, 0, ExplanationsConfig(n_keep=20))
    assert len(res.explanations) >= 4
    spectrum = []
    for r in nd.samples:
        ctx = [VOC[t] for t in r["ctx"][: r["n_ctx"]]]
        at = int(r["at"])
        spectrum.append(SimpleNamespace(bin=int(r["bin"]), token=SimpleNamespace(text=ctx[at]),
                                        context="".join(ctx[:at]) + f"[[{ctx[at]}]]" + "".join(ctx[at + 1:])))
    page = SimpleNamespace(histogram=SimpleNamespace(edges=tuple(nd.edges), counts=tuple(int(c) for c in nd.counts)),
                           spectrum=tuple(spectrum))
    for e in res.explanations:
        ex = explained_share(page, Hypothesis(e.text, e.mode), 0.2)
        assert (ex.share, ex.precision, ex.f1) == (e.recall, e.precision, e.score), e.label


def test_score_recall_precision_f1():
    # bins [0,1), [1,2): 100 and 10 tokens; samples: bin 0 x4 (1 match), bin 1 x2 (2 match)
    ex = score([0.0, 1.0, 2.0], [100, 10], [0, 0, 0, 0, 1, 1], [True, False, False, False, True, True], 0.5)
    assert ex.share == pytest.approx(1.0) and ex.precision == pytest.approx(10 / 35) and ex.n_tokens == 10
    assert ex.f1 == pytest.approx(2 * (10 / 35) / (1 + 10 / 35))
    none = score([0.0, 1.0, 2.0], [100, 10], [0, 1], [False, False], 0.5)
    assert none.share == 0.0 and none.precision is None and none.f1 == 0.0


def test_config_is_checked():
    with pytest.raises(ValueError, match="explain-top"):
        ExplanationsConfig(top_pct=25)
    with pytest.raises(ValueError, match="at least 1"):
        ExplanationsConfig(n_keep=0)


# ----------------------------------------------------------------------------- real models


def _explained_db(tmp_path, source_db: str) -> str:
    """A copy of a neuron database with an explanation run added by `precompute run`."""
    from precompute.cli import main

    path = tmp_path / "explained.db"
    shutil.copy(source_db[len("sqlite:///"):], path)
    url = f"sqlite:///{path}"
    assert main(["run", "--model", "stories260K", "--db", url, "--jobs", "explanations"]) == 0
    return url


def _check_against_pages(url: str, model: str, neurons: list[tuple[int, int]]) -> int:
    from precompute.jobs.explanations.tables import neuron_explanations
    from precompute.jobs.neurons.tables import neuron_page
    from precompute.store.db import open_store

    checked = 0
    with open_store(url, create=False).session() as s:
        for layer, n in neurons:
            page = neuron_page(s, model, layer, n)
            stored = neuron_explanations(s, model, layer, n)
            assert stored, f"L{layer} N{n} has no explanation"
            assert [e.rank for e in stored] == list(range(len(stored)))
            for e in stored:
                ex = explained_share(page, Hypothesis(e.text, e.mode), e.top_pct / 100)
                assert ex.share == pytest.approx(e.recall, abs=1e-12), e.label
                assert ex.precision == pytest.approx(e.precision, abs=1e-12), e.label
                assert ex.f1 == pytest.approx(e.score, abs=1e-12), e.label
                assert ex.n_tokens == e.n_top
                checked += 1
    return checked


def test_stories260k_scores_equal_the_page(neurons_db, tmp_path):
    url = _explained_db(tmp_path, neurons_db)
    from precompute.store.db import open_store
    from precompute.store.queries import list_runs

    with open_store(url, create=False).session() as s:
        run = list_runs(s, "stories260K", "explanations")[0]
        neurons_run = list_runs(s, "stories260K", "neurons")[0]
    assert run.params["source_run"] == neurons_run.id and run.summary["n_neurons"] == 5 * 172
    assert run.summary["n_explained"] == 5 * 172
    n = _check_against_pages(url, "stories260K", [(0, 0), (1, 7), (2, 5), (3, 100), (4, 171)])
    assert n >= 15


def test_context_strings_equal_the_page(neurons_db):
    """The job builds each sample's context string exactly as the neuron page does."""
    from precompute.jobs.explanations.job import SampleIndex
    from precompute.jobs.explanations.tables import read_neurons
    from precompute.jobs.neurons.tables import neuron_page
    from precompute.store.db import open_store
    from precompute.store.queries import get_model, latest_run, vocab

    with open_store(neurons_db, create=False).session() as s:
        run = latest_run(s, "stories260K", "neurons")
        nds = [nd for nd in read_neurons(s, run.id) if (nd.layer, nd.neuron) in {(0, 3), (4, 9)}]
        ix = SampleIndex(nds, vocab(s, "stories260K"), set(get_model(s, "stories260K").special_ids))
        for nd, idx in zip(nds, ix.of_neuron):
            page = neuron_page(s, "stories260K", nd.layer, nd.neuron)
            assert [ix.contexts[i] for i in idx] == [smp.context for smp in page.spectrum]
            assert ix.tok[idx].tolist() == [smp.token.id for smp in page.spectrum]


def test_search_and_show(neurons_db, tmp_path, capsys):
    import json

    from precompute.cli import main
    from precompute.jobs.explanations.tables import search_explanations
    from precompute.store.db import open_store

    url = _explained_db(tmp_path, neurons_db)
    with open_store(url, create=False).session() as s:
        hits = search_explanations(s, "stories260K", "QUOTE")
    assert hits and all("quote" in h.label.lower() for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len({(h.layer, h.neuron) for h in hits}) == len(hits)
    capsys.readouterr()
    assert main(["show", "explanations", "--model", "stories260K", "--db", url, "--layer", "1", "--neuron", "7"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown and shown[0]["rank"] == 0 and {"label", "mode", "text", "score", "recall", "precision"} <= set(shown[0])


def test_cli_errors(tmp_path, neurons_db, capsys):
    from precompute.cli import main

    empty = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["run", "--model", "stories260K", "--db", empty, "--jobs", "explanations"]) == 2
    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    assert main(["run", "--model", "no-such-model", "--db", neurons_db, "--jobs", "explanations"]) == 2
    assert "'no-such-model' is not in this database" in capsys.readouterr().err
    assert main(["run", "--model", "stories260K", "--db", neurons_db, "--jobs", "explanations", "--explain-top", "25"]) == 2
    assert "--explain-top must be one of" in capsys.readouterr().err


def test_bundled_model_scores_equal_the_page(tmp_path, valid_corpus):
    """The bundled model (GPT-2 family, lowercase tokenizer) through `precompute run --jobs neurons,explanations`."""
    from precompute.cli import main

    bundled = ROOT / "data" / "models" / "tinystories-4l"
    if not (bundled / "model.safetensors").exists():
        pytest.skip(f"{bundled} is absent")
    url = f"sqlite:///{tmp_path / 'bundled.db'}"
    assert main(["run", "--model", str(bundled), "--corpus", str(valid_corpus), "--db", url, "--jobs",
                 "neurons,explanations", "--max-tokens", "2000", "--ctx-len", "128", "--top-k", "5",
                 "--layers", "0,3"]) == 0
    assert _check_against_pages(url, "tinystories-4l", [(0, 0), (0, 200), (3, 17), (3, 511)]) >= 10


def test_neuron_page_and_overview_show_explanations(neurons_db, tmp_path, monkeypatch):
    """AppTest: the neuron page lists the stored explanations as links carrying the hypothesis;
    the link's view shows the stored share; the overview finds neurons by explanation."""
    import app.state
    from streamlit.testing.v1 import AppTest

    from precompute.jobs.explanations.tables import neuron_explanations
    from precompute.store.db import open_store

    url = _explained_db(tmp_path, neurons_db)
    monkeypatch.setattr(app.state, "DB_URL", url)
    with open_store(url, create=False).session() as s:
        stored = neuron_explanations(s, "stories260K", 1, 7)

    def open_page(page, **params):
        at = AppTest.from_file(MAIN, default_timeout=120)
        at.query_params.update({k: str(v) for k, v in params.items()})
        at.run()
        at.switch_page(page)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    at = open_page("views/neuron.py", model="stories260K", layer=1, neuron=7)
    assert "Explanations" in [h.value for h in at.subheader]
    shown = " ".join(c.value for c in at.caption)
    assert all(f"score {e.score:.2f}" in shown for e in stored)
    e = stored[0]
    at = open_page("views/neuron.py", model="stories260K", layer=1, neuron=7, hyp=e.text, mode=e.mode, top=e.top_pct)
    metric = next(m for m in at.metric if "explained by the hypothesis" in m.label)
    assert metric.value == f"{e.recall:.0%}"
    assert next(m for m in at.metric if m.label == "score (F1)").value == f"{e.score:.2f}"

    at = open_page("views/overview.py", model="stories260K", explained="quote")
    frames = [df.value for df in at.dataframe]
    found = next(f for f in frames if "explanation" in f.columns and "precision" in f.columns)
    assert len(found) and all("quote" in x for x in found["explanation"])
    table = next(f for f in frames if "best explanation" in f.columns or "explanation" in f.columns and "firing" in f.columns)
    assert table["explanation"].astype(bool).all()
