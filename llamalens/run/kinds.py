"""The run kinds, each declared in one place: how it is decoded and saved (its lifecycle), how its stored
runs are read back, what its token export adds, and which functions show it, report it and display it.

    RunKind(name, lifecycle, token_columns, show, report, notebook)
        lifecycle      pending / decode / chunks / keep_stats / finish (run/lifecycle.py), with its
                       RunInterrupted; run/ray.py deals `decode` out to workers by the kind's name
        token_columns  (loaded run, token table) -> the table `export` writes
        show           the command line's summary of a run: (store, run id, as_json, texts=bool) -> printed
        report         a run's report written to a file: reports.<kind> (store, info, path, fmt, **options)
        notebook       a Run's rich display: (api.Run) -> reports.document.Document
        generates      whether its samples are generated texts (each with its confidence measures)
        explore        its samples as branches of `llamalens serve`'s token view: (store, run info) -> list of
                       branches in the tree format; "" for a kind whose records are not token sequences

`show`, `report` and `notebook` sit in layers above this one (commands/, reports/), so they are named here
as "module:function" and imported when used, as a plugin's entry points are: the kind is still declared in
one place, and no code elsewhere branches on a kind's name. A new kind is one more entry in KINDS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from llamalens.errors import StoreError
from llamalens.run.compare import COMPARE
from llamalens.run.evaluation import EVAL, with_eval_columns
from llamalens.run.fork import FORK, with_fork_columns
from llamalens.run.lens import LENS, with_lens_columns
from llamalens.run.ladder import comparison_tokens
from llamalens.run.lifecycle import Kind
from llamalens.run.sweep import SWEEP
from llamalens.run.tree import TREE


@dataclass(frozen=True)
class RunKind:
    name: str
    lifecycle: Kind
    token_columns: Callable | None  # (LoadedRun, token DataFrame) -> DataFrame; None: the table as it is
    show: str
    report: str
    notebook: str
    generates: bool = True  # its samples are generated texts: each carries confidence measures (export, show)
    explore: str = "llamalens.serve.stored:samples_as_branches"  # "": the token view cannot show its runs

    def hook(self, which: str) -> Callable:
        """The function named by `show`, `report`, `notebook` or `explore`."""
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


KINDS: dict[str, RunKind] = {k.name: k for k in (
    RunKind("sweep", SWEEP, None, show="llamalens.commands.runs:show_sweep",
            report="llamalens.reports.run:write_run_report", notebook="llamalens.reports.notebook:sweep_run_document"),
    RunKind("fork", FORK, with_fork_columns, show="llamalens.commands.fork:show_fork",
            report="llamalens.reports.fork:write_fork_report", notebook="llamalens.reports.notebook:fork_run_document",
            explore="llamalens.serve.stored:fork_as_branches"),
    RunKind("tree", TREE, None, show="llamalens.commands.serve:show_tree",
            report="llamalens.reports.tree:write_tree_report", notebook="llamalens.reports.tree:tree_document",
            explore="llamalens.serve.stored:tree_as_branches"),
    RunKind("lens", LENS, with_lens_columns, show="llamalens.commands.lens:show_lens",
            report="llamalens.reports.lens:write_lens_report", notebook="llamalens.reports.lens:lens_run_document",
            generates=False, explore=""),
    RunKind("compare", COMPARE, comparison_tokens, show="llamalens.commands.compare:show_compare",
            report="llamalens.reports.ladder:write_ladder_report",
            notebook="llamalens.reports.ladder:ladder_run_document", generates=False, explore=""),
    RunKind("eval", EVAL, with_eval_columns, show="llamalens.commands.eval:show_eval",
            report="llamalens.reports.eval:write_eval_report", notebook="llamalens.reports.eval:eval_run_document",
            generates=False, explore=""),
)}


def kind(name: str) -> RunKind:
    """The kind of that name; a store written by a newer llamalens may hold kinds this one does not know."""
    try:
        return KINDS[name]
    except KeyError:
        raise StoreError(f"this llamalens does not know runs of kind {name!r} (it knows {', '.join(KINDS)}); "
                         "upgrade llamalens to read them") from None
