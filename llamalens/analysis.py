"""Pure analysis of stored runs: the token table and the per-configuration summary (pandas).

Columns are declared once here (TOKEN_COLUMNS, SUMMARY_COLUMNS) and used by `show`, `export` and the
report alike.
"""

from __future__ import annotations

import math

import pandas as pd

from .store import Store

SETTING_COLUMNS = ["temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty"]
TOKEN_COLUMNS = ["run_id", "sample_idx", "prompt_idx", "config_idx", "seed", *SETTING_COLUMNS, "position", "token_id",
                 "text", "bytes", "logprob", "prob", "sampled_logprob", "rank", "entropy", "candidates", "eog"]
SUMMARY_COLUMNS = ["config_idx", "label", *SETTING_COLUMNS, "samples", "tokens", "mean_logprob", "perplexity",
                   "mean_entropy", "mean_candidates", "distinct_completions", "distinct_2", "mean_rank",
                   "tokens_per_s"]


def token_table(store: Store, run_id: int) -> pd.DataFrame:
    """One row per stored token, with its sample's prompt, config, seed and settings."""
    samples = {s["sample_idx"]: s for s in store.samples(run_id)}
    configs = store.configs(run_id)
    rows = []
    for idx, t in store.tokens(run_id):
        s = samples.get(idx)
        if s is None:
            continue
        cfg = configs[s["config_idx"]]
        rows.append([run_id, idx, s["prompt_idx"], s["config_idx"], s["seed"], *(cfg[c] for c in SETTING_COLUMNS),
                     t.position, t.id, t.text, t.bytes, t.logprob, math.exp(t.logprob), t.sampled_logprob, t.rank,
                     t.entropy, t.candidates, t.eog])
    return pd.DataFrame(rows, columns=TOKEN_COLUMNS)


def sample_table(store: Store, run_id: int) -> pd.DataFrame:
    rows = []
    for s in store.samples(run_id):
        tm = s["timing"] or {}
        rows.append({"sample_idx": s["sample_idx"], "prompt_idx": s["prompt_idx"], "config_idx": s["config_idx"],
                     "seed": s["seed"], "prompt": s["prompt"], "text": s["text"], "finish_reason": s["finish_reason"],
                     "tokens": tm.get("generated_tokens", 0), "tokens_per_s": tm.get("tokens_per_s"),
                     "first_token_ms": tm.get("first_token_ms")})
    return pd.DataFrame(rows, columns=["sample_idx", "prompt_idx", "config_idx", "seed", "prompt", "text",
                                       "finish_reason", "tokens", "tokens_per_s", "first_token_ms"])


def distinct_2(token_lists: list[list[int]]) -> float:
    """Distinct bigrams / all bigrams, over the samples given (diversity of the text)."""
    grams = [(a, b) for toks in token_lists for a, b in zip(toks, toks[1:])]
    return len(set(grams)) / len(grams) if grams else float("nan")


def summary(tokens: pd.DataFrame, samples: pd.DataFrame, configs: list[dict]) -> pd.DataFrame:
    """Per configuration: mean logprob, perplexity, entropy, candidates, diversity across seeds, rank, speed."""
    rows = []
    for ci, cfg in enumerate(configs):
        t = tokens[(tokens.config_idx == ci) & (~tokens.eog)]
        s = samples[samples.config_idx == ci]
        if s.empty:
            continue
        mean_lp = float(t.logprob.mean()) if len(t) else float("nan")
        per_prompt_distinct = s.groupby("prompt_idx").text.nunique()
        seqs = [g.sort_values("position").token_id.tolist() for _, g in t.groupby("sample_idx")]
        from .settings import SamplingSettings

        rows.append({
            "config_idx": ci, "label": SamplingSettings.from_dict(cfg).label().rsplit(" seed=", 1)[0],
            **{c: cfg[c] for c in SETTING_COLUMNS},
            "samples": len(s), "tokens": len(t), "mean_logprob": mean_lp,
            "perplexity": math.exp(-mean_lp) if len(t) else float("nan"),
            "mean_entropy": float(t.entropy.mean()), "mean_candidates": float(t.candidates.mean()),
            "distinct_completions": float(per_prompt_distinct.mean()), "distinct_2": distinct_2(seqs),
            "mean_rank": float(t["rank"].mean()), "tokens_per_s": float(s.tokens_per_s.dropna().mean())
            if s.tokens_per_s.notna().any() else float("nan"),
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def openai_logprobs(store: Store, run_id: int):
    """Each sample in the OpenAI completions `logprobs` shape plus our fields (for jsonl export)."""
    configs = store.configs(run_id)
    by_sample: dict[int, list] = {}
    for idx, t in store.tokens(run_id):
        by_sample.setdefault(idx, []).append(t)
    for s in store.samples(run_id):
        toks = [t for t in by_sample.get(s["sample_idx"], []) if not t.eog]
        offsets, pos = [], 0
        for t in toks:
            offsets.append(pos)
            pos += len(bytes.fromhex(t.bytes).decode("utf-8", errors="replace"))
        yield {
            "run_id": run_id, "sample_idx": s["sample_idx"], "prompt_idx": s["prompt_idx"], "prompt": s["prompt"],
            "settings": dict(configs[s["config_idx"]], seed=s["seed"]), "text": s["text"],
            "finish_reason": s["finish_reason"],
            "logprobs": {
                "tokens": [t.text for t in toks], "token_logprobs": [t.logprob for t in toks],
                "top_logprobs": [{a.text: a.logprob for a in t.top} for t in toks], "text_offset": offsets,
            },
            "tokens": [t.to_dict() for t in by_sample.get(s["sample_idx"], [])],
        }


# -- comparisons between samples (pure functions of token-id lists) ------------------------------
def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First position where two token sequences differ (a shorter one differs where it ends); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def seed_splits(seqs: list[list[int]]) -> tuple[int, list[int]]:
    """(number of distinct completions, positions where the completions split into more branches).

    Position i is a split when the sequences' prefixes of length i+1 fall into more groups than their
    prefixes of length i: the seeds drew different tokens there.
    """
    distinct = len({tuple(s) for s in seqs})
    splits, groups = [], 1
    for i in range(max((len(s) for s in seqs), default=0)):
        n = len({tuple(s[: i + 1]) for s in seqs})
        if n > groups:
            splits.append(i)
        groups = n
    return distinct, splits


def varying_axes(configs: list[dict], axes: list[str] = SETTING_COLUMNS + ["frequency_penalty", "presence_penalty"]):
    """The settings that take more than one value across a run's configurations, in grid order."""
    return [a for a in axes if len({c.get(a) for c in configs}) > 1]


def position_curves(tokens: pd.DataFrame, prompt_idx: int) -> dict[int, pd.DataFrame]:
    """Per configuration, the mean over seeds of prob / entropy / candidates at each generated position."""
    t = tokens[tokens.prompt_idx == prompt_idx]
    return {int(ci): g.groupby("position")[["prob", "entropy", "candidates"]].mean()
            for ci, g in t.groupby("config_idx")}
