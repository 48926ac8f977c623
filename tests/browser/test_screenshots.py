"""Every page on both models, in Chromium, saved to ``test-artifacts/screen-<page>-<model>.png``; with
``TINYSCOPE_DOCS=1`` also, shrunk, to ``docs/screens/<page>-<model>.png``, which the README links
(a person looks at them; a plain test run leaves the tracked files alone). Its own database and app: stories260K and the bundled
tinystories-4l over the same ~3,000 tokens of valid-head.txt, with every job."""

from __future__ import annotations

import os

import pytest

from conftest import (BROWSER_RUN_ARGS, ROOT, SHARED, STORIES260K, VALID, expect, open_page, screenshot,
                      start_app, stop_app)

pytestmark = pytest.mark.browser

BUNDLED = ROOT / "data" / "models" / "tinystories-4l"
TRAIN = SHARED / "corpora" / "tinystories"
MODELS = {  # URL name -> (model folder, its n-gram corpus: the model's training text)
    "stories260K": (STORIES260K, TRAIN / "train-1097.txt"),
    "tinystories-4l": (BUNDLED, TRAIN / "train-5511-lowercase.txt"),
}
PROMPT = "Once+upon+a+time%2C+there+was+a+little+dog+named+Max."
PAGES = [  # name, path and query ({m}: the model), a selector only the drawn page has
    ("overview", "/?model={m}", ".vega-embed"),
    ("neuron", "/neuron?model={m}&layer=1&neuron=5", "div.example-low"),
    ("heads", "/heads?model={m}", ".vega-embed"),
    ("head", "/head?model={m}&layer=1&head=1", ".vega-embed"),
    ("rules", "/rules?model={m}", ".vega-embed"),
    ("story", "/story?model={m}&story=1", ".rule"),
    ("lab", f"/lab?model={{m}}&prompt={PROMPT}&pos=4", "text=Most active neurons at position"),
    ("retrieval", f"/retrieval?model={{m}}&prompt={PROMPT}", ".vega-embed"),
]
DOCS = ROOT / "docs" / "screens"


@pytest.fixture(scope="module")
def both_models_url(tmp_path_factory):
    from precompute.cli import main

    for path, train in MODELS.values():
        if not path.exists() or not train.exists() or not VALID.exists():
            pytest.skip(f"{path} or {train} is absent")
    url = f"sqlite:///{tmp_path_factory.mktemp('shots') / 'both.db'}"
    for path, train in MODELS.values():
        rc = main(["run", "--model", str(path), "--corpus", str(VALID), "--db", url, *BROWSER_RUN_ARGS,
                   "--jobs", "neurons,heads,rules,embeddings", "--top-k", "10", "--induction-len", "20",
                   "--head-examples", "2", "--ngram-corpus", str(train), "--rule-set", "subgram"])
        assert rc == 0
    proc, app = start_app(url, tmp_path_factory.mktemp("shots-app") / "streamlit.log")
    yield app
    stop_app(proc)


def save_small(src, dst, width: int = 1000) -> None:
    """A copy for the repository: ``width`` pixels wide, 256 colours (about a tenth of the size)."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


@pytest.mark.parametrize("model", list(MODELS))
def test_every_page_drawn_and_saved(page, both_models_url, model):
    to_docs = os.environ.get("TINYSCOPE_DOCS") == "1"
    for name, path, ready in PAGES:
        open_page(page, both_models_url, path.format(m=model), ready)
        expect(page.locator('[data-testid="stException"]')).to_have_count(0)
        expect(page.get_by_text("Traceback")).to_have_count(0)
        shot = screenshot(page, f"screen-{name}-{model}")
        if to_docs:
            DOCS.mkdir(parents=True, exist_ok=True)
            save_small(shot, DOCS / f"{name}-{model}.png")
