"""`llamalens serve` started for real for a test: on a free 127.0.0.1 port, waited for, always stopped.

    with llamalens_serve("--store", db, "--ctx", "512") as srv:
        status, data = srv.post("/api/generate", {"prompt": "Hi"})     # JSON, or a list of events for a stream
        srv.url                                                        # the page's URL with its token

The server prints its URL on its first stdout line once its socket listens; the wait for it is bounded
(`timeout`), and a server that exits first fails the test with its stderr. SIGTERM, then SIGKILL, on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

TOKEN = "test-token-0123456789"


class Serve:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url
        self.base = re.match(r"(http://[^/]+)", url).group(1)
        self.host = self.base[len("http://"):]

    def request(self, method: str, path: str, data=None, headers: dict | None = None, raw: bytes | None = None,
                timeout: float = 300):
        """(status, parsed answer, headers): JSON parsed; an event stream as its list of events."""
        h = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        h.update(headers or {})
        h = {k: v for k, v in h.items() if v is not None}
        body = raw if raw is not None else (json.dumps(data).encode() if data is not None else None)
        req = urllib.request.Request(self.base + path, data=body, headers=h, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text, hdrs = r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            status, text, hdrs = e.code, e.read().decode(), dict(e.headers)
        if hdrs.get("content-type", "").startswith("text/event-stream"):
            return status, [json.loads(x[6:]) if x[6:] != "[DONE]" else "[DONE]"
                            for x in text.splitlines() if x.startswith("data: ")], hdrs
        try:
            return status, json.loads(text), hdrs
        except ValueError:
            return status, text, hdrs

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)[:2]

    def post(self, path: str, data=None, **kw):
        return self.request("POST", path, data, **kw)[:2]


@contextlib.contextmanager
def llamalens_serve(*args: str, timeout: float = 180):
    cmd = [sys.executable, "-m", "llamalens", "serve", "--port", "0", "--token", TOKEN, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    try:
        if not got or "http://" not in got[0]:
            raise AssertionError(f"llamalens serve did not print its URL within {timeout} s "
                                 f"(exit {proc.poll()}): {''.join(err)[-2000:]}")
        yield Serve(proc, got[0].split(": ", 1)[1].strip())
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
