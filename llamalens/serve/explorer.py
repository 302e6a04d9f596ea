"""The use-case layer of `llamalens serve`: one loaded model, its held context, the run store.

Every call that touches the model's context runs on one worker thread (the context's one owner), a job at a
time: a probe (the raw row of one position, for the sampler's live view) before any waiting generation, the
generations in the order they came. A job's events reach its HTTP stream through `emit`; `cancel` ends a
generation after its current token, and what it generated is stored. Store reads run on the caller's thread,
each thread with its own SQLite connection (WAL: readers never wait for the writer).

    generate(GenerationSpec)     a new tree and its root branch           -> events: queued, start, token..., done
                                 (prefilled anew: the numbers of `llamalens generate`)
    branch(BranchSpec)           a branch of a tree, forced at a position -> the same events
                                 (the cells it shares with the line are reused, unless exact)
    position(tree, branch, at, settings, top)   the chain at that position, on its cached raw row
    complete(CompletionSpec)     the OpenAI-compatible completion (serve/openai.py builds the spec)
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llamalens.core.engine import Request
from llamalens.core.held import Held
from llamalens.errors import InvalidInput, LlamalensError
from llamalens.records import RunOptions, Sample
from llamalens.run.tree import TreeExtra, add_branch, create_tree, forced_record, load_tree
from llamalens.settings import SamplingSettings
from llamalens.store import Store

MAX_TOKENS = 1024  # generated tokens a request, at most
MAX_TOP = 20  # alternatives a token
MAX_PROMPT_CHARS = 100_000
MAX_FORCED = 64  # tokens a typed continuation
MAX_REPLAY = 256  # positions whose rows XTC / mirostat replay in the live view
ROW_CACHE = 48  # raw rows kept for the live view (n_vocab floats each: 1 MiB at a 262k vocabulary)


@dataclass
class GenerationSpec:
    prompt: str  # the text the model reads (a chat already rendered)
    prompt_tokens: list[int]
    settings: SamplingSettings
    max_tokens: int
    top: int
    name: str | None = None
    chat: dict | None = None
    exact: bool = False  # prefill the whole prompt (Held.generate reuse=False)


@dataclass
class BranchSpec:
    tree: int
    parent: int
    at: int
    forced: list[int]
    settings: SamplingSettings
    max_tokens: int
    top: int
    exact: bool = False


@dataclass
class Job:
    """One piece of work for the worker; `events` go to its client."""

    run: Callable[["Job"], None]
    emit: Callable[[dict], None]
    priority: int = 1  # 0: a probe, ahead of waiting generations
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None
    label: dict = field(default_factory=dict)


class Explorer:
    """The model, its held context and the store behind `llamalens serve` (module docstring)."""

    def __init__(self, model, store_path, exact: bool = False, command: str = "llamalens serve",
                 chat_template: str | None = None):
        self.model, self.store_path, self.exact, self.command = model, store_path, exact, command
        self.chat_template = chat_template
        self.held = Held(model)
        self._local = threading.local()
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self.running: Job | None = None
        self._rows: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._trees: dict[int, int] = {}  # trees this server made, and its writer id in each
        self._worker = threading.Thread(target=self._work, name="llamalens-model", daemon=True)
        self._worker.start()

    # -- the store, one connection a thread --------------------------------------------------------------------
    def store(self) -> Store:
        st = getattr(self._local, "store", None)
        if st is None:
            st = self._local.store = Store(self.store_path)
        return st

    # -- chats --------------------------------------------------------------------------------------------------
    @property
    def chat_label(self) -> str | None:
        """The template chats are rendered with ("gguf", "builtin:NAME", "file:PATH"), None when there is none."""
        from llamalens.core.chat import resolve_template

        try:
            return resolve_template(self.model, self.chat_template)[0]
        except LlamalensError:
            return None

    def render_chat(self, messages, system=None):
        """A conversation rendered with the server's template (chat.ChatPrompt)."""
        from llamalens.core.chat import check_messages, render, with_system

        msgs = check_messages(messages, "chat")
        if system is not None and not isinstance(system, str):
            raise InvalidInput("chat: \"system\" must be a string")
        if sum(len(m["content"]) for m in msgs) + len(system or "") > MAX_PROMPT_CHARS:
            raise InvalidInput(f"chat: the messages are longer than {MAX_PROMPT_CHARS} characters")
        return render(self.model, with_system(msgs, system or None), self.chat_template)

    # -- the worker --------------------------------------------------------------------------------------------
    def waiting(self) -> int:
        """Generations waiting in the queue (a cancelled one, whose client left, no longer counts)."""
        return sum(1 for _, _, j in list(self._jobs.queue) if j is not None and j.priority and not j.cancel.is_set())

    def submit(self, job: Job) -> Job:
        ahead = self.waiting() + (self.running is not None and self.running.priority > 0)
        if job.priority:
            job.emit({"type": "queued", "ahead": ahead})
        self._jobs.put((job.priority, next(self._order), job))
        return job

    def adopted(self, tree: int) -> None:
        """A tree this server grows: it registers as its writer (a server that dies leaves it 'interrupted'), and
        marks it done when it stops."""
        self._trees[tree] = self.store().claim(tree)

    def state(self) -> dict:
        r = self.running
        return {"running": r.label if r is not None and r.priority else None, "queued": self.waiting(),
                "cache": dict(self.held.counts)}

    def cancel_running(self) -> bool:
        r = self.running
        if r is not None and r.priority:
            r.cancel.set()
            return True
        return False

    def _work(self) -> None:
        while True:
            _, _, job = self._jobs.get()
            if job is None:
                return
            if job.cancel.is_set():  # its client left while it waited
                job.done.set()
                continue
            self.running = job
            try:
                job.run(job)
            except LlamalensError as e:
                job.error = e
                job.emit({"type": "error", "message": str(e)})
            except Exception as e:  # noqa: BLE001 - a failed job answers its client; the server goes on
                job.error = e
                job.emit({"type": "error", "message": f"{type(e).__name__}: {e}"})
            finally:
                self.running = None
                job.done.set()

    def call(self, fn: Callable[[], object], timeout: float = 300) -> object:
        """Run fn on the worker ahead of waiting generations; its result (or its error, raised here)."""
        job = self.submit(Job(lambda j: setattr(j, "result", fn()), lambda ev: None, priority=0))
        if not job.done.wait(timeout):
            raise LlamalensError("the model is busy; try again when the generation running now ends")
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        for j in list(self._jobs.queue):
            j[2].cancel.set()
        if self.running is not None:
            self.running.cancel.set()
        self._jobs.put((9, next(self._order), None))
        self._worker.join(timeout=30)
        st = self.store()
        for t, writer in self._trees.items():
            try:
                st.set_status(t, "done")
                st.release(writer)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self.held.close()

    # -- generations --------------------------------------------------------------------------------------------
    def generate(self, spec: GenerationSpec, emit: Callable[[dict], None]) -> Job:
        self._check(spec.prompt_tokens, spec.max_tokens, spec.top)

        def run(job: Job) -> None:
            st = self.store()
            options = RunOptions(max_tokens=spec.max_tokens, n_logprobs=spec.top, exact=self.exact, parallel=1,
                                 prompts=(spec.prompt,), model_options=self.model.options,
                                 chats=(spec.chat,) if spec.chat else ())
            tree = create_tree(st, self.model, spec.prompt, spec.prompt_tokens, options, spec.name, self.command)
            self.adopted(tree)
            extra = TreeExtra(prompt_tokens=list(spec.prompt_tokens))
            spec.exact = True  # a tree's root is prefilled anew: the tokens and numbers of `llamalens generate`
            self._decode(job, st, tree, spec.prompt, list(spec.prompt_tokens), spec, extra)

        return self.submit(Job(run, emit, label={"kind": "generate"}))

    def branch(self, spec: BranchSpec, emit: Callable[[dict], None]) -> Job:
        tree = load_tree(self.store(), spec.tree)
        self._check_branch(tree, spec)
        ids = tree.generation_prompt(spec.parent, spec.at, spec.forced)
        self._check(ids, spec.max_tokens, spec.top)

        def run(job: Job) -> None:
            st = self.store()
            stem = ids[: len(ids) - len(spec.forced)]
            rows = self.held.rows(ids, len(stem) - 1) if spec.forced else []
            forced = [forced_record(self.model, rows[k], tok, spec.at + k, spec.top) for k, tok in enumerate(spec.forced)]
            extra = TreeExtra(spec.parent, spec.at, forced)
            self._decode(job, st, spec.tree, tree.prompt, ids, spec, extra)

        return self.submit(Job(run, emit, label={"kind": "branch", "tree": spec.tree}))

    def _decode(self, job: Job, st: Store, tree: int, prompt: str, ids: list[int], spec: GenerationSpec | BranchSpec,
                extra: TreeExtra) -> None:
        settings, max_tokens, top = spec.settings, spec.max_tokens, spec.top
        b = add_branch(st, tree, prompt, settings, extra)
        job.label.update(tree=tree, branch=b)
        job.emit({"type": "start", "tree": tree, "branch": b, "parent": extra.parent, "at": extra.at, "prompt": prompt,
                  "forced": [r.to_dict() for r in extra.forced],
                  "prompt_tokens": [{"id": t, "text": self.model.token_text(t)[0]} for t in ids]})
        t0 = time.perf_counter()

        def on_record(rec) -> bool:
            job.emit({"type": "token", "record": rec.to_dict()})
            return job.cancel.is_set()

        sample = self.held.generate(Request(prompt, settings, max_tokens, top, prompt_tokens=list(ids)), on_record,
                                    reuse=not (spec.exact or self.exact))
        st.save_sample(tree, b, sample, extra=extra.to_dict())
        job.result = sample
        job.emit({"type": "done", "tree": tree, "branch": b, "finish_reason": sample.finish_reason, "text": sample.text,
                  "first_token_ms": sample.timing.first_token_ms, "ms": (time.perf_counter() - t0) * 1000})

    def complete(self, ids: list[int], settings: SamplingSettings, max_tokens: int, top: int, stop: tuple[str, ...],
                 emit: Callable[[dict], None]) -> Job:
        """An OpenAI-style completion on the held context (its prompt cache); not stored."""
        self._check(ids, max_tokens, top)

        def run(job: Job) -> None:
            def on_record(rec) -> bool:
                job.emit({"type": "token", "record": rec})
                return job.cancel.is_set()

            job.result = self.held.generate(Request("", settings, max_tokens, top, stop, prompt_tokens=list(ids)),
                                            on_record, reuse=not self.exact)
            job.emit({"type": "done"})

        return self.submit(Job(run, emit, label={"kind": "completion"}))

    # -- checks --------------------------------------------------------------------------------------------------
    def _check(self, ids: list[int], max_tokens: int, top: int) -> None:
        if not ids:
            raise InvalidInput("the prompt is empty and the model adds no BOS token; give a prompt")
        if not 1 <= max_tokens <= MAX_TOKENS:
            raise InvalidInput(f"max_tokens {max_tokens} is out of range (1 to {MAX_TOKENS})")
        if not 0 <= top <= MAX_TOP:
            raise InvalidInput(f"top {top} is out of range (0 to {MAX_TOP} alternatives a token)")
        n_vocab = self.model.n_vocab
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidInput(f"token id {bad} is not in the model's vocabulary (0 to {n_vocab - 1})")
        if len(ids) >= self.held.n_ctx:
            raise InvalidInput(f"the prompt ({len(ids)} tokens) leaves no room in the context ({self.held.n_ctx} "
                               "tokens); shorten it, or restart the server with a larger --ctx")

    def made_here(self, info) -> bool:
        """Whether a stored run was made with the loaded model file (the same sha256)."""
        return bool(info.model_hash) and info.model_hash == self.store().model_hash(self.model.path)

    def _check_branch(self, tree, spec: BranchSpec) -> None:
        if spec.parent not in tree.branches:
            raise InvalidInput(f"tree {spec.tree} has no branch {spec.parent}")
        n = len(tree.path(spec.parent))
        if not 0 <= spec.at <= n:
            raise InvalidInput(f"position {spec.at} is outside branch {spec.parent} (0 to {n})")
        if not 1 <= len(spec.forced) <= MAX_FORCED:
            raise InvalidInput(f"a branch forces 1 to {MAX_FORCED} tokens (got {len(spec.forced)})")
        if not self.made_here(tree.info):
            raise InvalidInput(f"tree {spec.tree} was made with another model file ({tree.info.model.name}); "
                               "restart the server with that model to branch it")

    # -- the live view of one position -------------------------------------------------------------------------
    def row(self, ids: list[int]) -> np.ndarray:
        """The raw logits after ids: kept from an earlier call, or read through the held context's probe."""
        key = tuple(ids)
        with self._lock:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
                return row
        row = self.call(lambda: self.held.row(list(ids)))
        with self._lock:
            self._rows[key] = row
            while len(self._rows) > ROW_CACHE:
                self._rows.popitem(last=False)
        return row

    def position(self, tree_id: int, branch: int, at: int, settings: SamplingSettings, top: int) -> dict:
        """The chain of `settings` at position `at` of a branch, applied to that position's raw logits."""
        from llamalens.core.sampler import stage_names
        from llamalens.looks.next_token import chains_view, replays

        tree = load_tree(self.store(), tree_id)
        if branch not in tree.branches:
            raise InvalidInput(f"tree {tree_id} has no branch {branch}")
        path = tree.path(branch)
        if not 0 <= at < max(len(path), 1):
            raise InvalidInput(f"position {at} is outside branch {branch} (0 to {len(path) - 1})")
        if not 1 <= top <= MAX_TOP:
            raise InvalidInput(f"top {top} is out of range (1 to {MAX_TOP})")
        history = [t.id for t in path[:at]]
        ids = tree.prompt_tokens + history
        t0 = time.perf_counter()
        row = self.row(ids)
        rows: list = [None] * len(history)
        if settings.chain == "llama.cpp" and replays(stage_names(settings, self.model), settings):
            if at > MAX_REPLAY:
                raise InvalidInput(f"XTC, mirostat and adaptive-p replay every earlier position; the live view does "
                                   f"so up to position {MAX_REPLAY}; use `llamalens next` for later ones")
            rows = list(self.call(lambda: self.held.rows(ids, len(tree.prompt_tokens) - 1)))[:-1]
        view = chains_view(self.model, tree.prompt, tree.prompt_tokens, history, rows + [row], [settings], top)
        chain = view.chains[0]
        removed_by = []
        for k in range(len(view.top)):
            gone = next((s.stage for s in chain.stages[1:] if s.probs[k] == 0), None)
            removed_by.append(gone)
        return {"position": at, "entropy": view.entropy, "top": [
            {"id": a.id, "text": a.text, "bytes": a.bytes, "logprob": a.logprob, "prob": a.prob, "rank": r + 1}
            for r, a in enumerate(view.top)],
            "chain": [{"stage": s.stage, "survivors": s.survivors, "probs": s.probs} for s in chain.stages],
            "final": {"survivors": chain.final.survivors, "probs": chain.final.probs}, "removed_by": removed_by,
            "ms": (time.perf_counter() - t0) * 1000}


def sample_of(job: Job) -> Sample | None:
    return job.result if isinstance(job.result, Sample) else None
