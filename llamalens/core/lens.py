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
ATTENTION_NODE = "kq_soft_max-{}"  # the attention weights (without flash attention): [n_kv, n_tokens, n_head]
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

    def __init__(self, layers: list[int], ubatches: list[range], wanted: list[int], attention_at: int | None = None,
                 nodes: tuple[str, ...] = ()):
        from llamalens.core.runtime import llama_cpp_module

        self.lib = _ggml()
        self.names = {LAYER_NODE.format(i).encode(): ("out", i) for i in layers}
        if attention_at is not None:  # each layer's attention weights of one token (its row, every head)
            self.names.update({ATTENTION_NODE.format(i).encode(): ("attention", i) for i in layers})
        self.names.update({n.encode(): ("node", n) for n in nodes})  # whole tensors, every time one is computed
        self.ubatches, self.wanted, self.attention_at = ubatches, sorted(set(wanted)), attention_at
        self.calls = {key: 0 for key in self.names.values() if key[0] != "node"}
        self.rows: dict[int, list[np.ndarray]] = {i: [] for i in layers}
        self.attention: dict[int, np.ndarray] = {}  # layer -> [n_head, n_kv]
        self.nodes: dict[str, list[np.ndarray]] = {n: [] for n in nodes}
        self.error: BaseException | None = None
        self.callback = llama_cpp_module().ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, tensor, ask, _user_data) -> bool:
        try:
            key = self.names.get(self.lib.ggml_get_name(tensor))
            if ask or key is None:
                return key is not None
            if key[0] == "out":
                self._take(key[1], tensor)
            elif key[0] == "attention":
                self._take_attention(key[1], tensor)
            else:
                self.nodes[key[1]].append(self._whole(tensor, key[1]))
        except BaseException as e:  # noqa: BLE001 - never into C: see the class docstring
            if self.error is None:
                self.error = e
        return True

    def _head(self, tensor, what: str) -> _TensorHead:
        head = _TensorHead.from_address(tensor)
        if head.type != GGML_TYPE_F32 or not self.lib.ggml_is_contiguous(tensor):
            raise LlamalensError(f"{what} is not a contiguous float32 tensor in this llama.cpp build (type "
                                 f"{head.type}, shape {list(head.ne)}); the lens cannot read it")
        return head

    def _whole(self, tensor, name: str) -> np.ndarray:
        head = self._head(tensor, name)
        out = np.empty([int(n) for n in reversed(head.ne)], dtype=np.float32)
        self.lib.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
        return out

    def _take_attention(self, layer: int, tensor) -> None:
        """Of one ubatch's attention weights [n_kv, n_tokens, n_head], the row of the token looked at, every head."""
        head = self._head(tensor, f"layer {layer}'s attention weights")
        k = self.calls[("attention", layer)]
        self.calls[("attention", layer)] += 1
        span = self.ubatches[k] if k < len(self.ubatches) else range(0)
        if self.attention_at not in span:
            return
        n_kv, n_tokens, n_head = (int(n) for n in head.ne[:3])
        if n_tokens != len(span) or head.ne[3] != 1:
            raise LlamalensError(f"layer {layer}'s attention weights have shape {list(head.ne)} in ubatch {k} (expected "
                                 f"{len(span)} tokens, one stream); the lens cannot place them")
        out = np.empty((n_head, n_kv), dtype=np.float32)
        t = self.attention_at - span.start
        for h in range(n_head):
            self.lib.ggml_backend_tensor_get(tensor, out[h].ctypes.data, t * int(head.nb[1]) + h * int(head.nb[2]),
                                             n_kv * 4)
        self.attention[layer] = out

    def _take(self, layer: int, tensor) -> None:
        head = self._head(tensor, f"layer {layer}'s output")
        n_embd, n_rows = int(head.ne[0]), int(head.ne[1])
        if head.ne[2] != 1 or head.ne[3] != 1:
            raise LlamalensError(f"layer {layer}'s output is not a matrix in this llama.cpp build (shape "
                                 f"{list(head.ne)}); the lens cannot read it")
        k = self.calls[("out", layer)]
        self.calls[("out", layer)] += 1
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
        missing = [key for key, n in self.calls.items() if n != len(self.ubatches)]
        if missing:
            kind, layer = missing[0]
            if kind == "attention":
                raise LlamalensError(f"llama.cpp's graph has no node named {ATTENTION_NODE.format(layer)} (the attention "
                                     "weights of that layer): the attention view needs flash attention off, and an "
                                     "architecture whose attention computes them")
            raise LlamalensError(f"llama.cpp's graph for this model has no node named {LAYER_NODE.format(layer)} "
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
    attention: dict[int, np.ndarray] | None = None  # layer -> [n_head, n_kv]: the attention_at token's weights
    nodes: dict[str, list[np.ndarray]] | None = None  # name -> every tensor of that name computed, in order


def capture(model, tokens: list[int], positions: list[int], layers: list[int], attention_at: int | None = None,
            nodes: tuple[str, ...] = ()) -> Capture:
    """Decode `tokens` once (one llama_decode, in the model's ubatches) with outputs at `positions`, keeping the
    residual stream of `layers` there; with `attention_at`, each of those layers' attention weights of that token
    (over the KV cells: in a fresh context cell i holds position i); `nodes`, whole tensors by name. The caller has
    checked the sizes (tokens fit one batch and the context) and that flash attention is off for attention."""
    from llamalens.core.runtime import round_ctx

    positions, layers = sorted(set(positions)), sorted(set(layers))
    n = len(tokens)
    n_ubatch = min(n, model.options.ubatch or n)
    ubatches = [range(i, min(i + n_ubatch, n)) for i in range(0, n, n_ubatch)]
    tap = LayerTap(layers, ubatches, positions, attention_at, nodes)
    wanted = set(positions)
    with model.context(round_ctx(n + 1), n_batch=n, eval_callback=tap.callback) as ctx:
        ctx.decode(tokens, range(n), [0] * n, [1 if i in wanted else 0 for i in range(n)])
        tap.check()
        logits = np.stack([ctx.logits(p) for p in positions]).astype(np.float32, copy=True)  # by batch index
    return Capture(positions, layers, tap.hidden(), logits, tap.attention if attention_at is not None else None,
                   tap.nodes)
