"""What the repository says stays true: every command has help, every command the README shows exists,
docs/design.md's Layout lists every module, the import graph has no circles, and a store written by an
earlier llamalens still opens."""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamalens.settings import ModelOptions
from click.testing import CliRunner

from llamalens.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DATA = Path(__file__).parent / "data"


def test_every_command_has_help():
    assert len(main.commands) >= 14
    for name, command in main.commands.items():
        assert command.help and command.help.strip(), f"`llamalens {name}` has no help text"
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0 and "Usage: main " + name in res.output.replace("llamalens", "main"), res.output
        for param in command.params:  # every option says what it does
            if param.param_type_name == "option" and param.name not in ("help",):
                assert getattr(param, "help", None), f"`llamalens {name} {param.opts[0]}` has no help text"


def test_help_lists_options_in_groups():
    """Each command's --help lists every option once, its own first, then the shared ones in their groups."""
    from llamalens.commands.options import HELP_GROUPS, help_group

    titles = ["Options"] + [t for t, _ in HELP_GROUPS]
    for name, command in main.commands.items():
        out = CliRunner().invoke(main, [name, "--help-all"], terminal_width=200).output
        shown = [line[:-1] for line in out.splitlines() if line.endswith(":") and line[:-1] in titles]
        assert shown == sorted(shown, key=titles.index) and len(set(shown)) == len(shown), (name, shown)
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                section = out.split(help_group(param.name) + ":\n", 1)[1].split("\n\n", 1)[0]
                assert re.search(rf"(^|[ ,/]){re.escape(param.opts[-1])}\b", section, flags=re.M), (name, param.opts)
    out = CliRunner().invoke(main, ["next", "--help-all"]).output.split("\nOptions:\n", 1)[1]
    assert "Settings to compare" in out and "Model:" in out and "Also show the distribution" not in out
    assert out.index("--top ") < out.index("--temperature") < out.index("--model") < out.index("  --json ")


# the longest short --help measured, `sweep --help` at 80 columns: 64 lines (--help-all: 150); the bound is 1.2x that
SHORT_HELP_LINES = 77


def test_short_help_folds_the_shared_groups():
    """`--help` is short: the command's first paragraph and one example, its options one line each, without the
    model-loading, llama.cpp-chain and Ray options, which --help-all lists (with every example) and the short help
    points to; so for every command that has those groups."""
    folding = 0
    for name, command in main.commands.items():
        short = CliRunner().invoke(main, [name, "--help"], terminal_width=80).output
        full = CliRunner().invoke(main, [name, "--help-all"], terminal_width=80).output
        assert len(short.splitlines()) <= SHORT_HELP_LINES, (name, len(short.splitlines()))
        examples = [line for line in full.splitlines() if line.startswith("  llamalens ")]
        assert sum(line.startswith("  llamalens ") for line in short.splitlines()) == min(len(examples), 1), name
        assert not examples or examples[0] in short, name
        folded = [p.opts[-1] for p in command.params if getattr(p, "folded", None) and not p.hidden]
        for flag in folded:
            entry = rf"^  (-\w, )?{flag}( |$)"
            assert re.search(entry, full, flags=re.M) and not re.search(entry, short, flags=re.M), (name, flag)
        if folded:
            folding += 1
            assert f"{len(folded)} more options" in short and f"llamalens {name} --help-all" in short, name
        body = short.split("\nOptions:\n", 1)[1].split("\n\n")
        for section in body[:-1] if folded else body:  # each entry one line (its help below when the flags are long)
            lines = section.splitlines()[1:] if not section.startswith("  -") else section.splitlines()
            for before, line in zip([""] + lines, lines):
                assert line.startswith("  -") or len(before.strip()) > 30 and "  " not in before.strip(), (name, line)
    assert folding >= 12  # every command with model or llama.cpp-chain options (all but the store's and quantize)
    sweep = CliRunner().invoke(main, ["sweep", "--help"], terminal_width=80).output
    assert "--ctx" not in sweep and "--dry-multiplier" not in sweep and "--ray" not in sweep and "--model" in sweep
    assert "--top-k" in sweep and "--chat-template" in sweep and "--json-schema" in sweep and "--report" in sweep
    wide = subprocess.run([sys.executable, "-c", "from llamalens.cli import main; main()", "choose", "--help"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"}).stdout  # a wide terminal
    assert "  --option TEXT                  A continuation to score (repeat, at least twice).\n" in wide
    models = CliRunner().invoke(main, ["models", "--help"], terminal_width=80).output
    assert "  --ctx " in models and "  --batch " in models  # its own options (for the estimate), not the shared ones
    for name, flags in {"generate": ("--dry-multiplier", "--mirostat", "--logit-bias", "--ctx", "--gpu-layers"),
                        "next": ("--dry-multiplier", "--samplers", "--min-keep", "--threads"),
                        "fork": ("--ray", "--workers", "--flash-attn"), "score": ("--ray", "--batch")}.items():
        short = CliRunner().invoke(main, [name, "--help"], terminal_width=80).output
        full = CliRunner().invoke(main, [name, "--help-all"], terminal_width=80).output
        assert all(f"  {flag} " in full and f"  {flag} " not in short for flag in flags), name


def test_one_line_option_help():
    from llamalens.commands.options import _one_line

    assert _one_line("Tokens to generate per sample.  [default: 32]", 60) == "Tokens to generate per sample.  [default: 32]"
    long = "Sequences decoded together. Fewer by halves when the memory estimate does not fit.  [default: 32]"
    assert _one_line(long, 60) == "Sequences decoded together.  [default: 32]"
    assert _one_line(long, 30) == "Sequences decoded together."
    assert _one_line("Beam widths for --strategy beam, e.g. 3,5 (num_beams; default 5).", 50) == \
        "Beam widths for --strategy beam, e.g. 3,5"
    assert _one_line("Sequences [default: 32; 1 with --exact]", 20) == "Sequences"
    assert _one_line("A very long description that never ends with a stop at all and goes on", 30) == \
        "A very long description that…"


def _readme_commands() -> set[str]:
    section = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\s+llamalens ([a-z][a-z-]*)", section, flags=re.M))


def test_every_readme_command_exists():
    shown = _readme_commands()
    assert len(shown) >= 10
    missing = shown - set(main.commands)
    assert not missing, f"the README shows commands that do not exist: {missing}"
    unshown = set(main.commands) - shown
    assert not unshown, f"commands missing from the README's Commands section: {unshown}"


def test_design_layout_lists_every_module():
    layout = (ROOT / "docs" / "design.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\s+(llamalens/\S+\.py)", layout, flags=re.M))
    actual = {str(p.relative_to(ROOT)) for p in (ROOT / "llamalens").rglob("*.py") if p.name != "__main__.py"}
    assert actual - listed == set(), f"modules missing from docs/design.md's Layout: {sorted(actual - listed)}"
    assert listed - actual == set(), f"docs/design.md's Layout names modules that do not exist: {sorted(listed - actual)}"


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, imports inside functions included."""
    import ast

    pkg = ROOT / "llamalens"
    names = {}
    for p in pkg.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for name, p in names.items():
        out = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{p}: relative import (the package imports itself by absolute names)"
                out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in out if m in names and m not in (name, "llamalens")}
    return graph


def test_the_import_graph_has_no_circles():
    """The layers import downwards only: no module reaches itself through the package's imports (the package's
    own __init__, the public facade that wires the layers, is left out)."""
    graph = _package_imports()
    assert len(graph) > 40
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, "import circle: " + " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_only_runtime_and_sampler_import_llama_cpp():
    for p in (ROOT / "llamalens").rglob("*.py"):
        text = p.read_text(encoding="utf-8")
        if p.name in ("runtime.py", "sampler.py") or p.relative_to(ROOT).as_posix() == "llamalens/core/lens.py":
            continue  # (core/lens.py reads the graph's tensors during decode, through ggml; it owns no handle)
        assert not re.search(r"^\s*(import llama_cpp|from llama_cpp)", text, flags=re.M), p
        assert "._lib" not in text and "._L" not in text, f"{p} reaches into a native handle"


def test_store_from_version_1_opens(tmp_path):
    """tests/data/store-v1.db was written by llamalens 0.1.0 before the typed records (a 2-prompt x 4-config x
    2-seed sweep on the tiny model); it opens, and show and export give what that version gave."""
    db = tmp_path / "v1.db"
    shutil.copy(DATA / "store-v1.db", db)
    old = json.loads((DATA / "store-v1-show.json").read_text(encoding="utf-8"))
    res = CliRunner().invoke(main, ["show", "v1-run", "--store", str(db), "--json"])
    assert res.exit_code == 0, res.output
    new = json.loads(res.output)
    # 0.1.0 printed the summary through pandas' to_json, which rounds to 10 digits; now every float is exact
    assert len(new["summary"]) == len(old["summary"])
    for a, b in zip(new["summary"], old["summary"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (pytest.approx(b[k], rel=1e-9, abs=1e-10) if isinstance(b[k], float) else b[k]), k
    for key in ("id", "name", "status", "command", "model_hash", "n_samples", "n_done", "noise"):
        assert new["run"][key] == old["run"][key], key
    # options added since (the context options) read as their defaults, which is how 0.1.0 ran
    new_mo, old_mo = new["run"]["options"].pop("model_options"), dict(old["run"]["options"])
    old_mo = old_mo.pop("model_options")
    assert new["run"]["options"] == {k: v for k, v in old["run"]["options"].items() if k != "model_options"}
    assert {k: new_mo[k] for k in old_mo} == old_mo
    assert {k: v for k, v in new_mo.items() if k not in old_mo} == \
        {k: v for k, v in ModelOptions().to_dict().items() if k not in old_mo}
    assert {k: new["run"]["model"][k] for k in old["run"]["model"] if k != "gpu_layers"} == \
        {k: v for k, v in old["run"]["model"].items() if k != "gpu_layers"}
    out = tmp_path / "v1.jsonl"
    res = CliRunner().invoke(main, ["export", "v1-run", "--store", str(db), "--format", "jsonl", "-o", str(out)])
    assert res.exit_code == 0, res.output
    # sha256 of the jsonl export that llamalens 0.1.0 wrote from this store, once each sample's "confidence" (added
    # since: a store of 0.1.0 has no Rényi divergence, so those measures are null) is taken out again
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(d["confidence"]["mean_renyi"] is None and d["confidence"]["seq_logprob"] < 0 for d in lines)
    for d in lines:
        del d["confidence"]
    same = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in lines).encode("utf-8")
    assert hashlib.sha256(same).hexdigest() == "d830b172037d0a2490c2a0715c2d1b07e2f00c78e8d598a89c973d1c4caa6796"


@pytest.mark.parametrize("module", ["llamalens", "llamalens.cli"])
def test_import_is_light(module):
    """`import llamalens` and `llamalens --help` load neither llama.cpp nor matplotlib nor pandas."""
    import subprocess
    import sys

    code = (f"import sys, {module}; heavy = [m for m in ('llama_cpp', 'matplotlib', 'pandas') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_store_kinds_and_extras(tmp_path):
    """A store of 0.1.0 gains the columns added since (its runs read as sweeps); a run of another kind keeps
    its kind, and each sample's extra as planned, then as saved."""
    from llamalens.records import Hardware, RunOptions, Sample, Timing
    from llamalens.settings import SamplingSettings
    from llamalens.store import Store

    db = tmp_path / "v1.db"
    shutil.copy(DATA / "store-v1.db", db)
    store = Store(db)
    assert store.run("v1-run").kind == "sweep"
    assert all(s.extra is None for s in store.samples(store.run("v1-run").id))
    rid = store.create_run(name="k", command="test", model={"name": "none"}, model_hash="", versions={},
                           hardware=Hardware(), options=RunOptions(), configs=[SamplingSettings()],
                           plan=[(0, 0, 1, "a"), (0, 0, 2, "b")], kind="fork", extras=[{"position": 3}, None])
    assert store.run(rid).kind == "fork"
    assert [s.extra for s in store.pending(rid)] == [{"position": 3}, None]
    store.save_sample(rid, 1, Sample("b", [], {}, 1, "x", "length", [], Timing(1, 0, 0.0, 0.0, 0.0)),
                      extra={"outcome": "yes"})
    assert [s.extra for s in store.samples(rid, only_done=False)] == [{"position": 3}, {"outcome": "yes"}]
    store.close()
    assert Store(db).run(rid).kind == "fork"  # reopening an upgraded store changes nothing
    with pytest.raises(ValueError):
        Store(db).create_run(name="k", command="test", model={}, model_hash="", versions={}, hardware=Hardware(),
                             options=RunOptions(), configs=[SamplingSettings()], plan=[(0, 0, 1, "a")], extras=[])
