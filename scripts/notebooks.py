"""Run the tutorials in examples/ top to bottom and keep their outputs in the files.

    .venv/bin/python scripts/notebooks.py            # execute every notebook, write its outputs into it
    .venv/bin/python scripts/notebooks.py 06 07      # only the notebooks whose names start so
    .venv/bin/python scripts/notebooks.py --check    # execute, compare with the committed outputs, write nothing

Each notebook runs in a fresh kernel on this Python (the project's venv), offline, on the embedded model, in a
temporary folder with its own run store, so nothing of this machine ends up in the file: paths under the
temporary folder, the checkout or the home directory are replaced by placeholders, execution times and widget
state are dropped. tests/test_notebooks.py runs the same code in CI and fails when the committed outputs are
not what the notebook gives now (see `differences`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
KERNEL = "llamalens-notebooks"
CELL_TIMEOUT_S = 300  # a cell takes seconds on the 270M model; generous for a loaded CI machine
MAX_BYTES = 1_000_000  # a committed notebook stays small enough to read on GitHub
DIGITS = re.compile(r"\d+")
# what changes from machine to machine in a text output: speeds, durations, dates, ids, memory addresses
VOLATILE = re.compile(r"0x[0-9a-f]+|\d{4}-\d\d-\d\d[ T][\d:.]+|[\d.]+ ?(?:tok/s|s\b|ms\b|MB|MiB|GB|GiB)")


def notebooks(prefixes: list[str] | None = None) -> list[Path]:
    paths = sorted(EXAMPLES.glob("*.ipynb"))
    return [p for p in paths if not prefixes or any(p.name.startswith(x) for x in prefixes)]


def _kernel_home(root: Path) -> Path:
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llamalens", "language": "python"}))
    return root


def _placeholders(work: Path) -> list[tuple[str, str]]:
    pairs = [(str(work.resolve()), "."), (str(work), "."), (str(ROOT), "<checkout>"),
             (str(Path.home()), "~"), (tempfile.gettempdir(), "<tmp>")]
    return [(a, b) for a, b in pairs if a not in ("", "/")]


def _scrub(value, pairs):
    if isinstance(value, str):
        for a, b in pairs:
            value = value.replace(a, b)
        return value
    if isinstance(value, list):
        return [_scrub(v, pairs) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v, pairs) for k, v in value.items()}
    return value


def execute(path: Path, timeout: int = CELL_TIMEOUT_S):
    """The notebook at `path` executed in a fresh kernel (nbformat node), outputs scrubbed of this machine."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    with tempfile.TemporaryDirectory(prefix="llamalens-nb-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        env = {"JUPYTER_PATH": str(_kernel_home(Path(tmp) / "jupyter")),
               "LLAMALENS_STORE": str(work / "runs.db"), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
               "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, startup_timeout=60,
                           resources={"metadata": {"path": str(work)}}).execute()  # raises on a cell's error
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        pairs = _placeholders(work)
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [nbformat.from_dict(_scrub(dict(o), pairs)) for o in cell.outputs
                            if "application/vnd.jupyter.widget-view+json" not in o.get("data", {})]
    return nb


def _text(output) -> str:
    if output.output_type == "stream":
        return output.text
    data = output.get("data", {})
    return data.get("text/plain", "") if output.output_type != "error" else "\n".join(output.traceback)


def _shape(output) -> str:
    masked = DIGITS.sub("0", VOLATILE.sub("", _text(output)))
    return masked


def differences(committed, fresh, min_ratio: float = 0.9) -> list[str]:
    """Where `fresh` (just executed) differs from `committed`: per code cell, the kinds of output (stream, result,
    display, and the MIME types each carries) must be the same, and each text output the same once digits are
    masked (numbers move by a last digit between CPU builds) up to `min_ratio` of difflib's similarity."""
    problems = []
    code_c = [c for c in committed.cells if c.cell_type == "code"]
    code_f = [c for c in fresh.cells if c.cell_type == "code"]
    if [c.source for c in code_c] != [c.source for c in code_f]:
        return ["the code cells differ from the notebook executed"]
    for i, (a, b) in enumerate(zip(code_c, code_f), 1):
        kinds_a = [(o.output_type, sorted(o.get("data", {}))) for o in a.outputs]
        kinds_b = [(o.output_type, sorted(o.get("data", {}))) for o in b.outputs]
        if kinds_a != kinds_b:
            problems.append(f"code cell {i}: outputs {kinds_a} committed, {kinds_b} now")
            continue
        for oa, ob in zip(a.outputs, b.outputs):
            ratio = difflib.SequenceMatcher(None, _shape(oa), _shape(ob), autojunk=False).ratio()
            if ratio < min_ratio:
                problems.append(f"code cell {i}: text {ratio:.2f} alike: committed {_text(oa)[:200]!r}, "
                                f"now {_text(ob)[:200]!r}")
    return problems


def problems_in_file(path: Path) -> list[str]:
    """What a committed notebook must not hold: a code cell never run, an error, this machine's paths, bulk."""
    import nbformat

    raw = path.read_bytes()
    nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
    found = []
    if len(raw) > MAX_BYTES:
        found.append(f"{len(raw):,} bytes (at most {MAX_BYTES:,})")
    for i, c in enumerate([c for c in nb.cells if c.cell_type == "code"], 1):
        if c.execution_count is None:
            found.append(f"code cell {i} not executed")
        if any(o.output_type == "error" for o in c.outputs):
            found.append(f"code cell {i} ends in an error")
    text = raw.decode("utf-8")
    for needle in {str(ROOT), str(Path.home()), "/tmp/", "llamalens-nb-"} - {"/"}:
        if needle and needle in text:
            found.append(f"holds the path {needle!r}")
    return found


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (each notebook's kernel): a figure a loaded machine
    does not inflate as it does the wall time."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="notebook name prefixes (default: all)")
    ap.add_argument("--check", action="store_true", help="compare with the committed outputs; write nothing")
    ap.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S, help="seconds a cell may take")
    args = ap.parse_args(argv)
    import nbformat

    failed = False
    for path in notebooks(args.names):
        t0, cpu0 = time.monotonic(), _cpu_seconds()
        fresh = execute(path, args.timeout)
        took = f"{time.monotonic() - t0:.1f} s ({_cpu_seconds() - cpu0:.1f} CPU s)"
        if args.check:
            problems = differences(nbformat.read(path, as_version=4), fresh) + problems_in_file(path)
            failed |= bool(problems)
            print(f"{path.name}: {took}, " + ("; ".join(problems) if problems else "as committed"))
        else:
            nbformat.write(fresh, path)
            problems = problems_in_file(path)
            failed |= bool(problems)
            print(f"{path.name}: {took}, {path.stat().st_size:,} bytes" + "".join(f"; {p}" for p in problems))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
