"""Run kinds: what is planned in the store, decoded and read back.

    sweep.py          prompts × sampling configurations × seeds (kind "sweep")
    fork.py           a forking-paths analysis: continuations from every position of a base path (kind "fork")
    fork_analysis.py  the pure analysis of a fork's outcomes
    grid.py           grids of sampling settings: axes, presets, TOML grid files
    loaded.py         a stored run loaded back: token table, summary, exports
    ray.py            running a run's pending work on Ray workers
"""
