"""The llama.cpp chain from the command line and the grid: options reach the settings, bad values get one
line naming the range, the context options default to llama-server's with --chain llama.cpp, runs record
them, and each stage does what llama.cpp's does (on the tiny model; tests/test_llama_server.py proves the
chain equal to a real llama-server)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from llamalens.cli import main
from llamalens.core.engine import Engine, Request
from llamalens.errors import InvalidSettings
from llamalens.run.grid import build_configs
from llamalens.core.sampler import Sampler, logit_biases, stage_names
from llamalens.settings import SERVER_CONTEXT, SamplingSettings, server_prompt_pieces


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_generate_takes_every_llama_cpp_option(tiny_path):
    res = _run("generate", "the cat", "-m", tiny_path, "-n", 3, "--json", "--chain", "llama.cpp",
               "--samplers", "penalties;dry;top_k;xtc;temperature", "--min-keep", 1, "--dry-multiplier", 0.8,
               "--dry-base", 2.0, "--dry-allowed-length", 1, "--dry-penalty-last-n", 32,
               "--dry-sequence-breaker", ".", "--dry-sequence-breaker", "!", "--xtc-probability", 0.5,
               "--xtc-threshold", 0.2, "--top-n-sigma", 2.0, "--dynatemp-range", 0.3, "--dynatemp-exponent", 1.5,
               "--mirostat-tau", 4.0, "--mirostat-eta", 0.2, "--adaptive-target", -1, "--adaptive-decay", 0.5,
               "--logit-bias", " the=false", "--logit-bias", "7=2.5", "--ignore-eos", "--seed", 3)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)["settings"]
    assert s["chain"] == "llama.cpp" and s["samplers"] == "penalties;dry;top_k;xtc;temperature"
    assert (s["min_keep"], s["dry_multiplier"], s["dry_base"], s["dry_allowed_length"], s["dry_penalty_last_n"]) == \
        (1, 0.8, 2.0, 1, 32)
    assert s["dry_sequence_breakers"] == [".", "!"]
    assert (s["xtc_probability"], s["xtc_threshold"], s["top_n_sigma"]) == (0.5, 0.2, 2.0)
    assert (s["dynatemp_range"], s["dynatemp_exponent"], s["mirostat_tau"], s["mirostat_eta"]) == (0.3, 1.5, 4.0, 0.2)
    assert (s["adaptive_target"], s["adaptive_decay"], s["ignore_eos"]) == (-1.0, 0.5, True)
    assert s["logit_bias"] == [[" the", -math.inf], [7, 2.5]]
    # the CLI's tokens are the engine's with the same settings (the options reach the chain)
    settings = SamplingSettings.from_dict(s)
    from llamalens.core.runtime import Model
    from llamalens.settings import ModelOptions

    with Model(tiny_path, ModelOptions(**{**SERVER_CONTEXT, "ctx": 2048})) as m:
        ref = next(iter(Engine(m, 1).run([Request("the cat", settings, 3)])))
    assert [t["id"] for t in json.loads(res.stdout)["tokens"]] == [t.id for t in ref.tokens]


@pytest.mark.parametrize("args, says", [
    (["--dry-multiplier", "0.8"], "add --chain llama.cpp"),
    (["--chain", "llama.cpp", "--xtc-probability", "1.5"], "xtc-probability 1.5 is out of range (must be in [0, 1]"),
    (["--chain", "llama.cpp", "--samplers", "top_k;warp"], "unknown stage 'warp'"),
    (["--chain", "llama.cpp", "--dry-base", "0.5"], "dry-base 0.5 is out of range (must be >= 1)"),
    (["--chain", "llama.cpp", "--adaptive-decay", "1"], "adaptive-decay 1.0 is out of range (must be in [0, 0.99])"),
    (["--chain", "llama.cpp", "--logit-bias", "7"], "give TOKEN=BIAS"),
    (["--chain", "llama.cpp", "--logit-bias", "7=lots"], "'lots' is not a number"),
    (["--chain", "llama.cpp", "--mirostat", "3"], "3 is not in the range 0<=x<=2"),
    (["--ubatch", "0"], "--ubatch 0 must be >= 1"),
])
def test_bad_llama_cpp_settings_get_one_line(tiny_path, args, says):
    res = _run("generate", "the cat", "-m", tiny_path, "-n", 1, *args)
    assert res.exit_code != 0
    assert says in res.output and "Traceback" not in res.output, res.output


def test_context_options_follow_the_chain_and_are_recorded(tiny_path, tmp_path):
    store = tmp_path / "runs.db"
    res = _run("sweep", "the cat", "-m", tiny_path, "--store", store, "-n", 2, "--preset", "llama-server",
               "--dry-multiplier", "0,0.8", "--dry-base", "1.75", "--dry-allowed-length", "2",
               "--xtc-probability", "0,0.5", "--xtc-threshold", "0.1", "--top-n-sigma", "-1,1",
               "--dynatemp-range", "0", "--mirostat", "0,2", "--mirostat-tau", "5",
               "--samplers", "top_k;temperature,min_p;temperature", "--name", "server")
    assert res.exit_code == 0, res.output
    assert "swa-full off, repack on, batch 2048, ubatch 512, server-prefill on" in res.output  # show's header
    run = json.loads(_run("show", "server", "--store", store, "--json").stdout)["run"]
    assert {k: run["options"]["model_options"][k] for k in SERVER_CONTEXT} == SERVER_CONTEXT
    assert run["n_samples"] == 2 * 2 * 2 * 2 * 2  # five axes of two values each
    res = _run("sweep", "the cat", "-m", tiny_path, "--store", store, "-n", 2, "--chain", "llama.cpp",
               "--swa-full", "on", "--repack", "off", "--ubatch", 64, "--batch", 128, "--server-prefill", "off",
               "--name", "mine")
    assert res.exit_code == 0, res.output
    mo = json.loads(_run("show", "mine", "--store", store, "--json").stdout)["run"]["options"]["model_options"]
    assert (mo["swa_full"], mo["repack"], mo["ubatch"], mo["batch"], mo["server_prefill"]) == ("on", "off", 64, 128,
                                                                                              "off")
    res = _run("sweep", "the cat", "-m", tiny_path, "--store", store, "-n", 2, "--name", "plain")
    mo = json.loads(_run("show", "plain", "--store", store, "--json").stdout)["run"]["options"]["model_options"]
    assert (mo["swa_full"], mo["batch"], mo["server_prefill"]) == ("on", 512, "off")  # llama-cpp-python's
    res = _run("sweep", "--resume", "plain", "--store", store, "--chain", "llama.cpp")
    assert res.exit_code != 0 and "--chain" in res.output


def test_grid_files_hold_llama_cpp_settings(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('[fixed]\nchain = "llama.cpp"\nlogit_bias = [[" the", -2.0], [5, -inf]]\nignore_eos = true\n'
                    'dry_sequence_breakers = ["\\n"]\n[grid.a]\nmirostat = [0, 2]\nsamplers = ["top_k;temp"]\n')
    configs = build_configs(None, str(grid))
    assert [c.mirostat for c in configs] == [0, 2]
    assert configs[0].logit_bias == ((" the", -2.0), (5, -math.inf)) and configs[0].ignore_eos
    assert stage_names(configs[0], _FakeVocab()) == ["logit_bias", "top_k", "temperature", "dist"]
    assert stage_names(configs[1], _FakeVocab()) == ["logit_bias", "temperature", "mirostat"]
    grid.write_text('[grid.a]\nsamplers = [3]\n')
    with pytest.raises(InvalidSettings, match="not a text"):
        build_configs(None, str(grid))
    grid.write_text('[fixed]\nignore_eos = 1\n[grid.a]\ntop_k = [1]\n')
    with pytest.raises(InvalidSettings, match="ignore_eos is .*not true or false"):
        build_configs(None, str(grid))


class _FakeVocab:
    """Enough of a Model for stage_names (no stage is built)."""

    n_vocab = 10

    def tokenize(self, text, add_bos=False, special=False):
        return [1]

    def eog_tokens(self):
        return [2]

    def suppress_tokens(self):
        return []


def test_stored_settings_come_back_equal():
    s = SamplingSettings(chain="llama.cpp", logit_bias={"7": False, "the": 1}, dry_sequence_breakers=["x"])
    assert SamplingSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.logit_bias == ((7, -math.inf), ("the", 1.0))
    assert "chain" not in SamplingSettings().to_dict()  # llama-cpp-python records read as before


def test_stages_do_what_llama_cpp_says(tiny):
    row = tiny.context(n_ctx=256).prefill(tiny.prompt_tokens("the cat sat"))
    top = int(row.argmax())
    # a ban leaves the token out; ignore_eos bans every EOG token
    s = SamplingSettings(chain="llama.cpp", logit_bias=((top, -math.inf),), ignore_eos=True, top_k=0, top_p=1.0,
                         min_p=0.0)
    assert logit_biases(s, tiny) == [(top, -math.inf)] + [(t, -math.inf) for t in tiny.eog_tokens()]
    with Sampler(s, tiny.n_vocab, upto="logit_bias", model=tiny) as chain:
        surv, _ = chain.apply(row.copy())
    assert math.isinf(surv["logit"][surv["id"] == top][0]) and all(
        math.isinf(surv["logit"][surv["id"] == t][0]) for t in tiny.eog_tokens())
    # temperature 0 keeps only the top token, and dist picks it (no greedy branch in llama.cpp's chain)
    with Sampler(SamplingSettings(chain="llama.cpp", temperature=0.0), tiny.n_vocab, model=tiny) as chain:
        surv, sel = chain.apply(row.copy())
    assert int(surv["id"][sel]) == top
    # top-n-sigma 1: every survivor's logit is within one standard deviation of the top logit
    with Sampler(SamplingSettings(chain="llama.cpp", top_n_sigma=1.0, top_k=0, top_p=1.0, min_p=0.0),
                 tiny.n_vocab, upto="top_n_sigma", model=tiny) as chain:
        surv, _ = chain.apply(row.copy())
    kept = surv["logit"][~(surv["logit"] == -math.inf)]
    assert len(kept) < tiny.n_vocab and kept.min() >= row.max() - row.astype("float64").std() - 1e-4


def test_server_prompt_pieces():
    """llama-server's batches for a prompt on an SWA model (server-context.cpp): the last 4 + ubatch and the
    last 4 tokens on their own, at most n_batch per batch."""
    assert server_prompt_pieces(15, 2048, 512) == [11, 4]
    assert server_prompt_pieces(4, 2048, 512) == [4]
    assert server_prompt_pieces(600, 2048, 512) == [84, 512, 4]
    assert server_prompt_pieces(3000, 2048, 512) == [2048, 436, 512, 4]
    assert sum(server_prompt_pieces(20, 8, 4)) == 20


def test_sampler_view_shows_every_llama_cpp_stage(tiny):
    """The report's sampler section: candidates left after each stage of the llama.cpp chain, in its order,
    each stage's probabilities from the native chain applied up to it."""
    from llamalens.looks.next_token import sampler_view

    cfg = SamplingSettings(chain="llama.cpp", dry_multiplier=0.8, xtc_probability=1.0, xtc_threshold=0.01,
                           top_k=0, top_p=1.0, min_p=0.0, logit_bias=((5, -math.inf),), seed=1)
    view = sampler_view(tiny, "the cat sat on the mat. the cat sat on the", [], [cfg], top=10)
    names = [st.stage for st in view.chains[0].stages]
    assert names == ["raw", "logit_bias", "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p",
                     "xtc", "temperature"]
    left = [st.survivors for st in view.chains[0].stages]
    assert left[0] == tiny.n_vocab and left[1] == tiny.n_vocab - 1  # the ban
    assert all(b <= a for a, b in zip(left[4:], left[5:]))  # truncation never adds tokens
    xtc_before, xtc_after = view.chains[0].stages[8], view.chains[0].stages[9]
    # probability 1: XTC fires and removes every token above the threshold but the least likely of them
    above = [p for p in xtc_before.probs if p >= 0.01]
    assert xtc_after.survivors == xtc_before.survivors - (len(above) - 1) and xtc_after.probs[0] == 0.0


def test_dry_is_built_once_per_model_and_cloned(tiny):
    """DRY scans the vocabulary when built, so each sequence's chain gets a clone of the model's prototype:
    two sequences with the same history penalise the same tokens by the same amounts, and differ from a
    sequence without that history (tests/test_llama_server.py proves the chain equal to llama-server's)."""
    import numpy as np

    s = SamplingSettings(chain="llama.cpp", dry_multiplier=0.8, dry_allowed_length=1, top_k=0, top_p=1.0, min_p=0.0)
    history = tiny.prompt_tokens("the cat sat on the cat sat on the")
    row = tiny.context(n_ctx=256).prefill(history)
    got, before = [], set(tiny.sampler_prototypes)
    for tokens in (history, history, history[:1]):
        with Sampler(s, tiny.n_vocab, upto="dry", model=tiny) as chain:
            for t in tokens:
                chain.accept(t)
            surv, _ = chain.apply(row.copy())
            got.append(surv["logit"][np.argsort(surv["id"])].copy())
    assert len(set(tiny.sampler_prototypes) - before) <= 1  # one prototype for the three chains (or one already there)
    assert np.array_equal(got[0], got[1])
    assert (got[0] < got[2]).any()  # the repeated history is penalised (" cat" after "... on the")
