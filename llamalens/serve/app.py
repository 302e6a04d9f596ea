"""The HTTP side of `llamalens serve`: a Starlette app over the Explorer (docs/serve.md lists every endpoint).

    guard (ASGI middleware, every request)   Host must be the bound address (DNS rebinding); the token from the
                                             cookie, `Authorization: Bearer`, or `?token=` on the page's first load;
                                             a POST's Origin must be the server's own; bodies bounded; a CSP and
                                             no-sniff / no-referrer headers on every answer
    the page       GET /, /static/*          the explorer (serve/page/: one HTML file, one script, one style)
    the page's API /api/*                    JSON, and event streams for generations (a POST read with fetch)
    OpenAI         /v1/*                     serve/openai.py

Handlers turn JSON into typed specs, hand them to the Explorer and stream its events; a client that leaves
mid-stream cancels its generation (what was generated is stored).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response, \
    StreamingResponse
from starlette.routing import Route

from llamalens.errors import LlamalensError
from llamalens.inputs import MAX_JSON_LINE_NESTING, check_json_nesting
from llamalens.serve import requests as parse
from llamalens.serve.explorer import MAX_PROMPT_CHARS, MAX_TOKENS, MAX_TOP, BranchSpec, Explorer, Job

PAGE = Path(__file__).parent / "page"
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
MAX_BODY = 1 << 20  # bytes a request body
COOKIE = "llamalens_token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]


class Guard:
    """The server's door (module docstring); `hosts` the Host values it answers to."""

    def __init__(self, app, token: str, hosts: set[str], origins: set[str]):
        self.app, self.token, self.hosts, self.origins = app, token, hosts, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def secured(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + HEADERS
            await send(message)

        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, secured)
        await self.app(scope, _bounded(receive), secured)

    def _refusal(self, scope, headers: dict) -> Response | None:
        if headers.get("host", "") not in self.hosts:
            return _error(421, "this server answers only to its own address (the Host header names another: "
                               "DNS rebinding is refused); open the URL it printed")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and headers.get("origin", "") not in self.origins | {""}:
            return _error(403, "a request from another web page (Origin) is refused")
        if int(headers.get("content-length") or 0) > MAX_BODY:
            return _error(413, f"the request body is larger than {MAX_BODY} bytes")
        if not self._authorized(scope, headers):
            return _error(401, "missing or wrong token: open the URL `llamalens serve` printed (with ?token=), or send "
                               "`Authorization: Bearer TOKEN`")
        return None

    def _authorized(self, scope, headers: dict) -> bool:
        given = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        for part in headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == COOKIE:
                given.append(v)
        if scope["path"] == "/":
            given += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given if g)


def _bounded(receive):
    """receive, refusing a body that grows past MAX_BODY whatever its Content-Length said."""
    seen = 0

    async def inner():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                raise parse.TooLarge(f"the request body is larger than {MAX_BODY} bytes")
        return message

    return inner


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                                   "code": status}}, status_code=status)


def handled(fn):
    """A handler whose bad input answers a clear 4xx, never a traceback."""

    async def wrapper(request: Request):
        try:
            return await fn(request)
        except parse.TooLarge as e:
            return _error(413, str(e))
        except (LlamalensError, ValueError, TypeError, KeyError) as e:
            return _error(400, str(e) if not isinstance(e, KeyError) else f"missing field {e}")
        except Exception as e:  # noqa: BLE001 - a bug answers 500 with its name; the server goes on
            return _error(500, f"{type(e).__name__}: {e}")

    return wrapper


async def body(request: Request) -> dict:
    raw = await request.body()
    try:
        text = (raw or b"{}").decode("utf-8")
        check_json_nesting(text, "the body", MAX_JSON_LINE_NESTING)  # json.loads recurses once per level
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise parse.BadRequest(f"the body is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise parse.BadRequest("the body must be a JSON object")
    return data


def sse(events: AsyncIterator[dict], job_box: list, last: str | None = None) -> StreamingResponse:
    """The events as a server-sent event stream, then `last` as its final data line (OpenAI's "[DONE]")."""
    async def stream():
        try:
            async for ev in events:
                yield f"data: {json.dumps(ev, allow_nan=False)}\n\n"
            if last is not None:
                yield f"data: {last}\n\n"
        finally:  # the client left, or the stream ended: a generation still running stops (and is stored)
            for job in job_box:
                job.cancel.set()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-store"})


def events_of(start) -> tuple[AsyncIterator[dict], list]:
    """(the events of a job started by start(emit), a box holding the job): ends after done or error."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    box: list[Job] = []
    box.append(start(lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev)))

    async def gen():
        while True:
            ev = await q.get()
            yield ev
            if ev.get("type") in ("done", "error"):
                return

    return gen(), box


def make_app(explorer: Explorer, token: str, hosts: set[str], origins: set[str]) -> Guard:
    """The served app behind its Guard: the page, the tree API, the stored runs' API and the OpenAI-compatible API."""
    from llamalens.serve.openai import routes as openai_routes

    routes = [*_page_routes(token), *_tree_routes(explorer), *_stored_routes(explorer),
              *openai_routes(explorer, handled, body, events_of, sse, _error)]

    async def not_found(request: Request, exc):
        return PlainTextResponse("not found", status_code=404)

    app = Starlette(routes=routes, exception_handlers={404: not_found})
    return Guard(app, token, hosts, origins)


def _page_routes(token: str) -> list[Route]:
    """The page (a ?token= visit sets the cookie and redirects to /) and its static files."""

    async def page(request: Request):
        if request.query_params.get("token"):
            r = RedirectResponse("/", status_code=303)
            r.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return r
        return FileResponse(PAGE / "index.html", media_type="text/html", headers={"cache-control": "no-store"})

    async def static(request: Request):
        name = request.path_params["name"]
        if name not in STATIC:
            return _error(404, f"no file {name!r}")
        return FileResponse(PAGE / name, media_type=STATIC[name])

    return [Route("/", page), Route("/static/{name}", static)]


def _tree_routes(explorer: Explorer) -> list[Route]:
    """The explorer's API: the model and its defaults, generating and branching (event streams), cancelling, the
    state, a tree, one position's distributions."""
    model = explorer.model

    @handled
    async def info(request: Request):
        from llamalens.run.grid import PRESETS
        from llamalens.settings import SamplingSettings

        defaults = SamplingSettings().to_dict()
        return JSONResponse({
            "model": {"name": model.path.name, "path": str(model.path), "n_vocab": model.n_vocab,
                      "n_ctx": explorer.held.n_ctx, "chat_template": explorer.chat_label},
            "settings": dict(defaults, chain="llama-cpp-python"), "llama_cpp": SamplingSettings(chain="llama.cpp").to_dict(),
            "presets": {k: v for k, v in PRESETS.items() if not set(v) & set(parse.NOT_HERE)}, "limits": {"max_tokens": MAX_TOKENS, "max_top": MAX_TOP,
                                           "max_prompt_chars": MAX_PROMPT_CHARS, "max_body": MAX_BODY},
            "store": str(explorer.store_path), "exact": explorer.exact})

    @handled
    async def generate(request: Request):
        d = await body(request)
        spec = await run_in_threadpool(parse.generation, explorer, d)
        events, box = events_of(lambda emit: explorer.generate(spec, emit))
        return sse(events, box)

    @handled
    async def branch(request: Request):
        d = await body(request)
        spec: BranchSpec = await run_in_threadpool(parse.branch, explorer, d)
        events, box = events_of(lambda emit: explorer.branch(spec, emit))
        return sse(events, box)

    @handled
    async def cancel(request: Request):
        await body(request)
        return JSONResponse({"cancelled": explorer.cancel_running()})

    async def state(request: Request):
        return JSONResponse(explorer.state())

    @handled
    async def tree(request: Request):
        from llamalens.run.tree import load_tree

        tid = parse.integer(request.path_params["tree"], "tree")
        t = await run_in_threadpool(lambda: load_tree(explorer.store(), tid))
        return JSONResponse(t.to_dict())

    @handled
    async def position(request: Request):
        d = await body(request)
        args = parse.position(d)
        return JSONResponse(await run_in_threadpool(explorer.position, *args))

    return [Route("/api/info", info), Route("/api/generate", generate, methods=["POST"]),
            Route("/api/branch", branch, methods=["POST"]), Route("/api/cancel", cancel, methods=["POST"]),
            Route("/api/state", state), Route("/api/trees/{tree}", tree),
            Route("/api/position", position, methods=["POST"])]


def _stored_routes(explorer: Explorer) -> list[Route]:
    """The store's runs: the list, one run, and adopting a stored sample as a new tree."""

    @handled
    async def runs(request: Request):
        infos = await run_in_threadpool(lambda: explorer.store().runs())
        return JSONResponse([dict(i.listing(), status=i.status) for i in infos])

    @handled
    async def run(request: Request):
        from llamalens.serve.stored import stored_run

        rid = parse.integer(request.path_params["run"], "run")
        return JSONResponse(await run_in_threadpool(stored_run, explorer, rid))

    @handled
    async def adopt(request: Request):
        from llamalens.serve.stored import adopt as adopt_sample

        d = await body(request)
        args = parse.integer(d.get("run"), "run", 0), parse.integer(d.get("sample"), "sample", 0)
        return JSONResponse(await run_in_threadpool(adopt_sample, explorer, *args))

    return [Route("/api/runs", runs), Route("/api/runs/{run}", run), Route("/api/adopt", adopt, methods=["POST"])]
