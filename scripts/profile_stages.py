#!/usr/bin/env python
"""Where a llamalens command's time goes, per stage: wall time and this thread's CPU time (thread_time, which
other processes' load moves less than the wall clock).

    .venv/bin/python scripts/profile_stages.py sweep "The history of the printing press begins" -t 1.0 \\
        --seeds 32 -n 32 --parallel 32 --threads 1 --ctx 128 --store /tmp/runs.db

Stages: decode (Context.decode, in the engine and separately in the noise floor), chain (Sampler.apply, and
Sampler.choose, the engine's pick, with its dist_select apart), stats (block_stats once per decode step; per
token: for_token and the sampled logprob), records (Engine._record), store (Store.save_sample), startup
(memory.checked_load: header + model load), the noise floor (its re-decodes, and where the tree has it the
lookup of a reusable one around them). Prints one JSON object {stage: [wall_s, cpu_s, calls]} on stderr at
the end. It wraps the functions in place: nothing else of the command changes.

It profiles an older tree of llamalens too, in this venv (stages that tree lacks are skipped), for a before and
after on one host: `git archive OLD llamalens | tar -x -C /tmp/old`, then
`PYTHONPATH=/tmp/old .venv/bin/python scripts/profile_stages.py sweep ...` (PYTHONPATH comes before the
venv's install of the checkout).
"""

from __future__ import annotations

import json
import sys
import time
import importlib
from collections import defaultdict

import llamalens.core.engine as engine
import llamalens.modelfiles.gguf_header as gguf_file
import llamalens.modelfiles.memory as memory
import llamalens.core.runtime as runtime
import llamalens.core.sampler as sampler
import llamalens.core.stats as stats
import llamalens.store as store

sweep = importlib.import_module("llamalens.run.sweep")  # `import llamalens.run.sweep as m` gives ll.sweep (the API call)
noise_mod = importlib.import_module("llamalens.run.noise")

ACC: dict[str, list] = defaultdict(lambda: [0.0, 0.0, 0])
IN_NOISE = [False]


def wrap(owner, name: str, label: str, classmethod_: bool = False) -> None:
    f = getattr(owner, name, None)
    if f is None:  # an older tree without this stage
        print(f"(no {getattr(owner, '__name__', owner)}.{name} here: not timed)", file=sys.stderr)
        return
    raw = f.__func__ if classmethod_ else f

    def timed(*a, **k):
        lab = label + (" (noise floor)" if IN_NOISE[0] and label == "decode" else "")
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return raw(*a, **k)
        finally:
            x = ACC[lab]
            x[0] += time.perf_counter() - t0
            x[1] += time.thread_time() - c0
            x[2] += 1
    setattr(owner, name, classmethod(timed) if classmethod_ else timed)


def main() -> None:
    wrap(runtime.Context, "decode", "decode")
    wrap(sampler.Sampler, "apply", "chain")
    wrap(sampler.Sampler, "choose", "chain (the engine's pick, sampled logprob included)")
    wrap(sampler, "dist_select", "  of which dist_select (numpy)")
    wrap(engine, "block_stats", "stats")
    wrap(sampler, "sampled_logprob", "stats per token")
    wrap(stats.RowStats, "for_token", "stats per token")
    wrap(stats.RowStats, "top_k_list", "chain prefilter (top_k_list)")
    wrap(engine.Engine, "_picks", "picks (chain + sampled logprob, all sequences of a step)")
    wrap(engine.Engine, "_record", "records (accept, for_token, TokenRecord)")
    wrap(store.Store, "save_sample", "store")
    wrap(stats.RowStats, "of", "RowStats.of (one row's statistics; the noise floor's, or in older trees every "
         "token's)", classmethod_=True)
    wrap(engine.Engine, "_step", "Engine._step (older trees: a token's chain, stats and record)")
    wrap(memory, "checked_load", "startup: model load + header")
    wrap(gguf_file, "read_header", "startup: header")
    # the noise floor's re-decodes: run.noise.noise_floor, which sweep_noise calls (the lookup of a reusable one
    # around it); older trees call noise_floor from run.sweep's own namespace
    owner = sweep if hasattr(sweep, "noise_floor") else noise_mod
    noise_floor, loop = owner.noise_floor, engine.Engine._loop

    def noise(*a, **k):
        IN_NOISE[0] = True
        t0 = time.perf_counter()
        try:
            return noise_floor(*a, **k)
        finally:
            IN_NOISE[0] = False
            ACC["noise floor (total)"][0] += time.perf_counter() - t0

    if hasattr(sweep, "sweep_noise"):
        wrap(sweep, "sweep_noise", "noise floor, measured or reused (total)")

    def timed_loop(self, *a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        yield from loop(self, *a, **k)
        ACC["engine loop (total)"][0] += time.perf_counter() - t0
        ACC["engine loop (total)"][1] += time.thread_time() - c0

    owner.noise_floor, engine.Engine._loop = noise, timed_loop
    from llamalens.cli import main as cli

    t0 = time.perf_counter()
    try:
        cli(sys.argv[1:], standalone_mode=False)
    finally:
        ACC["whole command"][0] = time.perf_counter() - t0
        print(json.dumps(ACC), file=sys.stderr)


if __name__ == "__main__":
    main()
