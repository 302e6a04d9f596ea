"""The noise floor of batched decoding: a few stored samples re-decoded one sequence at a time, compared with
what the batch gave.

Batched logits differ from single-sequence ones (on quantized weights the CPU kernels change with the batch
shape, and so does the non-flash attention path), so every run re-decodes the chosen tokens of a few of its
samples one at a time (teacher-forced, exactly the path of `llamalens generate`) and records how many tokens
that rests on, mean / 95th / 99th percentile / max |Δ logprob| and top-1 agreement. Differences between
configurations smaller than that are noise, and `show` and the report say so (reports.run.describe_noise).

Reuse: the figures describe the model file, the llama.cpp build and the batch shape, not the seeds. A sweep that
repeats an earlier finished one of the same store on all of these — the same model file (sha256), llamalens and
llama.cpp (versions, CPU features, the very shared libraries loaded), threads and every model option, prompts,
settings, number of seeds, lengths and parallel sequences; only the seeds differ — takes that run's figures with
`reused_from` naming the run that measured them (`noise_key`). A resumed run (its batches were composed
differently) measures its own and lends none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from llamalens.core.runtime import Model, llama_cpp_module, round_ctx
from llamalens.core.stats import RowStats
from llamalens.store import RunInfo, Store

NOISE_SAMPLES = 3


def noise_floor(model: Model, store: Store, run_id: int, k: int = NOISE_SAMPLES) -> dict:
    """Re-decode the chosen tokens of k samples one at a time; compare with the stored (batched) values.

    Records how many tokens the figures rest on and the distribution of |Δ logprob|: mean, 95th and 99th
    percentile, max; and top-1 agreement. What they claim is in reports.run.describe_noise.
    """
    samples = store.samples(run_id)
    if not samples:
        return {"samples": 0}
    picks = noise_samples(samples, k)
    deltas, agree = [], 0
    for s in picks:
        toks = [t for _, t in store.tokens(run_id, s.sample_idx)]
        agree += against_rescored(toks, rescore(model, s.prompt, [t.id for t in toks]), deltas)
    return noise_figures(len(picks), deltas, agree)


def sweep_noise(model: Model, store: Store, run_id: int) -> dict:
    """A finished sweep's noise floor: an earlier run's with the same key (a copy naming it in `reused_from`),
    or measured here (noise_floor) and stored with its key for later runs to reuse."""
    info = store.run(run_id)
    key = noise_key(info, [c.to_dict() for c in store.configs(run_id)]) if not info.resumes else None
    if key:
        found = store.noise_with_key(key, run_id)
        if found is not None:
            source, nf = found
            return {"reused_from": source, **nf}  # a copy of a copy names the run that measured it
    nf = noise_floor(model, store, run_id)
    return dict(nf, key=key) if key and nf.get("tokens") else nf


def noise_key(info: RunInfo, configs: list[dict]) -> str | None:
    """What a sweep's noise floor depends on, hashed: everything of the run but its seeds (their number stays: it
    sets the batch width) and its name, plus the llama.cpp libraries loaded in this process. None where those
    cannot be told (then nothing is reused)."""
    libs = library_files()
    if libs is None or not info.model_hash:
        return None
    opts = dict(info.options.to_dict(), seeds=len(info.options.seeds))
    what = {"model": info.model_hash, "versions": info.versions, "hardware": info.hardware.to_dict(),
            "options": opts, "configs": configs, "libraries": libs, "kind": info.kind}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def library_files() -> list | None:
    """(name, size, mtime) of the llama.cpp shared libraries this process loaded: a rebuilt or swapped llama.cpp
    (LLAMA_CPP_LIB_PATH) changes them where its version and CPU features may read the same. None: not found."""
    name = getattr(getattr(getattr(llama_cpp_module(), "llama_cpp", None), "_lib", None), "_name", None)
    if not name:
        return None
    files = sorted({f.resolve() for f in Path(name).parent.iterdir()
                    if f.name.startswith("lib") and ".so" in f.name or f.suffix in (".dylib", ".dll")})
    return [(f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in files] or None


def against_rescored(toks, ref, deltas: list) -> int:
    """Append |Δ logprob| of each stored token against its one-at-a-time re-decode (`ref`: rescore's
    (logprob, top-1 id) pairs) to `deltas`; the number of tokens whose stored top-1 is the re-decoded one
    (a record without a top list counts its own token when it was rank 1)."""
    agree = 0
    for t, (lp, top1) in zip(toks, ref):
        deltas.append(abs(t.logprob - lp))
        agree += int((t.top[0].id if t.top else (t.id if t.rank == 1 else -1)) == top1)
    return agree


def noise_figures(n_samples: int, deltas: list, agree: int) -> dict:
    """The noise-floor figures stored with a run: how many samples and tokens they rest on, the
    distribution of |Δ logprob| (mean, 95th and 99th percentile, max) and the top-1 agreement."""
    if not deltas:
        return {"samples": 0}
    d = np.array(deltas)
    return {"samples": n_samples, "tokens": len(d), "mean_abs_dlogprob": float(d.mean()),
            "p95_abs_dlogprob": float(np.quantile(d, 0.95)), "p99_abs_dlogprob": float(np.quantile(d, 0.99)),
            "max_abs_dlogprob": float(d.max()), "top1_agreement": agree / len(d)}


def noise_samples(samples: list, k: int = NOISE_SAMPLES, most: int = 8) -> list:
    """The samples to re-decode: one of each configuration (up to `most`), taken from different prompts and
    seeds in turn, and at least k in all, spread over the run."""
    by_config: dict[int, list] = {}
    for s in samples:
        by_config.setdefault(s.config_idx, []).append(s)
    picks = [group[i % len(group)] for i, (_, group) in enumerate(sorted(by_config.items())[:most])]
    for i in np.unique(np.linspace(0, len(samples) - 1, min(k, len(samples))).astype(int)):
        if len(picks) >= k:
            break
        if samples[int(i)] not in picks:
            picks.append(samples[int(i)])
    return picks


def rescore(model: Model, prompt: str, token_ids: list[int], prompt_tokens: list[int] | None = None
            ) -> list[tuple[float, int]]:
    """(raw logprob, top-1 id) of each given token, decoded one at a time after the prompt (or after
    `prompt_tokens`, when given: a fork continuation's prefix)."""
    ptoks = prompt_tokens if prompt_tokens is not None else model.prompt_tokens(prompt)
    out = []
    with model.context(n_ctx=round_ctx(len(ptoks) + len(token_ids) + 1)) as ctx:
        row = ctx.prefill(ptoks)
        pos = len(ptoks)
        for i, tok in enumerate(token_ids):
            st = RowStats.of(row, tok, 1)
            out.append((st.logprob, int(st.top_ids[0])))
            if i + 1 < len(token_ids):
                ctx.decode([tok], [pos], [0], [1])
                row = ctx.logits(0)
                pos += 1
    return out
