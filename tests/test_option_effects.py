"""Each option that changes numbers has its effect, checked against references outside llamalens: llama-cpp-python's
own logits, sampling and embeddings (log-softmax and cosines in plain numpy, tests/reference.py), the schema's own
validator, and llama-server started with the same context options. The report pages are read back (their HTML
tables) and must show the --json numbers.

Flash attention is off on both sides throughout (llama-cpp-python's Llama() default), so that the two evaluate the
same kernels; each tolerance says what was measured."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from clirun import cli
from reference import kl_divergence, log_softmax
from llamalens.settings import SamplingSettings

# one thread: the tests run on shared cores, where two spinning OpenMP threads wait on each other
OFF = ("--flash-attn", "off", "--threads", 1)
# measured on the tiny model (F32): llamalens' logprobs against log-softmax of llama-cpp-python's logits over one full
# evaluation of prompt + tokens differ by up to 2.2e-4 in a batched sweep and 3.9e-5 with --exact (other batch
# shapes: float sums in another order): bound 2.5e-3
LP_TOL = 2.5e-3


@pytest.fixture(scope="module")
def ref_llama(tiny_path):
    from llama_cpp import Llama

    return Llama(str(tiny_path), logits_all=True, n_ctx=256, verbose=False, flash_attn=False)


def ref_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=True, special=False)


def ref_rows(llm, ids: list[int]) -> np.ndarray:
    """Log-softmax of llama-cpp-python's raw logits after each of `ids` (one evaluation, every row)."""
    llm.reset()
    llm.eval(ids)
    return log_softmax(np.array(llm.scores[: len(ids)]))


def ref_completion(llm, prompt: str, s: SamplingSettings, n: int) -> tuple[list[int], str]:
    """llama-cpp-python's own sampling of `n` tokens (its create_completion, the same seed and settings): the ids
    it evaluated after the prompt (every sampled token but its last), and its finish reason."""
    out = llm.create_completion(prompt, max_tokens=n, seed=s.seed, temperature=s.temperature, top_k=s.top_k,
                                top_p=s.top_p, min_p=s.min_p, typical_p=s.typical_p,
                                repeat_penalty=s.repeat_penalty, logprobs=1)
    n_prompt = len(ref_ids(llm, prompt))
    return [int(i) for i in llm._input_ids[n_prompt:]], out["choices"][0]["finish_reason"]


def check_sample(llm, prompt: str, got_ids: list[int], got_lps: list[float], s: SamplingSettings | None) -> float:
    """A stored sample against llama-cpp-python: its tokens are what llama-cpp-python samples with the same settings
    and seed (when `s` is given), and each token's logprob is log-softmax of llama-cpp-python's logits after the
    prompt and the tokens before it. Returns the largest logprob difference."""
    p_ids = ref_ids(llm, prompt)
    if s is not None:
        want, _ = ref_completion(llm, prompt, s, len(got_ids))
        # llama-cpp-python keeps the tokens it evaluated: every sampled token but its last; it runs past max_tokens
        # while a UTF-8 character is open (llamalens stops at max_tokens)
        n = min(len(want), len(got_ids))
        assert got_ids[:n] == want[:n] and len(want) >= len(got_ids) - 1, (prompt, s.label())
    text_ids = [t for t in got_ids if t not in (2,)]  # the tiny GGUF's EOS ends a sample without a row after it
    rows = ref_rows(llm, p_ids + text_ids)
    worst = 0.0
    for i, (t, lp) in enumerate(zip(got_ids, got_lps)):
        worst = max(worst, abs(lp - rows[len(p_ids) - 1 + i][t]))
    assert worst < LP_TOL, (prompt, worst)
    return worst


# -- sweep --prompts-file, --preset, --json-schema -------------------------------------------------------------
def _stored(db, run_id=1):
    from llamalens.store import Store

    store = Store(str(db))
    toks = store.tokens_by_sample(run_id)
    return store, [(s, [t.id for t in toks.get(s.sample_idx, [])], [t.logprob for t in toks.get(s.sample_idx, [])])
                   for s in store.samples(run_id)]


def test_sweep_prompts_file_runs_each_prompt_as_llama_cpp_python_does(tiny_path, ref_llama, tmp_path):
    """Each prompt of a .jsonl and a .txt prompts file is run (in the file's order, after the command line's), and
    its samples are llama-cpp-python's on that prompt: greedy and seeded tokens, logprobs of its logits."""
    prompts = ["the cat", "hello world", "she was on the mat"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[1:]))
    (tmp_path / "p.txt").write_text("\n".join(prompts[1:]) + "\n\n")
    for f in ("p.jsonl", "p.txt"):
        db = tmp_path / f"{f}.db"
        cli("sweep", prompts[0], "--prompts-file", tmp_path / f, "-t", "0,1", "--seed", 5, "-n", 8, "--ctx", 256,
            "-m", tiny_path, "--store", db, *OFF)
        _, samples = _stored(db)
        assert sorted({s.prompt for s, _, _ in samples}) == sorted(prompts) and len(samples) == 6
        for s, ids, lps in samples:
            assert s.prompt == prompts[s.prompt_idx]
            settings = SamplingSettings(temperature=[0.0, 1.0][s.config_idx], seed=5)
            check_sample(ref_llama, s.prompt, ids, lps, settings)


def _preset_labels() -> dict[str, str]:
    return dict(line.split(None, 1) for line in cli("presets").output.strip().splitlines())


def _settings_of_label(label: str) -> SamplingSettings:
    """What a preset's listed label says, as llama-cpp-python's parameters (written here from the label's text)."""
    f = dict(re.findall(r"(\w+)=([\d.]+)", label))
    return SamplingSettings(temperature=float(f["T"]), top_k=int(f["k"]), top_p=float(f["p"]),
                            min_p=float(f["min_p"]), repeat_penalty=float(f.get("rep", 1.0)))


def test_presets_sample_as_llama_cpp_python_with_the_listed_settings(tiny_path, ref_llama, tmp_path):
    """`sweep --preset NAME` runs what `presets` lists for NAME: each sampling preset's samples are what
    llama-cpp-python's create_completion samples with the listed T, top-k, top-p, min-p and repeat penalty and the
    same seed; the presets do differ (they give several different texts)."""
    from llamalens.run.loaded import load_run

    labels = _preset_labels()
    sampling = [name for name, label in labels.items() if "T=" in label and "chain=" not in label]
    assert {"greedy", "factual", "balanced", "creative", "llama-cpp-python"} <= set(sampling)
    texts = set()
    for i, name in enumerate(sampling, 1):
        db = tmp_path / "p.db"
        cli("sweep", "the cat sat", "--preset", name, "--seed", "1,2,3,4", "-n", 16, "--ctx", 256, "--exact", "-m",
            tiny_path, "--store", db, *OFF)
        store, samples = _stored(db, i)
        assert load_run(store, i).configs[0].label(seed=False) == labels[name] and len(samples) == 4
        for s, ids, lps in samples:
            check_sample(ref_llama, "the cat sat", ids, lps, _settings_of_label(labels[name]).with_(seed=s.seed))
            texts.add(s.text)
    assert len(texts) >= 8


def test_sweep_json_schema_every_output_parses_and_matches(tiny_path, tmp_path):
    """Every sample of `sweep --json-schema` (greedy and sampled, several seeds) is JSON that the jsonschema
    package validates against the schema, although the model left alone writes no JSON."""
    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "pet": {"enum": ["cat", "dog"]}}, "required": ["ok", "pet"],
              "additionalProperties": False}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    db = tmp_path / "j.db"
    cli("sweep", "the", "--json-schema", f, "-t", "0,0.9,1.5", "--seeds", 3, "-n", 48, "--ctx", 256, "-m", tiny_path,
        "--store", db, *OFF)
    _, samples = _stored(db)
    assert len(samples) == 9
    for s, _, _ in samples:
        assert s.finish_reason == "stop", s.text
        jsonschema.validate(json.loads(s.text), schema)
    assert len({s.text for s, _, _ in samples}) >= 2
    free = json.loads(cli("generate", "the", "-n", 16, "-t", 0, "-m", tiny_path, "--json", *OFF).stdout)["text"]
    with pytest.raises(ValueError):
        json.loads(free)


# -- the --report pages show the --json numbers ----------------------------------------------------------------
class Tables(HTMLParser):
    """Every <table> of a page: rows of (cell text, data-v or None)."""

    def __init__(self, html: str):
        super().__init__()
        self.tables, self._cell = [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = ["", dict(attrs).get("data-v")]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append((self._cell[0].strip(), self._cell[1]))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data

    def table(self, first_header: str) -> list[list[tuple[str, str | None]]]:
        return next(t for t in self.tables if t and t[0] and t[0][0][0] == first_header)


def shown(cell: tuple[str, str | None]) -> float:
    """The number a cell shows (its text, thousands separators and a trailing % dropped)."""
    return float(cell[0].replace(",", "").rstrip(" %"))


def test_next_report_page_shows_the_json_and_llama_cpp_pythons_numbers(tiny_path, ref_llama, tmp_path):
    """`next --report`: the page's raw p and per-temperature columns are the --json numbers (the values behind
    each cell, and the 4 digits shown), which are softmax(logits / T) of llama-cpp-python's logits."""
    page = tmp_path / "n.html"
    d = json.loads(cli("next", "the cat", "-t", "0.5,1,2", "--top", 6, "-m", tiny_path, "--json", "--report", page,
                       *OFF).stdout)
    rows = Tables(page.read_text(encoding="utf-8")).table("token")
    assert [c[0] for c in rows[0]] == ["token", "raw p", "T=0.5", "T=1", "T=2"]
    assert len(rows) - 1 == len(d["top"]) == 6
    lp = ref_rows(ref_llama, ref_ids(ref_llama, "the cat"))[-1]
    raw = np.exp(lp)
    for r, (row, tok) in enumerate(zip(rows[1:], d["top"])):
        assert float(row[1][1]) == pytest.approx(math.exp(tok["logprob"]), rel=1e-12)
        assert shown(row[1]) == pytest.approx(math.exp(tok["logprob"]), rel=1e-3)
        assert math.exp(tok["logprob"]) == pytest.approx(raw[tok["id"]], abs=3e-6)  # measured 2.6e-7
        for c, (chain, T) in enumerate(zip(d["chains"], (0.5, 1, 2)), 2):
            p = chain["stages"][-1]["probs"][r]
            assert float(row[c][1]) == pytest.approx(p, rel=1e-12)
            assert shown(row[c]) == pytest.approx(p, rel=1e-3)
            want = np.exp(log_softmax(lp / T))[tok["id"]]  # the whole vocabulary at temperature T
            assert p == pytest.approx(want, abs=3e-6)  # measured 2.6e-7


def test_score_report_page_shows_the_json_and_llama_cpp_pythons_numbers(tiny_path, ref_llama, tmp_path):
    """`score --report`: mean NLL, perplexity and bits per byte on the page are the --json totals, which are
    llama-cpp-python's: the mean of -log p(token | the tokens before it) over every text token (BOS first)."""
    text = "the cat sat on the mat and the dog sat on it. hello world"
    f = tmp_path / "t.txt"
    f.write_text(text)
    page = tmp_path / "s.html"
    d = json.loads(cli("score", "--file", f, "--ctx", 128, "-m", tiny_path, "--json", "--report", page, *OFF).stdout)
    tot = d["totals"]
    kv = {r[0][0]: r[1][0] for r in Tables(page.read_text(encoding="utf-8")).table("model")}
    assert float(kv["mean NLL"].split()[0]) == pytest.approx(tot["mean_nll"], abs=1e-5)
    ppl, err = (float(x) for x in kv["perplexity"].split(" ± "))
    assert ppl == pytest.approx(tot["perplexity"], abs=1e-4) and err == pytest.approx(tot["perplexity_error"], abs=1e-4)
    assert float(kv["bits per byte"].split()[0]) == pytest.approx(tot["bits_per_byte"], abs=1e-5)
    ids = ref_ids(ref_llama, text)
    rows = ref_rows(ref_llama, ids)
    nll = -np.array([rows[i][ids[i + 1]] for i in range(len(ids) - 1)])
    assert tot["scored"] == len(nll) and f"{len(nll)} scored" in kv["tokens"]
    # measured: 1.3e-9 nats from llama-cpp-python's mean NLL and 1.6e-9 in bits per byte (F32): bounds 2e-8
    assert tot["mean_nll"] == pytest.approx(nll.mean(), abs=2e-8)
    assert tot["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=2e-8)
    assert tot["bits_per_byte"] == pytest.approx(nll.sum() / math.log(2) / len(text.encode()), abs=2e-8)


@pytest.fixture(scope="module")
def tiny_q8(tiny_path, tmp_path_factory):
    from llamalens.core.runtime import quantize

    return quantize(tiny_path, tmp_path_factory.mktemp("q8") / "tiny-Q8_0.gguf", "Q8_0")


def test_compare_report_page_shows_the_json_and_llama_cpp_pythons_numbers(tiny_path, tiny_q8, ref_llama, tmp_path):
    """`compare --report`: the ladder's cells and the statistics table are the --json numbers, and those are
    KL(base || model), same-top share and perplexities over llama-cpp-python's logits of both models (one window)."""
    from llama_cpp import Llama

    text = "the cat sat on the mat and the dog sat on it. hello world"
    f = tmp_path / "t.txt"
    f.write_text(text)
    page = tmp_path / "c.html"
    d = json.loads(cli("compare", "-m", tiny_path, "-m", tiny_q8, "--file", f, "--ctx", 128, "--store",
                       tmp_path / "c.db", "--json", "--report", page, *OFF).stdout)
    [lad], st = d["ladder"], d["models"][0]["statistics"]
    tables = Tables(page.read_text(encoding="utf-8"))
    ladder = tables.table("model")
    head = [c[0] for c in ladder[0]]
    cells = dict(zip(head, ladder[1]))
    for col, key in [("PPL", "ppl"), ("PPL ratio", "ppl_ratio"), ("mean KLD", "kld_mean"), ("± KLD", "kld_error"),
                     ("99% KLD", "kld_p99"), ("max KLD", "kld_max"), ("RMS Δp", "dp_rms"), ("same top", "same_top")]:
        assert float(cells[col][1]) == pytest.approx(lad[key], rel=1e-9), col
        assert shown(cells[col]) == pytest.approx(lad[key], rel=1e-3), col
    stats = {r[0][0]: r[1][0] for r in tables.table("statistic")[1:]}
    mean_kld, kld_err = (float(x) for x in stats["Mean    KLD"].split(" ± "))
    assert mean_kld == pytest.approx(st["kld_mean"], abs=1e-6) and kld_err == pytest.approx(st["kld_error"], abs=1e-6)
    assert float(stats["Mean PPL(Q)"].split(" ± ")[0]) == pytest.approx(st["ppl_q"], abs=1e-6)
    assert float(stats["Maximum KLD"]) == pytest.approx(st["kld_max"], abs=1e-6)
    # the reference: both models' rows from llama-cpp-python over the same tokens
    ids = ref_ids(ref_llama, text)
    base = ref_rows(ref_llama, ids)[:-1]
    q = ref_rows(Llama(str(tiny_q8), logits_all=True, n_ctx=256, verbose=False, flash_attn=False), ids)[:-1]
    kld = np.array([kl_divergence(a, b) for a, b in zip(base, q)])
    assert st["tokens"] == len(kld)
    # measured: 4.0e-9 from the mean KLD by hand and 1.3e-8 from the max (F32 and Q8_0 rows; the mean is 9.1e-3):
    # bound 1.5e-7
    assert st["kld_mean"] == pytest.approx(kld.mean(), abs=1.5e-7)
    assert st["kld_max"] == pytest.approx(kld.max(), abs=1.5e-7)
    assert st["same_top"] == pytest.approx(np.mean(base.argmax(1) == q.argmax(1)))
    nll_q = -np.array([q[i][ids[i + 1]] for i in range(len(kld))])
    assert st["ppl_q"] == pytest.approx(math.exp(nll_q.mean()), rel=3e-8)  # measured 3.1e-9


# -- embed --query ------------------------------------------------------------------------------------------------
def test_embed_query_cosines_are_numpy_cosines_of_llama_cpp_python_vectors(tiny_path):
    """`embed --query`: the ranking and each cosine are numpy's cosine between the mean-pooled (BOS left out)
    per-token vectors llama-cpp-python gives for the query and each text."""
    import llama_cpp as L

    query, texts = "the cat", ["the dog sat", "hello world", "a cat is on the mat", "she was on it"]
    d = json.loads(cli("embed", "-q", query, *texts, "-m", tiny_path, "--json", *OFF).stdout)
    ref = L.Llama(str(tiny_path), embedding=True, pooling_type=L.LLAMA_POOLING_TYPE_NONE, n_ctx=256, verbose=False,
                  flash_attn=False)
    vec = {t: np.array(ref.embed(t), dtype=np.float64)[1:].mean(0) for t in [query, *texts]}
    cos = {t: float(vec[query] @ vec[t] / np.linalg.norm(vec[query]) / np.linalg.norm(vec[t])) for t in texts}
    ranking = d["query"]["ranking"]
    assert [r["text"] for r in ranking] == sorted(texts, key=lambda t: -cos[t])
    for r in ranking:
        assert texts[r["index"]] == r["text"]
        # measured: up to 4.0e-9 from numpy's cosine (float32 vectors, summed in another order): bound 5e-8
        assert r["cosine"] == pytest.approx(cos[r["text"]], abs=5e-8)
    assert max(cos.values()) - min(cos.values()) > 0.05  # the query does tell the texts apart


# -- API and CLI, exact, batched and resumed: each against llama-cpp-python ------------------------------------
def test_api_cli_exact_batched_and_resumed_runs_are_llama_cpp_pythons(tiny_path, ref_llama, tmp_path):
    """One sweep run five ways (the CLI batched and --exact, ll.sweep batched, a run interrupted after 3 samples and
    finished by `sweep --resume`, ll.resume of another): every sample of each is what llama-cpp-python samples with
    the same settings and seed, with its logprobs; so they all agree with each other too."""
    import llamalens as ll
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.run.sweep import SweepInterrupted, SweepSpec, execute, start_sweep
    from llamalens.run import grid
    from llamalens.store import Store

    prompts, temps, seeds = ["the cat", "hello"], [0.0, 0.9], [1, 2]
    common = ("-t", "0,0.9", "--seed", "1,2", "-n", 8, "--ctx", 256, "-m", tiny_path, *OFF)
    cli("sweep", *prompts, *common, "--parallel", 8, "--store", tmp_path / "batched.db")
    cli("sweep", *prompts, *common, "--exact", "--store", tmp_path / "exact.db")
    ll.sweep(prompts, {"temperature": temps}, seeds=seeds, max_tokens=8, model=str(tiny_path), ctx=256,
             flash_attn="off", threads=1, store=tmp_path / "api.db", progress=False, parallel=8)
    with Model(tiny_path, ModelOptions(ctx=256, flash_attn="off", threads=1)) as m:
        for name in ("resumed-cli", "resumed-api"):
            store = Store(tmp_path / f"{name}.db")
            spec = SweepSpec(prompts, grid.expand({"temperature": temps}), seeds, 8, 5, parallel=2)
            rid = start_sweep(m, store, spec)

            def stop_after_3(prog, calls=[]):  # noqa: B006 - a fresh list per run (defined in the loop)
                calls.append(prog)
                if len(calls) == 3:
                    raise KeyboardInterrupt

            with pytest.raises(SweepInterrupted):
                execute(m, store, rid, stop_after_3)
            assert 0 < store.run(rid).n_done < 8
    cli("sweep", "--resume", 1, "--store", tmp_path / "resumed-cli.db")
    ll.resume(1, store=tmp_path / "resumed-api.db", progress=False)
    seen = {}
    for name in ("batched", "exact", "api", "resumed-cli", "resumed-api"):
        store, samples = _stored(tmp_path / f"{name}.db")
        assert store.run(1).status == "done" and len(samples) == 8, name
        for s, ids, lps in samples:
            settings = SamplingSettings(temperature=temps[s.config_idx], seed=s.seed)
            check_sample(ref_llama, s.prompt, ids, lps, settings)
            seen.setdefault((s.prompt, s.config_idx, s.seed), set()).add(tuple(ids))
    assert len(seen) == 8 and all(len(v) == 1 for v in seen.values())


# -- context options against llama-server with the same options (the default model: sliding-window attention) --
CTX_PROMPT = "The capital of Michigan is "  # 7 tokens: llama-server decodes its last 4 in a batch of their own
# (llama-server's flags, llamalens' options): the first is each one's defaults for llama-server's context
CTX_CASES = {"server defaults": ((), ()), "full SWA cache": (("--swa-full",), ("--swa-full", "on")),
             "ubatch 2": (("--ubatch-size", "2"), ("--ubatch", 2)), "no repack": (("--no-repack",), ("--repack", "off"))}
# measured (flash attention off on both sides): llamalens' top 5 relative to the top token within 1.2e-7 of
# llama-server's in every case: bound 1.2e-6. Each option moved them by 0.107 (no repack) to 0.19 (full SWA cache), and
# --server-prefill off by 0.26: an option that did nothing would move them by 0, so the bound is 0.01
CTX_TOL = 1.2e-6
CTX_MOVED = 0.01


def _next_top(gemma_path, *options) -> dict[int, float]:
    d = json.loads(cli("next", CTX_PROMPT, "--chain", "llama.cpp", "--top", 5, "-m", gemma_path, "--ctx", 512,
                       "--flash-attn", "off", "--json", *options).stdout)
    return {t["id"]: t["logprob"] for t in d["top"]}


def _relative(top: dict[int, float]) -> dict[int, float]:
    """Each logprob less the top one's: llama-server normalises in float32 over the whole vocabulary (a shift of
    every logprob alike, test_llama_server.py), which this cancels; what is left compares the logits."""
    best = max(top.values())
    return {i: lp - best for i, lp in top.items()}


def test_context_options_change_the_logits_as_llama_server_does(gemma_path):
    """`--swa-full`, `--ubatch`, `--repack` (and `--server-prefill`) each move the default model's next-token
    logprobs, and with each llamalens gives what llama-server gives with the same option (its top 5, their
    logprobs relative to the top one's)."""
    from server import llama_server

    ours, theirs = {}, {}
    for name, (server_flags, options) in CTX_CASES.items():
        ours[name] = _next_top(gemma_path, *options)
        with llama_server(gemma_path, "--ctx-size", "512", "--parallel", "1", "--no-warmup", "--flash-attn", "off",
                          *server_flags, timeout=120) as srv:
            reply = srv.post("/completion", {"prompt": CTX_PROMPT, "n_predict": 1, "n_probs": 5, "temperature": 0,
                                             "cache_prompt": False})
        theirs[name] = {p["id"]: p["logprob"] for p in reply["completion_probabilities"][0]["top_logprobs"]}
    worst, moved = 0.0, {}
    for name in CTX_CASES:
        a, b = _relative(ours[name]), _relative(theirs[name])
        assert list(a) == list(b), name  # the same top 5, in the same order
        worst = max(worst, max(abs(a[i] - b[i]) for i in a))
        moved[name] = max(abs(ours[name][i] - ours["server defaults"][i]) for i in a if i in ours["server defaults"])
    print(f"largest difference from llama-server {worst:.2e}; moved by each option: {moved}")
    assert worst < CTX_TOL
    assert all(moved[name] > CTX_MOVED for name in CTX_CASES if name != "server defaults"), moved
    # --server-prefill off decodes the prompt in one batch where llama-server splits it: it moves away from the server
    off = _relative(_next_top(gemma_path, "--server-prefill", "off"))
    b = _relative(theirs["server defaults"])
    assert max(abs(off[i] - b[i]) for i in off if i in b) > CTX_MOVED


# -- models --fit ---------------------------------------------------------------------------------------------------
def _fit_rows(*args) -> dict[str, tuple[float, str]]:
    """`models --fit`'s rows: source name -> (needs in bytes, as shown to 0.1 of its unit; fits)."""
    out, units = cli("models", "--fit", *args).output, {"KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}
    rows = re.findall(r"^(\S+).*? ([\d.]+) (KiB|MiB|GiB) +(yes|NO) ", out, re.M)
    return {name: (float(x) * units[u], fits) for name, x, u, fits in rows}


def test_models_fit_is_the_estimate_against_the_memory_limit(tiny_path, tmp_path, monkeypatch):
    """`models --fit`: the KV cache of the estimate behind each row is the textbook size from the model's header (read
    here by the gguf package): K and V, F16, per layer, kv heads x head size per cell, ctx x sequences cells; the
    weights are the mapped file (tensor bytes after the header); the row's "needs" is the estimate's peak for the --ctx and --parallel given;
    "fits" is that against the RAM limit: with LLAMALENS_MEMORY_LIMIT between two models' needs, yes and no."""
    import shutil

    import gguf

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_path, models / "tiny.gguf")
    monkeypatch.setenv("LLAMALENS_MODELS", str(models))
    r = gguf.GGUFReader(str(tiny_path))
    field = lambda k: int(r.fields[k].parts[-1][0])  # noqa: E731
    n_layer, n_head_kv = field("llama.block_count"), field("llama.attention.head_count_kv")
    head = field("llama.embedding_length") // field("llama.attention.head_count")
    for ctx, par in [(256, 1), (1024, 3)]:
        est = json.loads(cli("models", "tiny", "--json", "--ctx", ctx, "--parallel", par).stdout)["memory_estimate"]
        assert est["kv"] == 2 * n_layer * ctx * par * n_head_kv * head * 2
        # the mapped file, header included (llama.cpp's "CPU_Mapped model buffer size"): the tensors and the rest
        assert est["weights"] == Path(tiny_path).stat().st_size == r.data_offset + sum(int(t.n_bytes) for t in r.tensors)
        rows = _fit_rows("--ctx", ctx, "--parallel", par)
        assert rows["tiny"][0] == pytest.approx(est["peak"], abs=0.05 * 2 ** 20) and rows["tiny"][1] == "yes"
    rows = _fit_rows()
    (tiny_needs, _), (big_needs, _) = rows["tiny"], next(v for k, v in rows.items() if k != "tiny")
    assert tiny_needs < big_needs
    monkeypatch.setenv("LLAMALENS_MEMORY_LIMIT", str(int((tiny_needs + big_needs) / 2)))
    limited = _fit_rows()
    assert limited["tiny"][1] == "yes" and [v[1] for k, v in limited.items() if k != "tiny"] == ["NO"]
