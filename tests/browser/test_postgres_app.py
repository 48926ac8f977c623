"""The app served from PostgreSQL: ``TINYSCOPE_DB`` names the test server's database (tests/pg_server.py)."""

from __future__ import annotations

import re

import pytest

from conftest import AppDriver, BROWSER_JOBS, BROWSER_RUN_ARGS, MODEL, STORIES260K, VALID, expect, start_app, stop_app

pytestmark = pytest.mark.browser

LAYER, NEURON = 2, 11


@pytest.fixture(scope="module")
def pg_browser_db(pg_server) -> str:
    """The browser-test neuron run, written by `precompute run` into a PostgreSQL database."""
    from precompute.cli import main

    if not STORIES260K.exists() or not VALID.exists():
        pytest.skip("../shared is absent (stories260K and valid-head.txt live beside the repo)")
    url = pg_server.create_database("browser")
    args = ["run", "--model", str(STORIES260K), "--corpus", str(VALID), "--db", url, *BROWSER_RUN_ARGS,
            "--jobs", "neurons", *BROWSER_JOBS["neurons"]]
    assert main(args) == 0, f"precompute run failed: precompute {' '.join(args)}"
    return url


@pytest.fixture(scope="module")
def pg_app_url(pg_browser_db, tmp_path_factory):
    proc, url = start_app(pg_browser_db, tmp_path_factory.mktemp("streamlit-pg") / "streamlit.log")
    yield url
    stop_app(proc)


def test_neuron_page_served_from_postgres(page, pg_app_url, pg_browser_db):
    from precompute.jobs.neurons.tables import neuron_page
    from precompute.store.db import open_store

    store = open_store(pg_browser_db, create=False)
    with store.session() as s:
        expected = neuron_page(s, MODEL, LAYER, NEURON)
    store.engine.dispose()

    app = AppDriver(page, pg_app_url)
    app.open(f"/neuron?model={MODEL}&layer={LAYER}&neuron={NEURON}", "div.example")
    expect(page.get_by_text(f"{MODEL} · L{LAYER} N{NEURON}").first).to_be_visible()
    metric = page.locator('[data-testid="stMetric"]').filter(
        has=page.locator('[data-testid="stMetricLabel"]', has_text=re.compile(r"^\s*max\s*$"))
    )
    expect(metric.locator('[data-testid="stMetricValue"]')).to_have_text(f"{expected.stats.max:.3f}")
    expect(page.locator("div.example").first).to_contain_text(f"{expected.examples[0].act:.3f}")
    app.screenshot("neuron_page_postgres")
