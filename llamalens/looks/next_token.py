"""One-shot looks at the model that need no sampling: a text's tokens, the next-token distribution,
and how sampler chains reshape that distribution (one prefill each; nothing is stored)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llamalens.records import Alternative, Rich
from llamalens.core.runtime import Model, round_ctx
from llamalens.core.stats import RowStats


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
    # what the stage did at this position, for the stages that act on their own (stage_effect): the tokens whose
    # logits logit_bias, penalties or DRY moved; whether XTC fired and what it removed; mirostat's μ and cut
    effect: dict | None = None


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
    chain's stages in its order: logit_bias, dry, top_n_sigma, xtc, ..., and mirostat or adaptive_p, the picks
    that reshape before they choose), and the probabilities of the raw top tokens are read after each stage.

    Each chain is first fed what it would have seen in generation: the llama.cpp chain accepts the prompt
    (llama-server does), and every chain accepts the generated tokens before the position (penalties and DRY
    count them). Stages whose state moves in apply() rather than accept() (XTC's random draws, mirostat's μ,
    adaptive-p's average) are also applied to the raw logits of every earlier position, as generation applied
    them; the logits are decoded as generation decodes them (the prompt at once, then one token at a time).
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


REPLAYED = ("xtc", "mirostat", "adaptive_p")  # state moved by apply(): replayed over the history's positions
SHIFTING = ("logit_bias", "penalties", "dry")  # move logits, remove nothing: the view lists what they moved
SHOWN_PICKS = ("mirostat", "adaptive_p")  # picks that reshape the distribution before choosing: shown as stages
MAX_EFFECT_TOKENS = 20


def replays(stages, settings) -> bool:
    """Whether a llama.cpp chain of these stages moves its state in apply() with these settings, so that the
    history's positions must be replayed: mirostat and adaptive-p always; XTC only when it can fire (its apply
    returns before its random draw when probability <= 0 or threshold > 0.5)."""
    return any(n in REPLAYED and (n != "xtc" or (settings.xtc_probability > 0 and settings.xtc_threshold <= 0.5))
               for n in stages)


def history_rows(model: Model, prompt_tokens: list[int], history: list[int]) -> list:
    """The raw logits before each generated token of `history` and after the last (len(history) + 1 rows),
    decoded as generation decodes them: the prompt in one prefill, then one token at a time."""
    n = len(prompt_tokens) + len(history)
    model.check_fits(n, model.options.ctx)
    with model.context(n_ctx=round_ctx(n + 1)) as ctx:
        rows = [ctx.prefill(prompt_tokens)]
        for j, t in enumerate(history):
            ctx.decode([t], [len(prompt_tokens) + j], [0], [1])
            rows.append(ctx.logits(-1).copy())
    return rows


def sampler_view(model: Model, prompt: str, history: list[int], configs: list, top: int = 20,
                 labels: list[str] | None = None) -> SamplerView:
    """Raw top-`top` distribution after prompt + history, and each configuration's chain applied to it.

    Each chain is labelled with `labels` (one per configuration) or its settings' label without the seed."""
    prompt_tokens, history = model.prompt_tokens(prompt), [int(t) for t in history]
    rows = history_rows(model, prompt_tokens, history)
    return chains_view(model, prompt, prompt_tokens, history, rows, configs, top, labels)


def chains_view(model: Model, prompt: str, prompt_tokens: list[int], history: list[int], rows: list, configs: list,
                top: int = 20, labels: list[str] | None = None) -> SamplerView:
    """sampler_view on rows already decoded: rows[-1] the raw logits after prompt + history, rows[j] those before
    history[j] (only read by chains that replay earlier positions, `replays`; None elsewhere will do)."""
    import numpy as np

    from llamalens.core.sampler import STAGES, TOKEN_DATA, Sampler, mirostat_mu, stage_names

    row = rows[-1]
    st = RowStats.of(row, None, top)
    ids = [int(i) for i in st.top_ids]
    alts = [Alternative(i, *model.token_text(i), float(lp)) for i, lp in zip(ids, st.top_logprobs)]
    raw = StageView("raw", int(row.shape[0]), [math.exp(a.logprob) for a in alts])
    raw_cands = np.zeros(row.shape[0], dtype=TOKEN_DATA)
    raw_cands["id"], raw_cands["logit"] = np.arange(row.shape[0]), row
    chains = []
    for k, cfg in enumerate(configs):
        stages, before = [raw], raw_cands
        llama_cpp = cfg.chain == "llama.cpp"
        if llama_cpp:  # every stage before the pick, and the picks that reshape first
            names = stage_names(cfg, model)
            present = names[:-1] + ([names[-1]] if names[-1] in SHOWN_PICKS else [])
        else:
            present = STAGES if not cfg.greedy else STAGES[:1]
        for stage in present:
            upto = None if llama_cpp and stage == names[-1] else stage
            with Sampler(cfg, model.n_vocab, upto=upto, model=model) as chain:
                replay = llama_cpp and replays(chain.stages, cfg)
                diverged = None
                for t in prompt_tokens if llama_cpp else ():  # llama-server's chain has seen the prompt
                    chain.accept(t)
                for j, t in enumerate(history):  # what generation fed it before this position
                    if replay:
                        surv, sel = chain.apply(rows[j])
                        if sel >= 0 and diverged is None and int(surv["id"][sel]) != t:
                            diverged = (j, int(surv["id"][sel]), t)
                    chain.accept(t)
                mu = mirostat_mu(chain) if stage == "mirostat" else None
                surv, _ = chain.apply(row)
            logits = surv["logit"].astype(np.float64)
            keep = np.isfinite(logits)
            p = np.exp(logits[keep] - logits[keep].max())
            full = np.zeros(model.n_vocab)  # p by token id, 0 where the stage removed the token
            full[surv["id"][keep]] = p / p.sum()
            effect = stage_effect(model, cfg, stage, before, surv, mu=mu, diverged=diverged)
            stages.append(StageView(stage, int(keep.sum()), full[ids].tolist(), effect))
            argmax = int(np.argmax(full))  # the lowest id among equals
            before = surv
        if cfg.greedy and not llama_cpp:
            stages.append(StageView("greedy", 1, [1.0 if i == argmax else 0.0 for i in ids]))
        name = labels[k] if labels else cfg.label(seed=False)
        chains.append(ChainView(name, cfg.to_dict(), stages))
    return SamplerView(prompt, list(history), len(history), st.entropy, alts, chains)


def _token(model: Model, i: int, **values) -> dict:
    text, hexbytes = model.token_text(int(i))
    return {"id": int(i), "text": text, "bytes": hexbytes, **values}


def _by_id(cands, n: int):
    """A candidates array as one logit per token id (NaN where the token is not a candidate)."""
    import numpy as np

    out = np.full(n, np.nan)
    out[cands["id"]] = cands["logit"]
    return out


def stage_effect(model: Model, cfg, stage: str, before, after, mu: float | None = None, diverged=None) -> dict | None:
    """What a stage did at this position, from the candidates before and after it (id, logit, p arrays):

    - logit_bias, penalties, dry: the tokens whose logits it moved, by how much (after - before), the largest
      moves first (a ban is a move to -inf: delta None, banned True);
    - xtc: whether it fired, the tokens it removed with their probability before it, and, when it removed
      nothing, why (off, fewer than two tokens at or above the threshold, min_keep, or its draw said no);
    - mirostat: μ before this position's pick (read from the native state: sampler.mirostat_mu) and the cut it
      made; μ is None, with the reason, when it cannot be read or when replaying the history the chain picked
      other tokens than the history's (`diverged` = (position, its pick, the history's token)).
    Other stages: None."""
    import numpy as np

    n = model.n_vocab
    if stage == "dry" and (cfg.dry_multiplier == 0 or cfg.dry_base < 1 or cfg.dry_penalty_last_n == 0):
        return None  # off: llama_sampler_dry_apply returns at once
    if stage in SHIFTING:
        b, a = _by_id(before, n), _by_id(after, n)
        both = ~np.isnan(b) & ~np.isnan(a) & np.isfinite(b)
        delta = np.subtract(a, b, out=np.zeros(n), where=both)
        moved = np.flatnonzero(delta != 0)
        moved = moved[np.lexsort((moved, delta[moved]))][:MAX_EFFECT_TOKENS]  # the most lowered first
        toks = [_token(model, i, before=float(b[i]), after=float(a[i]) if np.isfinite(a[i]) else None,
                       delta=float(delta[i]) if np.isfinite(delta[i]) else None, banned=bool(np.isneginf(a[i])))
                for i in moved]
        return {"moved": int((delta != 0).sum()), "tokens": toks}
    if stage == "xtc":
        lb = before["logit"].astype(np.float64)
        ok = np.isfinite(lb)
        p = np.exp(lb[ok] - lb[ok].max())
        p /= p.sum()
        ids = before["id"][ok]
        out = ~np.isin(ids, after["id"])
        gone_ids, gone_p = ids[out], p[out]
        order = np.lexsort((gone_ids, -gone_p))
        gone, probs = gone_ids[order].tolist(), dict(zip(gone_ids[order].tolist(), gone_p[order].tolist()))
        above = int((p >= np.float32(cfg.xtc_threshold)).sum())
        why = None
        if not gone:
            if cfg.xtc_probability <= 0 or cfg.xtc_threshold > 0.5:
                why = "off (probability <= 0 or threshold > 0.5)"
            elif above < 2:
                why = f"{above} candidate(s) at or above the threshold: nothing to remove (it keeps the least likely)"
            elif len(p) - (above - 1) < cfg.min_keep:
                why = f"removing them would leave fewer than min_keep={cfg.min_keep}"
            else:
                why = f"its random draw did not fire (probability {cfg.xtc_probability:g})"
        return {"fired": bool(gone), "probability": cfg.xtc_probability, "threshold": cfg.xtc_threshold,
                "above": above, "removed": [_token(model, i, p=probs[i]) for i in gone[:MAX_EFFECT_TOKENS]],
                "n_removed": len(gone), "why": why}
    if stage == "mirostat":
        why = None
        if diverged is not None:
            from llamalens.visible import visible

            j, picked, had = (visible(*model.token_text(t)) if i else t for i, t in enumerate(diverged))
            why = (f"not shown: replaying the history, mirostat picked {picked} at generated token {j} where the "
                   f"history has {had} (the history was not sampled by this configuration and seed), so its μ here "
                   "is not the one generation had; the cut shown is the one it made with the μ it reached")
            mu = None
        elif mu is None:
            why = ("not shown: μ could not be read from this build's mirostat state (its τ and η fields did not "
                   "check); the cut shown is the one it made")
        return {"version": cfg.mirostat, "tau": cfg.mirostat_tau, "eta": cfg.mirostat_eta, "mu": mu,
                "kept": int(len(after)), "why": why}
    return None
