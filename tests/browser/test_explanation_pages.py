"""Stored explanations in a real browser: the neuron page's list opens one as the spectrum's
hypothesis (same share as stored), and the overview finds neurons by explanation."""

from __future__ import annotations

import re

import pytest

from conftest import MODEL, at_least, expect

pytestmark = pytest.mark.browser


def _stored(browser_db, layer, neuron):
    from precompute.jobs.explanations.tables import neuron_explanations, search_explanations
    from precompute.store.db import open_store

    with open_store(browser_db, create=False).session() as s:
        return neuron_explanations(s, MODEL, layer, neuron), search_explanations(s, MODEL, "quote")


def test_neuron_page_explanation_opens_in_the_spectrum(app, browser_db):
    stored, _ = _stored(browser_db, 1, 7)
    assert stored, "the browser database has no explanation of L1 N7"
    app.open(f"/neuron?model={MODEL}&layer=1&neuron=7", "div.example")
    page = app.page
    expect(page.get_by_role("heading", name="Explanations")).to_be_visible()
    for e in stored:
        expect(page.get_by_text(f"score {e.score:.2f} · explains {e.recall:.0%}").first).to_be_visible()
    best = stored[0]
    page.get_by_role("link", name=best.label, exact=True).first.click()
    app.wait('[data-testid="stMetricLabel"]:has-text("explained by the hypothesis")')
    expect(page.get_by_label("Hypothesis: the neuron fires on…")).to_have_value(best.text)
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="explained by the hypothesis")
    expect(metric.locator('[data-testid="stMetricValue"]')).to_have_text(f"{best.recall:.0%}")
    score = page.locator('[data-testid="stMetric"]').filter(has_text="score (F1)")
    expect(score.locator('[data-testid="stMetricValue"]')).to_have_text(f"{best.score:.2f}")
    expect(page).to_have_url(re.compile(r"[?&]hyp="))
    expect(page).to_have_url(re.compile(rf"[?&]mode={best.mode}\b" if best.mode != "list" else r"layer=1"))
    app.screenshot("neuron_explanations")


def test_overview_finds_neurons_by_explanation(app, browser_db):
    _, hits = _stored(browser_db, 0, 0)
    app.open(f"/?model={MODEL}&explained=quote", '[data-testid="stDataFrame"]')
    page = app.page
    expect(page.get_by_label("Find neurons by their explanation")).to_have_value("quote")
    if hits:
        expect(page.get_by_text("Neurons whose explanations contain every word of 'quote'")).to_be_visible()
        at_least(page.locator('[data-testid="stDataFrame"]'), 2)  # the hits and the layer table
    else:
        expect(page.get_by_text("No stored explanation")).to_be_visible()
    app.screenshot("overview_explanations")
