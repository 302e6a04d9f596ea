"""A stored run's confidence: per sample the measures of core/confidence.py over its tokens (or over the answer
span that --answer REGEX picks out), and over each prompt's seeds how much the answers agree. One table for every
run kind that generates text (a sweep's samples, a fork's base path and continuations, a tree's branches): `show`,
`export`, the report and Run.confidence() all read it.

    CONFIDENCE_COLUMNS   sample_idx, prompt_idx, config_idx, seed, answer (the span's text, or the whole text),
                         span_tokens, the measures (MEASURE_NAMES), distinct_share, cluster_entropy, answers
    distinct_share and cluster_entropy are of the sample's group: the samples of one prompt and one configuration
    (its seeds), `answers` of them.
"""

from __future__ import annotations

import math

import pandas as pd

from llamalens.core.confidence import MEASURE_NAMES, agreement, answer_span, check_answer_regex, sample_measures

GROUP_COLUMNS = ["distinct_share", "cluster_entropy", "answers"]
CONFIDENCE_COLUMNS = ["sample_idx", "prompt_idx", "config_idx", "seed", "answer", "span_tokens", *MEASURE_NAMES,
                      *GROUP_COLUMNS]


def check_answer_applies(info, answer: str | None) -> None:
    """An --answer regex checked, and refused for a run (its RunInfo) whose kind generates no text (lens,
    compare): there is no answer to pick out, and saying nothing would hide that it was ignored."""
    from llamalens.errors import InvalidInput
    from llamalens.run.kinds import kind

    check_answer_regex(answer)
    if answer is not None and not kind(info.kind).generates:
        raise InvalidInput(f"--answer picks the answer in generated text; run {info.id} is a {info.kind} run, which "
                           "has none: drop --answer")


def confidence_table(run, answer: str | None = None) -> pd.DataFrame:
    """One row per finished sample of a loaded run (run/loaded.py's LoadedRun: .samples, .by_sample), in sample
    order. `answer`: a regex whose first match (group 1 if any) is the answer span; a sample it does not match has
    no answer and nan measures."""
    check_answer_regex(answer)
    rows = []
    for s in run.samples:
        toks = run.by_sample.get(s.sample_idx, [])
        span, text = answer_span(toks, answer)
        rows.append({"sample_idx": s.sample_idx, "prompt_idx": s.prompt_idx, "config_idx": s.config_idx,
                     "seed": s.seed, "answer": text, "span_tokens": len(span), **sample_measures(span)})
    # grouped from the rows themselves: a DataFrame's text column reads a missing answer (None) as nan
    answers: dict[tuple[int, int], list[str | None]] = {}
    for row in rows:
        answers.setdefault((row["prompt_idx"], row["config_idx"]), []).append(row["answer"])
    groups = {key: agreement(group) | {"answers": len(group)} for key, group in answers.items()}
    df = pd.DataFrame(rows, columns=CONFIDENCE_COLUMNS[:-len(GROUP_COLUMNS)])
    for col in GROUP_COLUMNS:
        df[col] = [groups[k][col] for k in zip(df.prompt_idx, df.config_idx)] if len(df) else []
    return df[CONFIDENCE_COLUMNS]


def per_sample(table: pd.DataFrame) -> dict[int, dict]:
    """The table's rows by sample_idx, JSON-ready (nan -> None), without the ids: what each exported sample carries."""
    out = {}
    for row in table.to_dict(orient="records"):
        idx = int(row["sample_idx"])
        out[idx] = {k: (None if isinstance(v, float) and math.isnan(v) else v.item() if hasattr(v, "item") else v)
                    for k, v in row.items() if k not in ("sample_idx", "prompt_idx", "config_idx", "seed")}
    return out


def alike(table: pd.DataFrame, shown) -> list[tuple[tuple, list[tuple[int, int]]]]:
    """The table's rows grouped by what `shown(row)` displays of them (a tuple without sample, configuration and
    seed), in order of first appearance: [(shown, [(config_idx, seed), ...])]. Samples that look the same (a greedy
    chain's seeds, configurations that are one chain) are then one row with a count."""
    groups: dict = {}
    for r in table.itertuples():
        groups.setdefault(shown(r), []).append((r.config_idx, r.seed))
    return list(groups.items())
