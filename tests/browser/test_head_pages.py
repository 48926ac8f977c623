"""The heads overview and head pages in a real browser: headless Chromium against the app on a free port."""

from __future__ import annotations

import re

import pytest

from conftest import MODEL, STORIES260K, at_least, expect

pytestmark = pytest.mark.browser

PROMPT = "Once upon a time, Lily saw a dog. Lily said hi to the dog."


def _overview(browser_db):
    from precompute.store.db import open_store
    from precompute.jobs.heads.tables import heads_overview

    with open_store(browser_db, create=False).session() as s:
        return heads_overview(s, MODEL)


def test_heads_overview_heatmap_opens_a_head(app, browser_db):
    ov = _overview(browser_db)
    app.open(f"/heads?model={MODEL}", ".vega-embed")
    page = app.page
    page.wait_for_selector(".vega-embed canvas, .vega-embed svg", state="visible")
    expect(page.get_by_text(f"{MODEL} · attention heads").first).to_be_visible()
    n = {k: sum(1 for h in ov.heads if h.label == k) for k in ("distance", "mixed", "semantic")}
    assert f"{n['distance']} distance heads" in page.content()
    assert f"{n['semantic']} semantic heads" in page.content()
    expect(page.locator('[data-testid="stDataFrame"]')).to_have_count(1)
    app.screenshot("heads_overview")

    # another score: the URL keeps it
    page.get_by_label("Heatmap score").click()
    page.get_by_role("option", name="previous-token").click()
    app.wait()
    assert "score=prev_token" in page.url
    assert "Mean attention weight on the previous token" in page.content()

    # click a cell in the middle of the heatmap: that head's page opens
    box = page.locator(".vega-embed").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.45)
    page.wait_for_url(re.compile(r"/head\?"))
    m = re.search(r"layer=(\d+).*head=(\d+)", page.url)
    assert m, page.url
    app.wait(f'h1:has-text("{MODEL} · L{m.group(1)} H{m.group(2)}")')
    app.screenshot("heads_overview_clicked")


def test_head_page_profile_examples_and_live_prompt(app, browser_db):
    from precompute.jobs.heads import head_pattern
    from precompute.models import load_model

    ov = _overview(browser_db)
    s = ov.heads[1 * ov.n_heads + 3]
    app.open(f"/head?model={MODEL}&layer=1&head=3", ".vega-embed")
    page = app.page
    page.wait_for_selector(".vega-embed canvas, .vega-embed svg", state="visible")
    expect(page.get_by_text(f"{MODEL} · L1 H3").first).to_be_visible()
    text = page.content()
    assert f"{s.label} head" in text
    for v in (s.prev_token, s.first_token, s.induction, s.distance_r2, s.entropy):
        assert f"{v:.3f}" in text
    assert "Mean attention weight on the previous token" in text  # definitions are shown
    at_least(page.locator(".vega-embed"), 2)  # profile + the first example pattern
    # log-x: the URL records it
    page.get_by_text("log distance axis").click()
    app.wait()
    assert "logx=1" in page.url
    app.screenshot("head_page")

    # a live prompt: tokens coloured by the weight the chosen query puts on them
    page.get_by_role("textbox", name="Prompt").fill(PROMPT)
    page.get_by_role("button", name="Run").click()
    app.wait("div.live-attn span.tok-max")
    assert "prompt=" in page.url
    toks = page.locator("div.live-attn span.tok")
    lm = load_model(str(STORIES260K))
    ids = lm.encode(PROMPT)
    expect(toks).to_have_count(len(ids))
    expect(page.locator("div.live-attn span.tok-special").first).to_have_text("<s>")
    # the default query is the last token; its weights match the model's pattern
    pat = head_pattern(lm, ids, 1, 3)
    q = len(ids) - 1
    top = int(pat[q].argmax())
    expect(page.locator("body")).to_contain_text(f"puts its largest weight, {pat[q, top]:.3f}, on position {top}")
    assert f"weight {pat[q, 0]:.3f}" in toks.nth(0).get_attribute("title")
    at_least(page.locator(".vega-embed"), 3)  # + the live heatmap
    app.screenshot("head_page_live")

    # pick another query token: the highlighting moves there
    page.get_by_label("Query token: what does it attend to?").click()
    page.keyboard.type("5: ")  # the option list is virtual: filter it first
    page.get_by_role("option", name=re.compile(r"^5: ")).click()
    app.wait()
    assert "q=5" in page.url
    assert page.locator("div.live-attn span.tok-max").get_attribute("title").endswith(f"weight {pat[5, 5]:.3f}")
    assert "(after the query)" in toks.nth(6).get_attribute("title")


def test_out_of_range_head_says_so(app):
    app.open(f"/head?model={MODEL}&layer=1&head=8", '[data-testid="stAlert"]')
    page = app.page
    expect(page.locator('[data-testid="stAlert"]').first).to_contain_text("head=8 is out of range (0-7)")
    assert "Traceback" not in page.content()
    app.screenshot("head_out_of_range")
    app.open(f"/head?model={MODEL}&layer=9&head=0", '[data-testid="stAlert"]')
    expect(page.locator('[data-testid="stAlert"]').first).to_contain_text("layer=9 is out of range (0-4)")
