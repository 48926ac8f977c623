"""Safe to serve: no input can stall the server, sessions never see each other's work, the app
only reads its database, and live work is bounded (app/hypothesis.py, app/limits.py,
precompute/ttt.py, precompute/store/readonly.py)."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from app.hypothesis import MAX_PATTERN, Hypothesis

MAIN = str(Path(__file__).resolve().parent.parent / "app" / "main.py")
EVIL = "(.*)*(.*)*(.*)*(.*)*(.*)*(.*)*(.*)*(.*)*!"  # exponential for a backtracking engine
TEXT = "Once upon a time, there was a little girl named Lily. She liked to play with her red ball."


@pytest.fixture(scope="module")
def serving_db(tmp_path_factory, stories260k_path, valid_corpus):
    """stories260K with a neuron run over 1,500 tokens, built by `precompute run` (URL string)."""
    from precompute.cli import main

    url = f"sqlite:///{tmp_path_factory.mktemp('serving') / 'serving.db'}"
    rc = main(["run", "--model", str(stories260k_path), "--corpus", str(valid_corpus), "--db", url,
               "--jobs", "neurons", "--max-tokens", "1500", "--ctx-len", "128"])
    assert rc == 0
    return url


# ----------------------------------------------------------------------------- regex hypotheses


def test_catastrophic_regex_finishes_with_the_right_answer():
    """Python's re takes exponential time on EVIL against a '!'-less token; RE2 answers at once.
    The answers must be those of Python's re on inputs re can finish (a '!' present, or short)."""
    hyp = Hypothesis(EVIL, "regex")
    tokens = [" Lily", " dog", "!", " wow!", "", "a" * 60, " the end!"] * 200
    got = [hyp.matches(t) for t in tokens]
    want = ["!" in t for t in tokens]  # EVIL matches exactly the texts that contain a '!'
    assert got == want
    for t in (" hi!", "x", "!!"):  # short enough for Python's re to finish
        assert hyp.matches(t) == (re.search(EVIL, t) is not None)


@pytest.mark.parametrize(
    "pattern",
    [r"^ [A-Z]", r"(?i)^ lily$", r"\d+", r"^ (cat|dog)s?$", r"[.,!?]", r"^ [a-z]{3}$", r"dog\Z", r"(?P<w> \w+)"],
)
def test_regex_answers_equal_python_re(pattern):
    tokens = [" Lily", " lily", " dog", " dogs", " cat", "!", " 42", "42", ",", " the", " Tim", "dog", " wow", ""]
    hyp = Hypothesis(pattern, "regex")
    assert [hyp.matches(t) for t in tokens] == [re.search(pattern, t) is not None for t in tokens]


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"(a)\1", "regular expression not supported: invalid escape sequence: \\1; backreferences and lookaround"),
        (r"(?=a)b", "regular expression not supported: invalid perl operator: (?=; backreferences and lookaround"),
        (r"(?<!a)b", "regular expression not supported: invalid perl operator: (?<!; backreferences and lookaround"),
        (r"(?P<x>a)(?P=x)", "backreferences and lookaround cannot be matched in linear time"),
        ("([", "not a valid regular expression: "),
        ("x" * (MAX_PATTERN + 1), f"the regular expression is {MAX_PATTERN + 1} characters long; the limit is {MAX_PATTERN}"),
    ],
)
def test_refused_patterns_say_why_in_one_line(pattern, message):
    with pytest.raises(ValueError) as e:
        Hypothesis(pattern, "regex")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_pattern_at_the_limit_is_accepted():
    assert Hypothesis("a" * MAX_PATTERN, "regex").matches("a" * MAX_PATTERN)


def test_evil_link_on_the_neuron_page_answers(serving_db, monkeypatch):
    """The link from the report: the page renders, every sample evaluated by RE2."""
    import app.state
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(app.state, "DB_URL", serving_db)
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.query_params.update(dict(model="stories260K", layer="1", neuron="5", mode="regex", hyp=EVIL))
    at.run()
    at.switch_page("views/neuron.py")
    at.run()
    assert not at.exception and not at.warning
    label = next(m for m in at.metric if "explained by the hypothesis" in m.label)
    from app.hypothesis import explained_share
    from precompute.jobs.neurons.tables import neuron_page
    from precompute.store.db import open_store

    with open_store(serving_db, create=False).session() as s:
        p = neuron_page(s, "stories260K", 1, 5)
    # the share of tokens containing '!', counted without any regex
    class Bang:
        def matches(self, t):
            return "!" in t

    want = explained_share(p, Bang())
    assert label.value == ("no tokens" if want.share is None else f"{want.share:.0%}")
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.query_params.update(dict(model="stories260K", layer="1", neuron="5", mode="regex", hyp=r"(\w)\1"))
    at.run()
    at.switch_page("views/neuron.py")
    at.run()
    assert [w.value for w in at.warning] == [
        "Hypothesis ignored: regular expression not supported: invalid escape sequence: \\1; "
        "backreferences and lookaround cannot be matched in linear time"
    ]


# ----------------------------------------------------------------------------- sessions


def hook_ids(model) -> set[tuple[str, int]]:
    return {(n, k) for n, m in model.named_modules() for d in (m._forward_pre_hooks, m._forward_hooks) for k in d}


def transformers_hooks(model) -> set[tuple[str, int]]:
    """transformers' own output-capturing forward hooks, installed for good on first use."""
    return {(n, k) for n, m in model.named_modules() for k, f in m._forward_hooks.items() if "output_captur" in f.__qualname__}


def _plain_ablated_logits(lm, text, layer, neuron):
    """Zero-ablating a neuron = zeroing its row of the MLP output weight, on a private copy."""
    import copy

    m = copy.deepcopy(lm.model)
    out = m.get_submodule(lm.adapter.layers)[layer].get_submodule(lm.adapter.mlp_out)
    with torch.no_grad():
        if type(out).__name__ == "Conv1D":  # [d_mlp, d_model]
            out.weight[neuron, :] = 0
        else:  # nn.Linear: [d_model, d_mlp]
            out.weight[:, neuron] = 0
        return m(input_ids=torch.tensor([lm.encode(text)])).logits[0].float().numpy()


def test_every_live_feature_at_once_equals_a_single_session(lm260k):
    """Lab analyse and ablate, the neuron test, the head pattern and the fine-tuning sandbox from
    many threads at once on one shared model: each result equals the same call made alone."""
    from app.live import head_on_text, neuron_on_text
    from precompute.live import ablate, analyse
    from precompute.ttt import SandboxConfig, run_sandbox

    lm = lm260k
    hooks_before = hook_ids(lm.model)
    examples = [lm.encode(t)[:40] for t in ("The dog ran to the park and played with a ball.",
                                            "Lily was happy. She sang a song to her mom.")]
    cfg = SandboxConfig(steps=3, lr=1e-2)

    def job(kind, i):
        n = i % 3
        if kind == "analyse":
            a = analyse(lm, TEXT)
            return a.top_probs, a.neuron_acts, a.patterns
        if kind == "ablate":
            r = ablate(lm, TEXT, "neuron", 1, n, "zero")
            return r.clean_logits, r.ablated_logits
        if kind == "head_ablate":
            r = ablate(lm, TEXT, "head", 2, n, "mean")
            return r.clean_logits, r.ablated_logits
        if kind == "neuron":
            return (np.array(neuron_on_text(lm, TEXT, 2, 10 + n, True).acts),)
        if kind == "head":
            return (head_on_text(lm, TEXT, 3, n, True).pattern,)
        r = run_sandbox(lm, TEXT[:40], " She smiled.", examples, cfg)
        return (np.array(r.train_losses), np.array([r.loss_before, r.loss_after]),
                np.array([t.prob for t in r.top_after]), np.array([x.after for x in r.neurons]))

    kinds = ["analyse", "ablate", "head_ablate", "neuron", "head", "sandbox"]
    calls = [(kinds[i % len(kinds)], i // len(kinds)) for i in range(6 * len(kinds))]
    baseline = {(k, n): job(k, n) for k in kinds for n in range(3)}  # one session, one call at a time

    # an independent check of the baseline itself: the ablation equals a weight edit
    for n in range(3):
        np.testing.assert_allclose(baseline[("ablate", n)][1], _plain_ablated_logits(lm, TEXT, 1, n), atol=1e-4)

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda c: (c, job(*c)), calls))
    for (kind, i), got in results:
        for g, w in zip(got, baseline[(kind, i % 3)]):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{kind} #{i}")
    assert hook_ids(lm.model) == hooks_before | transformers_hooks(lm.model)


def test_sandbox_copy_never_carries_another_sessions_hook(lm260k):
    """The reported race: a copy taken while another thread's ablation hook is on the model."""
    from precompute.hooks import hook_name, hooked
    from precompute.ttt import finetune_copy

    lm = lm260k
    inside, release = threading.Event(), threading.Event()

    def hold_hook():
        with hooked(lm, {hook_name(1, "mlp.post"): lambda x: x * 0}):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold_hook)
    t.start()
    inside.wait(10)
    result = {}
    copier = threading.Thread(target=lambda: result.update(c=finetune_copy(lm, [], 0, 1e-3)[0]))
    copier.start()
    time.sleep(0.2)  # the copier is now blocked on the model's lock, not copying
    assert "c" not in result
    release.set()
    t.join()
    copier.join(30)
    copy_ = result["c"]
    # only the model's own hooks (transformers' output capture) came along, not the ablation
    assert hook_ids(copy_.model) == hook_ids(lm.model)
    ids = torch.tensor([lm.encode(TEXT)])
    with torch.no_grad():
        np.testing.assert_array_equal(copy_.model(input_ids=ids).logits.numpy(), lm.model(input_ids=ids).logits.numpy())
    assert copy_.lock is not lm.lock


# ----------------------------------------------------------------------------- read-only store


def test_app_store_is_read_only(serving_db):
    from sqlalchemy import text

    from precompute.store.db import open_readonly
    from precompute.store.tables import MetaRow

    path = serving_db[len("sqlite:///") :]
    with sqlite3.connect(path) as c:
        want = c.execute("SELECT value FROM tinyscope_meta WHERE key = 'schema_version'").fetchone()[0]
    store = open_readonly(serving_db)
    with store.session() as s:
        assert s.get(MetaRow, "schema_version").value == want
        with pytest.raises(Exception, match="readonly|read-only"):
            s.execute(text("INSERT INTO tinyscope_meta (key, value) VALUES ('x', 'y')"))
            s.commit()
    store.engine.dispose()
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT count(*) FROM tinyscope_meta WHERE key = 'x'").fetchone()[0] == 0


def test_read_only_open_refuses_what_open_store_refuses(tmp_path):
    from precompute.store.db import StoreError
    from precompute.store.db import open_readonly

    with pytest.raises(StoreError, match="no database at"):
        open_readonly(f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a tinyscope database"):
        open_readonly(f"sqlite:///{foreign}")
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StoreError, match="has no tinyscope data yet"):
        open_readonly(f"sqlite:///{empty}")
    assert empty.stat().st_size == 0
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="not a readable database"):
        open_readonly(f"sqlite:///{junk}")


def test_the_app_opens_its_store_read_only(serving_db):
    from sqlalchemy import text

    from app.state import get_store

    store = get_store(serving_db)
    with store.session() as s:
        with pytest.raises(Exception, match="readonly|read-only"):
            s.execute(text("DELETE FROM tinyscope_meta"))
            s.commit()


# ----------------------------------------------------------------------------- warnings


def test_continuation_emits_no_deprecation_warning(lm260k, bundled_lm):
    """transformers 5 renamed the KV cache argument; the old name warned on every lab use."""
    from precompute.live import continue_text

    for lm in (lm260k, bundled_lm):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            c = continue_text(lm, "Once upon a time", n_tokens=6)
        ids = list(lm.encode("Once upon a time"))
        for t in c.new_ids:  # greedy, recomputed without any cache
            with torch.no_grad():
                nxt = int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            assert nxt == t
            ids.append(nxt)


# ----------------------------------------------------------------------------- limits


def test_gate_runs_at_most_its_slots_first_come_first_served():
    from app.limits import Gate

    gate = Gate(2)
    running, peak, order, lock = [0], [0], [], threading.Lock()

    def work(i):
        with gate.hold():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                order.append(i)
            time.sleep(0.05)
            with lock:
                running[0] -= 1

    threads = []
    for i in range(8):
        threads.append(threading.Thread(target=work, args=(i,)))
        threads[-1].start()
        time.sleep(0.01)  # arrival order = i
    for t in threads:
        t.join()
    assert peak[0] == 2 and sorted(order) == list(range(8))
    assert order[2:] == sorted(order[2:])  # after the first two, strictly in arrival order
    assert gate.running == 0 and gate.waiting == 0


def test_gate_reports_waiting_and_gives_up_with_a_message():
    from app.limits import Busy, Gate

    gate = Gate(1, max_queue=1, max_wait_s=1.0)
    release = threading.Event()
    def hold_until_released():
        with gate.hold():
            release.wait(10)

    def wait_then_pass():
        with gate.hold():
            pass

    holder = threading.Thread(target=hold_until_released)
    holder.start()
    while gate.running == 0:
        time.sleep(0.01)
    seen = []
    with pytest.raises(Busy, match=re.escape("no free slot after 1 s (0 requests ahead)")):
        with gate.hold(on_wait=lambda ahead, running: seen.append((ahead, running))):
            pass
    assert seen and set(seen) == {(0, 1)}  # first in line, one run going
    gate.max_wait_s = 30.0
    waiter = threading.Thread(target=wait_then_pass)
    waiter.start()
    while gate.waiting == 0:
        time.sleep(0.01)
    with pytest.raises(Busy, match=re.escape("The server is busy (1 requests waiting)")):
        with gate.hold():
            pass
    release.set()
    holder.join()
    waiter.join()
    assert gate.running == 0 and gate.waiting == 0


def test_pages_show_the_limits_and_cut_long_prompts(serving_db, monkeypatch, lm260k):
    import app.state
    from streamlit.testing.v1 import AppTest

    from app import limits

    monkeypatch.setattr(app.state, "DB_URL", serving_db)
    text = "the dog ran. " * 400  # 5,200 characters
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.query_params.update(dict(model="stories260K", layer="2", neuron="5", prompt=text))
    at.run()
    at.switch_page("views/neuron.py")
    at.run()
    assert not at.exception
    assert any(c.value == limits.describe() for c in at.caption)
    assert any(f"The prompt is {len(text):,} characters long; only the first 4,000 are used." == w.value for w in at.warning)
    assert at.text_area[0].value == text[: limits.MAX_PROMPT_CHARS]
    from app.live import neuron_on_text

    want = neuron_on_text(lm260k, text[: limits.MAX_PROMPT_CHARS], 2, 5, True)
    md = " ".join(m.value for m in at.markdown)
    assert f"Max activation **{want.acts[want.max_pos]:.3f}** at position **{want.max_pos}**" in md


def test_a_busy_server_says_so_and_the_page_recovers(serving_db, monkeypatch, lm260k):
    """Every live slot taken for longer than a request may wait: the page says the server is busy
    (one line, no traceback); once the slot is free the same link shows the result."""
    import app.state
    from streamlit.testing.v1 import AppTest

    from app import limits
    from app.live import neuron_on_text

    monkeypatch.setattr(app.state, "DB_URL", serving_db)
    gate = limits.Gate(1, max_wait_s=1.0)
    monkeypatch.setattr(limits, "GATE", gate)
    prompt = "The cat sat on the warm mat."
    held, release = threading.Event(), threading.Event()

    def hold():
        with gate.hold():
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)

    def open_neuron():
        at = AppTest.from_file(MAIN, default_timeout=120)
        at.query_params.update(dict(model="stories260K", layer="1", neuron="7", prompt=prompt))
        at.run()
        at.switch_page("views/neuron.py")
        at.run()
        assert not at.exception
        return at

    try:
        at = open_neuron()
        assert [w.value for w in at.warning] == ["The server is busy: no free slot after 1 s (0 requests ahead); try again."]
        assert not any("Max activation" in m.value for m in at.markdown)
    finally:
        release.set()
        t.join()
    at = open_neuron()
    want = neuron_on_text(lm260k, prompt, 1, 7, True)
    assert not at.warning
    assert any(f"Max activation **{want.acts[want.max_pos]:.3f}** at position **{want.max_pos}**" in m.value for m in at.markdown)
    assert gate.running == 0 and gate.waiting == 0


# ----------------------------------------------------------------------------- a real server


def _open_over_websocket(port: int, page: str, query: dict, timeout: float) -> dict:
    """Open ``page`` in a new session of a running app, as a browser does, and collect what it shows."""
    import asyncio
    from urllib.parse import urlencode

    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    shown = {"markdown": [], "alert": [], "exception": [], "metric": {}}
    msg = BackMsg()
    msg.rerun_script.query_string = urlencode(query)
    msg.rerun_script.page_name = page

    async def talk():
        async with websockets.connect(f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"], max_size=None) as ws:
            await ws.send(msg.SerializeToString())
            while True:
                f = ForwardMsg()
                f.ParseFromString(await ws.recv())
                if f.WhichOneof("type") == "script_finished":
                    return
                if f.WhichOneof("type") == "delta" and f.delta.WhichOneof("type") == "new_element":
                    el = f.delta.new_element
                    kind = el.WhichOneof("type")
                    if kind == "markdown":
                        shown["markdown"].append(el.markdown.body)
                    elif kind == "alert":
                        shown["alert"].append(el.alert.body)
                    elif kind == "exception":
                        shown["exception"].append(el.exception.message)
                    elif kind == "metric":
                        shown["metric"][el.metric.label] = el.metric.body

    asyncio.run(asyncio.wait_for(talk(), timeout))
    return shown


def test_the_reported_link_does_not_hold_up_other_sessions(serving_db, tmp_path, lm260k):
    """The issue's link and an ordinary page at the same time on a real server (127.0.0.1): both
    pages finish, with the right values. Before, the link's regex held the GIL until the server
    was killed and every other page load timed out."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    from app.hypothesis import explained_share
    from app.live import neuron_on_text
    from precompute.jobs.neurons.tables import neuron_page
    from precompute.store.db import open_readonly

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TINYSCOPE_DB=serving_db, PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "streamlit", "run", str(root / "app" / "main.py"), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    log = tmp_path / "server.log"
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        prompt = "Tim had a red ball. He threw it high!"
        evil = dict(model="stories260K", layer="1", neuron="5", mode="regex", hyp=EVIL)
        plain = dict(model="stories260K", layer="2", neuron="9", prompt=prompt)
        with ThreadPoolExecutor(2) as ex:
            f_evil = ex.submit(_open_over_websocket, port, "neuron", evil, 120)
            f_plain = ex.submit(_open_over_websocket, port, "neuron", plain, 120)
            got_evil, got_plain = f_evil.result(), f_plain.result()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not got_evil["exception"] and not got_plain["exception"]
    with open_readonly(serving_db).session() as s:
        p = neuron_page(s, "stories260K", 1, 5)

    class Bang:  # EVIL matches exactly the tokens with a '!'
        def matches(self, t):
            return "!" in t

    want = explained_share(p, Bang())
    label = next(k for k in got_evil["metric"] if "explained by the hypothesis" in k)
    assert got_evil["metric"][label] == ("no tokens" if want.share is None else f"{want.share:.0%}")
    live = neuron_on_text(lm260k, prompt, 2, 9, True)
    assert any(f"Max activation **{live.acts[live.max_pos]:.3f}** at position **{live.max_pos}**" in m
               for m in got_plain["markdown"])
