"""A compare run's answer units: one model's answer to one question (looks/flips.py), decoded and saved as a unit.

An open prompt is answered greedily on the exact path (core/engine.generate with temperature 0: one sequence, the
prompt tokenized as llama-cpp-python's create_completion does), so the tokens are those `llamalens generate -t 0`
prints; a question with options is scored by choose() (looks/choose.py), every option's logprob kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from llamalens.core.runtime import Model
from llamalens.looks.flips import N_TOP, Answer, Question

EXTRA_VERSION = 1


@dataclass
class AnswerResult:
    sample_idx: int
    answer: Answer
    seconds: float = 0.0

    @property
    def n_scored(self) -> int:
        return len(self.answer.tokens) or sum(self.answer.n_tokens)

    def to_extra(self) -> dict:
        return {"compare": EXTRA_VERSION, "role": "answer", "model": self.answer.model,
                "question": self.answer.question, "answer": self.answer.to_dict(), "seconds": self.seconds}

    @classmethod
    def from_extra(cls, sample_idx: int, x: dict) -> "AnswerResult":
        return cls(sample_idx, Answer.from_dict(x["answer"]), float(x.get("seconds", 0)))


def answer(model: Model, k: int, i: int, q: Question, max_tokens: int) -> Answer:
    """Model k's answer to question i."""
    if q.options:
        from llamalens.looks.choose import choose

        res = choose(model, q.prompt, list(q.options), n_logprobs=1)
        by_option = {o.option: o for o in res.options}
        scored = [by_option[o] for o in q.options]
        return Answer(k, i, scores=[o.total for o in scored], n_tokens=[len(o.tokens) for o in scored],
                      n_bytes=[o.n_bytes for o in scored])
    from llamalens.core.engine import generate
    from llamalens.settings import SamplingSettings

    s = generate(model, q.prompt, SamplingSettings(temperature=0), max_tokens=max_tokens, n_logprobs=N_TOP)
    toks = [t for t in s.tokens if not t.eog]
    return Answer(k, i, tokens=[t.id for t in toks], texts=[t.text for t in toks], logprobs=[t.logprob for t in toks],
                  tops=[[[a.id, a.logprob] for a in t.top] for t in toks], text=s.text, finish=s.finish_reason)


def answer_units(model: Model, k: int, units: dict[int, int], questions: list[Question], max_tokens: int):
    """Model k's pending answers ({question: sample_idx}), each an AnswerResult as it is decoded."""
    for i, sample_idx in sorted(units.items()):
        t0 = time.perf_counter()
        a = answer(model, k, i, questions[i], max_tokens)
        yield AnswerResult(sample_idx, a, time.perf_counter() - t0)
