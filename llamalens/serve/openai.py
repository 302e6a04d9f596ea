"""The OpenAI-compatible endpoints of `llamalens serve` (docs/serve.md): /v1/models, /v1/completions,
/v1/chat/completions, with logprobs that are the raw log-softmax llamalens records (before the sampler chain,
as llama-cpp-python reports them), `echo` (the prompt's own logprobs, as `llamalens score` computes them),
a prompt as text or token ids, llama.cpp's sampler fields by llamalens's names, and streaming.

Generations run on the Explorer's held context: a prompt sharing a prefix with the last one decoded reuses its
cells (llama-server's prompt cache). Nothing here is stored in the run store.
"""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llamalens.serve import requests as parse
from llamalens.serve.explorer import MAX_TOKENS, MAX_TOP, Explorer, sample_of

OPENAI_NAMES = {"temperature", "top_p", "top_k", "min_p", "seed", "typical_p", "repeat_penalty", "frequency_penalty",
                "presence_penalty"}
NOT_SAMPLER = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stop", "logprobs",
               "top_logprobs", "echo", "stream", "n", "user", "stream_options", "suffix", "best_of"}


def _settings(d: dict):
    given = {k: v for k, v in d.items() if k not in NOT_SAMPLER and v is not None}
    if "seed" not in given:
        given["seed"] = 0
    return parse.settings(given)


def _stop(d: dict) -> tuple[str, ...]:
    stop = d.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 8 or not all(isinstance(s, str) and s for s in stops):
        raise parse.BadRequest("stop must be a non-empty string or a list of at most 8 of them")
    return tuple(parse.text(s, "stop", 500) for s in stops)


def _check_n(d: dict) -> None:
    if d.get("n", 1) != 1 or d.get("best_of", 1) != 1:
        raise parse.BadRequest("n and best_of must be 1 here (one completion a request)")


def _prompt_ids(explorer: Explorer, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return explorer.model.prompt_tokens(parse.text(prompt, "prompt"))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if len(prompt) > 100_000:
            raise parse.BadRequest("the prompt has more than 100000 token ids")
        return list(prompt)
    raise parse.BadRequest("prompt must be a string or a non-empty list of token ids (one prompt a request)")


def _completion_logprobs(model, records, offset0: int, echo_tokens=()) -> dict:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs ({text: logprob}), text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = offset0
    for text, lp, top in list(echo_tokens) + [(r.text, r.logprob, {a.text: a.logprob for a in r.top}) for r in records
                                              if not r.eog]:
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _echo(explorer: Explorer, ids: list[int], top: int) -> list[tuple]:
    """The prompt's tokens with their logprobs as `score` gives them (the first has none)."""
    from llamalens.looks.score import plan_windows, score_windows

    model = explorer.model
    windows = plan_windows(len(ids), explorer.held.n_ctx, "full", None, bos=False)
    scored = {t.position: t for t in explorer.call(lambda: score_windows(model, ids, 0, windows, top))}
    out = []
    for i, t in enumerate(ids):
        s = scored.get(i)
        out.append((model.piece(t, special=False).decode("utf-8", errors="replace"), s.logprob if s else None,
                    {a.text: a.logprob for a in s.top} if s else None))
    return out


def _usage(n_prompt: int, n_gen: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}


class _Answer:
    """One completion answered in OpenAI's shape (a chat completion or a text completion): its id and object, its
    choice, streamed as chunks or whole, logprobs when asked for, and the echoed prompt (text completions)."""

    def __init__(self, model, model_id: str, chat: bool, logprobs: bool, echo: list | None):
        self.model, self.chat, self.logprobs, self.echo = model, chat, logprobs, echo
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                     "model": model_id}
        self.obj = "chat.completion" if chat else "text_completion"

    def choice(self, records, text: str, finish, delta: bool) -> dict:
        lp = None
        if self.logprobs:
            lp = ({"content": [_chat_token(r) for r in records if not r.eog]} if self.chat else
                  _completion_logprobs(self.model, records, 0, self.echo or ()))
        if self.chat:
            msg = {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): msg, "logprobs": lp, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}

    async def chunks(self, events, box: list, n_prompt: int):
        """The streamed chunks: one a token, then the finish reason and the usage (or an error, ending it)."""
        obj = self.obj + (".chunk" if self.chat else "")
        async for ev in events:
            if ev["type"] == "token":
                r = ev["record"]
                yield dict(self.head, object=obj, choices=[self.choice([r], "" if r.eog else r.text, None, True)])
            elif ev["type"] == "error":
                yield {"error": {"message": ev["message"], "type": "server_error"}}
                return
            elif ev["type"] == "done":
                break
        job = box[0]
        await _wait(job)
        sample = sample_of(job)
        if sample is not None:
            yield dict(self.head, object=obj, choices=[self.choice([], "", _finish(sample.finish_reason), True)],
                       usage=_usage(n_prompt, len(sample.tokens)))

    def whole(self, sample, n_prompt: int) -> dict:
        """The whole answer of a finished completion (the echoed prompt's text before a text completion's)."""
        text = sample.text
        if self.echo is not None and not self.chat:
            text = "".join(t for t, _, _ in self.echo) + text
        return dict(self.head, object=self.obj,
                    choices=[self.choice(sample.tokens, text, _finish(sample.finish_reason), False)],
                    usage=_usage(n_prompt, len(sample.tokens)))


def routes(explorer: Explorer, handled, body, events_of, sse, error) -> list[Route]:
    model = explorer.model
    model_id = model.path.name

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "llamalens",
                                                         "created": int(model.path.stat().st_mtime)}]})

    async def _run(d: dict, ids: list[int], chat: bool, top: int, logprobs: bool, echo: list | None):
        s, stop = _settings(d), _stop(d)
        max_tokens = parse.integer(d.get("max_tokens", d.get("max_completion_tokens", 16)), "max_tokens", 1, MAX_TOKENS)
        answer = _Answer(model, model_id, chat, logprobs, echo)
        events, box = events_of(lambda emit: explorer.complete(ids, s, max_tokens, top, stop, emit))
        if d.get("stream"):
            return sse(answer.chunks(events, box, len(ids)), box, last="[DONE]")
        async for ev in events:
            if ev["type"] == "error":
                return error(400, ev["message"])
        job = box[0]
        await _wait(job)
        sample = sample_of(job)
        if sample is None:
            return error(500, f"the completion failed: {job.error}")
        return JSONResponse(answer.whole(sample, len(ids)))

    @handled
    async def completions(request: Request):
        d = await body(request)
        _check_n(d)
        ids = _prompt_ids(explorer, d.get("prompt"))
        n_lp = d.get("logprobs")
        top = 0 if n_lp is None else parse.integer(n_lp, "logprobs", 0, MAX_TOP)
        echo = None
        if d.get("echo"):
            from starlette.concurrency import run_in_threadpool

            echo = await run_in_threadpool(_echo, explorer, ids, top)
        return await _run(d, ids, False, top, n_lp is not None, echo)

    @handled
    async def chat_completions(request: Request):
        d = await body(request)
        _check_n(d)
        rendered = explorer.render_chat(d.get("messages"))
        ids = model.prompt_tokens(rendered.text)
        want = bool(d.get("logprobs"))
        top = parse.integer(d.get("top_logprobs", 0), "top_logprobs", 0, MAX_TOP) if want else 0
        return await _run(d, ids, True, top, want, None)

    return [Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"])]


def _chat_token(r) -> dict:
    b = list(bytes.fromhex(r.bytes))
    return {"token": r.text, "logprob": r.logprob, "bytes": b,
            "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": list(bytes.fromhex(a.bytes))} for a in r.top]}


def _finish(reason: str) -> str:
    return {"cancelled": "stop"}.get(reason, reason)


async def _wait(job) -> None:
    """Until the worker has finished the job (its result set)."""
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(job.done.wait)
