"""The use-case layer of the run kinds: typed requests that the command line and the Python API both build
and run, so that a sweep or a fork is put together in one place whichever door it came in by.

    `llamalens sweep ...` (commands/runs.py) ─┐                        ┌─► sizing()      memory check, before loading
                                              ├─► SweepRequest ────────┼─► start(model)  chats rendered, run planned
    ll.sweep(...) (api.py) ───────────────────┘   ForkRequest          └─► execute(...)  here, or on Ray (an executor)

What differs between the doors stays with them: how options are parsed (click's text axes, Python's dicts),
how the model is loaded (the CLI's announcement, the API's context manager or a model already loaded), how
notes and progress are shown (stderr lines, warnings and tqdm), and the command line stored with the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from llamalens.core.runtime import Model
from llamalens.errors import InvalidInput
from llamalens.run.fork import ForkSpec, check_spec, execute_fork, start_fork
from llamalens.run.grid import check as check_grid
from llamalens.run.grid import check_size
from llamalens.run.sweep import SweepSpec, execute, sizing, start_sweep
from llamalens.store import Store

CHAT_MARKUP_BYTES = 256  # what a chat template adds around one conversation, at most, for the memory check


@dataclass
class SweepRequest:
    """A sweep: the spec's prompts (or conversations rendered with the model's chat template at start(), which
    then become its prompts) × configurations × seeds, under a grammar when one is given."""

    spec: SweepSpec
    conversations: list | None = None  # chat.conversations(...)
    chat_template: str | None = None
    grammar: object = None  # grammar.GrammarSpec
    chats: list = field(default_factory=list)  # the rendered conversations (chat.ChatPrompt), after start()

    def check(self) -> None:
        """What can be refused before a model is loaded."""
        if not self.spec.prompts and not self.conversations:
            raise InvalidInput("give at least one prompt (or messages)")
        check_size(len(self.conversations) if self.conversations else len(self.spec.prompts), len(self.spec.configs),
                   len(self.spec.seeds))
        check_grid(self.spec.configs, self.spec.seeds)

    def sizing(self, ctx: int) -> tuple[int, int]:
        """(sequences per batch, KV cells in all) for the memory check before the model is loaded."""
        s = self.spec
        return sizing(s.prompts, self.conversations, len(s.configs), len(s.seeds), s.max_tokens, s.parallel, s.exact,
                      ctx)

    def fit_parallel(self, model_name, options) -> str | None:
        """For a sweep whose --parallel was not given: the most sequences a batch (the default, or fewer by halves)
        whose memory estimate fits the RAM available now. The spec takes that number; a note says so when it is
        below the default (None otherwise)."""
        from llamalens.modelfiles.find import resolve_source
        from llamalens.modelfiles.memory import fit_sequences, gb

        n_par, cells = self.sizing(options.ctx)
        if self.spec.exact or n_par <= 1:
            return None
        n, est = fit_sequences(resolve_source(model_name), options, n_par, cells // n_par)
        if n == n_par:
            return None
        self.spec.parallel = n
        return (f"{n} sequences a batch instead of {n_par}: that many fit in the {gb(est.available)} of RAM available "
                f"({est.breakdown()}); pass --parallel to choose")

    def start(self, model: Model, store: Store, command: str, on_note: Callable[[str], None]) -> int:
        """Render the conversations, validate against the model, plan the run in the store; its id."""
        if self.conversations:
            from llamalens.core.chat import render_all

            self.chats = render_all(model, self.conversations, self.chat_template)
            self.spec.prompts = [c.text for c in self.chats]
            self.spec.chats = [c.to_dict() for c in self.chats]
        self.spec.grammar = self.grammar.to_dict() if self.grammar else None
        return start_sweep(model, store, self.spec, command=command, on_note=on_note)

    @staticmethod
    def execute(model: Model, store: Store, run_id: int, on_progress=None, executor=None):
        return execute(model, store, run_id, on_progress, executor)


@dataclass
class ForkRequest:
    """A forking-paths analysis of one prompt (or one conversation rendered with the model's template)."""

    spec: ForkSpec
    conversation: list | None = None  # messages: rendered at start() with chat_template; the reply is the base path
    chat_template: str | None = None

    def check(self) -> None:
        if not self.spec.prompt and self.conversation is None:
            raise InvalidInput("give a prompt (or a conversation)")
        check_spec(self.spec)

    def sizing(self) -> tuple[int, int]:
        """(sequences, KV cells in all) of the context fork makes: the base path's sequence and --parallel
        more, each up to the prompt (its bytes bound its tokens) and the run's length."""
        n_par = 1 if self.spec.exact else min(self.spec.parallel, self.spec.max_sequences)
        prompt_bytes = len(self.spec.prompt.encode("utf-8"))
        if self.conversation is not None:
            prompt_bytes += sum(len(str(m.get("content", "")).encode("utf-8")) for m in self.conversation)
            prompt_bytes += CHAT_MARKUP_BYTES
        return n_par + 1, (n_par + 1) * (prompt_bytes + 3 + self.spec.max_tokens)

    rendered: object = None  # the rendered conversation (chat.ChatPrompt), after render()

    def render(self, model: Model) -> None:
        """The conversation rendered with the model's template becomes the prompt: the base path is the reply."""
        if self.conversation is not None:
            from llamalens.core.chat import render

            self.rendered = render(model, self.conversation, self.chat_template)
            self.spec.prompt = self.rendered.text

    def start(self, model: Model, store: Store, command: str, on_note: Callable[[str], None] | None = None):
        """Decode the base path and plan every continuation (after render()); (run id, Cost)."""
        return start_fork(model, store, self.spec, command=command, on_note=on_note)

    @staticmethod
    def execute(model: Model, store: Store, run_id: int, on_progress=None, executor=None):
        return execute_fork(model, store, run_id, on_progress, executor)
