"""A throwaway PostgreSQL server for tests: Debian's binaries, a temporary folder, 127.0.0.1, a free port.

``PgServer.start()`` runs ``initdb`` in a new temporary folder (trust authentication, user
``tinyscope``), starts ``postgres`` listening on 127.0.0.1 only (its unix socket in the same
folder), and ``create_database(name)`` returns a ``postgresql+psycopg://`` URL. ``stop()`` stops
it with ``pg_ctl stop -m fast`` and deletes the folder.

PostgreSQL refuses to run as root: as root the server runs as the unprivileged ``nobody`` user,
which owns the folder. ``unavailable()`` says, in one line, why no server can be started here
(the caller skips with it); a server that is installed but fails to start raises instead.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_USER = "tinyscope"
RUN_AS = "nobody"  # the unprivileged account the server runs under when the tests run as root


def pg_bindir() -> Path | None:
    """The newest Debian PostgreSQL bin folder (``/usr/lib/postgresql/NN/bin``), or one on PATH."""
    env = os.environ.get("TINYSCOPE_PG_BIN")
    if env:
        return Path(env)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.parent.name)] or [0],
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def unavailable() -> str | None:
    """Why a test server cannot be started on this machine (one line), or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is absent: pip install -e '.[postgres]' for the PostgreSQL tests"
    bindir = pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        return "PostgreSQL is not installed (apt-get install postgresql): PostgreSQL tests are skipped"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"running as root and there is no {RUN_AS!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is absent: cannot run PostgreSQL as an unprivileged user"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, bindir: Path | None = None, durable: bool = False):
        self.bindir = bindir or pg_bindir()
        self.durable = durable  # False: no fsync (a test server is thrown away; stopping it takes 0.1 s, not 9)
        self.root = Path(tempfile.mkdtemp(prefix="tinyscope-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.running = False

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", RUN_AS, "--", *args] if os.geteuid() == 0 else list(args)

    def _run(self, *args: str, timeout: float = 120) -> None:
        p = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if p.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({p.returncode}): {p.stderr.strip()[-2000:]}\n{log}")

    def start(self) -> PgServer:
        if os.geteuid() == 0:
            u = pwd.getpwnam(RUN_AS)
            os.chown(self.root, u.pw_uid, u.pw_gid)
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )
        for attempt in range(5):  # another process may take the free port before postgres binds it
            self.port = _free_port()
            opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
            if not self.durable:
                opts += " -c fsync=off -c full_page_writes=off"
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                          "-w", "-t", "60", "start")
                break
            except RuntimeError:
                if attempt == 4:
                    raise
                time.sleep(0.2)
        self.running = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database (dropped first if it exists); returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            if self.running:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
                self.running = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
