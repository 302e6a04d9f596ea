"""The README runs: every command line it shows (the main job and the Commands section) exits 0, and its
Python examples run, on the tiny model (named by $LLAMALENS_MODEL, the README's own default-model
mechanism) with the files the examples name made here; and every option of every command is exercised by
some test."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamalens.cli import main
from tiny_gguf import WORDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def readme_command_lines() -> list[str]:
    """The main job of the set-up, then every `llamalens ...` line of the Commands section (comments cut)."""
    setup = _section("Set-up (two commands on a fresh machine)")
    main_job = re.search(r"&& \.venv/bin/(llamalens sweep .+)$", setup, flags=re.M).group(1)
    lines = [main_job]
    for line in _section("Commands").splitlines():
        line = line.strip()
        if line.startswith("llamalens ") and not line.startswith("llamalens serve"):  # a server runs until stopped:
            lines.append(re.sub(r"\s+#.*$", "", line))                               # tests/test_serve.py starts one
    return lines


def _expand(line: str) -> list[list[str]]:
    """Split a line as a shell would; `a|b|c` written for a choice becomes one command per choice."""
    args = shlex.split(line)[1:]
    for i, a in enumerate(args):
        if "|" in a and not a.startswith("-"):
            return [args[:i] + [choice] + args[i + 1:] for choice in a.split("|")]
    return [args]


@pytest.fixture()
def readme_dir(tmp_path, tiny_path, monkeypatch):
    """A folder holding every file the README's examples name, with the tiny model as the default model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLAMALENS_MODEL", str(tiny_path))
    words = " ".join(w.replace("▁", "") for w in WORDS if w.strip("▁"))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "the cat"}\n{"prompt": "hello"}\n')
    (tmp_path / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "the cat"}]}\n')
    (tmp_path / "yesno.gbnf").write_text('root ::= (" yes" | " no") "."\n')
    (tmp_path / "person.json").write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, '
                                          '"required": ["ok"]}')
    (tmp_path / "grids.toml").write_text("[fixed]\nmin_p = 0.0\n[grid.focused]\ntemperature = [0.0, 0.3]\n"
                                         "top_k = [10]\n[grid.open]\ntemperature = [0.7]\n")
    (tmp_path / "wiki.test.raw").write_text((words + " ") * 40)
    (tmp_path / "text.txt").write_text(words)
    (tmp_path / "terms.txt").write_text("apple\nbanana\nking\nqueen\n")
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "finance_terms.tsv", tmp_path / "examples")
    shutil.copy(ROOT / "examples" / "calibration.jsonl", tmp_path / "examples")
    for name in ("model-q8_0.gguf", "model-q4_k_m.gguf", "model-q2_k.gguf"):
        shutil.copy(tiny_path, tmp_path / name)
    return tmp_path


def test_every_readme_command_line_runs(readme_dir):
    from llamalens.settings import SamplingSettings
    from llamalens.store import Store
    from llamalens.run.sweep import SweepSpec, start_sweep

    lines = readme_command_lines()
    assert len(lines) >= 25
    ran = 0
    for line in lines:
        for args in _expand(line):
            if args[:2] == ["sweep", "--resume"]:  # RUN: a planned run that was never finished
                from llamalens.modelfiles.find import resolve_model
                from llamalens.core.runtime import Model

                with Model(resolve_model(None)) as m:
                    rid = start_sweep(m, Store(), SweepSpec(["the cat"], [SamplingSettings()], [0, 1], 4))
                args = [str(rid) if a == "RUN" else a for a in args]
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 0, f"README line failed: llamalens {shlex.join(args)}\n{res.output[-2000:]}"
            ran += 1
    assert ran >= 28
    for made in ("report.html", "softmax.html", "tales.html", "hi.html", "drift.html", "terms.html", "tokens.csv"):
        assert (readme_dir / made).stat().st_size > 0, made


def test_readme_python_examples_run(readme_dir, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    scope: dict = {}
    for block in blocks:  # the blocks build on each other, as in a notebook
        exec(compile(block, "README.md", "exec"), scope)
    out = capsys.readouterr().out
    assert out.count("\n") > 20


# -- every option of every command is exercised by a test ---------------------------------------------------
def _tests_text() -> str:
    here = Path(__file__).resolve()
    return "\n".join(p.read_text(encoding="utf-8") for p in here.parent.glob("test_*.py") if p != here)


def test_every_option_is_exercised_by_some_test():
    """Each option of each command appears in a test file (the flag as an argument): the README's own command lines
    do not count, as they only check that a line runs."""
    text = _tests_text()
    missing = []
    for name, command in main.commands.items():
        for param in command.params:
            if param.param_type_name != "option":
                continue
            flags = param.opts + param.secondary_opts
            if not any(re.search(rf"[\"' ]{re.escape(f)}[\"' =]", text) for f in flags):
                missing.append(f"{name} {flags[0]}")
    assert not missing, f"options no test uses: {missing}"
