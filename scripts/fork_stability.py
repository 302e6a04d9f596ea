"""How stable `fork`'s verdicts are from seed to seed, for a choice of --samples (docs/commands.md cites it).

    python scripts/fork_stability.py --samples 4,8 --seeds 0,1,2 [-n 24] [PROMPT] [--options A,B]

The base path stays greedy (the same tokens every time); only the continuations' seeds change (settings.seed
+ 1 + j, as `fork` plans them). For each --samples it prints each seed's forking tokens (with the jump and its
noise level) and, over the positions, the share whose verdict (forking or not) every seed agrees on.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

README_PROMPT = "Q: Is a bat a bird or a mammal? A:"
README_OPTIONS = "bird,mammal"


def verdicts(model, prompt: str, options: tuple[str, ...], samples: int, seed: int,
             max_tokens: int) -> tuple[list, int, float]:
    """(forking jumps, analysed positions, seconds) of one fork run with these continuation seeds."""
    from llamalens.run.fork import ForkSpec, OutcomeSpec, execute_fork, load_fork, start_fork
    from llamalens.settings import SamplingSettings
    from llamalens.store import Store

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "runs.db")
        spec = ForkSpec(prompt, SamplingSettings(seed=seed), OutcomeSpec("options", options=options), samples=samples,
                        max_tokens=max_tokens)
        run_id, _ = start_fork(model, store, spec)
        execute_fork(model, store, run_id)
        a = load_fork(store, run_id).analysis
        return list(a.forking), len(a.positions), time.perf_counter() - t0


def main() -> None:
    from llamalens.modelfiles.find import default_model_path
    from llamalens.core.runtime import Model, ModelOptions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", default=README_PROMPT)
    ap.add_argument("--options", default=README_OPTIONS)
    ap.add_argument("-n", "--max-tokens", type=int, default=12)
    ap.add_argument("--samples", default="4,8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    options = tuple(o.strip() for o in args.options.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    with Model(default_model_path(), ModelOptions(threads=args.threads)) as model:
        for samples in (int(s) for s in args.samples.split(",")):
            runs = {}
            for seed in seeds:
                runs[seed] = forks, _, secs = verdicts(model, args.prompt, options, samples, seed, args.max_tokens)
                said = ", ".join(f"{j.position} (TV {j.size:.2f} > {j.noise95:.2f})" for j in forks) or "none"
                print(f"samples {samples:3d} seed {seed}: forking at {said} ({secs:.0f} s)", flush=True)
            n = max(r[1] for r in runs.values())
            agree = sum(len({p in {j.position for j in r[0]} for r in runs.values()}) == 1 for p in range(n)) / n
            print(f"samples {samples:3d}: {agree:.0%} of {n} positions get the same verdict from every seed", flush=True)


if __name__ == "__main__":
    main()
