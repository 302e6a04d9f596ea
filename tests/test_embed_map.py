"""Embedding maps: PCA equals an independent numpy computation (eigenvectors of the covariance, up to
sign per axis), t-SNE is scikit-learn's and the same for a seed, a perplexity >= n and a missing
scikit-learn are refused cleanly before a model loads; categories read from TSV / JSONL group the
heatmap and their summary equals a direct count; the report with a map renders in Chromium, offline,
with every label escaped."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from browser import Browser
from test_embed import cli
from test_report import XSS
from llamalens.looks.embed import embed_texts
from llamalens.looks.embed_map import category_order, category_summary, embedding_map
from llamalens.errors import InvalidSettings
from llamalens.inputs import read_terms
from llamalens.visible import label

ROOT = Path(__file__).resolve().parent.parent
FINANCE = ROOT / "examples" / "finance_terms.tsv"


def unit_rows(vectors) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def finance(gemma):
    terms, categories = read_terms(str(FINANCE))
    return embed_texts(gemma, terms, "mean"), categories


def test_example_file_reads_as_25_terms_in_5_categories():
    terms, categories = read_terms(str(FINANCE))
    assert len(terms) == 25 and terms[0] == "bull market"  # the header line is skipped
    assert list(dict.fromkeys(categories)) == ["market", "assets", "metrics", "banking", "investment"]
    assert all(categories.count(c) == 5 for c in set(categories))


def test_pca_equals_numpy_eigendecomposition(finance):
    """PCA = the centred unit vectors projected on the covariance matrix's top two eigenvectors (numpy's
    eigh, not an SVD), each axis up to its sign; the explained shares are the eigenvalues' shares."""
    es, categories = finance
    frame = embedding_map(es, "pca", categories)
    assert list(frame.columns) == ["term", "category", "x", "y"]
    assert list(frame.term) == es.texts and list(frame.category) == categories
    x = unit_rows(es.vectors)
    xc = x - x.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
    top = np.argsort(eigenvalues)[::-1][:2]
    want = xc @ eigenvectors[:, top]
    got = frame[["x", "y"]].to_numpy()
    for axis in range(2):
        diff = min(np.abs(got[:, axis] - want[:, axis]).max(), np.abs(got[:, axis] + want[:, axis]).max())
        # measured 1.6e-15 on coordinates up to 0.48 (the two factorizations round differently); bound ~10x
        assert diff < 2e-14, axis
    assert np.allclose(frame.attrs["explained"], eigenvalues[top] / eigenvalues.sum(), rtol=1e-9)
    assert frame.attrs["method"] == "pca" and frame.attrs["perplexity"] is None
    assert np.array_equal(got, embedding_map(es, "pca").loc[:, ["x", "y"]].to_numpy())


def test_tsne_is_scikit_learns_and_deterministic_for_a_seed(finance):
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    es, categories = finance
    a = embedding_map(es, "tsne", categories, perplexity=5, seed=3)
    b = embedding_map(es, "tsne", categories, perplexity=5, seed=3)
    assert np.array_equal(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy())
    assert a.attrs == {"method": "tsne", "perplexity": 5.0, "seed": 3, "explained": None}
    other = embedding_map(es, "tsne", categories, perplexity=5, seed=4)[["x", "y"]].to_numpy()
    assert np.abs(other - a[["x", "y"]].to_numpy()).max() > 1.0
    # the documented parameters, on the unit vectors (one OpenMP thread, as llamalens runs it for few texts:
    # the same map, measured equal with 1 and 2 threads, without waiting on a busy CPU's other threads)
    with threadpool_limits(limits=1, user_api="openmp"):
        want = TSNE(n_components=2, perplexity=5.0, random_state=3, init="pca", learning_rate="auto").fit_transform(
            unit_rows(es.vectors))
    assert np.array_equal(a[["x", "y"]].to_numpy(), want)
    # and it shows something: most terms' nearest point on the map is in their category (measured 18 of 25)
    xy = a[["x", "y"]].to_numpy()
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.diag([np.inf] * len(xy))
    same = sum(categories[int(np.argmin(row))] == c for row, c in zip(d, categories))
    assert same >= 12, same  # chance: 25 × 4/24 ≈ 4


def test_perplexity_too_large_refused(finance):
    es, _ = finance
    with pytest.raises(InvalidSettings, match="below the number of texts"):
        embedding_map(es, "tsne", perplexity=25)
    assert len(embedding_map(es, "tsne", perplexity=24)) == 25


@pytest.mark.parametrize("args,msg", [
    (["a", "b", "c", "d", "e", "--map", "tsne", "--perplexity", "5"], "--perplexity 5 is too large for 5 texts"),
    (["a", "b", "c", "--map", "tsne"], "--perplexity 5 is too large for 3 texts"),  # the default, 5
    (["a", "b", "c", "--map", "tsne", "--perplexity", "0"], "not in the range x>0"),
    (["a", "b", "c", "--perplexity", "2"], "give --map tsne too"),
    (["a", "b", "c", "--map", "pca", "--seed", "1"], "give --map tsne too"),
    (["a", "b", "--map", "umap"], "'umap' is not one of"),
])
def test_cli_map_refused_before_the_model_loads(args, msg):
    """Each is refused before any model is loaded (the model named does not exist)."""
    res = cli("embed", *args, "--model", "/nonexistent/model.gguf", ok=False)
    assert res.exit_code != 0 and msg in res.output, res.output
    assert "Traceback" not in res.output and "nonexistent" not in res.output


def test_missing_scikit_learn_names_the_extra(tmp_path):
    """With scikit-learn unimportable, --map tsne says which extra to install (and --map pca still works)."""
    code = ("import sys; sys.modules['sklearn'] = None; from llamalens.cli import main; "
            "main(sys.argv[1:], prog_name='llamalens')")
    args = ["embed", "king", "queen", "man", "--map", "tsne", "--perplexity", "1", "--model", "/nonexistent/m.gguf"]
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "--map tsne needs scikit-learn, llamalens's optional 'maps' extra: pip install 'llamalens[maps]'" in res.stderr
    assert "Traceback" not in res.stderr and "nonexistent" not in res.stderr


def test_category_files_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tcategory\nbull market\tmarket \n\ngold\tassets\r\n")
    assert read_terms(str(tsv)) == (["bull market", "gold"], ["market", "assets"])
    plain = tmp_path / "t.txt"
    plain.write_text("king\n\nqueen\n")
    assert read_terms(str(plain)) == (["king", "queen"], None)
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"text": "bull market", "category": "market"}\n\n{"text": "gold", "category": "assets"}\n')
    assert read_terms(str(jl)) == (["bull market", "gold"], ["market", "assets"])
    jl.write_text('{"text": "king"}\n{"text": "queen"}\n')
    assert read_terms(str(jl)) == (["king", "queen"], None)


@pytest.mark.parametrize("name,content,msg", [
    ("a.tsv", "king\troyal\nqueen\n", "line 2 has no category, but line 1 has one"),
    ("a.tsv", "king\nqueen\troyal\n", "line 2 has a category, but line 1 has none"),
    ("a.tsv", "king\troyal\textra\n", "line 1 is not term<TAB>category"),
    ("a.tsv", "king\t \n", "line 1 is not term<TAB>category"),
    ("a.jsonl", '{"text": "king", "category": "royal"}\n{"text": "queen"}\n', "line 2 has no category"),
    ("a.jsonl", '{"prompt": "king"}\n', 'line 1 is not a JSON object with a "text" string'),
    ("a.jsonl", '{"text": "king", "category": 3}\n', '"category" is a number 3'),
])
def test_cli_bad_category_files(tmp_path, name, content, msg):
    f = tmp_path / name
    f.write_text(content)
    res = cli("embed", "--file", f, "--model", "/nonexistent/model.gguf", ok=False)
    assert res.exit_code == 1 and msg in res.output, res.output
    assert "Traceback" not in res.output


def test_arguments_without_category_refused_with_a_categorised_file():
    res = cli("embed", "extra term", "--file", FINANCE, "--model", "/nonexistent/model.gguf", ok=False)
    assert res.exit_code == 1 and "the 1 text(s) given as arguments have none" in res.output


def test_category_order_and_summary(finance):
    """The heatmap's order groups categories (first appearance, texts in order); the summary equals a
    direct count over numpy's cosine matrix of the vectors."""
    assert category_order(["b", "a", "b", "c", "a"]) == [0, 2, 1, 4, 3]
    assert category_order(["x", "y"] * 3) == [0, 2, 4, 1, 3, 5]
    es, categories = finance
    u = unit_rows(es.vectors)
    cos = u @ u.T
    summary = category_summary(es, categories)
    assert list(summary.category) == ["market", "assets", "metrics", "banking", "investment"]
    for row in summary.itertuples():
        inside = [i for i, c in enumerate(categories) if c == row.category]
        outside = [i for i, c in enumerate(categories) if c != row.category]
        pairs = [cos[i, j] for i in inside for j in inside if i < j]
        assert row.texts == 5 and row.chance == pytest.approx(5 * 4 / 24)
        assert row.within == pytest.approx(np.mean(pairs), abs=1e-9)
        assert row.between == pytest.approx(np.mean([cos[i, j] for i in inside for j in outside]), abs=1e-9)
        nearest = [max((k for k in range(25) if k != i), key=lambda k: cos[i, k]) for i in inside]
        assert row.nearest_inside == sum(categories[k] == row.category for k in nearest)
    # the model groups finance terms better than chance (measured 16 of 25 nearest neighbours inside; chance 4.2)
    assert summary.nearest_inside.sum() >= 10


def test_done_when_finance_map_on_the_default_model(tmp_path, finance):
    """The issue's command: 25 finance terms in 5 categories, t-SNE, an HTML report; its table is the
    Python API's map of the same vectors."""
    out = tmp_path / "terms.html"
    res = cli("embed", "--file", FINANCE, "--map", "tsne", "--report", out, "--flash-attn", "off")
    assert "map of the unit vectors (t-SNE, perplexity 5, seed 0):" in res.stdout
    assert "texts have their nearest neighbour in their own category (chance: 4.2)" in res.stdout
    es, categories = finance
    want = embedding_map(es, "tsne", categories)
    for r in want.itertuples():
        assert re.search(rf"^\s*{r.Index + 1}\s+{re.escape(r.term)}\s+{r.x:.4f}\s+{r.y:.4f}\s+{r.category}$",
                         res.stdout, flags=re.M), r.term
    html = out.read_text(encoding="utf-8")
    assert "Map (t-SNE)" in html and "Categories" in html and html.count("<svg") == 2
    assert all(f">{t}<" in html for t in want.term)  # every point labelled (SVG text), every row in the table


def test_map_report_in_chromium(tmp_path, tiny_path, chromium_path):
    """Terms and categories that are markup stay text in the page, the SVG map and its legend; the
    heatmap's rows come in category order; nothing is fetched; no script error."""
    terms = ["the cat", XSS[1], "a dog", "hello world", "$x^2$ & <b>bold</b>", "the mat"]
    cats = [XSS[0], "animals", XSS[0], "_greetings", "animals", "_greetings"]
    f = tmp_path / "x.tsv"
    f.write_text("".join(f"{t}\t{c}\n" for t, c in zip(terms, cats)))
    out = tmp_path / "x.html"
    common = ["--file", f, "--map", "tsne", "--perplexity", "2", "--seed", "7", "--model", tiny_path, "--flash-attn", "off"]
    d = json.loads(cli("embed", *common, "--json", "--report", out).stdout)
    assert d["map"] == {**d["map"], "method": "tsne", "perplexity": 2.0, "seed": 7, "explained": None}
    assert [(p["term"], p["category"]) for p in d["map"]["points"]] == list(zip(terms, cats))
    assert [t["category"] for t in d["texts"]] == cats
    assert [c["category"] for c in d["categories"]] == [XSS[0], "animals", "_greetings"]
    table = cli("embed", *common, "--report", tmp_path / "x.md").stdout
    assert "map of the unit vectors (t-SNE, perplexity 2, seed 7):" in table
    for p in d["map"]["points"]:  # the same map, printed
        assert f"{p['x']:.4f}" in table and f"{p['y']:.4f}" in table
    md = (tmp_path / "x.md").read_text(encoding="utf-8")
    assert "x_files/map_tsne.png" in md and "x_files/similarity.png" in md and "<script>" not in md
    assert (tmp_path / "x_files" / "map_tsne.png").read_bytes()[:4] == b"\x89PNG"
    page_text = out.read_text(encoding="utf-8")
    for bad in XSS + ["<b>bold</b>"]:
        assert bad not in page_text
    assert page_text.count("<script") == 2
    with Browser() as b:
        page = b.open(out)
        assert page.problems() == []
        assert page.eval("document.querySelectorAll('img, b').length") == 0
        assert page.eval("document.querySelectorAll('script').length") == 2
        figs = page.eval("Array.from(document.querySelectorAll('.fig')).map(f => "
                         "Array.from(f.querySelectorAll('text')).map(t => t.textContent))")
        heat, scatter = figs
        ticks = [t for t in heat if re.match(r"\d+\. ", t)]
        assert [int(t.split(".")[0]) for t in ticks[:6]] == [1, 3, 2, 5, 4, 6]  # grouped by category
        for term in terms:
            assert label(term, 24) in scatter, term
        for name in (XSS[0], "animals", "_greetings"):  # legend entries, "_" kept (matplotlib drops such labels)
            assert name in scatter and name in heat
        cells = page.eval("Array.from(document.querySelectorAll('table')).map(t => t.innerText).join('\\n')")
        assert XSS[1] in cells and XSS[0] in cells
        page.screenshot(tmp_path / "shot.png")
        assert (tmp_path / "shot.png").stat().st_size > 30_000


def _map_svg(html: str, n_points: int) -> str:
    """The map's SVG in a report: the figure with a coloured marker per text."""
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    found = [s for s in svgs if len(re.findall(r'<use [^>]*style="fill: #', s)) == n_points]
    assert len(found) == 1, [len(re.findall(r'<use [^>]*style="fill: #', s)) for s in svgs]
    return found[0]


def test_map_points_take_their_categorys_colour_and_sit_where_the_map_puts_them(tmp_path, tiny_path):
    """Read back from the report's SVG: each text's marker (found under its label, which matplotlib offsets by
    (4, 3) points) has the colour the legend gives its category; the legend names each category once, in order of
    first appearance, each its own colour; the markers' page positions are an affine image of the --json map's
    coordinates (x to the right, y up), so the colours sit on the right points."""
    terms = ["the cat", "a dog", "hello world", "the mat", "hello", "sat on", "she was", "it is"]
    cats = ["things", "animals", "greetings", "things", "greetings", "animals", "animals", "things"]
    f = tmp_path / "x.tsv"
    f.write_text("".join(f"{t}\t{c}\n" for t, c in zip(terms, cats)))
    out = tmp_path / "x.html"
    d = json.loads(cli("embed", "--file", f, "--map", "pca", "--model", tiny_path, "--flash-attn", "off", "--json",
                       "--report", out).stdout)
    svg = _map_svg(out.read_text(encoding="utf-8"), len(terms))
    markers = [(float(x), float(y), c) for x, y, c in
               re.findall(r'<use [^>]*x="([-\d.]+)" y="([-\d.]+)" style="fill: (#[0-9a-f]{6}); stroke: #ffffff', svg)]
    labels = {t: (float(x), float(y)) for x, y, t in
              re.findall(r'<text [^>]*fill: #222222" x="([-\d.]+)" y="([-\d.]+)"[^>]*>([^<]*)</text>', svg)}
    legend = svg[svg.index('<g id="legend_1">'):]
    entries = re.findall(r'<path d="M [^"]*" style="fill: (#[0-9a-f]{6});.*?<text [^>]*>([^<]*)</text>', legend,
                         flags=re.S)
    colour = {name: c for c, name in entries}
    assert [name for _, name in entries] == ["things", "animals", "greetings"]  # first appearance, not sorted
    assert len(set(colour.values())) == 3
    pos = []
    for p in d["map"]["points"]:
        lx, ly = labels[p["term"]]
        (m,) = [m for m in markers if abs(m[0] - (lx - 4)) < 0.01 and abs(m[1] - (ly + 3)) < 0.01]
        assert m[2] == colour[p["category"]], (p["term"], p["category"], m[2], colour)
        pos.append((p["x"], p["y"], m[0], m[1]))
    a = np.array(pos)
    for k, sign in ((0, 1), (1, -1)):  # page x grows with the map's x, page y (downward) with -y
        slope, icept = np.polyfit(a[:, k], a[:, k + 2], 1)
        assert np.sign(slope) == sign
        assert np.abs(slope * a[:, k] + icept - a[:, k + 2]).max() < 0.01  # SVG coordinates have 6 decimals
