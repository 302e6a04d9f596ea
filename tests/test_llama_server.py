"""llama-server, started for real by tests/server.py, as the reference for llama.cpp's own behaviour.

The parity proof of the llama.cpp chain: for each setting, llamalens's `llama.cpp` chain (SamplingSettings(chain=
"llama.cpp", ...)) at llama-server's context options (settings.SERVER_CONTEXT) picks the same token ids
as llama-server given the same prompt tokens, settings and seed, and gives the same top-N probabilities:
`n_probs` (softmax of the raw logits) and `post_sampling_probs` (the candidates' p after the chain), each
within 1e-5 (measured differences are given at TOL).

Documented differences, and how the test meets them:
- llama-server tokenizes a text prompt itself; the test sends the token ids llamalens made, so the two
  decode the same tokens (tokenization is not what this test is about).
- llama-server reuses a cached prompt across requests; "cache_prompt": false makes every request
  prefill from scratch as llamalens does.
- llama-server's n_probs are a float32 softmax summed over the whole vocabulary (262,144 terms) in the
  order std::partial_sort leaves it, whose sum is off by up to 2.6e-4 of itself (measured); llamalens's raw
  probabilities are exact (float64). So the 1e-5 check is on p_i / p_top, where the sum cancels (it
  compares the raw logits), and the probabilities themselves are checked within 1e-3. post_sampling_probs
  come from the same native chain code on the same candidate array and are checked within 1e-5 as they are.
- On a model with sliding-window attention and a small SWA cache (llama-server's default) llama-server
  decodes the last 4 + ubatch and the last 4 prompt tokens in batches of their own; other batch shapes give
  other logits (0.07 nats on the default model), so SERVER_CONTEXT includes server_prefill="on".
- llama-server reports probabilities only for tokens after which the text is whole UTF-8 (a byte token
  that leaves a character open gets none: process_token adds them with the text). The test takes the token
  ids from "return_tokens" and compares probabilities at the positions llama-server reports
  (`reported_positions`, its validate_utf8 written out), checking those positions' ids too.
- llama-server's context is -c cells for its one slot (-np 1); llamalens's context is rounded to what the
  request needs. Masked KV cells do not change the logits beyond float rounding (the 1e-5 bound covers it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from server import llama_server

from llamalens.core.engine import Engine, Request
from llamalens.core.runtime import Model
from llamalens.core.sampler import Sampler, post_sampling
from llamalens.settings import SERVER_CONTEXT, ModelOptions, SamplingSettings

N_PROBS = 5
N_PREDICT = 8
# measured: up to 1.2e-7 on the tiny model (all 11 cases) and 1.8e-7 on the default model (server defaults, DRY; the
# other cases there ~1e-6 or less when first measured): bound 1e-5
TOL = 1e-5
PROMPT = "The cat sat on the mat. The cat sat on the mat. The cat sat on the"

# name -> (llamalens settings beyond chain="llama.cpp", the same as llama-server request fields)
CASES = {
    "server defaults": ({}, {}),
    "DRY on": (dict(dry_multiplier=0.8, dry_allowed_length=1, temperature=0.0),
               dict(dry_multiplier=0.8, dry_allowed_length=1, temperature=0.0)),
    "XTC seeded": (dict(xtc_probability=0.5, xtc_threshold=0.05, top_k=0, top_p=1.0, min_p=0.0, seed=7),
                   dict(xtc_probability=0.5, xtc_threshold=0.05, top_k=0, top_p=1.0, min_p=0.0, seed=7)),
    "top-n-sigma": (dict(top_n_sigma=1.0, top_k=0, seed=3), dict(top_n_sigma=1.0, top_k=0, seed=3)),
    "mirostat 2": (dict(mirostat=2, mirostat_tau=3.0, seed=5), dict(mirostat=2, mirostat_tau=3.0, seed=5)),
    "logit bias": (dict(logit_bias=((" mat", -5.0), (1000, 3.0)), temperature=0.0),
                   dict(logit_bias=[[" mat", -5.0], [1000, 3.0]], temperature=0.0)),
    "samplers order": (dict(samplers="min_p;temperature;top_k", min_p=0.1, temperature=1.5, seed=11),
                       dict(samplers=["min_p", "temperature", "top_k"], min_p=0.1, temperature=1.5, seed=11)),
    "dynatemp + penalties": (dict(dynatemp_range=0.5, repeat_penalty=1.3, presence_penalty=0.2, seed=2),
                             dict(dynatemp_range=0.5, repeat_penalty=1.3, presence_penalty=0.2, seed=2)),
}
# on the tiny model (each gemma case costs seconds of two processes on the same cores): Mirostat 1, adaptive-p
# (named in the order, as llama-server takes it) and ignore_eos against a logit bias that would end the text at
# once (the tiny GGUF's EOS is id 2): both ban every end-of-generation token, so both generate N_PREDICT tokens
TINY_CASES = {
    "mirostat 1": (dict(mirostat=1, mirostat_tau=4.0, mirostat_eta=0.2, seed=6),
                   dict(mirostat=1, mirostat_tau=4.0, mirostat_eta=0.2, seed=6)),
    "adaptive-p": (dict(samplers="top_k;min_p;temperature;adaptive_p", adaptive_target=0.3, adaptive_decay=0.8,
                        top_k=0, seed=8),
                   dict(samplers=["top_k", "min_p", "temperature", "adaptive_p"], adaptive_target=0.3,
                        adaptive_decay=0.8, top_k=0, seed=8)),
    "ignore_eos": (dict(ignore_eos=True, logit_bias=((2, 15.0),), temperature=0.0),
                   dict(ignore_eos=True, logit_bias=[[2, 15.0]], temperature=0.0)),
}


def _server_args(ctx: int) -> list[str]:
    return ["--ctx-size", str(ctx), "--parallel", "1", "--no-warmup"]


@pytest.fixture(scope="module")
def gemma_server(gemma_path):
    with llama_server(gemma_path, *_server_args(512), timeout=120) as srv:
        yield srv


@pytest.fixture(scope="module")
def gemma_server_ctx(gemma_path):
    with Model(gemma_path, ModelOptions(ctx=512, **SERVER_CONTEXT)) as m:
        yield m


@pytest.fixture(scope="module")
def tiny_server(tiny_path):
    with llama_server(tiny_path, *_server_args(256), timeout=60) as srv:
        yield srv


@pytest.fixture(scope="module")
def tiny_server_ctx(tiny_path):
    with Model(tiny_path, ModelOptions(ctx=256, **SERVER_CONTEXT)) as m:
        yield m


def _server_run(srv, prompt_ids: list[int], fields: dict, post: bool) -> tuple[list[int], list[dict]]:
    """(generated token ids, completion_probabilities) of one llama-server /completion."""
    body = {"prompt": prompt_ids, "n_predict": N_PREDICT, "n_probs": N_PROBS, "cache_prompt": False,
            "post_sampling_probs": post, "seed": 0, "return_tokens": True, **fields}
    reply = srv.post("/completion", body)
    return reply["tokens"], reply["completion_probabilities"]


def _utf8_cut(text: bytes) -> bool:
    """llama-server's validate_utf8 (server-common.cpp): does the text end inside a multi-byte character?"""
    for i in range(1, min(4, len(text)) + 1):
        c = text[-i]
        if (c & 0xE0) == 0xC0 and i < 2 or (c & 0xF0) == 0xE0 and i < 3 or (c & 0xF8) == 0xF0 and i < 4:
            return True
    return False


def reported_positions(model: Model, tokens: list[int]) -> list[int]:
    """The generated positions llama-server reports probabilities for: it skips a token whose text leaves the
    output inside a UTF-8 character (process_token adds its probabilities only once the text is whole)."""
    text, out = b"", []
    for i, t in enumerate(tokens):
        text += model.piece(t, special=False)
        if not _utf8_cut(text):
            out.append(i)
    return out


def _replay(model: Model, settings: SamplingSettings, prompt_ids: list[int], tokens: list[int]):
    """llamalens's chain on llamalens's logits, teacher-forced with `tokens`: (chosen id, post-sampling top-N)
    per position, exactly what Engine._step does (Sampler.for_sequence, apply, accept)."""
    out = []
    with model.context(n_ctx=512) as ctx, Sampler.for_sequence(settings, model, prompt_ids) as chain:
        row = ctx.prefill(prompt_ids)
        for i, tok in enumerate(tokens):
            survivors, sel = chain.apply(row.copy())
            out.append((int(survivors["id"][sel]), post_sampling(survivors, N_PROBS)))
            chain.accept(tok)
            if i + 1 < len(tokens):
                ctx.decode([tok], [len(prompt_ids) + i], [0], [1])
                row = ctx.logits(0)
    return out


def _check(model: Model, srv, name: str):
    ours, theirs = {**CASES, **TINY_CASES}[name]
    settings = SamplingSettings(chain="llama.cpp", **ours).validate()
    prompt_ids = model.prompt_tokens(PROMPT)
    server_ids, raw = _server_run(srv, prompt_ids, theirs, post=False)
    again, post = _server_run(srv, prompt_ids, theirs, post=True)
    assert again == server_ids, "llama-server itself is not deterministic for this seed"

    sample = next(iter(Engine(model, 1).run([Request(PROMPT, settings, N_PREDICT, N_PROBS)])))
    assert [t.id for t in sample.tokens] == server_ids, name
    at = reported_positions(model, server_ids)
    assert [server_ids[i] for i in at] == [p["id"] for p in raw] == [p["id"] for p in post], name
    worst = 0.0
    replay = _replay(model, settings, prompt_ids, server_ids)
    for t, p in zip([sample.tokens[i] for i in at], raw):  # n_probs: softmax of the raw logits
        assert [a.id for a in t.top] == [q["id"] for q in p["top_logprobs"]], name
        top_ours, top_theirs = t.top[0].logprob, p["top_logprobs"][0]["logprob"]
        for a, q in zip(t.top, p["top_logprobs"]):
            # p_i / p_top: the normalizer cancels, so this compares the raw logits themselves
            worst = max(worst, abs(math.exp(a.logprob - top_ours) - math.exp(q["logprob"] - top_theirs)))
            # the probabilities themselves: llamalens's are exact (float64); llama-server sums exp() over the
            # whole vocabulary in one float32 accumulator, off by up to 2.6e-4 of the sum (measured): 1e-3
            assert abs(math.exp(a.logprob) - math.exp(q["logprob"])) < 1e-3, name
    assert [chosen for chosen, _ in replay] == server_ids, name
    for (_, ours_top), p in zip([replay[i] for i in at], post):
        theirs_top = [(q["id"], q["prob"]) for q in p["top_probs"]]
        assert [i for i, _ in ours_top] == [i for i, _ in theirs_top], name
        worst = max(worst, max((abs(a - b) for (_, a), (_, b) in zip(ours_top, theirs_top)), default=0.0))
    assert worst < TOL, f"{name}: largest probability difference {worst:.2e}"
    return worst


# adaptive-p on the default model too (~14 s here under load; Mirostat 1 passed there as well, by hand, but took
# 55 s under load, over this test-time budget: the tiny model's case runs in CI)
@pytest.mark.parametrize("name", list(CASES) + ["adaptive-p"])
def test_llama_cpp_chain_equals_llama_server(gemma_server_ctx, gemma_server, name):
    _check(gemma_server_ctx, gemma_server, name)


@pytest.mark.parametrize("name", list(CASES) + list(TINY_CASES))
def test_llama_cpp_chain_equals_llama_server_on_the_tiny_model(tiny_server_ctx, tiny_server, name):
    """The same on the tiny GGUF (no SWA, 312 tokens: token 1000 of the logit-bias case is outside its
    vocabulary, and both drop it), and the cases only run here (TINY_CASES)."""
    _check(tiny_server_ctx, tiny_server, name)
    if name == "ignore_eos":  # the bias would have ended the text at its first token: the ban won
        ours, _ = TINY_CASES[name]
        free = SamplingSettings(chain="llama.cpp", **dict(ours, ignore_eos=False))
        ended = next(iter(Engine(tiny_server_ctx, 1).run([Request(PROMPT, free, N_PREDICT, 1)])))
        assert ended.finish_reason == "stop" and len(ended.tokens) == 1 and ended.tokens[0].id == 2


def test_server_defaults_are_the_llama_cpp_chain_defaults(gemma_server):
    """The llama.cpp chain's defaults are llama-server's own (its /props), name for name."""
    params = gemma_server.get("/props")["default_generation_settings"]["params"]
    s = SamplingSettings(chain="llama.cpp")
    names = {"typical_p": "typical_p", "repeat_last_n": "penalty_last_n", "samplers": "samplers"}
    for key in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty", "repeat_last_n", "dry_multiplier", "dry_base", "dry_allowed_length",
                "dry_penalty_last_n", "xtc_probability", "xtc_threshold", "top_n_sigma", "dynatemp_range",
                "dynatemp_exponent", "mirostat", "mirostat_tau", "mirostat_eta", "adaptive_target",
                "adaptive_decay", "min_keep", "ignore_eos"):
        ours = getattr(s, names.get(key, key))
        assert np.float32(ours) == np.float32(params[key]), key
    assert s.samplers == ";".join(params["samplers"])


def test_server_helper_starts_answers_and_stops(tiny_path):
    with llama_server(tiny_path, "--ctx-size", "256", "--parallel", "1", timeout=60) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        assert srv.get("/health")["status"] == "ok"
        # greedy and seeded: a sampled byte token that leaves UTF-8 open would get no probabilities
        reply = srv.post("/completion", {"prompt": "the cat", "n_predict": 1, "n_probs": 3, "temperature": 0,
                                         "seed": 0, "return_tokens": True})
        assert len(reply["tokens"]) == 1
        assert all(len(p["top_logprobs"]) == 3 for p in reply["completion_probabilities"])
        proc = srv.proc
    assert proc.poll() is not None  # stopped on the way out
