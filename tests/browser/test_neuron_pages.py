"""The neuron pages in a real browser: headless Chromium against the app on a free port."""

from __future__ import annotations

import re

import pytest

from conftest import MODEL, at_least, expect

pytestmark = pytest.mark.browser

NEURON = f"/neuron?model={MODEL}&layer=1&neuron=7"


def test_neuron_page_examples_spectrum_and_live(app, browser_db):
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import neuron_page

    with open_store(browser_db, create=False).session() as s:
        expected = neuron_page(s, MODEL, 1, 7)

    app.open(NEURON, "div.example")
    page = app.page
    expect(page.get_by_text(f"{MODEL} · L1 N7").first).to_be_visible()
    # the examples: one block per example on the first page, the max token outlined
    examples = page.locator("div.example")
    expect(examples).to_have_count(min(5, len(expected.examples)))
    first = examples.first
    expect(first).to_contain_text(f"{expected.examples[0].act:.3f}")
    max_tok = first.locator("span.tok-max")
    expect(max_tok).to_have_count(1)
    assert f"{expected.examples[0].act:+.3f}" in max_tok.get_attribute("title")  # hover shows the value
    # the spectrum chart (vega-embed draws it)
    page.wait_for_selector(".vega-embed canvas, .vega-embed svg", state="visible")
    at_least(page.locator(".vega-embed"), 2)  # spectrum + logit effects
    at_least(page.locator("div.sample"), 1)  # the top bin's sampled tokens
    app.screenshot("neuron_page")

    # a hypothesis: the share of the top bins appears as a number
    hyp = page.get_by_label("Hypothesis: the neuron fires on…")
    hyp.fill(expected.examples[0].tokens[expected.examples[0].max_index].text.strip() or "the")
    hyp.press("Enter")
    app.wait('[data-testid="stMetricLabel"]:has-text("explained by the hypothesis")')
    assert re.search(r"explained by the hypothesis", page.content())
    assert "hyp=" in page.url  # the view state is in the URL

    # test this neuron: type a prompt, run, see every token coloured and the max outlined
    box = page.get_by_label("Prompt")
    box.fill("Once upon a time, there was a little dog named Max. He liked to play.")
    page.get_by_role("button", name="Run").click()
    app.wait("div.live span.tok-max")
    live = page.locator("div.live span.tok")
    at_least(live, 11)
    expect(page.locator("div.live span.tok-special").first).to_have_text("<s>")  # BOS shown visibly
    assert "Max activation" in page.content()
    assert "prompt=" in page.url
    app.screenshot("neuron_page_live")


def test_copied_link_reopens_the_same_view(app):
    app.open(NEURON + "&hyp=the&log=1&prompt=The+dog+ran.", "div.live span.tok-max")
    page = app.page
    assert page.get_by_label("Hypothesis: the neuron fires on…").input_value() == "the"
    assert page.get_by_label("log y").is_checked()
    code = page.locator('[data-testid="stCode"]').first.inner_text()
    assert "/neuron?" in code and "layer=1" in code and "neuron=7" in code and "hyp=the" in code


def test_out_of_range_link_says_so(app):
    app.open(f"/neuron?model={MODEL}&layer=99&neuron=0", '[data-testid="stAlert"]')
    page = app.page
    expect(page.locator('[data-testid="stAlert"]').first).to_contain_text("layer=99 is out of range (0-4)")
    expect(page.get_by_text("Go to the model overview")).to_be_visible()
    assert "Traceback" not in page.content()
    app.screenshot("neuron_out_of_range")
    app.open("/neuron?model=no-such-model&layer=0&neuron=0", '[data-testid="stAlert"]')
    expect(page.locator('[data-testid="stAlert"]').first).to_contain_text("not in this database")


def test_overview_search_and_open_neuron(app):
    app.open("/", '[data-testid="stDataFrame"]')
    page = app.page
    at_least(page.locator(".vega-embed"), 1)  # layer x neuron chart
    app.screenshot("overview")
    app.open("/?q=the", "text=among their top tokens")
    app.screenshot("overview_search")
    # prev/next neuron links wrap across layers
    app.open(f"/neuron?model={MODEL}&layer=0&neuron=0", "div.example")
    page.get_by_text("← L4 N171").click()
    app.wait(f"text={MODEL} · L4 N171")
    assert "layer=4" in page.url and "neuron=171" in page.url


def test_prev_next_keep_the_view_state_and_bottom_examples_show(app):
    app.open(NEURON + "&hyp=the&log=1", "div.example-low")
    page = app.page
    expect(page.locator("div.example-low")).to_have_count(5)  # min-activating examples, first page
    at_least(page.locator("div.band-sample"), 1)  # examples by activation band (the first tab)
    page.get_by_text("L1 N8 →").click()
    app.wait(f"text={MODEL} · L1 N8")
    expect(page.get_by_label("Hypothesis: the neuron fires on…")).to_have_value("the")
    expect(page.get_by_label("log y")).to_be_checked()
    expect(page).to_have_url(re.compile(r"neuron=8.*hyp=the|hyp=the.*neuron=8"))


def test_link_to_an_empty_bin_says_so(app, browser_db):
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import neuron_page

    with open_store(browser_db, create=False).session() as s:
        counts = neuron_page(s, MODEL, 1, 7).histogram.counts
    empty = next((i for i, c in enumerate(counts) if c == 0), None)
    if empty is None:
        pytest.skip("L1 N7 has no empty bin in this database")
    app.open(NEURON + f"&bin={empty}", "div.example")
    expect(app.page.get_by_text(f"The link asks for bin {empty}, which has no tokens")).to_be_visible()
