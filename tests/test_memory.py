"""The memory estimate: its parts against the sizes llama.cpp itself reports when it makes a context,
its total against the measured peak RSS of real runs (within 25%) on the default model and on a larger synthetic
model written with `gguf`, and the refusal before loading (with --force to load anyway)."""

from __future__ import annotations

import json
import re
from collections import deque
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import llamalens.core.runtime as rt
from llamalens.cli import main
from llamalens.modelfiles.gguf_header import read_header
from llamalens.modelfiles.memory import MIB, available_ram, estimate, parse_size
from llamalens.core.runtime import Model
from llamalens.settings import ModelOptions
from tiny_gguf import write_tiny_gguf

TEXT = " ".join(f"The quick brown fox jumps over the lazy dog number {i}." for i in range(45))


@pytest.fixture(scope="module")
def big_path(tmp_path_factory) -> Path:
    """A 266 MB F32 llama model (8 layers × 512, vocabulary 32,000): about 3 s to write."""
    return write_tiny_gguf(tmp_path_factory.mktemp("big") / "big.gguf", n_embd=512, n_layer=8, n_head=8, n_ff=2048,
                           ctx=2048, n_vocab=32000, file_type_tag="big")


@pytest.fixture(scope="module")
def big_q4_path(big_path, tmp_path_factory) -> Path:
    """big_path in Q4_K_M: matrices of 512 and 2,048 columns quantize to Q4_K and Q6_K (repacked on x86)."""
    from llamalens.core.runtime import quantize

    return quantize(big_path, tmp_path_factory.mktemp("big-q4") / "big-q4_k_m.gguf", "Q4_K_M")


def test_repacked_weights_are_what_llama_cpp_repacks(big_q4_path, monkeypatch):
    # llama.cpp logs the size of its CPU_REPACK buffer when it loads a model; the estimate reads it off the header
    monkeypatch.setattr(rt, "LOG_TAIL", deque(maxlen=100_000))
    with Model(big_q4_path, ModelOptions(ctx=512)):
        log = "".join(rt.LOG_TAIL)
    logged = sum(float(x) for x in re.findall(r"CPU_REPACK model buffer size = +([\d.]+) MiB", log))
    est = estimate(read_header(big_q4_path), ModelOptions(ctx=512))
    assert logged > 10 and est.repacked / MIB == pytest.approx(logged, abs=0.1)  # the log rounds to 0.01 MiB
    assert est.peak == est.total + est.repacked
    assert estimate(read_header(big_q4_path), ModelOptions(ctx=512, repack="off")).repacked == 0
    assert estimate(read_header(big_q4_path), ModelOptions(ctx=512, mmap=False)).repacked == 0


def llama_cpp_sizes(model: Model, n_ctx: int, n_batch: int, monkeypatch) -> dict[str, float]:
    """KV cache and compute buffer sizes (MiB) as llama.cpp logs them when it makes this context (the whole log:
    the error-message tail keeps only 40 lines)."""
    monkeypatch.setattr(rt, "LOG_TAIL", deque(maxlen=100_000))
    with model.context(n_ctx, n_batch=n_batch):
        log = "".join(rt.LOG_TAIL)
    kv = sum(float(x) for x in re.findall(r"size = +([\d.]+) MiB \( *\d+ cells", log))
    compute = sum(float(x) for x in re.findall(r"compute buffer size = +([\d.]+) MiB", log))
    return {"kv": kv, "compute": compute}


@pytest.mark.parametrize("which, flash, n_ctx, n_batch", [
    ("gemma", "auto", 2048, 512), ("gemma", "off", 1024, 128), ("tiny", "off", 2048, 512), ("tiny", "on", 512, 512),
])
def test_parts_match_what_llama_cpp_allocates(which, flash, n_ctx, n_batch, gemma_path, tiny_path, monkeypatch):
    """The KV cache exactly (llama.cpp prints MiB with 2 decimals); the compute buffer, a fitted formula, within 15%
    (measured 0.5% to 6.6% off: 525 vs 514.5 MiB on Gemma at batch 512, 1.61 vs 1.51 MiB on the tiny model with
    flash attention; rows = batch, as llama.cpp reserves it). The total's bound (25%, below) is what matters."""
    path = gemma_path if which == "gemma" else tiny_path
    options = ModelOptions(ctx=n_ctx, batch=n_batch, flash_attn=flash)
    with Model(path, options) as m:
        got = llama_cpp_sizes(m, n_ctx, n_batch, monkeypatch)
    est = estimate(read_header(path), options, rows=n_batch, cells=n_ctx)
    assert abs(est.kv / MIB - got["kv"]) <= 0.01 * 2 + 1e-9, (est.kv / MIB, got)
    assert est.compute / MIB == pytest.approx(got["compute"], rel=0.15), (est.compute / MIB, got)


PEAK = """
import sys
from llamalens.cli import main
sys.argv = ["llamalens"] + {args!r}
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print("PEAK", int(hwm.split()[1]) * 1024, file=sys.stderr)
"""


def peak_rss(args: list[str]) -> int:
    """The peak resident memory of `llamalens ARGS` in a fresh process (Linux's VmHWM)."""
    r = subprocess.run([sys.executable, "-c", PEAK.format(args=args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(re.search(r"PEAK (\d+)", r.stderr)[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
@pytest.mark.parametrize("which", ["gemma", "big", "big-q4"])
def test_estimate_within_25_percent_of_peak_rss(which, gemma_path, big_path, big_q4_path, tmp_path):
    """Two real runs per model, each in a fresh process: `next` (one logits row) and `score` of one window of
    exactly 512 tokens (every row's logits), against the estimate's peak (total + the mapped pages of repacked
    weights). Measured on this machine: gemma next 367 MB (estimate 409), gemma score 1,441 MB (1,481); big next
    327 MB (346), big score 464 MB (477); big-q4 next 120 MB (140), big-q4 score 259 MB (270): 3% to 16% off, so
    25% has room. (At 8B the repacked pages are most of the difference: scripts/bench.py --shape, case R.)"""
    path = {"gemma": gemma_path, "big": big_path, "big-q4": big_q4_path}[which]
    with Model(path, ModelOptions(ctx=512)) as m:  # the text cut to 511 tokens (+ BOS = one full window)
        text = b"".join(m.piece(t) for t in m.tokenize(TEXT * 4)[:511]).lstrip()
    file = tmp_path / "text.txt"
    file.write_bytes(text)
    header = read_header(path)
    for args, rows in ((["next", "Hello", "--top", "3"], 1), (["score", "--file", str(file), "--raw-bytes"], 512)):
        r = CliRunner().invoke(main, ["models", str(path), "--json", "--ctx", "512"])
        est = json.loads(r.stdout)["memory_estimate"]
        assert est == {**estimate(header, ModelOptions(ctx=512), weights=est["weights"]).to_dict(),
                       "available": est["available"], "fits": est["fits"]}
        rows_est = estimate(header, ModelOptions(ctx=512), rows=rows, weights=est["weights"])
        measured = peak_rss(args + ["-m", str(path), "--ctx", "512", "--batch", "512"])
        assert rows_est.peak == pytest.approx(measured, rel=0.25), (args[0], rows_est.peak / 1e6, measured / 1e6)


def test_refused_before_loading_with_the_numbers(gemma_path, monkeypatch):
    monkeypatch.setenv("LLAMALENS_MEMORY_LIMIT", "100M")
    r = CliRunner().invoke(main, ["next", "Hello", "--ctx", "4096"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "loading" not in r.output  # refused before llama.cpp opened the file
    msg = r.output
    assert re.search(r"needs about [\d.]+ MiB of RAM \(weights [\d.]+ MiB \+ KV cache [\d.]+ MiB .* but 100.0 MiB is available",
                     msg), msg
    assert "--force" in msg and "smaller quantization" in msg
    r = CliRunner().invoke(main, ["next", "Hello", "--ctx", "4096", "--force", "--top", "2"])
    assert r.exit_code == 0, r.output


def test_refusal_names_the_fixes_for_a_big_context(tiny_path, monkeypatch):
    """A sweep whose KV cache (16 sequences × 8,010 cells) and attention scratch outgrow the RAM available: the
    message names --ctx and the sequences. (The available RAM is capped, so that the refusal does not depend on
    this machine's memory; the tiny model keeps the run short should the check ever let it through.)"""
    monkeypatch.setenv("LLAMALENS_MEMORY_LIMIT", "100M")
    r = CliRunner().invoke(main, ["sweep", "the cat", "-m", str(tiny_path), "--ctx", "8192", "--max-tokens", "8000",
                                  "--parallel", "16", "--seeds", "16"])
    assert r.exit_code == 1, r.output
    assert "a smaller --ctx (now 8192" in r.output and "fewer parallel sequences (now 16)" in r.output


def test_models_fit_and_json(gemma_path, tiny_path, monkeypatch):
    monkeypatch.setenv("LLAMALENS_MODELS", str(Path(tiny_path).parent))
    r = CliRunner().invoke(main, ["models", "--fit"])
    assert r.exit_code == 0, r.output
    assert re.search(r"gemma-3-270m-q4_k_m \(default\).* [\d.]+ MiB +yes", r.output), r.output
    assert "estimated for --ctx 2048 --batch 512, 1 sequence(s)" in r.output
    r = CliRunner().invoke(main, ["models", "default", "--json", "--parallel", "4"])
    est = json.loads(r.stdout)["memory_estimate"]
    assert est["total"] == sum(est[k] for k in ("weights", "kv", "outputs", "compute", "runtime"))
    assert est["sequences"] == 4 and est["kv_cells"] == 4 * 2048 and est["fits"] is True
    r = CliRunner().invoke(main, ["models", "tiny"])
    assert "memory" in r.output and "fits" in r.output


def test_memory_limit_and_available():
    assert parse_size("8G") == 8 << 30 and parse_size("512M") == 512 << 20 and parse_size("1.5GB") == 3 << 29
    assert available_ram() > 0


def test_python_api_checks_too(tiny_path, monkeypatch):
    import llamalens as ll
    from llamalens.modelfiles.memory import ModelTooBig

    monkeypatch.setenv("LLAMALENS_MEMORY_LIMIT", "10M")
    with pytest.raises(ModelTooBig, match="but 10.0 MiB is available"):
        ll.load_model(str(tiny_path))
    with ll.load_model(str(tiny_path), force=True) as m:
        assert m.describe()["memory_estimate"]["fits"] is False and m.options.force


def test_laptop_table_is_the_largest_context_that_fits(gemma_path):
    from llamalens.modelfiles.memory import LAPTOP_CONTEXTS, laptops

    header, options = read_header(gemma_path), ModelOptions()
    rows = laptops(header, options)
    assert [r["ram_gb"] for r in rows] == [8, 16, 32]
    trained = header.arch_key("context_length")
    for r in rows:
        assert r["usable"] == r["ram_gb"] * 3 * 2**28  # three quarters of the RAM
        for n, ctx in r["contexts"].items():
            fits = lambda c, n=n, r=r: estimate(header, ModelOptions(ctx=c), sequences=n, available=r["usable"]).fits  # noqa: E731
            assert ctx is not None and fits(ctx)  # the 270M model fits everywhere at 2,048
            bigger = [c for c in LAPTOP_CONTEXTS if ctx < c <= trained]
            assert not bigger or not fits(bigger[0])
    # more RAM never shrinks what fits, more sequences never grow it
    for n in (1, 8, 32):
        assert [r["contexts"][n] for r in rows] == sorted(r["contexts"][n] for r in rows)
    assert rows[0]["contexts"][32] < rows[0]["contexts"][1] == trained
    r = CliRunner().invoke(main, ["models", str(gemma_path)])
    assert r.exit_code == 0 and "laptops: the largest --ctx" in r.output and "32 sequences" in r.output
    out = json.loads(CliRunner().invoke(main, ["models", str(gemma_path), "--json"]).output)
    assert out["laptops"][2]["contexts"]["1"] == trained


def test_a_sweep_without_parallel_takes_as_many_sequences_as_fit(tiny_path, tmp_path, monkeypatch):
    # the limit lies between the estimates of 16 and 32 sequences (each 2 + 3 + 8 KV cells: prompt, BOS/EOS, tokens)
    header, per_seq = read_header(tiny_path), len("hi") + 3 + 8
    need = {n: estimate(header, ModelOptions(), sequences=n, cells=n * per_seq, available=None).total for n in (16, 32)}
    assert need[16] < need[32]
    monkeypatch.setenv("LLAMALENS_MEMORY_LIMIT", str((need[16] + need[32]) // 2))
    args = ["sweep", "hi", "--seeds", "32", "-n", "8", "--model", str(tiny_path), "--json"]
    r = CliRunner().invoke(main, args + ["--store", str(tmp_path / "a.db")])
    assert r.exit_code == 0, r.output
    assert "note: 16 sequences a batch instead of 32" in r.stderr and "pass --parallel to choose" in r.stderr
    assert json.loads(r.stdout)["run"]["options"]["parallel"] == 16
    r = CliRunner().invoke(main, args + ["--parallel", "32", "--store", str(tmp_path / "b.db")])
    assert r.exit_code == 1 and "fewer parallel sequences (now 32)" in r.output
