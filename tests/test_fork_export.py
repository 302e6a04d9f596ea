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


def _csv_fields(text: str):
    """The fields of a CSV text exactly as written (quotes kept), row by row: what a reader would give back, without
    reformatting a number or dropping a quote."""
    row, field, quoted = [], "", False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        if not quoted and ch == ",":
            row.append(field)
            field = ""
        elif not quoted and ch == "\n" and text[i - 1] == "\r":
            row.append(field[:-1])
            yield row
            row, field = [], ""
        else:
            field += ch


def _without_added(path, fmt: str) -> bytes:
    """An export with what was added since the fixture store was written taken out again: each jsonl sample's
    "confidence", the csv's renyi and conf_* columns."""
    import json

    text = path.read_bytes().decode("utf-8")  # CR LF kept: a CSV row ends with both
    if fmt == "jsonl":
        lines = [json.loads(line) for line in text.splitlines()]
        for d in lines:
            d.pop("confidence", None)
        return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in lines).encode("utf-8")
    rows = list(_csv_fields(text))
    keep = [i for i, name in enumerate(rows[0]) if name.strip('"') != "renyi" and not name.strip('"').startswith("conf_")]
    return "".join(",".join(r[i] for i in keep) + "\r\n" for r in rows).encode("utf-8")


def test_a_store_written_with_untyped_extras_opens_and_exports_as_it_did(tmp_path):
    """tests/data/store-dict-extras.db was written while samples.extra was dicts read by key (a fork run, a sweep of
    greedy / beam / best-of / no-repeat-ngram, a grammar sweep, on the tiny model); show --json and export (jsonl,
    csv) give exactly what that version gave (store-dict-extras.json: its show output, its exports' sha256)."""
    import hashlib
    import json
    import shutil

    from conftest import ROOT
    from llamalens.run.fork import load_fork
    from llamalens.run.fork_records import BaseExtra, Continuation
    from llamalens.run.sweep_records import SweepExtra

    data = ROOT / "tests" / "data"
    db = tmp_path / "old.db"
    shutil.copy(data / "store-dict-extras.db", db)
    expected = json.loads((data / "store-dict-extras.json").read_text(encoding="utf-8"))
    for run, want in expected.items():
        got = json.loads(cli("show", run, "--store", db, "--json").output)
        got.pop("confidence", None)  # added since: each answer's confidence measures
        assert got == want["show"], run
        for fmt in ("jsonl", "csv"):
            out = tmp_path / f"{run}.{fmt}"
            cli("export", run, "--store", db, "--format", fmt, "-o", out)
            assert hashlib.sha256(_without_added(out, fmt)).hexdigest() == want[f"{fmt}_sha256"], (run, fmt)
    # the records read from it are typed, and write back the dicts they were read from (with their version)
    store = Store(db)
    samples = store.samples(store.run("fork-run").id)
    base = BaseExtra.from_dict(samples[0].extra)
    assert base.plan.samples == 2 and base.cost.sequences == len(samples) - 1 and base.decode_stats["decodes"] > 0
    assert json.dumps(base.to_dict()) == json.dumps(_versioned(samples[0].extra))  # the same keys, in order
    for s in samples[1:]:
        assert json.dumps(Continuation.from_dict(s.extra).to_dict()) == json.dumps(_versioned(s.extra))
    fr = load_fork(store, "fork-run")
    assert fr.plan == base.plan and fr.cost == base.cost and fr.outcome.mode == "first_line"
    kinds = set()
    for run in ("strategies-run", "grammar-run"):
        for s in store.samples(store.run(run).id):
            x = SweepExtra.from_dict(s.extra)
            assert json.dumps(x.to_dict()) == json.dumps(_versioned(s.extra) if s.extra else None)
            kinds |= {type(x.strategy).__name__} | ({"grammar"} if x.grammar_removed else set()) | \
                ({"blocked"} if x.blocked else set())
    assert kinds == {"BeamExtra", "BestOfExtra", "NoneType", "grammar", "blocked"}


def _versioned(extra: dict) -> dict:
    """A stored extra as its record writes it now: "version" after "role" (a fork's), else first."""
    items = list(extra.items())
    at = 1 if items and items[0][0] == "role" else 0
    return dict(items[:at] + [("version", 1)] + items[at:])
