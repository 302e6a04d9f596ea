"""The commands, one module per family; each command parses its options, calls the library, prints.

    look.py    models, tokenize, next, generate
    runs.py    sweep, presets, runs, show, report, export
    score.py   score, choose, compare
    embed.py   embed
    options.py shared option decorators (defaults read from settings.py's typed records)
    output.py  tables, JSON, progress, reports written, errors -> one-line messages

cli.py registers them on the `llamalens` group; no module here imports cli.py.
"""
