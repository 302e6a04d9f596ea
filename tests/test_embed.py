"""Embeddings: pooled vectors equal llama-cpp-python's own (llama.cpp's MEAN and LAST pooling) and
numpy over its per-token vectors; a text's vector does not depend on the other texts; cosine
similarities say something true on the real model; the command's output and its bad input."""

import json

import numpy as np
import pytest

from llamalens.looks.embed import embed_texts
from clirun import cli

TERMS = ["king", "queen", "man", "woman", "apple", "banana", "Paris is the capital of France."]


def _llama(path, pooling):
    from llama_cpp import Llama

    return Llama(str(path), embedding=True, pooling_type=pooling, n_ctx=512, verbose=False, flash_attn=False)


def cosine(v):
    v = np.asarray(v, dtype=np.float64)
    n = v / np.sqrt((v * v).sum(axis=1, keepdims=True))
    return n @ n.T


def test_pooled_vectors_equal_llama_cpp_python(gemma, gemma_path):
    """mean-all / last = llama.cpp's MEAN / LAST pooling as llama-cpp-python returns it; mean = the mean
    of llama-cpp-python's per-token vectors without BOS; the cosine matrix = numpy's."""
    import llama_cpp as L

    ref_mean = _llama(gemma_path, L.LLAMA_POOLING_TYPE_MEAN)
    want_mean_all = np.array([ref_mean.embed(t) for t in TERMS])
    del ref_mean
    ref_none = _llama(gemma_path, L.LLAMA_POOLING_TYPE_NONE)
    rows = [np.array(ref_none.embed(t)) for t in TERMS]  # one text at a time: BOS + the text's tokens
    del ref_none
    for pooling, want in (("mean-all", want_mean_all),
                          ("last", np.array([r[-1] for r in rows])),
                          ("mean", np.array([r[1:].astype(np.float64).mean(0) for r in rows]))):
        es = embed_texts(gemma, TERMS, pooling)
        assert es.vectors.shape == (len(TERMS), gemma.n_embd)
        scale = np.abs(want).max()
        assert np.abs(es.vectors - want).max() < 1e-5 * scale, pooling
        assert np.allclose(es.cosine(), cosine(want), atol=1e-5)
    assert es.n_tokens == [len(r) for r in rows]
    # the per-token vectors the pooled ones come from: BOS is the same vector for every text
    assert cosine([r[0] for r in rows]).min() > 0.9999


def test_similarities_mean_something(gemma):
    es = embed_texts(gemma, TERMS, "mean")
    c = es.cosine()
    i = {t: k for k, t in enumerate(TERMS)}
    assert c[i["king"], i["queen"]] > c[i["king"], i["banana"]]
    assert c[i["man"], i["woman"]] > c[i["man"], i["apple"]]
    assert c[i["apple"], i["banana"]] > c[i["apple"], i["queen"]]
    assert [TERMS[j] for j, _ in es.nearest()][:2] == ["queen", "king"]
    assert np.allclose(np.diag(c), 1.0) and np.allclose(c, c.T)
    top = es.pairs(3)
    assert [c for _, _, c in top] == sorted([c for _, _, c in top], reverse=True)
    assert (top[0][0], top[0][1]) == (0, 1)
    # BOS in the mean pulls every pair together (an attention sink shared by all texts)
    both = embed_texts(gemma, TERMS, "mean-all").cosine()
    off = ~np.eye(len(TERMS), dtype=bool)
    assert both[off].mean() > c[off].mean() + 0.05


def test_vectors_do_not_depend_on_the_other_texts(gemma):
    alone = embed_texts(gemma, ["king"], "mean").vectors[0]
    among = embed_texts(gemma, TERMS, "mean")
    assert np.array_equal(alone, among.vectors[0])
    packed = embed_texts(gemma, TERMS, "mean", parallel=4)
    assert packed.vectors.shape == among.vectors.shape
    # llama.cpp's batch noise, nothing more: measured 0.0021 with 4 texts per decode; bound 10x
    assert np.abs(packed.cosine() - among.cosine()).max() < 0.02
    few = embed_texts(gemma, TERMS[:2], "mean", parallel=32)  # more sequences than texts, a tiny context
    # measured 3.4e-9 (two texts per decode); 1e-6 leaves room for other CPUs' kernels and still catches any mixing
    assert abs(few.cosine()[0, 1] - among.cosine()[0, 1]) < 1e-6


def test_tiny_model_pools_its_own_tokens(tiny, tiny_path):
    """On the fixture model too: each pooling equals numpy over llama-cpp-python's own per-token vectors of
    the text (BOS first): mean leaves BOS out, mean-all keeps it, last takes the last token."""
    import llama_cpp as L

    texts = ["the cat sat", "a dog ran", "hello world"]
    ref = _llama(tiny_path, L.LLAMA_POOLING_TYPE_NONE)
    rows = [np.array(ref.embed(t), dtype=np.float64) for t in texts]
    del ref
    want = {"mean": [r[1:].mean(0) for r in rows], "mean-all": [r.mean(0) for r in rows], "last": [r[-1] for r in rows]}
    for pooling, vectors in want.items():
        got = embed_texts(tiny, texts, pooling).vectors
        # measured max |Δ| 5.8e-8 on values up to 2.6 (float32 vectors, summed in another order): bound 10x
        assert np.abs(got - np.array(vectors)).max() < 6e-7, pooling
    assert not np.allclose(want["mean"], want["last"])


def test_cli_table_query_json(tmp_path):
    res = cli("embed", *TERMS[:6], "--flash-attn", "off")
    out = res.stdout
    assert "6 texts embedded (640 dimensions, pooling mean)" in out
    assert "1 king" in out and "2 queen" in out
    nearest = [line.split() for line in out.splitlines() if line.startswith(("1  king", "3  man"))]
    assert nearest[0][-3:-1] == ["2", "queen"] and nearest[1][-3:-1] == ["4", "woman"]
    d = json.loads(cli("embed", "king", "queen", "banana", "--json", "--vectors", "--flash-attn", "off").stdout)
    assert np.array(d["cosine"]).shape == (3, 3) and d["n_embd"] == 640
    vec = np.array([t["vector"] for t in d["texts"]])
    assert np.allclose(cosine(vec), d["cosine"], atol=1e-6)
    q = json.loads(cli("embed", "-q", "a yellow fruit", "banana", "the stock market", "--json").stdout)
    sims = [r["cosine"] for r in q["query"]["ranking"]]
    assert sims == sorted(sims, reverse=True) and q["query"]["ranking"][0]["text"] == "banana"
    f = tmp_path / "terms.txt"
    f.write_text("king\n\nqueen\n<script>alert(1)</script>\n")
    out_html = tmp_path / "e.html"
    res = cli("embed", "--file", f, "--report", out_html)
    html = out_html.read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<svg" in html and "Nearest neighbours" in html
    # results first: the first section is a result, the model and pooling are folded at the end
    assert html.index("<h2>Cosine similarity") < html.index('<details class="made">') < html.index("pooling")


@pytest.mark.parametrize("args,msg", [
    (["king"], "at least two texts"),
    (["king", "  "], "text 2 is empty"),
    (["-q", "fruit"], "--query needs texts"),
    (["--file", "/nonexistent/terms.txt"], "file not found"),
    (["king", "queen", "--vectors"], "give --json too"),
])
def test_cli_bad_input(args, msg):
    res = cli("embed", *args, ok=False)
    assert res.exit_code != 0
    assert msg in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("args,msg", [  # these load the default model (the slow tier: conftest.SLOW_TESTS)
    (["king", "queen", "--pooling", "first"], "every text would get the same vector"),
    (["king", "The quick brown fox jumps over the lazy dog", "--ctx", "4"], "text 2 is 10 tokens but --ctx is 4"),
])
def test_cli_bad_input_on_the_default_model(args, msg):
    test_cli_bad_input(args, msg)


def test_long_text_in_chunks_equals_llama_cpp_python(tiny_path):
    """A causal model's text longer than --batch is decoded in chunks, as llama.cpp splits a batch into
    ubatches: the same vector as the mean of llama-cpp-python's per-token vectors with that ubatch size.
    (llama.cpp's own MEAN pooling cannot span ubatches: it aborts the process with GGML_ASSERT.)"""
    import llama_cpp as L
    from llama_cpp import Llama

    from llamalens.core.runtime import Model, ModelOptions

    text = " ".join(["the cat sat on the mat and the dog ran"] * 6)
    ref = Llama(str(tiny_path), embedding=True, pooling_type=L.LLAMA_POOLING_TYPE_NONE, n_ctx=256, n_batch=256,
                n_ubatch=16, verbose=False, flash_attn=False)
    want = np.array(ref.embed(text)).astype(np.float64).mean(axis=0)
    with Model(tiny_path, ModelOptions(ctx=256, batch=16, flash_attn="off")) as m:
        es = embed_texts(m, [text, "the cat"], "mean-all")
        assert es.n_tokens[0] > 3 * 16  # really several chunks
        assert np.abs(es.vectors[0] - want).max() <= 1e-5 * np.abs(want).max()
        with Model(tiny_path, ModelOptions(ctx=256, batch=512, flash_attn="off")) as whole:
            one = embed_texts(whole, [text], "mean-all").vectors[0]
        assert cosine([one, es.vectors[0]])[0, 1] > 0.999


@pytest.mark.parametrize("declared,causal,want", [(3, True, "last"), (1, False, "mean-all"), (2, False, "first")])
def test_declared_pooling_of_an_embedding_model(tmp_path, declared, causal, want):
    """An embedding model's GGUF says how to pool (and an encoder is not causal): --pooling model follows it,
    equal to llama-cpp-python with the model's own pooling; an encoder's text is one decode whatever --batch."""
    from llama_cpp import Llama
    from tiny_gguf import write_tiny_gguf

    from llamalens.looks.embed import resolve_pooling
    from llamalens.core.runtime import Model, ModelOptions

    path = write_tiny_gguf(tmp_path / "enc.gguf", pooling_type=declared, causal=causal)
    texts = ["the cat sat on the mat", "hello world", "the dog ran and the cat sat on the mat"]
    with Model(path, ModelOptions(ctx=256, batch=4, flash_attn="off")) as m:
        assert resolve_pooling(m, "model") == want
        es = embed_texts(m, texts, "model")
        assert es.pooling == want
        assert np.array_equal(es.vectors, embed_texts(m, texts, want).vectors)
    ref = Llama(str(path), embedding=True, n_ctx=256, n_batch=256, n_ubatch=256, verbose=False, flash_attn=False)
    assert ref.pooling_type() == declared
    for text, v in zip(texts, es.vectors):
        r = np.array(ref.embed(text))
        assert np.abs(v - r).max() <= 1e-5 * np.abs(r).max(), text


def test_reranker_and_unknown_pooling_refused(tmp_path):
    from tiny_gguf import write_tiny_gguf

    from llamalens.errors import InvalidSettings
    from llamalens.core.runtime import Model, ModelOptions

    with Model(write_tiny_gguf(tmp_path / "rank.gguf", pooling_type=4), ModelOptions(ctx=64)) as m:
        with pytest.raises(InvalidSettings, match="reranker"):
            embed_texts(m, ["a", "b"], "model")
        with pytest.raises(InvalidSettings, match="not one of"):
            embed_texts(m, ["a", "b"], "max")
        assert embed_texts(m, ["the cat", "the dog"], "mean").vectors.shape == (2, 64)
