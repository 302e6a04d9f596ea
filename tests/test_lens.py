"""The logit lens: the last layer reproduces the model's own logits (llama-cpp-python's, computed without the lens)
on tiny GGUFs of four architectures and on the default model; an intermediate layer equals an independent numpy
forward pass; the capture survives a failing callback; the command, its JSON, its stored run and its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from llamalens.cli import main

PROMPT = "the cat sat on the mat and the dog"


def write_arch_gguf(path, tiny_path, arch: str, seed: int = 3, n_embd: int = 64, n_head: int = 4, n_layer: int = 2,
                    out_type: str = "F32", tied: bool = False, softcap: float | None = None, bias: bool = False,
                    window: int | None = None):
    """A tiny `arch` GGUF with the tiny llama fixture's vocabulary (its tokenizer keys copied), seeded random
    weights, norm weights away from 1 (so a lens that skipped them would show), the output matrix of `out_type`
    (F32, F16 or Q8_0, written by the gguf package) or tied to the embeddings."""
    import gguf
    from gguf.quants import quantize

    reader = gguf.GGUFReader(str(tiny_path))
    w = gguf.GGUFWriter(str(path), arch)
    for name, f in reader.fields.items():  # (the tokenizer and the window keys are the only ones added by name)
        if name.startswith("tokenizer."):
            array = f.types[0] == gguf.GGUFValueType.ARRAY
            w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    head_dim, n_ff, n_vocab = n_embd // n_head, 2 * n_embd, len(reader.fields["tokenizer.ggml.tokens"].contents())
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head // 2)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if softcap:
        w.add_final_logit_softcapping(softcap)
    if window:
        w.add_sliding_window(window)
    rng = np.random.default_rng(seed)

    def t(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1 + rng.standard_normal(n) * 0.3).astype(np.float32)

    w.add_tensor("token_embd.weight", t(n_vocab, n_embd, scale=1.0))
    w.add_tensor("output_norm.weight", norm(n_embd))
    if not tied:
        out = t(n_vocab, n_embd, scale=0.5)
        if out_type == "Q8_0":
            w.add_tensor("output.weight", quantize(out, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor("output.weight", out.astype(np.float16) if out_type == "F16" else out)
    if bias:
        w.add_tensor("output.bias", t(n_vocab, scale=1.0))
    kv = head_dim * n_head // 2
    shapes = {"attn_norm": (n_embd,), "attn_q": (n_embd, n_embd), "attn_k": (kv, n_embd), "attn_v": (kv, n_embd),
              "attn_output": (n_embd, n_embd), "ffn_norm": (n_embd,), "ffn_gate": (n_ff, n_embd),
              "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff)}
    if arch in ("qwen3", "gemma3"):
        shapes.update(attn_q_norm=(head_dim,), attn_k_norm=(head_dim,))
    if arch == "gemma3":
        shapes.update(post_attention_norm=(n_embd,), post_ffw_norm=(n_embd,))
    for i in range(n_layer):
        for name, shape in shapes.items():  # norms (1-D) near 1, matrices random
            w.add_tensor(f"blk.{i}.{name}.weight", norm(shape[0]) if len(shape) == 1 else t(*shape))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    return path


def reference_logprobs(path, tokens: list[int]) -> np.ndarray:
    """llama-cpp-python's own logits for every prompt token (Llama(logits_all=True).eval), log-softmaxed in
    float64 here: computed without the lens, its callback or its head."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, logits_all=True, verbose=False, flash_attn=False)
    llm.eval(tokens)
    z = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def check_last_layer(result, ref: np.ndarray, tol: float) -> float:
    """Every position's last-layer cell against the reference: same top 10 in order, the same logprobs there, the
    same entropy; returns the largest difference seen."""
    worst = 0.0
    for p in result.positions:
        cell, row = p.layers[-1], ref[p.position]
        order = np.argsort(-row, kind="stable")[:10]
        assert [t.id for t in cell.top[:10]] == list(order), p.position
        worst = max(worst, max(abs(t.logprob - row[t.id]) for t in cell.top))
        h = -(np.exp(row) * row).sum()
        worst = max(worst, abs(cell.entropy - h))
        for t in [cell.final, *cell.target]:  # the followed tokens: rank by counting, probability
            assert t.rank == 1 + int((row > row[t.id]).sum()), (p.position, t)
            worst = max(worst, abs(np.log(t.prob) - row[t.id]))
        assert cell.kl_to_final < tol
    assert worst < tol, worst
    return worst


ARCHS = {  # name -> write_arch_gguf options
    "llama": {},
    "llama-q8_0": {"out_type": "Q8_0", "n_embd": 64},
    "qwen2-bias": {"bias": True},
    "qwen2-tied": {"tied": True},
    "qwen3-f16": {"out_type": "F16"},
    "gemma3-softcap": {"tied": True, "softcap": 5.0},
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_last_layer_is_the_models_own_distribution(name, tiny_path, tmp_path, monkeypatch):
    """On tiny GGUFs of llama, qwen2 (with an output bias, and with tied embeddings), qwen3 and gemma3 (tied, with a
    final logit soft-cap), an F16 and a Q8_0 output matrix (the vector rounded as llama.cpp does), the lens's last
    layer equals llama-cpp-python's log-softmax at every position (top 10, their logprobs, the entropy): measured
    up to 1.3e-5 nats; the tolerance 1.5e-4 is 10x that. Leaving out the Q8_0 rounding, the soft-cap, the bias or
    the norm's weight breaks it (see the closing note's figures). The vocabulary is projected in blocks of 256
    rows here (two blocks), so the running sums, ranks and top N cross a block edge as on a real vocabulary."""
    from llamalens.core import unembed
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.run.lens import LensSpec, lens

    monkeypatch.setattr(unembed, "BLOCK_BYTES", 1)

    arch = name.split("-")[0]
    path = write_arch_gguf(tmp_path / f"{name}.gguf", tiny_path, arch, **ARCHS[name])
    with Model(path, ModelOptions(ctx=256, flash_attn="off")) as m:
        tokens = m.prompt_tokens(PROMPT)
        result = lens(m, LensSpec(PROMPT, ["d", " s", "!"], positions="1:", top=10))
        assert result.head["architecture"] == arch
        assert result.final_check["same_top10"] and result.final_check["max_abs_logprob_diff"] < 1.5e-4
    check_last_layer(result, reference_logprobs(path, tokens), 1.5e-4)


def numpy_llama_layers(path, tokens: list[int]) -> list[np.ndarray]:
    """An independent forward pass of the tiny llama fixture in numpy (float64), from its GGUF tensors: the
    residual stream after each layer [n_tokens, n_embd]. RoPE as llama.cpp's NORM mode (adjacent pairs)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    T = {t.name: np.asarray(t.data, dtype=np.float64) for t in r.tensors}
    n_embd, n_head = T["token_embd.weight"].shape[1], int(r.fields["llama.attention.head_count"].contents())
    eps, hd, n = float(r.fields["llama.attention.layer_norm_rms_epsilon"].contents()), n_embd // n_head, len(tokens)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x):  # x [n, heads, hd]
        pos = np.arange(n)[:, None, None]
        theta = pos * 10000.0 ** (-np.arange(0, hd, 2) / hd)[None, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)
        return out

    h, out = T["token_embd.weight"][tokens], []
    n_layer = int(r.fields["llama.block_count"].contents())
    for i in range(n_layer):
        p = f"blk.{i}."
        x = rms(h, T[p + "attn_norm.weight"])
        q, k, v = (x @ T[p + f"attn_{c}.weight"].T for c in "qkv")
        q, k, v = rope(q.reshape(n, n_head, hd)), rope(k.reshape(n, n_head, hd)), v.reshape(n, n_head, hd)
        # llama.cpp's KV cache holds F16, and its products with an F16 matrix round the other side to F16 too
        q, k, v = (c.astype(np.float16).astype(np.float64) for c in (q, k, v))
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)).astype(np.float16).astype(np.float64)
        h = h + np.einsum("hqk,khd->qhd", a, v).reshape(n, n_embd) @ T[p + "attn_output.weight"].T
        x = rms(h, T[p + "ffn_norm.weight"])
        g = x @ T[p + "ffn_gate.weight"].T
        h = h + ((g / (1 + np.exp(-g))) * (x @ T[p + "ffn_up.weight"].T)) @ T[p + "ffn_down.weight"].T
        out.append(h)
    z = rms(h, T["output_norm.weight"]) @ T["output.weight"].T
    out.append(z)
    return out


def test_an_intermediate_layer_equals_an_independent_forward_pass(tiny, tiny_path):
    """Layer 0's lens on the tiny llama fixture against a numpy forward pass of the same weights (which is first
    checked to reproduce llama.cpp's final logits): same top 10, their logprobs, the entropy and the KL to the
    final distribution; logprobs within 4e-5 nats (measured 3.4e-6
    between llama.cpp's float32 and numpy's float64; a lens reading another layer's tensor, or the l_out rows of
    other positions, is off by whole nats)."""
    from llamalens.run.lens import LensSpec, lens

    tokens = tiny.prompt_tokens(PROMPT)
    layers = numpy_llama_layers(tiny_path, tokens)
    z = layers[-1]
    ref_final = z - z.max(1, keepdims=True)
    ref_final -= np.log(np.exp(ref_final).sum(1, keepdims=True))
    # the numpy pass is right: 1.7e-4 nats from llama.cpp's logits (float32 against float64), the tolerance 10x that
    assert np.abs(ref_final - reference_logprobs(tiny_path, tokens)).max() < 2e-3
    result = lens(tiny, LensSpec(PROMPT, positions="2,5,-1", top=10))
    assert [p.position for p in result.positions] == [2, 5, len(tokens) - 1]
    import gguf

    r = gguf.GGUFReader(str(tiny_path))
    T = {t.name: np.asarray(t.data, dtype=np.float64) for t in r.tensors}
    h = layers[0]
    x = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5) * T["output_norm.weight"]
    ref0 = x @ T["output.weight"].T
    ref0 -= ref0.max(1, keepdims=True)
    ref0 -= np.log(np.exp(ref0).sum(1, keepdims=True))
    for p in result.positions:
        cell, row = p.layers[0], ref0[p.position]
        assert cell.layer == 0
        assert [t.id for t in cell.top] == list(np.argsort(-row, kind="stable")[:10])
        assert max(abs(t.logprob - row[t.id]) for t in cell.top) < 4e-5
        kl = (np.exp(ref_final[p.position]) * (ref_final[p.position] - row)).sum()  # KL(final || layer 0)
        # measured 3.9e-6 (KL) and 2.4e-6 (entropy) nats; the tolerances 10x that
        assert abs(cell.kl_to_final - kl) < 4e-5 and abs(cell.entropy + (np.exp(row) * row).sum()) < 3e-5


def test_a_failing_callback_is_an_error_not_a_crash(tiny, monkeypatch):
    """An exception inside the graph callback (here: reading a tensor) becomes a clear LlamalensError after the
    decode, never an exception through C (which would stop the graph half computed); the model works after."""
    from llamalens.core import lens as core_lens
    from llamalens.errors import LlamalensError
    from llamalens.run.lens import LensSpec, lens

    def broken(self, layer, tensor):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(core_lens.LayerTap, "_take", broken)
    with pytest.raises(LlamalensError, match="reading a layer during decode failed: RuntimeError: disk on fire"):
        lens(tiny, LensSpec(PROMPT))
    monkeypatch.undo()
    assert lens(tiny, LensSpec(PROMPT, layers="-1")).final_check["same_top10"]


def test_an_unknown_architecture_is_refused_by_name(tmp_path):
    from llamalens.core.unembed import Head
    from llamalens.errors import InvalidInput
    from llamalens.modelfiles.gguf_header import GGUFHeader

    with pytest.raises(InvalidInput, match="architecture 'phi3'.*llama, qwen2, qwen3, gemma3"):
        Head(GGUFHeader(tmp_path / "x.gguf", 3, {"general.architecture": "phi3"}))


def test_settles_at_and_indices():
    from llamalens.errors import InvalidInput
    from llamalens.run.lens import indices, settles_at

    assert settles_at([5, 7, 7, 3, 7, 7], [0, 1, 2, 3, 4, 5], 7) == 4
    assert settles_at([7, 7], [10, 11], 7) == 10
    assert settles_at([7, 3], [0, 1], 7) is None
    assert indices("0,4,-1", 10, "--positions", []) == [0, 4, 9]
    assert indices("2:5,8:", 10, "--positions", []) == [2, 3, 4, 8, 9]
    with pytest.raises(InvalidInput, match="--layers 12 is out of range"):
        indices("12", 10, "--layers", [])


def test_lens_command_json_store_show_report_export(tiny_path, tmp_path):
    """The command on the tiny model: --json in the documented shape (the final layer last), a run of kind lens
    that show, report (HTML, Markdown) and export read back; bad options are one-line errors."""
    db = str(tmp_path / "runs.db")
    base = ["-m", str(tiny_path), "--store", db, "--ctx", "256"]
    res = CliRunner().invoke(main, ["lens", PROMPT, "--target", " cat", "--target", " dog", "--positions", "-2:",
                                    "--layers", "0", "--top", "3", "--json", *base])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert [p["position"] for p in d["positions"]] == [len(d["tokens"]) - 2, len(d["tokens"]) - 1]
    cells = d["positions"][-1]["layers"]
    assert [c["layer"] for c in cells] == [0, 1]  # --layers 0, and the last layer always
    assert set(cells[0]) >= {"layer", "top", "entropy", "kl_to_final", "target"}
    assert [t["text"] for t in cells[0]["target"]] == [" cat", " dog"] and len(cells[0]["top"]) == 3
    assert set(cells[0]["top"][0]) == {"id", "text", "prob", "logprob"}
    assert cells[-1]["kl_to_final"] < 1e-6 and cells[-1]["final"]["rank"] == 1
    run = str(d["run_id"])
    shown = CliRunner().invoke(main, ["show", run, "--store", db, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["positions"] == d["positions"]
    for out in ("lens.html", "lens.md"):
        rep = CliRunner().invoke(main, ["report", run, "--store", db, "-o", str(tmp_path / out)])
        assert rep.exit_code == 0, rep.output
    page = (tmp_path / "lens.html").read_text(encoding="utf-8")
    assert 'class="grid"' in page and "KL to final" in page and "target ·cat rank" in page
    assert "| layer 1 (last) |" in (tmp_path / "lens.md").read_text(encoding="utf-8")
    exp = CliRunner().invoke(main, ["export", run, "--store", db, "--format", "csv", "-o", str(tmp_path / "c.csv")])
    assert exp.exit_code == 0, exp.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "c.csv")
    assert len(table) == 4 and {"layer", "top_text", "kl_to_final", "target1_rank"} <= set(table.columns)
    for bad, message in ((["--positions", "99"], "--positions 99 is out of range"),
                         (["--layers", "a:b"], "--layers 'a:b' is not a list of indices"),
                         (["--target", ""], "a --target is empty")):
        res = CliRunner().invoke(main, ["lens", PROMPT, *bad, *base])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output


def test_default_model_lens_matches_its_logits_and_paris_rises(gemma, gemma_llama):
    """The default model (Gemma 3 270M Q4_K_M, tied Q8_0 embeddings): the last layer equals llama-cpp-python's
    logits at every position within 2.5e-4 nats (measured 2.4e-5; without the Q8_0 rounding of the vector 0.23),
    and " Paris" becomes the top token in the upper layers at the last position, not in the lower ones."""
    from llamalens.run.lens import LensSpec, lens

    prompt = "The Eiffel Tower is in the city of"
    result = lens(gemma, LensSpec(prompt, [" Paris"], top=10))
    tokens = gemma.prompt_tokens(prompt)
    gemma_llama.reset()
    gemma_llama.eval(tokens)
    z = np.array(gemma_llama.scores[: len(tokens)], dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    ref = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    check_last_layer(result, ref, 2.5e-4)
    ranks = [c.target[0].rank for c in result.positions[-1].layers]
    assert ranks[-1] == 1 and min(ranks[:8]) > 100 and result.positions[-1].settles_at >= 10


def test_python_api_lens(tiny_path, tmp_path):
    """ll.lens: the same LensResult as the command, a DataFrame of cells, a notebook display (the report), stored
    as a run of kind lens that ll.open_run reads; save=False stores nothing."""
    import llamalens as ll

    res = ll.lens(PROMPT, target=" cat", layers="0", positions="-1", model=str(tiny_path), ctx=256,
                  store=str(tmp_path / "r.db"))
    frame = res.to_pandas()
    assert list(frame["layer"]) == [0, 1] and frame["target0_text"].tolist() == [" cat", " cat"]
    assert 'class=&quot;grid&quot;' in res._repr_html_()  # the report, in an iframe's srcdoc
    assert ll.open_run(res.run_id, store=str(tmp_path / "r.db")).kind == "lens"
    assert ll.lens(PROMPT, positions="-1", model=str(tiny_path), ctx=256, save=False).run_id is None
    # two models: a model against itself parts nowhere (KL 0 up to float32 sums: measured 0.0; the tolerance 1e-6)
    two = ll.lens(PROMPT, positions="-2:", model=[str(tiny_path), str(tiny_path)], ctx=256, save=False)
    frame = two.to_pandas()
    assert frame["other_kl"].abs().max() < 1e-6 and frame["other_same_top"].all() and two.other["final_check"]
    with pytest.raises(Exception, match="one model, or two"):
        ll.lens(PROMPT, model=[str(tiny_path)] * 3, save=False)
    att = ll.lens(PROMPT, positions="-1", attention=-1, model=str(tiny_path), ctx=256, flash_attn="off", save=False)
    assert set(att.to_pandas("attention").columns) >= {"layer", "head", "attended", "weight"}


def truncated_gguf(src, dst, n_keep: int):
    """A copy of the GGUF `src` with only its first n_keep layers (block_count = n_keep; blk.i for i >= n_keep
    left out; every other key and tensor copied byte for byte, quantized ones included). llama.cpp's logits of the
    copy are the lens of layer n_keep - 1 of the whole model, computed without the lens: its residual stream after
    that layer goes through the same final norm and output matrix."""
    import re

    import gguf

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = n_keep if name == f"{arch}.block_count" else f.contents()
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        w.add_key_value(name, value, f.types[0], sub_type=f.types[-1] if array else None)
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m[1]) >= n_keep:
            continue
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)  # quantized: its bytes, [rows, row bytes]
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    return dst


def test_two_models_layer_by_layer(tiny_path, tmp_path, monkeypatch):
    """`lens -m A -m B` against an independent reference: for each layer l, copies of A and B cut after layer l
    (truncated_gguf) decoded by llama-cpp-python give each model's lens of layer l without the lens's code; the
    numpy KL(A || B) of their log-softmaxes and their top tokens must equal the run's cells. B is llama.cpp's own
    Q4_0 quantization of A (every matrix quantized: the layers part a little at each depth). Measured: KL within
    5.5e-6 nats of the reference, A's and B's logprobs within 8.4e-6; the tolerances are 10x that. Flash attention
    off on both sides (llama-cpp-python's default; on, it moves these random layers by up to 0.4 nats)."""
    from llamalens.core import unembed
    from llamalens.core.runtime import quantize

    monkeypatch.setattr(unembed, "BLOCK_BYTES", 1)  # blocks of 256 rows: the KL's running sums cross a block edge
    a = write_arch_gguf(tmp_path / "a.gguf", tiny_path, "llama", n_layer=3, out_type="Q8_0")
    b = quantize(a, tmp_path / "b.gguf", "Q4_0")
    db = str(tmp_path / "runs.db")
    res = CliRunner().invoke(main, ["lens", PROMPT, "-m", str(a), "-m", str(b), "--top", "10", "--positions", "1:",
                                    "--json", "--store", db, "--ctx", "256", "--flash-attn", "off"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["other"]["model"]["quantization"] == "Q4_0" and d["other"]["final_check"]["same_top10"]
    from llama_cpp import Llama

    probe = Llama(str(a), n_ctx=256, verbose=False, vocab_only=True)
    tokens = probe.tokenize(PROMPT.encode(), add_bos=True, special=True)
    probe.close()
    worst = {"kl": 0.0, "lp": 0.0}
    for layer in range(3):
        refs = [reference_logprobs(truncated_gguf(m, tmp_path / f"{m.stem}-{layer}.gguf", layer + 1), tokens)
                if layer < 2 else reference_logprobs(m, tokens) for m in (a, b)]
        for p in d["positions"]:
            cell = p["layers"][layer]
            assert cell["layer"] == layer
            ra, rb = refs[0][p["position"]], refs[1][p["position"]]
            kl = float((np.exp(ra) * (ra - rb)).sum())
            worst["kl"] = max(worst["kl"], abs(cell["other"]["kl"] - kl))
            assert cell["other"]["same_top"] == (ra.argmax() == rb.argmax())
            for side, ref in ((cell["top"], ra), (cell["other"]["top"], rb)):
                assert [t["id"] for t in side] == list(np.argsort(-ref, kind="stable")[:10])
                worst["lp"] = max(worst["lp"], max(abs(t["logprob"] - ref[t["id"]]) for t in side))
    assert worst["kl"] < 5.5e-5 and worst["lp"] < 1e-4, worst
    run = str(d["run_id"])
    shown = CliRunner().invoke(main, ["show", run, "--store", db])
    assert shown.exit_code == 0 and "KL(A || B)" in shown.output and "same top" in shown.output
    exp = CliRunner().invoke(main, ["export", run, "--store", db, "--format", "csv", "-o", str(tmp_path / "c.csv")])
    assert exp.exit_code == 0, exp.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "c.csv")
    cells = {(c["layer"], p["position"]): c["other"]["kl"] for p in d["positions"] for c in p["layers"]}
    assert np.allclose(table["other_kl"], [cells[(r.layer, r.position)] for r in table.itertuples()])
    rep = CliRunner().invoke(main, ["report", run, "--store", db, "-o", str(tmp_path / "two.html")])
    assert rep.exit_code == 0, rep.output
    assert "Two models, layer by layer" in (tmp_path / "two.html").read_text(encoding="utf-8")
    for bad, message in (([str(a), str(a)], "is given twice"), ([str(a), str(b), str(a)], "takes one model, or two")):
        res = CliRunner().invoke(main, ["lens", PROMPT, *[x for m in bad for x in ("-m", m)], "--store", db])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("models", [1, 2])
def test_projection_memory_is_within_its_estimate(tiny, models, monkeypatch):
    """What the projection allocates (tracemalloc's peak: numpy reports its arrays to it) stays within
    unembed.lens_bytes, the figure the memory check adds for a lens, and that figure is not a gross overstatement.
    Blocks of 256 rows (BLOCK_BYTES 1) so that the per-block buffers are what they are on a large vocabulary.
    Measured on the tiny model (200 cells): peak / estimate 0.85 (one model) and 0.79 (two); on the default model
    (576 cells, 64 MiB blocks) 183 / 246 MiB (0.74) and 200 / 356 MiB (0.56)."""
    import tracemalloc

    from llamalens.core import unembed
    from llamalens.core.lens import capture

    monkeypatch.setattr(unembed, "BLOCK_BYTES", 1)
    prompt = " ".join(["the cat sat on the mat"] * 5)
    tokens = tiny.prompt_tokens(prompt)
    head, positions, layers = unembed.Head(tiny.header), list(range(len(tokens)))[-100:], [0, 1]
    cap = capture(tiny, tokens, positions, layers)
    side = (head, cap.hidden.transpose(1, 0, 2), cap.logits, cap.logits.argmax(axis=1)[:, None])
    unembed.project_together([side] * models, 10)  # warm: imports and caches are not the projection's
    tracemalloc.start()
    try:
        unembed.project_together([side] * models, 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = unembed.lens_bytes(tiny.header, models, len(positions) * len(layers), len(positions))
    assert peak <= bound < 1.5 * peak, (peak, bound)  # measured bound / peak 1.17 (one model), 1.27 (two)


def test_the_memory_check_counts_the_lens(tiny_path, tmp_path, monkeypatch):
    """The lens states its own buffers before loading and the memory check adds them ('analysis' in the estimate):
    with RAM for the model but not for the lens's buffers the command refuses with the numbers, before loading."""
    from llamalens.modelfiles.find import resolve_source
    from llamalens.modelfiles.memory import for_model
    from llamalens.run.lens import LensSpec, memory_need
    from llamalens.settings import ModelOptions

    found, options = resolve_source(str(tiny_path)), ModelOptions(ctx=256)
    need = memory_need(LensSpec(PROMPT), 1)
    plain, counted = for_model(found, options, rows=128), for_model(found, options, rows=128, analysis=need)
    assert counted.analysis > 0 and counted.total == plain.total + counted.analysis
    assert "analysis" in counted.breakdown() and "analysis" not in plain.breakdown()
    monkeypatch.setenv("LLAMALENS_MEMORY_LIMIT", str(plain.total + counted.analysis // 2))
    base = ["lens", PROMPT, "-m", str(tiny_path), "--store", str(tmp_path / "r.db"), "--ctx", "256"]
    res = CliRunner().invoke(main, base)
    assert res.exit_code != 0 and "the lens's own buffers: up to" in res.output
    assert "analysis" in res.output and "loading" not in res.output and "Traceback" not in res.output, res.output
    monkeypatch.setenv("LLAMALENS_MEMORY_LIMIT", str(counted.total + (1 << 20)))
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 0, res.output


def numpy_attention(q: np.ndarray, k: np.ndarray, at: int, scale: float, window: int | None = None) -> np.ndarray:
    """The attention weights of position `at` [n_head, at + 1] from the captured Q [n, n_head, d] and K
    [n, n_head_kv, d] (after RoPE), in float64: both rounded to F16 as llama.cpp's F16 KV cache and its F16 dot
    products do, query head h reading KV head h // (n_head / n_head_kv) (grouped-query attention), causal, and
    with a sliding window only the last `window` positions (llama.cpp: masked when at - j >= window)."""
    q, k = (x.astype(np.float16).astype(np.float64) for x in (q, k))
    n_head, n_kv = q.shape[1], k.shape[1]
    s = np.einsum("hd,khd->hk", q[at], k[: at + 1][:, np.arange(n_head) // (n_head // n_kv)]) * scale
    if window:
        s[:, : max(0, at - window + 1)] = -np.inf
    w = np.exp(s - s.max(axis=1, keepdims=True))
    return w / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_attention_weights_equal_a_recomputation_from_q_and_k(arch, tiny_path, tmp_path):
    """The attention view's weights (kq_soft_max-N) against numpy from the same decode's Qcur-N and Kcur-N nodes:
    llama with grouped-query attention (4 query heads on 2 KV heads), and gemma3 with a sliding window of 4 on its
    local layers (0 to 4; layer 5 global) and its query scaled by 1/sqrt(head_dim) after RoPE. Every row sums to 1
    and puts nothing outside positions 0 to p (future positions and, on local layers, those before the window).
    Measured max |difference| 2.7e-7 (llama) and 1.2e-7 (gemma3); the tolerance 3e-6 is 10x that (a wrong head
    grouping, scale, window or row is off by 1e-2 or more)."""
    from llamalens.core.lens import capture
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.run.lens import LensSpec, lens

    opts = {"llama": {"n_layer": 3}, "gemma3": {"n_layer": 6, "tied": True, "window": 4}}[arch]
    path = write_arch_gguf(tmp_path / f"{arch}.gguf", tiny_path, arch, **opts)
    n_layer, hd = opts["n_layer"], 16
    with Model(path, ModelOptions(ctx=256, flash_attn="off")) as m:
        tokens = m.prompt_tokens(PROMPT)
        at = len(tokens) - 3
        nodes = tuple(f"{name}-{i}" for i in range(n_layer) for name in ("Qcur", "Kcur"))
        cap = capture(m, tokens, [len(tokens) - 1], list(range(n_layer)), attention_at=at, nodes=nodes)
        result = lens(m, LensSpec(PROMPT, positions="-1", attention=str(at)))
    worst = 0.0
    for i in range(n_layer):
        window = opts.get("window") if arch == "gemma3" and i % 6 < 5 else None
        ref = numpy_attention(cap.nodes[f"Qcur-{i}"][-1][0], cap.nodes[f"Kcur-{i}"][-1][0], at, hd ** -0.5, window)
        got = np.array(result.attention["layers"][i]["heads"])
        assert got.shape == ref.shape and np.allclose(got.sum(axis=1), 1, atol=1e-5)
        assert cap.attention[i][:, at + 1:].max() == 0  # the future (and the KV cells' padding) masked
        if window:
            assert got[:, : at - window + 1].max() == 0
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst < 3e-6, worst


def test_lens_command_attention(tiny_path, tmp_path):
    """--attention on the command: it sets flash attention off and says so, the run stores the weights (JSON,
    show, the report's "Where it looked", the attention table in Python); the Python API refuses a model loaded
    with flash attention on; a bad position is a one-line error."""
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.errors import InvalidInput
    from llamalens.run.lens import LensSpec, lens, load_lens
    from llamalens.store import Store

    db = str(tmp_path / "runs.db")
    base = ["-m", str(tiny_path), "--store", db, "--ctx", "256"]
    res = CliRunner().invoke(main, ["lens", PROMPT, "--attention", "-1", "--positions", "-1", "--json", *base])
    assert res.exit_code == 0, res.output
    assert "sets --flash-attn off" in res.stderr
    d = json.loads(res.stdout)
    att = d["attention"]
    n = len(d["tokens"])
    assert att["position"] == n - 1 and [a["layer"] for a in att["layers"]] == d["layers"]
    assert all(len(row) == n and abs(sum(row) - 1) < 1e-5 for a in att["layers"] for row in a["heads"])
    run = str(d["run_id"])
    shown = CliRunner().invoke(main, ["show", run, "--store", db])
    assert shown.exit_code == 0 and "most attended position" in shown.output
    rep = CliRunner().invoke(main, ["report", run, "--store", db, "-o", str(tmp_path / "att.html")])
    assert rep.exit_code == 0 and "Where it looked" in (tmp_path / "att.html").read_text(encoding="utf-8")
    table = load_lens(Store(db), run).to_pandas("attention")
    assert len(table) == len(att["layers"]) * len(att["layers"][0]["heads"]) * n
    assert np.allclose(table.groupby(["layer", "head"])["weight"].sum(), 1, atol=1e-5)
    with Model(tiny_path, ModelOptions(ctx=256, flash_attn="on")) as m:
        with pytest.raises(InvalidInput, match="flash attention off"):
            lens(m, LensSpec(PROMPT, attention="-1"))
    bad = CliRunner().invoke(main, ["lens", PROMPT, "--attention", "1,2", *base])
    assert bad.exit_code != 0 and "--attention '1,2' is not one position" in bad.output and "Traceback" not in bad.output
