"""What a run store file is, asked before any connection opens it: a llamalens store is recognised by its SQLite
header (llamalens's application id; a store made by 0.1.0 has none, and is recognised by its tables); any other
file, an SQLite database of another application included, is refused untouched, and no output path (`-o`,
`--report`) may name a store or its -wal / -shm files. The run store itself is store.py.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from pathlib import Path

from llamalens.errors import StoreError

APPLICATION_ID = 0x4C4C4E53  # "LLNS" in the SQLite header (PRAGMA application_id)
SQLITE_MAGIC = b"SQLite format 3\x00"
STORE_TABLES = {"meta", "runs", "configs", "samples", "tokens"}


class StoreMissing(StoreError):
    """A command that only reads was pointed at a store that does not exist."""


# Stores this process has open, by (device, inode). Opening and closing a database file with plain open()
# drops every POSIX lock this process holds on it, SQLite's included: another process may then take the
# store for unused, checkpoint it and delete its -wal file, and the writes of this process's connections are
# lost in the deleted file. A store already open here is therefore never read with open() again.
OPEN_STORES: set[tuple[int, int]] = set()


def file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open_here_as_store(path: Path) -> bool:
    """Whether `path` is a store this process has open, asked through SQLite (which keeps the locks)."""
    if file_id(path) not in OPEN_STORES:
        return False
    try:
        con = sqlite3.connect(f"file:{urllib.parse.quote(str(Path(path).resolve()))}?mode=ro", uri=True)
        try:
            return con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return False


def recognise(path: Path) -> bool:
    """True for a llamalens store, False for no file (or an empty one); StoreError for anything else.
    Reads only: a foreign file is left exactly as it was."""
    if _open_here_as_store(path):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except (FileNotFoundError, NotADirectoryError):  # nothing there yet (creating it may still fail, clearly)
        return False
    except IsADirectoryError:
        raise StoreError(f"{path} is a directory, not a run store; pass a file path with --store") from None
    except OSError as e:
        raise StoreError(f"cannot read the run store {path} ({e.strerror}); pass a readable --store path") from None
    if not head:
        return False
    if not head.startswith(SQLITE_MAGIC):
        raise StoreError(f"{path} is not a llamalens run store (not an SQLite database); llamalens left it untouched: "
                         "pass another --store path or set LLAMALENS_STORE")
    app_id = int.from_bytes(head[68:72], "big")
    if app_id == APPLICATION_ID:
        return True
    tables: set[str] = set()
    if app_id == 0:  # a store of llamalens 0.1.0 has no application id: look at its tables, read-only
        try:
            con = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)
            try:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            finally:
                con.close()
        except sqlite3.DatabaseError:
            tables = set()
        if STORE_TABLES <= tables:
            return True
    what = f"application id 0x{app_id:08X}" if app_id else (
        f"tables {', '.join(sorted(tables)[:6])}" if tables else "no llamalens tables")
    raise StoreError(f"{path} is an SQLite database of another application ({what}), not a llamalens run store; "
                     "llamalens left it untouched: pass another --store path or set LLAMALENS_STORE")


def check_not_a_store(output: str | os.PathLike) -> None:
    """Refuse an output path that would overwrite a run store (any SQLite database) or its -wal / -shm file."""
    out = Path(output)
    if _open_here_as_store(out):
        raise StoreError(f"{out} is an SQLite database (a run store?); llamalens will not overwrite it: "
                         "choose another output path")
    try:
        if out.is_file():
            with open(out, "rb") as f:
                if f.read(16) == SQLITE_MAGIC:
                    raise StoreError(f"{out} is an SQLite database (a run store?); llamalens will not overwrite it: "
                                     "choose another output path")
    except OSError:
        return
    for suffix in ("-wal", "-shm", "-journal"):
        if out.name.endswith(suffix):
            main = out.with_name(out.name[: -len(suffix)])
            if main.is_file():
                raise StoreError(f"{out} belongs to the SQLite database {main} (a run store?); llamalens will not "
                                 "overwrite it: choose another output path")


def default_store_path() -> Path:
    env = os.environ.get("LLAMALENS_STORE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "llamalens" / "runs.db"


def remember_open(path: Path) -> None:
    """Note a store this process has opened (OPEN_STORES)."""
    fid = file_id(path)
    if fid is not None:
        OPEN_STORES.add(fid)
