"""Ray scale-out (llamalens/run/ray.py) on a local Ray on 127.0.0.1: 2 workers x 1 thread, the default model.

One Ray session serves the module (started once, about 5 s here); the CLI and the library find it
initialised and use it. References are one-process runs of the same settings, made without Ray.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from conftest import require
from llamalens.run import grid
from llamalens.core.runtime import Model
from llamalens.settings import ModelOptions
from llamalens.store import Store
from llamalens.run.sweep import SweepInterrupted, SweepSpec, execute, start_sweep
from clirun import cli

PROMPTS = ["The cat sat on", "Once upon a time"]
TEXT = ("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were "
        "striking thirteen. Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
        "money in my purse, I thought I would sail about a little and see the watery part of the world.")
SWEEP_ARGS = [*PROMPTS, "-t", "0,0.8", "--seeds", 2, "-n", 6, "--exact", "--threads", 1]


@pytest.fixture(scope="module")
def ray_session():
    try:
        import ray
    except ImportError:
        ray = None
    require(ray, "Ray", "scripts/install.sh --test installs it (the `ray` extra)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model1(gemma_path):
    """The default model with one thread: what each worker loads (sweep --threads 1)."""
    with Model(gemma_path, ModelOptions(threads=1)) as m:
        yield m


def _spec():
    return SweepSpec(PROMPTS, grid.expand({"temperature": [0.0, 0.8]}), [0, 1], max_tokens=6, exact=True)


def _tokens(store, run_id):
    """{(prompt, config, seed): [(id, bytes, logprob, rank, top)]} of a run's stored samples."""
    by = {(s.prompt_idx, s.config_idx, s.seed): s.sample_idx for s in store.samples(run_id)}
    toks = store.tokens_by_sample(run_id)
    return {k: [(t.id, t.bytes, t.logprob, t.rank, [(a.id, a.logprob) for a in t.top]) for t in toks.get(i, [])]
            for k, i in by.items()}


@pytest.fixture(scope="module")
def reference(model1, tmp_path_factory):
    """The sweep in one process, without Ray: {(prompt, config, seed): tokens}."""
    store = Store(tmp_path_factory.mktemp("ref") / "ref.db")
    run_id = start_sweep(model1, store, _spec())
    execute(model1, store, run_id)
    return _tokens(store, run_id)


def test_default_path_does_not_import_ray(tiny_path, tmp_path):
    code = ("import sys; from llamalens.cli import main\n"
            "for argv in (['--help'], ['sweep', 'the cat', '-n', '2', '--model', sys.argv[1], '--store', sys.argv[2]]):\n"
            "    try: main(argv, standalone_mode=False)\n"
            "    except SystemExit: pass\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_path), str(tmp_path / "s.db")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("False"), out.stdout


def test_bad_ray_options_fail_before_any_work(tmp_path):
    res = cli("sweep", "the cat", "--workers", 2, "--store", tmp_path / "s.db", ok=False)
    assert res.exit_code == 2 and "--workers applies to Ray runs" in res.output
    # a bare --ray before a prompt takes the prompt for the address: refused, nothing planned
    res = cli("sweep", "--ray", "Once upon a time", "--store", tmp_path / "s.db", ok=False)
    assert res.exit_code == 1 and "an address is 'auto', HOST:PORT" in res.output
    assert not (tmp_path / "s.db").exists()
    res = cli("fork", "--ray", "Once upon a time", "--store", tmp_path / "s.db", ok=False)  # fork reads it the same
    assert res.exit_code == 1 and "an address is 'auto', HOST:PORT" in res.output
    assert not (tmp_path / "s.db").exists()
    res = cli("sweep", "the cat", "--ray", "127.0.0.1:1", "--store", tmp_path / "s.db", ok=False)
    assert res.exit_code == 1 and "no Ray head at 127.0.0.1:1 (Connection refused)" in res.output
    assert not (tmp_path / "s.db").exists()


def test_exact_sweep_on_two_workers_is_one_process_token_for_token(ray_session, reference, tmp_path):
    db = tmp_path / "r.db"
    res = cli("sweep", *SWEEP_ARGS, "--ray", "--workers", 2, "--store", db)
    assert "ray: 2 worker(s) x 1 thread(s)" in res.output
    store = Store(db)
    assert store.run(1).status == "done" and store.run(1).n_done == 8
    assert _tokens(store, 1) == reference  # ids, bytes, logprobs, ranks, alternatives: all equal
    runs = json.loads(cli("runs", "--json", "--store", db).output)
    assert runs[0]["workers"] == 2
    assert " 2  20" in cli("runs", "--store", db).output  # the workers column, then the date


def test_a_killed_worker_loses_only_its_chunk(ray_session, model1, reference, tmp_path):
    from llamalens.run.ray import RayExecutor

    store = Store(tmp_path / "k.db")
    run_id = start_sweep(model1, store, _spec())
    pools, notes, killed = [], [], []

    def on_progress(prog):
        if not killed:  # the worker handed a chunk last has surely not finished it: kill -9 it
            victim = pools[0].latest()
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.name)

    execute(model1, store, run_id, on_progress, RayExecutor(workers=2, on_note=notes.append, on_pool=pools.append,
                                                            chunk=2))
    pool = pools[0]
    assert len(pool.died) == 1 and pool.died[0].startswith(killed[0]) and pool.requeued == 1
    assert any("died" in n and "goes to the others" in n for n in notes), notes
    info = store.run(run_id)
    assert info.status == "done" and info.n_done == info.n_samples == 8
    rows = store.db.execute("SELECT COUNT(*), COUNT(DISTINCT sample_idx || '/' || position) FROM tokens "
                            "WHERE run_id=?", (run_id,)).fetchone()
    assert rows[0] == rows[1] == sum(len(t) for t in reference.values())  # every token once
    assert _tokens(store, run_id) == reference


def test_with_every_worker_killed_the_run_stops_resumable(ray_session, model1, reference, tmp_path):
    from llamalens.run.ray import RayExecutor

    store = Store(tmp_path / "k2.db")
    run_id = start_sweep(model1, store, _spec())
    pools = []

    def on_progress(prog):  # after each chunk that came back, kill -9 the worker that was just given the next one
        victim = pools[0].latest()
        if victim is not None:
            os.kill(victim.pid, signal.SIGKILL)

    with pytest.raises(SweepInterrupted, match=r"every worker is gone \(w\d \(pid \d+ on .*\), w\d .*resume with: "
                       r"llamalens sweep --resume 1"):
        execute(model1, store, run_id, on_progress, RayExecutor(workers=2, on_pool=pools.append, chunk=2))
    info = store.run(run_id)
    assert info.status == "interrupted" and 0 < info.n_done < 8 and len(pools[0].died) == 2
    execute(model1, store, run_id)  # the rest in one process
    assert _tokens(store, run_id) == reference


def test_a_run_interrupted_in_one_process_resumes_on_ray(ray_session, model1, reference, tmp_path):
    db = tmp_path / "i.db"
    store = Store(db)
    run_id = start_sweep(model1, store, _spec())

    def stop(prog):
        if prog.done == 3:
            raise KeyboardInterrupt

    with pytest.raises(SweepInterrupted):
        execute(model1, store, run_id, stop)
    res = cli("sweep", "--resume", run_id, "--ray", "--workers", 2, "--store", db)
    assert "5 of 8 samples to go" in res.output
    assert Store(db).run(run_id).status == "done" and _tokens(Store(db), run_id) == reference


def test_workers_with_another_model_file_are_refused_by_name(ray_session, model1):
    from llamalens.run.ray import RayError, start_pool

    notes = []
    with pytest.raises(RayError, match="no worker could start"):
        start_pool(ray_session, model1, "0" * 64, 2, notes.append)
    assert sorted(n.split()[1] for n in notes) == ["w0", "w1"]
    assert all("not the run's 000000000000: another file" in n for n in notes), notes


def test_score_sharded_over_two_workers_equals_one_process(ray_session, gemma_path, tmp_path):
    from llamalens.looks.score import score_text

    with Model(gemma_path, ModelOptions(threads=1, ctx=64)) as m:
        ref = score_text(m, TEXT * 2, 64, stride=16)
    assert ref.windows >= 6  # several shards a worker
    f = tmp_path / "t.txt"
    f.write_text(TEXT * 2)
    res = cli("score", "--file", f, "--ctx", 64, "--stride", 16, "--threads", 1, "--json", "--ray", "--workers", 2)
    got = json.loads(res.stdout)
    # the same windows with the same batch shapes and context size: identical, not merely close
    assert [t["logprob"] for t in got["tokens"]] == [t.logprob for t in ref.tokens]
    assert got["totals"]["perplexity"] == ref.perplexity and got["totals"]["windows"] == ref.windows


def test_compare_sharded_over_two_workers_equals_one_process(ray_session, gemma_path, gemma_q8_path, tmp_path):
    from llamalens.looks.compare import compare_text

    opts = ModelOptions(threads=1, ctx=32)
    with Model(gemma_path, opts) as a, Model(gemma_q8_path, opts) as b:
        ref = compare_text(a, b, TEXT, 32, stride=8, alternate=False)
    assert len({p.position for p in ref.positions}) == len(ref.positions) > 60  # 70 tokens in 6 windows
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    res = cli("compare", "-m", gemma_path, "-m", gemma_q8_path, "--file", f, "--ctx", 32, "--stride", 8,
              "--threads", 1, "--json", "--ray", "--workers", 2)
    got = json.loads(res.stdout)
    assert got["summary"] == ref.summary()  # KLD, Δp, same-top, both perplexities: every figure the same
    assert [p["kld"] for p in got["positions"]] == [p.kld for p in ref.positions]
    res = cli("compare", "--run", 1, "-m", gemma_q8_path, "--ray", "--store", tmp_path / "none.db", ok=False)
    assert res.exit_code == 2 and "drop --ray" in res.output


FORK_ARGS = ["The cat sat on", "-n", 4, "--samples", 2, "--alternatives", 2, "--min-prob", 0.01, "--positions", "0-2",
             "--exact", "--threads", 1]


def _continuations(store, run_id):
    """{(position, forced token, sample j): (outcome, text, [(id, bytes, logprob, rank, top)])} of a fork run."""
    toks = store.tokens_by_sample(run_id)
    return {(s.extra["position"], s.extra["forced_token"], s.extra["sample"]):
            (s.extra["outcome"], s.text, [(t.id, t.bytes, t.logprob, t.rank, [(a.id, a.logprob) for a in t.top])
                                          for t in toks.get(s.sample_idx, [])])
            for s in store.samples(run_id) if s.extra.get("role") == "continuation"}


def test_exact_fork_on_two_workers_is_one_process_sample_for_sample(ray_session, tmp_path):
    from llamalens.run.fork import load_fork

    cli("fork", *FORK_ARGS, "--store", tmp_path / "one.db")  # the reference: one process, no Ray
    res = cli("fork", *FORK_ARGS, "--ray", "--workers", 2, "--store", tmp_path / "r.db")
    assert "ray: 2 worker(s) x 1 thread(s)" in res.output
    one, par = Store(tmp_path / "one.db"), Store(tmp_path / "r.db")
    info = par.run(1)
    assert info.status == "done" and info.n_done == info.n_samples == one.run(1).n_samples
    ref = _continuations(one, 1)
    # 3 positions, 4 continuations each: 3 chunks of whole positions (at most half the run each) for 2 workers
    assert len({k[0] for k in ref}) == 3 and len(ref) > 9 and any(toks for _, _, toks in ref.values())
    assert _continuations(par, 1) == ref  # tokens, logprobs, alternatives, texts, outcomes: sample for sample
    assert load_fork(par, 1).analysis.to_dict() == load_fork(one, 1).analysis.to_dict()
    assert info.noise == one.run(1).noise and info.noise  # measured by the driver, as in one process
    assert json.loads(cli("runs", "--json", "--store", tmp_path / "r.db").output)[0]["workers"] == 2


def test_a_killed_worker_loses_only_its_fork_chunk(ray_session, model1, tmp_path):
    from llamalens.run.ray import RayExecutor
    from llamalens.run.fork import ForkSpec, execute_fork, start_fork
    from llamalens.settings import SamplingSettings

    spec = ForkSpec("The cat sat on", SamplingSettings(), samples=2, alternatives=2, min_prob=0.01, positions=(0, 2),
                    max_tokens=4, exact=True)
    ref_store = Store(tmp_path / "one.db")
    execute_fork(model1, ref_store, start_fork(model1, ref_store, spec)[0])
    store = Store(tmp_path / "k.db")
    run_id = start_fork(model1, store, spec)[0]
    pools, notes, killed = [], [], []

    def on_progress(prog):
        if pools and not killed:  # the worker handed a chunk last has surely not finished it: kill -9 it
            victim = pools[0].latest()
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.name)

    execute_fork(model1, store, run_id, on_progress,
                 RayExecutor(workers=2, on_note=notes.append, on_pool=pools.append, chunk=2))
    assert len(pools[0].died) == 1 and pools[0].requeued == 1, notes
    info = store.run(run_id)
    assert info.status == "done" and info.n_done == info.n_samples
    rows = store.db.execute("SELECT COUNT(*), COUNT(DISTINCT sample_idx || '/' || position) FROM tokens "
                            "WHERE run_id=?", (run_id,)).fetchone()
    assert rows[0] == rows[1]  # every token stored once
    assert _continuations(store, run_id) == _continuations(ref_store, 1)


def test_progress_counts_each_sample_once_on_ray_and_in_one_process(ray_session, tiny_path, tmp_path):
    """The progress a run reports (done / total, tokens, hence tok/s) against what the store holds: on Ray and in
    one process, done never passes total and ends equal to it, every sample is saved once, and the tokens counted
    are the tokens stored; the CLI's last progress line says so too."""
    import re

    from llamalens.run.ray import RayExecutor

    spec = SweepSpec(PROMPTS, grid.expand({"temperature": [0.0, 0.8]}), [0, 1], max_tokens=6, exact=True)
    with Model(tiny_path, ModelOptions(threads=1)) as model:
        for executor in (None, RayExecutor(workers=2, chunk=2)):
            store = Store(tmp_path / f"p{executor is None}.db")
            run_id = start_sweep(model, store, spec)
            seen: list[tuple[int, int, int]] = []
            prog = execute(model, store, run_id, lambda p, seen=seen: seen.append((p.done, p.total, p.tokens)),
                           executor)
            stored_tokens = sum(len(t) for t in store.tokens_by_sample(run_id).values())
            assert [d for d, _, _ in seen] == list(range(1, 9)) and all(t == 8 for _, t, _ in seen)
            assert (prog.done, prog.total, prog.tokens) == (8, 8, stored_tokens)
            assert sorted(prog.saved) == sorted(s.sample_idx for s in store.samples(run_id)) and len(prog.saved) == 8
    db = tmp_path / "cli.db"
    res = cli("sweep", *PROMPTS, "-t", "0,0.8", "--seeds", 2, "-n", 6, "--exact", "--threads", 1, "--ray",
              "--workers", 2, "--model", tiny_path, "--store", db)
    counts = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) sequences", res.output)]
    assert counts and counts[-1] == (8, 8) and all(a <= b == 8 for a, b in counts), res.output
