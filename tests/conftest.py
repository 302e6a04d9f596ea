"""Shared fixtures: a tiny GGUF written by the `gguf` package, the embedded default model, and the
external tools some tests compare with (headless Chromium, llama.cpp's own binaries).

A missing tool skips its tests on a developer's machine, and fails them in CI (CI=true): CI must run
every test, and a run with any skipped test fails there.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

from tiny_gguf import write_tiny_gguf


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent


def require(found, what: str, how: str):
    """`found` when it is there; otherwise skip (a developer's run) or fail (CI)."""
    if found:
        return found
    if IN_CI:
        pytest.fail(f"{what} is missing, and CI runs every test: {how}")
    pytest.skip(f"{what} is missing ({how})")


def llama_tool(name: str) -> str | None:
    """A llama.cpp tool built by scripts/build_llama_tools.sh (or named by $LLAMA_<NAME>, or on PATH)."""
    env = os.environ.get(name.upper().replace("-", "_"))
    local = ROOT / ".tools" / "bin" / name
    return env or (str(local) if local.exists() else shutil.which(name))


@pytest.fixture(params=["C kernel", "numpy"])
def row_kernel(request, monkeypatch):
    """Row statistics and dist_select through llamalens' C kernel (required in CI: setup.py builds it) and through
    their numpy passes."""
    import llamalens.core.kernels as kernels

    if request.param == "C kernel":
        require(kernels.LIB, "llamalens' C kernel (llamalens/core/_kernels.c)",
                "pip install -e . builds it with the C compiler; it needs an x86-64 CPU with AVX2 and FMA")
    else:
        monkeypatch.setattr(kernels, "LIB", None)
    return request.param


@pytest.fixture(scope="session")
def llama_perplexity() -> str:
    return require(llama_tool("llama-perplexity"), "llama.cpp's llama-perplexity",
                   "scripts/build_llama_tools.sh builds it (scripts/install.sh --test runs that)")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    from browser import chromium

    return require(chromium(), "headless Chromium", "scripts/install.sh --test installs Debian's chromium")


# Tests that use these load the 262k-vocabulary default model, start a server, a Ray cluster or a browser, or run
# notebooks: the slow tier. `pytest -m "not slow"` runs the rest, on the tiny GGUFs, in under two minutes.
SLOW_FIXTURES = {"gemma", "gemma_path", "gemma_llama", "gemma_q8_path", "gemma_q2_path", "gemma_server", "gemma_server_ctx",
                 "bat_run", "finance", "ray_session", "chromium_path", "llama_perplexity", "tiny_server", "serve_app",
                 "tiny_server_ctx", "gemma_q4_0_path"}
SLOW_FIXTURES |= {"llama_speculative"}


# tiny-model tests that run dozens of commands (measured 20-100 s each on 2 cores): also the slow tier
SLOW_TESTS = {"test_every_readme_command_line_runs", "test_cli_table_query_json", "test_report_size_limit",
              "test_a_server_killed_mid_generation_keeps_every_finished_branch"}
# processes racing or killed and resumed (10-30 s each on 2 cores), and tests of what a command does with no --model
# (the default model): also the slow tier
SLOW_TESTS |= {"test_kill_9_then_resume_via_cli", "test_processes_opening_one_new_store_at_once",
               "test_generate_table_on_default_model", "test_tokenize_default_model_table",
               "test_cli_bad_input_on_the_default_model"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.originalname in SLOW_TESTS
                or "[gemma" in item.name):  # a test parametrized over the default model
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    """In CI a skipped test is a failure: a green run must have run everything."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if IN_CI and skipped and session.exitstatus == 0:
        reporter.write_line(f"CI: {skipped} test(s) skipped; every test must run in CI", red=True)
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the user's models, store or default-model override."""
    monkeypatch.delenv("LLAMALENS_MODEL", raising=False)
    monkeypatch.setenv("LLAMALENS_MODELS", str(tmp_path / "no-models-here"))
    monkeypatch.setenv("LLAMALENS_STORE", str(tmp_path / "runs.db"))
    monkeypatch.setenv("LLAMALENS_STORES", "none")  # nor Ollama's, LM Studio's, HF's or llama.cpp's models


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny(tiny_path):
    from llamalens.core.runtime import Model, ModelOptions

    with Model(tiny_path, ModelOptions(ctx=256, flash_attn="off")) as m:
        yield m


TASKS = Path(__file__).resolve().parent / "data" / "eval_tasks"  # the offline lm-eval tasks of test_eval*


@pytest.fixture
def in_tasks(monkeypatch, tmp_path):
    """Run from the task folder (relative data_files), with `datasets`' cache in a temporary folder."""
    monkeypatch.chdir(TASKS)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    return TASKS


@pytest.fixture(scope="session")
def gemma_path():
    from llamalens.modelfiles.find import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma(gemma_path):
    """The default model with flash attention off, as llama_cpp.Llama() makes its context."""
    from llamalens.core.runtime import Model, ModelOptions

    with Model(gemma_path, ModelOptions(ctx=512, flash_attn="off")) as m:
        yield m


@pytest.fixture(scope="session")
def gemma_llama(gemma_path):
    """llama-cpp-python's own high-level object on the default model: the reference."""
    from llama_cpp import Llama

    return Llama(str(gemma_path), logits_all=True, n_ctx=512, verbose=False, flash_attn=False,
                 n_threads=os.cpu_count(), n_threads_batch=os.cpu_count())


@pytest.fixture(scope="session")
def gemma_q8_path(gemma_path, tmp_path_factory):
    """A Q8_0 copy of the default model (llama.cpp's quantizer through runtime.quantize, about a second): batch-invariant on CPU
    with flash attention on (../shared/NOTES.md §6)."""
    from llamalens.core.runtime import quantize

    out = tmp_path_factory.mktemp("q8") / "gemma-3-270m-q8_0.gguf"
    quantize(gemma_path, out, "Q8_0")
    return out


@functools.cache
def _default_model_file() -> Path:
    """Where the default model's file is (found once: assembling it checks its 250 MB's sha256, 0.2 s a call)."""
    from llamalens.modelfiles.find import default_model_path

    return default_model_path().resolve()


@pytest.fixture(autouse=True)
def _fast_tier_stays_tiny(request, monkeypatch):
    """A test of the fast tier (not marked slow) that loads the default model in this process fails, naming the
    fix: the fast tier runs on the tiny GGUFs only."""
    if request.node.get_closest_marker("slow"):
        return
    from llamalens.core import runtime

    big = _default_model_file()
    init = runtime.Model.__init__

    def only_tiny(self, path, *args, **kwargs):
        if Path(path).resolve() == big:
            pytest.fail("this test loads the default model: give it the tiny model (tiny_path), or list it in "
                        "SLOW_TESTS (tests/conftest.py)")
        init(self, path, *args, **kwargs)

    monkeypatch.setattr(runtime.Model, "__init__", only_tiny)
@pytest.fixture(scope="session")
def gemma_q4_0_path(gemma_path, tmp_path_factory):
    """A Q4_0 copy of the default model (llama.cpp's quantizer, about a second): a lower rung of a ladder."""
    from llamalens.core.runtime import quantize

    out = tmp_path_factory.mktemp("q4_0") / "gemma-3-270m-q4_0.gguf"
    quantize(gemma_path, out, "Q4_0")
    return out

