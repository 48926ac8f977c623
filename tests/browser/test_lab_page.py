"""The lab page in a real browser: type a prompt, pick a token, read the neuron/head panels, ablate."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

import pytest

from conftest import MODEL, at_least, expect

pytestmark = pytest.mark.browser

PROMPT = "Once upon a time, there was a little girl named Lily. She liked to play."


def _params(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def _heading(page, pos: int) -> None:
    page.wait_for_selector(f"text=Next token after position {pos}", state="visible")


def test_lab_page_flow(app):
    page = app.page
    # empty prompt: a friendly hint, nothing else
    app.open(f"/lab?model={MODEL}", 'text="Try an example"')
    expect(page.get_by_text("Type a prompt above")).to_be_visible()
    app.screenshot("lab_empty")

    # type a prompt: predictions, neurons and heads appear for the last token
    box = page.get_by_label("Prompt", exact=True)
    box.fill(PROMPT)
    box.press("Control+Enter")
    app.wait("text=Most active neurons at position")
    params = _params(page)
    assert params["prompt"] == PROMPT and params["model"] == MODEL
    toks = page.locator("div.tokens").first.locator("span.tok")
    at_least(toks, 11)
    n = toks.count()
    expect(toks.first).to_have_text("<s>")  # BOS visible
    expect(page.locator("div.tokens").first.locator("span.tok-max")).to_have_count(1)  # the selected token outlined
    _heading(page, n - 1)

    # pick a token with the slider (keyboard: Home = position 0, then 3 to the right)
    thumb = page.get_by_role("slider").first
    thumb.focus()
    thumb.press("Home")
    app.wait("text=Next token after position 0")
    for _ in range(3):
        thumb.press("ArrowRight")
    app.wait("text=Next token after position 3")
    assert _params(page)["pos"] == "3"
    sel = page.locator("div.tokens").first.locator("span.tok-max")
    expect(sel).to_have_text("a")  # position 3 of "<s> Once upon a ..."
    expect(page.get_by_text(re.compile(r"Actual next token ' time': loss"))).to_be_visible()

    # or click a token: position 5 becomes the selected one
    pill = page.locator('[data-testid="stButtonGroup"] button').nth(4)  # one pill per token, in order
    expect(pill).to_contain_text("time")
    pill.click()
    app.wait("text=Next token after position 4")
    expect(page.locator("div.tokens").first.locator("span.tok-max")).to_have_text(" time")
    thumb.focus()
    thumb.press("ArrowLeft")
    app.wait("text=Next token after position 3")

    # the neuron panel: one line per layer, 5 links each, to the neuron page with this prompt
    links = page.locator('a[href*="neuron?model="]')
    expect(links).to_have_count(5 * 5)  # stories260K: 5 layers x top 5
    href = links.first.get_attribute("href")
    assert "prompt=Once+upon+a+time" in href and "layer=0" in href
    # the heads: a faceted chart of every head, and links in an expander
    page.wait_for_selector(".vega-embed canvas, .vega-embed svg", state="visible")
    page.get_by_text("Heads: where each one looks most").click()
    page.wait_for_selector('a[href*="head?model="]', state="visible")
    expect(page.locator('a[href*="head?model="]')).to_have_count(5 * 8)
    at_least(page.get_by_text("No n-gram index is available").or_(page.get_by_text("rule")), 1)
    app.screenshot("lab_token")

    # an ablation: neuron L1 N5, zero -> log-prob changes appear and the URL holds it
    page.get_by_text("Ablate", exact=True).click()
    app.wait("text=Most lowered")
    page.get_by_label("Layer", exact=True).fill("1")
    page.get_by_label("Layer", exact=True).press("Enter")
    app.wait("text=Most lowered")
    page.get_by_label("Neuron / head", exact=True).fill("5")
    page.get_by_label("Neuron / head", exact=True).press("Enter")
    page.wait_for_function("() => window.location.search.includes('neuron%3A1%3A5%3Azero') || window.location.search.includes('neuron:1:5:zero')")
    app.wait("text=Most lowered")
    assert _params(page)["ablate"] == "neuron:1:5:zero"
    expect(page.get_by_text(re.compile(r"Δ log p\(next ' time'\)"))).to_be_visible()
    expect(page.get_by_text("mean Δ loss", exact=True)).to_be_visible()
    app.screenshot("lab_ablation")

    # out of range: a clear message, the rest of the page still there
    page.get_by_label("Neuron / head", exact=True).fill("999")
    page.get_by_label("Neuron / head", exact=True).press("Enter")
    app.wait("text=Cannot ablate")
    expect(page.get_by_text(re.compile(r"neuron 999 out of range: layer 1 has neurons 0-171"))).to_be_visible()
    expect(page.get_by_text("Most active neurons at position 3")).to_be_visible()

    # the URL reopens the same view
    url = page.url
    app.page.goto(url)
    app.wait("text=Cannot ablate")
    _heading(page, 3)


def test_lab_page_two_models_side_by_side(app):
    app.open(f"/lab?model={MODEL}&model2={MODEL}&prompt=Once+upon+a+time&pos=2&ablate2=head:1:2:mean",
             "text=Most lowered")
    page = app.page
    at_least(page.locator("div.tokens"), 4)  # prompt + continuation, per model
    expect(page.get_by_text("Next token after position 2")).to_have_count(1)
    expect(page.get_by_text(re.compile(r"Head z set at every position to its mean"))).to_be_visible()
    app.screenshot("lab_two_models")
