"""`choose`: continuations of a prompt ranked by likelihood (zero-shot classification, multiple choice).

The prompt is decoded once and copied to one sequence per continuation; all continuations are then decoded
together, and each token is scored from the row before it (looks/windows.py's alignment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from llamalens.errors import InvalidInput
from llamalens.records import Rich, ScoredToken
from llamalens.core.runtime import Model, round_ctx
from llamalens.core.stats import RowStats
from llamalens.looks.windows import score_batch, scored_token

NORMALIZE = ("none", "token", "byte")


@dataclass
class OptionScore:
    option: str
    continuation: str  # what was actually appended to the prompt
    tokens: list[ScoredToken]
    n_bytes: int

    @property
    def total(self) -> float:
        return float(sum(t.logprob for t in self.tokens))

    def score(self, normalize: str) -> float:
        if normalize == "token":
            return self.total / max(len(self.tokens), 1)
        if normalize == "byte":
            return self.total / max(self.n_bytes, 1)
        return self.total

    def to_dict(self, normalize: str) -> dict:
        return {"option": self.option, "continuation": self.continuation, "score": self.score(normalize),
                "logprob": self.total, "tokens": len(self.tokens), "bytes": self.n_bytes,
                "per_token": self.total / max(len(self.tokens), 1), "per_byte": self.total / max(self.n_bytes, 1),
                "token_logprobs": [t.to_dict() for t in self.tokens]}


@dataclass
class Choice(Rich):
    """Continuations of a prompt ranked by likelihood (ll.choose, `llamalens choose`), best first.

    to_pandas(): one row per option: rank, option, continuation, score, logprob, tokens, bytes, per_token,
    per_byte, margin, share."""

    _display = "choice"
    prompt: str
    normalize: str
    options: list[OptionScore]  # ranked, best first
    notes: list[str] = field(default_factory=list)

    def margins(self) -> list[float]:
        """Score of each option minus the next one's (the last is nan)."""
        s = [o.score(self.normalize) for o in self.options]
        return [a - b for a, b in zip(s, s[1:])] + [math.nan]

    def probabilities(self) -> list[float]:
        """Softmax of the scores over the options: how the model splits its belief among them."""
        s = np.array([o.score(self.normalize) for o in self.options])
        e = np.exp(s - s.max())
        return (e / e.sum()).tolist()

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "normalize": self.normalize, "notes": self.notes,
                "options": [dict(o.to_dict(self.normalize), rank=i + 1, margin=m, share=p)
                            for i, (o, m, p) in enumerate(zip(self.options, self.margins(), self.probabilities()))]}

    def to_pandas(self):
        import pandas as pd

        rows = [{k: v for k, v in o.items() if k != "token_logprobs"} for o in self.to_dict()["options"]]
        return pd.DataFrame(rows, columns=CHOICE_COLUMNS)

    def __repr__(self) -> str:
        ranked = ", ".join(f"{o.option!r} {p:.1%}" for o, p in zip(self.options, self.probabilities()))
        return f"<Choice ({self.normalize}): {ranked}>"


CHOICE_COLUMNS = ["rank", "option", "continuation", "score", "logprob", "tokens", "bytes", "per_token", "per_byte",
                  "margin", "share"]


def join_option(prompt: str, option: str, space: bool = True) -> str:
    """The continuation appended to the prompt: with a space between when neither side has one."""
    if space and prompt and option and not prompt[-1].isspace() and not option[0].isspace():
        return " " + option
    return option


def check_options(options: list[str], normalize: str = "none") -> None:
    """What choose() needs of its options, checked before any model is loaded."""
    if len(options) < 2:
        raise InvalidInput(f"give at least two --option values to choose between (got {len(options)})")
    if normalize not in NORMALIZE:
        raise InvalidInput(f"unknown --normalize {normalize!r}; use one of: {', '.join(NORMALIZE)}")
    if any(not o for o in options):
        raise InvalidInput("an --option is empty; every option needs some text")


def choose(model: Model, prompt: str, options: list[str], normalize: str = "none", space: bool = True,
           n_logprobs: int = 3) -> Choice:
    """Rank continuations by their logprob given the prompt; the prompt is decoded once, shared by all."""
    check_options(options, normalize)
    ptoks = model.prompt_tokens(prompt) if prompt else ([model.bos] if model.add_bos and model.bos != -1 else [])
    if model.add_eos and ptoks and ptoks[-1] == model.eos:
        ptoks = ptoks[:-1]
    if not ptoks:
        raise InvalidInput("the prompt is empty and the model adds no BOS token: nothing to predict the options from")
    notes, conts = [], []
    for o in options:
        cont = join_option(prompt, o, space)
        toks, merged = continuation_tokens(model, prompt, ptoks, cont)
        conts.append((o, cont, toks))
        if merged:
            notes.append(f"option {o!r}: its first token merges with the prompt's last one; scored as separate tokens")
    scored = continuation_scores(model, ptoks, [c[2] for c in conts], n_logprobs)
    results = [OptionScore(o, c, scored[k], len(c.encode("utf-8"))) for k, (o, c, _t) in enumerate(conts)]
    results.sort(key=lambda r: -r.score(normalize))
    dup = {o for o in options if options.count(o) > 1}
    if dup:
        notes.append(f"options given more than once: {', '.join(map(repr, sorted(dup)))}")
    return Choice(prompt, normalize, results, notes)


def continuation_tokens(model: Model, prompt: str, ptoks: list[int], cont: str) -> tuple[list[int], bool]:
    """(tokens of `cont` after the prompt, whether they merged with it): prompt + continuation tokenized as one
    text, as the model reads it, and the prompt's tokens cut off; when the boundary merged into the prompt's
    last token, the continuation is tokenized alone."""
    whole = model.prompt_tokens(prompt + cont)
    if model.add_eos and whole and whole[-1] == model.eos:
        whole = whole[:-1]
    if whole[: len(ptoks)] == ptoks and len(whole) > len(ptoks):
        return whole[len(ptoks):], False
    return model.tokenize(cont, add_bos=False, special=False), True


def continuation_scores(model: Model, ptoks: list[int], conts: list[list[int]],
                        n_logprobs: int) -> list[list[ScoredToken]]:
    """Each continuation's tokens scored after the same prompt tokens: the prompt decoded once, copied to one
    sequence per continuation, and all continuations decoded together."""
    longest = max(len(c) for c in conts)
    model.check_fits(len(ptoks) + longest, model.options.ctx)
    n_seq = len(conts)
    n_batch = max(score_batch(model), n_seq)
    cells = len(ptoks) + sum(len(c) for c in conts) + 1
    scored: list[list[ScoredToken]] = [[] for _ in conts]
    with model.context(n_ctx=round_ctx(cells), n_seq_max=n_seq, n_batch=n_batch) as ctx:
        first_row = ctx.prefill(ptoks, seq=0)
        first = RowStats.of(first_row, None, n_logprobs)
        for s in range(1, n_seq):
            ctx.seq_cp(0, s, 0, len(ptoks))
        for k, toks in enumerate(conts):
            scored[k].append(scored_token(model, 0, toks[0], first.for_token(first_row, toks[0]), n_logprobs))
        # every continuation's tokens but its last, all sequences together, in batches of n_batch
        items = [(k, j, t) for k, toks in enumerate(conts) for j, t in enumerate(toks[:-1])]
        for b0 in range(0, len(items), n_batch):
            chunk = items[b0 : b0 + n_batch]
            ctx.decode([t for _, _, t in chunk], [len(ptoks) + j for _, j, _ in chunk], [k for k, _, _ in chunk],
                       [1] * len(chunk))
            for i, (k, j, _t) in enumerate(chunk):
                target = conts[k][j + 1]
                row = ctx.logits(i)
                scored[k].append(scored_token(model, j + 1, target, RowStats.of(row, target, n_logprobs), n_logprobs))
    return scored

