"""The native sampler chain, owned by one object: built from SamplingSettings, applied to raw logits.

    SamplingSettings ──► Sampler (a llama.cpp sampler chain; freed by close() / `with`)
    raw logits row ──► Candidates (one reusable llama_token_data buffer) ──► Sampler.apply
                   ──► survivors (id, logit after temperature, p) + the chosen index

The chain is built exactly as llama-cpp-python's `Llama._init_sampler` builds it, so that the same
settings and seed choose the same tokens:
    penalties(last_n, repeat, frequency, presence)
    temperature == 0 -> greedy
    otherwise        -> top_k -> typical_p -> top_p -> min_p -> temperature -> dist(seed)
Temperature comes after the truncating samplers, so the candidate set depends on top_k,
typical_p, top_p, min_p and the penalties, never on temperature.

`Sampler(settings, n_vocab, upto=STAGE)` stops the chain after that stage and leaves out the final
pick: applying it shows what that much of the chain leaves of a distribution (the sampler view).

This module and runtime.py are the only ones that touch llama_cpp; nobody else frees a pointer.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .errors import InvalidInput
from .runtime import LOG_TAIL, NativeHandle, last_log_error, llama_cpp_module
from .settings import SamplingSettings

STAGES = ("penalties", "top_k", "typical_p", "top_p", "min_p", "temperature")

# llama.cpp's llama_token_data: {int32 id; float logit; float p}
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class Candidates:
    """A reusable llama_token_data buffer of n_vocab entries, so a step does not allocate one."""

    def __init__(self, n_vocab: int):
        self.data = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)


class Sampler(NativeHandle):
    """One native llama.cpp sampler chain for one sequence (stateful: penalties see accepted tokens)."""

    def __init__(self, settings: SamplingSettings, n_vocab: int, upto: str | None = None):
        if upto is not None and upto not in STAGES:
            raise ValueError(f"unknown stage {upto!r}; stages: {', '.join(STAGES)}")
        lib = self._lib = llama_cpp_module()
        self.settings = settings
        self.ptr = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        s = settings
        min_keep = 1
        stages = [("penalties", lambda: lib.llama_sampler_init_penalties(
            n_vocab, s.penalty_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))]
        if not s.greedy:
            stages += [("top_k", lambda: lib.llama_sampler_init_top_k(s.top_k)),
                       ("typical_p", lambda: lib.llama_sampler_init_typical(s.typical_p, min_keep)),
                       ("top_p", lambda: lib.llama_sampler_init_top_p(s.top_p, min_keep)),
                       ("min_p", lambda: lib.llama_sampler_init_min_p(s.min_p, min_keep)),
                       ("temperature", lambda: lib.llama_sampler_init_temp(s.temperature))]
        for name, make in stages:
            lib.llama_sampler_chain_add(self.ptr, make())  # the chain owns its stages
            if name == upto:
                return
        if upto is None:
            final = lib.llama_sampler_init_greedy() if s.greedy else lib.llama_sampler_init_dist(s.seed)
            lib.llama_sampler_chain_add(self.ptr, final)

    def apply(self, row: np.ndarray, buffers: Candidates | None = None) -> tuple[np.ndarray, int]:
        """Apply the chain to a raw logits row.

        Returns (survivors, selected): the candidates left after the chain (a structured array with
        fields id, logit (after temperature when the chain has one), p) and the chosen index (-1
        without a final pick). With `buffers` the survivors are a view, valid until the next apply
        (and while this sampler lives); without, a copy.
        """
        lib = self._lib
        n = row.shape[0]
        own = buffers is None
        cand = np.zeros(n, dtype=TOKEN_DATA) if own else buffers.data
        cand["id"] = np.arange(n, dtype=np.int32) if own else buffers.ids
        cand["logit"] = row
        cand["p"] = 0.0
        arr = lib.llama_token_data_array(data=cand.ctypes.data_as(lib.llama_token_data_p), size=n, selected=-1,
                                         sorted=False)
        lib.llama_sampler_apply(self.ptr, ctypes.byref(arr))
        size, sel = int(arr.size), int(arr.selected)
        # samplers may repoint `data`: read the survivors where the array now says they are
        survivors = np.frombuffer((ctypes.c_char * (size * TOKEN_DATA.itemsize)).from_address(
            ctypes.addressof(arr.data.contents)), dtype=TOKEN_DATA, count=size)
        return (survivors.copy() if own else survivors), sel

    def sample(self, context, index: int = -1) -> int:
        """llama.cpp's own sample-from-context path (its logits row `index`); accepts the token too."""
        return int(self._lib.llama_sampler_sample(self.ptr, context.ptr, index))

    def accept(self, token: int) -> None:
        """Tell the chain which token was chosen (the penalties count it)."""
        self._lib.llama_sampler_accept(self.ptr, int(token))

    def reset(self) -> None:
        self._lib.llama_sampler_reset(self.ptr)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.llama_sampler_free(self.ptr)
            self.ptr = None


class _stderr_caught:
    """Native writes to file descriptor 2 go to a temporary file while inside; .text() reads them."""

    def __enter__(self):
        import os
        import sys
        import tempfile

        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import os

        os.dup2(self._saved, 2)
        os.close(self._saved)

    def text(self) -> str:
        self._tmp.seek(0)
        return self._tmp.read().decode("utf-8", errors="replace")


class GrammarSampler(NativeHandle):
    """llama.cpp's grammar sampler for one sequence (llama_sampler_init_grammar, start rule "root"): kept apart
    from the chain, as common/sampling.cpp keeps it (grammar.py says how the engine uses it). Stateful: each
    accepted token advances it."""

    def __init__(self, model, gbnf: str, where: str = "the grammar"):
        lib = self._lib = llama_cpp_module()
        LOG_TAIL.clear()  # so that the error below is this grammar's
        # llama.cpp's grammar parser prints why it failed on stderr (not through the log): catch it
        with _stderr_caught() as caught:
            self.ptr = lib.llama_sampler_init_grammar(model.vocab, gbnf.encode("utf-8"), b"root")
        if not self.ptr:  # llama.cpp returns NULL
            why = next((ln.split("error parsing grammar:", 1)[1].strip() for ln in caught.text().splitlines()
                        if "error parsing grammar:" in ln), "") or last_log_error()
            raise InvalidInput(f"{where} does not parse as GBNF" + (f" (llama.cpp: {why})" if why else "")
                               + "; fix it (the start rule must be named root)")

    def allowed(self, ids: np.ndarray, buffers: Candidates | None = None) -> np.ndarray:
        """Which of the token ids `ids` the grammar allows now (a bool per id): it sets the others' logits to
        -inf. With `buffers` (n_vocab entries) nothing is allocated."""
        lib, n = self._lib, len(ids)
        cand = np.zeros(n, dtype=TOKEN_DATA) if buffers is None else buffers.data[:n]
        cand["id"] = ids
        cand["logit"] = 0.0
        cand["p"] = 0.0
        arr = lib.llama_token_data_array(data=cand.ctypes.data_as(lib.llama_token_data_p), size=n, selected=-1,
                                         sorted=False)
        lib.llama_sampler_apply(self.ptr, ctypes.byref(arr))
        return cand["logit"] == 0.0

    def accept(self, token: int) -> None:
        self._lib.llama_sampler_accept(self.ptr, int(token))

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.llama_sampler_free(self.ptr)
            self.ptr = None


def json_schema_to_gbnf(schema_text: str) -> str:
    """A JSON schema converted to GBNF by llama-cpp-python's converter (llama_cpp.llama_grammar), the only one
    callable from Python here; grammar.py says how its output differs from the vendored llama.cpp's C++ one.
    (Here because only this module and runtime.py import llama_cpp.)"""
    llama_cpp_module()
    from llama_cpp.llama_grammar import json_schema_to_gbnf as convert

    return convert(schema_text)
