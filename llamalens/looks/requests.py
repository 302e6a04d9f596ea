"""The use-case layer of score, choose and compare: typed requests that the command line and the Python API both
build and run, so each analysis is put together in one place whichever door it came in by.

    `llamalens score ...` (commands/score.py) ─┐                       ┌─► check()        refused before any model loads
                                               ├─► ScoreRequest ───────┼─► rows / sizing  for the memory check
    ll.score(...) (api.py) ────────────────────┘   ChooseRequest       └─► run(model)     the analysis: a typed result
                                                   CompareRequest

What differs between the doors stays with them: option parsing, model loading (the CLI's announcement and
memory check, the API's context manager or a model already loaded), how notes and progress are shown.
CompareRequest has three ways to run: a text with any number of models is a compare run in the store
(start + execute, read back as a run/ladder.Ladder: resumable); two models in memory on a text (pairwise: the
API's ll.compare(a, b), `compare --ray`) or on a stored run's generated tokens (`compare --run`) give a
looks/compare.Comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llamalens.arguments import whole
from llamalens.core.runtime import Model
from llamalens.errors import InvalidArgument, InvalidInput
from llamalens.looks.windows import PROTOCOLS


def _check_text(text, stride, protocol) -> None:
    if not isinstance(text, (str, bytes)):
        raise InvalidArgument(f"text={text!r:.40}: give the text as a str (or bytes)")
    if stride is not None:
        whole(stride, "stride")
    if protocol not in PROTOCOLS:
        raise InvalidInput(f"unknown protocol {protocol!r}; use one of: {', '.join(PROTOCOLS)}")


@dataclass
class ScoreRequest:
    """Teacher-forced scores of a text (str, or bytes scored as they are)."""

    text: str | bytes
    protocol: str = "full"
    stride: int | None = None
    logprobs: int = 5

    def check(self) -> None:
        _check_text(self.text, self.stride, self.protocol)

    def run(self, model: Model, on_progress: Callable[[int, int], None] | None = None, scorer=None):
        from llamalens.looks.score import score_text

        return score_text(model, self.text, model.options.ctx, self.protocol, self.stride, self.logprobs,
                          on_progress, scorer)


@dataclass
class ChooseRequest:
    """Continuations of a prompt ranked by likelihood."""

    prompt: str
    options: list[str]
    normalize: str = "none"
    space: bool = True

    def check(self) -> None:
        from llamalens.looks.choose import check_options

        if not isinstance(self.prompt, str):
            raise InvalidArgument(f"prompt={self.prompt!r:.40}: give the prompt as a str")
        check_options(self.options, self.normalize)

    def run(self, model: Model):
        from llamalens.looks.choose import choose

        return choose(model, self.prompt, self.options, self.normalize, space=self.space)


@dataclass
class CompareRequest:
    """Models against a base (the first) on the same tokens: a text, or a stored run's generated tokens."""

    models: list  # paths or names (the CLI), or loaded Models too (the API's pairwise call); the base first
    text: str | bytes | None = None
    run: int | str | None = None
    protocol: str = "full"
    stride: int | None = None
    name: str | None = None
    questions: list = field(default_factory=list)  # looks/flips.Question: every model answers them (a compare run)
    max_tokens: int = 32  # of a greedy answer
    normalize: str = "none"  # how a question's options are ranked
    draft: bool = False  # the compared models are drafts for the base: their acceptance too
    files: list[Path] = field(default_factory=list)  # the resolved files, after check()

    def check(self) -> None:
        """The input and the model files, before any model loads: exactly one of text and run (or only
        questions); a base and at least one other model, every file distinct (a pairwise call: exactly two)."""
        from llamalens.looks.choose import NORMALIZE
        from llamalens.looks.flips import MAX_ANSWER_TOKENS
        from llamalens.run.compare import check_models

        if self.text is not None and self.run is not None or (self.text is None and self.run is None
                                                              and not self.questions):
            raise InvalidInput("give text= or run= (one of them), or questions to answer")
        if self.questions and self.run is not None:
            raise InvalidInput("questions are answered in a compare run on a text (or alone), not with run=; drop one")
        if not 1 <= self.max_tokens <= MAX_ANSWER_TOKENS:
            raise InvalidInput(f"max_tokens={self.max_tokens}: a greedy answer takes 1 to {MAX_ANSWER_TOKENS} tokens")
        if self.normalize not in NORMALIZE:
            raise InvalidInput(f"unknown normalize {self.normalize!r}; use one of: {', '.join(NORMALIZE)}")
        if self.text is not None:
            _check_text(self.text, self.stride, self.protocol)
        self.files = check_models([m.path if isinstance(m, Model) else m for m in self.models])

    def check_pairwise(self, why: str) -> None:
        if len(self.files) != 2:
            raise InvalidInput(f"{why} compares exactly two models, model B against model A (got {len(self.files)}); "
                               "give two, or compare several models on a text without it (a compare run)")

    # -- a compare run: any number of models on a text -------------------------------------------------
    def start(self, base: Model, store, command: str = "", on_note=None) -> int:
        """Plan the compare run on the text, or the stored run's generated tokens (every model checked against the
        base, one at a time); its id."""
        from llamalens.run.compare import CompareSpec, start_compare

        spec = CompareSpec([str(f) for f in self.files], base.options.ctx, self.protocol, self.stride, self.name,
                           list(self.questions), self.max_tokens, self.normalize, self.run, self.draft)
        return start_compare(base, store, spec, self.text, command, on_note)

    @staticmethod
    def execute(base: Model, store, run_id: int, on_progress=None):
        from llamalens.run.compare import execute_compare

        return execute_compare(base, store, run_id, on_progress)

    @staticmethod
    def result(store, run_id: int):
        from llamalens.run.ladder import load_ladder

        return load_ladder(store, run_id)

    # -- two models in memory --------------------------------------------------------------------------
    def pairwise(self, a: Model, b: Model, ctx: int, on_progress=None, scorer=None):
        """Model B against model A on the text, both in this process (or `scorer`'s workers): a Comparison."""
        from llamalens.looks.compare import compare_text

        return compare_text(a, b, self.text, ctx, self.protocol, self.stride, on_progress=on_progress, scorer=scorer)

    def on_run(self, a: Model, b: Model, store, on_progress=None):
        """Model B's view of a stored run's generated tokens (A: the run's model): a Comparison."""
        from llamalens.looks.compare import compare_run

        return compare_run(a, b, store, self.run, on_progress=on_progress)
