"""A headless Chromium driven over the DevTools protocol, for report tests and screenshots.

    with Browser() as b:
        page = b.open("report.html")        # load; console errors, exceptions, requests are recorded
        page.hover(".tk")                    # a real mouse move to the element's centre
        page.eval("document.title")
        page.screenshot("shot.png")          # the whole page

`python tests/browser.py report.html shot.png` takes a screenshot by hand.
Needs Debian's `chromium` and the `websocket-client` package; tests skip when Chromium is absent.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self._id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self._id += 1
        my = self._id
        self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        seen = next((e for e in self.events if e.get("method") == method), None)
        end = time.time() + timeout
        while seen is None:
            if time.time() > end:
                raise TimeoutError(method)
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                seen = msg
        return seen

    def open(self, path: str | os.PathLike, width: int = 1280, height: int = 900) -> float:
        """Load a local file; return the seconds until the load event."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.events.clear()
        t0 = time.time()
        self.call("Page.navigate", url=Path(path).resolve().as_uri())
        self.wait_for("Page.loadEventFired", timeout=60)
        return time.time() - t0

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def hover(self, selector: str, index: int = 0) -> None:
        rect = self.eval(f"(() => {{ const e = document.querySelectorAll({json.dumps(selector)})[{index}];"
                         "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                         "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=rect[0], y=rect[1])

    def screenshot(self, out: str | os.PathLike, full: bool = True) -> None:
        params = {"format": "png"}
        if full:
            w, h = self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": w, "height": min(h, 16000),
                                                            "scale": 1})
        Path(out).write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, log errors and any request that is not a local file."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')} {p['exceptionDetails'].get('exception', {}).get('description', '')}")
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(f"log: {p['entry'].get('text')}")
            elif m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:")):
                out.append(f"network request: {p['request']['url']}")
        return out

    def close(self):
        self.ws.close()


class Browser:
    def __init__(self):
        exe = chromium()
        if exe is None:
            raise RuntimeError("no chromium on PATH")
        self.profile = tempfile.mkdtemp(prefix="llamalens-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--hide-scrollbars", "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        end = time.time() + 60
        while port is None and time.time() < end:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
        if port is None:
            self.close()
            raise RuntimeError("chromium did not start its DevTools endpoint")
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(t for t in targets if t.get("type") == "page")
        self.page = Page(page["webSocketDebuggerUrl"])

    def open(self, path) -> Page:
        self.page.open(path)
        return self.page

    def close(self):
        try:
            if getattr(self, "page", None):
                self.page.close()
        finally:
            self.proc.kill()
            self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    with Browser() as b:
        secs = b.page.open(src)
        if len(sys.argv) > 3:
            b.page.hover(".tk", int(sys.argv[3]))
            b.page.screenshot(dst, full=False)
        else:
            b.page.screenshot(dst)
        print(f"loaded in {secs:.2f}s; problems: {b.page.problems()}")
