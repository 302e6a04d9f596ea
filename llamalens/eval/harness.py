"""llamalens as an lm-evaluation-harness model: `LlamalensLM`, an `lm_eval.api.model.LM`.

    lm_eval.simple_evaluate(model=ll.eval_model(), tasks=[...])         an instance, from Python
    lm_eval.simple_evaluate(model="llamalens", model_args="model=PATH")  by name, once this module is imported
    llamalens eval --tasks T                                             the command (llamalens/eval/run.py)

Importing this module registers the class in lm-eval's model registry as "llamalens". pyproject.toml also
declares it as an `lm_eval.models` entry point, which lm-eval versions with plugin discovery load by name
(`lm-eval run --model llamalens`); lm-eval 0.4.13 reads no entry points.

loglikelihood and loglikelihood_rolling become token pairs (lm_tokens.py) scored by scoring.py, batched
(contexts shared, many documents a decode) or, with exact=True, each request decoded alone (requests.py). In
batched mode a few pairs of each call are scored both ways: the largest difference is the noise floor
(EvalStats), and contexts whose best two continuations are closer than it are counted as decided by less than
the noise. generate_until runs on the decode engine (generation.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llamalens.errors import InvalidInput
from llamalens.eval import requests as scored


@dataclass
class EvalStats:
    """What the backend did: requests, decoded pairs, time, notes, and the batched mode's noise floor."""

    requests: dict = field(default_factory=dict)  # request type -> count
    pairs: int = 0
    contexts: int = 0  # distinct contexts of the loglikelihood pairs
    seconds: float = 0.0
    noise_floor: float | None = None  # max |batched - exact| logprob over the re-scored pairs (None: exact mode)
    noise_pairs: int = 0
    close_calls: list = field(default_factory=list)  # (task, doc id, margin) of contexts decided by < noise floor
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"requests": dict(self.requests), "pairs": self.pairs, "contexts": self.contexts,
                "seconds": self.seconds, "requests_per_s": sum(self.requests.values()) / self.seconds
                if self.seconds else None, "noise_floor": self.noise_floor, "noise_pairs": self.noise_pairs,
                "close_calls": [list(c) for c in self.close_calls], "notes": list(self.notes)}


def _where(req) -> str:
    task, doc = getattr(req, "task_name", None), getattr(req, "doc_id", None)
    return f"task {task!r}, document {doc}" if task is not None else "a request"


def _batch_size(value) -> int:
    """lm-eval hands batch_size as an int or a string ('auto' included): a number of sequences here."""
    if value in (None, "", "auto") or (isinstance(value, str) and value.startswith("auto")):
        return 32
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"batch_size={value!r}: give a number of sequences decoded together (or 'auto')") from None
    if not 1 <= size <= 256:
        raise InvalidInput(f"batch_size={size} is out of range: 1..256 sequences (llama.cpp's limit)")
    return size


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


@register_model("llamalens")
class LlamalensLM(LM):
    """An lm-eval model on a GGUF model through llamalens (see the module docstring).

    model: a loaded llamalens Model, or what --model takes (a path, a name, None: the default model);
    exact: each request decoded alone; batch_size: sequences decoded together (lm-eval's --batch_size);
    max_length: tokens a request may read (default the model's --ctx); chat_template: a template name or file
    for --apply_chat_template (default the model's own); the rest are ModelOptions (ctx, threads, ...)."""

    def __init__(self, model=None, exact=False, batch_size=None, max_length=None, chat_template=None,
                 max_batch_size=None, device=None, **model_options):
        super().__init__()
        from llamalens.core.runtime import Model

        self.exact = _flag(exact)
        self.batch_size = 1 if self.exact else _batch_size(batch_size)
        self.chat_template_name = chat_template
        self.stats = EvalStats()
        if isinstance(model, Model):
            if model_options:
                raise InvalidInput(f"model options ({', '.join(model_options)}) apply when a model is loaded: give "
                                   "model= as a path or name, or load it with them")
            self.model, self._owned = model, False
        else:
            from llamalens.core.runtime import ModelOptions
            from llamalens.modelfiles.find import resolve_source
            from llamalens.modelfiles.memory import checked_load

            options = ModelOptions(**model_options)
            self.model = checked_load(resolve_source(model), options, self.batch_size)
            self._owned = True
        self.max_length = int(max_length) if max_length else int(self.model.options.ctx)

    def close(self) -> None:
        if self._owned:
            self.model.close()
            self._owned = False

    # -- the three request types (requests.py scores them) -----------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        t0 = time.perf_counter()
        args = [r.args for r in requests]
        outs = scored.loglikelihood(self.model, args, self.max_length, lambda i: _where(requests[i]), self.exact,
                                    self.batch_size)
        self._noise(outs)
        self._close_calls(requests, outs)
        self._done("loglikelihood", len(requests), len(outs), scored.notes(outs), t0)
        self.stats.contexts += len({a[0] for a in args})
        return [(o.logprob, o.is_greedy) for o in outs]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        t0 = time.perf_counter()
        outs = scored.rolling(self.model, [req.args[0] for req in requests], self.max_length, self.exact,
                              self.batch_size)
        self._noise(outs)
        self._done("loglikelihood_rolling", len(requests), len(outs), [], t0)
        return [o.logprob for o in outs]

    def _noise(self, outs) -> None:
        """The largest batched-vs-alone difference among the re-scored requests (batched mode)."""
        diffs = [abs(o.logprob - o.exact) for o in outs if o.exact is not None]
        if diffs:
            self.stats.noise_floor = max(self.stats.noise_floor or 0.0, max(diffs))
            self.stats.noise_pairs += len(diffs)

    def _close_calls(self, requests, outs) -> None:
        """The documents whose best two continuations (of one context) are closer than the noise floor."""
        if self.stats.noise_floor is None:
            return
        by_doc: dict = {}
        for req, o in zip(requests, outs):
            by_doc.setdefault((req.task_name, req.doc_id, req.args[0]), []).append(o.logprob)
        for (task, doc, _ctx), lps in by_doc.items():
            if len(lps) > 1:
                best = sorted(lps, reverse=True)
                if best[0] - best[1] < self.stats.noise_floor:
                    self.stats.close_calls.append((task, doc, best[0] - best[1]))

    def _done(self, kind: str, n_requests: int, n_pairs: int, notes: list[str], t0: float) -> None:
        self.stats.requests[kind] = self.stats.requests.get(kind, 0) + n_requests
        self.stats.pairs += n_pairs
        self.stats.notes += notes
        self.stats.seconds += time.perf_counter() - t0

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        t0 = time.perf_counter()
        outs = scored.generations(self.model, [req.args for req in requests], self.max_length,
                                  lambda i: _where(requests[i]), self.batch_size)
        cut = sum("truncated" in o.notes for o in outs)
        notes = [f"{cut} generation prompt(s) longer than --ctx less max_gen_toks lost their oldest tokens"] if cut else []
        self._done("generate_until", len(requests), len(outs), notes, t0)
        return [o.text for o in outs]

    # -- chat templates (--apply_chat_template) ----------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return f"llamalens:{self.model.path.name}"

    def chat_template(self, chat_template=False) -> str | None:
        from llamalens.core.chat import resolve_template

        name = chat_template if isinstance(chat_template, str) else self.chat_template_name
        label, source = resolve_template(self.model, name)
        return source if source is not None else label

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from llamalens.core.chat import check_messages, render

        if not add_generation_prompt:
            raise InvalidInput("this task continues the assistant's turn (a gen_prefix); llamalens's backend renders "
                               "chat prompts for a new assistant reply only: run it without --apply-chat-template")
        return render(self.model, check_messages(chat_history, "the task's chat history"), self.chat_template_name).text

