"""A real llama-server for tests: started on a free 127.0.0.1 port, waited for, stopped.

    from server import llama_server

    def test_something(gemma_path):
        with llama_server(gemma_path, "--ctx-size", "512", "-np", "1") as srv:
            reply = srv.post("/completion", {"prompt": "Hi", "n_predict": 1})

The binary is the one scripts/build_llama_tools.sh builds from the vendored llama.cpp (conftest's
`llama_tool("llama-server")`); when it is missing the test skips on a developer's machine and fails in
CI (conftest's `require`). The server gets a port the OS just handed out; if another process takes it
first, the server exits and the helper tries again with a new port (a few times). Readiness is
`GET /health` answering 200 within `timeout` seconds; a server that exits or never gets ready fails the
test with the tail of its log. The process is always stopped (SIGTERM, then SIGKILL) on the way out.
Only the standard library is used (urllib), so part B and anyone else can reuse this without extras.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import llama_tool, require


def server_binary() -> str:
    """The path of llama-server, or a skip (developer) / failure (CI) saying how to build it."""
    return require(llama_tool("llama-server"), "llama.cpp's llama-server",
                   "scripts/build_llama_tools.sh builds it (scripts/install.sh --test runs that)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running llama-server: its base URL and small JSON helpers."""

    def __init__(self, base_url: str, proc: subprocess.Popen, log: Path):
        self.base_url = base_url
        self.proc = proc
        self.log = log

    def get(self, path: str, timeout: float = 120) -> dict:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 120) -> dict:
        """POST `body` as JSON; an HTTP error fails with the server's own message."""
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            pytest.fail(f"llama-server answered {e.code} to POST {path}: {e.read().decode(errors='replace')}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _health(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def llama_server(model: str | os.PathLike, *args: str, timeout: float = 120, tries: int = 3):
    """Start llama-server on `model` with extra command-line `args`; yield a `Server`; stop it.

    Threads default to this machine's CPU count (like the test fixtures' contexts) unless `args`
    names `-t`/`--threads`.
    """
    binary = server_binary()
    threads = [] if {"-t", "--threads"} & set(args) else ["--threads", str(os.cpu_count() or 1)]
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        log = Path(tmp) / "server.log"
        for attempt in range(tries):
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            cmd = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *threads, *args]
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            srv = Server(base_url, proc, log)
            try:
                deadline = time.monotonic() + timeout
                while proc.poll() is None and time.monotonic() < deadline and not _health(base_url):
                    time.sleep(0.1)
                if proc.poll() is not None:
                    if "bind" in srv.log_tail().lower() and attempt + 1 < tries:
                        continue  # someone took the port between free_port() and the bind: try another
                    pytest.fail(f"llama-server exited ({proc.returncode}) before it was ready:\n"
                                f"{' '.join(cmd)}\n{srv.log_tail()}")
                if not _health(base_url):
                    pytest.fail(f"llama-server was not ready within {timeout:.0f} s:\n{' '.join(cmd)}\n"
                                f"{srv.log_tail()}")
                yield srv
                return
            finally:
                _stop(proc)
