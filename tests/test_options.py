"""Every documented option does what its help says: each test runs a command with the option and checks its
effect against a reference computed here (the tiny model; numpy for the numbers)."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from llamalens.store import Store
from clirun import cli


def js(*args):
    return json.loads(cli(*args, "--json").stdout)


def test_tokenize_bos(tiny_path, tiny):
    plain = js("tokenize", "the cat", "--model", tiny_path)
    with_bos = js("tokenize", "the cat", "--model", tiny_path, "--bos")
    assert with_bos["count"] == plain["count"] + 1 and with_bos["tokens"][0]["id"] == tiny.bos
    assert [t["id"] for t in with_bos["tokens"][1:]] == [t["id"] for t in plain["tokens"]]


@pytest.mark.parametrize("command", [["tokenize", "the cat"], ["next", "the cat"], ["generate", "the cat", "-n", "4"],
                                     ["score", "the cat sat on the mat"], ["choose", "the cat", "--option", "sat",
                                                                           "--option", "ran"],
                                     ["embed", "cat", "dog"]])
def test_gpu_layers_on_a_cpu_build_changes_nothing(tiny_path, command):
    """--gpu-layers -1 (all) on a CPU-only build: the same numbers as 0 (llama.cpp keeps the layers on the CPU)."""
    base = js(*command, "--model", tiny_path, "--flash-attn", "off")
    offload = js(*command, "--model", tiny_path, "--flash-attn", "off", "--gpu-layers", -1)
    def numbers(d):  # what the model computed, without clocks and the model's description
        if isinstance(d, dict):
            return {k: numbers(v) for k, v in d.items() if k not in ("seconds", "timing", "tokens_per_s", "model")}
        return [numbers(v) for v in d] if isinstance(d, list) else d

    assert numbers(offload) == numbers(base)


def test_sweep_and_compare_take_gpu_layers(tiny_path, tmp_path):
    db = tmp_path / "g.db"
    cli("sweep", "the cat", "--model", tiny_path, "-n", 3, "--gpu-layers", -1, "--store", db)
    assert Store(db).run(1).hardware.gpu_layers == -1
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_path.read_bytes())
    d = js("compare", "the cat sat on the mat", "-m", tiny_path, "-m", copy, "--gpu-layers", -1)
    assert d["summary"]["kld_max"] == 0.0


def _greedy(tiny_path, *extra, n=40):
    return js("generate", "the cat", "--model", tiny_path, "-t", 0, "-n", n, *extra)


@pytest.mark.parametrize("flag", ["--presence-penalty", "--frequency-penalty"])
def test_penalties_stop_repeats(tiny_path, flag):
    """A large penalty on tokens already generated: greedy decoding never picks one again (within the window)."""
    free = [t["id"] for t in _greedy(tiny_path)["tokens"]]
    assert max(Counter(free).values()) > 1  # without it the tiny model repeats itself
    punished = [t["id"] for t in _greedy(tiny_path, flag, 50)["tokens"]]
    assert max(Counter(punished).values()) == 1, punished


def test_generate_and_sweep_stop(tiny_path, tmp_path):
    base = _greedy(tiny_path)
    text = base["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip() and text.find(stop) > 0
    cut = _greedy(tiny_path, "--stop", stop)
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.find(stop)]
    db = tmp_path / "stop.db"
    cli("sweep", "the cat", "--model", tiny_path, "-t", 0, "-n", 40, "--stop", stop, "--store", db)
    (s,) = Store(db).samples(1)
    assert s.finish_reason == "stop" and s.text == text[: text.find(stop)]


def test_report_sample_and_position(tiny_path, tiny, tmp_path):
    db = tmp_path / "r.db"
    cli("sweep", "the cat", "--model", tiny_path, "-t", "0.5,1.5", "--seeds", 2, "-n", 6, "--store", db)
    out = tmp_path / "r.html"
    cli("report", 1, "--output", out, "--sample", 2, "--position", 3, "--store", db, "--metric", "mean_entropy")
    page = out.read_text(encoding="utf-8")
    assert "Position 3 of sample #2" in page and "mean entropy over temperature" in page
    assert "--sample 9" in cli("report", 1, "-o", out, "--sample", 9, "--store", db, ok=False).output


def test_choose_normalize_byte_no_space_json(tiny_path):
    d = js("choose", "the cat", "--option", "sat", "--option", "on the mat", "--model", tiny_path,
           "--normalize", "byte")
    for o in d["options"]:
        assert o["score"] == pytest.approx(o["logprob"] / o["bytes"], rel=1e-12)
    assert [o["score"] for o in d["options"]] == sorted((o["score"] for o in d["options"]), reverse=True)
    spaced = js("choose", "the cat", "--option", "sat", "--option", "ran", "--model", tiny_path)
    joined = js("choose", "the cat", "--option", "sat", "--option", "ran", "--model", tiny_path, "--no-space")
    assert {o["continuation"] for o in spaced["options"]} == {" sat", " ran"}
    assert {o["continuation"] for o in joined["options"]} == {"sat", "ran"}


def test_embed_pairs(tiny_path):
    out = cli("embed", "cat", "dog", "mat", "hello", "--model", tiny_path, "--pairs", 2).stdout
    section = out.split("the 2 most similar pairs:")[1].strip().splitlines()
    assert len(section) == 2 + 2  # header, rule, two pairs
    assert "most similar pairs" not in cli("embed", "cat", "dog", "mat", "--model", tiny_path, "--pairs", 0).stdout


def test_score_logprobs_all_batch(tiny_path):
    text = "the cat sat on the mat and the dog sat on the cat " * 12
    d = js("score", text, "--model", tiny_path, "--logprobs", 2, "--flash-attn", "off")
    assert all(len(t["top"]) == 2 for t in d["tokens"]) and len(d["tokens"]) > 100
    every = cli("score", text, "--model", tiny_path, "--all").stdout
    assert "most surprising" not in every and len(every.splitlines()) > len(d["tokens"])
    some = cli("score", text, "--model", tiny_path).stdout
    assert "the 15 most surprising of" in some
    small = js("score", text, "--model", tiny_path, "--batch", 7, "--flash-attn", "off")
    # --batch changes how the windows are cut into decode calls, not what is scored (float32 tiny: same numbers)
    assert [t["id"] for t in small["tokens"]] == [t["id"] for t in d["tokens"]]
    assert np.allclose([t["logprob"] for t in small["tokens"]], [t["logprob"] for t in d["tokens"]], atol=1e-4)


def test_compare_file_top_report(tiny_path, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the cat sat on the mat. hello world, the dog ran.")
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_path.read_bytes())
    out = tmp_path / "c.html"
    res = cli("compare", "--file", f, "-m", tiny_path, "-m", copy, "--top", 3, "--report", out)
    assert "the 3 positions where it drifts most from the base" in res.stdout
    assert "<title>llamalens compare: 1 model against" in out.read_text(encoding="utf-8")


def test_sweep_preset_grid_seed_list_exact(tiny_path, tmp_path):
    from llamalens.run.grid import PRESETS

    db = tmp_path / "p.db"
    cli("sweep", "the cat", "--model", tiny_path, "--preset", "balanced", "--seed", "5,9", "-n", 3, "--exact",
        "--store", db)
    run = Store(db).run(1)
    (cfg,) = Store(db).configs(1)
    assert {k: getattr(cfg, k) for k in PRESETS["balanced"]} == PRESETS["balanced"]
    assert run.options.seeds == (5, 9) and run.options.exact and run.options.parallel == 1
    assert sorted(s.seed for s in Store(db).samples(1)) == [5, 9]
    grid = tmp_path / "g.toml"
    grid.write_text("[grid.a]\ntemperature = [0.2, 0.4]\n[grid.b]\ntop_k = [3]\nfixed = { temperature = 0.9 }\n")
    cli("sweep", "the cat", "--model", tiny_path, "--grid", grid, "-n", 2, "--store", db)
    got = [(c.temperature, c.top_k) for c in Store(db).configs(2)]
    assert got == [(0.2, 40), (0.4, 40), (0.9, 3)]
    cli("sweep", "the cat", "--model", tiny_path, "--grid", f"{grid}:b", "-n", 2, "--store", db)
    assert [(c.temperature, c.top_k) for c in Store(db).configs(3)] == [(0.9, 3)]
    assert "balanced" in cli("presets").stdout


def test_resume_refuses_another_model_file(tiny_path, tmp_path):
    from tiny_gguf import write_tiny_gguf

    from llamalens.core.runtime import Model
    from llamalens.settings import SamplingSettings
    from llamalens.run.sweep import SweepSpec, start_sweep

    db = tmp_path / "m.db"
    with Model(tiny_path) as m:
        start_sweep(m, Store(db), SweepSpec(["the cat"], [SamplingSettings()], [0], 3))
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=3)
    res = cli("sweep", "--resume", 1, "--model", other, "--store", db, ok=False)
    assert res.exit_code == 1 and "is not the model of run 1" in res.output
    info = Store(db).run(1)
    assert info.model.path == str(tiny_path) and len(info.model_hash) == 64 and info.versions["llamalens"]
    assert info.hardware.threads and info.command == ""


def test_next_table_and_min_p_axis(tiny_path, tiny):
    table = cli("next", "the cat", "--model", tiny_path, "--top", 4, "--flash-attn", "off").stdout
    d = js("next", "the cat", "--model", tiny_path, "--top", 4, "--flash-attn", "off")
    for a in d["top"]:
        assert f"{a['prob']:.4f}" in table and f"{a['logprob']:.4f}" in table
    view = js("next", "the cat", "--model", tiny_path, "--top", 30, "--min-p", "0.5", "--flash-attn", "off")
    raw = np.exp([a["logprob"] for a in view["top"]])
    (chain,) = view["chains"]
    keep = raw >= 0.5 * raw.max()  # min_p keeps tokens with p >= min_p * p_max
    assert chain["stages"][-1]["survivors"] == keep.sum()
    want = np.where(keep, raw / raw[keep].sum(), 0.0)
    assert np.allclose(chain["stages"][-1]["probs"], want, atol=1e-6)


def test_flash_attn_on_and_batch_are_recorded(tiny_path, tmp_path):
    db = tmp_path / "f.db"
    cli("sweep", "the cat", "--model", tiny_path, "-n", 3, "--flash-attn", "on", "--batch", 64, "--store", db)
    run = Store(db).run(1)
    assert run.hardware.flash_attn == "on" and run.options.model_options.batch == 64
    assert run.options.model_options.flash_attn == "on"


def test_show_metrics_equal_the_exported_tokens(tiny_path, tmp_path):
    """Each metric `show` prints, recomputed here with pandas from the exported token table."""
    db = tmp_path / "s.db"
    cli("sweep", "the cat", "hello", "--model", tiny_path, "-t", "0,1.2", "--top-k", "3,0", "--seeds", 3, "-n", 8,
        "--store", db)
    csv = tmp_path / "t.csv"
    cli("export", 1, "--format", "csv", "--output", csv, "--store", db)
    tokens = pd.read_csv(csv, dtype={"bytes": str}, keep_default_na=False)
    summary = {r["config_idx"]: r for r in js("show", 1, "--store", db)["summary"]}
    for ci, g in tokens[~tokens.eog].groupby("config_idx"):
        s = summary[ci]
        assert s["mean_logprob"] == pytest.approx(g.logprob.mean(), rel=1e-12)
        assert s["perplexity"] == pytest.approx(math.exp(-g.logprob.mean()), rel=1e-12)
        assert s["mean_entropy"] == pytest.approx(g.entropy.mean(), rel=1e-12)
        assert s["mean_candidates"] == pytest.approx(g.candidates.mean(), rel=1e-12)
        assert s["mean_rank"] == pytest.approx(g["rank"].mean(), rel=1e-12)
        seqs = [grp.sort_values("position").token_id.tolist() for _, grp in g.groupby("sample_idx")]
        bigrams = [b for q in seqs for b in zip(q, q[1:])]
        assert s["distinct_2"] == pytest.approx(len(set(bigrams)) / len(bigrams), rel=1e-12)
        texts = tokens[tokens.config_idx == ci].groupby(["prompt_idx", "sample_idx"]).bytes.sum()
        distinct = texts.groupby("prompt_idx").nunique().mean()
        assert s["distinct_completions"] == pytest.approx(distinct, rel=1e-12)
