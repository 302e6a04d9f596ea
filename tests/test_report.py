"""Reports: the document built from a real run, escaping, the sampler view against numpy, the HTML page
in headless Chromium (no console errors, tooltips on hover, nothing injected), Markdown images, bad input."""

import json
import math
import re

import numpy as np
import pytest

from browser import Browser
from llamalens.run import loaded as analysis
from llamalens.run import grid
from llamalens import visible
from llamalens.reports import document
from llamalens.run.loaded import load_run
from llamalens.reports.run import run_document
from llamalens.settings import SamplingSettings
from reference import log_softmax
from llamalens.store import Store
from llamalens.run.sweep import SweepSpec, run_sweep, start_sweep
from llamalens.looks.next_token import sampler_view
from clirun import cli

XSS = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>']


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("store") / "runs.db")
    configs = grid.expand({"temperature": [0.0, 0.9], "top_k": [3, 40], "top_p": [0.5, 1.0]})
    prompts = ["the cat sat", XSS[0] + " " + XSS[1] + "\ttab\nline \x07bell"]
    rid = run_sweep(tiny, store, SweepSpec(prompts, configs, [0, 1], max_tokens=12, n_logprobs=5, parallel=8))
    return store, rid


def test_pure_helpers():
    assert analysis.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert analysis.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert analysis.first_divergence([1, 2], [1, 2, 3]) == 2
    assert analysis.seed_splits([[1, 2, 3], [1, 2, 4], [1, 2, 3]]) == (2, [2])
    assert analysis.seed_splits([[1, 2], [3, 2], [3, 4]]) == (3, [0, 1])
    assert analysis.seed_splits([[7, 7]] * 3) == (1, [])
    assert [document.prob_class(p) for p in (0.0, 0.05, 0.5, 0.99, 1.0)] == ["p0", "p0", "p5", "p9", "p9"]
    assert [document.gltr_class(r) for r in (1, 10, 11, 100, 1000, 1001)] == ["g0", "g0", "g1", "g1", "g2", "g3"]
    assert [document.kld_class(k) for k in (0.0, 5e-5, 1e-4 * 1.01, 1e-3, 0.05, 2.0)] == ["k0", "k0", "k1", "k3", "k6", "k9"]
    text = document._json_for_script({"t": "</script><script>alert(1)</script>&"})
    assert "<" not in text and ">" not in text and "&" not in text and json.loads(text)["t"].startswith("</script>")


def test_float_bucket_edges():
    """Bucket and bin edges computed by powers of ten hold the values that sit on them."""
    from llamalens.reports import plots

    for v in ([1.0, 5.0, 2297.0], [3.0, 3.0], [0.07, 1e-8, 0.5, 1.0], list(range(1, 262_145, 997))):
        edges = plots.log_bins(np.maximum(np.asarray(v, dtype=float), 1e-8))
        assert np.histogram(v, edges)[0].sum() == len(v), v  # the largest (most surprising) value is kept
    for i in range(1, 10):  # a KLD on an edge of the legend is in the bucket the legend starts there
        edge = 10 ** ((i - 1) / 2 - 4)
        assert document.kld_class(edge) == f"k{i}" and document.kld_class(edge * (1 - 1e-12)) == f"k{i - 1}"


def test_kld_colours_spread_over_the_data():
    """A far quantization's KLDs (most tokens above 0.1 nat) spread over the colours instead of saturating; small
    ones keep the fixed scale; each scale's edges hold the values on them; the legend says the scale's edges."""
    far = [0.022, 0.1055, 0.12, 0.14, 0.16, 0.18, 0.2, 0.23, 0.26, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9, 1.06, 1.5, 2.5, 4.0,
           9.3]  # the shape measured for Gemma 3 270M Q4_K_M against its own Q2_K
    fixed = [document.kld_class(k) for k in far]
    assert sum(c in ("k7", "k8", "k9") for c in fixed) >= 0.8 * len(far)  # the fixed scale: nearly all deep red
    scale = document.kld_scale(far)
    assert (scale.start, scale.step) == (-1.0, 0.25)
    assert len({document.kld_class(k, scale) for k in far}) >= 7
    assert document.kld_scale([1e-6, 1e-4, 3e-3, 0.02]) == document.KLD_SCALE == document.kld_scale([])
    for i in range(1, 10):
        edge = scale.edge(i)
        assert document.kld_class(edge, scale) == f"k{i}" and document.kld_class(edge * (1 - 1e-12), scale) == f"k{i - 1}"
    doc = document.Document("t", modes=[("kld", "KLD")], kld_scale=scale)
    doc.add(document.Strips("s", [("a", [document.TokenView("x", 1, document.kld_class(0.5, scale), [])])]))
    page = document.to_html(doc)
    assert '<span class="k0">&lt;0.1</span>' in page and '<span class="k9">10</span>' in page
    assert 'class="tk k3"' in page  # 0.5 nat: between 0.32 and 0.56


def test_sampler_view_matches_numpy(tiny):
    """Each chain's result equals an independent numpy implementation on the same raw logits."""
    prompt = "the cat sat"
    cfgs = [SamplingSettings(temperature=0.0), SamplingSettings(temperature=0.7, top_k=3, top_p=1.0, min_p=0.0),
            SamplingSettings(temperature=1.3, top_k=0, top_p=0.6, min_p=0.0),
            SamplingSettings(temperature=0.5, top_k=0, top_p=1.0, min_p=0.2)]
    view = sampler_view(tiny, prompt, [], cfgs, top=20)
    toks = tiny.prompt_tokens(prompt)
    with tiny.context(n_ctx=256) as ctx:
        logits = ctx.prefill(toks).astype(np.float64)
    lp = log_softmax(logits)
    ids = [a.id for a in view.top]
    assert ids == list(np.lexsort((np.arange(len(lp)), -lp))[:20])
    assert np.allclose([a.logprob for a in view.top], lp[ids], atol=1e-6)
    p = np.exp(lp)
    order = np.lexsort((np.arange(len(p)), -p))

    def final(keep, temp):
        z = logits[keep] / temp
        q = np.exp(z - z.max())
        q /= q.sum()
        by = dict(zip(keep.tolist(), q))
        return [by.get(i, 0.0) for i in ids], len(keep)

    greedy, topk, topp, minp = view.chains
    assert greedy.final.probs == [1.0] + [0.0] * 19 and greedy.final.survivors == 1
    want, n = final(order[:3], 0.7)
    assert topk.final.survivors == n == 3 and np.allclose(topk.final.probs, want, atol=1e-5)
    cum = np.cumsum(p[order])
    keep = order[: int(np.searchsorted(cum, 0.6) + 1)]
    want, n = final(keep, 1.3)
    assert topp.final.survivors == n and np.allclose(topp.final.probs, want, atol=1e-5)
    keep = order[p[order] >= 0.2 * p.max()]
    want, n = final(keep, 0.5)
    assert minp.final.survivors == n and np.allclose(minp.final.probs, want, atol=1e-5)
    assert [s.stage for s in topk.stages] == ["raw", "penalties", "top_k", "typical_p", "top_p", "min_p", "temperature"]


def test_document_sections(tiny_run, tiny):
    store, rid = tiny_run
    doc = run_document(load_run(store, rid), model=tiny)
    headings = [b.text for b in doc.blocks if isinstance(b, document.Heading)]
    assert headings == ["Findings", "Texts", "How sure the model was of each answer", "Summary per distinct chain",
                        "Token views", "Over the grid",
                        "Along the sequence", "Seeds", "How the samplers reshape the distribution", "Timing"]
    # set-up, build and command come last, folded
    made = doc.blocks[-1]
    assert isinstance(made, document.Folded) and made.summary.startswith("How this was made")
    assert any(isinstance(b, document.KeyValues) and dict(b.rows).get("command") for b in made.blocks)
    assert not any(isinstance(b, document.KeyValues) for b in doc.blocks)
    strips = [b for b in doc.blocks if isinstance(b, document.Strips)]
    # each distinct text once, with its count: the counts add up to the samples
    counts = [int(re.search(r" · ×(\d+) · ", label).group(1)) for s in strips for label, _ in s.rows]
    assert len(strips) == 2 and sum(counts) == store.run(rid).n_done and len(counts) < store.run(rid).n_done
    # every shown token is the stored one, in order, with its exact tooltip numbers and its text in prose
    stored = {}
    for idx, t in store.tokens(rid):
        stored.setdefault(idx, []).append(t)
    for s in strips:
        texts = [tuple(v.id for v in views) for _, views in s.rows]
        assert len(set(texts)) == len(texts)
        for label, views in s.rows:
            idx = int(re.match(r"#(\d+) ", label).group(1))
            assert [v.id for v in views] == [t.id for t in stored[idx]]
            assert [v.values[0] for v in views] == [visible.prob_text(math.exp(t.logprob)) for t in stored[idx]]
            assert [v.plain for v in views] == [visible.visible(t.text, t.bytes, edge_spaces=False)
                                                + (" [end]" if t.eog else "") for t in stored[idx]]
    # the four greedy configurations are one row of the summary, which names all four
    summary = next(b for b in doc.blocks if isinstance(b, document.Table) and "distinct-2 across seeds" in b.header)
    assert [r[0] for r in summary.rows] == ["0–\u20603", "4", "5", "6", "7"]
    assert summary.rows[0][1].startswith("4 settings, one chain on this run") and summary.rows[0][2] == 16
    # the confidence table: samples shown alike (the greedy chain's configurations and seeds) share one row
    conf = next(b for b in doc.blocks if isinstance(b, document.Table) and "clusters H" in b.header)
    assert sum(r[0] for r in conf.rows) == store.run(rid).n_done and len(conf.rows) < store.run(rid).n_done
    greedy = [r for r in conf.rows if r[2] == "0–\u20603"]
    assert [(r[0], r[3]) for r in greedy] == [(8, "0, 1"), (8, "0, 1")]  # 4 configurations x 2 seeds, per prompt
    figures = [b.name for b in doc.blocks if isinstance(b, document.Figure)]
    assert "sampler_view" in figures and "positions_prompt1" in figures and "heatmap_mean_logprob" in figures
    # the control characters of prompt 1 are visible, never dropped
    assert "⇥tab⏎line <0x07>bell" in strips[1].context


def test_findings_from_records(tiny_run):
    """Groups, texts, axis effects, differences and surprises follow from the stored records, not the settings."""
    from llamalens.run import findings as fnd

    store, rid = tiny_run
    run = load_run(store, rid)
    f = fnd.findings(run)
    assert [(g.configs, g.deterministic) for g in f.groups] == [((0, 1, 2, 3), True), ((4,), False), ((5,), False),
                                                                 ((6,), False), ((7,), False)]
    seqs = {(s.config_idx, s.prompt_idx, s.seed): [t.id for t in run.by_sample[s.sample_idx]] for s in run.samples}
    for c in (1, 2, 3):
        assert all(seqs[(c, p, sd)] == seqs[(0, p, sd)] for p in (0, 1) for sd in (0, 1))
    # each distinct text once, its samples all with those tokens, all samples counted
    assert sum(len(t.samples) for t in f.texts) == len(run.samples)
    assert all(seqs[(c, t.prompt_idx, sd)] == list(t.ids) for t in f.texts for _, c, sd in t.samples)
    assert len({(t.prompt_idx, t.ids) for t in f.texts}) == len(f.texts)
    # an axis changed the text exactly where a pair differing in it alone chose other tokens
    effects = {e.axis: e.pairs for e in f.axes}
    assert effects["top_k"][:2] == ((0, 2, False), (1, 3, False)) and effects["temperature"][0] == (0, 4, True)
    for pairs in effects.values():
        for a, b, changed in pairs:
            assert changed == any(seqs[(a, p, sd)] != seqs[(b, p, sd)] for p in (0, 1) for sd in (0, 1))
    assert f.noise == run.info.noise["max_abs_dlogprob"]
    assert f.differences and all(d.delta > f.noise for d in f.differences)
    assert [d.delta for d in f.differences] == sorted((d.delta for d in f.differences), reverse=True)
    least = min(t.prob for s in run.samples for t in run.by_sample[s.sample_idx] if not t.eog)
    assert f.surprising[0].prob == least and len(f.surprising) == fnd.SURPRISING
    for sp in f.surprising:  # each with the text before it, and each text prefix once
        toks = run.by_sample[sp.sample_idx]
        assert sp.before == "".join(t.text for t in toks[: sp.position]) and toks[sp.position].id == sp.token_id
    prefixes = [(sp.prompt_idx, tuple(t.id for t in run.by_sample[sp.sample_idx][: sp.position + 1]))
                for sp in f.surprising]
    assert len(set(prefixes)) == len(prefixes)
    # one extra candidate at one token of a greedy-looking configuration: no longer provably the same chain
    run2 = load_run(store, rid)
    first = next(s for s in run2.samples if s.config_idx == 2)
    run2.by_sample[first.sample_idx][3].candidates = 2
    assert [g.configs for g in fnd.equivalent_groups(run2)][:3] == [(0, 1, 3), (2,), (4,)]
    # one other token chosen: not the same chain either
    run3 = load_run(store, rid)
    first = next(s for s in run3.samples if s.config_idx == 1)
    run3.by_sample[first.sample_idx][-1].id += 1
    assert [g.configs for g in fnd.equivalent_groups(run3)][:2] == [(0, 2, 3), (1,)]


def test_heatmap_axes_are_those_that_move_the_figure(tiny_run):
    """An axis along which no pair of configurations (differing in it alone) moves a figure is left out of its
    heatmap: it would only repeat cells."""
    import pandas as pd
    from llamalens.run.findings import AxisEffect, moving_axes

    store, rid = tiny_run
    run = load_run(store, rid)
    run.__dict__["summary"] = pd.DataFrame({"config_idx": [0, 1, 2, 3], "m": [1.0, 1.0, 2.0, float("nan")]})
    effects = [AxisEffect("a", ((0, 1, False), (2, 3, True))), AxisEffect("b", ((0, 2, True),)),
               AxisEffect("c", ((0, 1, False),))]
    assert moving_axes(run, effects, "m") == ["a", "b"]
    run.__dict__["summary"] = pd.DataFrame({"config_idx": [0, 1, 2, 3], "m": [1.0, 1.0, 1.0, 1.0]})
    assert moving_axes(run, effects, "m") == []


def test_noise_sentence_says_only_what_it_can():
    from llamalens.reports.run import describe_noise

    nf = {"samples": 8, "tokens": 96, "mean_abs_dlogprob": 0.03, "p95_abs_dlogprob": 0.0958,
          "max_abs_dlogprob": 0.1603, "top1_agreement": 0.927}
    assert describe_noise(None) is None and describe_noise(dict(nf, tokens=0)) is None
    sweep, fork = describe_noise(nf), describe_noise(nf, compared=None)
    assert "configurations' mean logprobs below 0.1603 are within batching noise" in sweep
    assert "configurations" not in fork and "A single token's logprob moves by more than 0.0958" in fork
    still = describe_noise(dict(nf, mean_abs_dlogprob=0.0, p95_abs_dlogprob=0.0, max_abs_dlogprob=0.0))
    assert still.endswith("gave the same logprobs: batching moved none here") and "0.0000" not in still


def test_kept_marks_only_where_the_chain_keeps_the_raw_top():
    from llamalens.reports.run import keeps_raw_top

    assert keeps_raw_top(SamplingSettings(temperature=0.7, top_k=3, top_p=0.5, min_p=0.1), grammar=False)
    for cfg in (SamplingSettings(typical_p=0.5), SamplingSettings(repeat_penalty=1.3),
                SamplingSettings(presence_penalty=0.5), SamplingSettings(chain="llama.cpp"),
                SamplingSettings(strategy="beam")):
        assert not keeps_raw_top(cfg, grammar=False), cfg
    assert not keeps_raw_top(SamplingSettings(), grammar=True)


def test_prob_text():
    assert [visible.prob_text(p) for p in (0.0, 7e-6, 4.9e-5, 5e-5, 0.25, 1.0)] == \
        ["0", "7.0e-06", "4.9e-05", "0.0001", "0.2500", "1.0000"]
    assert all(visible.prob_text(10.0 ** -e) not in ("0.0000", "0") for e in range(4, 12))
    from llamalens.commands.score import _share  # choose's share column: a percentage, never 0.0% when nonzero

    assert [_share(p) for p in (0.0, 3e-5, 0.0005, 0.739)] == ["0%", "<0.1%", "0.1%", "73.9%"]


def test_size_text():
    """One unit convention for sizes: binary, named as such."""
    assert [visible.size_text(n) for n in (None, 512, 2048, 241.4 * 2**20, 1.5 * 2**30, 3 * 2**40)] == \
        ["?", "512 B", "2.0 KiB", "241.4 MiB", "1.50 GiB", "3.00 TiB"]


def test_html_escaping_and_self_contained(tiny_run, tmp_path):
    store, rid = tiny_run
    out = tmp_path / "r.html"
    document.write(run_document(load_run(store, rid)), out)
    page = out.read_text(encoding="utf-8")
    for bad in XSS:
        assert bad not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script") == 2  # the JSON data block and our own script
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from a network


def test_html_in_chromium(tiny_run, tiny, tmp_path, chromium_path):
    store, rid = tiny_run
    out = tmp_path / "r.html"
    document.write(run_document(load_run(store, rid), model=tiny), out)
    with Browser() as b:
        page = b.open(out)
        assert page.problems() == []
        assert page.eval("document.querySelectorAll('img').length") == 0  # the injected <img> is only text
        assert page.eval("document.querySelectorAll('script').length") == 2
        prompts = page.eval("Array.from(document.querySelectorAll('.ctx')).map(e => e.textContent)")
        assert XSS[0] in prompts[1] and XSS[1] in prompts[1]
        # hover token 5 of the page: its tooltip shows that token's id and top alternatives
        assert page.eval("document.getElementById('tip').hidden") is True
        page.hover(".tk", 5)
        tip = page.eval("(() => { const t = document.getElementById('tip'); return [t.hidden, t.innerText]; })()")
        i = int(page.eval("document.querySelectorAll('.tk')[5].dataset.i"))
        data = json.loads(page.eval("document.getElementById('ll-data').textContent"))["tokens"][i]
        assert tip[0] is False and str(data[1]) in tip[1] and data[3][0][0][0] in tip[1]
        # keyboard focus shows it too; the colour mode switches
        page.eval("document.querySelectorAll('.tk')[7].focus()")
        assert page.eval("document.getElementById('tip').hidden") is False
        before = page.eval("getComputedStyle(document.querySelector('.tk.g3, .tk.g2, .tk.g1, .tk.g0')).backgroundColor")
        page.eval("document.querySelector('[data-setmode=gltr]').click()")
        assert page.eval("document.body.dataset.mode") == "gltr"
        after = page.eval("getComputedStyle(document.querySelector('.tk.g3, .tk.g2, .tk.g1, .tk.g0')).backgroundColor")
        assert before != after
        # a sortable column sorts: the summary's mean logprob
        summary = ("Array.from(document.querySelectorAll('table.sortable'))"
                   ".find(t => t.tHead.textContent.includes('mean logprob'))")
        page.eval(f"{summary}.querySelector('th:nth-child(5)').click()")
        col = page.eval(f"Array.from({summary}.tBodies[0].rows).map(r => parseFloat(r.cells[4].dataset.v))")
        assert col == sorted(col)
        # findings come first; how the run was made is folded at the end
        assert page.eval("document.querySelector('h2').textContent") == "Findings"
        assert page.eval("document.querySelector('details.made').open") is False
        assert page.eval("document.querySelector('details.made table.kv') !== null")
        # prose: a token's text with real spaces; "show whitespace" swaps in the visible form and back
        data = json.loads(page.eval("document.getElementById('ll-data').textContent"))["tokens"]
        j = next(i for i, d in enumerate(data) if d[0] != d[4])
        sel = f"document.querySelector('.tk[data-i=\"{j}\"]')"
        assert page.eval(f"{sel}.textContent") == data[j][4] and "·" not in data[j][4]
        page.eval("document.querySelector('[data-ws]').click()")
        assert page.eval(f"{sel}.textContent") == data[j][0]
        assert page.eval("getComputedStyle(document.querySelector('.toks')).fontFamily").startswith("ui-monospace")
        page.eval("document.querySelector('[data-ws]').click()")
        assert page.eval(f"{sel}.textContent") == data[j][4]
        assert "monospace" not in page.eval("getComputedStyle(document.querySelector('.toks')).fontFamily")
        # a click pins the pop-up: it stays when the pointer moves to another token and leaves it
        page.eval(f"{sel}.scrollIntoView()")
        page.eval(f"{sel}.click()")
        page.hover(".tk", 2)
        page.eval("document.querySelectorAll('.tk')[2].dispatchEvent(new MouseEvent('mouseout', {bubbles: true}))")
        tip = page.eval("(() => { const t = document.getElementById('tip'); return [t.hidden, t.innerText]; })()")
        assert tip[0] is False and str(data[j][1]) in tip[1]
        page.eval("document.body.click()")
        assert page.eval("document.getElementById('tip').hidden") is True
        # a table wider than the page scrolls in its own box; the page itself never scrolls sideways
        assert page.eval("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        boxes = page.eval("Array.from(document.querySelectorAll('div.tw')).map(d => [d.scrollWidth > d.clientWidth, "
                          "d.textContent.includes('clusters H')])")
        assert [True, True] in boxes
        page.screenshot(tmp_path / "shot.png")
        assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_markdown_report(tiny_run, tmp_path):
    store, rid = tiny_run
    files = document.write(run_document(load_run(store, rid)), tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((r_files/[^)]+\.png)\)", md)
    assert links and sorted(tmp_path / link for link in links) == sorted(files[1:])
    for f in files[1:]:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script>" not in md.split("```")[0]  # outside code blocks all HTML is escaped
    assert "&lt;script&gt;" in md


def test_report_size_limit(tiny, tmp_path):
    """200 samples x 64 tokens stay under 5 MB."""
    store = Store(tmp_path / "big.db")
    configs = grid.expand({"temperature": [0.5, 0.9, 1.3, 1.7], "top_p": [0.8, 1.0]})
    spec = SweepSpec(["a b c", "the cat", "hello there", "one two", "x y z"], configs, list(range(5)),
                     max_tokens=64, n_logprobs=5, parallel=32)
    rid = run_sweep(tiny, store, spec)
    out = tmp_path / "big.html"
    document.write(run_document(load_run(store, rid), model=tiny), out)
    n_tok = len(store.tokens(rid))
    assert store.run(rid).n_done == 200 and n_tok > 150 * 64 * 0.5
    assert out.stat().st_size < 5e6, out.stat().st_size


def test_cli_report_and_bad_input(tiny_run, tiny_path, tmp_path, monkeypatch):
    store, rid = tiny_run
    monkeypatch.setenv("LLAMALENS_STORE", str(store.path))
    res = cli("report", rid, "-o", tmp_path / "ok.html", "--model", tiny_path, "--position", 2)
    assert (tmp_path / "ok.html").exists() and "wrote" in res.output
    cases = [
        (["report", "999", "-o", tmp_path / "a.html"], "no run 999"),
        (["report", rid, "-o", tmp_path / "a.pdf"], "cannot tell the report format"),
        (["report", rid, "-o", tmp_path / "a.html", "--format", "docx"], "unknown report format 'docx'"),
        (["report", rid, "-o", tmp_path / "missing" / "a.html"], "folder .* does not exist"),
        (["report", rid, "-o", tmp_path / "a.html", "--metric", "vibes"], "unknown metric 'vibes'"),
        (["report", rid, "-o", tmp_path / "a.html", "--model", tiny_path, "--position", 999], "--position 999"),
    ]
    # without -o: the run's name (or run-ID), .html, in the current folder
    monkeypatch.chdir(tmp_path)
    res = cli("report", rid, "--no-model")
    assert (tmp_path / f"run-{rid}.html").exists() and f"wrote run-{rid}.html" in res.output
    from llamalens.commands.runs import default_report_path

    info = store.run(rid)
    assert default_report_path(info) == f"run-{rid}.html"
    info.name = "tales/../x y"
    assert default_report_path(info) == "tales_.._x_y.html" and default_report_path(info, "md").endswith(".md")
    for args, msg in cases:
        res = cli(*args, ok=False)
        assert res.exit_code != 0 and re.search(msg, res.output), (args, res.output)
    assert not (tmp_path / "a.html").exists() and not (tmp_path / "a.html.part").exists()


def test_show_texts(tiny_run, monkeypatch):
    """`show` ends with the distinct texts, shortened; --texts prints each in full; --json --texts lists them."""
    from llamalens.commands.runs import SHORT_CHARS
    from llamalens.run.findings import distinct_texts

    store, rid = tiny_run
    monkeypatch.setenv("LLAMALENS_STORE", str(store.path))
    texts = distinct_texts(load_run(store, rid))
    short = cli("show", rid).output
    full = cli("show", rid, "--texts").output
    assert "texts of prompt 0" in short and "texts of prompt 1" in short
    assert all(len(line) < SHORT_CHARS + 80 for line in short.splitlines() if line.lstrip().startswith("×"))
    for t in texts:
        shown = visible.visible(t.text, t.bytes, edge_spaces=False)
        assert shown in full and f"×{len(t.samples)} " in full
    greedy = next(t for t in texts if t.samples[0][1] == 0)
    assert "(+3 equivalent), every seed" in full and len(greedy.samples) >= 8
    assert "configurations 0–3 are one chain on this run" in short and "dist-2 seeds" in short
    # it ends with the texts; the confidence table before them gives the greedy chain's samples one row per prompt
    lines = short.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("texts of"))) > \
        lines.index(next(x for x in lines if x.startswith("higher = surer")))  # the confidence table's last line
    assert len([x for x in lines if re.match(r" *8 +0–3 +0, 1 ", x)]) == 2, short
    data = json.loads(cli("show", rid, "--texts", "--json").stdout)
    assert sum(len(t["samples"]) for t in data["texts"]) == store.run(rid).n_done
    assert "texts" not in json.loads(cli("show", rid, "--json").stdout)


def test_generate_report(tiny_path, tmp_path):
    """`generate --report FILE`: the completion as a page, its tokens and their figures; a bad path fails first."""
    out = tmp_path / "g.html"
    res = cli("generate", "the cat\tsat", "-m", tiny_path, "--ctx", 256, "-n", 6, "-t", 0, "--json", "--report", out)
    tokens = json.loads(res.stdout)["tokens"]
    page = out.read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="ll-data">(.*?)</script>', page).group(1))["tokens"]
    assert [d[1] for d in data] == [t["id"] for t in tokens] and "the cat⇥sat" in page
    assert all(a[2] in ("✓ kept", "cut") for d in data for a in d[3][0])  # greedy keeps the top one
    assert [sum(a[2] == "✓ kept" for a in d[3][0]) for d in data] == [1] * len(data)
    res = cli("generate", "x", "-m", tiny_path, "--report", tmp_path / "nope" / "g.html", ok=False)
    assert res.exit_code == 1 and "does not exist" in res.output and "loading" not in res.output


def test_report_of_empty_and_unfinished_runs(tiny, tmp_path, monkeypatch):
    store = Store(tmp_path / "s.db")
    monkeypatch.setenv("LLAMALENS_STORE", str(store.path))
    spec = SweepSpec(["the cat"], [SamplingSettings(temperature=0.0)], [0, 1], max_tokens=4, parallel=2)
    empty = start_sweep(tiny, store, spec)
    res = cli("report", empty, "-o", tmp_path / "e.html", ok=False)
    assert res.exit_code == 1 and "no finished samples" in res.output and not (tmp_path / "e.html").exists()
    # a run with one of its two samples saved: reported, with a warning
    from llamalens.core.engine import generate

    store.save_sample(empty, 0, generate(tiny, "the cat", SamplingSettings(temperature=0.0), max_tokens=4))
    res = cli("report", empty, "-o", tmp_path / "p.html", "--no-model")
    assert "warning: run" in res.output and "1/2 samples" in res.output
    page = (tmp_path / "p.html").read_text(encoding="utf-8")
    assert "1 of 2 samples are finished" in page and "Left out: this view needs the model" in page


def test_sweep_writes_report(tiny_path, tmp_path):
    out = tmp_path / "sweep.md"
    cli("sweep", "the cat", "-t", "0,0.8", "--seeds", 2, "-n", 6, "--model", tiny_path, "--report", out)
    assert out.exists() and (tmp_path / "sweep_files").is_dir()
    res = cli("sweep", "the cat", "--model", tiny_path, "--report", tmp_path / "nope" / "r.html", ok=False)
    assert res.exit_code == 1 and "does not exist" in res.output
    assert len(Store(tmp_path / "runs.db").runs()) == 1  # the bad report path failed before any sweep


def _chain_reference(logits: np.ndarray, k: int, p: float, min_p: float, t: float) -> np.ndarray:
    """top-k, then top-p (the smallest most-likely set reaching p), then min-p (p >= min_p * max), then
    temperature, as llama.cpp's chain applies them; the final probability of every token (0 = filtered out)."""
    order = np.argsort(-logits, kind="stable")[:k]
    q = np.exp(logits[order] - logits[order].max())
    q /= q.sum()
    order = order[: int(np.searchsorted(np.cumsum(q), p)) + 1]
    order = order[logits[order] >= logits[order].max() + np.log(min_p)]
    out = np.zeros_like(logits)
    z = logits[order] / t
    out[order] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    return out


def test_report_position_shows_that_positions_distribution(tiny_path, tmp_path):
    """`report --position 2 --sample 1`: the sampler view is of sample 1's third generated token, after its first two
    (named in the text); the raw top-20 and each chain's probabilities equal llama-cpp-python's next-token
    distribution after the prompt and those two tokens, reshaped here by the chain's formulas (table values have 4
    significant digits: relative bound 1e-3). The view loads the model with the run's context options: flash
    attention off here, as llama-cpp-python's; with it on, the probabilities move by up to 1% (F16 K/V)."""
    from llama_cpp import Llama

    db, out = tmp_path / "r.db", tmp_path / "r.md"
    cli("sweep", "the cat", "-t", "0,0.8", "-n", 5, "--seeds", 1, "--model", tiny_path, "--store", db,
        "--flash-attn", "off")
    cli("report", 1, "-o", out, "--model", tiny_path, "--position", 2, "--sample", 1, "--store", db)
    store = Store(db)
    (s,) = [x for x in store.samples(1) if x.sample_idx == 1]
    toks = [t for _, t in store.tokens(1, 1)]
    md = out.read_text(encoding="utf-8")
    history = "".join(visible.visible(t.text, t.bytes, edge_spaces=False) for t in toks[:2])
    assert f"Position 2 of sample \\#1 (prompt 0, after the generated text “{history}”)" in md.replace("\\_", "_")
    llm = Llama(str(tiny_path), n_ctx=64, logits_all=True, verbose=False, flash_attn=False)
    ids = llm.tokenize(b"the cat") + [t.id for t in toks[:2]]
    llm.eval(ids)
    logits = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    raw = np.exp(log_softmax(logits))
    top = np.argsort(-raw, kind="stable")[:20]
    table = md[md.index("| token | raw p |"):].split("\n\n")[0].splitlines()[2:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table]
    assert len(cells) == 20
    got = np.array([[float(c) for c in row[1:]] for row in cells])
    want = np.stack([raw[top], (top == np.argmax(logits)).astype(float),
                     _chain_reference(logits, 40, 0.95, 0.05, 0.8)[top]], axis=1)
    assert np.allclose(got, want, rtol=1e-3, atol=1e-12), np.c_[got, want]
    assert (got[:, 2] > 0).sum() >= 5  # the sampled chain keeps several tokens here


def test_a_text_made_by_many_configurations_names_them_by_number():
    """A text produced by more than MAX_NAMED_GROUPS groups names its configurations by number and its seeds in
    ranges (a llama-server-preset sweep's common text listed 16 settings before); up to that, each group by name."""
    from types import SimpleNamespace

    from llamalens.reports.findings import MAX_NAMED_GROUPS, produced_by
    from llamalens.run.findings import ConfigGroup

    groups = {ci: ConfigGroup((ci,), False) for ci in range(8)}
    names = SimpleNamespace(found=SimpleNamespace(group_of=groups.__getitem__), group=lambda g: f"T={g.configs[0]}")
    many = [(0, ci, seed) for ci in (0, 1, 2, 3, 6, 7) for seed in (0, 1, 2)]
    assert produced_by(names, many) == "6 configurations (0–3, 6, 7), seeds 0–2"
    few = [(0, ci, 5) for ci in range(MAX_NAMED_GROUPS)]
    assert produced_by(names, few) == "; ".join(f"T={ci}, seed 5" for ci in range(MAX_NAMED_GROUPS))


def test_the_same_text_in_other_tokens_is_marked():
    """Distinct texts are distinct token sequences; one that spells the bytes of an earlier one (" Yes" as one token
    and as " " + "Yes") is marked as the same text, so a list of three " Yes" rows does not read as a bug."""
    from llamalens.reports.findings import retokenized
    from llamalens.run.findings import DistinctText

    yes, no = " Yes".encode().hex(), " No".encode().hex()
    texts = [DistinctText(0, (5,), " Yes", yes, ((0, 0, 0),)), DistinctText(0, (7,), " No", no, ((1, 0, 1),)),
             DistinctText(0, (3, 9), " Yes", yes, ((2, 0, 2),)), DistinctText(0, (3, 2, 8), " Yes", yes, ((3, 0, 3),))]
    marks = retokenized(texts)
    assert marks[:2] == ["", ""] and marks[2] == marks[3] and "same text" in marks[2] and "other tokens" in marks[2]
