"""The page of `llamalens serve` in headless Chromium, against the real server on the default model: generate,
open a token (its alternatives are the stored record's), move the sampler (the post-chain column changes),
branch from an alternative, compare the two branches, open a stored run, keyboard use; a prompt holding markup
and terminal escapes renders inert; the page requests nothing outside the server. Screenshots of the main
views go to $LLAMALENS_SHOTS (docs/img/serve-*.png: look at them when the page changes)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest

from browser import Browser
from serving import llamalens_serve

ROOT = Path(__file__).resolve().parent.parent
# screenshots of the main views: LLAMALENS_SHOTS=docs/img refreshes the committed ones; else a temporary folder
SHOTS = Path(os.environ.get("LLAMALENS_SHOTS") or tempfile.mkdtemp(prefix="serve-shots-"))
XSS = "<img src=x onerror=alert(1)>"
ESC = "\x1b[31m"
URL_WAIT = 120  # seconds for the server to load the model and print its URL


def api(serve, path: str):
    status, data = serve.get(path)
    assert status == 200, (path, status, data)
    return data


@pytest.fixture(scope="module")
def serve(gemma_path, tmp_path_factory):
    """The real server on the default model (the slow tier: it loads the model): tests/serving.py starts it on a
    free port with a bounded wait for its URL, and always stops it."""
    db = tmp_path_factory.mktemp("serve") / "runs.db"
    with llamalens_serve("--store", str(db), "--model", str(gemma_path), "--chat-template", "gemma",
                         timeout=URL_WAIT) as srv:
        srv.db, srv.model_path = db, gemma_path
        yield srv


# -- driving the page ----------------------------------------------------------------------------------------------
def goto(page, url: str, width: int = 1400, height: int = 900) -> None:
    page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    page.events.clear()
    page.call("Page.navigate", url=url)
    page.wait_for("Page.loadEventFired", timeout=60)
    until(page, "document.querySelector('#s-temperature') !== null")


def until(page, js: str, timeout: float = 120):
    end = time.time() + timeout
    while True:
        value = page.eval(js)
        if value:
            return value
        if time.time() > end:
            status = page.eval("document.getElementById('status').textContent")
            raise TimeoutError(f"{js}; the page's status: {status}")
        time.sleep(0.1)


def click(page, selector: str, index: int = 0) -> None:
    """A real mouse click at the element's centre."""
    x, y = page.eval(f"(() => {{ const e = document.querySelectorAll({json.dumps(selector)})[{index}];"
                     "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                     "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def key(page, name: str, code: int) -> None:
    for kind in ("rawKeyDown", "keyUp"):
        page.call("Input.dispatchKeyEvent", type=kind, key=name, code=name, windowsVirtualKeyCode=code)


def set_value(page, selector: str, value) -> None:
    page.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.value = {json.dumps(str(value))};"
              "e.dispatchEvent(new Event('input', {bubbles: true})); })()")


def generate(page, prompt: str, max_tokens: int) -> None:
    set_value(page, "#prompt", prompt)
    set_value(page, "#max-tokens", max_tokens)
    set_value(page, "#s-temperature", 0)
    before = page.eval("document.querySelector('#tree').dataset.tree || ''")
    click(page, "#generate")
    until(page, "(() => { const t = document.querySelector('#tree').dataset.tree || '';"
                f" return document.getElementById('status').dataset.state === 'done' && t !== '' && t !== {json.dumps(before)}; }})()")


def type_text(page, selector: str, text: str) -> None:
    """Click into a text field and type (the browser's own text input)."""
    click(page, selector)
    page.call("Input.insertText", text=text)


def status(page) -> tuple[str, str]:
    return page.eval("[document.getElementById('status').dataset.state, document.getElementById('status').textContent]")


def column(page, cls: str) -> list:
    return page.eval(f"Array.from(document.querySelectorAll('#alts tr.alt .{cls}')).map(c => c.dataset.p === undefined ? null : Number(c.dataset.p))")


def outside_requests(page, base: str) -> list[str]:
    urls = [e["params"]["request"]["url"] for e in page.events if e.get("method") == "Network.requestWillBeSent"]
    return [u for u in urls if not u.startswith(base + "/") and not u.startswith("data:")]


def problems(page) -> list[str]:
    """Console errors and exceptions (browser.py's list, less its note of every non-file request)."""
    return [p for p in page.problems() if not p.startswith("network request: ")]


def test_generate_open_branch_compare(serve, chromium_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with Browser() as b:
        page = b.page
        goto(page, serve.url)
        assert page.eval("location.search") == ""  # the token went into a cookie
        generate(page, "The capital of France is", 12)
        tree_id = int(page.eval("document.querySelector('#tree').dataset.tree"))
        tree = api(serve, f"/api/trees/{tree_id}")
        root = tree["branches"][0]
        assert page.eval("document.querySelectorAll('#tokens .tk').length") == len(root["tokens"]) == 12
        assert page.eval("Array.from(document.querySelectorAll('#tokens .tk')).map(s => Number(s.dataset.id))") == \
            [t["id"] for t in root["tokens"]]

        # a token opens: the raw alternatives are the record's, then the chain's column fills in
        at = 2
        click(page, "#tokens .tk", at)
        until(page, "document.querySelectorAll('#alts .post-p[data-p]').length > 0")
        rec = root["tokens"][at]
        ids = page.eval("Array.from(document.querySelectorAll('#alts tr.alt')).map(r => Number(r.dataset.id))")
        assert ids == [a["id"] for a in rec["top"]] and len(ids) == 10
        assert column(page, "raw-p") == pytest.approx([a["prob"] for a in rec["top"]], abs=1e-12)
        first = page.eval("document.querySelector('#alts tr.alt .raw-p .v').textContent")
        assert first == f"{rec['top'][0]['prob'] * 100:.1f}%"
        assert f"Position {at}" in page.eval("document.querySelector('#pos h2').textContent")
        greedy = column(page, "post-p")
        assert greedy[0] == 1.0 and not any(greedy[1:])  # temperature 0: the chain keeps one token
        page.screenshot(SHOTS / "serve-token.png", full=False)

        # the sampler, live: temperature and top-k redraw the post-chain column, no button pressed
        set_value(page, "#s-temperature", 1.0)
        until(page, f"(() => {{ const p = Array.from(document.querySelectorAll('#alts .post-p')).map(c => Number(c.dataset.p));"
                    f" return p[1] > 0 && JSON.stringify(p) !== {json.dumps(json.dumps(greedy))}; }})()", 30)
        warm = column(page, "post-p")
        assert warm[0] < 1.0 and warm[1] > 0
        set_value(page, "#s-top_k", 1)
        until(page, "Array.from(document.querySelectorAll('#alts .post-p')).filter(c => Number(c.dataset.p) > 0).length === 1", 30)
        removed = page.eval("Array.from(document.querySelectorAll('#alts .post-p')).map(c => c.dataset.removedBy)")
        assert removed[0] == "" and all(r == "top_k" for r in removed[1:])
        assert page.eval("document.getElementById('final-survivors').textContent") == "1"
        page.eval("document.querySelector('#pos .per-stage').open = true")
        page.screenshot(SHOTS / "serve-sampler.png", full=False)
        assert float(page.eval("document.getElementById('pos-ms').dataset.ms")) >= 0
        set_value(page, "#s-top_k", 40)
        set_value(page, "#s-temperature", 0)

        # branch from the 2nd alternative
        alt = page.eval("Number(document.querySelectorAll('#alts tr.alt')[1].dataset.id)")
        click(page, "#alts tr.alt .branch-btn", 1)
        until(page, "document.getElementById('status').dataset.state === 'done' && document.querySelectorAll('#tree .node').length === 2")
        tree = api(serve, f"/api/trees/{tree_id}")
        assert len(tree["branches"]) == 2
        child = tree["branches"][1]
        assert child["parent"] == root["branch"] and child["at"] == at
        assert child["forced"][0]["id"] == alt and child["tokens"][at]["id"] == alt
        assert [t["id"] for t in child["tokens"][:at]] == [t["id"] for t in root["tokens"][:at]]
        # the view shows the new branch: the parent's prefix greyed, the forced token marked, then its own tokens
        view = page.eval("Array.from(document.querySelectorAll('#tokens .tk')).map(s => [Number(s.dataset.id), s.className])")
        assert [i for i, _ in view] == [t["id"] for t in child["tokens"]]
        assert all("pre" in c for _, c in view[:at]) and "forced" in view[at][1] and "pre" not in view[at][1]
        assert page.eval("document.querySelectorAll('#tree .node .node').length") == 1  # the child under its parent

        # compare the two branches: the divergence is at the branch's position
        click(page, "#tree .cmp-check", 0)
        click(page, "#tree .cmp-check", 1)
        until(page, "document.getElementById('cmp-at') !== null")
        assert int(page.eval("document.getElementById('cmp-at').dataset.at")) == at
        assert page.eval("document.querySelectorAll('#compare .cmp-col').length") == 2
        assert page.eval("document.querySelectorAll('#compare .div-mark').length") == 2
        n = page.eval("Array.from(document.querySelectorAll('#compare .cmp-n')).map(e => Number(e.textContent))")
        assert n == [len(root["tokens"]), len(child["tokens"])]
        total = page.eval("Array.from(document.querySelectorAll('#compare .cmp-all')).map(e => Number(e.textContent))")
        assert total == pytest.approx([root["sequence_logprob"], child["sequence_logprob"]], abs=1e-3)
        until(page, "document.querySelectorAll('#alts .post-p[data-p]').length > 0", 30)  # the forced position, opened
        assert "forced" in page.eval("document.querySelector('#pos .badge').textContent")
        page.screenshot(SHOTS / "serve-branch.png", full=False)

        # keyboard: a focused token moves with the arrows and opens with Enter
        page.eval("document.querySelectorAll('#tokens .tk')[0].focus()")
        assert page.eval("document.querySelector('#pos h2').textContent").startswith(f"Position {at}")  # the branch's own
        for _ in range(at + 1):
            key(page, "ArrowRight", 39)
        assert page.eval("document.activeElement.dataset.pos") == str(at + 1)
        key(page, "Enter", 13)
        until(page, f"document.querySelector('#pos h2').textContent.startsWith('Position {at + 1}')", 30)
        assert page.eval("document.activeElement.classList.contains('sel')")
        label = page.eval(f"document.querySelectorAll('#tokens .tk')[{at + 1}].getAttribute('aria-label')")
        assert "probability" in label

        # the colour mode switches the legend and the tokens' colours
        click(page, "#colour-mode")
        assert page.eval("document.body.dataset.colour") == "rank"
        assert page.eval("document.querySelector('#legend .sw').textContent") == "rank 1"
        assert page.eval("document.getElementById('colour-mode').getAttribute('aria-pressed')") == "true"

        # a stored run opens in the same view
        click(page, "#runs-refresh")
        until(page, f"document.querySelector('#runs tr[data-run=\"{tree_id}\"] button') !== null", 30)
        click(page, f"#runs tr[data-run=\"{tree_id}\"] button")
        until(page, "document.getElementById('status').textContent.startsWith('Run ')", 30)
        assert page.eval("document.querySelectorAll('#tree .node').length") == 2

        # 900 px wide: one column of controls, the text and the position panel beside it
        goto(page, serve.base + "/", width=900)
        generate(page, "The capital of France is", 12)
        click(page, "#tokens .tk", at)
        until(page, "document.querySelectorAll('#alts .post-p[data-p]').length > 0")
        assert page.eval("document.documentElement.scrollWidth") <= 900
        page.screenshot(SHOTS / "serve-900.png", full=False)

        assert outside_requests(page, serve.base) == []
        assert problems(page) == []


def test_markup_and_escapes_render_inert(serve, chromium_path):
    with Browser() as b:
        page = b.page
        goto(page, serve.url)
        prompt = f"Say {XSS} and {ESC}red\u202etxt.exe <script>alert(2)</script>"
        generate(page, prompt, 8)
        shown = page.eval("document.querySelector('#tokens .prompt').textContent")
        assert shown == prompt
        assert page.eval("document.querySelectorAll('img, script:not([src])').length") == 0
        assert page.eval("document.querySelectorAll('#tokens *:not(.tk):not(.prompt)').length") == 0
        alerted = [e for e in page.events if e.get("method") == "Page.javascriptDialogOpening"]
        assert alerted == []
        # the tree node's label and the pop-up show control characters visibly
        assert "\x1b" not in page.eval("document.querySelector('#tree .node-btn').textContent")
        click(page, "#tokens .tk", 0)
        until(page, "document.querySelectorAll('#alts tr.alt').length > 0")
        assert all("\x1b" not in t and "\n" not in t for t in
                   page.eval("Array.from(document.querySelectorAll('#pos code')).map(e => e.textContent)"))
        # model output holding markup: a continuation typed as text is tokens of the branch, shown as text
        set_value(page, "#max-tokens", 2)
        type_text(page, "#continue-text", f"{XSS}{ESC}<script>alert(3)</script>")
        click(page, "#continue-go")
        until(page, "document.getElementById('status').dataset.state === 'done' && document.querySelectorAll('#tree .node').length === 2")
        shown = page.eval("Array.from(document.querySelectorAll('#tokens .tk.forced')).map(s => s.textContent).join('')")
        assert shown == f"{XSS}{ESC}<script>alert(3)</script>"
        assert page.eval("document.querySelectorAll('img, script:not([src])').length") == 0
        assert "\x1b" not in page.eval("document.querySelectorAll('#tree .node-btn')[1].textContent")
        assert [e for e in page.events if e.get("method") == "Page.javascriptDialogOpening"] == []
        assert outside_requests(page, serve.base) == []
        assert problems(page) == []


def test_chat_preset_and_typed_continuation(serve, chromium_path):
    """A preset chosen with the keyboard sets the controls and the generation's settings; a chat of a system text
    and three messages (user, assistant, user) is rendered with the model's template; a continuation typed at a
    token is a branch forcing exactly those tokens there."""
    info = api(serve, "/api/info")
    with Browser() as b:
        page = b.page
        goto(page, serve.url)
        page.eval("document.getElementById('preset').focus()")  # (a click opens the native list, apart from the page)
        for _ in range(2):  # defaults -> greedy -> factual
            key(page, "ArrowDown", 40)
        assert page.eval("document.getElementById('preset').value") == "factual"
        preset = info["presets"]["factual"]
        for name, value in preset.items():
            assert float(page.eval(f"document.getElementById('s-{name}').value")) == pytest.approx(value)

        assert info["model"]["chat_template"] == "builtin:gemma"  # (the default model, a base model, has none)
        click(page, "#mode-chat")
        assert page.eval("document.getElementById('chat-input').hidden") is False
        type_text(page, "#chat-system", "Answer in one word.")
        page.eval("document.querySelector('#chat-messages .chat-content').value = ''")
        type_text(page, "#chat-messages .chat-content", "Capital of France?")
        click(page, "#chat-add")
        type_text(page, "#chat-messages .chat-msg:nth-child(2) .chat-content", "Paris.")
        click(page, "#chat-add")
        type_text(page, "#chat-messages .chat-msg:nth-child(3) .chat-content", "Capital of Italy?")
        roles = page.eval("Array.from(document.querySelectorAll('#chat-messages .chat-role')).map(s => s.value)")
        assert roles == ["user", "assistant", "user"]
        set_value(page, "#max-tokens", 6)
        click(page, "#generate")
        until(page, "document.getElementById('status').dataset.state === 'done'")
        tree_id = int(page.eval("document.querySelector('#tree').dataset.tree"))
        tree = api(serve, f"/api/trees/{tree_id}")
        # Gemma 3's template: the system text opens the first user turn; turns in order; the model's turn opened
        turns = ["<start_of_turn>user\nAnswer in one word.\n\nCapital of France?<end_of_turn>\n",
                 "<start_of_turn>model\nParis.<end_of_turn>\n", "<start_of_turn>user\nCapital of Italy?<end_of_turn>\n",
                 "<start_of_turn>model\n"]
        assert tree["prompt"].endswith("".join(turns)), tree["prompt"]
        assert page.eval("document.querySelector('#tokens .prompt').textContent") == tree["prompt"]
        root = tree["branches"][0]
        assert root["settings"]["temperature"] == 0.3 and root["settings"]["top_k"] == 10  # the preset's

        # a typed continuation at position 1
        click(page, "#tokens .tk", 1)
        until(page, "document.getElementById('continue-text') !== null")
        type_text(page, "#continue-text", " Rome, of course")
        click(page, "#continue-go")
        until(page, "document.getElementById('status').dataset.state === 'done' && document.querySelectorAll('#tree .node').length === 2")
        child = api(serve, f"/api/trees/{tree_id}")["branches"][1]
        assert child["parent"] == 0 and child["at"] == 1
        assert "".join(f["text"] for f in child["forced"]) == " Rome, of course"
        assert [t["id"] for t in child["tokens"][:1]] == [t["id"] for t in root["tokens"][:1]]
        n = len(child["forced"])
        forced = page.eval("Array.from(document.querySelectorAll('#tokens .tk')).map(s => s.classList.contains('forced'))")
        assert forced[1:1 + n] == [True] * n and not forced[0] and not any(forced[1 + n:])
        assert problems(page) == []


def test_queued_state_and_cancel(serve, chromium_path):
    """While another client's generation runs, the page's waits in the queue and says so; Cancel then drops it
    (nothing of it is decoded or stored). A generation of the page's own stops on Cancel after its current token,
    and what it made is stored ('cancelled')."""
    import threading

    from llamalens.store import Store

    long = {"prompt": "Count from one to a thousand:", "max_tokens": 1000,
            "settings": {"temperature": 0, "chain": "llama.cpp", "ignore_eos": True}}
    with Browser() as b:
        page = b.page
        goto(page, serve.url)
        runs_before = len(Store(serve.db).runs())
        other = threading.Thread(target=lambda: serve.post("/api/generate", long, timeout=600), daemon=True)
        other.start()
        end = time.time() + 60
        while (serve.get("/api/state")[1]["running"] or {}).get("branch") is None:
            assert time.time() < end, "the other generation did not start"
            time.sleep(0.05)
        set_value(page, "#prompt", "The capital of France is")
        click(page, "#generate")
        until(page, "document.getElementById('status').dataset.state === 'queued'", 30)
        assert "1 ahead" in status(page)[1]
        assert serve.get("/api/state")[1]["queued"] == 1
        assert page.eval("document.getElementById('cancel').disabled") is False
        click(page, "#cancel")
        until(page, "document.getElementById('status').textContent.startsWith('Cancelled')", 30)
        until(page, "!document.getElementById('generate').disabled", 10)
        end = time.time() + 30
        while serve.get("/api/state")[1]["queued"] != 0:
            assert time.time() < end, "the dropped generation still counts as queued"
            time.sleep(0.1)
        assert serve.post("/api/cancel", {})[1]["cancelled"]  # the other client's
        other.join(120)
        end = time.time() + 30
        while serve.get("/api/state")[1]["running"] is not None:  # (it ends just after its stream's last event)
            assert time.time() < end, "the other generation still runs"
            time.sleep(0.1)
        assert len(Store(serve.db).runs()) == runs_before + 1  # the other's tree; the page's was never made

        # the page's own generation, cancelled while it runs
        set_value(page, "#s-chain", "llama.cpp")
        click(page, "#advanced summary")
        click(page, "#s-ignore_eos")
        assert page.eval("document.getElementById('s-ignore_eos').checked")
        set_value(page, "#max-tokens", 1000)
        click(page, "#generate")
        until(page, "document.querySelectorAll('#tokens .tk').length >= 3", 120)
        click(page, "#cancel")
        until(page, "document.getElementById('status').dataset.state === 'done'", 60)
        assert "cancelled" in status(page)[1]
        tree_id = int(page.eval("document.querySelector('#tree').dataset.tree"))
        until(page, f"document.querySelectorAll('#tokens .tk').length === {len(api(serve, f'/api/trees/{tree_id}')['branches'][0]['tokens'])}", 30)
        branch = api(serve, f"/api/trees/{tree_id}")["branches"][0]
        assert branch["finish_reason"] == "cancelled" and 3 <= len(branch["tokens"]) < 1000
        assert problems(page) == []


def test_stored_runs_open_in_the_page(serve, chromium_path):
    """A fork run opens as its base path with the continuations under it; a continuation's token opens, is
    explored (copied into a tree) and branched from; a lens run is refused with a message naming the commands
    that show it."""
    from clirun import cli
    from llamalens.store import Store

    args = ("--store", serve.db, "--model", serve.model_path)
    cli("fork", "The capital of France is", "-n", 4, "--samples", 1, "--positions", "0-1", "--alternatives", 2,
        "--min-prob", 0, *args)
    fork_id = Store(serve.db).runs()[-1].id
    cli("lens", "The capital of France is", *args)
    lens_id = Store(serve.db).runs()[-1].id
    fork = api(serve, f"/api/runs/{fork_id}")
    with Browser() as b:
        page = b.page
        goto(page, serve.url)
        until(page, f"document.querySelector('#runs tr[data-run=\"{lens_id}\"] button') !== null", 30)
        click(page, f"#runs tr[data-run=\"{lens_id}\"] button")
        until(page, "document.getElementById('status').dataset.state === 'error'", 30)
        assert "llamalens report" in status(page)[1] and "lens" in status(page)[1]

        click(page, f"#runs tr[data-run=\"{fork_id}\"] button")
        until(page, "document.getElementById('status').textContent.startsWith('Run ')", 30)
        assert page.eval("document.querySelectorAll('#tree .node').length") == len(fork["branches"])
        assert page.eval("document.querySelectorAll('#tree .node .node').length") == len(fork["branches"]) - 1
        cont = next(b for b in fork["branches"] if b["parent"] is not None and not b["forced"][0]["id"] ==
                    fork["branches"][0]["tokens"][b["at"]]["id"])
        click(page, f"#tree .node[data-branch=\"{cont['branch']}\"] > .node-row .node-btn")
        view = page.eval("Array.from(document.querySelectorAll('#tokens .tk')).map(s => [Number(s.dataset.id), s.className])")
        assert [i for i, _ in view] == [t["id"] for t in cont["tokens"]]
        assert "forced" in view[cont["at"]][1]
        at = cont["at"] + 1
        set_value(page, "#max-tokens", 4)
        click(page, "#tokens .tk", at)
        until(page, "document.getElementById('explore-btn') !== null", 30)
        click(page, "#explore-btn")
        until(page, "document.querySelectorAll('#alts .post-p[data-p]').length > 0", 60)
        tree_id = int(page.eval("document.querySelector('#tree').dataset.tree"))
        assert tree_id not in (fork_id, lens_id)
        click(page, "#alts tr.alt .branch-btn", 1)
        until(page, "document.getElementById('status').dataset.state === 'done' && document.querySelectorAll('#tree .node').length === 2", 120)
        tree = api(serve, f"/api/trees/{tree_id}")
        assert [t["id"] for t in tree["branches"][0]["tokens"]] == [t["id"] for t in cont["tokens"]]
        child = tree["branches"][1]
        assert child["at"] == at and [t["id"] for t in child["tokens"][:at]] == [t["id"] for t in cont["tokens"][:at]]
        assert [p for p in problems(page) if "status of 400" not in p] == []  # (the lens run's refusal, once)
        assert len(problems(page)) == 1
