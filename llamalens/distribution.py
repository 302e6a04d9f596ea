"""One-shot looks at the model that need no sampling: a text's tokens, the next-token distribution,
and how sampler chains reshape that distribution (one prefill each; nothing is stored)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .records import Alternative, Rich
from .runtime import Model, round_ctx
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
    return [Token(i, t, *model.token_text(t)) for i, t in enumerate(ids)]


@dataclass
class NextToken(Rich):
    """The distribution of the token that would follow a prompt (in a notebook: the top-N as bars)."""

    _display = "next_token"

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

    def to_pandas(self):
        """The top tokens: rank, token_id, text, bytes, logprob, prob."""
        import pandas as pd

        return pd.DataFrame([[i, a.id, a.text, a.bytes, a.logprob, a.prob] for i, a in enumerate(self.top, 1)],
                            columns=["rank", "token_id", "text", "bytes", "logprob", "prob"])


def next_token(model: Model, prompt: str, top: int = 10) -> NextToken:
    """Top-N next tokens of a prompt with their raw probabilities, and the entropy (nats)."""
    tokens = model.prompt_tokens(prompt)
    model.check_fits(len(tokens), model.options.ctx)
    with model.context(n_ctx=round_ctx(len(tokens) + 1)) as ctx:
        row = ctx.prefill(tokens)
    st = RowStats.of(row, None, top)
    alts = [Alternative(int(i), *model.token_text(int(i)), float(lp)) for i, lp in zip(st.top_ids, st.top_logprobs)]
    return NextToken(prompt, len(tokens), st.entropy, alts)


@dataclass
class StageView:
    """What one prefix of a sampler chain leaves of the distribution."""

    stage: str  # "raw", a stage of the chain (sampler.STAGES, or sampler.stage_names for llama.cpp's), "greedy"
    survivors: int  # tokens left with non-zero probability
    probs: list[float]  # probability of each of SamplerView.top after this stage (0 = filtered out)


@dataclass
class ChainView:
    label: str
    settings: dict
    stages: list[StageView]

    @property
    def final(self) -> StageView:
        return self.stages[-1]


@dataclass
class SamplerView(Rich):
    """How each configuration's sampler chain reshapes one raw next-token distribution (in a notebook: raw vs
    after each chain, as bars).

    The same raw logits (after `history`) go through every configuration's native chain, stage by
    stage (penalties, top_k, typical_p, top_p, min_p, temperature; greedy is one-hot argmax; the llama.cpp
    chain's stages in its order: logit_bias, dry, top_n_sigma, xtc, ...), and the probabilities of the raw
    top tokens are read after each stage.
    """

    prompt: str
    history: list[int]  # generated tokens before the position shown
    position: int
    entropy: float
    top: list[Alternative]
    chains: list[ChainView]
    _display = "sampler_view"

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def sampler_view(model: Model, prompt: str, history: list[int], configs: list, top: int = 20,
                 labels: list[str] | None = None) -> SamplerView:
    """Raw top-`top` distribution after prompt + history, and each configuration's chain applied to it.

    Each chain is labelled with `labels` (one per configuration) or its settings' label without the seed."""
    import numpy as np

    from .sampler import STAGES, Sampler, stage_names

    tokens = model.prompt_tokens(prompt) + list(history)
    model.check_fits(len(tokens), model.options.ctx)
    with model.context(n_ctx=round_ctx(len(tokens) + 1)) as ctx:
        row = ctx.prefill(tokens)
    st = RowStats.of(row, None, top)
    ids = [int(i) for i in st.top_ids]
    alts = [Alternative(i, *model.token_text(i), float(lp)) for i, lp in zip(ids, st.top_logprobs)]
    raw = StageView("raw", int(row.shape[0]), [math.exp(a.logprob) for a in alts])
    chains = []
    for k, cfg in enumerate(configs):
        stages = [raw]
        llama_cpp = cfg.chain == "llama.cpp"
        if llama_cpp:  # every stage before the pick; the chain has seen the prompt too (Sampler.for_sequence)
            present, seen = stage_names(cfg, model)[:-1], tokens
        else:
            present, seen = (STAGES if not cfg.greedy else STAGES[:1]), list(history)
        for stage in present:
            with Sampler(cfg, model.n_vocab, upto=stage, model=model) as chain:
                for t in seen:  # penalties (and DRY) see the tokens they see in generation
                    chain.accept(t)
                surv, _ = chain.apply(row)
                logits = surv["logit"].astype(np.float64)
                keep = np.isfinite(logits)
                p = np.exp(logits[keep] - logits[keep].max())
                p /= p.sum()
                by_id = dict(zip(surv["id"][keep].tolist(), p.tolist()))
                stages.append(StageView(stage, int(keep.sum()), [by_id.get(i, 0.0) for i in ids]))
                argmax = max(by_id, key=lambda i: (by_id[i], -i))
        if cfg.greedy and not llama_cpp:
            stages.append(StageView("greedy", 1, [1.0 if i == argmax else 0.0 for i in ids]))
        name = labels[k] if labels else cfg.label(seed=False)
        chains.append(ChainView(name, cfg.to_dict(), stages))
    return SamplerView(prompt, list(history), len(history), st.entropy, alts, chains)
