"""The commands as a user runs them (click's CliRunner), on the tiny model and the default one."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from llamalens.cli import main
from reference import log_softmax


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def test_help_lists_every_command():
    out = run("--help").output
    for cmd in ("models", "tokenize", "next", "generate"):
        assert cmd in out


def test_tokenize_json(tiny_path, tiny):
    res = run("tokenize", "the cat sat", "--model", tiny_path, "--json")
    d = json.loads(res.stdout)
    assert d["count"] == len(d["tokens"]) == len(tiny.tokenize("the cat sat"))
    assert b"".join(bytes.fromhex(t["bytes"]) for t in d["tokens"]).decode().strip() == "the cat sat"


def test_tokenize_default_model_table():
    res = run("tokenize", "Preposterous, I'm flabbergasted!")
    assert "tokens, 32 bytes" in res.stdout
    assert "·fl" in res.stdout  # leading spaces shown


def test_next_json_is_exact(tiny_path, tiny):
    d = json.loads(run("next", "the cat", "--model", tiny_path, "--top", 5, "--flash-attn", "off", "--json").stdout)
    with tiny.context(n_ctx=256) as ctx:
        row = ctx.prefill(tiny.prompt_tokens("the cat"))
    lsm = log_softmax(row)
    assert [t["id"] for t in d["top"]] == list(np.argsort(-lsm, kind="stable")[:5])
    for t in d["top"]:
        assert abs(t["logprob"] - lsm[t["id"]]) < 1e-6 and abs(t["prob"] - math.exp(t["logprob"])) < 1e-12
    assert abs(d["entropy"] - float(-(np.exp(lsm) * lsm).sum())) < 1e-6


def test_next_with_samplers_is_softmax_of_scaled_truncated_logits(tiny_path, tiny):
    """`next -t ... --top-k ... --top-p ...`: each column equals numpy's softmax(logits / T) over the tokens
    that top_k and top_p keep (raw ranking), 0 for the others; T=0 is one-hot on the argmax."""
    d = json.loads(run("next", "the cat", "--model", tiny_path, "--top", 12, "--flash-attn", "off", "--json",
                       "-t", "0,0.5,2", "--top-k", "0,3", "--top-p", "1,0.6").stdout)
    with tiny.context(n_ctx=256) as ctx:
        logits = ctx.prefill(tiny.prompt_tokens("the cat")).astype(np.float64)
    p = np.exp(log_softmax(logits))
    order = np.lexsort((np.arange(len(p)), -p))
    ids = [t["id"] for t in d["top"]]
    assert ids == order[:12].tolist()
    assert len(d["chains"]) == 12
    for ch in d["chains"]:
        s = ch["settings"]
        keep = order if s["top_k"] == 0 else order[:s["top_k"]]
        if s["top_p"] < 1:  # llama.cpp's top_p: the smallest prefix whose mass reaches p (at least one token)
            q = p[keep] / p[keep].sum()
            keep = keep[:int(np.searchsorted(np.cumsum(q), s["top_p"]) + 1)]
        final = ch["stages"][-1]
        if s["temperature"] == 0:
            want = [1.0 if i == order[0] else 0.0 for i in ids]
        else:
            z = logits[keep] / s["temperature"]
            q = np.exp(z - z.max())
            by = dict(zip(keep.tolist(), q / q.sum()))
            want = [by.get(i, 0.0) for i in ids]
            assert final["survivors"] == len(keep)
        assert np.allclose(final["probs"], want, atol=1e-6), ch["label"]
    labels = [ch["label"] for ch in d["chains"]]
    assert "T=0.5 top_k=3 top_p=0.6" in labels and "T=2" in labels
    table = run("next", "the cat", "--model", tiny_path, "-t", "0.5,2").stdout
    assert "T=0.5" in table and "T=2" in table and "tokens left" in table
    res = run("next", "the cat", "--model", tiny_path, "-t", "0,1,2", "--top-k", "1,2,3,4,5", ok=False)
    assert res.exit_code == 2 and "at most 12" in res.output
    res = run("next", "the cat", "--model", tiny_path, "--top-p", "0", ok=False)
    assert res.exit_code == 1 and "top-p 0.0 is out of range" in res.output



def test_next_report(tiny_path, tmp_path):
    out = tmp_path / "next.html"
    run("next", "the <b>cat</b>", "--model", tiny_path, "-t", "0,0.5,2", "--top-k", "3", "--report", out)
    html = out.read_text()
    assert html.count("<svg") >= 1 and "T=0.5 top_k=3" in html and "T=2 top_k=3" in html
    assert "the &lt;b&gt;cat&lt;/b&gt;" in html and "<b>cat</b>" not in html
    res = run("next", "the cat", "--model", tiny_path, "--report", out, ok=False)
    assert res.exit_code == 2 and "give -t, --top-k" in res.output


def test_text_coloured_by_confidence(tiny_path):
    """generate --text / score --text: the text, each token on the background of its probability bucket
    (the same probabilities --json reports); plain text where colours are off."""
    import re

    args = ["--model", tiny_path, "-n", 24, "--seed", 4, "-t", 1.5, "--top-k", 0, "--top-p", 1, "--min-p", 0]
    d = json.loads(run("generate", "the cat", *args, "--json").stdout)
    res = CliRunner().invoke(main, [str(a) for a in ["generate", "the cat", *args, "--text"]], color=True)
    assert res.exit_code == 0, res.output
    body = res.stdout.split("\n\nprobability of each token:")[0]
    segs = re.findall(r"\x1b\[30m\x1b\[48;2;(\d+);(\d+);(\d+)m(.*?)\x1b\[0m", body, flags=re.S)
    colours = {(229, 57, 53): 0, (251, 140, 0): 1, (253, 216, 53): 2, (156, 204, 101): 3, (67, 160, 71): 4}
    want = []
    for t in d["tokens"]:
        if t["text"]:
            b = 0 if t["prob"] < 0.1 else 1 if t["prob"] < 0.3 else 2 if t["prob"] < 0.6 else 3 if t["prob"] < 0.9 else 4
            want += [b] * len([x for x in t["text"].split("\n") if x])
    assert [colours[tuple(map(int, g[:3]))] for g in segs] == want
    plain = re.sub(r"\x1b\[[0-9;]*m", "", body).replace("⏎\n", "\n")
    # nothing lost: the shown text, with <0xNN> read back as bytes, is exactly the prompt + the tokens' bytes
    shown = b"".join(bytes([int(x[3:5], 16)]) if x.startswith("<0x") else x.encode()
                     for x in re.findall(r"<0x[0-9A-F]{2}>|.", plain, flags=re.S))
    assert shown == b"the cat" + b"".join(bytes.fromhex(t["bytes"]) for t in d["tokens"])
    assert len(set(want)) >= 2  # a hot sample spans several buckets
    out = run("score", "the cat sat on the mat", "--model", tiny_path, "--text").stdout
    assert out.lstrip().startswith("the cat sat on the mat") and "colours show on a terminal" in out


def test_flowing_text_keeps_every_byte():
    from llamalens.visible import flowing

    assert flowing("a\nb", b"a\nb".hex()) == "a⏎\nb"
    # a token holding a newline and the first byte of a 3-byte character: the byte stays visible
    assert flowing("\n\ufffd", b"\n\xe2".hex()) == "⏎\n<0xE2>"
    assert flowing("x\ty\n") == "x⇥y⏎\n"


def test_generate_json_shape(tiny_path):
    d = json.loads(run("generate", "the cat", "--model", tiny_path, "-n", 7, "--seed", 3, "--logprobs", 2,
                       "--json").stdout)
    assert set(d) == {"model", "prompt", "settings", "text", "finish_reason", "tokens", "timing"}
    assert d["settings"]["seed"] == 3 and d["model"]["architecture"] == "llama"
    assert len(d["tokens"]) == 7 and all(len(t["top"]) == 2 for t in d["tokens"])
    keys = {"position", "id", "text", "bytes", "logprob", "sampled_logprob", "rank", "entropy", "candidates", "top"}
    assert keys <= set(d["tokens"][0])
    assert d["timing"]["generated_tokens"] == 7


def test_generate_table_on_default_model():
    res = run("generate", "The capital of France is", "-t", 0, "-n", 4)
    assert "top alternatives" in res.stdout and "tokens/s" in res.stdout and "finish: length" in res.stdout


def test_models_lists_folder_and_default(tiny_path, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "mine.gguf").write_bytes(tiny_path.read_bytes())
    (folder / "broken.gguf").write_bytes(b"not a model")
    monkeypatch.setenv("LLAMALENS_MODELS", str(folder))
    out = json.loads(run("models", "--json").stdout)
    assert "AVX" in out["build"]["system_info"] or "NEON" in out["build"]["system_info"]
    d = out["models"]
    by = {m["name"]: m for m in d}
    assert by["mine"]["vocab_size"] == 312 and by["mine"]["architecture"] == "llama"
    assert by["broken"]["architecture"].startswith("invalid: ")
    assert any(m["default"] and m["quantization"] == "Q4_K_M" and m["vocab_size"] == 262144 for m in d)
    # and a name resolves to the file
    res = run("tokenize", "hi", "--model", "mine", "--json")
    assert json.loads(res.stdout)["count"] >= 1


# -- bad input: one line, the fix named, non-zero exit, no traceback -----------------------------
def _bad(args, *words):
    res = run(*args, ok=False)
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    err = res.output.strip().splitlines()[-1]
    for w in words:
        assert w.lower() in err.lower(), err
    return err


def test_bad_models(tmp_path, tiny_path):
    _bad(["next", "x", "--model", tmp_path / "missing.gguf"], "not found")
    notgguf = tmp_path / "a.gguf"
    notgguf.write_bytes(b"\x89PNG" + b"\0" * 64)
    _bad(["next", "x", "--model", notgguf], "not a GGUF")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_path.read_bytes()[:-4096])
    _bad(["generate", "x", "--model", cut], "truncated")
    _bad(["next", "x", "--model", "no-such-model"], "unknown model name", "models found")


@pytest.mark.parametrize("opt, value, word", [
    ("--temperature", -1, "temperature"), ("--top-p", 0, "top-p"), ("--top-p", 1.01, "top-p"),
    ("--min-p", 2, "min-p"), ("--typical-p", -0.5, "typical-p"), ("--top-k", -3, "top-k"),
    ("--repeat-penalty", 0, "repeat-penalty"), ("--max-tokens", 0, "max-tokens"),
])
def test_bad_settings(tiny_path, opt, value, word):
    _bad(["generate", "x", "--model", tiny_path, opt, value], word, "range")


def test_prompt_longer_than_context(tiny_path):
    err = _bad(["generate", "the cat " * 40, "--model", tiny_path, "--ctx", 16], "context holds 16", "--ctx")
    assert "tokens" in err
    _bad(["next", "the cat " * 40, "--model", tiny_path, "--ctx", 16], "context holds 16")


def test_import_is_light():
    """`import llamalens` and `llamalens --help` must not load llama.cpp or numpy."""
    import subprocess
    import sys

    code = ("import sys, llamalens, llamalens.cli; "
            "print('llama_cpp' in sys.modules, 'numpy' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_python_api(tiny_path):
    import llamalens as ll

    m = ll.load_model(str(tiny_path), ctx=128, flash_attn="off")
    s = ll.generate(m, "the cat", ll.SamplingSettings(temperature=0), max_tokens=3)
    assert len(s.tokens) == 3 and ll.next_token(m, "the cat", top=1).top[0].id == s.tokens[0].id
