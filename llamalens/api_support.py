"""What every call of the Python API (api.py) shares: the store and model it is given or opens, warnings for the
notes the CLI prints, and tqdm progress bars."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

from llamalens.arguments import model_options as checked_options
from llamalens.errors import InvalidArgument, InvalidInput


def store_of(store, read_only: bool = False):
    """The Store of store= (read_only: for calls that only read, which create nothing: Store's read_only)."""
    from llamalens.store import Store

    if store is not None and not isinstance(store, (Store, str, os.PathLike)):
        raise InvalidArgument(f"store={store!r}: give a Store, the path of a store file, or None (the default store)")
    return store if isinstance(store, Store) else Store(store, read_only=read_only)


@contextmanager
def model_of(model, options: dict, sequences: int = 1, rows: int | None = None, cells: int | None = None, analysis=None):
    """A loaded Model as given, or one loaded here (the CLI's memory check) and closed afterwards."""
    from llamalens.modelfiles.memory import checked_load
    from llamalens.modelfiles.find import resolve_source
    from llamalens.core.runtime import Model

    if isinstance(model, Model):
        if options:
            checked_options(options)  # a name that is no model option at all is said first
            raise InvalidInput(f"model options ({', '.join(options)}) apply when a model is loaded: pass them to "
                               "ll.load_model(...), or give model= as a path or name")
        yield model
        return
    loaded = checked_load(resolve_source(model), checked_options(options), sequences, rows, cells,
                          analysis=analysis)
    try:
        yield loaded
    finally:
        loaded.close()


def note(note: str, stacklevel: int = 3) -> None:
    warnings.warn(note, stacklevel=stacklevel)  # the line of the caller of the ll.* function


def warn_chat(rendered: list) -> None:
    """A note for each template whose markers are plain text to this model (as the CLI's warning)."""
    for w in dict.fromkeys(r.warning() for r in rendered if r.warning()):
        note(w, stacklevel=4)


@contextmanager
def progress_bar(progress: bool, total: int, desc: str, unit: str, initial: int = 0):
    """A tqdm bar (None when progress is off)."""
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def sweep_ticks(bar):
    """An on_progress callback for sweep.execute / fork.execute_fork that moves a tqdm bar."""
    if bar is None:
        return None

    def tick(prog):
        bar.total = prog.total
        bar.update(prog.done - bar.n)
        bar.set_postfix_str(f"{prog.tokens_per_s:.0f} tok/s", refresh=False)

    return tick


def window_ticks(bar):
    """An on_progress(k, n) callback (score, compare) that moves a tqdm bar."""
    if bar is None:
        return None

    def tick(k, n):
        bar.total = n
        bar.update(k - bar.n)

    return tick
