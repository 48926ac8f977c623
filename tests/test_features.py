"""SAE features as units of the neuron job (`precompute run --jobs features --sae RUN`), on
stories260K: the stored activations against plain hooks on the down-projection and the SAE's
encoder written out by hand, the logit effects against W_dec @ W_out @ W_U by hand, the stored
explanations against the page's score, and the pages (AppTest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.hypothesis import Hypothesis, explained_share
from test_neurons_job import _greedy_top  # the plain reference top-K, shared with the neuron tests

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "app" / "main.py")
LAYER, N_FEATURES, K = 2, 64, 8
MAX_TOKENS, CTX, TOP_K = 3000, 128, 5


@pytest.fixture(scope="module")
def features_db(tmp_path_factory, stories260k_path, valid_corpus):
    """A tiny SAE on layer 2 (64 features, k=8, one epoch over ~2,700 tokens), then one sweep of the
    neuron and feature jobs and both explanation jobs over ~3,000 tokens of valid-head.txt."""
    from precompute.cli import main
    from precompute.store.db import open_store
    from precompute.store.queries import list_runs

    url = f"sqlite:///{tmp_path_factory.mktemp('features') / 'features.db'}"
    assert main(["train-sae", "--model", str(stories260k_path), "--layer", str(LAYER), "--corpus", str(valid_corpus),
                 "--db", url, "--max-tokens", str(MAX_TOKENS), "--ctx-len", str(CTX), "--epochs", "1",
                 "--batch-size", "128", "--features", str(N_FEATURES), "--k", str(K)]) == 0
    with open_store(url, create=False).session() as s:
        sae_run = list_runs(s, "stories260K", "sae")[0].id
    assert main(["run", "--model", str(stories260k_path), "--corpus", str(valid_corpus), "--db", url,
                 "--jobs", "neurons,features,explanations,feature-explanations", "--sae", str(sae_run),
                 "--layers", str(LAYER), "--max-tokens", str(MAX_TOKENS), "--ctx-len", str(CTX),
                 "--top-k", str(TOP_K)]) == 0
    return url


@pytest.fixture(scope="module")
def sae_weights(features_db):
    from precompute.sae.tables import load_sae
    from precompute.store.db import open_store

    with open_store(features_db, create=False).session() as s:
        sae = load_sae(s, "stories260K", LAYER)
    return {k: v.detach().numpy().astype(np.float64) for k, v in sae.state_dict().items()}


@pytest.fixture(scope="module")
def plain_features(lm260k, valid_corpus, sae_weights):
    """Per sequence (the run's tokenisation): its token ids and every feature's activation, from a
    plain pre-hook on the down-projection (hook_post) and TopK(relu((x - b_dec) W_enc + b_enc))
    written out in numpy (float64)."""
    from precompute.corpus import read_text_corpus
    from precompute.sequences import tokenize

    seqs = tokenize(lm260k, read_text_corpus(valid_corpus), ctx_len=CTX, max_tokens=MAX_TOKENS)
    down = lm260k.model.model.layers[LAYER].mlp.down_proj
    w = sae_weights
    out = []
    for ids in seqs.ids:
        seen = {}
        h = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
        try:
            with torch.no_grad():
                lm260k.model(input_ids=torch.tensor(np.asarray(ids)[None, :], dtype=torch.long))
        finally:
            h.remove()
        x = seen["x"][0].double().numpy()
        pre = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0.0)
        keep = np.argsort(-pre, axis=1, kind="stable")[:, :K]
        z = np.zeros_like(pre)
        np.put_along_axis(z, keep, np.take_along_axis(pre, keep, 1), 1)
        out.append((np.asarray(ids), z))
    return seqs, out


def _page(url, feature, unit="feature"):
    from precompute.jobs.neurons.tables import neuron_page
    from precompute.store.db import open_store

    with open_store(url, create=False).session() as s:
        return neuron_page(s, "stories260K", LAYER, feature, unit=unit)


def test_rows_say_their_unit(features_db):
    from precompute.store.db import open_store
    from precompute.store.queries import list_runs
    from precompute.jobs.explanations.tables import ExplanationRow
    from precompute.jobs.neurons.tables import NeuronExampleRow, NeuronStatsRow
    from precompute.sae.tables import SaeRow
    from sqlalchemy import func, select

    with open_store(features_db, create=False).session() as s:
        frun = list_runs(s, "stories260K", "features")[0]
        nrun = list_runs(s, "stories260K", "neurons")[0]
        sae_id = s.scalar(select(SaeRow.id))
        assert frun.params["sae"] == {"id": sae_id, "run": frun.params["sae"]["run"], "layer": LAYER,
                                      "n_features": N_FEATURES, "k": K}
        for table in (NeuronStatsRow, NeuronExampleRow):
            by = dict(s.execute(select(table.run_id, func.count(func.distinct(func.coalesce(table.sae_id, -1))))
                                .group_by(table.run_id)).all())
            assert by == {frun.id: 1, nrun.id: 1}
            assert s.scalar(select(func.min(table.sae_id)).where(table.run_id == frun.id)) == sae_id
            assert s.scalar(select(func.count()).where(table.run_id == nrun.id, table.sae_id.is_not(None))) == 0
        assert s.scalar(select(func.count()).select_from(NeuronStatsRow).where(NeuronStatsRow.run_id == frun.id)) == N_FEATURES
        erun = list_runs(s, "stories260K", "feature-explanations")[0]
        assert erun.params["source_run"] == frun.id
        assert set(s.scalars(select(ExplanationRow.sae_id).where(ExplanationRow.run_id == erun.id))) == {sae_id}


def test_feature_activations_equal_plain_hooks_and_encoder(features_db, plain_features):
    """Top examples (value, sequence, position, window) and moments of every feature, recomputed."""
    seqs, acts = plain_features
    first = seqs.first_scored()
    checked = 0
    for f in range(N_FEATURES):
        page = _page(features_db, f)
        allv = np.concatenate([z[first:, f] for _, z in acts])
        assert page.stats.max == pytest.approx(allv.max(), abs=1e-4)
        assert page.stats.mean == pytest.approx(allv.mean(), abs=1e-5)
        assert page.stats.frac_pos == pytest.approx((allv > 0).mean(), abs=1e-6)
        assert page.n_units == N_FEATURES and page.unit == "feature"
        if allv.max() <= 0:
            continue
        want = _greedy_top([z for _, z in acts], f, TOP_K, page.run.params["ctx_before"], first)
        got = page.examples
        assert len(got) == len(want)
        for e, (v, s, p) in zip(got, want):
            assert e.act == pytest.approx(v, abs=1e-4)
            if abs(e.act - v) > 1e-4 or (e.seq_idx, e.pos) != (s, p):  # a near-tie may swap
                continue
            ids, z = acts[s]
            assert [t.id for t in e.tokens] == ids[e.win_start : e.win_start + len(e.tokens)].tolist()
            assert np.allclose(e.acts, z[e.win_start : e.win_start + len(e.acts), f], atol=1e-4)
            checked += 1
    assert checked >= N_FEATURES  # most of 64 x 5 examples compared position by position


def test_feature_logit_effects_by_hand(features_db, lm260k, sae_weights):
    """W_dec[f] @ W_out @ W_U with W_out the down-projection, W_U the lm head times the final norm's scale."""
    m = lm260k.model
    W_out = m.model.layers[LAYER].mlp.down_proj.weight.detach().double().numpy().T  # [d_mlp, d_model]
    W_U = (m.lm_head.weight.detach().double() * m.model.norm.weight.detach().double()[None, :]).numpy().T
    for f in (0, 7, 31, 63):
        want = sae_weights["W_dec"][f] @ W_out @ W_U
        page = _page(features_db, f)
        order = np.argsort(-want, kind="stable")
        assert [t.token.id for t in page.logit_top] == order[: len(page.logit_top)].tolist()
        assert [t.value for t in page.logit_top] == pytest.approx(want[order[: len(page.logit_top)]], abs=1e-4)
        low = np.argsort(want, kind="stable")
        assert [t.token.id for t in page.logit_bottom] == low[: len(page.logit_bottom)].tolist()
        assert [t.value for t in page.logit_bottom] == pytest.approx(want[low[: len(page.logit_bottom)]], abs=1e-4)


def test_feature_explanations_equal_the_page_score(features_db):
    from precompute.jobs.explanations.tables import neuron_explanations, unit_scores
    from precompute.store.db import open_store

    checked = 0
    with open_store(features_db, create=False).session() as s:
        for f in range(N_FEATURES):
            page = _page(features_db, f)
            stored = neuron_explanations(s, "stories260K", LAYER, f, page.run.id)
            if page.stats.max > 0:
                assert stored, f"F{f} has no explanation"
            for e in stored:
                assert e.unit == "feature"
                ex = explained_share(page, Hypothesis(e.text, e.mode), e.top_pct / 100)
                assert (ex.share, ex.precision, ex.f1, ex.n_tokens) == pytest.approx((e.recall, e.precision, e.score, e.n_top),
                                                                                      abs=1e-12), e.label
                checked += 1
        u = unit_scores(s, "stories260K", LAYER)
    assert checked >= 2 * N_FEATURES
    assert len(u.neurons) + u.dead_neurons == 172 and len(u.features) + u.dead_features == N_FEATURES
    assert 0 < u.median_neurons < 1 and 0 < u.median_features < 1


def test_bad_input_is_one_line(features_db, stories260k_path, valid_corpus, capsys):
    from precompute.cli import main

    base = ["run", "--model", str(stories260k_path), "--corpus", str(valid_corpus), "--db", features_db,
            "--max-tokens", "500", "--jobs", "features"]
    assert main(base) == 2
    assert "needs --sae RUN" in capsys.readouterr().err
    assert main(base + ["--sae", "2"]) == 2  # run 2 is the neuron run
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a complete SAE run" in err
    bundled = str(ROOT / "data" / "models" / "tinystories-4l")
    assert main(base[:2] + [bundled] + base[3:] + ["--sae", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SAE run 1 was trained on 'stories260K', not on 'tinystories-4l'" in err
    assert main(["show", "neuron", "--model", "stories260K", "--layer", str(LAYER), "--neuron", str(N_FEATURES),
                 "--unit", "feature", "--db", features_db]) == 2
    assert f"feature {N_FEATURES} out of range" in capsys.readouterr().err
    assert main(["show", "neuron", "--model", "stories260K", "--layer", "1", "--neuron", "0", "--unit", "feature",
                 "--db", features_db]) == 2
    assert "no SAE feature run for layer 1" in capsys.readouterr().err


def test_an_older_schema_is_refused_in_one_line(tmp_path):
    import sqlite3

    from precompute.store.db import StoreError, open_store

    url = f"sqlite:///{tmp_path / 'old.db'}"
    open_store(url).engine.dispose()
    con = sqlite3.connect(tmp_path / "old.db")
    con.execute("UPDATE tinyscope_meta SET value = '3' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError) as e:
        open_store(url, create=False)
    assert "schema version 3, this tinyscope needs 4" in str(e.value) and "\n" not in str(e.value)


def test_feature_pages(features_db, lm260k, monkeypatch):
    """AppTest: the feature page (numbers from the database, live test through the SAE), its
    one-line refusals, and the overview's unit switch and neurons-vs-features chart."""
    import app.state
    from streamlit.testing.v1 import AppTest

    from precompute.jobs.explanations.tables import unit_scores
    from precompute.store.db import open_store

    monkeypatch.setattr(app.state, "DB_URL", features_db)

    def open_page(page, **params):
        at = AppTest.from_file(MAIN, default_timeout=120)
        at.query_params.update({k: str(v) for k, v in params.items()})
        at.switch_page(page)  # straight to the page, as a pasted link opens it
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    f = 5
    p = _page(features_db, f)
    at = open_page("views/neuron.py", model="stories260K", layer=LAYER, unit="feature", neuron=f, prompt="Once upon a time")
    assert at.title[0].value == f"stories260K · L{LAYER} F{f}"
    assert next(m for m in at.metric if m.label == "max").value == f"{p.stats.max:.3f}"
    assert "Test this feature" in [h.value for h in at.subheader]
    live = next(m.value for m in at.markdown if m.value.startswith("Max activation"))
    from app.live import neuron_on_text
    from precompute.sae.tables import load_sae

    with open_store(features_db, create=False).session() as s:
        sae = load_sae(s, "stories260K", LAYER)
    want = neuron_on_text(lm260k, "Once upon a time", LAYER, f, True, sae)
    assert f"**{want.acts[want.max_pos]:.3f}**" in live
    for params, msg in (({"neuron": N_FEATURES}, f"feature {N_FEATURES} out of range"),
                        ({"layer": 1}, "no SAE feature run for layer 1")):
        q = {**dict(model="stories260K", layer=LAYER, unit="feature", neuron=0), **params}
        at = open_page("views/neuron.py", **q)
        assert [e.value for e in at.error] and msg in at.error[0].value and "\n" not in at.error[0].value

    at = open_page("views/overview.py", model="stories260K", layer=LAYER, unit="feature")
    assert "Neurons vs SAE features" in [h.value for h in at.subheader]
    with open_store(features_db, create=False).session() as s:
        u = unit_scores(s, "stories260K", LAYER)
    text = " ".join(m.value for m in at.markdown)
    assert f"median best F1 **{u.median_neurons:.2f}**" in text and f"**{u.median_features:.2f}** over" in text
    table = next(df.value for df in at.dataframe if "link" in df.value.columns and "firing" in df.value.columns)
    assert len(table) == N_FEATURES and all("unit=feature" in x for x in table["link"])


def test_bundled_model_features_by_hand(bundled_lm, valid_corpus):
    """The bundled model (GPT-2 family: Conv1D weights, LayerNorm): an SAE made in the test (random
    decoder, encoder its transpose, no training) through the job's API; each feature's max and top
    example against a pre-hook on c_proj and the encoder in numpy, its logit effects against
    W_dec @ c_proj.weight @ (W_U * ln_f scale) by hand."""
    from precompute.corpus import read_text_corpus
    from precompute.jobs.neurons import NeuronsConfig, run
    from precompute.sae.model import FeatureUnits, TopKSAE
    from precompute.sequences import tokenize

    lm, layer, k = bundled_lm, 1, 4
    seqs = tokenize(lm, read_text_corpus(valid_corpus, max_stories=40), ctx_len=64, max_tokens=800)
    c_proj = lm.model.transformer.h[layer].mlp.c_proj
    xs = []
    for ids in seqs.ids:
        seen = {}
        h = c_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
        try:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor(np.asarray(ids)[None, :], dtype=torch.long))
        finally:
            h.remove()
        xs.append(seen["x"][0].double().numpy())
    sae = TopKSAE(lm.d_mlp, 40, k)
    sae.init_from(torch.from_numpy(np.concatenate(xs)).float(), seed=3)
    res = run(lm, seqs, NeuronsConfig(top_k=3, sae=FeatureUnits(1, 1, "tinystories-4l", layer, sae)))
    L = res.layers[0]
    assert L.layer == layer and len(L.max) == 40
    w = {n: v.detach().double().numpy() for n, v in sae.state_dict().items()}
    first = seqs.first_scored()
    z = []
    for x in xs:
        pre = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0.0)
        keep = np.argsort(-pre, axis=1, kind="stable")[:, :k]
        zz = np.zeros_like(pre)
        np.put_along_axis(zz, keep, np.take_along_axis(pre, keep, 1), 1)
        z.append(zz[first:])
    allz = np.concatenate(z)
    assert np.allclose(L.max, allz.max(0), atol=1e-4) and np.allclose(L.mean, allz.mean(0), atol=1e-5)
    for f in range(40):
        if allz[:, f].max() > 0:
            e = L.examples[f][0]
            assert e.act == pytest.approx(z[e.seq][e.pos - first, f], abs=1e-4)
            assert e.act == pytest.approx(allz[:, f].max(), abs=1e-4)
    m = lm.model
    W_U = (m.lm_head.weight.detach().double() * m.transformer.ln_f.weight.detach().double()[None, :]).numpy().T
    effects = w["W_dec"] @ c_proj.weight.detach().double().numpy() @ W_U
    for f in (0, 13, 39):
        order = np.argsort(-effects[f], kind="stable")[: L.logit_top.shape[1]]
        assert L.logit_top[f].tolist() == order.tolist()
        assert np.allclose(L.logit_top_values[f], effects[f][order], atol=1e-4)
