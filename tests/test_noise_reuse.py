"""A sweep's noise floor taken from an earlier run of the same model, build and batch shape (run/noise.py), and
measured again whenever anything that moves the numbers differs."""

import numpy as np
import pytest

from llamalens.core.runtime import Model, ModelOptions
from llamalens.reports.run import describe_noise
from llamalens.run import grid, noise
from llamalens.run.sweep import SweepSpec, execute, run_sweep, start_sweep
from llamalens.store import Store


def _spec(**kw):
    d = dict(prompts=["the cat", "hello"], configs=grid.expand({"temperature": [0.0, 0.8], "top_k": [2, 40]}),
             seeds=[1, 2], max_tokens=8, n_logprobs=3, parallel=16)
    d.update(kw)
    return SweepSpec(**d)


@pytest.fixture
def measured(monkeypatch):
    """The runs whose noise floor was measured (re-decoded), in order."""
    calls, real = [], noise.noise_floor

    def spy(model, store, run_id, *a, **k):
        calls.append(run_id)
        return real(model, store, run_id, *a, **k)

    monkeypatch.setattr(noise, "noise_floor", spy)
    return calls


def test_a_repeat_with_other_seeds_takes_the_floor_of_the_run_that_measured_it(tiny, tmp_path, measured):
    store = Store(tmp_path / "s.db")
    first = run_sweep(tiny, store, _spec())
    again = run_sweep(tiny, store, _spec(seeds=[7, 8]))
    third = run_sweep(tiny, store, _spec(seeds=[9, 10]))
    assert measured == [first]
    nf = store.run(first).noise
    assert nf["tokens"] > 0 and "reused_from" not in nf and len(nf["key"]) == 64
    for rid in (again, third):  # a copy of a copy names the run that measured it
        assert store.run(rid).noise == dict(nf, reused_from=first)
    said = describe_noise(store.run(third).noise)
    assert said.startswith(f"noise floor (measured by run {first}: ") and "only the seeds differ" in said
    assert describe_noise(nf).startswith("noise floor: re-decoding")


def test_the_reused_floor_holds_for_the_run_that_reused_it(tiny, tmp_path):
    """What the floor claims (each configuration's mean logprob moves by less than its max; few tokens beyond its
    95th percentile) holds for a repeat's own samples against their one-at-a-time twins, as for its own run's."""
    store = Store(tmp_path / "s.db")
    kw = dict(prompts=["the cat", "hello"], configs=_spec().configs, max_tokens=8, n_logprobs=3, parallel=16)
    run_sweep(tiny, store, SweepSpec(**kw, seeds=[0, 1]))
    again = run_sweep(tiny, store, SweepSpec(**kw, seeds=[5, 6]))
    exact = run_sweep(tiny, store, SweepSpec(**kw, seeds=[5, 6], exact=True))
    nf = store.run(again).noise
    assert "reused_from" in nf and "reused_from" not in store.run(exact).noise
    ta, te = store.tokens_by_sample(again), store.tokens_by_sample(exact)
    samples = {s.sample_idx: s for s in store.samples(again)}
    assert all([t.id for t in ta[k]] == [t.id for t in te[k]] for k in ta)  # float32 weights: the same tokens
    d = {k: [a.logprob - b.logprob for a, b in zip(ta[k], te[k])] for k in ta}
    flat = np.abs(np.concatenate(list(d.values())))
    assert flat.max() > 0  # it really batched
    for c in range(len(kw["configs"])):
        signed = [x for k, v in d.items() if samples[k].config_idx == c for x in v]
        assert abs(np.mean(signed)) < nf["max_abs_dlogprob"], (c, np.mean(signed), nf)
    assert (flat > nf["p95_abs_dlogprob"]).mean() < 0.10  # as test_sweep's claim on a run's own floor


@pytest.mark.parametrize("change", ["prompt", "configs", "n_seeds", "max_tokens", "parallel", "model option",
                                    "threads", "libraries", "model file", "exact"])
def test_anything_that_moves_the_numbers_is_measured_again(change, tiny, tiny_path, tmp_path, measured, monkeypatch):
    store = Store(tmp_path / "s.db")
    first = run_sweep(tiny, store, _spec())
    model, spec = tiny, _spec(seeds=[3, 4])
    if change == "prompt":
        spec.prompts = ["the cat", "hello there"]
    elif change == "configs":
        spec.configs = grid.expand({"temperature": [0.0, 0.9], "top_k": [2, 40]})
    elif change == "n_seeds":
        spec.seeds = [3, 4, 5]
    elif change == "max_tokens":
        spec.max_tokens = 7
    elif change == "parallel":
        spec.parallel = 4
    elif change == "libraries":  # llama.cpp rebuilt or swapped (LLAMA_CPP_LIB_PATH): other files, same version
        libs = noise.library_files()
        monkeypatch.setattr(noise, "library_files", lambda: [(n, s + 1, t) for n, s, t in libs])
    elif change == "exact":
        spec.exact = True
    else:
        from tiny_gguf import write_tiny_gguf

        path = write_tiny_gguf(tmp_path / "other.gguf", seed=1) if change == "model file" else tiny_path
        opts = dict(ctx=256, flash_attn="off")
        opts.update({"model option": dict(ubatch=4), "threads": dict(threads=1)}.get(change, {}))
        model = Model(path, ModelOptions(**opts))
    try:
        rid = run_sweep(model, store, spec)
    finally:
        if model is not tiny:
            model.close()
    assert measured == [first, rid]
    assert "reused_from" not in store.run(rid).noise


def test_a_resumed_run_measures_its_own_and_lends_none(tiny, tmp_path, measured):
    """A resumed run's batches were composed differently: it neither takes nor gives a floor."""
    store = Store(tmp_path / "s.db")
    first = run_sweep(tiny, store, _spec())
    rid = start_sweep(tiny, store, _spec(seeds=[3, 4]))
    store.release(store.claim(rid))  # an earlier writer that stopped: this run is resumed
    execute(tiny, store, rid)
    assert store.run(rid).resumes == 1 and "reused_from" not in store.run(rid).noise and "key" not in store.run(rid).noise
    later = run_sweep(tiny, store, _spec(seeds=[5, 6]))
    assert measured == [first, rid] and store.run(later).noise["reused_from"] == first


def test_without_the_libraries_known_nothing_is_reused(tiny, tmp_path, measured, monkeypatch):
    monkeypatch.setattr(noise, "library_files", lambda: None)
    store = Store(tmp_path / "s.db")
    runs = [run_sweep(tiny, store, _spec(seeds=[s])) for s in (1, 2)]
    assert measured == runs and all("key" not in store.run(r).noise for r in runs)


def test_the_loaded_libraries_are_named():
    """llama-cpp-python's own library and its ggml companions, as files that exist."""
    names = [n for n, _, _ in noise.library_files()]
    assert any(n.startswith("libllama") for n in names) and any(n.startswith("libggml") for n in names)
