"""lm-evaluation-harness's requests in tokens: the context / continuation boundary, truncation, rolling windows.

These follow lm-eval's own causal backends (lm_eval.api.model.TemplateLM and its HF model), written here:

  boundary    trailing whitespace of the context moves to the continuation; the context is tokenized alone
              (BOS + text) and context + continuation as one text, and the continuation's tokens are the joined
              text's after the context's. When the joined text does not start with the context's tokens (the
              boundary merged two tokens), the continuation is tokenized alone after the context's tokens, so
              no token is scored twice or lost; such requests are listed (Encoded.merged_at).
  empty ctx   the continuation is scored after the prefix token alone (BOS, or EOS for a model without BOS);
              when the continuation itself starts with that token, its first token is the context.
  too long    context + continuation - 1 tokens are read; past `max_length` the context loses its oldest tokens
              (left truncation, as lm-eval's backends do; listed in Encoded.truncated_at). A continuation that
              alone needs more than max_length is an error naming the document.
  rolling     a text's tokens (no BOS) in lm-eval's windows of max_length predictions: the first after the
              prefix token, each next one predicting the next max_length tokens from only the text before them
              in its window (get_rolling_token_windows with context_len 1, made disjoint); every token is
              predicted once, and the last window keeps a full context.

Tokens are llama.cpp's with special tokens parsed (a chat template's markers are the model's special tokens),
as a Hugging Face tokenizer reads text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalens.errors import InvalidInput
from llamalens.core.runtime import Model
from llamalens.eval.scoring import Pair


def text_tokens(model: Model, text: str, bos: bool) -> list[int]:
    """The tokens of a text, special tokens parsed, with BOS first when `bos` and the model adds one."""
    body = model.tokenize(text, add_bos=False, special=True) if text else []
    return ([model.bos] if bos and model.add_bos and model.bos != -1 else []) + body


def prefix_token(model: Model) -> int:
    """What an empty context or a rolling text is scored after: BOS, or EOS for a model without one."""
    return model.bos if model.bos != -1 else model.eos


@dataclass
class Encoded:
    """Requests in tokens, and what it took to make them."""

    pairs: list[Pair] = field(default_factory=list)
    merged_at: set[int] = field(default_factory=set)  # requests whose boundary merged a context and a continuation token
    truncated_at: set[int] = field(default_factory=set)  # requests whose context lost its oldest tokens to max_length

    def notes(self) -> list[str]:
        out = []
        if self.merged_at:
            out.append(f"{len(self.merged_at)} request(s): the continuation's first token merged with the context's last "
                       "when tokenized together; scored as separate tokens")
        if self.truncated_at:
            out.append(f"{len(self.truncated_at)} request(s) longer than the context (--ctx): their context's oldest tokens "
                       "were left out, as lm-eval's own backends do; raise --ctx to read all of it")
        return out


def encode_pair(model: Model, context: str, continuation: str) -> tuple[list[int], list[int], bool]:
    """(context tokens, continuation tokens, whether the boundary merged) of one loglikelihood request."""
    if context == "":
        cont = text_tokens(model, continuation, bos=False)
        pre = prefix_token(model)
        if cont and cont[0] == pre:
            return cont[:1], cont[1:], False
        return [pre], cont, False
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    ctx = text_tokens(model, context, bos=True)
    whole = text_tokens(model, context + continuation, bos=True)
    if whole[: len(ctx)] == ctx:
        return ctx, whole[len(ctx):], False
    return ctx, text_tokens(model, continuation, bos=False), True


def fit(ctx: list[int], cont: list[int], max_length: int, where: str) -> tuple[list[int], bool]:
    """The context cut from the left so that context + continuation - 1 tokens fit max_length; (ctx, cut)."""
    if not cont:
        raise InvalidInput(f"{where}: the continuation is empty (no token to score); an empty answer option "
                           "would score 0 and win every question: fix the task's choices or target")
    if len(cont) > max_length:
        raise InvalidInput(f"{where}: the continuation alone is {len(cont)} tokens, more than the context holds "
                           f"(--ctx {max_length}); raise --ctx or shorten the task's answers")
    room = max_length + 1 - len(cont)
    if len(ctx) > room:
        return ctx[-room:], True
    return ctx, False


def encode_requests(model: Model, requests: list[tuple[str, str]], max_length: int, where) -> Encoded:
    """Loglikelihood requests (context, continuation) as pairs; `where(i)` names request i in an error."""
    enc = Encoded()
    for i, (context, continuation) in enumerate(requests):
        ctx, cont, merged = encode_pair(model, context, continuation)
        ctx, cut = fit(ctx, cont, max_length, where(i))
        enc.pairs.append(Pair(tuple(ctx), tuple(cont)))
        if merged:
            enc.merged_at.add(i)
        if cut:
            enc.truncated_at.add(i)
    return enc


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[Pair]:
    """A text's tokens as lm-eval's disjoint rolling windows (see the module docstring), each a Pair."""
    if max_length < 1:
        raise InvalidInput(f"max_length {max_length} is too small: a window predicts at least one token")
    out, done = [], 0
    n = len(tokens)
    while done < n:
        end = min(n, done + max_length)
        read = ([prefix] + tokens[:end - 1]) if done == 0 else tokens[max(0, end - max_length - 1) : end - 1]
        pred = tokens[done:end]
        out.append(Pair(tuple(read[: len(read) - len(pred) + 1]), tuple(pred)))
        done = end
    return out
