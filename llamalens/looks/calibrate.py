"""`calibrate`: whether the confidence measures mean anything for this model on this kind of question.

A labelled set, one JSON object a line:
    {"question": "...", "options": ["...", "..."], "answer": INDEX or "option text"}
        scored exactly as `choose` scores them (looks/score.py: each option's total logprob after the question);
        the prediction is the best option. Measures: option_prob (the best option's share of the softmax over the
        options' scores), option_margin (its share minus the runner-up's), and the token measures of
        core/confidence.py over the best option's own tokens (no Rényi or Fisher–Rao: scoring keeps no full row).
    {"question": "...", "reference": "..." or ["...", ...], "match": "contains"}  ("match" optional)
        generated greedily (temperature 0, up to max_tokens, stopping at `stop`), then matched: the answer (the span
        --answer REGEX picks out, else the whole text) against each reference, both normalized (lowercase,
        punctuation dropped, whitespace collapsed): exact (equal), prefix (the answer begins with the reference's
        words), contains (the reference's words appear in it, whole words), regex (the reference is a regular
        expression, searched case-insensitively in the answer as it is). Measures: core/confidence.py's over the
        answer span.
Each question's text is the prompt as it is (write "Q: ...\\nA:" in the file for a base model).

For each model, kind of question (choice, generated: fitted apart) and measure (calibrate_model): accuracy, AUROC
of the measure for correctness, the ECE and Brier score of the probability the measure implies
(core/confidence.Measure.implied), the prediction-rejection ratio, the reliability bins and the accuracy-vs-coverage
curve (core/calibration.py), over the items where the measure is defined.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from llamalens.core import calibration as cal
from llamalens.core.confidence import BY_NAME, MEASURES, Measure, answer_span, normalized_answer, sample_measures
from llamalens.errors import InvalidInput
from llamalens.inputs import json_kind, json_line, read_utf8
from llamalens.limits import time_limit
from llamalens.records import Rich

MATCHES = ("exact", "prefix", "contains", "regex")
KINDS = ("choice", "generated")
MAX_ITEMS = 5000
MAX_OPTIONS = 64
MAX_TOKENS = 256  # what --max-tokens may ask per generated answer
MAX_BINS = 50
CHOICE_MEASURES = (
    Measure("option_prob", "option p", True, "the chosen option's share of the softmax over the options' scores "
            "(choice items)", "the value itself", lambda v, _n: v),
    Measure("option_margin", "option margin", True, "the chosen option's share minus the runner-up's (choice items)",
            "the value itself", lambda v, _n: v),
)
ALL_MEASURES = CHOICE_MEASURES + MEASURES


@dataclass(frozen=True)
class Item:
    """One labelled question: a choice (options, the right one's index) or a reference answer to match."""

    line: int
    question: str
    options: tuple[str, ...] = ()
    answer: int | None = None
    references: tuple[str, ...] = ()
    match: str = "contains"

    @property
    def kind(self) -> str:
        return "choice" if self.options else "generated"


def _strings(value, where: str, what: str, fix: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise InvalidInput(f"{where}: \"{what}\" is {json_kind(value)}, not {fix}")
    return tuple(values)


def _item(obj, where: str, n: int, default_match: str) -> Item:
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
        raise InvalidInput(f"{where} is not a JSON object with a non-empty \"question\" string; write e.g. "
                           '{"question": "Q: Is 7 prime?\\nA:", "options": ["yes", "no"], "answer": 0}')
    q = obj["question"]
    if ("options" in obj) == ("reference" in obj):
        raise InvalidInput(f"{where}: give either \"options\" with \"answer\" (scored as choose scores them) or "
                           "\"reference\" (generated, then matched), not both or neither")
    if "reference" in obj:
        match = obj.get("match", default_match)
        if match not in MATCHES:
            raise InvalidInput(f"{where}: \"match\" {match!r} is not one of {', '.join(MATCHES)}")
        refs = _strings(obj["reference"], where, "reference", "a non-empty string or a list of them")
        if match == "regex":
            for r in refs:
                try:
                    re.compile(r)
                except re.error as e:
                    raise InvalidInput(f"{where}: reference {r!r} is not a valid regular expression ({e})") from None
        return Item(n, q, references=refs, match=match)
    options = _strings(obj["options"], where, "options", "a list of non-empty strings")
    if not 2 <= len(options) <= MAX_OPTIONS:
        raise InvalidInput(f"{where}: {len(options)} options; give 2 to {MAX_OPTIONS}")
    ans = obj.get("answer")
    if isinstance(ans, str) and ans in options:
        ans = options.index(ans)
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(options):
        raise InvalidInput(f"{where}: \"answer\" {ans!r:.40} is neither an index 0..{len(options) - 1} into the options "
                           "nor one of their texts; give the right option's index or its exact text")
    return Item(n, q, options=options, answer=ans)


def read_items(path, default_match: str = "contains") -> list[Item]:
    """The labelled set of a JSONL file (the module docstring's two shapes; blank lines skipped)."""
    if default_match not in MATCHES:
        raise InvalidInput(f"--match {default_match!r} is not one of {', '.join(MATCHES)}")
    p = Path(path)
    items = []
    for n, line in enumerate(read_utf8(p, "calibrate").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p} line {n}"
        items.append(_item(json_line(line, where, "write one JSON object a line"), where, n, default_match))
        if len(items) > MAX_ITEMS:
            raise InvalidInput(f"{p} holds more than {MAX_ITEMS} questions; split it into smaller files")
    if len(items) < 2:
        raise InvalidInput(f"{p} holds {len(items)} question(s); calibration needs at least 2 (and both right and "
                           "wrong answers to say anything)")
    return items


def matches(answer: str | None, references: tuple[str, ...], rule: str) -> bool:
    """Whether an answer matches any reference under `rule` (the module docstring)."""
    if answer is None:
        return False
    if rule == "regex":
        with time_limit(2.0, "a reference regex on one answer", "simplify the regular expression"):
            return any(re.search(r, answer, flags=re.IGNORECASE) for r in references)
    a = normalized_answer(answer)
    for ref in references:
        r = normalized_answer(ref)
        if rule == "exact" and a == r or rule == "prefix" and (a == r or a.startswith(r + " ")) or (
                rule == "contains" and f" {r} " in f" {a} "):
            return True
    return False


# -- scoring a model on the items ---------------------------------------------------------------------------
@dataclass
class ItemResult:
    line: int
    kind: str  # choice | generated
    question: str
    prediction: str | None  # the chosen option, or the answer span (None: --answer did not match)
    text: str  # the whole generated text, or the chosen option
    correct: bool
    measures: dict[str, float]

    def to_dict(self) -> dict:
        return {"line": self.line, "kind": self.kind, "question": self.question, "prediction": self.prediction,
                "text": self.text, "correct": self.correct,
                "measures": {k: (None if v != v else v) for k, v in self.measures.items()}}


def _choice(model, item: Item, normalize: str) -> ItemResult:
    from llamalens.looks.choose import choose

    got = choose(model, item.question, list(item.options), normalize)
    shares = got.probabilities()
    best = got.options[0]
    measures = {"option_prob": shares[0], "option_margin": shares[0] - shares[1], **sample_measures(best.tokens)}
    return ItemResult(item.line, "choice", item.question, best.option, best.option,
                      best.option == item.options[item.answer], measures)


def score_items(model, items: list[Item], *, answer: str | None = None, max_tokens: int = 16,
                stop: tuple[str, ...] = ("\n",), parallel: int = 8, normalize: str = "none",
                on_item=None) -> list[ItemResult]:
    """Each item scored (choice) or generated greedily and matched (reference), in the file's order."""
    from llamalens.core.engine import Engine, Request
    from llamalens.settings import SamplingSettings

    out: dict[int, ItemResult] = {}
    for i, it in enumerate(items):
        if it.kind == "choice":
            out[i] = _choice(model, it, normalize)
            if on_item:
                on_item(1)
    greedy = SamplingSettings(temperature=0.0)
    reqs = [Request(it.question, greedy, max_tokens, 5, tuple(stop), key=i) for i, it in enumerate(items)
            if it.kind == "generated"]
    for sample in Engine(model, max(1, min(parallel, len(reqs)))).run(reqs) if reqs else ():
        it = items[sample.key]
        span, text = answer_span(sample.tokens, answer)
        measures = {"option_prob": math.nan, "option_margin": math.nan, **sample_measures(span)}
        out[sample.key] = ItemResult(it.line, "generated", it.question, text, sample.text,
                                     matches(text, it.references, it.match), measures)
        if on_item:
            on_item(1)
    return [out[i] for i in range(len(items))]


@dataclass
class MeasureFit:
    """How well one measure predicts correctness on the items of one kind (choice, generated) where it is defined."""

    measure: str
    kind: str
    n: int
    accuracy: float
    auroc: float
    ece: float
    brier: float
    prr: float
    bins: list[cal.Bin]
    coverage: list[float]  # accuracy of the k surest items, k = 1..n

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and v != v else v
        return {"measure": self.measure, "kind": self.kind, "n": self.n, "accuracy": clean(self.accuracy), "auroc": clean(self.auroc),
                "ece": clean(self.ece), "brier": clean(self.brier), "prr": clean(self.prr),
                "bins": [{"lo": b.lo, "hi": b.hi, "n": b.n, "mean_prob": clean(b.mean_prob),
                          "accuracy": clean(b.accuracy)} for b in self.bins],
                "coverage": self.coverage}


def fit(measure: Measure, results: list[ItemResult], vocab: int, bins: int = 10, kind: str = "") -> MeasureFit:
    """One measure's figures over the items (of `kind`, every kind when "") where it is finite (scores oriented so
    that higher is surer)."""
    got = [(r.measures.get(measure.name, math.nan), r.correct) for r in results if kind in ("", r.kind)]
    got = [(v, c) for v, c in got if v == v and math.isfinite(v)]
    n = len(got)
    values = [v if measure.higher else -v for v, _ in got]
    probs = [measure.implied(v, vocab) for v, _ in got]
    y = [1.0 if c else 0.0 for _, c in got]
    rel = cal.reliability(probs, y, bins) if n else []
    return MeasureFit(measure.name, kind, n, sum(y) / n if n else math.nan, cal.auroc(values, y) if n else math.nan,
                      cal.ece(rel) if n else math.nan, cal.brier(probs, y) if n else math.nan,
                      cal.prr(values, y) if n else math.nan, rel,
                      cal.coverage_curve(values, y).tolist() if n else [])


@dataclass
class ModelCalibration:
    model: dict  # Model.describe()
    items: list[ItemResult]
    fits: list[MeasureFit]

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.items) / len(self.items) if self.items else math.nan

    def kinds(self) -> list[str]:
        """The kinds of question the set holds, in KINDS' order."""
        return [k for k in KINDS if any(r.kind == k for r in self.items)]

    def accuracy_of(self, kind: str) -> float:
        got = [r.correct for r in self.items if r.kind == kind]
        return sum(got) / len(got) if got else math.nan

    def best(self, kind: str) -> MeasureFit | None:
        """The measure that predicts correctness best on one kind of question: the highest AUROC (then PRR)."""
        ranked = [f for f in self.fits if f.kind == kind and f.auroc == f.auroc]
        return max(ranked, key=lambda f: (f.auroc, f.prr if f.prr == f.prr else -math.inf)) if ranked else None

    def to_dict(self) -> dict:
        best = {k: (b.measure if (b := self.best(k)) else None) for k in self.kinds()}
        return {"model": self.model, "accuracy": self.accuracy, "best": best,
                "measures": [f.to_dict() for f in self.fits], "items": [r.to_dict() for r in self.items]}


def calibrate_model(model, items: list[Item], *, bins: int = 10, **options) -> ModelCalibration:
    """One model on the labelled set: each item's result and each measure's fit on each kind of question that has
    it (score_items' options). The kinds are fitted apart: a choice's option and a generated sentence put the same
    measure on different scales (a one-token option's sequence logprob against a sentence's)."""
    results = score_items(model, items, **options)
    fits = [fit(m, results, model.n_vocab, bins, kind) for kind in KINDS for m in ALL_MEASURES]
    return ModelCalibration(model.describe(), results, [f for f in fits if f.n])


def _check_options(answer, max_tokens, stop, normalize, bins, parallel) -> None:
    from llamalens.core.confidence import check_answer_regex
    from llamalens.looks.choose import NORMALIZE

    for name, value, lo, hi in (("bins", bins, 2, MAX_BINS), ("max-tokens", max_tokens, 1, MAX_TOKENS),
                                ("parallel", parallel, 1, 64)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidInput(f"--{name} {value!r} is out of range; give a whole number from {lo} to {hi}")
    if normalize not in NORMALIZE:
        raise InvalidInput(f"unknown --normalize {normalize!r}; use one of: {', '.join(NORMALIZE)}")
    if not stop or any(not isinstance(x, str) or not x for x in stop):
        raise InvalidInput("every --stop needs some text (an empty one would stop at once)")
    check_answer_regex(answer)


def calibrate(path, models, load, *, answer: str | None = None, match: str = "contains", max_tokens: int = 16,
              stop: tuple[str, ...] = ("\n",), normalize: str = "none", bins: int = 10, parallel: int = 8,
              on_model=None) -> Calibration:
    """The labelled set at `path` on each of `models` in turn: `load(model)` is a context manager giving a loaded
    Model (the CLI's announces it and checks its memory); `on_model(loaded)` hears each one start. Everything the
    user controls is checked before the first model loads."""
    _check_options(answer, max_tokens, stop, normalize, bins, parallel)
    items = read_items(path, match)
    res = Calibration(str(path), len(items), answer, bins)
    for m in models:
        with load(m) as loaded:
            if on_model:
                on_model(loaded)
            res.models.append(calibrate_model(loaded, items, bins=bins, answer=answer, max_tokens=max_tokens,
                                              stop=tuple(stop), parallel=parallel, normalize=normalize))
    return res


def model_cells(max_tokens: int, parallel: int) -> int:
    """The KV cells a model's memory estimate is sized for: `parallel` answers of a short question each."""
    return parallel * (max_tokens + 64)


@dataclass
class Calibration(Rich):
    """`calibrate`'s result: per model, each item's result and each measure's figures (ll.calibrate)."""

    _display = "calibration"
    source: str
    n_items: int
    answer: str | None
    bins: int
    models: list[ModelCalibration] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "items": self.n_items, "answer": self.answer, "bins": self.bins,
                "models": [m.to_dict() for m in self.models]}

    def to_pandas(self):
        """One row per (model, kind of question, measure): n, accuracy, auroc, ece, brier, prr."""
        import pandas as pd

        return pd.DataFrame([{"model": m.model.get("name"), "quantization": m.model.get("quantization"),
                              **{k: v for k, v in f.to_dict().items() if k not in ("bins", "coverage")}}
                             for m in self.models for f in m.fits])


def measure(name: str) -> Measure:
    return BY_NAME.get(name) or next(m for m in CHOICE_MEASURES if m.name == name)
