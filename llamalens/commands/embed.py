"""Embeddings: embed."""

from __future__ import annotations

import click

from llamalens.looks.embed_map import DEFAULT_PERPLEXITY, DEFAULT_SEED, MAX_SEED, METHODS
from llamalens.commands.options import GroupedCommand, model_options, pop_model_options, report_option
from llamalens.commands.output import say, check_report_path, fail_cleanly, json_out, load_model, print_table, records, write_report

MAX_MATRIX = 12  # texts up to which the terminal shows the whole cosine matrix


@click.command(cls=GroupedCommand)
@click.argument("texts", nargs=-1)
@click.option("--file", "-f", "file", default=None,
              help="More texts ('-' = stdin): one per line, or term<TAB>category lines, or a .jsonl file of "
                   '{"text": ..., "category": ...}; blank lines skipped.')
@click.option("--query", "-q", default=None, help="Rank the texts by similarity to this one.")
@click.option("--pooling", type=click.Choice(["model", "mean", "mean-all", "last", "first"]), default="model",
              show_default=True, help="model: what the GGUF declares, else mean over the text's tokens (BOS left out); "
                                      "mean-all: llama.cpp's MEAN (BOS in); last; first (CLS).")
@click.option("--parallel", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Texts per decode: faster for many texts; above 1, vectors move by llama.cpp's batch noise.")
@click.option("--pairs", type=click.IntRange(0, 10000), default=10, show_default=True,
              help="Most similar pairs to list.")
@click.option("--map", "map_method", type=click.Choice(METHODS), default=None,
              help="Place the texts in 2-D: pca (numpy) or tsne (scikit-learn, the 'maps' extra); a table, and a "
                   "labelled scatter plot in --report.")
@click.option("--perplexity", type=click.FloatRange(0, min_open=True), default=None,
              help=f"With --map tsne: t-SNE's perplexity, below the number of texts (default {DEFAULT_PERPLEXITY:g}).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None,
              help=f"With --map tsne: t-SNE's random seed (default {DEFAULT_SEED}); a seed always gives the same map.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (cosine matrix included).")
@click.option("--vectors", is_flag=True, help="With --json: include every vector.")
@report_option("Also write a report (FILE.html or FILE.md): heatmap, categories, map, neighbours, pairs.")
@model_options
@fail_cleanly
def embed(texts, file, query, pooling, parallel, pairs, map_method, perplexity, seed, as_json, vectors, report_path,
          model, **kw):
    """Embed TEXTS and compare them by cosine similarity: matrix, nearest neighbours, most similar pairs,
    and with --map a 2-D map; categories from --file group the heatmap and colour the map.

    \b
    llamalens embed king queen man woman apple banana
    llamalens embed --file terms.txt --query "a fruit" --report terms.html
    llamalens embed --file finance_terms.tsv --map tsne --report terms.html
    """
    from llamalens.looks.embed import check_request, embed_texts, rank_by_query
    from llamalens.looks.embed_map import check_map, embedding_map
    from llamalens.errors import InvalidInput
    from llamalens.inputs import read_terms

    items, categories = list(texts), None
    if file:
        more, categories = read_terms(file)
        if categories and items:
            raise InvalidInput(f"{file} gives each text a category, but the {len(items)} text(s) given as arguments "
                               "have none; put them in the file with their category")
        items += more
    check_request(items, query)
    if vectors and not as_json:
        raise click.UsageError("--vectors adds the vectors to the JSON output: give --json too")
    if map_method != "tsne" and (perplexity is not None or seed is not None):
        raise click.UsageError("--perplexity and --seed set t-SNE: give --map tsne too")
    perplexity = DEFAULT_PERPLEXITY if perplexity is None else perplexity
    seed = DEFAULT_SEED if seed is None else seed
    if map_method:
        check_map(map_method, len(items), perplexity, seed, distinct=len(set(items)))
    check_report_path(report_path)
    loaded = load_model(model, pop_model_options(kw))
    progress = (lambda k, n: click.echo(f"\rembedding: {k}/{n} texts", err=True, nl=k >= n)) if len(items) > 50 else None
    if query is None:
        es, ranking = embed_texts(loaded, items, pooling, parallel, progress), None
    else:
        es, ranking = rank_by_query(loaded, query, items, pooling, parallel, progress)
    for note in es.notes:
        say(f"note: {note}", err=True)
    projection = embedding_map(es, map_method, categories, perplexity, seed) if map_method else None
    if as_json:
        json_out(_json(es, ranking, categories, projection, vectors))
    else:
        _print_embeddings(es, ranking, pairs)
        _print_categories_and_map(es, categories, projection)
    if report_path:
        from llamalens.reports.texts import embed_document

        write_report(embed_document(es, query, ranking.order if ranking else None, categories, projection), report_path)


def _json(es, ranking, categories, projection, vectors) -> dict:
    from llamalens.looks.embed_map import category_summary

    d = es.to_dict(vectors)
    if ranking is not None:
        d["query"] = ranking.to_dict(es.texts, vectors)
    if categories:
        for t, c in zip(d["texts"], categories):
            t["category"] = c
        d["categories"] = records(category_summary(es, categories))
    if projection is not None:
        d["map"] = {**projection.attrs, "points": records(projection)}
    return d


def _print_categories_and_map(es, categories, projection) -> None:
    from llamalens.looks.embed_map import category_summary
    from llamalens.visible import label

    if categories and len(es.texts) > 1:
        summary = category_summary(es, categories)
        say("")
        say("by category (mean cosine within its pairs and to the other texts; nearest neighbour inside it):")
        print_table([("category", "texts", "within", "between", "nearest inside", "by chance")]
                    + [(label(r.category, 30), r.texts, _f4(r.within), _f4(r.between), r.nearest_inside, f"{r.chance:.1f}")
                       for r in summary.itertuples()], right={1, 2, 3, 4, 5})
        say(f"{int(summary.nearest_inside.sum())} of {len(es.texts)} texts have their nearest neighbour in their own "
            f"category (chance: {summary.chance.sum():.1f})")
    if projection is not None:
        a = projection.attrs
        how = (f"t-SNE, perplexity {a['perplexity']:g}, seed {a['seed']}" if a["method"] == "tsne" else
               f"PCA, {a['explained'][0]:.1%} + {a['explained'][1]:.1%} of the variance")
        say("")
        say(f"map of the unit vectors ({how}):")
        print_table([("#", "text", "x", "y", "category")]
                    + [(i + 1, label(r.term, 40), f"{r.x:.4f}", f"{r.y:.4f}", label(r.category or "", 30))
                       for i, r in enumerate(projection.itertuples())], right={0, 2, 3})


def _f4(v: float) -> str:
    return "–" if v != v else f"{v:.4f}"


def _print_embeddings(es, ranking, pairs) -> None:
    from llamalens.visible import label

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
