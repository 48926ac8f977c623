"""Save the heads-overview heatmap of a model as PNG (the README images), from a database with a heads run.

    python docs/make_heads_png.py --db sqlite:////tmp/h.db --model stories260K [--scores distance_r2 prev_token]

vl-convert is not installed here, so the Altair chart is drawn by the app itself: this starts
``streamlit run app/main.py`` on a free port, opens ``/heads?model=M&score=S`` in headless
Chromium (/usr/bin/chromium) and screenshots the chart element to docs/heads-<model>-<score>.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "browser"))
sys.path.insert(0, str(ROOT))

from conftest import CHROMIUM, CHROMIUM_ARGS, start_app, stop_app, wait_for_streamlit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="SQLAlchemy URL of a database with a heads run")
    ap.add_argument("--model", required=True, help="model name as stored (the folder name)")
    ap.add_argument("--scores", nargs="+", default=["distance_r2", "prev_token"])
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    proc, url = start_app(args.db, Path(tempfile.mkdtemp()) / "streamlit.log")
    try:
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = b.new_page(viewport={"width": 1400, "height": 1400}, device_scale_factor=2)
            page.set_default_timeout(60_000)
            for score in args.scores:
                page.goto(f"{url}/heads?model={args.model}&score={score}", wait_until="domcontentloaded")
                wait_for_streamlit(page, ".vega-embed")
                page.wait_for_timeout(1500)
                out = Path(args.out) / f"heads-{args.model}-{score}.png"
                page.locator(".vega-embed").first.screenshot(path=str(out))
                print(f"saved {out}")
            b.close()
    finally:
        stop_app(proc)


if __name__ == "__main__":
    main()
