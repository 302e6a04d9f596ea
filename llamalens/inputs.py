"""Reading what users hand over in files: prompts files (.txt / .jsonl) and texts to score or embed.

Every problem is an InvalidInput that names the file, the line or byte, and the fix. Text stays the
user's: a file that is not UTF-8 is refused (or, where raw bytes are allowed, kept as bytes), never
silently re-decoded.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from llamalens.errors import InvalidInput

BOM = "\ufeff"  # a byte order mark that some editors put at the start of a UTF-8 file: not part of the text


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a .txt file (blank lines skipped), or the "prompt" of each JSON line of a .jsonl."""
    p = Path(path)
    text = read_utf8(p, "--prompts-file")
    prompts = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            obj = json_line(line, f"--prompts-file: {p} line {n}")
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


_JSON_BRACKETS = re.compile(r'"(?:\\.|[^"\\])*"|[\[\]{}]')


def check_json_nesting(text: str, where: str, limit: int) -> None:
    """Refuse JSON text whose arrays and objects nest deeper than `limit`, before a recursive reader meets it."""
    depth = deepest = 0
    for m in _JSON_BRACKETS.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif tok in "]}":
            depth -= 1
    if deepest > limit:
        raise InvalidInput(f"{where} nests arrays and objects {deepest} deep, more than llamalens accepts ({limit}); "
                           "flatten it")


MAX_GBNF_NESTING = 500  # parentheses; llama.cpp's recursive parser overflows the stack (a segfault) near 20,000
_GBNF_PARENS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\r\n]*|[()]')


def check_gbnf_nesting(gbnf: str, where: str = "the grammar") -> None:
    """Refuse GBNF whose parentheses nest deeper than MAX_GBNF_NESTING (outside its strings, character classes
    and comments), before llama.cpp's parser recurses into them."""
    depth = deepest = 0
    for m in _GBNF_PARENS.finditer(gbnf):
        tok = m.group()
        if tok == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif tok == ")":
            depth -= 1
    if deepest > MAX_GBNF_NESTING:
        raise InvalidInput(f"{where} nests parentheses {deepest} deep, more than llamalens accepts "
                           f"({MAX_GBNF_NESTING}); name the inner groups as rules of their own")


MAX_JSON_LINE_NESTING = 100  # arrays and objects in one line of a JSONL file (json.loads recurses per level)


def json_line(line: str, where: str, fix: str | None = None):
    """One line of a JSONL file as its value; when it is not JSON, None (the caller says what it should be), or
    with `fix` an InvalidInput saying why, then the fix.
    InvalidInput for what JSON allows and a text cannot hold: nesting past MAX_JSON_LINE_NESTING, and a lone
    surrogate escape such as "\\ud800" (half of a UTF-16 pair: no character, it cannot be written as UTF-8)."""
    check_json_nesting(line, where, MAX_JSON_LINE_NESTING)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        if fix:
            raise InvalidInput(f"{where} is not JSON ({e.msg}, column {e.colno}); {fix}") from None
        return None
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"{where} holds a lone surrogate \\u{ord(e.object[e.start]):04x} (half of a UTF-16 "
                           "pair, not a character); write the character itself or both halves of its pair") from None
    return obj


def read_utf8(p: Path, option: str) -> str:
    """A whole file as UTF-8 text (a leading byte order mark dropped); InvalidInput naming `option` when it is
    missing or not UTF-8."""
    return _decode(_read(Path(p), option), p, option, "save it as UTF-8").removeprefix(BOM)


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
    raw = _stdin("--file") if file == "-" else _read(Path(file), "--file")
    if raw_bytes:
        return raw
    return _decode(raw, file, "--file", f"convert it (e.g. iconv -f latin1 -t utf-8 {file}) or pass --raw-bytes to "
                                        "score its bytes as they are")


MAX_INPUT_BYTES = 64 * 2**20  # one input file (or stdin): 64 MiB of text is millions of tokens


def _bounded(f, name, option: str) -> bytes:
    """At most MAX_INPUT_BYTES from an open binary file: /dev/zero or an endless pipe is refused, not read
    until memory runs out."""
    raw = f.read(MAX_INPUT_BYTES + 1)
    if len(raw) > MAX_INPUT_BYTES:
        raise InvalidInput(f"{option}: {name} holds more than {MAX_INPUT_BYTES // 2**20} MiB (or never ends); "
                           "split it into smaller files")
    return raw


def _stdin(option: str) -> bytes:
    return _bounded(sys.stdin.buffer, "stdin", option)


def _read(p: Path, option: str) -> bytes:
    try:
        with open(p, "rb") as f:
            return _bounded(f, p, option)
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


_TERM_HEADERS = {("term", "category"), ("text", "category")}


def read_terms(file: str) -> tuple[list[str], list[str] | None]:
    """Texts to embed from --file ('-' = stdin), with their categories when the file gives them.

    A .jsonl file: one {"text": ..., "category": ...} object per line. Any other file: one text per line,
    or `term<TAB>category` lines (a first line `term<TAB>category` or `text<TAB>category` is a header and
    skipped). Blank lines are skipped. Categories are all or none: a file where some texts have one and
    others do not is refused, naming the first line that differs.
    """
    where = "stdin" if file == "-" else file
    raw = _stdin("--file") if file == "-" else _read(Path(file), "--file")
    text = _decode(raw, where, "--file", f"convert it (e.g. iconv -f latin1 -t utf-8 {file})").removeprefix(BOM)
    jsonl = file != "-" and Path(file).suffix == ".jsonl"
    texts, cats, lines = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        term, cat = _json_term(line, where, n) if jsonl else _tsv_term(line, where, n)
        if not jsonl and not texts and cat is not None and (term.strip().lower(), cat.lower()) in _TERM_HEADERS:
            continue
        texts.append(term)
        cats.append(cat)
        lines.append(n)
    given = [c is not None for c in cats]
    if any(given) and not all(given):
        n = lines[given.index(not given[0])]
        form = '{"text": ..., "category": ...}' if jsonl else "term<TAB>category"
        odd, first = ("a category", "none") if given[0] is False else ("no category", "one")
        raise InvalidInput(f"--file: {where} line {n} has {odd}, but line {lines[0]} has {first}; give every text "
                           f"a category ({form}) or none")
    return texts, (cats if cats and all(given) else None)


def _tsv_term(line: str, where: str, n: int) -> tuple[str, str | None]:
    if "\t" not in line:
        return line, None
    fields = line.split("\t")
    if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
        raise InvalidInput(f"--file: {where} line {n} is not term<TAB>category (it has {len(fields)} tab-separated "
                           "field(s), or one is empty); write one term, one tab, one category per line")
    return fields[0], fields[1].strip()


def _json_term(line: str, where: str, n: int) -> tuple[str, str | None]:
    obj = json_line(line, f"--file: {where} line {n}")
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise InvalidInput(f"--file: {where} line {n} is not a JSON object with a \"text\" string; "
                           'fix it, e.g. {"text": "bull market", "category": "market"}')
    cat = obj.get("category")
    if cat is not None and (not isinstance(cat, str) or not cat.strip()):
        raise InvalidInput(f"--file: {where} line {n}: \"category\" is {json_kind(cat)} {json.dumps(cat)[:40]}, "
                           'not a non-empty string; write it as text, e.g. "category": "market"')
    return obj["text"], (cat.strip() if cat is not None else None)
