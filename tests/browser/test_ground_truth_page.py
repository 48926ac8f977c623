"""The Ground truth page on the bundled synth model, in a real browser: the verdicts it prints
are the ones computed here with the same held-out stories."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, at_least, expect

pytestmark = pytest.mark.browser

SYNTH = ROOT / "data" / "models" / "synth-2l"
N = 40  # held-out stories: small, so the page answers quickly


@pytest.fixture(scope="module")
def facts():
    from precompute.models import load_model
    from precompute.synth.facts import ground_truth

    return ground_truth(load_model(str(SYNTH)), SYNTH, eval_seed=1000, n_stories=N)


def test_ground_truth_page_shows_planted_beside_found(app, facts):
    app.open(f"/ground_truth?stories={N}", None)
    page = app.page
    expect(page.get_by_text("What was planted")).to_be_visible(timeout=240_000)
    expect(page.get_by_text("Neurons: planted labels")).to_be_visible(timeout=240_000)
    at_least(page.locator(".vega-embed"), 2)  # the training curve and the heads chart
    ind, harm = facts.induction_head(), facts.most_harmful()
    body = page.locator('[data-testid="stMainBlockContainer"]')
    expect(body).to_contain_text(f"No induction head formed: the highest induction score is L{ind.layer}H{ind.head}")
    expect(body).to_contain_text(f"Later names are copied by L{harm.layer}H{harm.head}: zeroing it raises the loss on "
                                 f"later name mentions by {harm.name_loss_rise:.2f} nats/token")
    expect(page.locator('[data-testid="stDataFrame"]')).to_have_count(3)  # heads, rules, neurons
    app.screenshot("ground_truth")


def test_ground_truth_page_refuses_the_training_seed(app):
    app.open("/ground_truth?seed=0", None)
    expect(app.page.get_by_text("seed 0 is the training seed")).to_be_visible()
