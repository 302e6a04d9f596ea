"""The Python API (llamalens/api.py): the same results as the CLI on the same inputs, the documented
DataFrame columns, rich display that is escaped and self-contained, and a docstring for every public name."""

from __future__ import annotations

import json
import math
import re
import shutil
from html.parser import HTMLParser

import pytest

import llamalens as ll
from llamalens import api
from llamalens.run import loaded as analysis
from clirun import cli

XSS = "<script>alert('x')</script> <b>bold</b> & <img src=x onerror=alert(1)>"


# -- the API and the CLI agree -----------------------------------------------------------------------
def test_sweep_runs_show_export_match_the_cli(tiny_path, tmp_path):
    """The same sweep through ll.sweep and `llamalens sweep` (separate stores): identical tokens, summary,
    runs listing and CSV export. Exact equality: both run sweep.start_sweep + execute on the same plan."""
    args = dict(seeds=[3], max_tokens=6, logprobs=3, parallel=4)
    run = ll.sweep(["the cat", "hello"], {"temperature": [0, 0.8], "top_k": "2,40"}, model=str(tiny_path),
                   store=tmp_path / "api.db", progress=False, ctx=256, name="api-run", **args)
    cli("sweep", "the cat", "hello", "-t", "0,0.8", "--top-k", "2,40", "--seed", 3, "-n", 6, "--logprobs", 3,
        "--parallel", 4, "--ctx", 256, "--model", tiny_path, "--store", tmp_path / "cli.db", "--name", "api-run")
    shown = json.loads(cli("show", "api-run", "--json", "--store", tmp_path / "cli.db").stdout)
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert timeless(run.to_dict()["summary"]) == timeless(shown["summary"])
    assert len(run.summary) == 4 and run.configs == ll.open_run(1, store=tmp_path / "cli.db").configs
    listed = json.loads(cli("runs", "--json", "--store", tmp_path / "api.db").stdout)
    frame = ll.runs(store=tmp_path / "api.db")
    assert frame.drop(columns="created").to_dict(orient="records") == [
        {k: v for k, v in r.items() if k != "created"} for r in listed]
    assert frame.created[0].timestamp() == pytest.approx(listed[0]["created"], abs=1e-3)
    assert run.export(tmp_path / "api.csv") == len(run.tokens) > 0
    cli("export", "api-run", "--format", "csv", "-o", tmp_path / "cli.csv", "--store", tmp_path / "cli.db")
    strip = lambda p: [line.split(",", 1)[1] for line in p.read_text().splitlines()]  # noqa: E731 - drop run_id
    assert strip(tmp_path / "api.csv") == strip(tmp_path / "cli.csv")
    # a report from the API is the CLI's report (same sections); by name, without the model
    out = ll.report("api-run", tmp_path / "r.html", store=tmp_path / "api.db", load_model=False)
    assert out.is_file() and "Summary per distinct chain" in out.read_text()


def test_chat_grammar_sweep_and_resume_match_the_cli(tiny, tiny_path, tmp_path):
    """ll.sweep's chat and grammar parameters run what `sweep --chat --system --messages --chat-template
    --grammar` runs (the same rendered prompts, tokens and grammar record), and ll.resume finishes a planned
    run as one uninterrupted sweep would have decoded it."""
    from llamalens.store import Store
    from llamalens.run.sweep import SweepSpec, start_sweep

    gbnf = tmp_path / "g.gbnf"
    gbnf.write_text('root ::= " the" ( " cat sat on the mat." | " dog sat." ) | " a cat is on it!"\n')
    conv = [{"role": "user", "content": "where is the <cat>?"}]
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": conv}) + "\n")
    run = ll.sweep("hello", {"temperature": [0, 0.9]}, seeds=[1, 2], max_tokens=8, system="be brief", messages=[conv],
                   chat_template="chatml", grammar=str(gbnf), model=str(tiny_path), store=tmp_path / "api.db",
                   progress=False, ctx=256, parallel=4)
    cli("sweep", "hello", "--system", "be brief", "--messages", tmp_path / "m.jsonl", "--chat-template", "chatml",
        "--grammar", gbnf, "-t", "0,0.9", "--seed", "1,2", "-n", 8, "--parallel", 4, "--ctx", 256,
        "--model", tiny_path, "--store", tmp_path / "cli.db")
    other = ll.open_run(1, store=tmp_path / "cli.db")
    prompts = sorted(set(run.samples.prompt))
    assert prompts == sorted(set(other.samples.prompt)) and len(prompts) == 2
    assert all(p.startswith("<|im_start|>system\nbe brief") for p in prompts)
    assert run.info.options.chats == other.info.options.chats and len(run.info.options.chats) == 2
    assert run.info.options.grammar == other.info.options.grammar and "cat sat" in run.info.options.grammar["gbnf"]
    key = ["sample_idx", "position", "token_id", "logprob", "sampled_logprob"]
    assert run.tokens[key].equals(other.tokens[key]) and len(run.tokens) > 0
    # every reply is the start of a sentence of the grammar's language (8 tokens of the tiny model's vocabulary)
    assert all(any(w.startswith(t) for w in (" the cat sat on the mat.", " the dog sat.", " a cat is on it!"))
               for t in run.samples.text)
    with pytest.raises(ll.InvalidInput, match=r"messages\[0\]: message 1"):
        ll.sweep(messages=[[{"role": "user"}]], chat_template="chatml", model=tiny, store=tmp_path / "x.db",
                 progress=False)
    # resume: a run planned but never decoded, finished by ll.resume, equals the same sweep run at once
    store = Store(tmp_path / "r.db")
    spec = SweepSpec(["the cat"], [ll.SamplingSettings(temperature=0.8)], [5, 6], 6, 3, (), None, False, 4)
    planned = start_sweep(tiny, store, spec)
    done = ll.resume(planned, store=store, model=tiny, progress=False)
    whole = ll.sweep("the cat", ll.SamplingSettings(temperature=0.8), seeds=[5, 6], max_tokens=6, logprobs=3,
                     parallel=4, model=tiny, store=tmp_path / "w.db", progress=False)
    key = ["sample_idx", "position", "token_id", "logprob"]
    assert done.info.status == "done" and done.tokens[key].equals(whole.tokens[key])
    with pytest.raises(ll.StoreError, match="already complete"):
        ll.resume(planned, store=store, model=tiny, progress=False)


def test_score_choose_compare_match_the_cli(tiny_path, tmp_path):
    text = "the cat sat on the mat and the dog is in it"
    mine = ll.score(text, model=str(tiny_path), ctx=256)
    theirs = json.loads(cli("score", text, "--json", "--model", tiny_path, "--ctx", 256).stdout)
    assert mine.perplexity == theirs["totals"]["perplexity"]
    assert [t.logprob for t in mine.tokens] == [t["logprob"] for t in theirs["tokens"]]

    c = ll.choose("the cat", ["sat", "is", "dog"], model=str(tiny_path), ctx=256)
    theirs = json.loads(cli("choose", "the cat", "--option", "sat", "--option", "is", "--option", "dog", "--json",
                            "--model", tiny_path, "--ctx", 256).stdout)
    assert json.dumps(c.to_dict()["options"]) == json.dumps(theirs["options"])  # as text: the last margin is NaN

    other = tmp_path / "copy.gguf"  # another file of the same model: a comparison with KL 0 everywhere
    shutil.copy(tiny_path, other)
    cmp = ll.compare(tiny_path, other, text=text, ctx=256)
    theirs = json.loads(cli("compare", text, "-m", tiny_path, "-m", other, "--ctx", 256, "--json").stdout)
    assert cmp.summary() == theirs["summary"]
    assert cmp.summary()["kld_max"] < 1e-6  # the same weights: KL is 0 up to float rounding


def test_loaded_model_is_reused_and_errors_keep_their_classes(tiny, tmp_path):
    run = ll.sweep("the cat", ll.SamplingSettings(temperature=0), seeds=[5], max_tokens=4, model=tiny,
                   store=tmp_path / "s.db", progress=False)
    assert run.samples.seed.tolist() == [5] and run.status == "done"
    # greedy from the same model and prompt: the one-sequence path gives the same tokens
    g = ll.generate(tiny, "the cat", ll.SamplingSettings(temperature=0), max_tokens=4)
    assert run.tokens.token_id.tolist() == [t.id for t in g.tokens]
    with pytest.raises(ll.InvalidSettings, match="not a sweep axis"):
        ll.sweep("x", {"temprature": [0]}, model=tiny, store=tmp_path / "s.db")
    with pytest.raises(ll.InvalidInput, match="ll.load_model"):
        ll.score("the cat sat", model=tiny, ctx=64)
    with pytest.raises(ll.StoreError):
        ll.open_run(99, store=tmp_path / "s.db")
    with pytest.raises(ll.InvalidInput, match="text= or run="):
        ll.compare(tiny, tiny)


# -- DataFrames ----------------------------------------------------------------------------------------
def test_dataframe_columns(tiny, tmp_path):
    run = ll.sweep(["the cat", "hello"], {"temperature": [0, 0.9]}, seeds=1, max_tokens=5, model=tiny,
                   store=tmp_path / "c.db", progress=False)
    strategy = set(analysis.STRATEGY_COLUMNS) | {"blocked"}
    assert list(run.tokens.columns) == [c for c in analysis.TOKEN_COLUMNS if c not in strategy]
    assert list(run.samples.columns) == analysis.SAMPLE_COLUMNS
    assert list(run.summary.columns) == [c for c in analysis.SUMMARY_COLUMNS if c not in analysis.STRATEGY_SUMMARY]
    assert list(ll.runs(store=tmp_path / "c.db").columns) == api.RUN_COLUMNS
    assert len(run.samples) == 4 and run.noise_floor["samples"] >= 2
    t = run.tokens
    assert (t.prob - t.logprob.map(math.exp)).abs().max() < 1e-12

    s = ll.generate(tiny, "the cat", ll.SamplingSettings(temperature=0.7, seed=1), max_tokens=5)
    df = s.to_pandas()
    assert list(df.columns) == ["position", "token_id", "text", "bytes", "logprob", "prob", "rank", "entropy",
                                "sampled_logprob", "candidates", "eog"]
    assert df.token_id.tolist() == [x.id for x in s.tokens] and df.logprob.tolist() == [x.logprob for x in s.tokens]

    sc = ll.score("the cat sat on the mat", model=tiny)
    assert list(sc.to_pandas().columns) == ["position", "token_id", "text", "bytes", "logprob", "prob", "rank",
                                            "entropy"]
    assert sc.to_pandas().logprob.sum() == pytest.approx(-sc.nll * len(sc.tokens), rel=1e-12)
    nt = ll.next_token(tiny, "the cat", top=5)
    assert list(nt.to_pandas().columns) == ["rank", "token_id", "text", "bytes", "logprob", "prob"]
    c = ll.choose("the cat", ["sat", "is"], model=tiny)
    assert list(c.to_pandas().columns) == ["rank", "option", "continuation", "score", "logprob", "tokens", "bytes",
                                           "per_token", "per_byte", "margin", "share"]
    assert c.to_pandas().share.sum() == pytest.approx(1.0, abs=1e-12)


# -- rich display ----------------------------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.text, self.scripts, self._in_script = [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)


def _inner(html_out: str) -> tuple[_Page, str]:
    """The notebook output is one iframe; its srcdoc is the report page."""
    outer = _Page()
    outer.feed(html_out)
    assert outer.tags == ["iframe"] and not "".join(outer.text).strip()
    srcdoc = next(v for tag, k, v in outer.attrs if k == "srcdoc")
    page = _Page()
    page.feed(srcdoc)
    return page, srcdoc


NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}  # names in the SVG, never fetched


def test_repr_html_escaped_and_self_contained(tiny, tiny_path, tmp_path):
    other = tmp_path / "copy.gguf"
    shutil.copy(tiny_path, other)
    run = ll.sweep([XSS], {"temperature": [0, 0.9]}, seeds=1, max_tokens=4, model=tiny, store=tmp_path / "x.db",
                   progress=False, name=XSS)
    shown = {
        "sample": ll.generate(tiny, XSS, ll.SamplingSettings(temperature=0.9, seed=2), max_tokens=4),
        "next_token": ll.next_token(tiny, XSS, top=5),
        "sampler_view": ll.sampler_view(tiny, XSS, {"temperature": [0.5, 2.0]}, top=5),
        "run": run,
        "score": ll.score(XSS, model=tiny),
        "choice": ll.choose(XSS, [XSS, "the cat"], model=tiny),
        "comparison": ll.compare(tiny, str(other), text=XSS),
    }
    for kind, obj in shown.items():
        out = obj._repr_html_()
        page, srcdoc = _inner(out)
        # markup in the prompt is text, never elements: only the report's own tags, no <b> or <img>
        assert not {"b", "img"} & set(page.tags), kind
        assert page.tags.count("script") == 2, kind  # the page's JSON block and its script
        assert all("alert" not in s for s in page.scripts), kind
        assert "<script>alert('x')</script>" in "".join(page.text), kind  # shown, as text (token spaces as ·)
        # self-contained: nothing to fetch (no src / href / url() / @import), a CSP that forbids loading
        for tag, k, v in page.attrs:
            assert not (k in ("src", "href", "xlink:href", "action", "srcset", "poster")
                        and not v.startswith(("#", "data:"))), (kind, tag, k, v)
        assert not re.search(r"url\((?!#)", srcdoc) and "@import" not in srcdoc, kind  # url(#clip) is in the SVG
        assert set(re.findall(r"https?://[^\"'\s<>)]*", srcdoc)) <= NAMESPACES, kind
        assert "default-src 'none'" in srcdoc, kind
    assert XSS not in repr(shown["sample"]) or repr(shown["sample"]).startswith("<Sample")
    assert repr(run).startswith(f"<Run {run.id} ")


# -- help() ----------------------------------------------------------------------------------------------
def test_every_public_name_has_a_docstring():
    """help(ll.X) shows a real docstring for every name in ll.__all__ (a dataclass's generated signature line
    does not count), and each API call's docstring names what it returns or does."""
    missing = []
    for name in ll.__all__:
        if name == "__version__":
            continue
        obj = getattr(ll, name)
        doc = (obj.__doc__ or "").strip()
        if not doc or doc.startswith(f"{getattr(obj, '__name__', name)}("):
            missing.append(name)
    assert not missing, f"no docstring: {missing}"
    assert set(api.__all__) <= set(ll.__all__)
    for name in api.__all__:  # the CLI command each call mirrors is named, or what it returns
        assert re.search(r"llamalens \w+|Run|DataFrame", getattr(ll, name).__doc__), name


def test_fork_and_compare_on_a_run_match_the_cli(tiny_path, tmp_path):
    """ll.fork = `llamalens fork` (same analysis from the same plan), shown in a notebook as its report; and
    ll.compare(run=...) = `llamalens compare --run` on that run's tokens."""
    opts = dict(options="sat,is", samples=2, alternatives=2, min_prob=0.0, positions="0-1", max_tokens=4, parallel=8)
    run = ll.fork("the cat", model=str(tiny_path), store=tmp_path / "api.db", progress=False, ctx=256, **opts)
    out = json.loads(cli("fork", "the cat", "--options", "sat,is", "--samples", 2, "--alternatives", 2,
                         "--min-prob", 0, "--positions", "0-1", "-n", 4, "--parallel", 8, "--ctx", 256, "--json",
                         "--model", tiny_path, "--store", tmp_path / "cli.db").stdout)
    from llamalens.run.fork import load_fork

    assert run.kind == "fork" and load_fork(run.store, run.id).analysis.to_dict() == out["fork"]
    page, _ = _inner(run._repr_html_())
    assert "fork" in "".join(page.text)

    other = tmp_path / "copy.gguf"
    shutil.copy(tiny_path, other)
    cmp = ll.compare(None, other, run=run, ctx=256)
    theirs = json.loads(cli("compare", "--run", run.id, "-m", other, "--store", tmp_path / "api.db", "--ctx", 256,
                            "--json").stdout)
    assert cmp.summary() == theirs["summary"] and cmp.source == f"run {run.id}"


def test_chat_fork_and_text_arguments_match_the_cli(tiny_path, tmp_path):
    """ll.fork(chat=...) renders the conversation as `fork --chat --system --chat-template` does (both build a
    run.requests.ForkRequest): the same prompt, the same continuations token for token; a text where a list of
    texts is expected is one text, never its characters."""
    from llamalens.store import Store

    opts = dict(samples=2, alternatives=2, min_prob=0.0, positions="0-1", max_tokens=4, parallel=8)
    run = ll.fork("the <cat>", chat=True, system="be brief", chat_template="chatml", options="sat,is",
                  model=str(tiny_path), store=tmp_path / "api.db", progress=False, ctx=256, **opts)
    cli("fork", "--chat", "the <cat>", "--system", "be brief", "--chat-template", "chatml", "--options", "sat,is",
        "--samples", 2, "--alternatives", 2, "--min-prob", 0, "--positions", "0-1", "-n", 4, "--parallel", 8,
        "--ctx", 256, "--model", tiny_path, "--store", tmp_path / "cli.db")
    api_store, cli_store = Store(tmp_path / "api.db"), Store(tmp_path / "cli.db")
    prompt = api_store.run(run.id).options.prompts[0]
    assert prompt.startswith("<|im_start|>system\nbe brief") and "the <cat>" in prompt
    assert cli_store.run(1).options.prompts == (prompt,)
    key = ["sample_idx", "position", "token_id", "logprob", "sampled_logprob"]
    other = ll.open_run(1, store=tmp_path / "cli.db")
    assert len(run.tokens) > 0 and run.tokens[key].equals(other.tokens[key])
    assert [s.extra for s in api_store.samples(run.id)] == [s.extra for s in cli_store.samples(1)]
    # a stop string is one string (not ('Q', ':')), options one text each
    swept = ll.sweep("the cat", {"temperature": [0]}, stop="Q:", max_tokens=3, model=str(tiny_path),
                     store=tmp_path / "s.db", progress=False, ctx=256)
    assert swept.info.options.stop == ("Q:",)
    with pytest.raises(ll.InvalidSettings, match="seeds=2.5"):
        ll.sweep("the cat", seeds=2.5, model=str(tiny_path), store=tmp_path / "s.db", progress=False)
    with pytest.raises(ll.InvalidInput, match="prompt=123"):
        ll.fork(123, model=str(tiny_path), store=tmp_path / "s.db", progress=False)


def test_notebook_frames_in_chromium(tiny, tmp_path, chromium_path):
    """Two outputs on one page, as a notebook shows them: each frame sizes itself to its content, nothing is
    fetched, no console error (a CSP violation would be one), and hovering a token in the sample's frame shows
    that token's tooltip (its id and top alternatives) inside the frame."""
    from browser import Browser

    s = ll.generate(tiny, XSS, ll.SamplingSettings(temperature=0.9, seed=4), max_tokens=6)
    nt = ll.next_token(tiny, "the cat", top=5)
    out = tmp_path / "page.html"
    out.write_text(f"<!DOCTYPE html><html><body><p>cell 1</p>{s._repr_html_()}<p>cell 2</p>{nt._repr_html_()}"
                   "</body></html>", encoding="utf-8")
    with Browser() as b:
        page = b.open(out)
        assert page.problems() == []
        sizes = page.eval("Array.from(document.querySelectorAll('iframe')).map(f => [f.getBoundingClientRect().height,"
                          " f.contentDocument.documentElement.scrollHeight])")
        assert len(sizes) == 2 and all(h >= 100 and abs(h - content) <= 12 for h, content in sizes), sizes
        frame = "document.querySelectorAll('iframe')[0]"
        x, y = page.eval(f"(() => {{ const f = {frame}; f.scrollIntoView(); const r = f.getBoundingClientRect();"
                         " const t = f.contentDocument.querySelectorAll('.tk')[2].getBoundingClientRect();"
                         " return [r.left + t.left + t.width / 2, r.top + t.top + t.height / 2]; })()")
        page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        tip = page.eval(f"(() => {{ const t = {frame}.contentDocument.getElementById('tip');"
                        " return [t.hidden, t.innerText]; })()")
        tok = s.tokens[2]
        assert tip[0] is False and str(tok.id) in tip[1] and f"{tok.top[0].prob:.4f}" in tip[1], tip
