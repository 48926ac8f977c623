"""Browser-test fixtures: a database precomputed in the test, the app on a free port, headless Chromium.

- ``browser_db``: stories260K over ~3,000 tokens of valid-head.txt, built by ``build_browser_db``
  (the same code path as ``precompute run``). Other issues add their job to ``BROWSER_JOBS``.
- ``app_url``: ``streamlit run app/main.py`` against that database (``TINYSCOPE_DB``), waited for.
- ``browser`` / ``page``: Playwright driving Debian's ``/usr/bin/chromium`` (playwright's own
  browser download cannot work here). ``screenshot(page, name)`` saves to ``test-artifacts/``.
- ``wait_for_streamlit(page, selector)``: waits until the script has finished a run.

Mark tests with ``@pytest.mark.browser``. Everything skips with a reason when ../shared, the
chromium binary or the playwright package is absent.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("TINYSCOPE_SHARED", ROOT.parent / "shared"))
STORIES260K = SHARED / "models" / "stories260K"
VALID = SHARED / "corpora" / "tinystories" / "valid-head.txt"
CHROMIUM = Path(os.environ.get("TINYSCOPE_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts"
MODEL = "stories260K"  # the model name pages use in URLs (the folder name)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# ---------------------------------------------------------------------------------------------
# The database. ONE ENTRY PER JOB: job name -> its extra `precompute run` options.
# Other issues add their job here (and only here); all jobs run over the same sequences.
BROWSER_JOBS: dict[str, list[str]] = {
    # --- issue 3: neurons (neuron pages, overview) ---
    "neurons": ["--top-k", "10"],
    # --- issue 4: heads (heads overview, head pages) ---
    "heads": ["--induction-len", "20", "--head-examples", "2"],
    # --- issue 5: rules (rules overview, story view) ---
    "rules": ["--ngram-corpus", str(SHARED / "corpora" / "tinystories" / "train-1097.txt"), "--rule-set", "subgram"],
    # --- issue 16: explanations (neuron page list, overview column and search); reads the neuron run ---
    "explanations": [],
}
# shared by every job: ~3,000 tokens in sequences of 128 (BOS included)
BROWSER_RUN_ARGS = ["--max-tokens", "3000", "--ctx-len", "128", "--batch-size", "16"]


def build_browser_db(path: Path) -> str:
    """Build the browser-test database at ``path`` with ``precompute run``; returns its URL."""
    from precompute.cli import main

    if not STORIES260K.exists() or not VALID.exists():
        pytest.skip(f"{SHARED} is absent (stories260K and valid-head.txt live beside the repo in ../shared)")
    url = f"sqlite:///{Path(path).resolve()}"
    args = ["run", "--model", str(STORIES260K), "--corpus", str(VALID), "--db", url, *BROWSER_RUN_ARGS]
    args += ["--jobs", ",".join(BROWSER_JOBS)]
    for extra in BROWSER_JOBS.values():
        args += extra
    rc = main(args)
    assert rc == 0, f"precompute run failed with exit code {rc}: precompute {' '.join(args)}"
    return url


@pytest.fixture(scope="session")
def browser_db(tmp_path_factory) -> str:
    return build_browser_db(tmp_path_factory.mktemp("browser") / "browser.db")


# ---------------------------------------------------------------------------------------------
# The app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(db_url: str, log_path: Path, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """``streamlit run app/main.py`` on a free port against ``db_url``; waits until it answers."""
    port = free_port()
    env = dict(os.environ, TINYSCOPE_DB=db_url, PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
        "--server.headless", "true",
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
    ]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}; log: {log_path}\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"streamlit did not answer on {url} within {timeout:.0f} s; log: {log_path}")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def app_url(browser_db, tmp_path_factory):
    """Base URL of the running app (e.g. http://127.0.0.1:PORT)."""
    proc, url = start_app(browser_db, tmp_path_factory.mktemp("streamlit") / "streamlit.log")
    yield url
    stop_app(proc)


# ---------------------------------------------------------------------------------------------
# The browser


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium) for browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is absent: pip install playwright (no browser download needed)")
    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield b
    b.close()
    pw.stop()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    p = ctx.new_page()
    p.set_default_timeout(30_000)
    yield p
    ctx.close()


def screenshot(page, name: str, full_page: bool = True) -> Path:
    """Save a PNG under test-artifacts/ (git-ignored) and return its path. Streamlit scrolls an
    inner container, so for a full page the viewport is stretched to the content for the shot."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    size = page.viewport_size
    if full_page and size:
        h = page.evaluate(
            "() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
            " const c = document.querySelector('[data-testid=\"stMainBlockContainer\"]');"
            " return Math.max(m ? m.scrollHeight : 0, c ? c.scrollHeight : 0); }"
        )
        page.set_viewport_size({"width": size["width"], "height": min(max(int(h) + 80, size["height"]), 12000)})
        page.wait_for_timeout(500)  # charts re-layout to the new size
    try:
        page.screenshot(path=str(path), full_page=full_page)
    finally:
        if full_page and size:
            page.set_viewport_size(size)
    return path


IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def wait_for_streamlit(page, selector: str | None = None, timeout: float = 60_000) -> None:
    """Wait until Streamlit has finished rendering: the script is not running (no "Running..."
    status widget) and, when given, ``selector`` is visible. Call it after goto() and after every
    interaction, with a selector that only the new view has (a rerun starts a moment later)."""
    page.wait_for_selector(IDLE, state="attached", timeout=timeout)
    if selector is not None:
        page.wait_for_selector(selector, state="visible", timeout=timeout)
    page.wait_for_selector(IDLE, state="attached", timeout=timeout)
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=timeout)
    page.wait_for_timeout(300)  # charts (vega-embed) draw right after the script ends


def open_page(page, app_url: str, path_and_query: str, selector: str | None = None) -> None:
    """Go to ``app_url + path_and_query`` (e.g. "/neuron?model=stories260K&layer=0&neuron=3") and wait."""
    page.goto(app_url + path_and_query, wait_until="domcontentloaded")
    wait_for_streamlit(page, selector)


def expect(target):
    """Playwright's ``expect``: assertions that retry until they hold (or time out), so a check never
    races a render. Imported here so test modules load (and skip) without playwright."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def at_least(locator, n: int) -> None:
    """Wait until ``locator`` matches at least ``n`` elements."""
    locator.nth(n - 1).wait_for(state="attached")


class AppDriver:
    """One browser tab on the running app: ``app.open("/neuron?...", selector)``, ``app.wait(selector)``,
    ``app.screenshot(name)``; ``app.page`` is the Playwright page for everything else."""

    def __init__(self, page, url: str):
        self.page, self.url = page, url

    def open(self, path_and_query: str, selector: str | None = None) -> None:
        open_page(self.page, self.url, path_and_query, selector)

    def wait(self, selector: str | None = None, timeout: float = 60_000) -> None:
        wait_for_streamlit(self.page, selector, timeout)

    def screenshot(self, name: str, full_page: bool = True) -> Path:
        return screenshot(self.page, name, full_page)


@pytest.fixture
def app(page, app_url) -> AppDriver:
    return AppDriver(page, app_url)
