"""SAE features in a real browser: a feature's page shows the stored numbers, and the overview shows
the neurons-vs-features chart and lists the features. Its own database (an SAE must be trained
before its feature run) and app, built like ``browser_db`` over the same ~3,000 tokens."""

from __future__ import annotations

import re

import pytest

from conftest import BROWSER_RUN_ARGS, MODEL, STORIES260K, VALID, AppDriver, expect, start_app, stop_app

pytestmark = pytest.mark.browser
LAYER = 2


@pytest.fixture(scope="module")
def features_app(tmp_path_factory):
    from precompute.cli import main
    from precompute.store.db import open_store
    from precompute.store.queries import list_runs

    if not STORIES260K.exists() or not VALID.exists():
        pytest.skip("stories260K and valid-head.txt live beside the repo in ../shared, which is absent")
    folder = tmp_path_factory.mktemp("features-browser")
    url = f"sqlite:///{folder / 'features.db'}"
    assert main(["train-sae", "--model", str(STORIES260K), "--layer", str(LAYER), "--corpus", str(VALID), "--db", url,
                 "--max-tokens", "3000", "--ctx-len", "128", "--epochs", "1", "--batch-size", "128",
                 "--features", "48", "--k", "8"]) == 0
    with open_store(url, create=False).session() as s:
        sae_run = list_runs(s, MODEL, "sae")[0].id
    assert main(["run", "--model", str(STORIES260K), "--corpus", str(VALID), "--db", url, *BROWSER_RUN_ARGS,
                 "--jobs", "neurons,features,explanations,feature-explanations", "--sae", str(sae_run),
                 "--layers", str(LAYER), "--top-k", "5"]) == 0
    proc, app_url = start_app(url, folder / "streamlit.log")
    yield url, app_url
    stop_app(proc)


def test_feature_page_and_overview_chart(page, features_app):
    from precompute.jobs.explanations.tables import unit_scores
    from precompute.jobs.neurons.tables import neuron_page
    from precompute.store.db import open_store

    db, app_url = features_app
    with open_store(db, create=False).session() as s:
        p = neuron_page(s, MODEL, LAYER, 3, unit="feature")
        u = unit_scores(s, MODEL, LAYER)
    app = AppDriver(page, app_url)
    app.open(f"/neuron?model={MODEL}&layer={LAYER}&unit=feature&neuron=3", "div.example")
    expect(page.get_by_role("heading", name=f"{MODEL} · L{LAYER} F3")).to_be_visible()
    mx = page.locator('[data-testid="stMetric"]').filter(has_text="max").first
    expect(mx.locator('[data-testid="stMetricValue"]')).to_have_text(f"{p.stats.max:.3f}")
    expect(page.locator("div.example").first).to_contain_text(f"activation {p.examples[0].act:.3f}")
    expect(page.get_by_role("heading", name="Test this feature")).to_be_visible()
    expect(page.get_by_role("link", name=f"L{LAYER} F4 →")).to_be_visible()
    app.screenshot("feature_page")

    app.open(f"/?model={MODEL}&layer={LAYER}&unit=feature", '[data-testid="stDataFrame"]')
    expect(page.get_by_role("heading", name="Neurons vs SAE features")).to_be_visible()
    expect(page.locator('[data-testid="stVegaLiteChart"]').first).to_be_visible()
    expect(page.get_by_text(re.compile(rf"median best F1 {u.median_neurons:.2f} over {len(u.neurons)} neurons"))).to_be_visible()
    expect(page.get_by_text(re.compile(rf"{u.median_features:.2f} over {len(u.features)} SAE features"))).to_be_visible()
    expect(page.get_by_text("SAE features (48, SAE run")).to_be_visible()
    app.screenshot("overview_features")
