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
    model: object = None  # a loaded Model, or what --model takes
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

    def check(self):
        """Everything that can be checked before a model is loaded; returns lm-eval's TaskManager."""
        lm_eval_module()
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
    """lm-eval's results dict, its samples (per task, each document's requests and responses), the backend's
    stats, and the files written."""

    results: dict
    stats: dict
    samples: dict | None = None
    files: list[str] = field(default_factory=list)

    def metric(self, task: str, name: str):
        """A task's metric as lm-eval reports it ('acc,none', or 'acc' for the 'none' filter)."""
        row = self.results["results"][task]
        return row[name] if name in row else row[f"{name},none"]

    def table(self) -> str:
        from lm_eval.utils import make_table

        out = make_table(self.results)
        if self.results.get("groups"):
            out += "\n" + make_table(self.results, "groups")
        return out

    def to_dict(self) -> dict:
        return {"results": self.results.get("results", {}), "groups": self.results.get("groups", {}),
                "n-shot": self.results.get("n-shot", {}), "backend": self.stats, "files": self.files}


def run_request(request: EvalRequest, on_model=None) -> EvalResult:
    """Run the request's tasks (request.check() first); `on_model(lm)` is told once the model is loaded.
    A loaded Model as request.model is used as it is (and left open)."""
    manager = request.check()
    offline()
    import lm_eval

    from llamalens.eval.harness import LlamalensLM

    lm = LlamalensLM(model=request.model, exact=request.exact, batch_size=request.batch_size,
                     chat_template=request.chat_template, **request.model_options)
    try:
        if on_model:
            on_model(lm)
        tracker = _tracker(request.output_path)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=request.tasks, num_fewshot=request.num_fewshot, limit=request.limit,
            log_samples=True, task_manager=manager, evaluation_tracker=tracker,
            apply_chat_template=request.apply_chat_template, batch_size=lm.batch_size)
    finally:
        lm.close()
    if results is None:
        raise InvalidInput("lm-eval returned no results (no task produced any request)")
    results["config"]["model"] = "llamalens"
    results["config"]["model_args"] = {"model": str(lm.model.path), "exact": lm.exact, "batch_size": lm.batch_size}
    samples = results.pop("samples", None)
    files = _save(tracker, results, samples, request.log_samples) if tracker else []
    return EvalResult(results, lm.stats.to_dict(), samples, files)


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
             **model_options) -> EvalResult:
    """lm-eval tasks on a model, as `llamalens eval` runs them (ll.evaluate): an EvalResult with .results
    (lm-eval's dict), .samples, .stats (requests, noise floor, close calls), .table(), .metric(task, name).

    >>> ll.evaluate("llamalens_capitals", exact=True).metric("llamalens_capitals", "acc")  # doctest: +SKIP
    """
    from llamalens.arguments import text_list

    return run_request(EvalRequest(text_list(tasks, "tasks"), model=model, limit=limit, num_fewshot=num_fewshot,
                                   output_path=output_path, include_path=include_path, log_samples=log_samples,
                                   batch_size=batch_size, apply_chat_template=apply_chat_template,
                                   chat_template=chat_template, exact=exact, model_options=model_options))
