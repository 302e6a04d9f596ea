"""Showing token text so that nothing is invisible or lost: whitespace, control characters and
partial UTF-8 bytes get visible stand-ins. Used by the terminal tables and the reports.

    "\\n" -> "⏎"   "\\t" -> "⇥"   " " -> "·" (only at the edges of a token, where it is otherwise unseen)
    "\\r" -> "␍"   other control characters -> "<0x07>"
    bytes that are not valid UTF-8 (a token that is half of a character) -> "<0xE2>" per byte
"""

from __future__ import annotations

_SUBST = {"\n": "⏎", "\t": "⇥", "\r": "␍"}
_BIDI = {0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069}


def _char(c: str) -> str:
    if c in _SUBST:
        return _SUBST[c]
    o = ord(c)
    if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0:
        return f"<0x{o:02X}>"
    if o in _BIDI:  # bidirectional overrides would reorder the text around them
        return f"<U+{o:04X}>"
    return c


def _units(text: str, hex_bytes: str | None) -> list:
    """Characters, or ints for bytes that do not form valid UTF-8."""
    if hex_bytes is None:
        return list(text)
    raw, out, i = bytes.fromhex(hex_bytes), [], 0
    while i < len(raw):
        for n in (1, 2, 3, 4):
            try:
                out.append(raw[i : i + n].decode("utf-8"))
                i += n
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append(raw[i])
            i += 1
    return out


def visible(text: str, hex_bytes: str | None = None, edge_spaces: bool = True) -> str:
    """A token's text made visible; pass its hex bytes so that invalid UTF-8 shows as <0x..>."""
    units = _units(text, hex_bytes)
    shown = [f"<0x{u:02X}>" if isinstance(u, int) else _char(u) for u in units]
    if edge_spaces:
        n = len(shown)
        lead = next((i for i, u in enumerate(shown) if u != " "), n)
        trail = next((i for i, u in enumerate(reversed(shown)) if u != " "), n)
        for i in list(range(lead)) + list(range(n - trail, n)):
            shown[i] = "·"
    return "".join(shown)


def prob_text(p: float, digits: int = 4) -> str:
    """A probability as text, never a nonzero one as 0.0000: `digits` decimals, or two significant digits in
    scientific notation below what those decimals show (7e-06 -> '7.0e-06'); exactly 0 is '0'."""
    if p != p:
        return "–"
    if p == 0:
        return "0"
    if abs(p) < 0.5 * 10 ** -digits:
        return f"{p:.1e}"
    return f"{p:.{digits}f}"


def size_text(n: float | None) -> str:
    """A size in bytes as text, in binary units everywhere (one convention: 241.4 MiB, 1.27 GiB)."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB" if abs(n) < 1024 else f"{n / 1024:.2f} TiB"


def label(text: str, width: int = 32) -> str:
    """A text made visible and cut to `width` characters (… marks the cut): for table and plot labels."""
    shown = visible(text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


# Probability buckets for text coloured by confidence: (upper bound, name, background RGB).
CONFIDENCE = [(0.1, "<0.1", (229, 57, 53)), (0.3, "0.1-0.3", (251, 140, 0)), (0.6, "0.3-0.6", (253, 216, 53)),
              (0.9, "0.6-0.9", (156, 204, 101)), (1.01, ">=0.9", (67, 160, 71))]


def confidence_bucket(p: float) -> int:
    """Index into CONFIDENCE of a probability."""
    return next(i for i, (hi, _, _) in enumerate(CONFIDENCE) if p < hi)


def flowing(text: str, hex_bytes: str | None = None) -> str:
    """A token's text for running prose: visible like `visible` (spaces kept as spaces), and each newline
    shown as ⏎ followed by a real line break."""
    if hex_bytes is None:
        return "⏎\n".join(visible(p, None, edge_spaces=False) for p in text.split("\n"))
    # split the exact bytes, so that a token holding a newline and part of a character keeps its <0x..>
    return "⏎\n".join(visible(p.decode("utf-8", errors="replace"), p.hex(), edge_spaces=False)
                       for p in bytes.fromhex(hex_bytes).split(b"\n"))


# -- text that is not a token: names, prompts, messages, on a terminal --------------------------------


def _escape(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def terminal_safe(text: str) -> str:
    """Untrusted text (a prompt, a run name, a model's output, a message quoting them) made safe to print:
    every control character that a terminal would act on is shown as a visible escape instead.

    ESC (so CSI, OSC such as window titles and OSC 52 clipboard writes, DCS), BEL, BS, DEL, the other C0
    controls, the 8-bit C1 controls U+0080-U+009F, a CR that is not part of a CRLF, and the Unicode
    bidirectional overrides become `\\x1b`, `\\x07`, `\\x9b`, `\\u202e`...; newlines and tabs stay.

    >>> terminal_safe("hi\\x1b]0;title\\x07 there")
    'hi\\\\x1b]0;title\\\\x07 there'
    """
    out = []
    n = len(text)
    for i, c in enumerate(text):
        o = ord(c)
        if c == "\r" and i + 1 < n and text[i + 1] == "\n":
            out.append(c)
        elif (o < 0x20 and c not in "\n\t") or 0x7F <= o < 0xA0 or o in _BIDI:
            out.append(_escape(c))
        else:
            out.append(c)
    return "".join(out)


def is_terminal_safe(text: str) -> bool:
    return terminal_safe(text) == text
