"""The run store: one SQLite file holding runs, their planned samples and every token record.

A store is recognised before anything is written to it (store_file.py: a foreign file is refused untouched, and
no output path may name a store).

Nothing completed is ever lost:
  * a run is planned whole before decoding: one `samples` row per (prompt, config, seed), status
    'pending', with the exact settings and seed it will use;
  * each finished sample is written (its tokens and its row) in one transaction, as it completes;
  * the database runs in WAL mode with a busy timeout, so two sweeps can write to one store at once;
  * `--resume RUN` decodes only the samples still 'pending', with their stored settings and seeds;
  * every process that writes a run registers in `writers` (pid, host, heartbeat at each saved sample),
    so a run whose writer died (kill -9, a power cut) reads as 'interrupted', not 'running' for ever;
  * a full disk ends the sweep with the run marked 'interrupted' and the resume command.

Schema (version in `meta`):
  runs(id, name, status, created, finished, command, model, model_hash, versions, hardware, options, noise,
       kind)
  configs(run_id, config_idx, settings, label)
  samples(run_id, sample_idx, prompt_idx, config_idx, seed, prompt, status, text, finish_reason, timing,
          completed, extra)
  tokens(run_id, sample_idx, position, token_id, bytes BLOB, logprob, sampled_logprob, rank, entropy,
         candidates, eog, top, renyi)
JSON columns hold dicts; `tokens.bytes` is the token's exact bytes; `tokens.top` is a JSON list of
[id, hex bytes, logprob] (the text is derived from the bytes).

Columns added after 0.1.0, by ALTER TABLE when an older store is opened (its readers ignore them):
  runs.kind       what made the run: 'sweep' (every run before kinds existed), or a command's own kind
                  ('beam', 'fork', ...), so `runs`, `show` and `export` know how to read its samples;
  samples.extra   JSON dict of what a kind records per sample beyond its tokens (a fork continuation's
                  position and forced token, a beam search's hypotheses), set when planned or when saved; each
                  kind reads and writes it as a typed, versioned record (run/fork_records.py, run/sweep_records.py,
                  run/tree.py's TreeExtra).
  tokens.renyi    D_1/2(raw distribution || uniform), nats (core/confidence.py); NULL: not recorded (older, beam).
"""

from __future__ import annotations

import json
import operator
import os
import random
import socket
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from llamalens.errors import StoreError
from llamalens.store_file import (APPLICATION_ID, StoreMissing, check_not_a_store, default_store_path,  # noqa: F401
                                   recognise, remember_open)
from llamalens.modelfiles.find import ModelInfo
from llamalens.records import Alternative, Hardware, RunOptions, Sample, StoredSample, Timing, TokenRecord, token_text
from llamalens.settings import SamplingSettings

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, status TEXT NOT NULL, created REAL NOT NULL,
    finished REAL, command TEXT, model TEXT, model_hash TEXT, versions TEXT, hardware TEXT, options TEXT,
    noise TEXT);
CREATE TABLE IF NOT EXISTS configs (
    run_id INTEGER NOT NULL, config_idx INTEGER NOT NULL, settings TEXT NOT NULL, label TEXT,
    PRIMARY KEY (run_id, config_idx));
CREATE TABLE IF NOT EXISTS samples (
    run_id INTEGER NOT NULL, sample_idx INTEGER NOT NULL, prompt_idx INTEGER NOT NULL,
    config_idx INTEGER NOT NULL, seed INTEGER NOT NULL, prompt TEXT NOT NULL, status TEXT NOT NULL,
    text TEXT, finish_reason TEXT, timing TEXT, completed REAL, PRIMARY KEY (run_id, sample_idx));
CREATE TABLE IF NOT EXISTS tokens (
    run_id INTEGER NOT NULL, sample_idx INTEGER NOT NULL, position INTEGER NOT NULL, token_id INTEGER NOT NULL,
    bytes BLOB NOT NULL, logprob REAL NOT NULL, sampled_logprob REAL NOT NULL, rank INTEGER NOT NULL,
    entropy REAL NOT NULL, candidates INTEGER NOT NULL, eog INTEGER NOT NULL, top TEXT NOT NULL,
    PRIMARY KEY (run_id, sample_idx, position));
CREATE TABLE IF NOT EXISTS model_hashes (path TEXT, size INTEGER, mtime REAL, sha256 TEXT,
    PRIMARY KEY (path, size, mtime));
"""
# added after 0.1.0; created when a store of that version is opened (readers of 0.1.0 ignore it)
_WRITERS = """
CREATE TABLE IF NOT EXISTS writers (run_id INTEGER NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL,
    started REAL NOT NULL, heartbeat REAL NOT NULL, ended REAL);
"""
_ADDED_COLUMNS = (("runs", "kind", "TEXT NOT NULL DEFAULT 'sweep'"), ("samples", "extra", "TEXT"), ("tokens", "renyi", "REAL"))
BUSY_TIMEOUT_S = 60  # how long opening or writing the store waits for another process's lock
STALE_AFTER_S = 600  # a writer on another host with no heartbeat for this long is taken for dead


def _token_rows(run_id: int, sample_idx: int, sample: Sample) -> list[tuple]:
    return [(run_id, sample_idx, t.position, t.id, bytes.fromhex(t.bytes), t.logprob, t.sampled_logprob, t.rank,
             t.entropy, t.candidates, int(t.eog), json.dumps([[a.id, a.bytes, a.logprob] for a in t.top]), t.renyi)
            for t in sample.tokens]


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full: nothing more can be committed."""


def _is_corrupt(e: Exception) -> bool:
    """A file SQLite cannot read as a database at all (not a permission or a read-only mount)."""
    return isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError)


def _is_full(e: Exception) -> bool:
    return "full" in str(e).lower() or getattr(e, "errno", None) == 28  # SQLITE_FULL, ENOSPC


@dataclass
class RunInfo:
    """A run as the store describes it (typed; JSON columns parsed, unknown keys of other versions ignored)."""

    id: int
    name: str | None
    status: str
    created: float
    finished: float | None
    command: str
    model: ModelInfo
    model_hash: str
    versions: dict
    hardware: Hardware
    options: RunOptions
    noise: dict | None
    n_samples: int
    n_done: int
    n_prompts: int
    n_configs: int
    resumes: int = 0  # how many times the run was resumed after an interruption
    kind: str = "sweep"  # what made it (see the schema above)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return dict(asdict(self), options=self.options.to_dict())

    def listing(self) -> dict:
        """The run's row in `llamalens runs --json` and ll.runs()."""
        return {"id": self.id, "name": self.name, "kind": self.kind, "status": self.status, "model": self.model.name,
                "prompts": self.n_prompts, "configs": self.n_configs, "samples_done": self.n_done,
                "samples_total": self.n_samples, "workers": self.hardware.workers, "created": self.created}


class Store:
    def __init__(self, path: str | os.PathLike | None = None, read_only: bool = False):
        """The store at `path` (default: default_store_path()), created when missing. `read_only` (the commands
        that only read: runs, show, export, report): a missing store is a StoreMissing error and nothing is
        created, and a store that cannot be written (a read-only mount, another user's file) is read as it is."""
        self.path = Path(path) if path else default_store_path()
        self.read_only = False
        known = recognise(self.path)  # before anything is written: a foreign file stays untouched
        if read_only and not known:
            raise StoreMissing(f"there is no run store at {self.path} (nothing was created there); check --store or "
                               "LLAMALENS_STORE, or start a run with `llamalens sweep`")
        try:
            self._open(read_only, known)
        except (sqlite3.DatabaseError, OSError):
            if not read_only:
                raise
            self._open_unwritable()
        remember_open(self.path)

    def _open(self, read_only: bool, known: bool) -> None:
        try:
            if not read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
            deadline = time.monotonic() + BUSY_TIMEOUT_S
            while True:
                try:
                    self._set_up(known)
                    break
                except sqlite3.OperationalError as e:
                    # SQLite answers some lock requests at once instead of waiting on busy_timeout: a switch to WAL
                    # while another process opens the same new store (3 processes at once: 4 of 40 tries failed
                    # here). Every step of _set_up is idempotent, so it is tried again.
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(random.uniform(0.01, 0.05))
        except sqlite3.DatabaseError as e:
            if read_only and not _is_corrupt(e):
                raise  # for _open_unwritable
            raise StoreError(f"cannot use {self.path} as a run store ({e}); pass another --store path "
                             "or set LLAMALENS_STORE") from None
        except OSError as e:
            if read_only:
                raise
            raise StoreError(f"cannot write the run store {self.path} ({e.strerror}); pass a writable --store path") from None

    def _open_unwritable(self) -> None:
        """Read a store that cannot be written, writing nothing: SQLite's read-only mode, and "immutable" where
        its folder cannot be written either (a read-only mount: no -shm file can be made, and no one else can
        write the store meanwhile)."""
        if getattr(self, "db", None) is not None:
            self.db.close()
        immutable = "&immutable=1" if not os.access(self.path.parent, os.W_OK) else ""
        try:
            self.db = sqlite3.connect(f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro{immutable}", uri=True,
                                      timeout=BUSY_TIMEOUT_S, isolation_level=None)
            version = self._version()
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(f"store {self.path} has schema version {version}, newer than this llamalens "
                                 f"({SCHEMA_VERSION}); upgrade llamalens or use another --store")
            self._shim_old_schema()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot read the run store {self.path} ({e}); pass a readable --store path") from None
        self.read_only = True

    def _shim_old_schema(self) -> None:
        """A store of an older version, read where it cannot be updated: what it lacks (the writers table, the
        added columns with their defaults) is supplied by TEMP views and tables, which shadow its own tables for
        this connection only and write nothing to the file."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "writers" not in tables:
            self.db.executescript(_WRITERS.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE"))
        for table, column, decl in _ADDED_COLUMNS:
            if column not in {r[1] for r in self.db.execute(f"PRAGMA main.table_info({table})")}:
                default = decl.split("DEFAULT", 1)[1].strip() if "DEFAULT" in decl else "NULL"
                self.db.execute(f"CREATE TEMP VIEW {table} AS SELECT *, {default} AS {column} FROM main.{table}")

    def _set_up(self, known: bool) -> None:
        """Mark a new store as ours, switch it to WAL, create or check its schema (each step idempotent)."""
        if not known:  # a new store: mark it as ours while its header is still written in place
            self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        version = self._version()
        if version is not None and version > SCHEMA_VERSION:
            self.db.close()
            raise StoreError(f"store {self.path} has schema version {version}, newer than this llamalens "
                             f"({SCHEMA_VERSION}); upgrade llamalens or use another --store")
        if version is None:
            self.db.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS); executescript commits itself
            with self.tx():
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self.db.executescript(_WRITERS)
        self._add_columns()

    def _add_columns(self) -> None:
        """Give a store made before them the columns added since (two processes may race to: both win)."""
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                try:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):
                        raise

    def _version(self) -> int | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:
            return None
        return int(row[0]) if row else None

    def tx(self):
        return _Tx(self.db, self.path)

    def close(self):
        self.db.close()

    # -- model identity -----------------------------------------------------------------------
    def model_hash(self, path: Path) -> str:
        """sha256 of the model file, cached by (path, size, mtime)."""
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime)
        row = self.db.execute("SELECT sha256 FROM model_hashes WHERE path=? AND size=? AND mtime=?", key).fetchone()
        if row:
            return row[0]
        digest = file_sha256(path)
        with self.tx():
            self.db.execute("INSERT OR REPLACE INTO model_hashes VALUES (?,?,?,?)", (*key, digest))
        return digest

    # -- runs ---------------------------------------------------------------------------------
    def create_run(self, *, name, command, model, model_hash, versions, hardware, options, configs, plan,
                   kind: str = "sweep", extras: list[dict | None] | None = None,
                   first: tuple[int, Sample, dict | None] | None = None) -> int:
        """Plan a run: its configs and every sample (prompt_idx, config_idx, seed, prompt), all pending;
        `extras`, one per planned sample, what its kind records of it from the start; `first`, a sample already
        decoded (sample_idx, Sample, extra), saved in the same transaction: the run exists with it or not at all.
        StoreFull (nothing written) when the disk is full."""
        extras = extras if extras is not None else [None] * len(plan)
        if len(extras) != len(plan):
            raise ValueError(f"{len(extras)} extras for {len(plan)} planned samples")
        try:
            return self._create_run(name, command, model, model_hash, versions, hardware, options, configs, plan,
                                    kind, extras, first)
        except StoreFull as e:
            raise StoreFull(f"{e}: no run was created; free some space, or give another --store") from None

    def _create_run(self, name, command, model, model_hash, versions, hardware, options, configs, plan, kind, extras,
                    first) -> int:
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO runs (name, status, created, command, model, model_hash, versions, hardware, options, "
                "kind) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, time.time(), command, json.dumps(model), model_hash, json.dumps(versions),
                 json.dumps(hardware.to_dict()), json.dumps(options.to_dict()), kind))
            run_id = cur.lastrowid
            self.db.executemany("INSERT INTO configs VALUES (?,?,?,?)",
                                [(run_id, i, json.dumps(c.to_dict()), c.label()) for i, c in enumerate(configs)])
            self.db.executemany(
                "INSERT INTO samples (run_id, sample_idx, prompt_idx, config_idx, seed, prompt, status, extra) "
                "VALUES (?,?,?,?,?,?, 'pending', ?)",
                [(run_id, i, p, c, s, prompt, None if x is None else json.dumps(x))
                 for i, ((p, c, s, prompt), x) in enumerate(zip(plan, extras))])
            if first is not None:
                self._write_sample(run_id, *first)
        return run_id

    def save_sample(self, run_id: int, sample_idx: int, sample: Sample, writer: int | None = None,
                    extra: dict | None = None) -> None:
        """Commit one finished sample (its tokens and its row, and `extra` when given: it replaces the planned
        one) in one transaction; StoreFull when the disk is."""
        rows = _token_rows(run_id, sample_idx, sample)  # made before the write lock is taken
        with self.tx():  # StoreFull (from the transaction) when the disk is full
            self._write_sample(run_id, sample_idx, sample, extra, rows)
            if writer is not None:
                self.db.execute("UPDATE writers SET heartbeat=? WHERE rowid=?", (time.time(), writer))

    def _write_sample(self, run_id: int, sample_idx: int, sample: Sample, extra: dict | None,
                      rows: list | None = None) -> None:
        """One sample's tokens and row, inside the caller's transaction."""
        rows = _token_rows(run_id, sample_idx, sample) if rows is None else rows
        self.db.execute("DELETE FROM tokens WHERE run_id=? AND sample_idx=?", (run_id, sample_idx))
        self.db.executemany("INSERT INTO tokens (run_id, sample_idx, position, token_id, bytes, logprob, sampled_logprob, "
                                "rank, entropy, candidates, eog, top, renyi) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        self.db.execute(
            "UPDATE samples SET status='done', text=?, finish_reason=?, timing=?, completed=? "
            "WHERE run_id=? AND sample_idx=?",
            (sample.text, sample.finish_reason, json.dumps(sample.timing.to_dict()), time.time(), run_id, sample_idx))
        if extra is not None:
            self.db.execute("UPDATE samples SET extra=? WHERE run_id=? AND sample_idx=?",
                            (json.dumps(extra), run_id, sample_idx))

    def add_config(self, run_id: int, settings: SamplingSettings) -> int:
        """The index of `settings` among a growing run's configs, added when new (a tree's branches)."""
        text = json.dumps(settings.to_dict())
        with self.tx():
            rows = self.db.execute("SELECT config_idx, settings FROM configs WHERE run_id=? ORDER BY config_idx",
                                   (run_id,)).fetchall()
            found = next((i for i, t in rows if t == text), None)
            if found is not None:
                return found
            self.db.execute("INSERT INTO configs VALUES (?,?,?,?)", (run_id, len(rows), text, settings.label()))
            return len(rows)

    def add_sample(self, run_id: int, prompt: str, config_idx: int, seed: int, extra: dict | None) -> int:
        """One more sample of a growing run, pending until saved (a tree's branch); its index."""
        with self.tx():
            n = self.db.execute("SELECT COALESCE(MAX(sample_idx) + 1, 0) FROM samples WHERE run_id=?",
                                (run_id,)).fetchone()[0]
            self.db.execute("INSERT INTO samples (run_id, sample_idx, prompt_idx, config_idx, seed, prompt, status, extra) "
                            "VALUES (?,?,0,?,?,?, 'pending', ?)",
                            (run_id, n, config_idx, seed, prompt, None if extra is None else json.dumps(extra)))
        return n

    def set_extra(self, run_id: int, sample_idx: int, extra: dict) -> None:
        """Replace what a run's kind records of one sample (e.g. a fork run's decode counters on its base)."""
        with self.tx():
            self.db.execute("UPDATE samples SET extra=? WHERE run_id=? AND sample_idx=?",
                            (json.dumps(extra), run_id, sample_idx))

    # -- writers: who is decoding a run ----------------------------------------------------------
    def claim(self, run_id: int) -> int:
        """Register this process as the run's writer (refused while another live one is); returns its id."""
        with self.tx():
            live = self._live_writer(run_id)
            if live is not None:
                raise StoreError(f"run {run_id} is being written by pid {live[0]} on {live[1]}; wait for it to finish, "
                                 "or stop it, before resuming")
            cur = self.db.execute("INSERT INTO writers VALUES (?,?,?,?,?,NULL)",
                                  (run_id, os.getpid(), socket.gethostname(), time.time(), time.time()))
        return cur.lastrowid

    def release(self, writer: int) -> None:
        with self.tx():
            self.db.execute("UPDATE writers SET ended=? WHERE rowid=?", (time.time(), writer))

    def _live_writer(self, run_id: int) -> tuple[int, str] | None:
        """(pid, host) of a writer of this run that is still at work, if any."""
        for pid, host, beat in self.db.execute(
                "SELECT pid, host, heartbeat FROM writers WHERE run_id=? AND ended IS NULL", (run_id,)).fetchall():
            if _alive(pid, host, beat):
                return pid, host
        return None

    def note_workers(self, run_id: int, n: int) -> None:
        """Record that a session decoded the run on n workers (hardware.workers: the most any session used)."""
        with self.tx():
            row = self.db.execute("SELECT hardware FROM runs WHERE id=?", (run_id,)).fetchone()
            hw = json.loads(row[0] or "{}") if row else {}
            hw["workers"] = max(int(hw.get("workers", 1)), n)
            self.db.execute("UPDATE runs SET hardware=? WHERE id=?", (json.dumps(hw), run_id))

    def set_status(self, run_id: int, status: str, noise: dict | None = None) -> None:
        with self.tx():
            self.db.execute("UPDATE runs SET status=?, finished=? WHERE id=?",
                            (status, time.time() if status == "done" else None, run_id))
            if noise is not None:
                self.db.execute("UPDATE runs SET noise=? WHERE id=?", (json.dumps(noise), run_id))

    def noise_with_key(self, key: str, other_than: int) -> tuple[int, dict] | None:
        """(run id, noise floor) of the newest finished run but `other_than` whose noise floor carries this key
        (run/noise.py's noise_key), or None."""
        row = self.db.execute("SELECT id, noise FROM runs WHERE status='done' AND id!=? AND noise IS NOT NULL AND "
                              "json_extract(noise, '$.key')=? ORDER BY id DESC LIMIT 1", (other_than, key)).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def run(self, run_id: int | str) -> RunInfo:
        """A run by id (an int, or a text of digits) or by name (any other text: the newest of that name)."""
        if hasattr(run_id, "__index__") and not isinstance(run_id, bool):  # an int, numpy's too (from a table)
            rid = operator.index(run_id)
        elif isinstance(run_id, str) and run_id.strip().isdigit():
            rid = int(run_id)
        else:
            row = self.db.execute("SELECT id FROM runs WHERE name=? ORDER BY id DESC", (str(run_id),)).fetchone()
            if not row:
                raise StoreError(f"no run {run_id!r} in {self.path}; `llamalens runs` lists them") from None
            rid = row[0]
        if not 0 <= rid < 2**63:  # beyond SQLite's integers: no such run
            raise StoreError(f"no run {run_id} in {self.path}; `llamalens runs` lists them")
        r = self.db.execute("SELECT id, name, status, created, finished, command, model, model_hash, versions, "
                            "hardware, options, noise, kind FROM runs WHERE id=?", (rid,)).fetchone()
        if not r:
            raise StoreError(f"no run {run_id} in {self.path}; `llamalens runs` lists them")
        status = r[2]
        writers = self.db.execute("SELECT COUNT(*) FROM writers WHERE run_id=?", (rid,)).fetchone()[0]
        if status == "running" and self._live_writer(rid) is None and (writers or time.time() - r[3] > 60):
            status = "interrupted"  # its writer is gone (kill -9, a crash, a power cut): only a resume finishes it
        n, done, n_p, n_c = self.db.execute(
            "SELECT COUNT(*), SUM(status='done'), COUNT(DISTINCT prompt_idx), COUNT(DISTINCT config_idx) "
            "FROM samples WHERE run_id=?", (rid,)).fetchone()
        return RunInfo(r[0], r[1], status, r[3], r[4], r[5] or "", ModelInfo.from_dict(json.loads(r[6] or "{}")),
                       r[7] or "", json.loads(r[8] or "{}"), Hardware.from_dict(json.loads(r[9] or "{}")),
                       RunOptions.from_dict(json.loads(r[10] or "{}")), json.loads(r[11]) if r[11] else None,
                       n or 0, done or 0, n_p or 0, n_c or 0, max(writers - 1, 0), r[12] or "sweep")

    def runs(self) -> list[RunInfo]:
        return [self.run(r[0]) for r in self.db.execute("SELECT id FROM runs ORDER BY id")]

    def configs(self, run_id: int) -> list[SamplingSettings]:
        return [SamplingSettings.from_dict(json.loads(r[0])) for r in
                self.db.execute("SELECT settings FROM configs WHERE run_id=? ORDER BY config_idx", (run_id,))]

    def pending(self, run_id: int) -> list[StoredSample]:
        """The samples not yet done, in plan order."""
        return self._samples(run_id, "status!='done'")

    def samples(self, run_id: int, only_done: bool = True) -> list[StoredSample]:
        return self._samples(run_id, "status='done'" if only_done else "1")

    def _samples(self, run_id: int, where: str) -> list[StoredSample]:
        q = ("SELECT sample_idx, prompt_idx, config_idx, seed, prompt, status, text, finish_reason, timing, completed, "
             f"extra FROM samples WHERE run_id=? AND {where} ORDER BY sample_idx")
        return [StoredSample(*r[:8], Timing.from_dict(json.loads(r[8])) if r[8] else None, r[9],
                             json.loads(r[10]) if r[10] else None)
                for r in self.db.execute(q, (run_id,))]

    def tokens(self, run_id: int, sample_idx: int | None = None) -> list[tuple[int, TokenRecord]]:
        q = ("SELECT sample_idx, position, token_id, bytes, logprob, sampled_logprob, rank, entropy, candidates, eog, "
             "top, renyi FROM tokens WHERE run_id=?")
        args: tuple = (run_id,)
        if sample_idx is not None:
            q += " AND sample_idx=?"
            args += (sample_idx,)
        out = []
        for r in self.db.execute(q + " ORDER BY sample_idx, position", args):
            top = [Alternative(i, *token_text(bytes.fromhex(h)), lp) for i, h, lp in json.loads(r[10])]
            out.append((r[0], TokenRecord(r[1], r[2], *token_text(bytes(r[3])), r[4], r[5], r[6], r[7], r[8], top,
                                          bool(r[9]), renyi=r[11])))
        return out

    def tokens_by_sample(self, run_id: int) -> dict[int, list[TokenRecord]]:
        """Every stored token of a run, grouped by sample, in position order."""
        out: dict[int, list[TokenRecord]] = {}
        for idx, t in self.tokens(run_id):
            out.setdefault(idx, []).append(t)
        return out


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file (a model's identity: the store records it with each run)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _alive(pid: int, host: str, heartbeat: float) -> bool:
    """Whether a writer still works: on this host its process exists; elsewhere its heartbeat is recent."""
    if host != socket.gethostname():
        return time.time() - heartbeat < STALE_AFTER_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class _Tx:
    """One write transaction, committed whole or rolled back whole; a full disk (when it begins, writes or
    commits) is StoreFull, whatever was being written."""

    def __init__(self, db, path=None):
        self.db, self.path = db, path

    def __enter__(self):
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except (sqlite3.OperationalError, OSError) as e:
            self._raise_if_full(e)
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if not exc_type:
            try:
                self.db.execute("COMMIT")
            except (sqlite3.OperationalError, OSError) as e:
                self._rollback()
                self._raise_if_full(e)
                raise
            return False
        self._rollback()
        if isinstance(exc, (sqlite3.OperationalError, OSError)):
            self._raise_if_full(exc)
        return False

    def _rollback(self):
        if self.db.in_transaction:  # SQLite rolls back by itself on some errors (SQLITE_FULL)
            self.db.execute("ROLLBACK")

    def _raise_if_full(self, e: Exception) -> None:
        if _is_full(e):
            raise StoreFull(f"the disk holding the run store {self.path} is full") from None
