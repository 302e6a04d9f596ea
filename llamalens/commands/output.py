"""What the commands print: tables, JSON, progress, reports written; and how errors end a command.

Data goes to stdout (a table, or JSON with --json), status to stderr. Library errors
(LlamalensError) become one-line `Error: ...` messages with exit status 1; click's own usage errors
exit 2; Ctrl-C exits 130.

Untrusted text (prompts, run names, model names and output, messages quoting them) never reaches the
terminal raw: `say`, `print_table` and the error messages pass it through visible.terminal_safe, and
JSON escapes every control character, DEL and C1 included. Only our own styling (the --text colours,
progress lines) is written as escape sequences.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from contextlib import contextmanager

import click

from llamalens.errors import LlamalensError
from llamalens.visible import terminal_safe


def fail_cleanly(fn):
    """Turn library errors into click errors and Ctrl-C into a clean exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LlamalensError as e:
            raise click.ClickException(terminal_safe(str(e))) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def shell_command(argv: list[str]) -> str:
    """A command line quoted for a POSIX shell so that pasting it runs the same command: plain words as they
    are, others in single quotes, and words holding control characters in bash's $'...' with escapes."""
    import shlex

    def escaped(c: str) -> str:
        if c in "'\\":
            return "\\" + c
        if c.isprintable():
            return c
        named = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
        return named.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x80 else f"\\u{ord(c):04x}")

    return " ".join(shlex.quote(a) if a.isprintable() else "$'" + "".join(map(escaped, a)) + "'" for a in argv)


# JSON escapes C0 itself; DEL, the C1 controls and bidi overrides are valid raw in JSON strings, so escape them too
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in [*range(0x7F, 0xA0), 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066,
                                              0x2067, 0x2068, 0x2069]}


def json_out(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, indent=2).translate(_JSON_ESCAPES))


def records(frame) -> list[dict]:
    """A DataFrame as JSON-ready rows (analysis.json_records)."""
    from llamalens.run.loaded import json_records

    return json_records(frame)


def say(message: str = "", err: bool = False, nl: bool = True) -> None:
    """click.echo for lines that may quote untrusted text."""
    click.echo(terminal_safe(str(message)), err=err, nl=nl)


def print_table(rows, right: set[int] = frozenset()) -> None:
    """Rows of cells as aligned columns (the first row is the header); `right` = right-aligned columns. Each cell
    is made terminal-safe (and its newlines and tabs shown as \\n, \\t) before it is measured, so that a name
    holding escapes keeps its column."""
    rows = [[terminal_safe(str(c)).replace("\n", "\\n").replace("\t", "\\t") for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        click.echo("  ".join(cells).rstrip())
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))


def fmt_size(n: float) -> str:
    """A size as every command prints one (visible.size_text: MiB / GiB)."""
    from llamalens.visible import size_text

    return size_text(n)


def load_model(name, options, sequences: int = 1, rows: int | None = None, cells: int | None = None, analysis=None):
    """Resolve --model, check that it fits in memory (unless --force) and load it with these ModelOptions,
    saying so on stderr. `sequences`, `rows` (logits rows per decode) and `cells` (KV cells in all) size the
    estimate (memory.estimate); `analysis(header)`: the bytes the command's own analysis adds to it."""
    from llamalens.modelfiles.memory import checked_load
    from llamalens.modelfiles.find import resolve_source

    found = resolve_source(name)
    where = "" if found.store in ("folder", "default") else f" ({found.source})"
    return checked_load(found, options, sequences, rows, cells, analysis=analysis,
                        announce=lambda: say(f"loading {found.path.name}{where} ...", err=True))


def check_report_path(report_path) -> None:
    """A bad --report path fails before any work, not after it."""
    if report_path:
        from llamalens.reports.document import check_writable, report_format

        report_format(report_path, None)
        check_writable(report_path)


def write_report(doc, report_path, fmt=None) -> None:
    from llamalens.reports.document import write

    files = write(doc, report_path, fmt)
    extra = f" and {len(files) - 1} images in {files[1].parent}" if len(files) > 1 else ""
    say(f"wrote {files[0]} ({fmt_size(sum(f.stat().st_size for f in files))}){extra}", err=True)


def window_progress(what):
    def show(k, n):
        if n > 1:
            click.echo(f"\r{what}: window {k}/{n}", err=True, nl=k >= n)

    return show


def sweep_progress(counts=None):
    """A progress line on stderr for a sweep (at most five updates a second, and always the last);
    `counts(prog)` says what is done, when 'N/M sequences' is not the whole story."""
    last = [0.0]

    def show(prog):
        now = time.monotonic()
        if now - last[0] < 0.2 and prog.done < prog.total:
            return
        last[0] = now
        eta = "?" if prog.eta != prog.eta else f"{prog.eta:.0f}s"
        width = 24
        filled = int(width * prog.done / max(prog.total, 1))
        done = counts(prog) if counts else f"{prog.done}/{prog.total} sequences"
        click.echo(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}  "
                   f"{prog.tokens_per_s:6.1f} tok/s  ETA {eta}   ", err=True, nl=prog.done >= prog.total)

    return show


def print_confidence(prefix: str, tokens) -> None:
    """Text coloured by the probability of each token (background colour; a legend follows). Without a
    colour terminal the text is printed plain, with the legend saying so."""
    from llamalens.visible import CONFIDENCE, confidence_bucket, flowing

    out = [click.style(flowing(prefix), dim=True)] if prefix else []
    for t in tokens:
        _, _, rgb = CONFIDENCE[confidence_bucket(t.prob)]
        for k, line in enumerate(flowing(t.text, t.bytes).split("\n")):
            if k:
                out.append("\n")
            if line:
                out.append(click.style(line, bg=rgb, fg="black"))
    click.echo("".join(out))
    legend = "  ".join(click.style(f" {name} ", bg=rgb, fg="black") for _, name, rgb in CONFIDENCE)
    click.echo(f"\nprobability of each token: {legend}" + ("" if sys.stdout.isatty() else
               "  (colours show on a terminal; --json has every number)"))


def alternatives(top, digits: int = 3) -> str:
    """A token's top alternatives as 'text p  text p ...'."""
    import math

    from llamalens.visible import prob_text, visible

    return "  ".join(f"{visible(a.text, a.bytes)} {prob_text(math.exp(a.logprob), digits)}" for a in top)


@contextmanager
def sigterm_as_interrupt(got: list):
    """SIGTERM ends a sweep like Ctrl-C: the samples committed so far stay, the run is marked interrupted.
    `got` receives the signal, so that the exit status can follow the shell's convention (128 + signal)."""
    def on_term(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def until_done(call) -> None:
    """Run a sweep-like decode; when it is interrupted, say how to resume and exit as the shell expects
    (128 + the signal; 1 for a full disk)."""
    from llamalens.run.lifecycle import RunInterrupted

    got: list = []
    try:
        with sigterm_as_interrupt(got):
            call()
    except RunInterrupted as e:
        say(f"\n{e}", err=True)
        sys.exit(128 + (got[0] if got else signal.SIGINT) if e.by_signal else 1)


def given_options(ctx: click.Context, names) -> list[str]:
    """The options among `names` that the user gave on the command line (not defaults, not the environment)."""
    from click.core import ParameterSource

    params = {p.name: p for p in ctx.command.params}
    out = []
    for name in names:
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            p = params[name]
            out.append(p.opts[0] if p.opts[0].startswith("-") else p.name.upper())
    return out


def ray_executor(address, workers):
    """The executor of `--ray`: the run's work on Ray workers (run/ray.py), their notes on stderr; None (this
    process) without --ray."""
    if address is None:
        return None
    from llamalens.run.ray import RayExecutor

    return RayExecutor(address, workers, lambda note: say(f"ray: {note}", err=True))


def no_answer(answer, run_id, what: str) -> None:
    """`show --answer` of a run that generated no text: refused, naming why."""
    if answer is not None:
        from llamalens.errors import InvalidInput

        raise InvalidInput(f"--answer picks the answer in generated text; run {run_id} is {what}, which has none: "
                           "drop --answer")
