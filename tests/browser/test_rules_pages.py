"""The rules overview and the story view (stored and live) in a real browser."""

from __future__ import annotations

import pytest
from conftest import MODEL, at_least, expect

pytestmark = pytest.mark.browser


def _story(browser_db, seq):
    from precompute.store.db import open_store
    from precompute.jobs.rules.tables import rules_overview, rules_story

    with open_store(browser_db, create=False).session() as s:
        return rules_overview(s, MODEL), rules_story(s, MODEL, seq)


def test_rules_overview(app, browser_db):
    ov, _ = _story(browser_db, 0)
    app.open(f"/rules?model={MODEL}", ".vega-embed")
    page = app.page
    page.wait_for_selector(".vega-embed canvas, .vega-embed svg", state="visible")
    content = page.content()
    assert f"{100 * ov.agreement:.1f}%" in content and f"{100 * ov.model_top1:.1f}%" in content
    assert "do not explain" in content
    expect(page.locator(".vega-embed")).to_have_count(3)
    app.screenshot("rules_overview")


def test_story_view_selects_a_token(app, browser_db):
    ov, st_ = _story(browser_db, 1)
    m = next(x for x in st_.matches[8:] if x.optimal is not None and "+" in x.optimal.template and x.support > 1)
    app.open(f"/story?model={MODEL}&story=1&pos={m.pos}", ".rule")
    page = app.page
    expect(page.locator(".vega-embed")).to_have_count(2)  # both charts have rendered
    content = page.content()
    # every token of the stored sequence is shown, the selected one outlined
    expect(page.locator(".tokens .tok")).to_have_count(len(st_.tokens))
    expect(page.locator(".tokens .tok-max")).to_have_count(1)
    assert f"Optimal rule <code>{m.optimal.template}</code>" in content or m.optimal.template in page.inner_text("body")
    assert f"support <strong>{m.support:,}</strong>" in content
    expect(page.locator(".rule .rule-kept")).to_have_count(m.optimal.template.count("+"))
    expect(page.locator(".rule del.rule-dropped")).to_have_count(m.optimal.template.count("-"))
    # side-by-side bars: model and rule
    expect(page.locator(".vega-embed")).to_have_count(2)
    expect(page.locator('[data-testid="stDataFrame"]')).to_have_count(1)
    app.screenshot("rules_story")

    # pick another token from the selector: URL and details follow
    other = next(x for x in st_.matches if x.pos > m.pos + 3 and x.optimal is not None)
    page.get_by_label("Token (the prediction of it, made at the previous position)").click()
    page.keyboard.type(f"{other.pos}:")
    page.keyboard.press("Enter")
    app.wait(f'h3:has-text("position {other.pos}")')
    page.wait_for_url(f"**pos={other.pos}**")
    expect(page.locator("body")).to_contain_text(f"support {other.support:,}")


def test_story_view_live_prompt(app, browser_db):
    app.open(f"/story?model={MODEL}&prompt=Once%20upon%20a%20time%2C%20there%20was%20a%20little%20girl.", ".rule")
    page = app.page
    at_least(page.locator(".tokens .tok"), 10)
    expect(page.locator(".vega-embed")).to_have_count(2)
    from app import limits

    expect(page.locator("body")).to_contain_text(limits.describe())  # a live run takes one of the server's slots
    app.screenshot("rules_live")


def test_story_view_bad_story(app, browser_db):
    app.open(f"/story?model={MODEL}&story=9999")
    assert "out of range" in app.page.content()
