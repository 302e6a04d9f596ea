"""The logit lens's capture: each layer's residual stream, read during one ordinary decode of the prompt.

llama.cpp's scheduler asks a graph callback (llama_context_params.cb_eval) about every node it is about to
compute: first "do you want this tensor?" (ask=true), then, once it is computed, hands it over (ask=false). The
model graphs name the residual stream after layer N `l_out-N`, so a callback that wants exactly those nodes sees
every layer's hidden states of the batch; ggml_backend_tensor_get copies them from wherever they live (CPU
memory or a GPU), so the capture works with layers offloaded.

The last layer differs: the graphs keep only the output rows there (ggml_get_rows on the out_ids), so the prompt
is decoded with outputs at exactly the positions the lens looks at, and the last layer's rows are those outputs,
in order. Other layers hold every token of the ubatch; the tap keeps only the wanted rows, so what it holds is
positions x layers x n_embd floats, never a vocabulary row per cell.

This module reads the tensors the scheduler passes during decode; it owns no native handle (runtime.py does).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from llamalens.errors import LlamalensError

LAYER_NODE = "l_out-{}"
GGML_TYPE_F32 = 0


class _TensorHead(ctypes.Structure):
    """The first fields of struct ggml_tensor (ggml.h): type, buffer, ne[4], nb[4]."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4)]


_GGML = None


def _ggml():
    """ggml's library as llama-cpp-python loaded it, with the few signatures the tap calls."""
    global _GGML
    if _GGML is None:
        from llamalens.core.runtime import llama_cpp_module

        llama_cpp_module()  # the native library loaded and its log routed first
        import llama_cpp._ggml as ggml_module

        lib = ggml_module.libggml
        lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        lib.ggml_is_contiguous.restype, lib.ggml_is_contiguous.argtypes = ctypes.c_bool, [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        _GGML = lib
    return _GGML


class LayerTap:
    """A graph callback that keeps, of each wanted layer's residual stream, the rows at the wanted positions.

    `ubatches`: the token ranges llama.cpp decodes one after another (n_ubatch at a time); `wanted`: the batch
    indices whose rows are kept (and whose logits are asked for). The callback never raises into C: an exception
    there would read as "stop computing this graph" and leave the decode half done, so it is kept and raised by
    check() after the decode."""

    def __init__(self, layers: list[int], ubatches: list[range], wanted: list[int]):
        from llamalens.core.runtime import llama_cpp_module

        self.lib = _ggml()
        self.names = {LAYER_NODE.format(i).encode(): i for i in layers}
        self.ubatches, self.wanted = ubatches, sorted(set(wanted))
        self.calls = {i: 0 for i in layers}
        self.rows: dict[int, list[np.ndarray]] = {i: [] for i in layers}
        self.error: BaseException | None = None
        self.callback = llama_cpp_module().ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, tensor, ask, _user_data) -> bool:
        try:
            layer = self.names.get(self.lib.ggml_get_name(tensor))
            if ask or layer is None:
                return layer is not None
            self._take(layer, tensor)
        except BaseException as e:  # noqa: BLE001 - never into C: see the class docstring
            if self.error is None:
                self.error = e
        return True

    def _take(self, layer: int, tensor) -> None:
        head = _TensorHead.from_address(tensor)
        n_embd, n_rows = int(head.ne[0]), int(head.ne[1])
        if head.type != GGML_TYPE_F32 or not self.lib.ggml_is_contiguous(tensor) or head.ne[2] != 1 or head.ne[3] != 1:
            raise LlamalensError(f"layer {layer}'s output is not a contiguous float32 matrix in this llama.cpp build "
                                 f"(type {head.type}, shape {list(head.ne)}); the lens cannot read it")
        k = self.calls[layer]
        self.calls[layer] += 1
        span = self.ubatches[k] if k < len(self.ubatches) else range(0)
        here = [i for i in self.wanted if i in span]
        if n_rows == len(span):  # every token of the ubatch: keep the wanted rows
            rows = [i - span.start for i in here]
        elif n_rows == len(here):  # only the ubatch's outputs (the last layer): all of them are wanted
            rows = list(range(n_rows))
        else:
            raise LlamalensError(f"layer {layer} had {n_rows} rows in ubatch {k} (expected {len(span)} tokens or "
                                 f"{len(here)} outputs); the lens cannot place them")
        out = np.empty((len(rows), n_embd), dtype=np.float32)
        row_bytes = n_embd * 4
        for j, r in enumerate(rows):
            self.lib.ggml_backend_tensor_get(tensor, out[j].ctypes.data, r * int(head.nb[1]), row_bytes)
        self.rows[layer].append(out)

    def check(self) -> None:
        """Raise what the callback met, and refuse a capture that missed a layer."""
        if self.error is not None:
            err, self.error = self.error, None
            if isinstance(err, LlamalensError):
                raise err
            raise LlamalensError(f"reading a layer during decode failed: {type(err).__name__}: {err}") from err
        missing = [i for i, n in self.calls.items() if n != len(self.ubatches)]
        if missing:
            raise LlamalensError(f"llama.cpp's graph for this model has no node named {LAYER_NODE.format(missing[0])} "
                                 "(the residual stream after that layer); the lens needs the model graphs' l_out names")

    def hidden(self) -> np.ndarray:
        """[layers, wanted positions, n_embd], the layers in the order given."""
        return np.stack([np.concatenate(self.rows[i]) for i in self.rows])


@dataclass
class Capture:
    """One decode seen by the lens: the residual stream of each layer at each wanted position, and the model's
    own logits there (what the last layer's lens must reproduce)."""

    positions: list[int]  # batch indices, ascending
    layers: list[int]  # ascending; the model's last layer included
    hidden: np.ndarray  # [len(layers), len(positions), n_embd] float32
    logits: np.ndarray  # [len(positions), n_vocab] float32


def capture(model, tokens: list[int], positions: list[int], layers: list[int]) -> Capture:
    """Decode `tokens` once (one llama_decode, in the model's ubatches) with outputs at `positions`, keeping the
    residual stream of `layers` there. The caller has checked the sizes (tokens fit one batch and the context)."""
    from llamalens.core.runtime import round_ctx

    positions, layers = sorted(set(positions)), sorted(set(layers))
    n = len(tokens)
    n_ubatch = min(n, model.options.ubatch or n)
    ubatches = [range(i, min(i + n_ubatch, n)) for i in range(0, n, n_ubatch)]
    tap = LayerTap(layers, ubatches, positions)
    wanted = set(positions)
    with model.context(round_ctx(n + 1), n_batch=n, eval_callback=tap.callback) as ctx:
        ctx.decode(tokens, range(n), [0] * n, [1 if i in wanted else 0 for i in range(n)])
        tap.check()
        logits = np.stack([ctx.logits(p) for p in positions]).astype(np.float32, copy=True)  # by batch index
    return Capture(positions, layers, tap.hidden(), logits)
