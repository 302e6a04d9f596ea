"""Grid sweeps: plan every sample in the store, decode them batched, save each as it completes.

    spec ──► plan (prompt × config × seed, all 'pending' in the store) ──► Engine(n_parallel)
         ──► each finished Sample saved in its own transaction ──► noise floor ──► run 'done'

Resume: `resume_sweep` reloads the run's configs and options and decodes only its pending samples,
with their stored seeds. Completed samples are never rewritten.

Noise floor: batched logits differ from single-sequence ones (../shared/NOTES.md §6), so every run
re-decodes the chosen tokens of a few of its samples one at a time (teacher-forced, exactly the
path of `llamalens generate`) and records mean / max |Δ logprob| and top-1 agreement. Differences
between configurations smaller than that are noise, and `show` and the report say so.
`exact=True` decodes one sequence at a time: identical to `generate`, at the cost of speed.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .engine import Engine, Request
from .errors import StoreError
from .records import Sample
from .runtime import Model
from .settings import SamplingSettings
from .stats import RowStats
from .store import Store

DEFAULT_PARALLEL = 32
NOISE_SAMPLES = 3


@dataclass
class SweepSpec:
    prompts: list[str]
    configs: list[SamplingSettings]
    seeds: list[int]
    max_tokens: int = 32
    n_logprobs: int = 5
    stop: tuple[str, ...] = ()
    name: str | None = None
    exact: bool = False
    parallel: int = DEFAULT_PARALLEL

    def plan(self) -> list[tuple[int, int, int, str]]:
        return [(p, c, s, prompt) for p, prompt in enumerate(self.prompts) for c in range(len(self.configs))
                for s in self.seeds]

    @property
    def n_samples(self) -> int:
        return len(self.prompts) * len(self.configs) * len(self.seeds)


@dataclass
class Progress:
    done: int
    total: int
    tokens: int
    elapsed: float
    saved: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        return self.elapsed / self.done * (self.total - self.done) if self.done else float("nan")


class SweepInterrupted(Exception):
    def __init__(self, run_id: int, done: int, total: int):
        super().__init__(f"interrupted: {done}/{total} samples of run {run_id} are saved; "
                         f"resume with: llamalens sweep --resume {run_id}")
        self.run_id, self.done, self.total = run_id, done, total


def _versions() -> dict:
    import llama_cpp

    from . import __version__

    return {"llamalens": __version__, "llama_cpp_python": llama_cpp.__version__, "python": sys.version.split()[0],
            "numpy": np.__version__}


def _hardware(model: Model) -> dict:
    import llama_cpp

    return {"threads": model.options.threads_or_default(), "gpu_layers": model.options.gpu_layers,
            "flash_attn": model.options.flash_attn, "machine": platform.machine(), "system": platform.system(),
            "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def start_sweep(model: Model, store: Store, spec: SweepSpec, command: str = "") -> int:
    """Validate, plan and record a run (all samples pending); return its id. Nothing is decoded yet."""
    reqs = [Request(prompt, spec.configs[c].with_(seed=s), spec.max_tokens, spec.n_logprobs, spec.stop)
            for p, c, s, prompt in spec.plan()]
    Engine(model, 1).prepare(reqs)  # every bad value and too-long prompt fails here, before the store changes
    options = {"max_tokens": spec.max_tokens, "n_logprobs": spec.n_logprobs, "stop": list(spec.stop),
               "exact": spec.exact, "parallel": 1 if spec.exact else spec.parallel, "prompts": spec.prompts,
               "seeds": spec.seeds, "model_options": asdict(model.options)}
    return store.create_run(name=spec.name, command=command, model=model.describe(),
                            model_hash=store.model_hash(model.path), versions=_versions(), hardware=_hardware(model),
                            options=options, configs=spec.configs, plan=spec.plan())


def execute(model: Model, store: Store, run_id: int,
            on_progress: Callable[[Progress], None] | None = None) -> Progress:
    """Decode the pending samples of a run, saving each as it completes; then measure the noise floor."""
    info = store.run(run_id)
    if info.n_done == info.n_samples and info.status == "done":
        raise StoreError(f"run {run_id} is already complete ({info.n_done}/{info.n_samples} samples); nothing to resume")
    if info.model_hash and info.model_hash != store.model_hash(model.path):
        raise StoreError(f"run {run_id} was made with {info.model.get('path')} (sha256 {info.model_hash[:12]}), "
                         f"not {model.path}; pass --model {info.model.get('path')}")
    opts = info.options
    configs = [SamplingSettings.from_dict(c) for c in store.configs(run_id)]
    pending = store.pending(run_id)
    reqs = [Request(prompt, configs[c].with_(seed=seed), opts["max_tokens"], opts["n_logprobs"],
                    tuple(opts.get("stop", ())), key=idx) for idx, p, c, seed, prompt in pending]
    prog = Progress(info.n_done, info.n_samples, 0, 0.0)
    t0 = time.perf_counter()
    store.set_status(run_id, "running")
    try:
        engine = Engine(model, opts.get("parallel", DEFAULT_PARALLEL))
        for sample in engine.run(reqs):
            store.save_sample(run_id, sample.key, sample)
            prog.done += 1
            prog.tokens += len(sample.tokens)
            prog.elapsed = time.perf_counter() - t0
            prog.saved.append(sample.key)
            if on_progress:
                on_progress(prog)
    except KeyboardInterrupt:
        store.set_status(run_id, "interrupted")
        raise SweepInterrupted(run_id, prog.done, prog.total) from None
    noise = noise_floor(model, store, run_id)
    store.set_status(run_id, "done", noise=noise)
    return prog


def noise_floor(model: Model, store: Store, run_id: int, k: int = NOISE_SAMPLES) -> dict:
    """Re-decode the chosen tokens of k samples one at a time; compare with the stored (batched) values."""
    samples = store.samples(run_id)
    if not samples:
        return {"samples": 0}
    picks = [samples[int(i)] for i in np.unique(np.linspace(0, len(samples) - 1, min(k, len(samples))).astype(int))]
    deltas, agree, n = [], 0, 0
    for s in picks:
        toks = [t for _, t in store.tokens(run_id, s["sample_idx"])]
        ref = rescore(model, s["prompt"], [t.id for t in toks])
        for t, (lp, top1) in zip(toks, ref):
            deltas.append(abs(t.logprob - lp))
            agree += int((t.top[0].id if t.top else (t.id if t.rank == 1 else -1)) == top1)
            n += 1
    d = np.array(deltas) if deltas else np.zeros(1)
    return {"samples": len(picks), "tokens": n, "mean_abs_dlogprob": float(d.mean()), "max_abs_dlogprob": float(d.max()),
            "top1_agreement": agree / n if n else 1.0}


def rescore(model: Model, prompt: str, token_ids: list[int]) -> list[tuple[float, int]]:
    """(raw logprob, top-1 id) of each given token, decoded one at a time after the prompt."""
    ptoks = model.prompt_tokens(prompt)
    out = []
    n_ctx = (len(ptoks) + len(token_ids) + 1 + 255) // 256 * 256
    with model.context(n_ctx=n_ctx) as ctx:
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


def run_sweep(model: Model, store: Store, spec: SweepSpec, command: str = "",
              on_progress: Callable[[Progress], None] | None = None) -> int:
    run_id = start_sweep(model, store, spec, command)
    execute(model, store, run_id, on_progress)
    return run_id
