"""One-shot views that need no sampling: tokenization and the next-token distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .records import Alternative
from .runtime import Model
from .stats import RowStats


@dataclass(frozen=True)
class Token:
    index: int
    id: int
    text: str
    bytes: str  # hex

    def to_dict(self) -> dict:
        return {"index": self.index, "id": self.id, "text": self.text, "bytes": self.bytes}


def tokenize(model: Model, text: str, add_bos: bool = False) -> list[Token]:
    """The tokens of a text, each with its exact bytes.

    >>> [t.text for t in tokenize(model, "Preposterous, I'm flabbergasted!")][:3]  # doctest: +SKIP
    ['Pre', 'poster', 'ous']
    """
    ids = model.tokenize(text, add_bos=add_bos, special=True)
    out = []
    for i, t in enumerate(ids):
        piece = model.piece(t)
        out.append(Token(i, t, piece.decode("utf-8", errors="replace"), piece.hex()))
    return out


@dataclass
class NextToken:
    """The distribution of the token that would follow a prompt."""

    prompt: str
    prompt_tokens: int
    entropy: float
    top: list[Alternative] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "prompt_tokens": self.prompt_tokens,
            "entropy": self.entropy,
            "top": [{"id": a.id, "text": a.text, "bytes": a.bytes, "logprob": a.logprob,
                     "prob": math.exp(a.logprob)} for a in self.top],
        }


def next_token(model: Model, prompt: str, top: int = 10) -> NextToken:
    """Top-N next tokens of a prompt with their raw probabilities, and the entropy (nats)."""
    tokens = model.prompt_tokens(prompt)
    model.check_fits(len(tokens), model.options.ctx)
    n_ctx = (len(tokens) + 1 + 255) // 256 * 256
    with model.context(n_ctx=n_ctx) as ctx:
        row = ctx.prefill(tokens)
    st = RowStats.of(row, None, top)
    alts = []
    for i, lp in zip(st.top_ids, st.top_logprobs):
        piece = model.piece(int(i))
        alts.append(Alternative(int(i), piece.decode("utf-8", errors="replace"), piece.hex(), float(lp)))
    return NextToken(prompt, len(tokens), st.entropy, alts)
