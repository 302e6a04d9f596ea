"""Reports: what a run, a scored text, a comparison or a set of embeddings looks like on a page.

    document.py   the format-neutral Document and its two renderers (HTML, Markdown + PNGs), write()
    notebook.py   rich display of results in Jupyter (the same sections as the reports)
    fork.py       a fork run's report
    run.py        a sweep run's report, one builder per section, from one analysis.LoadedRun
    texts.py      the one-shot reports: score, compare, embed, next's sampler view
    plots.py      matplotlib figures (object API, Agg), SVG / PNG

Only this package writes markup or draws; everything it shows comes from typed results.
"""
