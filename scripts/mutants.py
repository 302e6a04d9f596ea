#!/usr/bin/env python3
"""A mutation check: put one plausible bug at a time into a copy of the tree, run the tests that should catch it,
and report which bugs survive (the tests passed with the bug in).

    .venv/bin/python scripts/mutants.py                 every mutant, then the summary
    .venv/bin/python scripts/mutants.py --list          the mutants and the tests each one runs
    .venv/bin/python scripts/mutants.py beam-bound-sign best-of-mean-inverted    only these
    .venv/bin/python scripts/mutants.py --baseline      also run each mutant's tests on the unchanged copy
    .venv/bin/python scripts/mutants.py --tests-from main   the bugs against an older suite: main's tests/,
                                                        each mutant's `before` files (what guarded that code then)

Each mutant is an exact text replacement that must occur once in its file (so a refactor that moves the code
makes the mutant fail loudly as "stale" rather than pass silently). The copy holds the working tree's files
(the .venv and .tools links included), so it runs with the same interpreter and the built C kernel; the tests
run with CI=true and PYTHONPATH at the copy. Exit status 1 when any mutant survives or is stale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file, relative to the root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: node ids or files, with -k where useful
    why: str
    before: tuple[str, ...] = ()  # with --tests-from: the older suite's files that guard this code


BEAM_REF = "tests/test_beam_reference.py"
EFFECTS = "tests/test_option_effects.py"
MUTANTS = [
    Mutant("beam-bound-sign", "llamalens/core/beam.py",
           "best_sum / (length ** s.length_penalty)", "best_sum / (length ** -s.length_penalty)",
           (BEAM_REF + "::test_beam_search_equals_an_independent_beam_search",),
           "the early-stopping bound divides by length ** -alpha", ("tests/test_decoding.py", "-m", "not slow")),
    Mutant("beam-eog-in-length", "llamalens/core/beam.py",
           "hypothesis_score(total, len(beams[b].records), settings.length_penalty)",
           "hypothesis_score(total, len(beams[b].records) + 1, settings.length_penalty)",
           (BEAM_REF + "::test_beam_search_equals_an_independent_beam_search",),
           "a finished hypothesis's score counts its end-of-generation token in the length",
           ("tests/test_decoding.py", "-m", "not slow")),
    Mutant("beam-finished-beyond-first-B", "llamalens/core/beam.py",
           "if rank >= n_beams:", "if rank >= 2 * n_beams:",
           (BEAM_REF + "::test_beam_search_equals_an_independent_beam_search",),
           "an end-of-generation candidate finishes a hypothesis from any of the 2B ranks", ("tests/test_decoding.py", "-m", "not slow")),
    Mutant("beam-never-uses-cur-len", "llamalens/core/beam.py",
           'length = max_len if (s.early_stopping == "never" and s.length_penalty > 0) else cur_len',
           "length = cur_len",
           (BEAM_REF + "::test_beam_search_equals_an_independent_beam_search",),
           "early_stopping never bounds with the current length, like false", ("tests/test_decoding.py", "-m", "not slow")),
    Mutant("best-of-mean-inverted", "llamalens/core/strategies.py",
           'return -(s if by == "sum" else (s / n if n else -math.inf))',
           'return -(s if by == "sum" else -(s / n if n else -math.inf))',
           (BEAM_REF + "::test_best_of_n_winner_by_sum_and_by_mean",),
           "best-of ranked by mean picks the worst mean", ("tests/test_decoding.py", "-m", "not slow")),
    Mutant("metrics-mean-without-eog", "llamalens/core/strategies.py",
           "mean = seq / n if n else float(\"nan\")", "mean = seq / max(len(text_ids), 1) if n else float(\"nan\")",
           (BEAM_REF + "::test_best_of_n_winner_by_sum_and_by_mean",),
           "the mean logprob divides by the text tokens only (end-of-generation left out of the count)",
           ("tests/test_decoding.py", "-m", "not slow")),
    Mutant("map-colours-shifted", "llamalens/reports/plots.py",
           "    for c, colour in colours.items():\n        m = cats == c",
           "    for c, colour in zip(colours, list(colours.values())[1:] + list(colours.values())[:1]):\n"
           "        m = cats == c",
           ("tests/test_embed_map.py", "-k", "colour"),
           "the map's points take another category's colour", ("tests/test_embed_map.py", "-m", "not slow")),
    Mutant("map-legend-sorted", "llamalens/reports/plots.py",
           "names = list(dict.fromkeys(categories))", "names = sorted(set(categories))",
           ("tests/test_embed_map.py", "-k", "colour"),
           "categories coloured and listed alphabetically, not in order of first appearance",
           ("tests/test_embed_map.py", "-m", "not slow")),
    Mutant("ray-saves-twice", "llamalens/run/ray.py",
           "                for result in results:\n                    save(result)",
           "                for result in results:\n                    save(result)\n                    save(result)",
           ("tests/test_ray.py", "-k", "progress_counts"),
           "every result a Ray worker returns is saved twice (8/4 sequences, doubled tok/s)", ("tests/test_ray.py",)),
    Mutant("noise-p95-is-p80", "llamalens/run/noise.py",
           '"p95_abs_dlogprob": float(np.quantile(d, 0.95))', '"p95_abs_dlogprob": float(np.quantile(d, 0.80))',
           ("tests/test_sweep.py", "-k", "noise_floor_figures or default_model_noise_floor_claim"),
           "the noise floor's 95th percentile is the 80th", ("tests/test_sweep.py", "-k", "default_model_noise")),
    Mutant("next-grammar-tempered-mass", "llamalens/core/grammar.py",
           "        row = ctx.prefill(tokens).astype(np.float64)\n    lp = log_softmax(row)",
           "        row = ctx.prefill(tokens).astype(np.float64)\n    lp = log_softmax(row / 0.8)",
           ("tests/test_grammar.py", "-k", "prefix_mask"),
           "next --grammar measures the removed mass at the default temperature, not on the raw distribution",
           ("tests/test_grammar.py",)),
    Mutant("dry-without-the-prompt", "llamalens/core/sampler.py",
           "            for t in prompt_tokens:\n                sampler.accept(t)",
           "            for t in prompt_tokens[:0]:\n                sampler.accept(t)",
           ("tests/test_sampler_view.py", "-k", "numpy_dry"),
           "the llama.cpp chain's DRY and penalties do not see the prompt during generation",
           ("tests/test_sampler_view.py", "tests/test_llama_cpp_chain.py")),
    Mutant("fork-outcome-without-prefix", "llamalens/run/fork.py",
           "return (head + forced_bytes + cont_bytes)", "return (forced_bytes + cont_bytes)",
           ("tests/test_fork.py", "-k", "declared"),
           "a continuation's outcome is read from its forced token on, without the base path before it",
           ("tests/test_fork.py", "-m", "not slow")),
    Mutant("progress-tokens-off", "llamalens/run/lifecycle.py",
           "        prog.tokens += n_tokens\n", "        prog.tokens += n_tokens + 1\n",
           ("tests/test_ray.py", "-k", "progress_counts"),
           "the progress counts one token too many per sample (tok/s overstated)", ("tests/test_ray.py",)),
    # option effects (tests/test_option_effects.py): each against llama-cpp-python, the schema's validator or the page
    Mutant("prompts-file-first", "llamalens/commands/runs.py",
           "prompts = tuple(prompts) + (tuple(read_prompts(prompts_file)) if prompts_file else ())",
           "prompts = (tuple(read_prompts(prompts_file)) if prompts_file else ()) + tuple(prompts)",
           (EFFECTS, "-k", "prompts_file"), "the prompts file's prompts run before the command line's",
           ("tests/test_sweep.py", "-m", "not slow")),
    Mutant("preset-top-p-default", "llamalens/core/sampler.py",
           '("top_p", lambda: lib.llama_sampler_init_top_p(s.top_p, min_keep))',
           '("top_p", lambda: lib.llama_sampler_init_top_p(0.95, min_keep))',
           (EFFECTS, "-k", "presets"), "the default chain's top-p is create_completion's 0.95 whatever the preset says",
           ("tests/test_engine.py", "-m", "not slow")),
    Mutant("preset-repeat-penalty-ignored", "llamalens/core/sampler.py",
           "        n_vocab, s.penalty_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))]",
           "        n_vocab, s.penalty_last_n, 1.0, s.frequency_penalty, s.presence_penalty))]",
           (EFFECTS, "-k", "presets"), "the default chain drops the repeat penalty (presets factual, balanced, creative)",
           ("tests/test_engine.py", "-m", "not slow")),
    Mutant("json-schema-first-config-only", "llamalens/run/sweep.py",
           "key=s.sample_idx,\n                                grammar=gbnf))",
           "key=s.sample_idx,\n                                grammar=gbnf if s.config_idx == 0 else None))",
           (EFFECTS, "-k", "json_schema"), "a sweep constrains only its first configuration's samples by the grammar",
           ("tests/test_grammar.py", "-m", "not slow")),
    Mutant("next-page-raw-column", "llamalens/reports/texts.py",
           "trows = [[lab, math.exp(a.logprob)]", "trows = [[lab, view.chains[0].final.probs[i]]",
           (EFFECTS, "-k", "next_report"), "next's page shows the first chain's probabilities as the raw p",
           ("tests/test_report.py", "tests/test_sampler_view.py", "-m", "not slow")),
    Mutant("score-nll-without-first-token", "llamalens/looks/score.py",
           "return -float(np.mean([t.logprob for t in self.tokens]))",
           "return -float(np.mean([t.logprob for t in self.tokens[1:]]))",
           (EFFECTS, "-k", "score_report"), "the mean NLL leaves out the first text token (the one predicted from BOS)",
           ("tests/test_score.py", "-m", "not slow")),
    Mutant("ladder-columns-swapped", "llamalens/reports/ladder.py",
           'r["kld_error"], r["kld_p99"], r["kld_max"]', 'r["kld_error"], r["kld_max"], r["kld_p99"]',
           (EFFECTS, "-k", "compare_report"), "compare's page shows the max KLD under 99% KLD and the reverse",
           ("tests/test_compare.py", "-m", "not slow")),
    Mutant("embed-query-dot-products", "llamalens/looks/embed.py",
           "sims = self.unit() @ q", "sims = self.vectors.astype(np.float64) @ q",
           (EFFECTS, "-k", "embed_query"), "embed --query ranks by dot products with unnormalised texts, not cosines",
           ("tests/test_embed.py", "-k", "query")),
    Mutant("api-seed-list-as-count", "llamalens/api.py",
           "seed_values = list(seeds)", "seed_values = list(range(len(seeds)))",
           (EFFECTS, "-k", "api_cli"), "ll.sweep takes a list of seeds as their count (seeds 0..N-1)",
           ("tests/test_api.py", "-m", "not slow")),
    Mutant("memory-kv-one-sequence", "llamalens/modelfiles/memory.py",
           "else options.ctx * sequences", "else options.ctx",
           (EFFECTS, "-k", "models_fit"), "the memory estimate sizes the KV cache for one sequence whatever --parallel",
           ("tests/test_memory.py", "-m", "not slow")),
    Mutant("ubatch-ignored", "llamalens/core/runtime.py",
           "p.n_ubatch = self.n_ubatch = min(self.n_batch, model.options.ubatch or self.n_batch)",
           "p.n_ubatch = self.n_ubatch = self.n_batch",
           (EFFECTS, "-k", "context_options"), "--ubatch is recorded but the context decodes in micro-batches of --batch",
           ("tests/test_llama_cpp_chain.py", "-m", "not slow")),
]


def copy_tree(dst: Path) -> None:
    """The working tree's files (what `git ls-files` lists, tracked or not ignored) and the built C kernel, with
    .venv and .tools as the links they are."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() or src.is_symlink():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel, follow_symlinks=False)
    for built in (ROOT / "llamalens" / "core").glob("_kernels*.so"):
        shutil.copy2(built, dst / "llamalens" / "core" / built.name)
    for link in (".venv", ".tools"):
        if (ROOT / link).exists() and not (dst / link).exists():
            os.symlink(os.readlink(ROOT / link) if (ROOT / link).is_symlink() else ROOT / link, dst / link)


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    env = dict(os.environ, CI="true", PYTHONPATH=str(tree))
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=tree,
                           env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        rc, out = -1, "timed out"
    lines = out.strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]  # which test caught it, and how
    return rc, time.perf_counter() - t0, " | ".join(failed[:1] + lines[-1:])[:300]


def tests_from(tree: Path, rev: str) -> None:
    """Replace the copy's tests/ with the tests/ of git revision `rev`."""
    shutil.rmtree(tree / "tests")
    archive = subprocess.run(["git", "archive", rev, "tests"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)


def check(m: Mutant, baseline: bool, timeout: float, rev: str | None = None) -> str:
    with tempfile.TemporaryDirectory(prefix="mutant-") as d:
        tree = Path(d)
        copy_tree(tree)
        tests = m.tests
        if rev:
            tests_from(tree, rev)
            tests = m.before
        if baseline:
            rc, secs, last = run_tests(tree, tests, timeout)
            print(f"  baseline {'passed' if rc == 0 else 'FAILED'} ({secs:.0f} s): {last}")
            if rc != 0:
                return "baseline failed"
        f = tree / m.path
        text = f.read_text(encoding="utf-8")
        if text.count(m.old) != 1:
            print(f"  stale: the text to replace occurs {text.count(m.old)} times in {m.path}")
            return "stale"
        f.write_text(text.replace(m.old, m.new), encoding="utf-8")
        rc, secs, last = run_tests(tree, tests, timeout)
    verdict = "caught" if rc not in (0, -1) else ("timed out" if rc == -1 else "SURVIVED")
    print(f"  {verdict} ({secs:.0f} s): {last}")
    return verdict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests")
    ap.add_argument("--baseline", action="store_true", help="first run each mutant's tests on the unchanged copy")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per test run (default 1200)")
    ap.add_argument("--tests-from", metavar="REV", help="run each mutant's `before` files of REV's tests/ instead")
    a = ap.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in a.names if n not in known]
    if unknown:
        ap.error(f"no mutant named {', '.join(unknown)}; --list lists them")
    chosen = [known[n] for n in a.names] if a.names else MUTANTS
    if a.list:
        for m in chosen:
            print(f"{m.name:30} {m.path}: {m.why}\n{'':30} tests: {' '.join(m.tests)}\n"
                  f"{'':30} before: {' '.join(m.before)}")
        return 0
    results = {}
    for m in chosen:
        print(f"{m.name}: {m.why}", flush=True)
        results[m.name] = check(m, a.baseline, a.timeout, a.tests_from)
    print("\nsummary")
    for name, verdict in results.items():
        print(f"  {verdict:16} {name}")
    return 0 if all(v == "caught" for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
