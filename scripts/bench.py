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
  1  single-sequence low-level decode (= case a's speed, 32 tokens) for the sweep ratio
Targets: b/a >= 0.9, b/c >= 5, m < 1.5 GB; sweep >= 30x naive and >= 2.5x single-sequence decode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

PROMPT = "The history of the printing press begins"
GRID = dict(temperature=[0.2, 0.7, 1.0], top_k=[10, 40], top_p=[0.5, 0.9, 0.99], min_p=[0.0, 0.05])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def grid_settings(seeds=(1, 2)):
    from llamalens.settings import SamplingSettings

    keys = list(GRID)
    for values in itertools.product(*GRID.values()):
        for seed in seeds:
            yield SamplingSettings(**dict(zip(keys, values)), seed=seed)


def case_lowlevel(model_path, n_tokens, threads):
    """llama.cpp's own loop: decode one token, sample it with the native chain, repeat."""
    import llama_cpp as L

    from llamalens.runtime import Model, ModelOptions
    from llamalens.settings import SamplingSettings, build_chain

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    tokens = m.prompt_tokens(PROMPT)
    with m.context(n_ctx=512) as ctx:
        chain = build_chain(SamplingSettings(seed=1), m.n_vocab)
        ctx.prefill(tokens)
        t0 = time.perf_counter()
        pos = len(tokens)
        for _ in range(n_tokens):
            tok = L.llama_sampler_sample(chain, ctx.ptr, -1)
            ctx.decode([tok], [pos], [0], [1])
            pos += 1
        dt = time.perf_counter() - t0
        L.llama_sampler_free(chain)
    return {"tok_s": n_tokens / dt}


def case_llamalens(model_path, n_tokens, threads, ctx_len=512):
    from llamalens.engine import generate
    from llamalens.runtime import Model, ModelOptions
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


def case_sweep(model_path, n_tokens, threads, parallel=32):
    from llamalens.engine import Engine, Request
    from llamalens.runtime import Model, ModelOptions

    m = Model(model_path, ModelOptions(ctx=512, threads=threads, flash_attn="auto"))
    reqs = [Request(PROMPT, s, n_tokens, 10, key=i) for i, s in enumerate(grid_settings())]
    t0 = time.perf_counter()
    n = sum(len(s.tokens) for s in Engine(m, parallel).run(reqs))
    dt = time.perf_counter() - t0
    return {"tok_s": n / dt, "tokens": n, "samples": len(reqs)}


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


CASES = {
    "a": lambda p, n, t: case_lowlevel(p, n, t),
    "b": lambda p, n, t: case_llamalens(p, n, t),
    "c": lambda p, n, t: case_naive(p, n, t),
    "m": lambda p, n, t: case_llamalens(p, n, t, ctx_len=8192),
    "s": lambda p, n, t: case_sweep(p, 32, t),
    "n": lambda p, n, t: case_naive_grid(p, 32, t),
    "1": lambda p, n, t: case_lowlevel(p, 32, t),
}


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
    ap.add_argument("--cases", default="abcms1n")
    ap.add_argument("--model", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.model_path, args.tokens, args.threads)
    from llamalens.models import resolve_model

    path = resolve_model(args.model)
    print(f"model {path.name}, {args.tokens} tokens, {args.threads} threads, {args.rounds} rounds", file=sys.stderr)
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for case in args.cases:
            res = run_case(case, path, args.tokens, args.threads)
            print(f"  round {r + 1} case {case}: {res}", file=sys.stderr)
            if case not in best or res["tok_s"] > best[case]["tok_s"]:
                best[case] = res
    print("\ncase                                             tokens/s   peak RSS")
    names = {"a": "a  low-level decode, no statistics", "b": "b  llamalens generate --logprobs 10",
             "c": "c  create_completion(logprobs=10)", "m": "m  llamalens generate --ctx 8192",
             "s": "s  sweep, 72 samples batched", "n": "n  naive create_completion loop, grid",
             "1": "1  single-sequence low-level decode"}
    for c in args.cases:
        print(f"{names[c]:<48} {best[c]['tok_s']:8.1f}   {best[c]['rss_mb']:7.0f} MB")
    ratio = lambda x, y: best[x]["tok_s"] / best[y]["tok_s"] if x in best and y in best else float("nan")  # noqa
    print("")
    print(f"b/a  = {ratio('b', 'a'):.2f}   (target >= 0.9)")
    print(f"b/c  = {ratio('b', 'c'):.1f}    (target >= 5)")
    if "m" in best:
        print(f"peak RSS at --ctx 8192 = {best['m']['rss_mb']:.0f} MB (target < 1536 MB)")
    print(f"sweep/naive  = {ratio('s', 'n'):.1f}   (target >= 30)")
    print(f"sweep/single = {ratio('s', '1'):.2f}  (target >= 2.5)")


if __name__ == "__main__":
    main()
