"""Run kinds: what is planned in the store, decoded and read back.

    sweep.py          prompts × sampling configurations × seeds (kind "sweep")
    sweep_records.py  a sweep sample's typed extras (beam search, best-of, grammar, n-gram blocks)
    fork.py           a forking-paths analysis: continuations from every position of a base path (kind "fork")
    fork_records.py   a fork's typed records: its outcome spec, plan settings, cost and per-sample extras
    fork_analysis.py  the pure analysis of a fork's outcomes
    grid.py           grids of sampling settings: axes, presets, TOML grid files
    loaded.py         a stored run loaded back: token table, summary, exports
    ray.py            running a run's pending work on Ray workers
"""
