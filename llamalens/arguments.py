"""The Python API's argument checks: a value of the wrong type is an InvalidArgument (a TypeError and an
InvalidInput) that names the argument and what to give, before any work; a text is never taken for a list
of its characters."""

from __future__ import annotations

import os

from llamalens.errors import InvalidArgument


def whole(value, what: str, least: int = 1) -> int:
    """An integer argument (not a bool, not a text): InvalidArgument naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what}={value!r}: give a whole number (>= {least})")
    return value


def optional(value, what: str, kinds: tuple, want: str, none_ok: bool = True):
    """An argument of one of `kinds` (None too when none_ok): InvalidArgument naming it otherwise."""
    if (value is None and not none_ok) or (value is not None and (isinstance(value, bool)
                                                                  or not isinstance(value, kinds))):
        raise InvalidArgument(f"{what}={value!r:.60}: give {want}" + (", or None" if none_ok else ""))
    return value


def paths(**values) -> None:
    """Arguments that name files (chat_template, grammar, json_schema): a str or a path, or None."""
    for what, value in values.items():
        optional(value, what, (str, os.PathLike), "a str (a file's path, or a name) or a pathlib.Path")


def list_of_texts(value, what: str, example: str) -> list[str]:
    """A list of texts that must be a list: one text is refused (it would be split into its characters)."""
    if isinstance(value, (str, bytes)):
        raise InvalidArgument(f"{what}={value!r} is one text; give a list of texts, e.g. {what}={example}")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{what}={value!r:.60}: give a list of texts, e.g. {what}={example}")
    return list(value)


def text_list(value, what: str) -> list[str]:
    """A list of texts given as one: a string is one text, never its characters."""
    if isinstance(value, str):
        return [value]
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{what}={value!r:.60}: give a text or a list of texts")
    return list(value)


def model_options(options: dict):
    """The model options a call was given as keyword arguments (ctx=, batch=, ...), as ModelOptions; an unknown
    name is InvalidArgument naming it and the known ones (a sampling setting belongs in grid= or settings=)."""
    import dataclasses

    from llamalens.settings import ModelOptions, SamplingSettings

    known = [f.name for f in dataclasses.fields(ModelOptions)]
    for name in options:
        if name not in known:
            hint = (f"; {name} is a sampling setting: give it in grid={{{name!r}: [...]}} (sweep) or settings="
                    if name in {f.name for f in dataclasses.fields(SamplingSettings)} else "")
            raise InvalidArgument(f"unknown keyword argument {name}=: the model options are {', '.join(known)}{hint}")
    return ModelOptions(**options)
