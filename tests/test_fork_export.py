"""`export` of a fork run: the CSV and parquet token tables carry each token's sample's fork columns
(role, position, forced token, its p, chosen, continuation number, outcome), read back and compared with what
the store holds for every sample."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from llamalens.store import Store
from test_fork import _first_char_run, cli


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_of_a_fork_run_carries_the_fork_columns(tiny_path, tmp_path, fmt):
    store, _ = _first_char_run(tiny_path, tmp_path, "1-2")
    db, out = tmp_path / "s1-2.db", tmp_path / f"fork.{fmt}"
    cli("export", 1, "--format", fmt, "-o", out, "--store", db)
    df = pd.read_csv(out, keep_default_na=False, na_values=[""]) if fmt == "csv" else pd.read_parquet(out)
    cols = list(df.columns)
    assert cols[cols.index("sample_idx") + 1: cols.index("sample_idx") + 10] == [
        "fork_role", "fork_position", "forced_token", "forced_text", "forced_bytes", "forced_prob", "forced_chosen",
        "continuation", "outcome"]
    samples = Store(db).samples(1)
    assert sorted(set(df.sample_idx)) == [s.sample_idx for s in samples] and len(samples) > 10
    for s in samples:
        rows = df[df.sample_idx == s.sample_idx]
        assert list(rows.token_id) == [t.id for _, t in store.tokens(1, s.sample_idx)]
        x = s.extra
        assert set(rows.fork_role) == {x["role"]} and set(rows.outcome) == {x["outcome"]}
        if x["role"] == "base":
            assert rows.fork_position.isna().all() and rows.forced_token.isna().all()
            continue
        assert set(rows.fork_position) == {x["position"]} and set(rows.forced_token) == {x["forced_token"]}
        assert set(rows.continuation) == {x["sample"]} and set(rows.forced_bytes) == {x["forced_bytes"]}
        assert set(rows.forced_chosen.astype(bool)) == {x["chosen"]}
        assert all(math.isclose(p, x["prob"], rel_tol=1e-15) for p in rows.forced_prob)  # CSV keeps repr digits
        # forced_text: CSV quotes every text field, so a space or comma reads back as it was
        assert set(rows.forced_text.fillna("")) == {x["forced_text"]}
