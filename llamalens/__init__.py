"""This is the public API of llamalens: what a language model thinks, token by token.

>>> import llamalens as ll                                              # doctest: +SKIP
>>> model = ll.load_model()               # embedded Gemma 3 270M Q4_K_M
>>> ll.next_token(model, "The capital of France is", top=3).top[0].text
' the'
>>> s = ll.generate(model, "Hi", ll.SamplingSettings(temperature=0), max_tokens=4)
>>> [(t.text, round(t.prob, 3), t.rank) for t in s.tokens]
>>> run = ll.sweep("Once upon a time", {"temperature": [0, 0.7]}, seeds=2, model=model)
>>> run.summary                            # a DataFrame; run.tokens, run.samples too
>>> ll.score("The quick brown fox jumps over the lazy dog.", model=model).perplexity
>>> ll.choose("The capital of France is", ["Paris", "London"], model=model)

One call per command (llamalens/api.py), the same library code the CLI runs: sweep, open_run, runs, report,
score, choose, compare, fork, sampler_view (next with sampler settings). Results are typed records with
to_dict() and, where tabular, to_pandas(); in Jupyter they display as the report shows them.

Heavy modules (llama_cpp, numpy) load on first use of a function that needs them. ll.sweep, ll.score and
ll.fork are the API calls; the modules of those names are imported as `from llamalens.sweep import X` (or
importlib.import_module("llamalens.sweep")), never `import llamalens.sweep as m`, which gives the call.
"""

from __future__ import annotations

import sys
import types

__version__ = "0.1.0"

from .errors import (InvalidInput, InvalidModelFile, InvalidSettings, LlamalensError, MissingExtra,  # noqa: F401
                     ModelNotFound, PromptTooLong, StoreError)
from .models import ModelInfo, list_models, resolve_model  # noqa: F401
from .settings import SamplingSettings  # noqa: F401

__all__ = [
    "__version__", "load_model", "list_models", "resolve_model", "ModelInfo", "SamplingSettings",
    "generate", "next_token", "tokenize", "embed_texts", "embedding_map", "Engine", "Request", "Model", "ModelOptions",
    "quantize",
    "LlamalensError", "ModelNotFound", "InvalidModelFile", "InvalidSettings", "PromptTooLong", "InvalidInput",
    "StoreError", "MissingExtra",
    "sweep", "resume", "open_run", "runs", "report", "score", "choose", "compare", "fork", "sampler_view",
    "Run", "Sample", "NextToken", "SamplerView", "Score", "Choice", "Comparison",
]


def load_model(model=None, **options):
    """Load a GGUF model by path or name (None: $LLAMALENS_MODEL or the embedded default).

    options: gpu_layers, ctx, threads, batch, flash_attn, mmap, mlock, force (see ModelOptions). Like the
    CLI, it refuses a model that will not fit in the RAM available (memory.ModelTooBig) unless force=True.
    """
    from .memory import checked_load
    from .models import resolve_source
    from .runtime import ModelOptions

    return checked_load(resolve_source(model), ModelOptions(**options))


_API = ("sweep", "resume", "open_run", "runs", "report", "score", "choose", "compare", "fork", "sampler_view", "Run")


class _Package(types.ModuleType):
    """ll.sweep, ll.score and ll.fork are API calls that share their names with modules (llamalens/sweep.py,
    score.py, fork.py): importing such a module must not replace the call on the package, so the import
    system's `llamalens.score = <module>` is not kept (import the modules as `from llamalens.score import X`
    or `importlib.import_module("llamalens.score")`)."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    # lazy: importing llamalens must not load llama.cpp
    if name in ("generate", "Engine", "Request"):
        from . import engine

        return getattr(engine, name)
    if name in ("next_token", "tokenize"):  # next_token -> NextToken; tokenize -> [Token]
        from . import distribution

        return getattr(distribution, name)
    if name == "embed_texts":
        from . import embed

        return embed.embed_texts
    if name == "embedding_map":
        from . import embed_map

        return embed_map.embedding_map
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in ("Score", "Choice", "Comparison"):
        import importlib

        return getattr(importlib.import_module(".score", __name__), name)
    if name in ("NextToken", "SamplerView"):
        from . import distribution

        return getattr(distribution, name)
    if name == "Sample":
        from .records import Sample

        return Sample
    if name in ("Model", "ModelOptions", "quantize"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'llamalens' has no attribute {name!r}")
