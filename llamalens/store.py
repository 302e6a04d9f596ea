"""The run store: one SQLite file holding runs, their planned samples and every token record.

Nothing completed is ever lost:
  * a run is planned whole before decoding: one `samples` row per (prompt, config, seed), status
    'pending', with the exact settings and seed it will use;
  * each finished sample is written (its tokens and its row) in one transaction, as it completes;
  * the database runs in WAL mode with a busy timeout, so two sweeps can write to one store at once;
  * `--resume RUN` decodes only the samples still 'pending', with their stored settings and seeds.

Schema (version in `meta`):
  runs(id, name, status, created, finished, command, model, model_hash, versions, hardware, options, noise)
  configs(run_id, config_idx, settings, label)
  samples(run_id, sample_idx, prompt_idx, config_idx, seed, prompt, status, text, finish_reason, timing,
          completed)
  tokens(run_id, sample_idx, position, token_id, bytes BLOB, logprob, sampled_logprob, rank, entropy,
         candidates, eog, top)
JSON columns hold dicts; `tokens.bytes` is the token's exact bytes; `tokens.top` is a JSON list of
[id, hex bytes, logprob] (the text is derived from the bytes).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .records import Alternative, Sample, TokenRecord

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


def default_store_path() -> Path:
    env = os.environ.get("LLAMALENS_STORE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "llamalens" / "runs.db"


@dataclass
class RunInfo:
    id: int
    name: str | None
    status: str
    created: float
    finished: float | None
    command: str
    model: dict
    model_hash: str
    versions: dict
    hardware: dict
    options: dict
    noise: dict | None
    n_samples: int
    n_done: int
    n_prompts: int
    n_configs: int

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


class Store:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_store_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self.db.execute("PRAGMA busy_timeout = 60000")
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
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot use {self.path} as a run store ({e}); pass another --store path "
                             "or set LLAMALENS_STORE") from None
        except OSError as e:
            raise StoreError(f"cannot write the run store {self.path} ({e.strerror}); pass a writable --store path") from None

    def _version(self) -> int | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:
            return None
        return int(row[0]) if row else None

    def tx(self):
        return _Tx(self.db)

    def close(self):
        self.db.close()

    # -- model identity -----------------------------------------------------------------------
    def model_hash(self, path: Path) -> str:
        """sha256 of the model file, cached by (path, size, mtime)."""
        import hashlib

        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime)
        row = self.db.execute("SELECT sha256 FROM model_hashes WHERE path=? AND size=? AND mtime=?", key).fetchone()
        if row:
            return row[0]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self.tx():
            self.db.execute("INSERT OR REPLACE INTO model_hashes VALUES (?,?,?,?)", (*key, digest))
        return digest

    # -- runs ---------------------------------------------------------------------------------
    def create_run(self, *, name, command, model, model_hash, versions, hardware, options, configs, plan) -> int:
        """Plan a run: its configs and every sample (prompt_idx, config_idx, seed, prompt), all pending."""
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO runs (name, status, created, command, model, model_hash, versions, hardware, options) "
                "VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (name, time.time(), command, json.dumps(model), model_hash, json.dumps(versions),
                 json.dumps(hardware), json.dumps(options)))
            run_id = cur.lastrowid
            self.db.executemany("INSERT INTO configs VALUES (?,?,?,?)",
                                [(run_id, i, json.dumps(c.to_dict()), c.label()) for i, c in enumerate(configs)])
            self.db.executemany(
                "INSERT INTO samples (run_id, sample_idx, prompt_idx, config_idx, seed, prompt, status) "
                "VALUES (?,?,?,?,?,?, 'pending')",
                [(run_id, i, p, c, s, prompt) for i, (p, c, s, prompt) in enumerate(plan)])
        return run_id

    def save_sample(self, run_id: int, sample_idx: int, sample: Sample) -> None:
        rows = [(run_id, sample_idx, t.position, t.id, bytes.fromhex(t.bytes), t.logprob, t.sampled_logprob, t.rank,
                 t.entropy, t.candidates, int(t.eog), json.dumps([[a.id, a.bytes, a.logprob] for a in t.top]))
                for t in sample.tokens]
        with self.tx():
            self.db.execute("DELETE FROM tokens WHERE run_id=? AND sample_idx=?", (run_id, sample_idx))
            self.db.executemany("INSERT INTO tokens VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            self.db.execute(
                "UPDATE samples SET status='done', text=?, finish_reason=?, timing=?, completed=? "
                "WHERE run_id=? AND sample_idx=?",
                (sample.text, sample.finish_reason, json.dumps(sample.timing.to_dict()), time.time(), run_id,
                 sample_idx))

    def set_status(self, run_id: int, status: str, noise: dict | None = None) -> None:
        with self.tx():
            self.db.execute("UPDATE runs SET status=?, finished=? WHERE id=?",
                            (status, time.time() if status == "done" else None, run_id))
            if noise is not None:
                self.db.execute("UPDATE runs SET noise=? WHERE id=?", (json.dumps(noise), run_id))

    def run(self, run_id: int | str) -> RunInfo:
        try:
            rid = int(run_id)
        except (TypeError, ValueError):
            row = self.db.execute("SELECT id FROM runs WHERE name=? ORDER BY id DESC", (str(run_id),)).fetchone()
            if not row:
                raise StoreError(f"no run {run_id!r} in {self.path}; `llamalens runs` lists them") from None
            rid = row[0]
        r = self.db.execute("SELECT id, name, status, created, finished, command, model, model_hash, versions, "
                            "hardware, options, noise FROM runs WHERE id=?", (rid,)).fetchone()
        if not r:
            raise StoreError(f"no run {run_id} in {self.path}; `llamalens runs` lists them")
        n, done, n_p, n_c = self.db.execute(
            "SELECT COUNT(*), SUM(status='done'), COUNT(DISTINCT prompt_idx), COUNT(DISTINCT config_idx) "
            "FROM samples WHERE run_id=?", (rid,)).fetchone()
        return RunInfo(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6] or "{}"), r[7] or "",
                       json.loads(r[8] or "{}"), json.loads(r[9] or "{}"), json.loads(r[10] or "{}"),
                       json.loads(r[11]) if r[11] else None, n or 0, done or 0, n_p or 0, n_c or 0)

    def runs(self) -> list[RunInfo]:
        return [self.run(r[0]) for r in self.db.execute("SELECT id FROM runs ORDER BY id")]

    def configs(self, run_id: int) -> list[dict]:
        return [json.loads(r[0]) for r in
                self.db.execute("SELECT settings FROM configs WHERE run_id=? ORDER BY config_idx", (run_id,))]

    def pending(self, run_id: int) -> list[tuple[int, int, int, int, str]]:
        """(sample_idx, prompt_idx, config_idx, seed, prompt) of the samples not yet done."""
        return list(self.db.execute("SELECT sample_idx, prompt_idx, config_idx, seed, prompt FROM samples "
                                    "WHERE run_id=? AND status!='done' ORDER BY sample_idx", (run_id,)))

    def samples(self, run_id: int, only_done: bool = True) -> list[dict]:
        q = ("SELECT sample_idx, prompt_idx, config_idx, seed, prompt, status, text, finish_reason, timing, completed "
             "FROM samples WHERE run_id=?" + (" AND status='done'" if only_done else "") + " ORDER BY sample_idx")
        cols = ["sample_idx", "prompt_idx", "config_idx", "seed", "prompt", "status", "text", "finish_reason", "timing",
                "completed"]
        out = []
        for r in self.db.execute(q, (run_id,)):
            d = dict(zip(cols, r))
            d["timing"] = json.loads(d["timing"]) if d["timing"] else None
            out.append(d)
        return out

    def tokens(self, run_id: int, sample_idx: int | None = None) -> list[tuple[int, TokenRecord]]:
        q = ("SELECT sample_idx, position, token_id, bytes, logprob, sampled_logprob, rank, entropy, candidates, eog, "
             "top FROM tokens WHERE run_id=?")
        args: tuple = (run_id,)
        if sample_idx is not None:
            q += " AND sample_idx=?"
            args += (sample_idx,)
        out = []
        for r in self.db.execute(q + " ORDER BY sample_idx, position", args):
            raw = bytes(r[3])
            top = [Alternative(i, bytes.fromhex(h).decode("utf-8", errors="replace"), h, lp)
                   for i, h, lp in json.loads(r[10])]
            out.append((r[0], TokenRecord(r[1], r[2], raw.decode("utf-8", errors="replace"), raw.hex(), r[4], r[5],
                                          r[6], r[7], r[8], top, bool(r[9]))))
        return out


class _Tx:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
