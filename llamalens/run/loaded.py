"""Analysis of stored runs: one loaded run, its token table and per-configuration summary (pandas),
and exports.

    Store ──► load_run (the run's info, configs, samples and tokens, each read once)
          ──► LoadedRun.tokens / .samples_table / .summary  ──► `show`, the report, `export`

Columns are declared once here (TOKEN_COLUMNS, SUMMARY_COLUMNS) and used by `show`, `export` and the
report alike. Everything below the loading is a pure function of what was loaded.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

import pandas as pd

from llamalens.errors import InvalidInput
from llamalens.core.strategies import sequence_metrics
from llamalens.records import StoredSample, TokenRecord
from llamalens.run.sweep_records import SweepExtra
from llamalens.settings import SamplingSettings
from llamalens.store import RunInfo, Store

SETTING_COLUMNS = ["temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty"]
# decoding strategy: its settings, and the per-sample figures strategies are compared by
STRATEGY_COLUMNS = ["strategy", "beams", "length_penalty", "no_repeat_ngram", "best_of"]
# every setting a configuration has, in SamplingSettings' order (the seed is an axis of its own)
SETTINGS = [f.name for f in fields(SamplingSettings) if f.name != "seed"]
METRIC_COLUMNS = ["seq_logprob", "mean_logprob", "perplexity", "distinct_1", "distinct_2", "rep_4", "length"]
TOKEN_COLUMNS = ["run_id", "sample_idx", "prompt_idx", "config_idx", "seed", *SETTING_COLUMNS, *STRATEGY_COLUMNS,
                 "position", "token_id", "text", "bytes", "logprob", "prob", "sampled_logprob", "rank", "entropy",
                 "candidates", "eog", "renyi", "blocked"]
STRATEGY_SUMMARY = [*STRATEGY_COLUMNS, "seq_logprob", "sample_distinct_1", "sample_distinct_2", "rep_4", "length"]
SUMMARY_COLUMNS = ["config_idx", "label", *SETTING_COLUMNS, *STRATEGY_COLUMNS, "samples", "tokens", "mean_logprob",
                   "perplexity", "mean_entropy", "mean_candidates", "distinct_completions", "distinct_2", "mean_rank",
                   "tokens_per_s", "seq_logprob", "sample_distinct_1", "sample_distinct_2", "rep_4", "length"]


@dataclass
class LoadedRun:
    """One run read from the store once: what `show`, the report and `export` are built from."""

    info: RunInfo
    configs: list[SamplingSettings]
    samples: list[StoredSample]  # the finished ones, by sample_idx
    by_sample: dict[int, list[TokenRecord]] = field(repr=False)

    @property
    def id(self) -> int:
        return self.info.id

    @cached_property
    def strategies(self) -> bool:
        """Whether the run compares decoding strategies: only then do its tables carry the strategy columns
        (a run of sampler settings alone exports and shows the same columns as a store written before strategies
        existed)."""
        return uses_strategies(self.configs)

    @cached_property
    def tokens(self) -> pd.DataFrame:
        """One row per stored token, with its sample's prompt, config, seed and settings."""
        rows = []
        for s in self.samples:
            cfg = self.configs[s.config_idx]
            head = [self.id, s.sample_idx, s.prompt_idx, s.config_idx, s.seed,
                    *(getattr(cfg, c) for c in SETTING_COLUMNS + STRATEGY_COLUMNS)]
            rows += [head + [t.position, t.id, t.text, t.bytes, t.logprob, math.exp(t.logprob), t.sampled_logprob,
                             t.rank, t.entropy, t.candidates, t.eog, math.nan if t.renyi is None else t.renyi,
                             " ".join(map(str, t.blocked))]
                     for t in self.by_sample.get(s.sample_idx, [])]
        df = pd.DataFrame(rows, columns=TOKEN_COLUMNS)
        return df if self.strategies else df.drop(columns=STRATEGY_COLUMNS + ["blocked"])

    @cached_property
    def samples_table(self) -> pd.DataFrame:
        rows = []
        for s in self.samples:
            tm = s.timing
            toks = self.by_sample.get(s.sample_idx, [])
            m = sequence_metrics([t.logprob for t in toks], [t.id for t in toks], [t.eog for t in toks])
            rows.append([s.sample_idx, s.prompt_idx, s.config_idx, s.seed, s.prompt, s.text, s.finish_reason,
                         tm.generated_tokens if tm else 0, tm.tokens_per_s if tm else None,
                         tm.first_token_ms if tm else None, *(m[c] for c in METRIC_COLUMNS)])
        return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)

    @cached_property
    def summary(self) -> pd.DataFrame:
        df = summary(self.tokens, self.samples_table, self.configs)
        return df if self.strategies else df[[c for c in SUMMARY_COLUMNS if c not in STRATEGY_SUMMARY]]

    def labels(self) -> dict[int, str]:
        """Each configuration's short label, by config_idx."""
        return {i: c.label(seed=False) for i, c in enumerate(self.configs)}


def load_run(store: Store, run_id) -> LoadedRun:
    info = store.run(run_id)
    samples, by_sample = store.samples(info.id), store.tokens_by_sample(info.id)
    for s in samples:  # no-repeat-ngram's banned ids are kept in the sample's extra, by position
        for pos, ids in SweepExtra.from_dict(s.extra).blocked.items():
            toks = by_sample.get(s.sample_idx, [])
            if pos < len(toks):
                toks[pos].blocked = list(ids)
    return LoadedRun(info, store.configs(info.id), samples, by_sample)


SAMPLE_COLUMNS = ["sample_idx", "prompt_idx", "config_idx", "seed", "prompt", "text", "finish_reason", "tokens",
                  "tokens_per_s", "first_token_ms", *METRIC_COLUMNS]


def json_records(frame: pd.DataFrame) -> list[dict]:
    """A DataFrame as JSON-ready rows with every float exact (pandas' to_json rounds to 10 digits); NaN -> null."""
    out = []
    for row in frame.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and v != v else v.item() if hasattr(v, "item") else v)
                    for k, v in row.items()})
    return out


def distinct_2(token_lists: list[list[int]]) -> float:
    """Distinct bigrams / all bigrams, over the samples given (diversity of the text)."""
    grams = [(a, b) for toks in token_lists for a, b in zip(toks, toks[1:])]
    return len(set(grams)) / len(grams) if grams else float("nan")


def summary(tokens: pd.DataFrame, samples: pd.DataFrame, configs: list[SamplingSettings]) -> pd.DataFrame:
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
        rows.append({
            "config_idx": ci, "label": cfg.label(seed=False),
            **{c: getattr(cfg, c) for c in SETTING_COLUMNS},
            "samples": len(s), "tokens": len(t), "mean_logprob": mean_lp,
            "perplexity": math.exp(-mean_lp) if len(t) else float("nan"),
            "mean_entropy": float(t.entropy.mean()), "mean_candidates": float(t.candidates.mean()),
            "distinct_completions": float(per_prompt_distinct.mean()), "distinct_2": distinct_2(seqs),
            "mean_rank": float(t["rank"].mean()), "tokens_per_s": float(s.tokens_per_s.dropna().mean())
            if s.tokens_per_s.notna().any() else float("nan"),
            **{c: getattr(cfg, c) for c in STRATEGY_COLUMNS},
            "seq_logprob": float(s.seq_logprob.mean()), "sample_distinct_1": float(s.distinct_1.mean()),
            "sample_distinct_2": float(s.distinct_2.mean()), "rep_4": float(s.rep_4.mean()),
            "length": float(s.length.mean()),
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def uses_strategies(configs: list[SamplingSettings]) -> bool:
    """Whether a run compares decoding strategies (beam, greedy, best-of, n-gram blocking), not only samplers."""
    d = SamplingSettings()
    return any(c.strategy != d.strategy or c.no_repeat_ngram or c.best_of > 1 for c in configs)


STRATEGY_TABLE = [("config_idx", "#"), ("label", "configuration"), ("samples", "samples"),
                  ("seq_logprob", "seq logprob"), ("mean_logprob", "mean logprob"), ("perplexity", "ppl"),
                  ("sample_distinct_1", "distinct-1 in sample"), ("sample_distinct_2", "distinct-2 in sample"), ("rep_4", "rep-4"),
                  ("length", "length"), ("tokens_per_s", "tok/s")]
"""The strategy comparison (`show` and the report): per configuration, means over its samples of the per-sample
figures (decoding.sequence_metrics); distinct-n and rep-4 are within one sample."""


def openai_logprobs(run: LoadedRun, answer: str | None = None):
    """Each sample in the OpenAI completions `logprobs` shape plus our fields (for jsonl export), its confidence
    measures (run/confidence.py; over the `answer` regex's span) among them."""
    from llamalens.run.confidence import confidence_table, per_sample

    confidence = per_sample(confidence_table(run, answer))
    for s in run.samples:
        every = run.by_sample.get(s.sample_idx, [])
        toks = [t for t in every if not t.eog]
        offsets, pos = [], 0
        for t in toks:
            offsets.append(pos)
            pos += len(t.text)
        yield {
            "run_id": run.id, "sample_idx": s.sample_idx, "prompt_idx": s.prompt_idx, "prompt": s.prompt,
            "settings": run.configs[s.config_idx].with_(seed=s.seed).to_dict(), "text": s.text,
            "finish_reason": s.finish_reason,
            "logprobs": {
                "tokens": [t.text for t in toks], "token_logprobs": [t.logprob for t in toks],
                "top_logprobs": [{a.text: a.logprob for a in t.top} for t in toks], "text_offset": offsets,
            },
            "tokens": [t.to_dict() for t in every],
            "confidence": confidence.get(s.sample_idx),
            **({"extra": s.extra} if s.extra else {}),  # what the run's kind records (a fork's position, outcome)
        }


EXPORT_FORMATS = ("csv", "parquet", "jsonl")

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may read as the start of a formula


def excel_safe(df):
    """The table with every text cell that a spreadsheet would take for a formula (=, +, -, @, tab, CR first)
    prefixed with an apostrophe, as OWASP advises against CSV injection. The text no longer round-trips byte
    for byte; the `bytes` column (hex) still does."""
    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_object_dtype(out[col]) or pd.api.types.is_string_dtype(out[col]):
            out[col] = [("'" + v) if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v for v in out[col]]
    return out


def export_run(run: LoadedRun, fmt: str, output: str | os.PathLike, safe_for_spreadsheets: bool = False,
               answer: str | None = None) -> int:
    """Write a run's token table (csv, parquet) or its samples in OpenAI logprobs shape (jsonl).

    Written to FILE.part and renamed, so a failed export never leaves half a file under the name; a path
    that is a run store (or its -wal / -shm) is refused. CSV quotes every text field, so a token holding a
    CR, a newline, a quote or a comma reads back as one field; the `bytes` column (hex) is exact. A text cell
    may begin with "=", "+", "-" or "@", which a spreadsheet opens as a formula: `safe_for_spreadsheets`
    (csv only) prefixes those with an apostrophe (excel_safe). Each sample carries its confidence measures
    (run/confidence.py, over the span the `answer` regex picks out, else the whole text): under "confidence" in
    jsonl, as conf_* columns on each of its tokens' rows in csv and parquet. Returns the number of rows (tokens, or
    samples for jsonl).
    """
    from llamalens.run.confidence import check_answer_applies
    from llamalens.run.kinds import kind
    from llamalens.store import check_not_a_store

    if fmt not in EXPORT_FORMATS:
        raise InvalidInput(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    check_answer_applies(run.info, answer)
    if safe_for_spreadsheets and fmt != "csv":
        raise InvalidInput(f"--excel-safe applies to csv (a {fmt} file is not opened as a spreadsheet); drop it")
    out = Path(output)
    check_not_a_store(out)
    tmp = out.with_name(out.name + ".part")
    while os.path.lexists(tmp):  # someone else's file: not ours to overwrite or remove
        tmp = tmp.with_name(tmp.name + "_")
    try:
        if fmt == "jsonl":
            n = 0
            with open(tmp, "w", encoding="utf-8") as f:
                for obj in openai_logprobs(run, answer):
                    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                    n += 1
        else:
            columns = kind(run.info.kind).token_columns  # what the run's kind adds to each token's row
            df = with_confidence(run, columns(run, run.tokens) if columns else run.tokens, answer)
            n = len(df)
            if fmt == "csv":
                df = excel_safe(df) if safe_for_spreadsheets else df
                df.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n")
            else:
                try:
                    df.to_parquet(tmp, index=False)
                except ImportError:
                    raise InvalidInput("parquet needs pyarrow: pip install pyarrow (or use --format csv)") from None
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InvalidInput(f"cannot write {out} ({e.strerror}); choose a writable path") from None
    return n


def with_confidence(run: LoadedRun, tokens: pd.DataFrame, answer: str | None = None) -> pd.DataFrame:
    """The token table with each sample's confidence measures (run/confidence.py) as conf_* columns on its rows."""
    from llamalens.run.confidence import confidence_table
    from llamalens.run.kinds import kind

    if not kind(run.info.kind).generates:  # a lens's or a comparison's rows: no generated answer to measure
        return tokens
    conf = confidence_table(run, answer).drop(columns=["prompt_idx", "config_idx", "seed"])
    conf = conf.rename(columns={c: f"conf_{c}" for c in conf.columns if c != "sample_idx"})
    return tokens.merge(conf, on="sample_idx", how="left", sort=False)


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


def varying_axes(configs: list[SamplingSettings],
                 axes: list[str] = SETTING_COLUMNS + ["frequency_penalty", "presence_penalty"]) -> list[str]:
    """The settings that take more than one value across a run's configurations, in grid order."""
    return [a for a in axes if len({getattr(c, a) for c in configs}) > 1]


def position_curves(tokens: pd.DataFrame, prompt_idx: int) -> dict[int, pd.DataFrame]:
    """Per configuration, the mean over seeds of prob / entropy / candidates at each generated position."""
    t = tokens[tokens.prompt_idx == prompt_idx]
    return {int(ci): g.groupby("position")[["prob", "entropy", "candidates"]].mean()
            for ci, g in t.groupby("config_idx")}
