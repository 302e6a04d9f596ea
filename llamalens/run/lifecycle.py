"""One run lifecycle for every run kind: claim the run, decode its pending work, save each result as it
comes, finish; the same steps whether the work is decoded here or on Ray workers.

    execute(kind, model, store, run_id, executor)
        check: the run is of this kind, unfinished, and `model` is its file (same sha256)
        claim the run as its writer (status 'running')
        work = kind.pending(...)            what is left: items to decode, what every chunk shares
        for each result: kind.save(...)     one transaction a result; progress counted here
            from executor.run(...)          LOCAL: kind.decode(model, items, shared, stats) in this process
                                            run/ray.py: chunks of kind.chunks(items) on workers
        kind.finish(...)                    the noise floor, status 'done'
    Ctrl-C, SIGTERM or a full disk: the run is marked interrupted and RunInterrupted names the resume command;
    what was saved stays saved. An executor that loses every worker raises RayError: the same.

A kind (run/kinds.py) supplies pending, decode, chunks, save and finish; nothing here knows a kind's name.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from llamalens.core.runtime import Model
from llamalens.errors import RayError, StoreError
from llamalens.settings import ModelOptions
from llamalens.store import RunInfo, Store, StoreFull


DEFAULT_PARALLEL = 32  # sequences a batch, unless a run says otherwise


@dataclass
class Progress:
    """How far a run is: results saved of the total, tokens decoded (this session) and the time it took."""

    done: int
    total: int
    tokens: int
    elapsed: float
    saved: list[int] = field(default_factory=list)  # sample indices saved this session, in order
    positions_done: int = 0  # a fork: analysed positions whose continuations are all in
    positions_total: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        return self.elapsed / self.done * (self.total - self.done) if self.done else float("nan")


class RunInterrupted(Exception):
    """A run stopped before its end (Ctrl-C, SIGTERM, a full disk, no Ray worker left); what was committed is
    saved, and the message names the command that resumes it."""

    unit = "samples"

    def __init__(self, run_id: int, done: int, total: int, why: str = "interrupted", kind: str = "sweep"):
        super().__init__(f"{why}: {done}/{total} {self.unit} of run {run_id} are saved; "
                         f"resume with: llamalens {kind} --resume {run_id}")
        self.run_id, self.done, self.total = run_id, done, total
        self.by_signal = why == "interrupted"  # Ctrl-C / SIGTERM, not a full disk


@dataclass
class Work:
    """A run's pending work and how its results are saved. `items` are dealt out (to this process, or in chunks
    to workers), `shared` goes with every chunk, `done` are results that need no decoding (saved first);
    `save(writer, result, progress)` commits one result and returns (its sample index, tokens decoded for it);
    `stats` are the run's decode counters, which executors add to."""

    items: list
    save: Callable[[int, Any, Progress], tuple[int, int]]
    progress: Progress
    shared: tuple = ()
    done: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


class Kind(Protocol):
    """What the lifecycle asks of a run kind (run/kinds.py registers them)."""

    name: str
    interrupted: type[RunInterrupted]

    def pending(self, model: Model, store: Store, info: RunInfo) -> Work: ...
    def decode(self, model: Model, items: list, shared: tuple, stats: dict) -> Iterator[Any]: ...
    def chunks(self, items: list, size: int) -> list[list]: ...
    def keep_stats(self, store: Store, run_id: int, stats: dict) -> None: ...
    def finish(self, model: Model, store: Store, run_id: int, work: Work) -> None: ...


class Executor(Protocol):
    """Decodes a run's pending work and hands every result to `save` in this process (the one writer)."""

    def run(self, kind: Kind, model: Model, store: Store, run_id: int, work: Work,
            save: Callable[[Any], None]) -> None: ...


class Local:
    """The work decoded in this process."""

    def run(self, kind, model, store, run_id, work, save) -> None:
        for result in kind.decode(model, work.items, work.shared, work.stats):
            save(result)


LOCAL = Local()


def execute(kind: Kind, model: Model, store: Store, run_id: int,
            on_progress: Callable[[Progress], None] | None = None, executor: Executor | None = None) -> Progress:
    """Decode the pending work of a run of `kind`, saving each result as it comes; then finish the run."""
    info = store.run(run_id)
    check_resumable(info, kind.name)
    check_run_model(store, info, model)
    work = kind.pending(model, store, info)
    prog, stats = work.progress, work.stats
    t0 = time.perf_counter()

    def save(result) -> None:
        key, n_tokens = work.save(writer, result, prog)
        prog.done += 1
        prog.tokens += n_tokens
        prog.elapsed = time.perf_counter() - t0
        prog.saved.append(key)
        if on_progress:
            on_progress(prog)

    with writing(store, run_id, prog, kind, on_stop=lambda: kind.keep_stats(store, run_id, stats)) as writer:
        for result in work.done:
            save(result)
        try:
            (executor or LOCAL).run(kind, model, store, run_id, work, save)
        except RayError as e:  # no worker started, or none is left: what came back is saved
            kind.keep_stats(store, run_id, stats)
            store.set_status(run_id, "interrupted")
            raise kind.interrupted(run_id, prog.done, prog.total, f"{e}. Stopped", kind.name) from None
        kind.keep_stats(store, run_id, stats)
        kind.finish(model, store, run_id, work)
    return prog


@contextmanager
def writing(store: Store, run_id: int, prog: Progress, kind: Kind, on_stop: Callable[[], None] | None = None):
    """Decode into a run as its registered writer (status 'running'). Ctrl-C / SIGTERM or a full disk marks the
    run interrupted (after `on_stop`, on Ctrl-C) and raises the kind's RunInterrupted with the resume command;
    the writer is always released."""
    writer = store.claim(run_id)
    try:
        store.set_status(run_id, "running")
        yield writer
    except KeyboardInterrupt:
        if on_stop:
            on_stop()
        _stopped(store, run_id)
        raise kind.interrupted(run_id, prog.done, prog.total, kind=kind.name) from None
    except StoreFull as e:
        _stopped(store, run_id)
        raise kind.interrupted(run_id, prog.done, prog.total, f"{e}; free some space, then resume. Stopped",
                               kind.name) from None
    finally:
        try:
            store.release(writer)
        except Exception:  # noqa: BLE001 - a full disk may refuse even this; the writer then reads as gone
            pass


def _stopped(store: Store, run_id: int) -> None:
    """Mark a run interrupted (best effort: on a full disk the writer's end marks it so instead)."""
    try:
        store.set_status(run_id, "interrupted")
    except Exception:  # noqa: BLE001
        pass


def check_resumable(info: RunInfo, kind: str = "sweep") -> None:
    """An interrupted run of `kind` (each kind resumes with its own command)."""
    if info.kind != kind:
        raise StoreError(f"run {info.id} is a {info.kind} run, not a {kind} run; resume it with "
                         f"`llamalens {info.kind} --resume {info.id}`")
    if info.status == "done" and info.n_done == info.n_samples:
        raise StoreError(f"run {info.id} is already complete ({info.n_done}/{info.n_samples} samples); "
                         "nothing to resume")


def resume_target(store: Store, run_id, model: str | None = None, kind: str = "sweep"
                  ) -> tuple[int, str, ModelOptions]:
    """(run id, model path, model options) to finish an interrupted run of `kind`: its own file and options
    unless `model` names another file (execute() then checks that file's hash against the run's)."""
    info = store.run(run_id)
    check_resumable(info, kind)
    return info.id, model or info.model.path, info.options.model_options


def check_run_model(store: Store, info: RunInfo, model: Model) -> None:
    """A loaded model must be the file the run was made with (same sha256), or its numbers would mix."""
    if info.model_hash and info.model_hash != store.model_hash(model.path):
        raise StoreError(f"{model.path} is not the model of run {info.id}: that was {info.model.path} "
                         f"(sha256 {info.model_hash[:12]}); pass --model {info.model.path}")


def report_model(info: RunInfo, model: str | None = None) -> tuple[str | None, ModelOptions]:
    """(model file, options) for a run's sampler view: `model` if given, else the run's own file while it
    is still there (None when it is not), with the options the run was made with."""
    if model is None and not (info.model.path and Path(info.model.path).is_file()):
        return None, info.options.model_options
    return model or info.model.path, info.options.model_options


# -- dealing work out in chunks (an executor on workers: run/ray.py) ---------------------------------------
def chunk_size(n_pending: int, n_workers: int, parallel: int) -> int:
    """Samples per chunk: a whole batch (--parallel), or the run split evenly when it has less than a batch a
    worker. Whole batches: on one thread, 72 samples in chunks of 18 decoded at 0.75-0.8x the speed of chunks of
    32 (bench, Gemma 3 270M). A chunk is what a dying worker loses, and what the driver waits for at once."""
    return max(1, min(parallel, -(-n_pending // n_workers)))


def chunks(pending, size: int, key: Callable = lambda s: s.prompt_idx, pack: bool = False) -> list[list]:
    """Pending items grouped by `key` (a sweep's prompt, a fork's position; plan order), each group cut into
    pieces of at most `size`; with `pack`, consecutive pieces are put together while they fit in `size` (a
    fork's positions, a few continuations each, still fill a batch)."""
    groups: dict = {}
    for s in pending:
        groups.setdefault(key(s), []).append(s)
    pieces = [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]
    if not pack:
        return pieces
    out: list[list] = []
    for piece in pieces:
        if out and len(out[-1]) + len(piece) <= size:
            out[-1] = out[-1] + piece
        else:
            out.append(piece)
    return out


def chunk_batch(opts) -> int:
    """The batch a chunk is sized by: the run's --parallel (--exact decodes one at a time, chunks still whole)."""
    return DEFAULT_PARALLEL if opts.exact else opts.parallel


def planned_model(entry: dict, base: Model, run: str, again: str) -> Model:
    """A further model of a multi-model run (entry: its planned "path" and "sha256"), loaded with the base's
    options; refused when the file is gone or changed since the run was planned. `run` names the run in the
    message ("comparison"), `again` the command that starts a new one ("comparison")."""
    import os

    from llamalens.store import file_sha256

    path = entry["path"]
    if not os.path.isfile(path):
        raise StoreError(f"{path}, a model of this {run}, is gone; put it back to finish the run")
    if file_sha256(path) != entry["sha256"]:
        raise StoreError(f"{path} changed since this {run} was planned (sha256 {entry['sha256'][:12]}); put the "
                         f"original file back, or start a new {again}")
    return Model(path, base.options)
