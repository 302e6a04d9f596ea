"""Grids of sampling settings: comma-separated axes, presets, TOML grid files, and their product.

A grid is the product of its axes (temperature, top_k, top_p, min_p, typical_p, repeat_penalty; the
decoding-strategy axes strategy, beams, length_penalty, no_repeat_ngram, best_of; and for the llama.cpp
chain dry_multiplier, dry_base, dry_allowed_length, xtc_probability, xtc_threshold, top_n_sigma,
dynatemp_range, mirostat, mirostat_tau, samplers) over a base of fixed settings (any setting: chain =
"llama.cpp", logit_bias = [[" the", -2.0]], ignore_eos = true, ...); a sweep runs it × prompts × seeds.
Every value is checked before
anything runs, and each bad one is named with its axis.

Grid file (TOML), several named grids and fixed settings:

    [fixed]                  # applies to every grid in the file
    min_p = 0.0
    [grid.focused]
    temperature = [0.0, 0.3]
    top_k = [10]
    [grid.open]
    temperature = [0.7, 1.0]
    top_p = [0.9, 0.99]
    fixed = { repeat_penalty = 1.1 }

`--grid FILE` runs every grid in it; `--grid FILE:focused` runs one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import fields
from pathlib import Path

from llamalens.errors import InvalidSettings
from llamalens.settings import SamplingSettings

AXES = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
        # llama.cpp chain only (settings.LLAMA_CPP_ONLY): need --chain llama.cpp or the llama-server preset
        "dry_multiplier", "dry_base", "dry_allowed_length", "xtc_probability", "xtc_threshold", "top_n_sigma",
        "dynatemp_range", "mirostat", "mirostat_tau", "samplers")
_INT_AXES = {"top_k", "dry_allowed_length", "mirostat"}
_STR_AXES = {"samplers"}
# -- decoding-strategy axes ------------------------------------------------------------
MAX_SAMPLES = 1_000_000  # samples in one sweep: prompts x configurations x seeds (its plan is held in memory)
MAX_CONFIGS = 10_000  # configurations in one grid (each is a settings object, a summary row, a report column)
STRATEGY_AXES = ("strategy", "beams", "length_penalty", "no_repeat_ngram", "best_of")
AXES = AXES + STRATEGY_AXES
_INT_AXES |= {"beams", "no_repeat_ngram", "best_of"}
_STR_AXES |= {"strategy"}
# -- end of the decoding-strategy axes ------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "factual": dict(temperature=0.3, top_k=10, top_p=0.8, repeat_penalty=1.3),
    "balanced": dict(temperature=0.7, top_k=40, top_p=0.9, repeat_penalty=1.1),
    "creative": dict(temperature=0.9, top_k=50, top_p=0.95, repeat_penalty=1.05),
    "llama-cpp-python": {},  # create_completion's defaults
    # the tutorials' two beam settings (transformers' num_beams=5, and with no_repeat_ngram_size=2)
    "beam5": dict(strategy="beam", beams=5, early_stopping="true"),
    "beam5-norepeat": dict(strategy="beam", beams=5, no_repeat_ngram=2, early_stopping="true"),
    "llama-server": dict(chain="llama.cpp"),  # llama-server's defaults (and, in the CLI, its context options)
}


def parse_axis(name: str, text: str) -> list:
    """'0,0.7,1.0' -> [0.0, 0.7, 1.0]; names the axis and value on error. Samplers orders are kept as text
    ('top_k;temperature,min_p;temperature' -> two orders)."""
    if name in _STR_AXES:
        out = [part.strip() for part in str(text).split(",") if part.strip()]
        if not out:
            raise InvalidSettings(f"--{name.replace('_', '-')} is empty; give at least one value")
        return out
    conv = int if name in _INT_AXES else float
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(conv(part))
        except ValueError:
            raise InvalidSettings(f"--{name.replace('_', '-')}: {part!r} is not a{'n integer' if conv is int else ' number'}; "
                                  f"give a comma-separated list such as {'2,40' if conv is int else '0,0.7,1.0'}") from None
    if not out:
        raise InvalidSettings(f"--{name.replace('_', '-')} is empty; give at least one value")
    return out


def parse_axes(texts: dict[str, str | None]) -> dict[str, list]:
    """{'temperature': '0,0.7', 'top_k': None} -> {'temperature': [0.0, 0.7]} (options not given left out)."""
    return {name: parse_axis(name, text) for name, text in texts.items() if text is not None}


def parse_seeds(seeds: int | None, seed_list: str | None) -> list[int]:
    if seeds is not None and seed_list:
        raise InvalidSettings("give --seeds N or --seed LIST, not both")
    if seed_list:
        try:
            return [int(s) for s in seed_list.split(",") if s.strip()]
        except ValueError:
            raise InvalidSettings(f"--seed: {seed_list!r} must be comma-separated integers, e.g. 1,2,3") from None
    n = 1 if seeds is None else seeds
    if n < 1:
        raise InvalidSettings(f"--seeds {n} must be >= 1")
    if n > MAX_SAMPLES:  # before the list is made: 10**8 seeds alone take gigabytes
        raise InvalidSettings(f"--seeds {n:,} is more than one sweep holds ({MAX_SAMPLES:,} samples in all); "
                              "lower --seeds, or split the work into several sweeps")
    return list(range(n))


def check_size(n_prompts: int, n_configs: int, n_seeds: int) -> None:
    """Refuse a sweep of more than MAX_SAMPLES samples before it is planned (the plan is held in memory)."""
    n = n_prompts * n_configs * n_seeds
    if n > MAX_SAMPLES:
        raise InvalidSettings(f"the sweep would hold {n:,} samples ({n_prompts:,} prompt(s) x {n_configs:,} "
                              f"configuration(s) x {n_seeds:,} seed(s)), more than {MAX_SAMPLES:,}; narrow the grid, "
                              "lower --seeds, or split the work into several sweeps")


def expand(axes: dict[str, list], base: SamplingSettings | None = None) -> list[SamplingSettings]:
    """The product of the axes over `base` (seed left at base's; the sweep sets it). With decoding-strategy
    axes each configuration is normalized (the fields its strategy ignores at their defaults) and duplicates
    are dropped: `--strategy greedy,beam --beams 3,5` is greedy once and beam twice."""
    base = base or SamplingSettings()
    names = [a for a in AXES if a in axes]
    size = math.prod(len(axes[a]) for a in names)
    if size > MAX_CONFIGS:  # before the product is built
        raise InvalidSettings(f"the grid's axes make {size:,} configurations, more than a sweep takes "
                              f"({MAX_CONFIGS:,}); give fewer values per axis, or split the grid into several sweeps")
    out = []
    for values in itertools.product(*(axes[a] for a in names)):
        out.append(base.with_(**dict(zip(names, values))))
    if not any(a in axes for a in STRATEGY_AXES) and base.strategy == SamplingSettings().strategy:
        return out
    unique: list[SamplingSettings] = []
    for c in out:
        n = c.normalized() if not c.problems() else c  # a bad value is reported by check(), as given
        if n not in unique:
            unique.append(n)
    return unique


def check(configs: list[SamplingSettings], seeds: list[int]) -> None:
    """Every bad value, each with its axis, in one error."""
    if not configs:
        raise InvalidSettings("the grid is empty; give at least one value per axis")
    problems: list[str] = []
    for c in configs:
        for p in c.problems():
            if p not in problems:
                problems.append(p)
    for s in seeds:
        for p in SamplingSettings(seed=s).problems():
            if p not in problems:
                problems.append(p)
    if problems:
        raise InvalidSettings("bad grid values: " + "; ".join(problems))


def chain_of(preset: str | None, chain: str | None) -> str | None:
    """The chain a sweep asks for: --chain, else the preset's (llama-server: llama.cpp), else None."""
    return chain or (PRESETS.get(preset, {}).get("chain") if preset else None)


def build_configs(preset: str | None = None, grid_file: str | None = None,
                  axes_text: dict[str, str | None] | None = None, fixed: dict | None = None,
                  chain: str | None = None, axes: dict[str, list] | None = None) -> list[SamplingSettings]:
    """A sweep's configurations: the preset (or create_completion's defaults) with `fixed` over it, and
    `chain` when given, as the base; each grid of the grid file over it, then the command line's axes
    (`axes_text`, or `axes` already parsed: the Python API's) over each of those (or over the base alone)."""
    if preset is not None and preset not in PRESETS:
        raise InvalidSettings(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    base = (SamplingSettings(**PRESETS[preset]) if preset else SamplingSettings()).with_(**(fixed or {}))
    if chain:
        base = base.with_(chain=chain)
    configs: list[SamplingSettings] = []
    if grid_file:
        for _name, file_axes, file_fixed in load_grid_file(grid_file):
            configs += expand(file_axes, base.with_(**file_fixed))
    axes = {**parse_axes(axes_text or {}), **(axes or {})}
    if axes or not configs:
        configs = [c for start in (configs or [base]) for c in expand(axes, start)]
    return configs


# fixed settings that are not numbers: (check, what it must be)
_FIXED_KINDS = {
    "chain": (lambda v: isinstance(v, str), "a text: llama-cpp-python or llama.cpp"),
    "samplers": (lambda v: isinstance(v, str), "a text such as \"top_k;temperature\""),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
    "dry_sequence_breakers": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                              "a list of texts"),
    "logit_bias": (lambda v: isinstance(v, (list, dict)), "a list of [token id or text, bias] pairs or a table"),
    # decoding strategies
    **{k: (lambda v: isinstance(v, str), "a text") for k in ("strategy", "early_stopping", "best_of_by")},
}


def load_grid_file(spec: str) -> list[tuple[str, dict, dict]]:
    """`FILE` or `FILE:NAME` -> [(grid name, axes, fixed settings)]."""
    path_text, _, name = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path = Path(path_text)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore
    from llamalens.inputs import read_utf8

    if not path.exists():
        raise InvalidSettings(f"--grid: file not found: {path}")
    text = read_utf8(path, "--grid")  # bounded in size, UTF-8 checked
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidSettings(f"--grid: {path} is not valid TOML ({e}); see `llamalens sweep --help`") from None
    except RecursionError:  # tomllib recurses into nested arrays and tables
        raise InvalidSettings(f"--grid: {path} nests arrays or tables too deeply; a grid file is a few flat "
                              "tables (see `llamalens sweep --help`)") from None
    return _grid_tables(data, path, name)


def _grid_tables(data: dict, path: Path, name: str) -> list[tuple[str, dict, dict]]:
    """Check a grid file's shape (every key where a grid file may hold it, every value of the right kind) and
    return its grids; each problem names the key."""
    from llamalens.inputs import json_kind

    def fail(msg: str):
        raise InvalidSettings(f"--grid: {path}: {msg}; see `llamalens sweep --help`")

    for key in data:
        if key not in ("grid", "fixed"):
            fail(f"unknown top-level key {key!r}: a grid file holds [fixed] and [grid.NAME] tables")
    grids = data.get("grid")
    if not isinstance(grids, dict) or not grids:
        fail("no [grid.NAME] tables" if grids is None or grids == {} else f"`grid` is {json_kind(grids)}, "
             "not a table of [grid.NAME] tables")
    if name and name not in grids:
        raise InvalidSettings(f"--grid: no grid named {name!r} in {path}; it has: {', '.join(grids)}")
    known = {f.name for f in fields(SamplingSettings)} - {"seed"}

    def fixed_table(value, where: str) -> dict:
        if not isinstance(value, dict):
            fail(f"{where} is {json_kind(value)}, not a table of settings (e.g. fixed = {{ min_p = 0.0 }})")
        for k, v in value.items():
            if k not in known:
                fail(f"unknown fixed setting {k!r} in {where}; settings are {', '.join(sorted(known))}")
            want = _FIXED_KINDS.get(k)
            if want is not None:
                ok, what = want
                if not ok(v):
                    fail(f"{where}.{k} is {json_kind(v)}, not {what}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                fail(f"{where}.{k} is {json_kind(v)}, not a number")
        return dict(value)

    top_fixed = fixed_table(data.get("fixed", {}), "[fixed]")
    out = []
    for gname, g in grids.items():
        if name and gname != name:
            continue
        where = f"[grid.{gname}]"
        if not isinstance(g, dict):
            fail(f"{where} is {json_kind(g)}, not a table of axes (e.g. temperature = [0.0, 0.7])")
        fixed = {**top_fixed, **fixed_table(g.get("fixed", {}), f"{where}.fixed")}
        axes = {}
        for k, v in g.items():
            if k == "fixed":
                continue
            if k not in AXES:
                fail(f"unknown axis {k!r} in {where}; axes are {', '.join(AXES)}")
            values = v if isinstance(v, list) else [v]
            if not values:
                fail(f"axis {k!r} in {where} is empty; give at least one value")
            for x in values:
                if k in _STR_AXES:
                    if not isinstance(x, str):
                        example = '"top_k;temperature"' if k == "samplers" else '"beam"'
                        fail(f"{where}.{k} holds {json_kind(x)} {x!r}, not a text such as {example}")
                elif isinstance(x, bool) or not isinstance(x, (int, float)) or (k in _INT_AXES and not isinstance(x, int)):
                    fail(f"{where}.{k} holds {json_kind(x)} {x!r}, not {'an integer' if k in _INT_AXES else 'a number'}")
            axes[k] = values
        if not axes and not fixed:
            fail(f"{where} is empty; give at least one axis")
        out.append((gname, axes, fixed))
    return out
