"""An evaluation as a stored run (run/evaluation.py): lm-eval makes the requests, the run scores them, lm-eval
computes the metrics from what was stored.

    plan     lm-eval's simple_evaluate with a Recorder: each request checked (its tokens made, its generation
             settings read) and kept, answered with placeholders; once per model, since a chat template is a
             model's own and may render the same task differently
    decode   the eval run kind, through the run lifecycle (resumable)
    metrics  simple_evaluate again with a Replay, which answers every request from the store, in the order lm-eval
             asks (each checked against the stored one: a task whose data changed since is refused); lm-eval's own
             result and sample files are written from this pass

Both passes see the same requests in the same order: lm-eval seeds its few-shot sampling with fixed seeds.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

from lm_eval.api.model import LM

from llamalens.errors import StoreError
from llamalens.eval import lm_tokens
from llamalens.eval.generation import plan as plan_generation
from llamalens.eval.harness import EvalStats, LlamalensLM, _where
from llamalens.run.evaluation import Planned


class _Stand(LlamalensLM):
    """A LlamalensLM that decodes nothing (chat templates and lm-eval's attributes come from the class)."""

    def __init__(self, model=None, chat_template=None, name: str = "model"):
        LM.__init__(self)
        self.model, self._owned, self.chat_template_name = model, False, chat_template
        self.exact, self.batch_size, self.stats = False, 1, EvalStats()
        self.max_length = int(model.options.ctx) if model is not None else 0
        self._name = name

    @property
    def tokenizer_name(self) -> str:
        return f"llamalens:{self._name}"


class Recorder(_Stand):
    """lm-eval's requests checked against a model and kept (Planned), in the order lm-eval asks."""

    def __init__(self, model, chat_template=None):
        super().__init__(model, chat_template, model.path.name)
        self.planned: list[Planned] = []

    def _keep(self, type_: str, requests) -> None:
        start = sum(p.type == type_ for p in self.planned)
        self.planned += [Planned(type_, str(r.task_name), int(r.doc_id), start + i, tuple(r.args))
                         for i, r in enumerate(requests)]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        lm_tokens.encode_requests(self.model, [r.args for r in requests], self.max_length, lambda i: _where(requests[i]))
        self._keep("loglikelihood", requests)
        return [(0.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._keep("loglikelihood_rolling", requests)
        return [0.0] * len(requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
        for r in requests:
            plan_generation(self.model, *r.args, self.max_length, _where(r))
        self._keep("generate_until", requests)
        return [""] * len(requests)


def _plain(value):
    """A value as it reads back from the store's JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


class Replay(_Stand):
    """lm-eval's requests answered from an eval run's stored answers of one model (run/evaluation.Request)."""

    def __init__(self, run, k: int, model=None, chat_template=None):
        super().__init__(model, chat_template, run.model_name(k))
        self.answers = {t: sorted((r for r in run.requests[k] if r.type == t), key=lambda r: r.idx)
                        for t in ("loglikelihood", "loglikelihood_rolling", "generate_until")}
        self.seen = dict.fromkeys(self.answers, 0)
        self.run_id = run.info.id

    def _take(self, type_: str, requests) -> list:
        stored, start = self.answers[type_], self.seen[type_]
        out = []
        for i, req in enumerate(requests):
            r = stored[start + i] if start + i < len(stored) else None
            same = r is not None and r.context == req.args[0] and (
                type_ == "loglikelihood_rolling" or (r.continuation == req.args[1] if type_ == "loglikelihood" else True))
            if not same or not r.done:
                raise StoreError(f"run {self.run_id}: {_where(req)} is not the request the run stored (its task's data, "
                                 "its options or lm-eval changed since the run was planned); start a new eval")
            out.append(r)
        self.seen[type_] += len(requests)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return [(r.logprob, bool(r.is_greedy)) for r in self._take("loglikelihood", requests)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return [r.logprob for r in self._take("loglikelihood_rolling", requests)]

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [r.text for r in self._take("generate_until", requests)]


def evaluate_with(lm, spec: dict, manager, tracker=None) -> dict:
    """lm-eval's simple_evaluate over the spec's tasks and options, with `lm` answering."""
    import lm_eval

    with _quiet_git_hash():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=spec["tasks"], num_fewshot=spec["num_fewshot"], limit=spec["limit"], log_samples=True,
            task_manager=manager, evaluation_tracker=tracker, apply_chat_template=spec["apply_chat_template"],
            batch_size=spec["batch_size"])
    if out is None:
        from llamalens.errors import InvalidInput

        raise InvalidInput("lm-eval returned no results (no task produced any request)")
    return out


def per_document(samples: dict | None) -> dict:
    """{task: {doc id: {metric: value}}} from lm-eval's samples: each document's own scores."""
    out: dict = {}
    for task, rows in (samples or {}).items():
        out[task] = {str(s["doc_id"]): {m: s[m] for m in s.get("metrics", []) if isinstance(s.get(m), (int, float))}
                     for s in rows}
    return out


@contextmanager
def _quiet_git_hash():
    """lm-eval records the working directory's git commit with `git describe --always`, whose "fatal: not a git
    repository" reaches the terminal whenever llamalens is run outside a checkout. While inside, lm-eval's
    evaluator asks git the same question with git's complaint discarded (and, failing that, reads the commit
    from a .git folder as lm-eval does), so its results record the same value."""
    import subprocess

    from lm_eval import evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def quiet() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original

