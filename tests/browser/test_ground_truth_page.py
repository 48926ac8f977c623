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
    prev, pc = facts.previous_token_head(harm.layer), facts.phase_change()
    assert harm == facts.most_harmful_secret() and prev.prev_token > 0.3 and pc.formed
    body = page.locator('[data-testid="stMainBlockContainer"]')
    expect(body).to_contain_text(f"Phase change (shaded): the loss on the repeated secret words sat at {pc.before:.2f} "
                                 f"nats/token until step {pc.start:,}")
    expect(body).to_contain_text(f"The induction score (repeated random tokens) flags no head: the highest is "
                                 f"L{ind.layer}H{ind.head} ({ind.induction:.2f}")
    expect(body).to_contain_text(f"Yet later names and the repeated secret words are copied by L{harm.layer}H{harm.head}: "
                                 f"zeroing it raises the loss on later name mentions by {harm.name_loss_rise:.2f} nats/token "
                                 f"and on the repeated secret words by {harm.secret_loss_rise:.2f}, the most of any head")
    expect(body).to_contain_text(f"Previous-token head in an earlier layer: L{prev.layer}H{prev.head} "
                                 f"({prev.prev_token:.2f} of its attention on the previous token")
    expect(page.locator('[data-testid="stDataFrame"]')).to_have_count(3)  # heads, rules, neurons
    app.screenshot("ground_truth")


def test_ground_truth_page_refuses_the_training_seed(app):
    app.open("/ground_truth?seed=0", None)
    expect(app.page.get_by_text("seed 0 is the training seed")).to_be_visible()
