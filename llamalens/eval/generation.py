"""lm-evaluation-harness's generate_until requests on llamalens's decode engine.

A request is (context, gen_kwargs). gen_kwargs as lm-eval's tasks write them:
  until          a string or a list of them: the text ends before the first one found (end-of-generation
                 tokens end it too)
  max_gen_toks   the most tokens generated (default 256, lm-eval's)
  do_sample      false (the default): greedy; true: sampling at `temperature` (default 1.0)
  temperature    0 is greedy; top_k, top_p, min_p as in Hugging Face's generate (off unless given)
  seed           the sampling seed (default 1234, lm-eval's)
Any other key is refused, naming it: a setting that would be silently ignored changes what is measured.
The context is cut from the left to leave max_gen_toks tokens of room, as lm-eval's backends do.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamalens.errors import InvalidInput
from llamalens.core.runtime import Model
from llamalens.eval.lm_tokens import text_tokens
from llamalens.settings import SamplingSettings

GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "min_p", "seed")
MAX_GEN_TOKS = 256
SEED = 1234


@dataclass(frozen=True)
class Generation:
    """One generate_until request, checked: its prompt tokens, settings, stops and token budget."""

    prompt: str
    tokens: tuple[int, ...]
    settings: SamplingSettings
    until: tuple[str, ...]
    max_tokens: int
    truncated: bool


def _until(value, where: str) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if not all(isinstance(s, str) for s in stops):
        raise InvalidInput(f"{where}: until={value!r:.80} must be a string or a list of strings")
    return tuple(s for s in stops if s)  # lm-eval skips empty stop strings


def settings_of(kwargs: dict, where: str) -> tuple[SamplingSettings, tuple[str, ...], int]:
    """(sampling settings, stop strings, max tokens) of one request's gen_kwargs."""
    unknown = sorted(set(kwargs) - set(GEN_KEYS))
    if unknown:
        raise InvalidInput(f"{where}: generation setting(s) {', '.join(unknown)} are not supported by llamalens's "
                           f"backend (it takes {', '.join(GEN_KEYS)}); remove them from the task's generation_kwargs")
    max_tokens = kwargs.get("max_gen_toks", MAX_GEN_TOKS)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidInput(f"{where}: max_gen_toks={max_tokens!r} must be a positive integer")
    temperature = float(kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0))
    if not kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    settings = SamplingSettings(temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
                                top_p=float(kwargs.get("top_p") or 1.0), min_p=float(kwargs.get("min_p") or 0.0),
                                seed=int(kwargs.get("seed", SEED)))
    problems = settings.problems()
    if problems:
        raise InvalidInput(f"{where}: {'; '.join(problems)}")
    return settings, _until(kwargs.get("until"), where), max_tokens


def plan(model: Model, context: str, kwargs: dict, max_length: int, where: str) -> Generation:
    settings, until, max_tokens = settings_of(dict(kwargs or {}), where)
    room = max_length - max_tokens
    if room < 1:
        raise InvalidInput(f"{where}: max_gen_toks {max_tokens} leaves no room for the context in --ctx {max_length}; "
                           "raise --ctx")
    toks = text_tokens(model, context, bos=True)
    return Generation(context, tuple(toks[-room:]), settings, until, max_tokens, len(toks) > room)


def generate_samples(model: Model, gens: list[Generation], parallel: int, on_done=None) -> list:
    """The engine's Samples of these generations (text and token records), in order: `parallel` sequences decoded
    together (1: each alone)."""
    from llamalens.core.engine import Engine, Request

    reqs = [Request(g.prompt, g.settings, g.max_tokens, 1, g.until, key=i, prompt_tokens=list(g.tokens))
            for i, g in enumerate(gens)]
    out: list = [None] * len(gens)
    for done, sample in enumerate(Engine(model, max(1, parallel)).run(reqs), 1):
        out[sample.key] = sample
        if on_done:
            on_done(done)
    return out


def generate(model: Model, gens: list[Generation], parallel: int, on_done=None) -> list[str]:
    """The texts of these generations, in order."""
    return [s.text for s in generate_samples(model, gens, parallel, on_done)]
