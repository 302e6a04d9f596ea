"""Embeddings: embed."""

from __future__ import annotations

import click

from .options import model_options, pop_model_options, report_option
from .output import say, check_report_path, fail_cleanly, json_out, load_model, print_table, write_report

MAX_MATRIX = 12  # texts up to which the terminal shows the whole cosine matrix


@click.command()
@click.argument("texts", nargs=-1)
@click.option("--file", "-f", "file", default=None, help="More texts, one per line ('-' = stdin); blank lines skipped.")
@click.option("--query", "-q", default=None, help="Rank the texts by similarity to this one.")
@click.option("--pooling", type=click.Choice(["model", "mean", "mean-all", "last", "first"]), default="model",
              show_default=True, help="model: what the GGUF declares, else mean over the text's tokens (BOS left out); "
                                      "mean-all: llama.cpp's MEAN (BOS in); last; first (CLS).")
@click.option("--parallel", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Texts per decode: faster for many texts; above 1, vectors move by llama.cpp's batch noise.")
@click.option("--pairs", type=click.IntRange(0, 10000), default=10, show_default=True,
              help="Most similar pairs to list.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (cosine matrix included).")
@click.option("--vectors", is_flag=True, help="With --json: include every vector.")
@report_option("Also write a report (FILE.html or FILE.md): heatmap, neighbours, pairs.")
@model_options
@fail_cleanly
def embed(texts, file, query, pooling, parallel, pairs, as_json, vectors, report_path, model, **kw):
    """Embed TEXTS and compare them by cosine similarity: matrix, nearest neighbours, most similar pairs.

    \b
    llamalens embed king queen man woman apple banana
    llamalens embed --file terms.txt --query "a fruit" --report terms.html
    """
    from ..embed import check_request, embed_texts, rank_by_query
    from ..inputs import read_text_file

    items = list(texts) + ([t for t in read_text_file(file).splitlines() if t.strip()] if file else [])
    check_request(items, query)
    if vectors and not as_json:
        raise click.UsageError("--vectors adds the vectors to the JSON output: give --json too")
    check_report_path(report_path)
    loaded = load_model(model, pop_model_options(kw))
    progress = (lambda k, n: click.echo(f"\rembedding: {k}/{n} texts", err=True, nl=k >= n)) if len(items) > 50 else None
    if query is None:
        es, ranking = embed_texts(loaded, items, pooling, parallel, progress), None
    else:
        es, ranking = rank_by_query(loaded, query, items, pooling, parallel, progress)
    for note in es.notes:
        say(f"note: {note}", err=True)
    if as_json:
        d = es.to_dict(vectors)
        if ranking is not None:
            d["query"] = ranking.to_dict(es.texts, vectors)
        json_out(d)
    else:
        _print_embeddings(es, ranking, pairs)
    if report_path:
        from ..reports.texts import embed_document

        write_report(embed_document(es, query, ranking.order if ranking else None), report_path)


def _print_embeddings(es, ranking, pairs) -> None:
    from ..visible import label

    n = len(es.texts)
    say(f"{n + (ranking is not None)} texts embedded ({es.vectors.shape[1]} dimensions, pooling {es.pooling}"
               f"{'' if es.parallel == 1 else f', {es.parallel} per decode'}) in {es.seconds:.2f} s")
    if ranking is not None:
        say(f"by cosine similarity to {label(ranking.query, 60)!s}:")
        print_table([("rank", "cosine", "text")] + [(r, f"{c:.4f}", label(es.texts[k], 60))
                                                    for r, (k, c) in enumerate(ranking.order, 1)], right={0, 1})
        return
    cos = es.cosine()
    if n <= MAX_MATRIX:
        names = [label(t, 16) for t in es.texts]
        say("cosine similarity:")
        rows = [("",) + tuple(f"{i + 1}" for i in range(n))]
        rows += [(f"{i + 1} {names[i]}",) + tuple("" if i == j else f"{cos[i, j]:.3f}" for j in range(n))
                 for i in range(n)]
        print_table(rows, right=set(range(1, n + 1)))
        say("")
    rows = [("#", "text", "tokens", "nearest", "cosine")]
    rows += [(i + 1, label(t, 40), nt, f"{j + 1} {label(es.texts[j], 30)}", f"{c:.4f}")
             for i, (t, nt, (j, c)) in enumerate(zip(es.texts, es.n_tokens, es.nearest()))]
    print_table(rows, right={0, 2, 4})
    if pairs and n > 2:
        say("")
        say(f"the {min(pairs, n * (n - 1) // 2)} most similar pairs:")
        print_table([("cosine", "text", "text")] + [(f"{c:.4f}", f"{i + 1} {label(es.texts[i], 40)}",
                                                     f"{j + 1} {label(es.texts[j], 40)}") for i, j, c in es.pairs(pairs)],
                    right={0})
