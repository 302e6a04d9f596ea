"""Flips: answers that change when a base model is swapped for another (a quant), as quant publishers report them.

    questions ──► each model answers each one (run/answers.py, inside a compare run):
                  an open prompt: the greedy answer (temperature 0, up to max_tokens, or the end of generation);
                  a question with options: choose()'s pick (the options ranked by their logprob after the prompt)
              ──► Flips: per compared model, the share of prompts whose greedy answer differs from the base's (and
                  at which generated token the two first part), the share of questions whose pick differs from
                  the base's pick, and the accuracy where the questions carry the right answer

Pure: the answers come in as records, the figures go out as dicts and table rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from llamalens.errors import InvalidInput

MAX_QUESTIONS = 10_000
MAX_OPTIONS = 64
MAX_ANSWER_TOKENS = 1024  # --max-tokens of a greedy answer, at most
N_TOP = 5  # a greedy answer's top alternatives kept per token


@dataclass(frozen=True)
class Question:
    """A prompt to answer greedily, or (with options) a multiple-choice question; `answer` the right option."""

    prompt: str
    options: tuple[str, ...] = ()
    answer: str | None = None

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "options": list(self.options), "answer": self.answer}

    @classmethod
    def from_dict(cls, d: dict) -> "Question":
        return cls(d["prompt"], tuple(d.get("options") or ()), d.get("answer"))


def read_questions(path: str, options: tuple[str, ...] = ()) -> list[Question]:
    """The prompts of --prompts: one a line (.txt), or one JSON object a line (.jsonl) with "prompt" and optionally
    "options" (a list of at least two strings) and "answer" (one of them). `options` (--option) apply to every
    prompt that has none of its own."""
    from llamalens.inputs import json_line, read_utf8

    p = Path(path)
    text = read_utf8(p, "--prompts")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--prompts: {p} line {n}"
        if p.suffix == ".jsonl":
            obj = json_line(line, where)
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise InvalidInput(f'{where} is not a JSON object with a "prompt" string; fix it, e.g. '
                                   '{"prompt": "2 + 2 =", "options": ["4", "5"], "answer": "4"}')
            q = Question(obj["prompt"], _options(obj.get("options"), where) or tuple(options), obj.get("answer"))
        else:
            q = Question(line, tuple(options))
        check_question(q, where)
        out.append(q)
        if len(out) > MAX_QUESTIONS:
            raise InvalidInput(f"--prompts: {p} holds more than {MAX_QUESTIONS:,} prompts; split it")
    if not out:
        raise InvalidInput(f"--prompts: {p} holds no prompts; one per line (.txt) or JSON lines (.jsonl)")
    return out


def _options(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise InvalidInput(f'{where}: "options" must be a list of strings, e.g. ["yes", "no"]')
    return tuple(value)


def check_question(q: Question, where: str) -> None:
    """Options: none, or 2 to MAX_OPTIONS distinct non-empty strings; an answer only with options, one of them."""
    if q.options:
        if len(q.options) < 2:
            raise InvalidInput(f"{where}: give at least two options to choose between (got {len(q.options)})")
        if len(q.options) > MAX_OPTIONS:
            raise InvalidInput(f"{where}: {len(q.options)} options are more than a question takes ({MAX_OPTIONS})")
        if any(not o for o in q.options):
            raise InvalidInput(f"{where}: an option is empty; every option needs some text")
        if len(set(q.options)) != len(q.options):
            raise InvalidInput(f"{where}: an option is given twice; each option once")
    if q.answer is not None:
        if not isinstance(q.answer, str) or q.answer not in q.options:
            raise InvalidInput(f'{where}: "answer" {json.dumps(q.answer)[:40]} is not one of the options; give the '
                               "right option's text exactly (or no answer)")


@dataclass
class Answer:
    """One model's answer to one question: a greedy answer (tokens) or the options' scores (in the given order)."""

    model: int
    question: int
    tokens: list[int] = field(default_factory=list)  # greedy: the generated ids (the end-of-generation one excluded)
    texts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[list]] = field(default_factory=list)  # per token, its top alternatives [[id, logprob], ...]
    text: str = ""
    finish: str = ""
    scores: list[float] = field(default_factory=list)  # options: total logprob of each option after the prompt
    n_tokens: list[int] = field(default_factory=list)
    n_bytes: list[int] = field(default_factory=list)

    def pick(self, normalize: str = "none") -> int:
        """The index of the option this model ranks first (choose()'s pick; the first of equal scores)."""
        s = [score_of(t, n, b, normalize) for t, n, b in zip(self.scores, self.n_tokens, self.n_bytes)]
        return max(range(len(s)), key=lambda i: (s[i], -i))

    def logprob_of(self, position: int, token: int) -> float | None:
        """This model's logprob of `token` at a generated position, when it is among the kept alternatives."""
        if position < len(self.tokens) and self.tokens[position] == token:
            return self.logprobs[position]
        if position < len(self.tops):
            return next((lp for i, lp in self.tops[position] if i == token), None)
        return None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "Answer":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def score_of(total: float, n_tokens: int, n_bytes: int, normalize: str) -> float:
    """An option's score as choose() ranks it (looks/choose.py OptionScore.score)."""
    if normalize == "token":
        return total / max(n_tokens, 1)
    if normalize == "byte":
        return total / max(n_bytes, 1)
    return total


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first generated position where two greedy answers differ (one ending counts); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class Flips:
    """Every model's answers against the base's (model 0), per question."""

    questions: list[Question]
    models: list[dict]  # each model's header description, the base first (model k = models[k])
    answers: dict[tuple[int, int], Answer]  # (model, question) -> its answer, as far as decoded
    normalize: str = "none"
    max_tokens: int = 0

    def open_questions(self) -> list[int]:
        return [i for i, q in enumerate(self.questions) if not q.options]

    def choice_questions(self) -> list[int]:
        return [i for i, q in enumerate(self.questions) if q.options]

    def detail(self, k: int, i: int) -> dict | None:
        """Model k against the base on question i: whether its answer differs, and where (greedy) or what each
        picked (options); None until both answered."""
        a, b = self.answers.get((0, i)), self.answers.get((k, i))
        if a is None or b is None:
            return None
        q = self.questions[i]
        if q.options:
            pa, pb = a.pick(self.normalize), b.pick(self.normalize)
            out = {"question": i, "flipped": pa != pb, "base_pick": q.options[pa], "pick": q.options[pb]}
            if q.answer is not None:
                out.update(base_right=q.options[pa] == q.answer, right=q.options[pb] == q.answer)
            return out
        at = first_difference(a.tokens, b.tokens)
        out = {"question": i, "flipped": at is not None, "at": at, "base_text": a.text, "text": b.text}
        if at is not None:
            tok_a = a.tokens[at] if at < len(a.tokens) else None
            tok_b = b.tokens[at] if at < len(b.tokens) else None
            out.update(base_token=a.texts[at] if tok_a is not None else None,
                       token=b.texts[at] if tok_b is not None else None,
                       lp_token=b.logprobs[at] if tok_b is not None else None,
                       lp_base_token=b.logprob_of(at, tok_a) if tok_a is not None else None)
        return out

    def summary(self, k: int) -> dict:
        """Model k's flip figures: greedy answers that differ from the base's (share, and the median generated
        position of the first difference), option picks that differ, accuracy where the questions say."""
        open_d = [d for i in self.open_questions() if (d := self.detail(k, i)) is not None]
        pick_d = [d for i in self.choice_questions() if (d := self.detail(k, i)) is not None]
        at = sorted(d["at"] for d in open_d if d["flipped"])
        graded = [d for d in pick_d if "right" in d]
        return {"model": k, "prompts": len(open_d), "answers_differ": sum(d["flipped"] for d in open_d),
                "answers_differ_share": _share(sum(d["flipped"] for d in open_d), len(open_d)),
                "first_difference_median": float(_median(at)) if at else None,
                "questions": len(pick_d), "picks_flipped": sum(d["flipped"] for d in pick_d),
                "picks_flipped_share": _share(sum(d["flipped"] for d in pick_d), len(pick_d)),
                "graded": len(graded), "accuracy": _share(sum(d["right"] for d in graded), len(graded)),
                "base_accuracy": _share(sum(d["base_right"] for d in graded), len(graded))}

    def describe(self) -> str:
        n_open, n_pick = len(self.open_questions()), len(self.choice_questions())
        parts = []
        if n_open:
            parts.append(f"{n_open} prompt(s) answered greedily (temperature 0, at most {self.max_tokens} tokens); "
                         "an answer differs when its tokens differ from the base's, 'first differs' is the median "
                         "generated token where they part")
        if n_pick:
            parts.append(f"{n_pick} multiple-choice question(s): each model picks the option of highest logprob "
                         f"after the prompt (normalize {self.normalize}); a flip is a pick that differs from the "
                         "base's")
        return "; ".join(parts) + "."

    def header(self) -> list[str]:
        return ["model", "quantization", "answers differ", "first differs (token)", "picks flipped", "accuracy"]

    def rows(self, order: list[int] | None = None) -> list[list]:
        out = []
        for k in order or range(1, len(self.models)):
            s = self.summary(k)
            out.append([self.models[k].get("name") or "?", self.models[k].get("quantization") or "?",
                        _fraction(s["answers_differ"], s["prompts"]),
                        "" if s["first_difference_median"] is None else f"{s['first_difference_median']:g}",
                        _fraction(s["picks_flipped"], s["questions"]),
                        "" if not s["graded"] else f"{s['accuracy']:.1%} (base {s['base_accuracy']:.1%})"])
        return out

    def to_dict(self) -> dict:
        return {"normalize": self.normalize, "max_tokens": self.max_tokens,
                "questions": [q.to_dict() for q in self.questions],
                "models": [dict(self.summary(k), details=[d for i in range(len(self.questions))
                                                          if (d := self.detail(k, i)) is not None])
                           for k in range(1, len(self.models))],
                "base_answers": [self.answers[(0, i)].to_dict() if (0, i) in self.answers else None
                                 for i in range(len(self.questions))]}


def _share(n: int, total: int) -> float:
    return n / total if total else math.nan


def _median(xs: list) -> float:
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def _fraction(n: int, total: int) -> str:
    return f"{n}/{total} ({n / total:.1%})" if total else ""
