"""compare --draft: the acceptance of a draft model's tokens by a target model. The formulas against a Monte Carlo
run of speculative sampling; the per-token acceptance against llama-cpp-python's logits in numpy; the greedy replay
against llama.cpp's own llama-speculative (greedy draft and target, the same prompt)."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from clirun import cli
from llamalens.looks.draft import DRAFT_LENGTHS, along_text, draft_statistics, greedy_rounds

ROOT = Path(__file__).resolve().parent.parent


def test_expected_accepted_tokens_against_a_simulation():
    """Speculative sampling simulated token by token (target p, draft q over a 5-token vocabulary, the draft's
    token accepted with probability min(1, p/q), else a new round): the acceptance rate is Σ min(p, q), and the
    accepted drafts per round of γ are α(1 − α^γ)/(1 − α) with independent positions; the 'along the text' figure
    equals that formula when every position has the same α."""
    rng = np.random.default_rng(3)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
    alpha = np.minimum(p, q).sum()
    n = 40000
    x = rng.choice(5, size=n, p=q)
    accepted = rng.random(n) < np.minimum(1, p[x] / q[x])
    assert accepted.mean() == pytest.approx(alpha, abs=4 * np.sqrt(alpha * (1 - alpha) / n))  # 4 standard errors
    for g in (1, 3, 8):
        rounds = accepted[: n // g * g].reshape(-1, g)
        lead = np.where(rounds.all(axis=1), g, np.argmin(rounds, axis=1))  # leading accepted drafts of each round
        formula = alpha * (1 - alpha**g) / (1 - alpha)
        assert lead.mean() == pytest.approx(formula, abs=4 * lead.std() / np.sqrt(len(lead)))
        flat = np.full(50, alpha)
        s = draft_statistics(flat, np.ones(50, bool), [50])
        assert s["rounds"][g - 1]["iid_accepted"] == pytest.approx(formula, rel=1e-12)
        assert along_text(flat, g)[0] == pytest.approx(formula, rel=1e-12)


def test_greedy_replay_by_hand():
    """Rounds of γ = 2 on a match pattern worked out by hand: token 0 from the target alone; then [1 1] accepted
    + 1 target token; [0] + 1; [1 0] -> 1 + 1; [1] and the text ends."""
    match = [1, 1, 1, 1, 0, 1, 0, 1, 1]
    r = greedy_rounds(match, 2)
    # round 1 at t=1: match[1], match[2] -> k=2, emits 3 (t=4); round 2 at t=4: match[4]=0 -> k=0 (t=5);
    # round 3 at t=5: match[5]=1, match[6]=0 -> k=1 (t=7); round 4 at t=7: match[7], match[8] -> k=2 (t=10)
    assert r == {"n_drafted": 8, "n_accept": 5, "n_predict": 1 + 3 + 1 + 2 + 3, "rounds": 4}
    assert greedy_rounds(match, 2, n_predict=4) == {"n_drafted": 4, "n_accept": 2, "n_predict": 5, "rounds": 2}
    assert len(draft_statistics(np.full(9, 0.5), np.array(match, bool), [4, 5])["rounds"]) == len(DRAFT_LENGTHS)
    # along the text, γ = 2: t=0: 0.5 + 0.5·1.0; t=1: 1.0 + 1.0·0.2; t=2: 0.2 (the text ends)
    assert along_text(np.array([0.5, 1.0, 0.2]), 2).tolist() == pytest.approx([1.0, 1.2, 0.2], abs=1e-15)


def test_acceptance_per_token_against_llama_cpp_python(tiny_path, tmp_path):
    """compare --run RUN -m DRAFT --draft: each generated token's Σ min(p_target, p_draft) against llama-cpp-python's
    logits of the sample in numpy (float64); the figures shown come from those values."""
    import llamalens as ll
    from llamalens.core.runtime import quantize
    from llamalens.run.ladder import load_ladder
    from llamalens.store import Store

    draft = quantize(tiny_path, tmp_path / "tiny-q4_0.gguf", "Q4_0")
    db = tmp_path / "d.db"
    run = ll.sweep("the cat", {"temperature": [0.0, 0.9]}, seeds=1, max_tokens=8, model=str(tiny_path), store=db,
                   progress=False, ctx=64)
    out = json.loads(cli("compare", "--run", run.id, "-m", draft, "--draft", "--flash-attn", "off", "--store", db,
                         "--json").stdout)
    ladder = load_ladder(Store(db, read_only=True), out["run"])
    store = Store(db, read_only=True)
    toks = store.tokens_by_sample(run.id)
    from llama_cpp import Llama

    ref, ref_hit = [], []
    for s in store.samples(run.id):
        rows = {}
        for path in (tiny_path, draft):
            llm = Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
            ids = llm.tokenize(s.prompt.encode(), add_bos=True, special=True)
            n_prompt = len(ids)
            ids += [t.id for t in toks[s.sample_idx]]
            llm.eval(ids)
            x = np.array(llm.scores[n_prompt - 1 : len(ids) - 1], dtype=np.float64)
            p = np.exp(x - x.max(axis=1, keepdims=True))
            rows[path] = p / p.sum(axis=1, keepdims=True)
            llm.close()
        ref += np.minimum(rows[tiny_path], rows[draft]).sum(axis=1).tolist()
        ref_hit += (rows[draft].argmax(axis=1) == [t.id for t in toks[s.sample_idx]]).tolist()
    got = ladder.drift[1].accept
    # measured: within 3.7e-7 of the float64 reference (float32 probabilities summed in float64); bound 4e-6
    assert got == pytest.approx(ref, abs=4e-6) and len(got) == 16
    d = out["models"][0]["draft"]
    assert d["accept_mean"] == pytest.approx(np.mean(ref), abs=4e-6)
    assert ladder.drift[1].hit.tolist() == ref_hit and d["greedy_accept"] == pytest.approx(np.mean(ref_hit))
    assert [r["draft_length"] for r in d["rounds"]] == list(DRAFT_LENGTHS)


@pytest.fixture(scope="session")
def llama_speculative(tmp_path_factory) -> str:
    """llama.cpp's llama-speculative: on PATH, $LLAMA_SPECULATIVE, .tools/bin, or compiled here from the vendored
    source (examples/speculative/speculative.cpp) and linked against the libraries scripts/build_llama_tools.sh
    built in .tools/build with the project's flags (about 40 s)."""
    from conftest import llama_tool, require

    found = llama_tool("llama-speculative")
    if found:
        return found
    build = ROOT / ".tools" / "build"
    src = next((ROOT / ".tools" / "src").glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    libs = ["common/libllama-common.a", "common/libllama-common-base.a", "vendor/cpp-httplib/libcpp-httplib.a",
            "src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a", "ggml/src/libggml-base.a"]
    if src is None or not all((build / lib).exists() for lib in libs):
        return require(None, "llama.cpp's llama-speculative", "scripts/build_llama_tools.sh builds the libraries "
                       "it is linked against")
    out = tmp_path_factory.mktemp("spec")
    inc = [f"-I{src / d}" for d in ("common", "vendor", "include", "ggml/include")]
    subprocess.run(["c++", "-DGGML_USE_CPU", *inc, "-O3", "-DNDEBUG", "-c",
                    str(src / "examples/speculative/speculative.cpp"), "-o", str(out / "spec.o")], check=True)
    subprocess.run(["c++", "-O3", str(out / "spec.o"), "-o", str(out / "llama-speculative"),
                    *[str(build / lib) for lib in libs], "-ldl", "-lm", "-fopenmp", "-lpthread"], check=True)
    return str(out / "llama-speculative")


def test_greedy_replay_against_llama_speculative(gemma_path, tmp_path, llama_speculative):
    """llama-speculative with the default model as target and its Q2_K copy as draft, greedy (--temp 0), γ = 4,
    32 tokens; then compare --draft of the same two models on the prompt and the text the tool generated: the
    greedy replay of the draft's hits (its top token is the text's) gives the tool's n_drafted, n_accept and
    n_predict exactly."""
    from llamalens.core.runtime import quantize
    from llamalens.run.ladder import load_ladder
    from llamalens.store import Store

    draft = quantize(gemma_path, tmp_path / "gemma-q2_k.gguf", "Q2_K")
    prompt, n, gamma = "The capital of France is", 32, 4
    res = subprocess.run([llama_speculative, "-m", str(gemma_path), "-md", str(draft), "-p", prompt, "-n", str(n),
                          "--temp", "0", "--spec-draft-n-max", str(gamma), "-t", "1", "-c", "256", "-fa", "off"],
                         capture_output=True, text=True, timeout=900)
    tool = {k: int(v) for k, v in re.findall(r"(n_drafted|n_accept|n_predict)\s*=\s*(\d+)", res.stderr)}
    assert len(tool) == 3, res.stderr[-2000:]
    text = res.stdout.split("<bos>", 1)[1].rstrip("\n")
    assert text.startswith(prompt) and len(text) > len(prompt) + 40
    db = tmp_path / "g.db"
    out = json.loads(cli("compare", "-m", gemma_path, "-m", draft, text, "--draft", "--ctx", 256, "--flash-attn", "off",
                         "--threads", 1, "--store", db, "--json").stdout)
    from llama_cpp import Llama

    n_prompt = len(Llama(str(gemma_path), vocab_only=True, verbose=False).tokenize(prompt.encode(), add_bos=False))
    d = load_ladder(Store(db, read_only=True), out["run"]).drift[1]
    hits = d.hit[d.positions >= n_prompt].tolist()  # the generated tokens: the draft's top token is the text's
    ours = greedy_rounds(hits, gamma, n_predict=n)
    assert tool == {k: ours[k] for k in tool}, (tool, ours)
