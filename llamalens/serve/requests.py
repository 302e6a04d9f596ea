"""JSON bodies of `llamalens serve`'s requests turned into typed specs, every field checked (type, range, size)
before the model sees it; a bad field is named in a clear 400."""

from __future__ import annotations

import dataclasses
import math

from llamalens.errors import InvalidInput, InvalidSettings
from llamalens.serve.explorer import MAX_FORCED, MAX_PROMPT_CHARS, MAX_TOKENS, MAX_TOP, BranchSpec, Explorer, \
    GenerationSpec
from llamalens.settings import SamplingSettings

SETTING_FIELDS = {f.name: f for f in dataclasses.fields(SamplingSettings)}
NOT_HERE = ("strategy", "beams", "length_penalty", "early_stopping", "num_return", "best_of", "best_of_by")


class BadRequest(InvalidInput):
    """A request's body is not what the endpoint takes."""


class TooLarge(BadRequest):
    """A request's body is larger than the server takes."""


def integer(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{name} must be an integer (got {value!r:.40})")
    if lo is not None and value < lo or hi is not None and value > hi:
        span = f"{lo} to {hi}" if lo is not None and hi is not None else f"at least {lo}" if hi is None else f"at most {hi}"
        raise BadRequest(f"{name} {value} is out of range ({span})")
    return value


def text(value, name: str, limit: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if len(value) > limit:
        raise BadRequest(f"{name} is {len(value)} characters long; the server takes at most {limit}")
    if any("\ud800" <= c <= "\udfff" for c in value):
        raise BadRequest(f"{name} holds a lone surrogate (not valid Unicode text)")
    return value


def settings(d) -> SamplingSettings:
    """SamplingSettings from a JSON object: {"preset": NAME} as a base, then fields by llamalens's names."""
    from llamalens.run.grid import PRESETS

    if d is None:
        return SamplingSettings()
    if not isinstance(d, dict):
        raise BadRequest("settings must be an object of sampler fields, e.g. {\"temperature\": 0.7}")
    d = dict(d)
    preset = d.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise BadRequest(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    base = dict(PRESETS[preset]) if preset else {}
    for k, v in d.items():
        if k not in SETTING_FIELDS or k in NOT_HERE:
            raise BadRequest(f"unknown sampler field {k!r}" + ("" if k not in NOT_HERE else
                             " (decoding strategies are for sweeps; the explorer samples token by token)"))
        if isinstance(v, float) and not math.isfinite(v):
            raise BadRequest(f"{k} must be a finite number")
        base[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
    if any(k in base for k in ("samplers", "dry_multiplier", "xtc_probability", "mirostat", "top_n_sigma")) \
            and "chain" not in base:
        base["chain"] = "llama.cpp"
    try:
        s = SamplingSettings(**base)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"settings: {e}") from None
    problems = s.problems()
    if problems:
        raise InvalidSettings("; ".join(problems))
    return s


def flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


def _common(d: dict) -> tuple[SamplingSettings, int, int]:
    return (settings(d.get("settings")), integer(d.get("max_tokens", 64), "max_tokens", 1, MAX_TOKENS),
            integer(d.get("top", 10), "top", 1, MAX_TOP))


def generation(explorer: Explorer, d: dict) -> GenerationSpec:
    """{prompt} or {chat: {system, messages}}, settings, max_tokens, top, name."""
    s, max_tokens, top = _common(d)
    name = text(d["name"], "name", 200) if d.get("name") else None
    exact = flag(d.get("exact", False), "exact")
    if d.get("chat") is not None:
        chat = d["chat"]
        if not isinstance(chat, dict):
            raise BadRequest("chat must be an object: {\"system\": \"...\", \"messages\": [{\"role\": \"user\", "
                             "\"content\": \"...\"}]}")
        rendered = explorer.render_chat(chat.get("messages"), chat.get("system"))
        return GenerationSpec(rendered.text, explorer.model.prompt_tokens(rendered.text), s, max_tokens, top, name,
                              rendered.to_dict(), exact)
    prompt = text(d.get("prompt", ""), "prompt")
    return GenerationSpec(prompt, explorer.model.prompt_tokens(prompt), s, max_tokens, top, name, None, exact)


def branch(explorer: Explorer, d: dict) -> BranchSpec:
    """{tree, branch, at, token | text}, settings, max_tokens, top."""
    s, max_tokens, top = _common(d)
    tree, parent = integer(d.get("tree"), "tree", 0), integer(d.get("branch"), "branch", 0)
    at = integer(d.get("at"), "at", 0)
    if (d.get("token") is None) == (d.get("text") is None):
        raise BadRequest("give the token to force (\"token\": id) or a continuation (\"text\": \"...\"), one of them")
    if d.get("token") is not None:
        forced = [integer(d["token"], "token", 0, explorer.model.n_vocab - 1)]
    else:
        forced = explorer.model.tokenize(text(d["text"], "text", 4000), add_bos=False, special=False)
        if not forced:
            raise BadRequest("the continuation is empty; type some text")
        if len(forced) > MAX_FORCED:
            raise BadRequest(f"the continuation is {len(forced)} tokens; a branch forces at most {MAX_FORCED}")
    return BranchSpec(tree, parent, at, forced, s, max_tokens, top, flag(d.get("exact", False), "exact"))


def position(d: dict) -> tuple:
    return (integer(d.get("tree"), "tree", 0), integer(d.get("branch"), "branch", 0), integer(d.get("at"), "at", 0),
            settings(d.get("settings")), integer(d.get("top", 10), "top", 1, MAX_TOP))
