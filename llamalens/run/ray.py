"""Scale-out on Ray: a sweep's samples, a fork's continuations, a corpus's scoring windows: many workers, one store.

    driver (`llamalens sweep ... --ray [ADDRESS] --workers N`)        workers: one Ray actor each
      plans the run in the store as today (pending samples)            asks for --threads CPUs (and a GPU
      starts N actors ────────────────────────────────────────────►    with --gpu-layers), loads the model
                                                                       once, hashes the file: a file other
      ◄──────────────────── ready (pid, host) or why not ──────────    than the run's is refused
      chunks = pending samples of one prompt (a batch each),
      one chunk in flight per worker ─────────────────────────────►    sweep.decode(chunk): the engine as
      ray.wait: each finished chunk's samples saved by the driver ◄──  in one process (prefix sharing kept)
      (one writer, the same schema, the same resume)

Ray is imported here only, and only when `--ray` is given: the default path never loads it.

Faults.
  * A worker that dies (kill -9, its node lost) loses its chunk in flight only: the chunk goes back to the
    front of the queue and the next free worker decodes it. Samples are saved only from chunks that came back
    whole, so every sample is stored exactly once. With no worker left the run stops, marked interrupted,
    with the resume command.
  * A worker whose model fails to load (no file at that path on its node, another file, too little memory)
    is reported by name (w0, w1, ... with its host) and the run goes on with the others; with none left it
    stops with a clear error before anything is decoded.
  * The driver dying leaves what any sweep leaves: a run whose writer is gone, read as interrupted;
    `sweep --resume RUN --ray` finishes it (the workers die with their driver).

Figures. `--exact` samples are decoded one sequence at a time, so a worker stores what one process stores,
token for token. Batched samples depend on which samples share a batch (the noise floor of sweep.py);
the driver measures that noise floor with its own model after the last sample, as one process does.

Scoring (`score --ray`): the text's windows are planned once by the driver (score.plan_windows) and dealt
out in contiguous shards; each worker decodes its windows with the same batch shapes and the same context
size as one process (every window from a cleared cache), and sends back its scored tokens; the driver puts
them in stream order, so every figure (NLL, perplexity, its error, bits per byte) is one process's.
`compare --ray` (texts) does the same with both models in each worker (both files' sha256 checked): its
KLD, Δp, same-top and perplexities are one process's. Shards, not merged sums, come back: the per-token
records one process keeps anyway, and percentiles exact without histograms.

Forking (`fork --ray`): the driver decodes the base path and plans the continuations in the store as one
process does; the pending ones go out in chunks of whole positions (by prefix length; small positions packed
together up to a batch), so a worker runs fork.decode_chunk on its chunk with the shared-prefix decoding of
one process (`--exact`: the single-sequence path, token for token). The driver reads each continuation's
outcome and saves it as its chunk returns (one writer), then the statistics, change points and noise floor,
with its own model. The same pool, deal and faults as a sweep.

Not here yet: compare --run --ray (refused), a replacement actor for a dead worker (the others
take its work), results streamed per sample within a chunk.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from llamalens.errors import MissingExtra, RayError
from llamalens.run.lifecycle import chunk_batch, chunk_size
from llamalens.settings import ModelOptions

SHARES = 4  # score / compare: shards per worker (a lost one costs a quarter of a worker's share)
START_TIMEOUT_S = float(os.environ.get("LLAMALENS_RAY_START_TIMEOUT", "300"))


def check_ray(address: str | None) -> None:
    """What can be checked before any work (before a run is stored, so that a Ray that cannot start leaves no
    empty interrupted run): the address's form, that Ray is installed, that RAY_TMPDIR (where Ray keeps its
    session files) is a writable folder, that a HOST:PORT answers and that 'auto' finds a running cluster."""
    address = check_address(address)
    _ray()
    tmp = os.environ.get("RAY_TMPDIR")
    if tmp and not (os.path.isdir(tmp) and os.access(tmp, os.W_OK | os.X_OK)):
        raise RayError(f"RAY_TMPDIR={tmp!r} is not a writable folder, and Ray keeps its session files there; "
                       "create it, or unset RAY_TMPDIR")
    if address == "auto":
        _running_cluster()
    elif address is not None and not address.startswith("ray://"):
        reachable(address)


def _running_cluster() -> None:
    """RayError unless --ray auto finds a cluster (RAY_ADDRESS, or the one `ray start` recorded on this node), as
    ray.init(address="auto") looks for it, but without connecting."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # another Ray version: ray.init says it later
        return
    try:
        canonicalize_bootstrap_address("auto")
    except ConnectionError:
        raise RayError("--ray auto found no running Ray cluster on this node (nor RAY_ADDRESS); start one with "
                       "`ray start --head`, or drop the address for a local Ray") from None


def _ray():
    try:
        import ray
    except ImportError:
        raise MissingExtra("--ray needs Ray: pip install 'llamalens[ray]' (or pip install 'ray>=2')") from None
    return ray


def check_address(address: str | None) -> str | None:
    """`--ray` alone is 'local'; otherwise 'auto', host:port or ray://host:port. A prompt taken for the address
    (`--ray "Once upon a time"`) is refused with the fix."""
    if address in (None, "", "local"):
        return None
    if address == "auto" or address.startswith("ray://") or (":" in address and " " not in address):
        return address
    raise RayError(f"--ray {address!r}: an address is 'auto', HOST:PORT or ray://HOST:PORT; a bare --ray (a local "
                   "Ray) must come after the prompts or before another option")


@contextmanager
def connected(address: str | None, num_cpus: int | None = None):
    """Ray for this run: the session already started in this process (a test's, a notebook's), else
    ray.init(address) and its shutdown after. No address: a local Ray with `num_cpus` CPUs."""
    import logging

    ray = _ray()
    if address not in (None, "auto") and not address.startswith("ray://"):
        reachable(address)  # ray.init retries an unreachable address for minutes
    if ray.is_initialized():
        yield ray
        return
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, **kw)
        else:
            ray.init(address=address, **kw)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError
        where = "a local Ray" if address is None else f"the Ray cluster at {address}"
        raise RayError(f"cannot start {where} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                       "for a cluster run `ray start --head` first, or drop the address for a local Ray") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def reachable(address: str, timeout: float = 5.0) -> None:
    """RayError unless something listens at HOST:PORT (the head node's GCS port, 6379 by default)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise RayError(f"no Ray head at {address} ({getattr(e, 'strerror', None) or e}); start one there with "
                       "`ray start --head --port PORT`, or pass --ray auto on a node of the cluster") from None


class _Worker:
    """What runs inside one Ray actor: its loaded models (one; two for compare) and the calls the driver sends."""

    def __init__(self, name: str, files: list[tuple[str, str]], options: ModelOptions):
        self.name, self.models, self.error = name, [], None
        self.pid, self.host = os.getpid(), socket.gethostname()
        try:
            from llamalens.core.runtime import Model
            from llamalens.store import file_sha256

            for path, sha256 in files:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"no model file {path} on this node")
                got = file_sha256(path)
                if sha256 and got != sha256:
                    raise ValueError(f"{path} here has sha256 {got[:12]}, not the run's {sha256[:12]}: another file")
                self.models.append(Model(path, options))
        except Exception as e:  # noqa: BLE001 - reported by name to the driver, which goes on with the others
            self.error = str(e) or type(e).__name__

    @property
    def model(self):
        return self.models[0]

    def ready(self) -> tuple[int, str, str | None]:
        return self.pid, self.host, self.error

    def decode_chunk(self, kind_name: str, items: list, shared: tuple) -> tuple[list, dict]:
        """A chunk of a run's pending work, decoded by its kind as one process decodes it; its results and
        the decode counters it added."""
        from llamalens.run.kinds import kind

        stats: dict = {}
        return list(kind(kind_name).lifecycle.decode(self.model, items, shared, stats)), stats

    def score_shard(self, stream, windows, offset, n_logprobs, n_ctx) -> list:
        from llamalens.looks.score import score_windows

        return score_windows(self.model, stream, offset, windows, n_logprobs, n_ctx=n_ctx)

    def compare_shard(self, stream, windows, offset, n_top, n_ctx) -> tuple[list, list]:
        from llamalens.looks.compare import compare_windows

        out, nll = [], [[], []]
        compare_windows(self.models[0], self.models[1], stream, windows, offset, n_top, out, nll, n_ctx=n_ctx)
        return out, nll


@dataclass
class WorkerInfo:
    name: str
    actor: object
    pid: int = 0
    host: str = ""
    busy: object = None  # the chunk in flight
    since: float = 0.0  # when it was handed out


@dataclass
class Pool:
    """The live workers of a run, and what happened to the others."""

    workers: list[WorkerInfo] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # 'w1 on host: why'
    died: list[str] = field(default_factory=list)
    requeued: int = 0  # chunks handed out again after their worker died

    def idle(self) -> list[WorkerInfo]:
        return [w for w in self.workers if w.busy is None]

    def latest(self) -> WorkerInfo | None:
        """The busy worker handed its chunk last (a test kills it: its chunk is surely unfinished)."""
        busy = [w for w in self.workers if w.busy is not None]
        return max(busy, key=lambda w: w.since) if busy else None


def worker_cpus(options: ModelOptions) -> int:
    return options.threads_or_default()


def start_pool(ray, model, sha256: str, workers: int | None, on_note: Callable[[str], None], also=()) -> Pool:
    """One actor per worker, each loading `model`'s file with its options and checking its sha256 (and the
    models in `also`, checked against their own files: compare's B); those that fail are reported by name;
    RayError when none is left."""
    from llamalens.store import file_sha256

    opts = model.options
    files = [(str(model.path.resolve()), sha256)] + [(str(m.path.resolve()), file_sha256(m.path)) for m in also]
    cpus = worker_cpus(opts)
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    actor = ray.remote(num_cpus=cpus, num_gpus=1 if opts.gpu_layers else 0, max_restarts=0)(_Worker)
    names = [f"w{i}" for i in range(workers)]
    made = {n: actor.remote(n, files, opts) for n in names}
    refs = {made[n].ready.remote(): n for n in names}
    pool = Pool()
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=START_TIMEOUT_S)
    for ref in ready:
        name = refs[ref]
        try:
            pid, host, error = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the actor died while starting
            pool.failed.append(f"{name}: {_why(e)}")
            continue
        if error:
            pool.failed.append(f"{name} on {host}: {error}")
            ray.kill(made[name])
        else:
            pool.workers.append(WorkerInfo(name, made[name], pid, host))
    for ref in pending:
        pool.failed.append(f"{refs[ref]}: not started within {START_TIMEOUT_S:.0f} s (the cluster lacks {cpus} CPU"
                           f"{' and a GPU' if opts.gpu_layers else ''} for it)")
        ray.kill(made[refs[ref]])
    for f in pool.failed:
        on_note(f"worker {f}")
    if not pool.workers:
        raise RayError(f"no worker could start ({len(pool.failed)} tried); the first: {pool.failed[0]}")
    hosts = sorted({w.host for w in pool.workers})
    on_note(f"{len(pool.workers)} worker(s) x {cpus} thread(s) on {', '.join(hosts)}")
    return pool


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def deal(ray, pool: Pool, work: list, call: Callable, on_result: Callable, on_note: Callable[[str], None]) -> None:
    """Hand out `work` (a list of items) one item in flight per worker; `call(actor, item)` returns its
    ObjectRef; `on_result(item, value)` runs in the driver as each comes back. An item whose worker died
    goes back to the front of the queue; RayError when no worker is left."""
    queue = deque(work)
    inflight: dict = {}

    def feed():
        for w in pool.idle():
            if not queue:
                return
            w.busy, w.since = queue.popleft(), time.monotonic()
            inflight[call(w.actor, w.busy)] = w

    feed()
    while inflight:
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        w = inflight.pop(ref)
        item, w.busy = w.busy, None
        try:
            value = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            pool.workers.remove(w)
            pool.died.append(f"{w.name} (pid {w.pid} on {w.host})")
            queue.appendleft(item)
            pool.requeued += 1
            on_note(f"worker {w.name} (pid {w.pid} on {w.host}) died ({_why(e)[:120]}); its unfinished work goes "
                    f"to {'the others' if pool.workers else 'no one'}")
            if not pool.workers:
                raise RayError(f"every worker is gone ({', '.join(pool.died)}); nothing more can be decoded") from None
            feed()
            continue
        except ray.exceptions.RayTaskError as e:  # the work itself failed: it would fail anywhere
            raise RayError(f"worker {w.name} on {w.host} failed: {_why(e)}") from None
        feed()
        on_result(item, value)


@contextmanager
def pool_for(model, store, run_id: int, address: str | None, workers: int | None, on_note: Callable[[str], None],
             on_pool: Callable[[Pool], None] | None = None):
    """(ray, pool): Ray connected, the workers started on `model`'s file (the run's sha256) and their number
    noted with the run; Ray shut down after, if this opened it."""
    local_cpus = workers * worker_cpus(model.options) if workers else None
    with connected(check_address(address), local_cpus) as ray:
        pool = start_pool(ray, model, store.run(run_id).model_hash, workers, on_note)
        if on_pool:
            on_pool(pool)
        store.note_workers(run_id, len(pool.workers))
        yield ray, pool


class RayExecutor:
    """A run's pending work decoded on Ray workers (run/lifecycle.py's executor): chunks of the kind's own
    grouping (kind.chunks) dealt one in flight per worker, each chunk's results handed to `save` here as it
    comes back, the workers' decode counters added to the run's. Every worker decodes a chunk as one process
    decodes its whole run (prefix sharing kept; --exact: one sequence at a time)."""

    def __init__(self, address: str | None = None, workers: int | None = None,
                 on_note: Callable[[str], None] = lambda s: None, on_pool: Callable[[Pool], None] | None = None,
                 chunk: int | None = None):
        self.address, self.workers, self.on_note, self.on_pool, self.chunk = address, workers, on_note, on_pool, chunk

    def run(self, kind, model, store, run_id: int, work, save: Callable) -> None:
        if not work.items:
            return
        opts = store.run(run_id).options
        with pool_for(model, store, run_id, self.address, self.workers, self.on_note, self.on_pool) as (ray, pool):
            shared = ray.put(work.shared)

            def done(_chunk, value):
                results, got = value
                for k, v in got.items():
                    work.stats[k] = work.stats.get(k, 0) + v
                for result in results:
                    save(result)

            size = self.chunk or chunk_size(len(work.items), len(pool.workers), chunk_batch(opts))
            deal(ray, pool, kind.chunks(work.items, size),
                 lambda actor, c: actor.decode_chunk.remote(kind.name, c, shared), done, self.on_note)


def _sharded(models, address, workers, on_note, on_window, method: str, windows, args: tuple) -> list:
    """Deal contiguous shards of `windows` out to Ray workers holding `models` (their files' sha256 checked);
    each runs `method(stream, shard, *args)`; the results, in window order."""
    from llamalens.store import file_sha256

    model = models[0]
    local_cpus = workers * worker_cpus(model.options) if workers else None
    with connected(check_address(address), local_cpus) as ray:
        pool = start_pool(ray, model, file_sha256(model.path), workers, on_note, also=models[1:])
        per = max(1, -(-len(windows) // (len(pool.workers) * SHARES)))  # a lost shard costs 1/SHARES of a worker's
        shards = [(i, windows[i : i + per]) for i in range(0, len(windows), per)]
        got: dict[int, object] = {}
        stream_ref = ray.put(args[0])

        def done(shard, value):
            got[shard[0]] = value
            if on_window:
                on_window(min(len(windows), len(got) * per), len(windows))

        deal(ray, pool, shards, lambda actor, sh: getattr(actor, method).remote(stream_ref, sh[1], *args[1:]), done,
             on_note)
    return [got[i] for i in sorted(got)]


def ray_scorer(model, address: str | None = None, workers: int | None = None,
               on_note: Callable[[str], None] = lambda s: None, on_window=None) -> Callable:
    """A scorer for score.score_text: the windows dealt out in contiguous shards to Ray workers, their scored
    tokens put back in stream order."""
    def scorer(stream, offset, windows, n_logprobs, n_ctx) -> list:
        parts = _sharded([model], address, workers, on_note, on_window, "score_shard", windows,
                         (stream, offset, n_logprobs, n_ctx))
        return [t for part in parts for t in part]

    return scorer


def ray_comparer(a, b, address: str | None = None, workers: int | None = None,
                 on_note: Callable[[str], None] = lambda s: None, on_window=None) -> Callable:
    """A scorer for score.compare_text: each worker holds both models and compares its shards of the windows;
    positions and both NLL lists put back in stream order."""
    def scorer(stream, offset, windows, n_top, n_ctx):
        parts = _sharded([a, b], address, workers, on_note, on_window, "compare_shard", windows,
                         (stream, offset, n_top, n_ctx))
        return ([p for pos, _ in parts for p in pos],
                [[x for _, nll in parts for x in nll[0]], [x for _, nll in parts for x in nll[1]]])

    return scorer
