"""Reading what users hand over in files: prompts files (.txt / .jsonl) and texts to score or embed.

Every problem is an InvalidInput that names the file, the line or byte, and the fix. Text stays the
user's: a file that is not UTF-8 is refused (or, where raw bytes are allowed, kept as bytes), never
silently re-decoded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import InvalidInput


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a .txt file (blank lines skipped), or the "prompt" of each JSON line of a .jsonl."""
    p = Path(path)
    text = _decode(_read(p, "--prompts-file"), p, "--prompts-file", "save it as UTF-8")
    prompts = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise InvalidInput(f"--prompts-file: {p} line {n} is not a JSON object with a \"prompt\" field; "
                                   'fix it, e.g. {"prompt": "Once upon a time"}')
            if not isinstance(obj["prompt"], str):
                raise InvalidInput(f"--prompts-file: {p} line {n}: \"prompt\" is {json_kind(obj['prompt'])} "
                                   f"{json.dumps(obj['prompt'])[:40]}, not a string; write it as text, "
                                   'e.g. {"prompt": "42"}')
            prompts.append(obj["prompt"])
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidInput(f"--prompts-file: {p} holds no prompts; one per line (.txt) or JSON lines (.jsonl)")
    return prompts


def read_utf8(p: Path, option: str) -> str:
    """A whole file as UTF-8 text; InvalidInput naming `option` when it is missing or not UTF-8."""
    return _decode(_read(Path(p), option), p, option, "save it as UTF-8")


def json_kind(value) -> str:
    """What a JSON / TOML value is, in the words of those formats (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table" if not value or all(isinstance(k, str) for k in value) else "an object"
    return type(value).__name__


def read_text_file(file: str, raw_bytes: bool = False) -> str | bytes:
    """A whole file ('-' = stdin) as UTF-8 text, or its bytes as they are with raw_bytes."""
    raw = sys.stdin.buffer.read() if file == "-" else _read(Path(file), "--file")
    if raw_bytes:
        return raw
    return _decode(raw, file, "--file", f"convert it (e.g. iconv -f latin1 -t utf-8 {file}) or pass --raw-bytes to "
                                        "score its bytes as they are")


def _read(p: Path, option: str) -> bytes:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"{option}: file not found: {p}") from None
    except IsADirectoryError:
        raise InvalidInput(f"{option}: {p} is a directory; give a text file") from None
    except OSError as e:
        raise InvalidInput(f"{option}: cannot read {p} ({e.strerror})") from None


def _decode(raw: bytes, name, option: str, fix: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{option}: {name} is not UTF-8 (byte 0x{raw[e.start]:02X} at offset {e.start}); "
                           f"{fix}") from None
