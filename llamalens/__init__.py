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

Heavy modules (llama_cpp, numpy, pandas) load on first use of a function that needs them.
"""

from __future__ import annotations

from llamalens.version import __version__

from llamalens.errors import (InvalidArgument, InvalidInput, InvalidModelFile, InvalidSettings,  # noqa: F401
                              LlamalensError, MissingExtra, ModelNotFound, PromptTooLong, StoreError)
from llamalens.modelfiles.find import ModelInfo, list_models, resolve_model  # noqa: F401
from llamalens.settings import SamplingSettings  # noqa: F401
from llamalens import records as _records

__all__ = [
    "__version__", "load_model", "list_models", "resolve_model", "ModelInfo", "SamplingSettings",
    "generate", "next_token", "tokenize", "embed_texts", "embedding_map", "Engine", "Request", "Model", "ModelOptions",
    "quantize",
    "LlamalensError", "ModelNotFound", "InvalidModelFile", "InvalidSettings", "PromptTooLong", "InvalidInput",
    "StoreError", "MissingExtra", "InvalidArgument",
    "sweep", "resume", "open_run", "runs", "report", "score", "choose", "compare", "fork", "sampler_view",
    "lens", "calibrate", "confidence", "eval_model", "evaluate", "Run", "Sample", "NextToken", "SamplerView", "Score",
    "Choice", "Comparison",
]


def load_model(model=None, **options):
    """Load a GGUF model by path or name (None: $LLAMALENS_MODEL or the embedded default).

    options: gpu_layers, ctx, threads, batch, flash_attn, mmap, mlock, force (see ModelOptions). Like the
    CLI, it refuses a model that will not fit in the RAM available (memory.ModelTooBig) unless force=True.
    """
    from llamalens.modelfiles.memory import checked_load
    from llamalens.modelfiles.find import resolve_source
    from llamalens.core.runtime import ModelOptions

    return checked_load(resolve_source(model), ModelOptions(**options))


def _html_display(kind: str, obj) -> str:
    """A result's rich display in a notebook: the reports' own rendering (reports/notebook.py), loaded on use."""
    from llamalens.reports.notebook import html_of

    return html_of(kind, obj)


_records.HTML_DISPLAY[:] = [_html_display]

_API = ("sweep", "resume", "open_run", "runs", "report", "score", "choose", "compare", "fork", "sampler_view", "Run",
        "lens", "calibrate")


_LAZY = {  # name -> the module that defines it; importing llamalens must not load llama.cpp
    **dict.fromkeys(("generate", "Engine", "Request"), "llamalens.core.engine"),
    **dict.fromkeys(("Model", "ModelOptions", "quantize"), "llamalens.core.runtime"),
    **dict.fromkeys(("next_token", "tokenize", "NextToken", "SamplerView"), "llamalens.looks.next_token"),
    "Score": "llamalens.looks.score", "Choice": "llamalens.looks.choose", "Comparison": "llamalens.looks.compare",
    "embed_texts": "llamalens.looks.embed", "embedding_map": "llamalens.looks.embed_map",
    "confidence": "llamalens.core.confidence",
    "Sample": "llamalens.records",
    **dict.fromkeys(("eval_model", "evaluate"), "llamalens.eval.run"),
    **dict.fromkeys(_API, "llamalens.api"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'llamalens' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
