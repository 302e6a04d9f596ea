"""What llamalens guarantees to a careless or hostile user (README, "Reliability"), one test per class:

nothing committed is lost or corrupted (exports round-trip every byte; a foreign SQLite file, or a store
named as an output, is left untouched; a full disk or a kill leaves a resumable run), bad input is a
clear error (never a traceback), and untrusted text never reaches a terminal or a page raw."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from llamalens.cli import main
from llamalens.errors import InvalidInput
from llamalens.records import Hardware, RunOptions, Sample, Timing, TokenRecord
from llamalens.settings import SamplingSettings
from llamalens.store import APPLICATION_ID, Store
from llamalens.run.sweep import SweepInterrupted, SweepSpec, execute, start_sweep
from clirun import cli

# every C0 control, DEL, the 8-bit C1 controls, and the escape families a terminal acts on
CONTROLS = [chr(c) for c in range(0x20) if chr(c) not in "\n\t"] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)]
ESCAPES = ["\x1b[31mred\x1b[0m", "\x1b]0;window title\x07", "\x1b]52;c;cHduZWQ=\x07", "\x1bP1$qm\x1b\\", "\x9b31m",
           "bell\x07", "back\x08space", "bare\rCR", "\u202eevil"]
HOSTILE = "".join(CONTROLS) + " " + " ".join(ESCAPES)


def raw_controls(text: str) -> list[str]:
    """Terminal-active characters left raw (a CR is allowed only as part of CRLF)."""
    bad = [c for c in set(text) if c in CONTROLS or c == "\u202e"]
    return sorted(set(bad) - {"\r"}) + (["bare CR"] if "\r" in text.replace("\r\n", "") else [])


# -- 1. exports round-trip every byte ----------------------------------------------------------------------
PIECES = [bytes([b]) for b in range(0x20)] + [b"\r", b"\n", b"\r\n", b'"', b"'", b",", b"\t", b";", b"a,\"b\"\r\nc",
                                             b"\xe2", b"\x82", b"\xac", b"\xf0\x9f", b"=SUM(A1)", b" lead", b"trail "]


def _store_with_pieces(db) -> tuple[Store, int]:
    """A run whose one sample's tokens are PIECES (written through the store's own API)."""
    store = Store(db)
    cfg = SamplingSettings(temperature=0)
    rid = store.create_run(name="bytes", command="test", model={"name": "none"}, model_hash="", versions={},
                           hardware=Hardware(), options=RunOptions(),
                           configs=[cfg], plan=[(0, 0, 0, "p\r\nq")])
    toks = [TokenRecord(i, 1000 + i, piece.decode("utf-8", errors="replace"), piece.hex(), -0.5 - i / 100, 0.0, 1,
                        1.0, 1, []) for i, piece in enumerate(PIECES)]
    text = b"".join(PIECES).decode("utf-8", errors="replace")
    store.save_sample(rid, 0, Sample("p\r\nq", [1], cfg.to_dict(), len(toks), text, "length", toks,
                                     Timing(1, len(toks), 1.0, 1.0, 2.0)))
    store.set_status(rid, "done")
    return store, rid


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_export_round_trips_every_byte(tmp_path, fmt):
    db = tmp_path / "b.db"
    _store_with_pieces(db)
    out = tmp_path / f"t.{fmt}"
    cli("export", "bytes", "--format", fmt, "-o", out, "--store", db)
    want_hex = [p.hex() for p in PIECES]
    want_text = [p.decode("utf-8", errors="replace") for p in PIECES]
    if fmt == "jsonl":
        objs = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
        assert len(objs) == 1
        assert [t["bytes"] for t in objs[0]["tokens"]] == want_hex
        assert [t["text"] for t in objs[0]["tokens"]] == want_text
        assert objs[0]["prompt"] == "p\r\nq"
        return
    if fmt == "csv":
        with open(out, newline="", encoding="utf-8") as f:  # Python's csv module, independently of pandas
            rows = list(csv.DictReader(f))
        assert len(rows) == len(PIECES)
        assert [r["bytes"] for r in rows] == want_hex and [r["text"] for r in rows] == want_text
        df = pd.read_csv(out, dtype={"bytes": str}, keep_default_na=False)
    else:
        df = pd.read_parquet(out)
    assert len(df) == len(PIECES)
    assert df["bytes"].tolist() == want_hex and df["text"].tolist() == want_text
    assert df["token_id"].tolist() == [1000 + i for i in range(len(PIECES))]
    assert [round(x, 9) for x in df["logprob"]] == [round(-0.5 - i / 100, 9) for i in range(len(PIECES))]


# -- 2. a foreign SQLite file (or any other file) is refused untouched --------------------------------------
def test_foreign_files_are_left_untouched(tmp_path):
    foreign = tmp_path / "app.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        con.execute("INSERT INTO notes (body) VALUES ('keep me')")
    con.close()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    other_app = tmp_path / "other.db"
    with sqlite3.connect(other_app) as con:
        con.execute("PRAGMA application_id = 1234")
        con.execute("CREATE TABLE meta (key TEXT)")
    con.close()
    for path, word in ((foreign, "another application"), (text, "not an SQLite database"),
                       (other_app, "application id 0x000004D2")):
        before = path.read_bytes()
        for args in (["runs"], ["show", "1"], ["sweep", "x", "--model", "nope.gguf"]):
            res = cli(*args, "--store", path, ok=False)
            assert res.exit_code == 1 and word in res.output and "Traceback" not in res.output, res.output
        assert path.read_bytes() == before
        assert not (tmp_path / (path.name + "-wal")).exists() and not (tmp_path / (path.name + "-shm")).exists()
    new = tmp_path / "new.db"
    Store(new).close()
    with sqlite3.connect(new) as con:
        assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


# -- 3. an output path that is the store is refused --------------------------------------------------------------
def test_output_onto_the_store_is_refused(tiny_path, tmp_path):
    db = tmp_path / "s.db"
    cli("sweep", "the cat", "--model", tiny_path, "-n", 3, "--store", db)
    Store(db).db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = db.read_bytes()
    for args in (["export", 1, "--format", "csv", "-o", db], ["export", 1, "--format", "jsonl", "-o", f"{db}-wal"],
                 ["report", 1, "-o", db, "--format", "html", "--no-model"],
                 ["report", 1, "-o", f"{db}-shm", "--format", "md", "--no-model"]):
        res = cli(*args, "--store", db, ok=False)
        assert res.exit_code == 1 and "will not overwrite it" in res.output, res.output
    assert db.read_bytes() == before and Store(db).run(1).n_done == 1


# -- 4. a full disk: a clear message, the run interrupted, resumable ---------------------------------------------
def test_full_disk_interrupts_and_resumes(tiny, tmp_path):
    store = Store(tmp_path / "full.db")
    spec = SweepSpec(["the cat"], [SamplingSettings(temperature=1.0)], list(range(40)), max_tokens=40, parallel=4)
    rid = start_sweep(tiny, store, spec)
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages + 6}")  # SQLite's own SQLITE_FULL, a few samples in
    with pytest.raises(SweepInterrupted, match=r"full.*resume with: llamalens sweep --resume") as info:
        execute(tiny, store, rid)
    assert not info.value.by_signal
    run = store.run(rid)
    assert run.status == "interrupted" and 0 < run.n_done < 40
    saved = {s.sample_idx: s.text for s in store.samples(rid)}
    store.db.execute("PRAGMA max_page_count = 1073741823")
    execute(tiny, store, rid)
    run = store.run(rid)
    assert run.status == "done" and run.n_done == 40 and run.resumes == 1
    assert {s.sample_idx: s.text for s in store.samples(rid) if s.sample_idx in saved} == saved  # kept as they were
    assert store.db.execute("SELECT COUNT(*) FROM (SELECT DISTINCT sample_idx FROM tokens WHERE run_id=?)",
                            (rid,)).fetchone()[0] == 40


# -- 5. and 14. kill -9, SIGINT, SIGTERM: status and exit codes ------------------------------------------------
def _start_slow_sweep(tiny_path, db):
    cmd = [sys.executable, "-m", "llamalens", "sweep", "the cat", "--model", str(tiny_path), "-t", "0.5,1.2",
           "--seeds", "300", "-n", "60", "--parallel", "2", "--store", str(db), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it has committed a sample, not for a fixed time
        time.sleep(0.2)
        if db.exists():
            try:
                if Store(db).run(1).n_done >= 1:
                    return proc
            except Exception:  # noqa: BLE001 - the run may not be planned yet
                pass
        assert proc.poll() is None, proc.communicate()
    proc.kill()
    raise AssertionError("the sweep saved no sample within 120 s")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_save_and_exit_with_shell_codes(tiny_path, tmp_path, sig, code):
    db = tmp_path / "sig.db"
    proc = _start_slow_sweep(tiny_path, db)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "resume with: llamalens sweep --resume 1" in err and "Traceback" not in err
    run = Store(db).run(1)
    assert run.status == "interrupted" and run.n_done >= 1


def test_kill_9_reads_as_interrupted_and_resumes(tiny_path, tmp_path):
    db = tmp_path / "k.db"
    proc = _start_slow_sweep(tiny_path, db)
    proc.kill()
    proc.wait(timeout=30)
    runs = json.loads(cli("runs", "--json", "--store", db).stdout)
    assert runs[0]["status"] == "interrupted"
    assert "resume with `llamalens sweep --resume 1`" in cli("show", 1, "--store", db).stdout
    done = Store(db).run(1).n_done
    assert 0 < done < 600


def test_resume_refuses_a_live_writer(tiny_path, tmp_path):
    db = tmp_path / "live.db"
    proc = _start_slow_sweep(tiny_path, db)
    try:
        res = cli("sweep", "--resume", 1, "--store", db, ok=False)
        assert res.exit_code == 1 and "is being written by pid" in res.output
    finally:
        proc.kill()
        proc.wait(timeout=30)


# -- 6. arguments that are not UTF-8 ------------------------------------------------------------------------------
def test_non_utf8_arguments_are_a_clear_error(tiny_path, tmp_path):
    base = [sys.executable, "-m", "llamalens"]
    for args in (["tokenize", b"\xff"], ["generate", b"caf\xe9", "--model", str(tiny_path)],
                 ["sweep", "x", "--name", b"\xfe\xff", "--model", str(tiny_path), "--store", str(tmp_path / "u.db")],
                 ["score", b"\xc3\x28"], ["choose", "x", "--option", b"\x80", "--option", "b"]):
        argv = [a if isinstance(a, bytes) else a.encode() for a in base + args]
        res = subprocess.run(argv, capture_output=True, timeout=60)
        err = res.stderr.decode("utf-8", errors="replace")
        assert res.returncode == 2 and "is not valid UTF-8" in err and "Traceback" not in err, err
    assert not (tmp_path / "u.db").exists()


# -- 7. TOML grid files of every wrong shape --------------------------------------------------------------------
@pytest.mark.parametrize("toml,word", [
    ('fixed = "hot"\n[grid.a]\ntemperature = [0.5]', "[fixed] is a string"),
    ("fixed = 3\n[grid.a]\ntemperature = [0.5]", "[fixed] is a number"),
    ("grid = 5", "`grid` is a number"),
    ('grid = ["a"]', "`grid` is an array"),
    ("[grid]\na = 1", "[grid.a] is a number"),
    ("[grid.a]\ntemperature = []", "axis 'temperature' in [grid.a] is empty"),
    ("[grid.a]", "[grid.a] is empty"),
    ('[grid.a]\ntemperature = ["hot"]', "[grid.a].temperature holds a string"),
    ("[grid.a]\ntop_k = [2.5]", "[grid.a].top_k holds a number 2.5, not an integer"),
    ("[grid.a]\ntemperature = [0.5]\nfixed = { min_p = \"x\" }", "[grid.a].fixed.min_p is a string"),
    ("temperature = [0.5]\n[grid.a]\ntop_k = [2]", "unknown top-level key 'temperature'"),
    ("[grid.a]\nwarmth = [1]", "unknown axis 'warmth'"),
])
def test_grid_file_shapes_are_checked(tiny_path, tmp_path, toml, word):
    f = tmp_path / "g.toml"
    f.write_text(toml)
    res = cli("sweep", "x", "--grid", f, "--model", tiny_path, "--store", tmp_path / "g.db", ok=False)
    assert res.exit_code == 1 and word in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "g.db").exists() or Store(tmp_path / "g.db").runs() == []


# -- 8. prompts files with non-string prompts ---------------------------------------------------------------------
@pytest.mark.parametrize("value,kind", [("null", "null"), ("42", "a number"), ('{"a": 1}', "a table"),
                                        ("[1]", "an array"), ("true", "a boolean")])
def test_jsonl_prompts_must_be_strings(tiny_path, tmp_path, value, kind):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine"}\n\n{"prompt": ' + value + "}\n")
    res = cli("sweep", "--prompts-file", f, "--model", tiny_path, "--store", tmp_path / "p.db", ok=False)
    assert res.exit_code == 1 and f"line 3: \"prompt\" is {kind}" in res.output, res.output


# -- 9. untrusted text never reaches the terminal raw ---------------------------------------------------------------
def test_no_command_prints_raw_control_characters(tiny_path, tmp_path):
    db = tmp_path / "t.db"
    m = ["--model", tiny_path]
    outputs = [
        cli("tokenize", HOSTILE, *m),
        cli("next", HOSTILE, *m, "--top", 20),
        cli("generate", HOSTILE, *m, "-n", 30, "-t", 1.5, "--top-k", 0, "--top-p", 1, "--min-p", 0),
        cli("generate", HOSTILE, *m, "-n", 30, "-t", 1.5, "--json"),
        cli("sweep", HOSTILE, *m, "-n", 20, "-t", "1.5", "--top-k", "0", "--seeds", 3, "--name", HOSTILE,
            "--store", db),
        cli("runs", "--store", db),
        cli("runs", "--store", db, "--json"),
        cli("show", 1, "--store", db),
        cli("show", HOSTILE, "--store", db, ok=False),
        cli("score", HOSTILE, *m, "--all"),
        cli("choose", HOSTILE, "--option", HOSTILE, "--option", "b\x1b]0;x\x07", *m),
        cli("embed", HOSTILE, "a\x07b", "c\x9bd", *m),
        cli("generate", "x", *m, "--flash-attn", "\x1b]0;t\x07", ok=False),
    ]
    for res in outputs:  # stdout, and stderr less our own progress lines (which start with a CR)
        err = re.sub(r"\r(?=\[[#.]+\] |scoring: |comparing|embedding: )", "", res.stderr)
        assert raw_controls(res.stdout) == [] and raw_controls(err) == [], (res.output[:300], raw_controls(res.output))
    shown = cli("generate", HOSTILE, *m, "-n", 30, "-t", 1.5, "--text").output  # colours are ours: SGR only
    assert re.sub(r"\x1b\[[0-9;]*m", "", shown).count("\x1b") == 0


# -- 10. run names and command lines in reports; the command line re-runs --------------------------------------------
def test_report_shows_names_visibly_and_records_a_rerunnable_command(tiny_path, tmp_path):
    db = tmp_path / "r.db"
    name = "name\x1b]0;t\x07\u202e\r"
    prompt = "it's a\n\"prompt\"\x07"
    argv = ["llamalens", "sweep", prompt, "--model", str(tiny_path), "-n", "3", "--name", name, "--store", str(db)]
    res = subprocess.run([sys.executable, "-m", "llamalens"] + argv[1:], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "r.html"
    cli("report", 1, "-o", out, "--no-model", "--store", db)
    page = out.read_text(encoding="utf-8")
    assert [c for c in page if c in CONTROLS or c == "\u202e"] == []
    command = Store(db).run(1).command  # pasted into bash, it gives back the same arguments
    got = subprocess.run(["bash", "-c", f"set -- {command}; " + 'for a in "$@"; do printf "%s\\0" "$a"; done'],
                         capture_output=True, check=True).stdout.split(b"\0")[:-1]
    assert [g.decode() for g in got] == argv


# -- 11. --resume with options that would be ignored ------------------------------------------------------------------
def test_resume_refuses_conflicting_options(tiny_path, tmp_path):
    db = tmp_path / "c.db"
    for args in (["-t", "0.5"], ["-n", "9"], ["x"], ["--seeds", "3"], ["--ctx", "128"], ["--name", "y"]):
        res = cli("sweep", "--resume", 1, "--store", db, *args, ok=False)
        assert res.exit_code == 2 and "--resume finishes a run with its own stored settings" in res.output, res.output


# -- 12. a context too short for -n is said up front -------------------------------------------------------------------
def test_context_shorter_than_max_tokens_is_announced(tiny_path, tmp_path):
    res = CliRunner().invoke(main, ["generate", "the cat sat", "--model", str(tiny_path), "-n", 100, "--ctx", 40,
                                    "-t", 0, "--json"])
    assert res.exit_code == 0
    assert "--ctx 40 leaves room for" in res.stderr and "fewer than the 100 asked for" in res.stderr
    res = CliRunner().invoke(main, ["sweep", "the cat", "--model", str(tiny_path), "-n", 100, "--ctx", 40,
                                    "--store", str(tmp_path / "n.db")])
    assert res.exit_code == 0 and "--ctx 40 leaves room for" in res.stderr


# -- 13. a resumed run equals an uninterrupted one: --exact always, batched at a batch boundary ----------------------
def _interrupted_then_resumed(model, tmp_path, name, spec, after):
    store = Store(tmp_path / f"{name}.db")
    rid = start_sweep(model, store, spec)

    def stop(prog):
        if prog.done >= after:
            raise KeyboardInterrupt

    with pytest.raises(SweepInterrupted):
        execute(model, store, rid, stop)
    execute(model, store, rid)
    return store, rid


def _records(store, rid):
    return {idx: [(t.id, t.logprob) for t in toks] for idx, toks in store.tokens_by_sample(rid).items()}


@pytest.mark.parametrize("exact,parallel,after", [(True, 1, 3), (False, 4, 4)])
def test_resumed_equals_uninterrupted(tiny, tmp_path, exact, parallel, after):
    """--exact: identical after any interruption. Batched, interrupted between two waves of `parallel` samples that
    all run to max_tokens (checked below), so the resumed wave is batched alike: the same tokens, logprobs within
    what the fresh KV-cache layout moves them."""
    spec = SweepSpec(["the cat", "hello"], [SamplingSettings(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)],
                     [0, 1, 2, 3], max_tokens=8, exact=exact, parallel=parallel)
    whole = Store(tmp_path / "whole.db")
    rid = start_sweep(tiny, whole, spec)
    execute(tiny, whole, rid)
    assert all(s.finish_reason == "length" for s in whole.samples(rid))  # waves stay aligned
    store, rid2 = _interrupted_then_resumed(tiny, tmp_path, "resumed", spec, after)
    assert store.run(rid2).resumes == 1
    got, want = _records(store, rid2), _records(whole, rid)
    if exact:
        assert got == want
    else:  # the same tokens; logprobs move by the KV cache's new layout: measured max 3.8e-6 nats (AVX2 build) and
        # 6.0e-5 (AVX-512 build): bound 10x the larger
        assert {k: [i for i, _ in v] for k, v in got.items()} == {k: [i for i, _ in v] for k, v in want.items()}
        worst = max(abs(a[1] - b[1]) for k in got for a, b in zip(got[k], want[k]))
        assert worst < 6e-4
    note = cli("show", rid2, "--store", store.path).stdout
    assert ("--exact run" in note) if exact else ("batch boundary" in note)


# -- 14. a grammar that allows no token: the sample ends, the process lives ------------------------------------------
def _llamalens(*args, timeout=120):
    """The CLI in its own process: a native abort shows as a negative return code, not a dead test run."""
    res = subprocess.run([sys.executable, "-m", "llamalens", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode >= 0, f"killed by signal {-res.returncode}: {res.stderr[-600:]}"
    return res


def test_grammar_dead_end_ends_the_sample(tmp_path):
    from tiny_gguf import write_tiny_gguf

    bytes_model = write_tiny_gguf(tmp_path / "t.gguf")
    words_only = write_tiny_gguf(tmp_path / "w.gguf", byte_tokens=False)
    (tmp_path / "yes.gbnf").write_text('root ::= "yes" | "no"\n')
    (tmp_path / "qq.gbnf").write_text('root ::= "QQ"\n')
    db = tmp_path / "g.db"
    # complete after one word, end-of-generation banned: nothing is left to pick
    res = _llamalens("generate", "the cat", "--model", bytes_model, "--grammar", tmp_path / "yes.gbnf", "--chain",
                     "llama.cpp", "--ignore-eos", "-t", 0, "-n", 8)
    assert res.returncode == 0 and "finish: grammar" in res.stdout + res.stderr, res.stderr
    # a vocabulary without byte tokens cannot spell "QQ" at all
    res = _llamalens("generate", "the cat", "--model", words_only, "--grammar", tmp_path / "qq.gbnf", "-n", 4)
    assert res.returncode == 0 and "finish: grammar" in res.stdout + res.stderr, res.stderr
    res = _llamalens("sweep", "the cat", "--model", words_only, "--grammar", tmp_path / "qq.gbnf", "-t", "0,1",
                     "--seeds", 2, "-n", 8, "--store", db)
    assert res.returncode == 0, res.stderr
    run = Store(db).run(1)
    assert run.status == "done" and run.n_done == 4
    assert {s.finish_reason for s in Store(db).samples(1)} == {"grammar"}
    # such a vocabulary cannot tokenize a character no token holds either: refused, not an abort in the tokenizer
    for args in (["tokenize", "x"], ["next", "x", "--grammar", tmp_path / "qq.gbnf"]):
        res = _llamalens(*args, "--model", words_only)
        assert res.returncode == 1 and "has no byte tokens and no token for U+0078" in res.stderr, res.stderr[-300:]


# -- 15. t-SNE of identical texts: refused before the model loads, not a segfault -------------------------------------
def test_tsne_of_identical_points_is_refused(tiny_path):
    import numpy as np

    from llamalens.errors import InvalidInput
    from llamalens.looks.embed_map import tsne

    for args in (["apple"] * 7, ["apple"] * 3 + ["--perplexity", 1]):
        res = _llamalens("embed", *args, "--map", "tsne", "--model", tiny_path)
        assert res.returncode == 1 and "t-SNE cannot place identical points" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and "loading" not in res.stderr  # refused before the model loads
    # different texts whose vectors are one point: refused in the library too (scikit-learn would crash)
    code = ("import numpy as np; from llamalens.looks.embed_map import tsne\n"
            "try:\n    tsne(np.ones((7, 8)) / 8 ** 0.5, 2)\nexcept Exception as e:\n    print(type(e).__name__, e)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("InvalidInput") and "identical points" in res.stdout, res
    with pytest.raises(InvalidInput, match="identical points"):
        tsne(np.vstack([np.ones(8), np.ones(8) + 1e-12]), 1)


# -- 16. grammars and schemas nested past what a recursive parser survives ----------------------------------------------
def test_deep_grammars_and_schemas_are_refused(tmp_path):
    from tiny_gguf import write_tiny_gguf

    model = write_tiny_gguf(tmp_path / "t.gguf")
    deep = tmp_path / "deep.gbnf"
    deep.write_text("root ::= " + "(" * 20000 + '"a"' + ")" * 20000 + "\n")
    deep_schema = tmp_path / "deep.json"
    deep_schema.write_text('{"type": "array", "items": ' * 5000 + '{"type": "string"}' + "}" * 5000)
    for option, path, word in (("--grammar", deep, "nests parentheses 20000 deep"),
                               ("--json-schema", deep_schema, "nests arrays and objects 5001 deep")):
        res = _llamalens("generate", "x", "--model", model, option, path, "-n", 2)
        assert res.returncode == 1 and word in res.stderr and "Traceback" not in res.stderr, res.stderr[-500:]
        assert "loading" not in res.stderr  # refused before the model loads
    # parentheses inside strings, character classes and comments are text, not nesting
    fine = tmp_path / "fine.gbnf"
    fine.write_text('root ::= "' + "(" * 600 + '" [(] | "a" # ' + "(" * 600 + "\n")
    res = _llamalens("generate", "x", "--model", model, "--grammar", fine, "-n", 1)
    assert res.returncode == 0, res.stderr[-500:]


# -- 17. fork's sizes and its outcome regex are bounded before anything is built -------------------------------------
def test_fork_sizes_and_outcome_regex_are_bounded(tmp_path):
    from tiny_gguf import write_tiny_gguf

    model, db = write_tiny_gguf(tmp_path / "t.gguf"), tmp_path / "f.db"
    for args, word in ((["--samples", 100_000_000], "--samples 100,000,000 continues each branch"),
                       (["--alternatives", 300_000], "--alternatives 300000 is out of range"),
                       (["--max-sequences", 10**9], "--max-sequences 1000000000 is out of range")):
        res = _llamalens("fork", "the cat", "--model", model, *args, "--store", db, timeout=60)
        assert res.returncode == 1 and word in res.stderr and "Traceback" not in res.stderr, res.stderr[-500:]
        assert "loading" not in res.stderr  # refused before the model loads
    # a regex that backtracks for ever on any text: a clear error after its time limit, and no run is left
    res = _llamalens("fork", "the cat", "--model", model, "--outcome", r"^([\s\S]+)+\x01", "-n", 40, "--store", db,
                     timeout=60)
    assert res.returncode == 1 and "took more than 2 s" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not db.exists() or Store(db).runs() == []


# -- 18. an outcome group that takes no part in the match -----------------------------------------------------------
def test_fork_outcome_of_an_unmatched_group_is_none(tiny_path, tmp_path):
    db = tmp_path / "o.db"
    res = cli("fork", "the cat", "--model", tiny_path, "--outcome", "(zzz)?", "-n", 4, "--samples", 2,
              "--positions", "0-1", "--store", db)
    assert "Traceback" not in res.output
    assert json.loads(cli("show", 1, "--json", "--store", db).stdout)
    # a run stored with a null outcome (as older versions stored it) shows and reports too
    with sqlite3.connect(db) as con:
        con.execute("UPDATE samples SET extra = json_set(extra, '$.outcome', json('null'))")
    con.close()
    cli("show", 1, "--store", db)
    cli("report", 1, "-o", tmp_path / "o.md", "--no-model", "--store", db)
    assert (tmp_path / "o.md").exists()


# -- 19. a chat template is untrusted code: whatever it does is a clear error, in bounded time and size --------------
@pytest.mark.parametrize("template,word", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "recurses without end"),
    ("{% include 'other.jinja' %}", "failed to render"),
    ('{{ "%d" % "x" }}', "TypeError"),
    ("{{ 'A' * 300000000 }}", "16,000,000-character limit"),
    ("{{ '%0999999999d' % 1 }}", "16,000,000-character limit"),
    # 10^10 characters: the size bound or, on a loaded machine, the time bound stops it first; either is clear
    ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
     "character limit|took more than 5 s"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% set x = a %}{% endfor %}{% endfor %}",
     "took more than 5 s"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
])
def test_chat_template_failures_are_clear(tiny_path, tmp_path, template, word):
    f = tmp_path / "t.jinja"
    f.write_text(template)
    db = tmp_path / "c.db"
    res = _llamalens("sweep", "--chat", "hi", "--chat-template", f, "--model", tiny_path, "-n", 2, "--store", db,
                     timeout=60)
    assert res.returncode == 1 and any(w in res.stderr for w in word.split("|")), res.stderr[-600:]
    assert "Traceback" not in res.stderr and (not db.exists() or Store(db).runs() == [])


def test_a_gguf_s_own_chat_template_failing_is_clear(tmp_path):
    from tiny_gguf import write_tiny_gguf

    model = write_tiny_gguf(tmp_path / "r.gguf", chat_template="{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}")
    res = _llamalens("generate", "--chat", "hi", "--model", model, "-n", 2, timeout=60)
    assert res.returncode == 1 and "the model's chat template recurses without end" in res.stderr, res.stderr[-400:]
    assert "Traceback" not in res.stderr


# -- 20. a Markdown report replaces only the images it wrote itself ---------------------------------------------------
def test_markdown_report_keeps_files_it_did_not_write(tiny_path, tmp_path):
    db = tmp_path / "m.db"
    cli("sweep", "the cat", "--model", tiny_path, "-n", 4, "-t", "0,1", "--seeds", 2, "--store", db)
    first = tmp_path / "first.md"
    cli("report", 1, "-o", first, "--no-model", "--store", db)
    figures = sorted(p.name for p in (tmp_path / "first_files").glob("*.png"))
    assert figures
    saved = tmp_path / "page_files"  # what a browser's "save page, complete" leaves, one name clashing with ours
    saved.mkdir()
    mine = {"photo.png": b"\x89PNG mine", figures[0]: b"\x89PNG also mine", "style.css": b"body {}"}
    for name, data in mine.items():
        (saved / name).write_bytes(data)
    (tmp_path / "page.md.part").write_bytes(b"my notes")
    for _ in range(2):  # and again: the second report replaces the first's images, and only those
        cli("report", 1, "-o", tmp_path / "page.md", "--no-model", "--store", db)
        assert {n: (saved / n).read_bytes() for n in mine} == mine
        ours = sorted(p.name for p in saved.glob("*.png") if p.name not in mine)
        assert len(ours) == len(figures)
        page = (tmp_path / "page.md").read_text(encoding="utf-8")
        assert all(f"page_files/{n})" in page for n in ours) and f"page_files/{figures[0]})" not in page
    assert (tmp_path / "page.md.part").read_bytes() == b"my notes"


# -- 21. every report, HTML and Markdown, shows untrusted text without a terminal-active character --------------------
def test_every_report_escapes_control_characters(tiny_path, tmp_path):
    m = ["--model", tiny_path]
    terms = tmp_path / "terms.tsv"
    terms.write_text("".join(f"t{i}{e}\tcat{i % 2}{e}\n" for i, e in enumerate(ESCAPES) if "\r" not in e),
                     encoding="utf-8")
    db = tmp_path / "f.db"
    for fmt in ("html", "md"):
        reports = {name: tmp_path / f"{name}.{fmt}" for name in ("embed", "query", "fork", "next", "score")}
        cli("embed", "--file", terms, *m, "--map", "pca", "--report", reports["embed"])
        cli("embed", HOSTILE, "b\u202ec", *m, "--query", "q\x1b]52;c;eA==\x07", "--report", reports["query"])
        cli("fork", HOSTILE, *m, "--options", "a\x1b[31m,b\x9b1m\u202e", "-n", 3, "--samples", 1,
            "--positions", "0-1", "--store", db, "--report", reports["fork"])
        cli("next", HOSTILE, *m, "-t", "0.5,1", "--report", reports["next"])
        cli("score", HOSTILE, *m, "--report", reports["score"])
        for name, path in reports.items():
            page = path.read_text(encoding="utf-8")
            assert raw_controls(page) == [], (name, fmt, raw_controls(page))


# -- 22. JSONL inputs: a lone surrogate is a clear error, a byte order mark is no error ----------------------------
def test_jsonl_lone_surrogates_and_bom(tiny_path, tmp_path):
    m = ["--model", tiny_path]
    db = tmp_path / "s.db"
    files = {"p.jsonl": '{"prompt": "fine"}\n{"prompt": "a\\ud800b"}\n',
             "m.jsonl": '{"messages": [{"role": "user", "content": "hi \\udc00"}]}\n',
             "e.jsonl": '{"text": "ok"}\n{"text": "x\\udfff", "category": "c"}\n',
             "r.jsonl": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\ud83d"}]}\n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    for args in (["sweep", "--prompts-file", tmp_path / "p.jsonl", "--store", db],
                 ["sweep", "--messages", tmp_path / "m.jsonl", "--chat-template", "chatml", "--store", db],
                 ["embed", "--file", tmp_path / "e.jsonl"],
                 ["score", "--messages", tmp_path / "r.jsonl", "--chat-template", "chatml"]):
        res = cli(*args, *m, ok=False)
        assert res.exit_code == 1 and "holds a lone surrogate \\u" in res.output, res.output
        assert "Traceback" not in res.output and not isinstance(res.exception, UnicodeError)
    assert not db.exists() or Store(db).runs() == []
    # a UTF-8 byte order mark (Notepad's) is not part of the text
    (tmp_path / "bom.jsonl").write_text('\ufeff{"prompt": "the cat"}\n', encoding="utf-8")
    (tmp_path / "bom-e.jsonl").write_text('\ufeff{"text": "cat", "category": "a"}\n{"text": "dog", "category": "b"}\n',
                                          encoding="utf-8")
    cli("sweep", "--prompts-file", tmp_path / "bom.jsonl", *m, "-n", 2, "--store", db)
    assert Store(db).run(1).options.prompts == ("the cat",)
    assert '"cat"' in cli("embed", "--file", tmp_path / "bom-e.jsonl", *m, "--json").stdout


# -- 23. --length-penalty is bounded before the run starts (length ** 400 overflows mid-run) --------------------------
@pytest.mark.parametrize("lp", ["400", "1e308", "-1e308", "-11"])
def test_length_penalty_is_bounded(tiny_path, tmp_path, lp):
    db = tmp_path / "lp.db"
    res = cli("sweep", "the cat", "--model", tiny_path, "--strategy", "beam", "--beams", 2, "--length-penalty", lp,
              "-n", 4, "--store", db, ok=False)
    assert res.exit_code == 1 and "length-penalty" in res.output and "[-10, 10]" in res.output, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert not db.exists() or Store(db).runs() == []


# -- 24. the Python API: a wrong type is a TypeError naming the argument, a text is never split into characters ------
def test_api_arguments_of_the_wrong_type(tiny, tmp_path):
    import llamalens as ll
    from llamalens.errors import InvalidArgument

    db = tmp_path / "api.db"
    calls = {
        "options='Paris' is one text": lambda: ll.choose("The capital is", "Paris", model=tiny),
        "texts='king'": lambda: ll.embed_texts(tiny, "king"),
        "texts holds int": lambda: ll.embed_texts(tiny, ["king", 5]),
        "prompt=123": lambda: ll.fork(123, model=tiny, store=db),
        "settings={}": lambda: ll.fork("x", settings={}, model=tiny, store=db),
        "samples='3'": lambda: ll.fork("x", samples="3", model=tiny, store=db),
        "max_tokens='3'": lambda: ll.sweep("x", max_tokens="3", model=tiny, store=db),
        "store=5": lambda: ll.sweep("x", model=tiny, store=5),
        "text=5": lambda: ll.score(5, model=tiny),
        "prompt=5": lambda: ll.choose(5, ["a", "b"], model=tiny),
        "settings='temperature'": lambda: ll.sampler_view(tiny, "x", "temperature"),
        "must be a str, not int": lambda: ll.generate(tiny, 5),
        "outcome=5": lambda: ll.fork("x", outcome=5, model=tiny, store=db),
        "positions=('a', 1)": lambda: ll.fork("x", positions=("a", 1), model=tiny, store=db),
        "chat_template=5": lambda: ll.sweep("x", chat=True, chat_template=5, model=tiny, store=db),
        "grammar=5": lambda: ll.sweep("x", grammar=5, model=tiny, store=db),
        "name=5": lambda: ll.sweep("x", name=5, model=tiny, store=db),
        "path=5": lambda: ll.report(1, 5, store=db),
        "stride='a'": lambda: ll.score("x", stride="a", model=tiny),
        "es=5": lambda: ll.embedding_map(5),
        "settings={'temperature': 0}": lambda: ll.generate(tiny, "x", {"temperature": 0}),
        "unknown keyword argument temperature=": lambda: ll.sweep("x", temperature=[0, 1], model=tiny, store=db),
        "unknown keyword argument ctxx=": lambda: ll.score("x", ctxx=512, model=tiny),
    }
    for word, call in calls.items():
        with pytest.raises(InvalidArgument, match=re.escape(word)) as info:
            call()
        assert isinstance(info.value, TypeError)
    with pytest.raises(InvalidInput, match=r"lone surrogate \\ud800"):
        ll.generate(tiny, "a\ud800b")
    assert not db.exists() or Store(db).runs() == []
    with pytest.raises(ll.InvalidSettings, match=r"seeds=2.5: give a number of seeds"):
        ll.sweep("x", seeds=2.5, model=tiny, store=db, progress=False)
    run = ll.sweep("the cat", stop="Q:", max_tokens=2, model=tiny, store=db, progress=False)
    assert run.info.options.stop == ("Q:",)  # one stop string, not its characters


# -- 25. a full disk when a run is created: a clear error, no half-made run, the other runs kept ----------------------
def test_full_disk_when_a_run_is_created(tiny, tmp_path):
    import llamalens as ll
    from llamalens.store import StoreFull

    db = tmp_path / "full.db"
    ll.sweep("the cat", max_tokens=3, model=tiny, store=db, progress=False)
    kept = [(s.sample_idx, s.text) for s in Store(db).samples(1)]
    calls = (lambda st: ll.sweep("the cat", seeds=300, max_tokens=3, model=tiny, store=st, progress=False),
             lambda st: ll.fork("the cat", max_tokens=4, model=tiny, store=st, progress=False))
    for call in calls:
        store = Store(db)
        store.db.execute(f"PRAGMA max_page_count = {store.db.execute('PRAGMA page_count').fetchone()[0]}")
        with pytest.raises(StoreFull, match="is full: no run was created; free some space"):
            call(store)
        store.close()
        assert [r.id for r in Store(db).runs()] == [1]
        assert [(s.sample_idx, s.text) for s in Store(db).samples(1)] == kept


# -- 26. fork --resume refuses what it would ignore; a short context is announced; the cost line reads right ------------
def test_fork_resume_refusals_and_context_note(tiny_path, tmp_path):
    db = tmp_path / "f.db"
    for args in (["--no-repeat-ngram", "2"], ["--ubatch", "64"], ["--swa-full", "off"], ["--repack", "off"],
                 ["--server-prefill", "on"], ["--samples", "2"]):
        res = cli("fork", "--resume", 1, "--store", db, *args, ok=False)
        assert res.exit_code == 2 and "--resume finishes a run with its own stored settings" in res.output, res.output
    assert not db.exists() or Store(db).runs() == []
    res = cli("fork", "the cat", "--model", tiny_path, "-n", 100, "--ctx", 64, "--samples", 1, "--positions", "0-1",
              "--store", db)
    assert "--ctx 64 leaves room for" in res.stderr and "fewer than the 100 asked for" in res.stderr, res.stderr
    shown = cli("show", 1, "--store", db).stdout  # the short path saves nothing: the ratio says so, not "0× as many"
    done, naive, ratio = re.search(r"prefill: ([\d,]+) prompt.* would decode ([\d,]+) \((.*?)\)", shown).groups()
    assert int(naive.replace(",", "")) < int(done.replace(",", "")) and ratio.endswith("× fewer"), shown


# -- 27. commands that only read open a store read-only: a read-only mount reads, a mistyped path creates nothing --------
def _read_only_argv(folder, argv: list[str]) -> list[str]:
    """argv run with `folder` read-only: a read-only bind mount in a private mount namespace (unshare) where that
    works; otherwise the folder's write permissions are taken away (which binds every user but root)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && "
                            f"mount -o remount,ro,bind {folder}"], capture_output=True) if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0:
        mount = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && exec \"$@\""
        return ["unshare", "-m", "sh", "-c", mount, "sh"] + argv
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return argv


def test_read_commands_open_the_store_read_only(tiny_path, tmp_path):
    from conftest import ROOT

    folder = tmp_path / "ro"
    folder.mkdir()
    cli("sweep", "the cat", "--model", tiny_path, "-n", 3, "--store", folder / "s.db")
    shutil.copy(ROOT / "tests" / "data" / "store-v1.db", folder / "old.db")  # 0.1.0's: it lacks newer columns
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    base = [sys.executable, "-m", "llamalens"]
    for db, tokens in ((folder / "s.db", 3), (folder / "old.db", 80)):
        for args, word in ((["runs"], "  done  "), (["show", "1"], "[done]"),
                           (["export", "1", "--format", "csv", "-o", str(tmp_path / "t.csv")], f"wrote {tokens} tokens"),
                           (["report", "1", "-o", str(tmp_path / "r.html"), "--no-model"], "wrote")):
            res = subprocess.run(_read_only_argv(folder, base + args + ["--store", str(db)]), capture_output=True,
                                 text=True, timeout=120)
            assert res.returncode == 0 and word in res.stdout + res.stderr, (db.name, args, res.stderr[-400:])
    touch = subprocess.run(_read_only_argv(folder, ["touch", str(folder / "x")]), capture_output=True)
    assert touch.returncode != 0 and not (folder / "x").exists()  # the folder really was read-only there
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # a mistyped --store: a clear error (or no runs), and no folder or empty store made
    missing = tmp_path / "typo" / "runs.db"
    assert "no runs in" in cli("runs", "--store", missing).stdout
    for args in (["show", 1], ["export", 1, "--format", "csv", "-o", tmp_path / "x.csv"],
                 ["report", 1, "-o", tmp_path / "x.html", "--no-model"]):
        res = cli(*args, "--store", missing, ok=False)
        assert res.exit_code == 1 and "there is no run store at" in res.output, res.output
    assert not (tmp_path / "typo").exists()


# -- 28. crafted model stores: a name or a revision never reaches outside its store ------------------------------------
def test_crafted_model_stores_stay_confined(tiny_path, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny_path, outside / "secret.gguf")
    hub = tmp_path / "hub"
    for repo, rev in (("evil--root", "/"), ("evil--up", "../../../outside"), ("good--repo", "abc")):
        snap = hub / f"models--{repo}" / "snapshots" / "abc"
        snap.mkdir(parents=True)
        (hub / f"models--{repo}" / "refs").mkdir()
        (hub / f"models--{repo}" / "refs" / "main").write_text(rev)
    shutil.copy(tiny_path, hub / "models--good--repo" / "snapshots" / "abc" / "m.gguf")
    ollama = tmp_path / "ollama" / "models"
    (ollama / "manifests").mkdir(parents=True)
    (tmp_path / "x").write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                         "digest": "sha256:" + "0" * 64}]}))
    (tmp_path / "home" / ".lmstudio" / "models").mkdir(parents=True)
    shutil.copy(tiny_path, tmp_path / "home" / "secret.gguf")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLAMALENS_STORES", "hf,ollama,lmstudio")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    started = time.monotonic()
    listed = cli("models", "--json").stdout
    assert time.monotonic() - started < 20
    assert "secret.gguf" not in listed and "hf:good/repo:m.gguf" in listed, listed
    for name in ("ollama:../../..:x", "ollama:..:x", "lmstudio:../../secret.gguf"):
        res = cli("tokenize", "x", "--model", name, ok=False)
        assert res.exit_code == 1 and "is not an" in res.output and "name" in res.output, res.output


# -- 29. a Ray that cannot start is found out before a run is stored ---------------------------------------------------
def test_ray_that_cannot_start_leaves_no_run(tiny_path, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import llamalens as ll

    db = tmp_path / "r.db"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))  # an empty one: no cluster recorded there
    (tmp_path / "ray-tmp").mkdir()
    cases = [(["--ray", "auto"], "--ray auto found no running Ray cluster"),
             (["--ray", "127.0.0.1:1"], "no Ray head at 127.0.0.1:1")]
    for args, word in cases:
        for command in (["sweep", "the cat", "-n", 3], ["fork", "the cat", "-n", 3, "--samples", 1]):
            res = cli(*command, "--model", tiny_path, *args, "--store", db, ok=False)
            assert res.exit_code == 1 and word in res.output and "Traceback" not in res.output, res.output
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no" / "such" / "folder"))
    res = cli("sweep", "the cat", "--model", tiny_path, "-n", 3, "--ray", "--store", db, ok=False)
    assert res.exit_code == 1 and "is not a writable folder" in res.output, res.output
    with pytest.raises(ll.LlamalensError, match="is not a writable folder"):
        ll.sweep("the cat", max_tokens=3, model=str(tiny_path), store=db, ray=True, progress=False)
    assert not db.exists() or Store(db).runs() == []


# -- 30. clearer refusals, aligned tables, and CSV that a spreadsheet will not run -------------------------------------
def test_clear_refusals_tables_and_excel_safe_csv(tiny_path, tmp_path, monkeypatch):
    m = ["--model", tiny_path]
    res = cli("generate", "--chat", "hi", "--chat-template", "chatmlx", *m, ok=False)
    assert res.exit_code == 1 and "neither a file nor one of llama.cpp's built-in" in res.output
    assert "loading" not in res.stderr  # refused before the model loads
    (tmp_path / "left.gbnf").write_text('root ::= root "a" | "b"\n')
    res = cli("generate", "x", *m, "--grammar", tmp_path / "left.gbnf", ok=False)
    assert res.exit_code == 1 and "is left-recursive" in res.output and 'root ::= "b" "a"*' in res.output, res.output
    (tmp_path / "e.json").write_text('{"type": "object", "properties": {"a": {"enum": []}}}')
    res = cli("generate", "x", *m, "--json-schema", tmp_path / "e.json", ok=False)
    assert res.exit_code == 1 and "$.properties.a.enum is an empty list" in res.output and "GBNF" not in res.output
    # a model whose name holds an escape keeps the table's columns
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("plain", "ev\x1b[31mil\tx"):
        shutil.copy(tiny_path, folder / f"{name}.gguf")
    monkeypatch.setenv("LLAMALENS_MODELS", str(folder))
    lines = [ln for ln in cli("models").stdout.splitlines() if "llama" in ln]
    assert len(lines) == 2 and raw_controls("".join(lines)) == [] and "\t" not in "".join(lines)
    assert len({ln.index("llama") for ln in lines}) == 1, lines  # the arch column starts at one place
    # CSV: byte-exact by default; --excel-safe defuses formulas, the bytes column stays exact
    db = tmp_path / "x.db"
    _store_with_pieces(db)
    for flag, want in (([], "=SUM(A1)"), (["--excel-safe"], "'=SUM(A1)")):
        out = tmp_path / f"t{len(flag)}.csv"
        cli("export", "bytes", "--format", "csv", "-o", out, "--store", db, *flag)
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert want in [r["text"] for r in rows] and [r["bytes"] for r in rows] == [p.hex() for p in PIECES]
        assert all(not r["text"].startswith(("=", "+", "-", "@")) for r in rows) or not flag
    res = cli("export", "bytes", "--format", "parquet", "-o", tmp_path / "t.parquet", "--store", db, "--excel-safe",
              ok=False)
    assert res.exit_code == 1 and "--excel-safe applies to csv" in res.output


# -- 31. a sweep's size is bounded before its plan (or its seed list, or its grid) is built ------------------------------
def test_sweep_size_is_bounded(tiny_path, tmp_path):
    import llamalens as ll

    db = tmp_path / "s.db"
    ten = ",".join(str(i / 10) for i in range(10))
    cases = ((["--seeds", 100_000_000], "--seeds 100,000,000 is more than one sweep holds"),
             (["-t", ten, "--min-p", ten, "--top-p", ten, "--typical-p", ten, "--repeat-penalty",
               ",".join(str(1 + i / 10) for i in range(10))], "the grid's axes make 100,000 configurations"),
             (["-t", ten, "--min-p", ten, "--top-p", ten, "--seeds", 1001], "the sweep would hold 1,001,000 samples"),
             (["--logprobs", 300_000], "--logprobs 300000 is out of range (0..100)"))
    started = time.monotonic()
    for args, word in cases:
        res = cli("sweep", "the cat", "--model", tiny_path, *args, "--store", db, ok=False)
        assert res.exit_code == 1 and word in res.output and "Traceback" not in res.output, res.output
    with pytest.raises(ll.InvalidSettings, match="more than one sweep holds"):
        ll.sweep("the cat", seeds=10**9, model=str(tiny_path), store=db, progress=False)
    assert time.monotonic() - started < 30
    assert not db.exists() or Store(db).runs() == []


# -- 32. an input that never ends (/dev/zero, an endless pipe) is refused, not read until memory runs out ------------
def test_endless_inputs_are_refused(tiny_path, tmp_path):
    import resource

    def cap():  # a regression fails fast with MemoryError instead of eating the machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    m = ["--model", str(tiny_path)]
    for args, stdin in ((["score", "--file", "/dev/zero"], None), (["score", "--file", "-"], "/dev/zero"),
                        (["sweep", "--prompts-file", "/dev/zero", "--store", str(tmp_path / "z.db")], None),
                        (["generate", "x", "--grammar", "/dev/zero"], None), (["embed", "--file", "/dev/zero"], None)):
        with open(stdin or "/dev/null", "rb") as feed:
            res = subprocess.run([sys.executable, "-m", "llamalens", *args, *m], stdin=feed, capture_output=True,
                                 text=True, timeout=120, preexec_fn=cap)
        assert res.returncode == 1 and "holds more than 64 MiB (or never ends)" in res.stderr, (args, res.stderr[-300:])
    assert not (tmp_path / "z.db").exists() or Store(tmp_path / "z.db").runs() == []


def test_grid_files_nested_or_endless_are_refused(tiny_path, tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("[grid.a]\ntemperature = " + "[" * 50000 + "]" * 50000 + "\n")
    deep_tables = tmp_path / "tables.toml"
    deep_tables.write_text("a = " + "{x = " * 5000 + "1" + "}" * 5000 + "\n")
    for path, word in ((deep, "nests arrays or tables too deeply"), (deep_tables, "nests arrays or tables too deeply"),
                       ("/dev/zero", "holds more than 64 MiB")):
        res = cli("sweep", "x", "--grid", path, "--model", tiny_path, "--store", tmp_path / "g.db", ok=False)
        assert res.exit_code == 1 and word in res.output and "Traceback" not in res.output, res.output


# -- 33. model options past what llama.cpp survives are refused before the load ------------------------------------------
def test_thread_count_is_bounded(tiny_path):
    for n in (100_000, 513, -5):
        res = _llamalens("generate", "x", "--model", tiny_path, "--threads", n, "-n", 2)
        assert res.returncode == 1 and f"--threads {n} is out of range (1..512" in res.stderr, res.stderr[-300:]


def test_penalty_windows_are_bounded(tiny_path):
    import resource

    def cap():  # a regression fails fast instead of taking 15 GB
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    for args, word in ((["--chain", "llama.cpp", "--dry-multiplier", 1, "--dry-penalty-last-n", 10**9],
                        "dry-penalty-last-n 1000000000 is out of range"),):
        res = subprocess.run([sys.executable, "-m", "llamalens", "generate", "the cat", "--model", str(tiny_path), "-n",
                              "3", *map(str, args)], capture_output=True, text=True, timeout=120, preexec_fn=cap)
        assert res.returncode == 1 and word in res.stderr, res.stderr[-300:]
    assert any("penalty-last-n 1000000000 is out of range" in p
               for p in SamplingSettings(penalty_last_n=10**9, repeat_penalty=1.1).problems())


def test_run_ids_out_of_range_are_no_run(tiny_path, tmp_path):
    import numpy as np

    import llamalens as ll

    db = tmp_path / "i.db"
    cli("sweep", "the cat", "--model", tiny_path, "-n", 2, "--store", db)
    for rid in ("99999999999999999999999", "1.5"):
        res = cli("show", rid, "--store", db, ok=False)
        assert res.exit_code == 1 and "no run" in res.output and "Traceback" not in res.output, res.output
    assert ll.open_run(np.int64(1), store=db).id == 1 and ll.open_run(" 1", store=db).id == 1
    for rid in (1.5, True, 2**70):
        with pytest.raises(ll.StoreError, match="no run"):
            ll.open_run(rid, store=db)


def test_header_cache_removes_only_its_own_entries(tiny_path, tmp_path, monkeypatch):
    import os

    from llamalens.modelfiles.gguf_header import CACHE_MAX, read_header

    monkeypatch.setenv("LLAMALENS_CACHE_DIR", str(tmp_path / "cache"))
    headers = tmp_path / "cache" / "headers"
    headers.mkdir(parents=True)
    mine = [headers / f"notes-{i}.json" for i in range(CACHE_MAX + 5)]
    for i, f in enumerate(mine):
        f.write_text("{}")
        os.utime(f, (1_000_000 + i, 1_000_000 + i))  # older than any cache entry
    read_header(tiny_path)
    assert all(f.exists() for f in mine)
    assert len([f for f in headers.iterdir() if f not in mine]) == 1  # the header's own entry


# -- second pass: what trying to break every command again found ----------------------------------------------------
@pytest.mark.parametrize("key,value,word", [("llama.block_count", 513, "block_count = 513"),
                                            ("llama.block_count", 0, "block_count = 0")])
def test_layer_counts_llama_cpp_aborts_on_are_refused(tiny_path, tmp_path, key, value, word):
    import gguf

    bad = tmp_path / "bad.gguf"
    shutil.copy(tiny_path, bad)
    reader = gguf.GGUFReader(bad, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][...] = value  # llama.cpp asserts 1..512 layers while loading: SIGABRT
    del reader
    for args in (["models", bad], ["next", "x", "--model", bad], ["quantize", bad, tmp_path / "q.gguf", "Q8_0"],
                 ["compare", "the cat sat", "--model", tiny_path, "--model", bad, "--store", tmp_path / "c.db"]):
        res = _llamalens(*args, timeout=60)  # a list per layer in the memory estimate was a MemoryError too
        assert res.returncode == 1 and word in res.stderr and "Traceback" not in res.stderr, (args, res.stderr[-400:])
    assert not (tmp_path / "q.gguf").exists() and Store(tmp_path / "c.db").runs() == []


def test_answer_confidence_of_unanswered_samples_and_runs_without_text(tiny_path, tmp_path):
    db = tmp_path / "a.db"
    cli("sweep", "the cat", "--model", tiny_path, "-n", 4, "-t", "0,1", "--seeds", 2, "--store", db)
    cli("lens", "the cat", "--model", tiny_path, "--store", db)
    # a regex some samples do not match: those have no answer (a pandas text column read None as nan: a traceback)
    shown = json.loads(cli("show", 1, "--json", "--answer", "zzz|the", "--store", db).stdout)
    assert shown["confidence"]
    cli("export", 1, "--format", "jsonl", "-o", tmp_path / "a.jsonl", "--answer", "zzz", "--store", db)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert {r["confidence"]["answer"] for r in rows} == {None}
    assert {r["confidence"]["distinct_share"] for r in rows} == {0.5}  # two seeds, one (missing) answer
    # a run that generated no text has no answer to pick: refused in export and report, as in show
    for args in (["export", 2, "--format", "csv", "-o", tmp_path / "l.csv"], ["report", 2, "-o", tmp_path / "l.html",
                                                                              "--no-model"], ["show", 2]):
        res = cli(*args, "--answer", "a", "--store", db, ok=False)
        assert res.exit_code == 1 and "run 2 is a lens run, which has none" in res.output, res.output
    assert not (tmp_path / "l.csv").exists() and not (tmp_path / "l.html").exists()
    # report without -o reads a mistyped store without creating it
    res = cli("report", 1, "--no-model", "--store", tmp_path / "typo" / "s.db", ok=False)
    assert res.exit_code == 1 and "there is no run store" in res.output and not (tmp_path / "typo").exists()
