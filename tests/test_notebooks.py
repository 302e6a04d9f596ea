"""The tutorials in examples/ are committed with their outputs (a reader on GitHub sees what they show), those
outputs are what the notebooks give now (CI executes each one on the embedded model and compares), and the README
links each of them. `scripts/notebooks.py` executes them and writes the outputs; the tests use its code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def _script():
    spec = importlib.util.spec_from_file_location("notebooks_script", ROOT / "scripts" / "notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


nbs = _script()


def test_there_are_notebooks_and_the_readme_links_each():
    assert [p.name for p in NOTEBOOKS][:1] == ["01_next_token.ipynb"] and len(NOTEBOOKS) >= 9
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for p in NOTEBOOKS:
        assert f"(examples/{p.name})" in readme, f"README does not link {p.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs_and_nothing_of_this_machine(path):
    """Every code cell executed, no error, no path of the machine that ran it, under MAX_BYTES."""
    assert nbs.problems_in_file(path) == [], "run scripts/notebooks.py to refresh the outputs"


def test_the_file_check_finds_what_it_looks_for(tmp_path):
    """problems_in_file is not vacuous: a stripped notebook, an error, a path and bulk are each named."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[0].execution_count = None
    code[1].outputs.append(nbformat.v4.new_output("error", ename="E", evalue="x", traceback=[]))
    code[2].outputs.append(nbformat.v4.new_output("stream", text=f"{ROOT}/x\n" + "y" * nbs.MAX_BYTES))
    bad = tmp_path / "bad.ipynb"
    nbformat.write(nb, bad)
    found = " | ".join(nbs.problems_in_file(bad))
    assert "code cell 1 not executed" in found and "code cell 2 ends in an error" in found
    assert str(ROOT) in found and "bytes (at most" in found


def test_differences_see_a_changed_output_and_ignore_a_moved_digit():
    """What the CI comparison calls stale: another kind of output, or a text that differs beyond its digits."""
    import copy

    import nbformat

    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    same = copy.deepcopy(nb)
    text = next(o for c in same.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream")
    text.text = text.text.replace("0.", "1.")  # the last digits of a build: not stale
    assert nbs.differences(nb, same) == []
    other = copy.deepcopy(nb)
    text = next(o for c in other.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream")
    text.text = "something else entirely, as a changed API would print\n" * 3
    assert nbs.differences(nb, other) and "alike" in nbs.differences(nb, other)[0]
    fewer = copy.deepcopy(nb)
    next(c for c in fewer.cells if c.cell_type == "code" and c.outputs).outputs.pop()
    assert "outputs" in nbs.differences(nb, fewer)[0]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_its_outputs_are_current(path):
    """Executed top to bottom offline in a fresh kernel on this venv's Python (a cell's error raises), its outputs
    are those committed (scripts/notebooks.py's comparison: the same outputs, texts alike up to their digits)."""
    import nbformat

    fresh = nbs.execute(path)
    assert nbs.differences(nbformat.read(path, as_version=4), fresh) == [], \
        f"{path.name}'s committed outputs are stale: run .venv/bin/python scripts/notebooks.py {path.name[:2]}"
    htmls = [o.data["text/html"] for c in fresh.cells if c.cell_type == "code" for o in c.outputs
             if "data" in o and "text/html" in o.data]
    if path.name == "01_next_token.ipynb":  # the bars inline: the notebook shows the report's rendering
        assert sum("<iframe srcdoc=" in h for h in htmls) == 2
        assert "&lt;svg" in htmls[0]
