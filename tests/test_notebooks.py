"""The tutorials in examples/ run top to bottom offline (nbclient, a kernel on this venv's Python), are
committed without outputs, and the README links each of them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
KERNEL = "llamalens-test-venv"
CELL_TIMEOUT_S = 300  # a cell takes seconds on the 270M model; generous for a loaded CI machine


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    """A kernelspec that starts ipykernel with the Python running the tests (the project's venv)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llamalens (test venv)", "language": "python"}))
    return root


def test_there_are_notebooks_and_the_readme_links_each():
    assert [p.name for p in NOTEBOOKS][:1] == ["01_next_token.ipynb"] and len(NOTEBOOKS) >= 5
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for p in NOTEBOOKS:
        assert f"(examples/{p.name})" in readme, f"README does not link {p.name}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel_path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "commit notebooks stripped"
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, startup_timeout=60,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a cell's error
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    htmls = [o.data["text/html"] for o in outputs if "data" in o and "text/html" in o.data]
    if path.name == "01_next_token.ipynb":  # the bars inline: the notebook shows the report's rendering
        assert sum("<iframe srcdoc=" in h for h in htmls) == 2
        assert "&lt;svg" in htmls[0]
