"""Grammars and JSON schemas (llamalens/core/grammar.py, --grammar and --json-schema on generate, next and sweep): the
grammar's mask and the removed mass against a prefix matcher written here and llama-cpp-python's logits, greedy
constrained decoding against the same reference, JSON output that fits its schema, and every bad input."""

import json

import numpy as np
import pytest

from llamalens.core.engine import Engine, Request
from llamalens.errors import InvalidInput
from llamalens.core.grammar import read_grammar
from llamalens.settings import SamplingSettings
from reference import log_softmax
from test_cli import run as cli

# a finite language over the tiny model's pieces: what may follow is checked by plain string prefixes below
SENTENCES = [" the cat sat on the mat.", " the dog sat.", " a cat is on it!"]
GBNF = 'root ::= " the" ( " cat sat on the mat." | " dog sat." ) | " a cat is on it!"\n'


@pytest.fixture(scope="module")
def tiny_llama(tiny_path):
    from llama_cpp import Llama

    return Llama(str(tiny_path), n_ctx=256, logits_all=True, verbose=False, flash_attn=False)


def pieces(llm) -> list[bytes]:
    return [llm.detokenize([i]) for i in range(llm.n_vocab())]


def allowed_after(done: bytes, vocab: list[bytes], eog: set[int]) -> np.ndarray:
    """The reference mask: a token may follow `done` when done + its bytes is a prefix of a sentence (EOG only
    when `done` is a whole sentence)."""
    full = [s.encode() for s in SENTENCES]
    ok = np.array([bool(p) and any(s.startswith(done + p) for s in full) for p in vocab])
    ok[list(eog)] = done in full
    return ok


def test_greedy_under_a_grammar_and_the_removed_mass(tiny, tiny_llama, tmp_path):
    g = tmp_path / "s.gbnf"
    g.write_text(GBNF, encoding="utf-8")
    spec = read_grammar(str(g), None)
    sample = next(iter(Engine(tiny, 1).run([Request("the cat", SamplingSettings(temperature=0), 24, 3,
                                                    grammar=spec.gbnf)])))
    # reference: llama-cpp-python's raw logits, the prefix mask above, argmax over the allowed tokens
    vocab, eog = pieces(tiny_llama), {tiny.eos}
    ids, done, expected_removed = tiny.prompt_tokens("the cat"), b"", []
    for _ in range(24):
        tiny_llama.reset()
        tiny_llama.eval(ids)
        lp = log_softmax(np.array(tiny_llama.scores[len(ids) - 1]))
        ok = allowed_after(done, vocab, eog)
        expected_removed.append(float(np.exp(lp[~ok]).sum()))
        tok = int(np.flatnonzero(ok)[np.argmax(lp[ok])])
        ids.append(tok)
        if tok in eog:
            break
        done += vocab[tok]
    assert [t.id for t in sample.tokens] == ids[len(tiny.prompt_tokens("the cat")):]
    assert sample.text in [s for s in SENTENCES] and sample.finish_reason == "stop"
    # exact at every step (the whole vocabulary's mask); the logits agree to ~2e-6 (measured), which moves these
    # sums by less than that: 1e-5
    got = np.array(sample.grammar_removed)
    assert np.allclose(got, expected_removed, rtol=0, atol=1e-5)
    assert max(expected_removed) > 0.5  # the constraint did fight this model


def test_sampled_generation_stays_in_the_language(tiny, tmp_path):
    reqs = [Request("the", SamplingSettings(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=s), 24, 0,
                    grammar=GBNF) for s in range(6)]
    out = list(Engine(tiny, 3).run(reqs))
    assert {s.text for s in out} <= set(SENTENCES) and all(s.finish_reason == "stop" for s in out)
    assert all(len(s.grammar_removed) == len(s.tokens) for s in out)


def test_json_schema(tiny_path, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    d = json.loads(cli("generate", "the", "--json-schema", schema, "-m", tiny_path, "-n", 40, "-t", 0.9,
                       "--json").stdout)
    assert isinstance(json.loads(d["text"])["ok"], bool) and d["finish_reason"] == "stop"
    assert d["grammar"]["source"].startswith("json-schema:") and "root ::=" in d["grammar"]["gbnf"]
    assert all(0.0 <= t["grammar_removed"] <= 1.0 for t in d["tokens"])


def test_cli_next_sweep_show_report(tiny_path, tmp_path):
    g = tmp_path / "s.gbnf"
    g.write_text(GBNF, encoding="utf-8")
    d = json.loads(cli("next", "the", "--grammar", g, "-m", tiny_path, "--top", 5, "--json").stdout)
    assert d["allowed"] >= 2 and 0 < d["removed"] < 1
    # an allowed token's share under the grammar is its raw p renormalised by what the grammar left (1 - removed)
    shown = [t for t in d["top"] if t["prob_under_grammar"] > 0]
    assert shown and all(t["bytes"] and any(s.encode().startswith(bytes.fromhex(t["bytes"])) for s in SENTENCES)
                         for t in shown)
    for t in shown:
        assert t["prob_under_grammar"] == pytest.approx(t["prob"] / (1 - d["removed"]), rel=1e-6)
    store, report = tmp_path / "runs.db", tmp_path / "g.html"
    res = cli("sweep", "the", "--grammar", g, "-t", "0,1", "--seeds", 2, "-n", 12, "-m", tiny_path, "--store", store,
              "--report", report)
    assert "grammar (grammar:" in res.output and "where it fought the model most" in res.output
    html = report.read_text(encoding="utf-8")
    assert "Where the constraint fought the model" in html and "cat sat on the mat." in html
    from llamalens.run.loaded import load_run
    from llamalens.store import Store

    run = load_run(Store(str(store)), 1)
    assert {s.text for s in run.samples} <= set(SENTENCES)
    assert all(len(s.extra["grammar_removed"]) == len(run.by_sample[s.sample_idx]) for s in run.samples)
    # best-of-N draws are constrained too (the winner keeps its removed mass); beam search cannot be
    res = cli("sweep", "the", "--grammar", g, "-t", 1, "--best-of", 3, "--seeds", 2, "-n", 12, "-m", tiny_path,
              "--store", store)
    run = load_run(Store(str(store)), 2)
    assert {s.text for s in run.samples} <= set(SENTENCES)
    assert all(len(s.extra["grammar_removed"]) == len(run.by_sample[s.sample_idx]) for s in run.samples)
    res = cli("sweep", "the", "--grammar", g, "--strategy", "beam", "-m", tiny_path, "--store", store, ok=False)
    assert res.exit_code != 0 and "does not apply to beam search" in res.output and "Traceback" not in res.output


def test_bad_grammars(tiny_path, tmp_path):
    bad = tmp_path / "bad.gbnf"
    for text, why in [('root ::= "a" (', "expecting ')'"), ("root ::= bar", "Undefined rule identifier 'bar'"),
                      ('start ::= "a"', "does not parse")]:
        bad.write_text(text, encoding="utf-8")
        res = cli("generate", "the", "--grammar", bad, "-m", tiny_path, ok=False)
        assert res.exit_code != 0 and why in res.output and "Traceback" not in res.output, res.output
    res = cli("sweep", "the", "--grammar", bad, "-m", tiny_path, "--store", tmp_path / "r.db", ok=False)
    assert res.exit_code != 0 and "does not parse" in res.output
    bad.write_text("", encoding="utf-8")
    with pytest.raises(InvalidInput, match="is empty"):
        read_grammar(str(bad), None)
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(InvalidInput, match="is not JSON"):
        read_grammar(None, str(bad))
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(InvalidInput, match="not a schema object"):
        read_grammar(None, str(bad))
    with pytest.raises(InvalidInput, match="not both"):
        read_grammar(str(bad), str(bad))
    res = cli("next", "the", "--grammar", bad, "-t", "0.5", "-m", tiny_path, ok=False)
    assert res.exit_code != 0 and "leave out the sampler settings" in res.output


def test_next_under_a_grammar_against_llama_cpp_python_and_the_prefix_mask(tiny_path, tiny_llama, tmp_path):
    """`next --grammar`: the removed mass is the raw probability (llama-cpp-python's logits) of the tokens the
    prefix matcher forbids at the start, the allowed count is the matcher's, and each listed token's raw p is
    llama-cpp-python's (float32 logits, flash attention off in both: measured 1.2e-7 apart, bound 1e-6; with
    flash attention on in one, 6e-4)."""
    from llamalens.core.runtime import Model, ModelOptions

    with Model(tiny_path, ModelOptions(ctx=256)) as m:
        ids, eog = m.prompt_tokens("the"), set(m.eog_tokens())
    g = tmp_path / "next.gbnf"
    g.write_text(GBNF, encoding="utf-8")
    d = json.loads(cli("next", "the", "--grammar", g, "-m", tiny_path, "--top", 5, "--json", "--flash-attn", "off").stdout)
    tiny_llama.reset()
    tiny_llama.eval(ids)
    lp = log_softmax(np.array(tiny_llama.scores[len(ids) - 1]))
    ok = allowed_after(b"", pieces(tiny_llama), eog)
    assert d["allowed"] == int(ok.sum()) and 0 < ok.sum() < 10
    assert d["removed"] == pytest.approx(float(np.exp(lp[~ok]).sum()), abs=1e-6)
    assert 0.5 < d["removed"] < 1  # the grammar fights this model here: a wrong mask moves it a lot
    for t in d["top"]:
        assert t["prob"] == pytest.approx(float(np.exp(lp[t["id"]])), abs=1e-6)
        assert (t["prob_under_grammar"] > 0) == bool(ok[t["id"]])


def test_the_mask_checked_in_slices_on_threads_equals_the_reference(tiny, tiny_llama, monkeypatch):
    """A long candidate list is answered by walking the vocabulary's prefix tree, checked in slices on several
    threads: at each step of a sentence the mask over the whole vocabulary equals the prefix reference (both
    thresholds forced down, so that the tiny vocabulary is walked and cut into 4 slices)."""
    from llamalens.core import grammar_check, sampler

    monkeypatch.setattr(grammar_check, "SLICE_MIN", 1)
    monkeypatch.setattr(grammar_check, "WALK_MIN", 1)
    vocab, eog = pieces(tiny_llama), {tiny.eos}
    with sampler.GrammarSampler(tiny, GBNF, threads=4) as g:
        ids = np.arange(tiny.n_vocab, dtype=np.int32)
        done = b""
        for _ in range(12):
            ok = g.allowed(ids)
            assert np.array_equal(ok, allowed_after(done, vocab, eog)), done
            follow = [i for i in np.flatnonzero(ok) if i not in eog]
            if not follow:
                break
            tok = int(follow[len(follow) // 2])
            g.accept(tok)
            done += vocab[tok]
        assert len(done) > 10  # the walk went deep into a sentence



def test_the_prefix_walk_gives_the_full_checks_answers_on_gemma(gemma, monkeypatch):
    """On Gemma's 262k-token vocabulary (byte tokens, special tokens, pieces of every length): the whole mask,
    found by walking the prefix tree, equals llama.cpp's check of every token at each state of a JSON text,
    including states inside a character that a byte token left unfinished; and a second sampler of the same
    grammar, whose masks come from what the first remembered by state, gets the same masks."""
    from llamalens.core import grammar_check
    from llamalens.core.sampler import GrammarSampler, json_schema_to_gbnf

    gbnf = json_schema_to_gbnf(json.dumps({"type": "object", "properties": {"name": {"type": "string"},
                                                                            "age": {"type": "integer"}}}))
    ids = np.arange(gemma.n_vocab, dtype=np.int32)
    byte = {gemma.piece(t): t for t in range(gemma.n_vocab) if len(gemma.piece(t)) == 1}
    before = gemma.tokenize('{"name": "a', add_bos=False)
    steps = before + [byte[bytes([b])] for b in "漢".encode()] + gemma.tokenize('", "age": 12', add_bos=False)
    fulls, keys = [], []
    with GrammarSampler(gemma, gbnf) as g:
        for tok in steps + [None]:
            monkeypatch.setattr(grammar_check, "WALK_MIN", 10**9)  # every token through llama.cpp's check
            full = g.allowed(ids)
            monkeypatch.undo()
            assert np.array_equal(g.mask(), full) and full.any(), tok
            fulls.append(full)
            keys.append(g._state.key())
            if tok is not None:
                assert full[tok]
                g.accept(tok)
    # inside the string: after "a" and after the third byte of 漢 the grammar is in the same state; after its
    # first and second bytes it waits for the rest of a character, two states of their own
    a = len(before)
    assert None not in keys and keys[a] == keys[a + 3] and len({keys[a], keys[a + 1], keys[a + 2]}) == 3
    with GrammarSampler(gemma, gbnf) as again:
        for tok, full in zip(steps + [None], fulls):
            assert np.array_equal(again.mask(), full), tok
            if tok is not None:
                again.accept(tok)


def test_a_state_that_cannot_be_read_has_no_key(gemma, tiny, monkeypatch):
    """The state reader refuses what is not a grammar sampler of this model's vocabulary, and any llama-cpp-python
    release but the one whose layout it reads (its key is None; masks are then made without being remembered)."""
    from llamalens.core import grammar_state
    from llamalens.core.grammar_state import StateReader
    from llamalens.core.runtime import llama_cpp_module
    from llamalens.core.sampler import GrammarSampler

    lib = llama_cpp_module()
    greedy = lib.llama_sampler_init_greedy()
    try:
        assert StateReader(lib, greedy, gemma.vocab).key() is None
    finally:
        lib.llama_sampler_free(greedy)
    with GrammarSampler(gemma, 'root ::= "a" "b"*') as g:
        assert StateReader(lib, g.ptr, tiny.vocab).key() is None  # another model's vocabulary
        assert StateReader(lib, g.ptr, gemma.vocab).key() is not None
        monkeypatch.setattr(grammar_state, "LAYOUT_VERSIONS", ("0.3.35",))
        assert StateReader(lib, g.ptr, gemma.vocab).key() is None


def test_the_removed_mass_from_either_side_of_the_mask():
    """The removed mass summed over the forbidden tokens, or as 1 − the allowed mass when few are allowed, equals
    the reference (the test's own log-softmax) for masks that allow few tokens and masks that allow most. The two
    differ by ~1e-15 (measured); 1e-12."""
    from llamalens.core.grammar import _removed

    rng = np.random.default_rng(1)
    for allowed_share in (0.001, 0.1, 0.6, 0.999):
        row = rng.normal(0, 3, 262144).astype(np.float32)
        ok = rng.random(row.shape[0]) < allowed_share
        lp = log_softmax(row.astype(np.float64))
        lse = float(np.log(np.exp(row.astype(np.float64) - row.max()).sum()) + row.max())
        want = float(np.exp(lp[~ok]).sum())
        assert _removed(row, ok, lse) == pytest.approx(want, abs=1e-12), allowed_share
        assert _removed(row, ok, None) == pytest.approx(want, abs=1e-6), allowed_share  # float32 log-softmax


def test_masks_are_made_once_per_state_and_the_oldest_dropped(monkeypatch):
    """Threads that reach a new state together wait for one mask to be made; past the byte budget the least
    recently used state is dropped (and made again when it comes back)."""
    import threading
    import time

    from llamalens.core import grammar_state

    monkeypatch.setattr(grammar_state, "MASK_BUDGET", 2 * 2)  # two masks of 16 tokens (2 bytes packed each)
    masks, made = grammar_state.Masks(16), []

    def make(key):
        def run():
            made.append(key)
            time.sleep(0.2)
            return np.arange(16) % (key + 2) == 0
        return run

    got = []
    threads = [threading.Thread(target=lambda: got.append(masks.get(1, make(1)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == [1] and all(np.array_equal(g, np.arange(16) % 3 == 0) for g in got) and len(got) == 4
    masks.get(2, make(2))
    masks.get(1, make(1))  # 1 is now the most recent: 2 goes first
    masks.get(3, make(3))
    assert made == [1, 2, 3] and len(masks) == 2
    masks.get(1, make(1))
    masks.get(2, make(2))
    assert made == [1, 2, 3, 2]


def test_masks_are_kept_for_a_few_grammars_only(tiny):
    """A process that is given one grammar after another keeps the masks of the most recent GRAMMARS_KEPT."""
    from llamalens.core import grammar_state

    first = grammar_state.masks(tiny, 'root ::= "a"')
    assert grammar_state.masks(tiny, 'root ::= "a"') is first
    for i in range(grammar_state.GRAMMARS_KEPT):
        grammar_state.masks(tiny, f'root ::= "{i}"')
    assert grammar_state.masks(tiny, 'root ::= "a"') is not first
