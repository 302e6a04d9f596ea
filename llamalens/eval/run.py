"""`llamalens eval` and ll.evaluate: lm-eval's tasks on a llamalens model, offline, one call for both doors.

    ll.evaluate(tasks, ...) / `llamalens eval`  -> EvalRequest; ll.eval_model(...) -> LlamalensLM for lm-eval's calls
    EvalRequest.check()  -> lm-eval installed, options in range, the tasks known (include path read)
    run_request(request) -> the model loaded (LlamalensLM), lm_eval.simple_evaluate, lm-eval's own result and
                            sample files written when output_path is given -> EvalResult (results, stats, table)

Offline: HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set (unless the caller set them), so a task whose data is
not local fails at once with `datasets`' own message instead of waiting on a network that is not there; a
task written as a local YAML with `dataset_path: json` and `data_files` runs anywhere (docs/eval.md).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

from llamalens.errors import InvalidInput, MissingExtra

TASKS = Path(__file__).resolve().parent / "tasks"  # the shipped tasks: always on the include path
MAX_FEWSHOT = 64
MAX_TASKS = 64
MAX_MODELS = 16


def lm_eval_module():
    """lm_eval, or MissingExtra naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise MissingExtra("evaluating needs lm-evaluation-harness, llamalens's optional 'eval' extra: "
                           "pip install 'llamalens[eval]' (or pip install lm-eval)") from None
    return lm_eval


def offline() -> None:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(name, "1")


@dataclass
class EvalRequest:
    """One evaluation: lm-eval's options, and the model's (ModelOptions fields, in model_options)."""

    tasks: list[str]
    model: object = None  # a loaded Model, or what --model takes; a list of them: several models side by side
    limit: float | None = None
    num_fewshot: int | None = None
    output_path: str | None = None
    include_path: str | None = None
    log_samples: bool = False
    batch_size: int | None = None
    apply_chat_template: bool = False
    chat_template: str | None = None
    exact: bool = False
    model_options: dict = field(default_factory=dict)

    @property
    def models(self) -> list:
        return list(self.model) if isinstance(self.model, (list, tuple)) else [self.model]

    def spec(self) -> dict:
        """What an eval run records of the request (run/evaluation.py's spec, less the models)."""
        import lm_eval

        return {"tasks": self.tasks, "limit": self.limit, "num_fewshot": self.num_fewshot,
                "include_path": str(Path(self.include_path).resolve()) if self.include_path else None,
                "apply_chat_template": self.apply_chat_template, "chat_template": self.chat_template,
                "exact": self.exact, "batch_size": 1 if self.exact else (self.batch_size or 32),
                "lm_eval": lm_eval.__version__}

    def check(self):
        """Everything that can be checked before a model is loaded; returns lm-eval's TaskManager."""
        lm_eval_module()
        if not 1 <= len(self.models) <= MAX_MODELS:
            raise InvalidInput(f"{len(self.models)} models: evaluate 1 to {MAX_MODELS} at once (-m repeated)")
        tasks = [t.strip() for t in self.tasks if t and t.strip()]
        if not tasks:
            raise InvalidInput("give at least one task: --tasks NAME[,NAME...] (see docs/eval.md for a local one)")
        if len(tasks) > MAX_TASKS:
            raise InvalidInput(f"{len(tasks)} tasks at once is more than {MAX_TASKS}; run them in several calls")
        self.tasks = tasks
        if self.limit is not None and not 0 < self.limit < float("inf"):
            raise InvalidInput(f"--limit {self.limit} must be a number > 0 (a count of documents, or a fraction below 1)")
        if self.num_fewshot is not None and not 0 <= self.num_fewshot <= MAX_FEWSHOT:
            raise InvalidInput(f"--num-fewshot {self.num_fewshot} is out of range: 0..{MAX_FEWSHOT}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise InvalidInput(f"--include-path {self.include_path}: not a folder; give the folder of your task YAMLs")
        if self.log_samples and not self.output_path:
            raise InvalidInput("--log-samples writes lm-eval's sample files into --output-path: give one")
        return self._task_manager()

    def _task_manager(self):
        """lm-eval's TaskManager over the shipped tasks and --include-path; lm-eval's own thousands of task YAMLs
        are indexed too (seconds) only when a task is not found there."""
        from lm_eval.tasks import TaskManager

        paths = [str(TASKS)] + ([str(self.include_path)] if self.include_path else [])
        manager = TaskManager(include_path=paths, include_defaults=False)
        if any(not manager.match_tasks([t]) for t in self.tasks):
            manager = TaskManager(include_path=paths)
        unknown = [t for t in self.tasks if not manager.match_tasks([t])]
        if unknown:
            where = f" in {self.include_path} or" if self.include_path else ""
            raise InvalidInput(f"unknown task(s): {', '.join(unknown)}: no such task{where} among lm-eval's own; "
                               "check the name (`lm-eval ls tasks`), or give --include-path DIR with its YAML")
        return manager


@dataclass
class EvalResult:
    """lm-eval's results dict (the first model's), its samples, the backend's figures (EvalRun.backend), the files
    written, the run, and with several models each one's results and figures (`models`)."""

    results: dict
    stats: dict
    samples: dict | None = None
    files: list[str] = field(default_factory=list)
    run_id: int | None = None
    models: list[dict] = field(default_factory=list)  # per model: name, file, results (lm-eval's), backend
    disagreements: list[dict] = field(default_factory=list)

    def metric(self, task: str, name: str, model: int = 0):
        """A task's metric as lm-eval reports it ('acc,none', or 'acc' for the 'none' filter), of model k."""
        row = (self.models[model]["results"] if self.models else self.results)["results"][task]
        return row[name] if name in row else row[f"{name},none"]

    def table(self) -> str:
        from lm_eval.utils import make_table

        out = make_table(self.results)
        if self.results.get("groups"):
            out += "\n" + make_table(self.results, "groups")
        return out

    def to_dict(self) -> dict:
        return {"run": self.run_id, "results": self.results.get("results", {}), "groups": self.results.get("groups", {}),
                "n-shot": self.results.get("n-shot", {}), "backend": self.stats, "files": self.files,
                "models": [{k: v for k, v in m.items() if k != "full"} for m in self.models],
                "disagreements": self.disagreements}


def run_request(request: EvalRequest, store=None, name: str | None = None, command: str = "", on_model=None,
                on_progress=None) -> EvalResult:
    """Run the request's tasks as an eval run in `store` (a Store or its path; request.check() first):
    `on_model(model)` is told once the first model is loaded, `on_progress` as the run lifecycle's. A loaded
    Model as request.model is used as it is (and left open)."""
    from llamalens.run import lifecycle
    from llamalens.run.evaluation import EVAL, start_eval
    from llamalens.store import Store

    manager = request.check()
    offline()
    st = store if isinstance(store, Store) else Store(store)
    base, owned = _load(request.models[0], request)
    try:
        if on_model:
            on_model(base)
        spec = {**request.spec(), "max_length": int(base.options.ctx)}
        plans, spec["models"] = _plan(st, base, request, spec, manager)
        run_id = start_eval(st, base, spec, plans, name, command)
        lifecycle.execute(EVAL, base, st, run_id, on_progress)
        return finish_run(st, run_id, base, manager, request.output_path, request.log_samples)
    finally:
        if owned:
            base.close()


def _load(model, request: EvalRequest):
    """(the model, whether it was loaded here)."""
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.modelfiles.find import resolve_source
    from llamalens.modelfiles.memory import checked_load

    if isinstance(model, Model):
        return model, False
    batch = 1 if request.exact else (request.batch_size or 32)
    return checked_load(resolve_source(model), ModelOptions(**request.model_options), batch), True


def _plan(store, base, request: EvalRequest, spec: dict, manager):
    """Each model's requests (stored.Recorder) and its entry (file, sha256, header)."""
    from llamalens.core.runtime import Model
    from llamalens.eval.stored import Recorder, evaluate_with
    from llamalens.modelfiles.find import resolve_model
    from llamalens.run.compare import model_entry

    plans, entries = [], []
    for k, m in enumerate(request.models):
        model = base if k == 0 else Model(resolve_model(m), base.options)
        try:
            rec = Recorder(model, request.chat_template)
            evaluate_with(rec, spec, manager)
            plans.append(rec.planned)
            entries.append(model_entry(store, model))
        finally:
            if model is not base:
                model.close()
    return plans, entries


def finish_run(store, run_id: int, base, manager, output_path=None, log_samples: bool = False) -> EvalResult:
    """lm-eval's metrics of every model of a decoded eval run (stored.Replay), stored in its spec; the run done."""
    from llamalens.eval.stored import Replay, evaluate_with, per_document
    from llamalens.run.evaluation import load_eval, load_model

    run = load_eval(store, run_id)
    spec, models, files, first = run.spec, [], [], None
    stored = {}
    for k, entry in enumerate(spec["models"]):
        chat = base if k == 0 else load_model(entry, base) if spec["apply_chat_template"] else None
        try:
            tracker = _tracker(_output_for(output_path, k, run))
            out = evaluate_with(Replay(run, k, chat, spec.get("chat_template")), spec, manager, tracker)
        finally:
            if chat is not None and chat is not base:
                chat.close()
        out["config"]["model"] = "llamalens"
        out["config"]["model_args"] = {"model": entry["path"], "exact": spec["exact"], "batch_size": spec["batch_size"]}
        samples = out.pop("samples", None)
        files += _save(tracker, out, samples, log_samples) if tracker else []
        stored[str(k)] = {"results": out.get("results", {}), "groups": out.get("groups", {}),
                          "n-shot": out.get("n-shot", {}), "docs": per_document(samples)}
        models.append({"name": run.model_name(k), "path": entry["path"], "results": out, "backend": run.backend(k)})
        if k == 0:
            first = (out, samples)
    store.set_extra(run_id, 0, {**spec, "results": stored})
    store.set_status(run_id, "done")
    return EvalResult(first[0], models[0]["backend"], first[1], files, run_id, models,
                      load_eval(store, run_id).disagreements())


def resume_run(store, run_id, model=None, on_model=None, on_progress=None, output_path=None,
               log_samples: bool = False) -> EvalResult:
    """Finish an interrupted eval run (its pending chunks, then the metrics): the run's own models and options."""
    from llamalens.run import lifecycle
    from llamalens.run.evaluation import EVAL, KIND, read_spec

    info = store.run(run_id)
    if info.kind != KIND:
        raise InvalidInput(f"run {info.id} is a {info.kind} run, not an eval run; resume it with "
                           f"`llamalens {info.kind} --resume {info.id}`")
    if info.status == "done":
        raise InvalidInput(f"run {info.id} is already complete; nothing to resume (`llamalens show {info.id}`)")
    spec = read_spec(store, info.id)
    request = EvalRequest(spec["tasks"], model=model or info.model.path, include_path=spec["include_path"],
                          exact=spec["exact"], batch_size=spec["batch_size"],
                          model_options=info.options.model_options.to_dict())
    manager = request.check()
    offline()
    base, owned = _load(request.models[0], request)
    try:
        if on_model:
            on_model(base)
        if info.n_done < info.n_samples:
            lifecycle.execute(EVAL, base, store, info.id, on_progress)
        return finish_run(store, info.id, base, manager, output_path, log_samples)
    finally:
        if owned:
            base.close()


def _output_for(output_path, k: int, run):
    """lm-eval's files of model k: in output_path, or with several models in a folder per model within it."""
    if not output_path or len(run.models) == 1:
        return output_path
    import re

    safe = re.sub(r"[^\w.-]+", "_", run.model_name(k))
    return str(Path(output_path) / f"{k}-{safe}")


def _tracker(output_path):
    if not output_path:
        return None
    from lm_eval.loggers import EvaluationTracker

    return EvaluationTracker(output_path=str(output_path))


def _save(tracker, results: dict, samples, log_samples: bool) -> list[str]:
    """lm-eval's own files: results_<date>.json, and samples_<task>_<date>.jsonl per task with log_samples."""
    before = _files(tracker.output_path)
    tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
    if log_samples and samples:
        for task in results["configs"]:  # (lm-eval's writer rewrites the samples it writes: a copy)
            tracker.save_results_samples(task_name=task, samples=copy.deepcopy(samples[task]))
    return sorted(set(_files(tracker.output_path)) - set(before))


def _files(root) -> list[str]:
    return [str(p) for p in Path(root).rglob("*") if p.is_file()] if Path(root).exists() else []


# -- the Python API (ll.evaluate, ll.eval_model: llamalens/__init__.py loads them from here) ----------------
def eval_model(model=None, *, exact: bool = False, batch_size: int | None = None, chat_template: str | None = None,
               **model_options):
    """An lm-evaluation-harness model (an lm_eval.api.model.LM) on a llamalens model, for lm-eval's own calls:
    lm_eval.simple_evaluate(model=ll.eval_model(), tasks=[...]). exact: each request decoded alone; batch_size:
    sequences decoded together (default 32); .close() frees a model loaded here.

    >>> lm_eval.simple_evaluate(model=ll.eval_model(), tasks=["llamalens_capitals"])  # doctest: +SKIP
    """
    lm_eval_module()
    from llamalens.eval.harness import LlamalensLM

    return LlamalensLM(model=model, exact=exact, batch_size=batch_size, chat_template=chat_template, **model_options)


def evaluate(tasks, *, model=None, limit=None, num_fewshot: int | None = None, output_path=None,
             include_path=None, log_samples: bool = False, batch_size: int | None = None,
             apply_chat_template: bool = False, chat_template: str | None = None, exact: bool = False,
             store=None, name: str | None = None, **model_options) -> EvalResult:
    """lm-eval tasks on a model (or a list of models, side by side), as `llamalens eval` runs them (ll.evaluate):
    an eval run in `store` (a Store or a path; default the run store) named `name`, and an EvalResult with .results
    (lm-eval's dict), .samples, .stats (requests, noise floor, close calls), .table(), .metric(task, name), .run_id,
    and with several models .models and .disagreements.

    >>> ll.evaluate("llamalens_capitals", exact=True).metric("llamalens_capitals", "acc")  # doctest: +SKIP
    """
    from llamalens.arguments import text_list

    return run_request(EvalRequest(text_list(tasks, "tasks"), model=model, limit=limit, num_fewshot=num_fewshot,
                                   output_path=output_path, include_path=include_path, log_samples=log_samples,
                                   batch_size=batch_size, apply_chat_template=apply_chat_template,
                                   chat_template=chat_template, exact=exact, model_options=model_options),
                       store=store, name=name)
