"""Load test: many sessions at once on a real tinyscope server, each result checked.

    python bench/bench_load.py                     # 20 sessions for 120 s
    python bench/bench_load.py --sessions 5 --seconds 20 --db sqlite:///data/tinyscope.db

Starts ``streamlit run app/main.py`` on 127.0.0.1 (a free port; never another interface) against
``--db``, or a database it builds first with ``precompute run`` (stories260K, neuron job, 3,000
tokens of valid-head.txt). Then ``--sessions`` clients keep the server busy for ``--seconds``:
each request opens a new session over Streamlit's websocket, as a browser opening a shared link,
for either a neuron page with a live prompt ("test this neuron") or a lab page with a neuron
ablation, with a prompt no request used before (no cache hits), and waits until the page's
script has finished. From the page it reads the per-token activations or the clean/ablated
probabilities table. When the time is up, every value read is compared with the same live
function run alone in this process (the single-session baseline).

Prints: requests, p50/p95/max latency, errors (target none), "busy" refusals, requests that saw
the "waiting" line, mismatches against the baseline (target none) and the server's resident
memory idle, after a warm-up and after the load (VmRSS; VmHWM for the peak). Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import SHARED, need_corpus  # noqa: E402

HOST = "127.0.0.1"
MODEL_DIR = SHARED / "models" / "stories260K"
MODEL = "stories260K"  # its name in the database and in page URLs
LAB_TOKENS = 256  # the lab's token limit (app/views/lab.py MAX_TOKENS)
LAB_TOP_K = 10


@dataclass
class Request:
    kind: str  # "neuron" or "lab"
    prompt: str
    layer: int
    neuron: int
    seconds: float = 0.0
    error: str | None = None
    busy: bool = False
    waited: bool = False
    values: dict = field(default_factory=dict)  # what the page showed


# ---------------------------------------------------------------------------------------------
# the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def build_db(folder: Path) -> str:
    from precompute.cli import main

    url = f"sqlite:///{folder / 'load.db'}"
    rc = main(["run", "--model", str(MODEL_DIR), "--corpus", str(need_corpus()), "--db", url, "--jobs", "neurons",
               "--max-tokens", "3000", "--ctx-len", "128"])
    if rc != 0:
        sys.exit(f"building the database failed (exit code {rc})")
    return url


def start_server(db: str, log: Path, slots: int | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, TINYSCOPE_DB=db, PYTHONPATH=str(ROOT))
    if slots:
        env["TINYSCOPE_LIVE_SLOTS"] = str(slots)
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.headless", "true",
           "--server.address", HOST, "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with code {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/_stcore/health", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    sys.exit(f"the server did not answer within 120 s; see {log}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


# ---------------------------------------------------------------------------------------------
# one request = one new session


def _table(arrow_bytes: bytes):
    import pyarrow as pa

    return pa.ipc.open_stream(io.BytesIO(arrow_bytes)).read_all().to_pandas()


async def fetch(port: int, req: Request, timeout: float) -> Request:
    """Open ``req``'s page in a new session and read what it shows."""
    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    if req.kind == "neuron":
        page = "neuron"
        query = dict(model=MODEL, layer=req.layer, neuron=req.neuron, prompt=req.prompt)
    else:
        page = "lab"
        query = dict(model=MODEL, prompt=req.prompt, ablate=f"neuron:{req.layer}:{req.neuron}:zero")
    msg = BackMsg()
    msg.rerun_script.query_string = urlencode(query)
    msg.rerun_script.page_name = page
    async def talk():
        async with websockets.connect(f"ws://{HOST}:{port}/_stcore/stream", subprotocols=["streamlit"],
                                      max_size=None, open_timeout=timeout) as ws:
            await ws.send(msg.SerializeToString())
            last_md = ""
            while True:
                f = ForwardMsg()
                f.ParseFromString(await ws.recv())
                kind = f.WhichOneof("type")
                if kind == "script_finished":
                    return
                if kind != "delta" or f.delta.WhichOneof("type") != "new_element":
                    continue
                el = f.delta.new_element
                ek = el.WhichOneof("type")
                if ek == "markdown":
                    last_md = el.markdown.body
                elif ek == "exception":
                    req.error = f"exception: {el.exception.type}: {el.exception.message}"
                elif ek == "alert":
                    body = el.alert.body
                    if body.startswith("Waiting for the model"):
                        req.waited = True
                    elif "The server is busy" in body:
                        req.busy = True
                    elif el.alert.format == el.alert.ERROR:
                        req.error = f"error on the page: {body}"
                elif ek == "dataframe":
                    df = _table(el.dataframe.arrow_data.data)
                    if req.kind == "neuron" and "activation" in df.columns:
                        req.values = dict(ids=df["id"].tolist(), acts=df["activation"].tolist())
                    elif req.kind == "lab" and last_md.startswith("Clean top-") and not req.values:
                        req.values = dict(tokens=df["token"].tolist(), clean=df["clean p"].tolist(),
                                          ablated=df["ablated p"].tolist(), header=last_md)

    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(talk(), timeout)
    except Exception as e:  # noqa: BLE001 - every failure is counted and shown, none stops the test
        req.error = f"{type(e).__name__}: {e}"
    req.seconds = time.perf_counter() - t0
    if req.error is None and not req.busy and not req.values:
        req.error = "the page showed no result"
    return req


class Prompts:
    """Distinct prompts: lines of valid-head.txt, then the same lines numbered."""

    def __init__(self, seed: int = 0):
        lines = [ln.strip() for ln in need_corpus().read_text().splitlines()]
        self.lines = [ln for ln in lines if 40 <= len(ln) <= 400]
        random.Random(seed).shuffle(self.lines)
        self.i = 0

    def next(self) -> str:
        ln = self.lines[self.i % len(self.lines)]
        k = self.i // len(self.lines)
        self.i += 1
        return ln if k == 0 else f"{ln} ({k})"


def make_request(rng: random.Random, prompts: Prompts, n_layers: int, d_mlp: int) -> Request:
    kind = "neuron" if rng.random() < 0.5 else "lab"
    return Request(kind, prompts.next(), rng.randrange(n_layers), rng.randrange(d_mlp))


async def load(port: int, sessions: int, seconds: float, timeout: float, rng, prompts, shape) -> list[Request]:
    done: list[Request] = []
    deadline = time.monotonic() + seconds

    async def session():
        while time.monotonic() < deadline:
            done.append(await fetch(port, make_request(rng, prompts, *shape), timeout))

    await asyncio.gather(*(session() for _ in range(sessions)))
    return done


# ---------------------------------------------------------------------------------------------
# the single-session baseline


def check(reqs: list[Request]) -> list[str]:
    """Every value a page showed against the same live function run alone here."""
    import numpy as np
    import torch

    from app.live import neuron_on_text
    from precompute.live import ablate
    from precompute.models import load_model

    torch.set_num_threads(1)
    lm = load_model(str(MODEL_DIR))
    bad = []
    for r in reqs:
        if r.error or r.busy:
            continue
        if r.kind == "neuron":
            want = neuron_on_text(lm, r.prompt, r.layer, r.neuron, prepend_bos=True)
            ok = list(want.ids) == r.values["ids"] and np.allclose(want.acts, r.values["acts"], rtol=1e-5, atol=1e-5)
        else:
            a = ablate(lm, r.prompt, "neuron", r.layer, r.neuron, "zero", top_k=LAB_TOP_K, max_tokens=LAB_TOKENS)
            pos = a.n - 1
            want = a.clean_top(pos)
            ok = (
                r.values["header"].startswith(f"Clean top-{LAB_TOP_K} next tokens at position {pos},")
                and [repr(c.text) for c in want] == r.values["tokens"]
                and np.allclose(np.exp([c.clean_logprob for c in want]), r.values["clean"], rtol=1e-5, atol=1e-7)
                and np.allclose(np.exp([c.ablated_logprob for c in want]), r.values["ablated"], rtol=1e-5, atol=1e-7)
            )
        if not ok:
            bad.append(f"{r.kind} L{r.layer} N{r.neuron} {r.prompt[:40]!r}")
    return bad


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="how long the load runs (default 120)")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent clients (default 20)")
    ap.add_argument("--db", help="database URL (default: build one in a temporary folder)")
    ap.add_argument("--slots", type=int, help="TINYSCOPE_LIVE_SLOTS for the server (default: the app's, 2)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds one request may take before it counts as an error")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not MODEL_DIR.exists():
        sys.exit(f"{MODEL_DIR} is absent: the load test runs the shared stories260K model")
    from precompute.models import load_model

    probe = load_model(str(MODEL_DIR))
    shape = (probe.n_layers, probe.d_mlp)
    del probe
    rng, prompts = random.Random(args.seed), Prompts(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        db = args.db or build_db(Path(tmp))
        proc, port = start_server(db, Path(tmp) / "server.log", args.slots)
        try:
            idle = rss_mb(proc.pid)[0]
            warm = [asyncio.run(fetch(port, make_request(rng, prompts, *shape), args.timeout)) for _ in range(6)]
            alone = [r.seconds for r in warm[2:]]
            before = rss_mb(proc.pid)[0]
            t0, server0, client0 = time.monotonic(), cpu_s(proc.pid), time.process_time()
            reqs = asyncio.run(load(port, args.sessions, args.seconds, args.timeout, rng, prompts, shape))
            wall = time.monotonic() - t0
            server_cpu, client_cpu = cpu_s(proc.pid) - server0, time.process_time() - client0
            after, peak = rss_mb(proc.pid)
            load_avg = os.getloadavg()[0]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errors = [r for r in warm + reqs if r.error]
        bad = check(warm + reqs)
    lat = [r.seconds for r in reqs if not r.error and not r.busy]
    print(f"{args.sessions} sessions for {args.seconds:.0f} s ({wall:.0f} s with the last requests), server on {HOST}:{port}")
    print(f"requests: {len(reqs)} ({sum(r.kind == 'neuron' for r in reqs)} neuron tests, "
          f"{sum(r.kind == 'lab' for r in reqs)} lab ablations), {len(reqs) / wall:.2f}/s")
    if lat:
        print(f"latency: p50 {statistics.median(lat):.2f} s, p95 {pct(lat, 0.95):.2f} s, max {max(lat):.2f} s "
              f"(one session alone: median {statistics.median(alone):.2f} s)")
    print(f"errors: {len(errors)}; busy refusals: {sum(r.busy for r in reqs)}; saw the waiting line: "
          f"{sum(r.waited for r in reqs)}")
    print(f"results differing from the single-session baseline: {len(bad)} of {len(warm + reqs) - len(errors)}")
    print(f"CPU during the load: server {server_cpu:.0f} s, this client {client_cpu:.0f} s, of "
          f"{wall * (os.cpu_count() or 1):.0f} core-seconds ({os.cpu_count()} cores; 1-minute load average at the end "
          f"{load_avg:.1f})")
    print(f"server memory (RSS): idle {idle:.0f} MB, after warm-up {before:.0f} MB, after the load {after:.0f} MB "
          f"(peak {peak:.0f} MB)")
    for r in errors[:10]:
        print(f"  error: {r.kind} L{r.layer} N{r.neuron}: {r.error}")
    for b in bad[:10]:
        print(f"  differs: {b}")
    return 1 if errors or bad else 0


if __name__ == "__main__":
    sys.exit(main())
