"""The model's head read from its GGUF file: the final norm and the output projection, computed as llama.cpp
computes them, so that the last layer's lens reproduces the model's own logits.

    logits = softcap(W · q(norm(h)) + b)

- norm: RMSNorm with the header's epsilon, as ggml_rms_norm does it (squares summed in double, the scale in
  float), then times output_norm.weight. A GGUF stores the weight the graph multiplies by (for Gemma, the
  converter has already added Hugging Face's 1 to it), so no architecture adds anything here.
- W: output.weight, or the token embeddings when the model ties them (no output.weight in the file),
  dequantized with the `gguf` package a block of vocabulary rows at a time, so that a large vocabulary never
  needs the whole matrix in float32.
- q: the activation rounding of llama.cpp's CPU matrix product. A quantized W is multiplied with a copy of the
  normed vector quantized to the type's vec_dot_type (Q8_0 blocks of 32, Q8_K blocks of 256, F16, BF16):
  leaving that out moves the default model's logprobs by up to 0.23 nats; with it they agree to about 3e-5.
- b and softcap: output.bias where the architecture has one (qwen2), and cap·tanh(logit/cap) where the header
  has {arch}.final_logit_softcapping.

An architecture is used only when its conventions are known (ARCHITECTURES): any other is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamalens.errors import InvalidInput, InvalidModelFile


@dataclass(frozen=True)
class Convention:
    """What an architecture's head is, beyond RMSNorm + W: whether it may carry an output bias, and whether its
    header may hold a final logit soft-cap."""

    output_bias: bool = False
    softcap: bool = False


# each checked against its llama.cpp graph (src/models/<arch>.cpp) and by a test on a tiny GGUF of it
ARCHITECTURES = {"llama": Convention(), "qwen2": Convention(output_bias=True), "qwen3": Convention(),
                 "gemma3": Convention(softcap=True)}

# the activation type llama.cpp's CPU backend quantizes a matrix product's vector to, per weight type
# (type_traits_cpu[...].vec_dot_type in ggml-cpu.c); types not named here are refused
_Q8_0 = ("Q4_0", "Q5_0", "Q8_0", "MXFP4", "IQ4_NL", "Q4_1", "Q5_1")  # (Q4_1 and Q5_1: Q8_1, the same rounding)
_Q8_K = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
         "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0")
ACTIVATION = {"F32": "F32", "F16": "F16", "BF16": "BF16", **{t: "Q8_0" for t in _Q8_0}, **{t: "Q8_K" for t in _Q8_K}}


def _type_name(ggml_type: int) -> str:
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType(ggml_type).name


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def quantize_activations(x: np.ndarray, kind: str) -> np.ndarray:
    """x [rows, n] rounded as llama.cpp's CPU backend rounds a matrix product's vector to `kind`, returned
    dequantized (float32): the values the integer dot products effectively multiply with."""
    x = _f32(x)
    if kind == "F32":
        return x
    if kind == "F16":
        return x.astype(np.float16).astype(np.float32)
    if kind == "BF16":  # round to nearest even on the upper 16 bits
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.astype(np.uint32).view(np.float32)
    size = 32 if kind == "Q8_0" else 256
    b = x.reshape(x.shape[0], -1, size)
    if kind == "Q8_0":  # the x86 path: d = amax/127 stored as f16, q = round-half-even(x * 127/amax)
        amax = np.abs(b).max(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        q = np.rint(b * inv)
        d = (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
        return (q * d).reshape(x.shape).astype(np.float32)
    # Q8_K (quantize_row_q8_K_ref): scale by -127/max of the signed value of largest magnitude, d = 1/scale as f32
    idx = np.abs(b).argmax(axis=-1)[..., None]
    mx = np.take_along_axis(b, idx, axis=-1)
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0.0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    q = np.minimum(np.rint(b * iscale), 127)
    return (q * d).reshape(x.shape).astype(np.float32)


class Head:
    """The final norm and output projection of a GGUF model, read from its file (memory-mapped: a block of
    vocabulary rows is dequantized when a projection reaches it)."""

    def __init__(self, header):
        """`header`: the file's GGUFHeader (modelfiles/gguf_header.py), as the loaded Model holds it."""
        self.path = Path(header.path)
        tensors = {t.name: t for t in header.tensors}
        self.arch = header.architecture
        conv = ARCHITECTURES.get(self.arch)
        if conv is None:
            raise InvalidInput(f"the lens does not know the conventions of architecture {self.arch!r} (its final norm, "
                               f"output projection and logit scaling); it knows {', '.join(ARCHITECTURES)}. Use a model "
                               "of one of those architectures")
        eps = header.arch_key("attention.layer_norm_rms_epsilon")
        if eps is None or "output_norm.weight" not in tensors or "output_norm.bias" in tensors:
            raise InvalidModelFile(f"{self.path.name}: the lens expects an RMS final norm (output_norm.weight and "
                                   f"{self.arch}.attention.layer_norm_rms_epsilon); this file does not have one")
        out = tensors.get("output.weight") or tensors.get("token_embd.weight")
        if out is None:
            raise InvalidModelFile(f"{self.path.name}: neither output.weight nor token_embd.weight is in this file (a "
                                   "split model keeps them in another part: merge it with llama-gguf-split --merge)")
        self.tied = out.name == "token_embd.weight"
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.data_offset = header.data_offset
        self.eps = np.float32(eps)
        self.norm_weight = self._dense(tensors["output_norm.weight"]).reshape(-1)
        self.weight = out
        self.weight_type = _type_name(out.ggml_type)
        if self.weight_type not in ACTIVATION:
            raise InvalidModelFile(f"{self.path.name}: the lens cannot reproduce llama.cpp's product with an output "
                                   f"matrix of type {self.weight_type}")
        self.activation = ACTIVATION[self.weight_type]
        self.n_embd, self.n_vocab = (int(n) for n in out.shape[:2])
        self.row_bytes = out.n_bytes // self.n_vocab
        bias = tensors.get("output.bias")
        if bias is not None and not conv.output_bias:
            raise InvalidModelFile(f"{self.path.name}: an output bias in a {self.arch} model is not what llama.cpp's "
                                   "graph for it reads; the lens refuses to guess")
        self.bias = None if bias is None else self._dense(bias).reshape(-1)
        cap = header.arch_key("final_logit_softcapping") if conv.softcap else None
        self.softcap = float(cap) if cap else None

    def _raw(self, tensor, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A tensor's bytes (rows start..stop of a 2-D one) as a [rows, row bytes] uint8 view of the mapped file."""
        rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1
        width = tensor.n_bytes // rows
        stop = rows if stop is None else stop
        at = self.data_offset + tensor.offset
        return self.data[at + start * width: at + stop * width].reshape(stop - start, width)

    def _dense(self, tensor, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop of a tensor, dequantized to float32 [rows, n]."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        kind = GGMLQuantizationType(tensor.ggml_type)
        raw = np.asarray(self._raw(tensor, start, stop))
        if kind.name in ("F32", "F16"):
            return _f32(raw.view(np.float32 if kind.name == "F32" else np.float16))
        if kind.name == "Q8_0":  # blocks of an f16 scale and 32 int8: two numpy operations (gguf's loops per block)
            blocks = raw.reshape(raw.shape[0], -1, 34)
            scale = blocks[..., :2].copy().view(np.float16).astype(np.float32)
            return (blocks[..., 2:].view(np.int8) * scale).reshape(raw.shape[0], -1)
        return _f32(dequantize(raw, kind)).reshape(raw.shape[0], -1)

    def describe(self) -> dict:
        return {"architecture": self.arch, "output": "token_embd.weight (tied)" if self.tied else "output.weight",
                "output_type": self.weight_type, "activation_rounding": self.activation, "rms_eps": float(self.eps),
                "output_bias": self.bias is not None, "final_logit_softcapping": self.softcap}

    def normed(self, h: np.ndarray) -> np.ndarray:
        """RMSNorm(h) * w, as ggml computes it, then the activation rounding of the product: [rows, n_embd]."""
        h = _f32(h)
        mean = np.float32((h * h).astype(np.float64).sum(axis=-1, keepdims=True) / h.shape[-1])
        scale = (np.float32(1.0) / np.sqrt((mean + self.eps).astype(np.float32))).astype(np.float32)
        return quantize_activations((h * scale) * self.norm_weight, self.activation)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Vocabulary rows [start, stop) of W, dequantized: [stop - start, n_embd] float32."""
        return self._dense(self.weight, start, stop)

    def token_rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows of W of some token ids (any shape): [..., n_embd] float32."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows = np.stack([self._dense(self.weight, int(t), int(t) + 1)[0] for t in flat]) if flat.size else \
            np.zeros((0, self.n_embd), dtype=np.float32)
        return rows.reshape(*np.shape(ids), self.n_embd)

    def finish(self, z: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Raw products of vocabulary rows [start, stop) -> the model's logits there (bias, soft-cap), in place."""
        if self.bias is not None:
            z += self.bias[start:stop]
        return self.cap(z)

    def cap(self, z: np.ndarray) -> np.ndarray:
        """The final logit soft-cap, in place, as the graph does it: scale by 1/cap, tanh, scale by cap."""
        if self.softcap:
            z *= np.float32(1.0 / self.softcap)
            np.tanh(z, out=z)
            z *= np.float32(self.softcap)
        return z


# the float32 products of one block of vocabulary rows against every cell are kept under this many bytes, and so
# is the dequantized block itself: the lens's memory is a few such blocks, whatever the vocabulary
BLOCK_BYTES = 64 << 20


@dataclass
class Projection:
    """The lens's summaries of every cell (position p, layer l) over the whole vocabulary: no row is kept.

    top_ids / top_logprobs [P, L, N]   the N most likely tokens, most likely first
    entropy [P, L]                      nats
    kl [P, L]                           KL(final || lens) in nats, final = the model's own logits at p
    tracked_logprobs / ranks [P, L, K]  of the tracked token ids (rank 1 = the top token)
    final_error [P]                     max |lens logprob - model logprob| over the vocabulary at the last layer
    """

    top_ids: np.ndarray
    top_logprobs: np.ndarray
    entropy: np.ndarray
    kl: np.ndarray
    tracked_logprobs: np.ndarray
    tracked_ranks: np.ndarray
    final_error: np.ndarray


@dataclass
class Agreement:
    """Two models' lens distributions compared cell by cell (the same positions, layers and vocabulary).

    kl [P, L]        KL(A || B) in nats: A the first model, as llama-perplexity's KL divergence takes the base first
    same_top [P, L]  whether their top tokens are the same
    """

    kl: np.ndarray
    same_top: np.ndarray


def block_rows(n_embd: int, n_vocab: int, n_cells: int) -> int:
    """Vocabulary rows a block: as many as keep both the dequantized block and the cells' products under
    BLOCK_BYTES (at least 256), and no more than the vocabulary (the buffers are sized by it)."""
    return min(n_vocab, max(256, min(BLOCK_BYTES // (4 * n_embd), BLOCK_BYTES // (4 * max(n_cells, 1)))))


def projection_bytes(n_embd: int, n_vocab: int, n_cells: int, models: int = 1, dequantize: int = 2) -> int:
    """The most memory project_together holds beyond its inputs, for `models` models of n_embd x n_vocab heads and
    n_cells cells each. Held throughout, per model: the block's products and their exponentials (2 buffers of
    cells x rows floats) and the normed vectors; for two models, the products' differences (1 more). On top, the
    largest passing need: a dequantized block with the dequantizer's temporaries (`dequantize` blocks of rows x
    n_embd floats: 1 for F32, F16 and Q8_0, 2 through the gguf package), the first block's top-N partition (a
    quarter of the products' size, in int64: half a buffer) with the comparisons of the rank counts, or the norm's
    temporaries (6 copies of the cells' vectors)."""
    rows = block_rows(n_embd, n_vocab, n_cells * models)
    products = n_cells * rows * 4
    held = models * (2 * products + n_cells * n_embd * 4) + (products if models > 1 else 0)
    return held + max(dequantize * rows * n_embd * 4, products, 6 * n_cells * n_embd * 4)


def lens_bytes(header, models: int, max_cells: int, max_positions: int) -> int:
    """What a lens of up to max_cells cells at up to max_positions positions holds beyond llama.cpp, per the GGUF
    header, before anything is loaded: the projection's buffers at their largest over every number of cells, and
    per model the captured residual streams and the copied logits rows (and a temporary of their size)."""
    tensors = {t.name: t for t in header.tensors}
    out = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if out is None:
        return 0  # Head refuses such a file by name once it is loaded
    n_embd, n_vocab = (int(n) for n in out.shape[:2])
    blocks = 1 if _type_name(out.ggml_type) in ("F32", "F16", "Q8_0") else 2  # Head._dense: numpy's own, or gguf's
    buffers = max(projection_bytes(n_embd, n_vocab, c, models, blocks) for c in range(1, max_cells + 1))
    return buffers + models * 4 * (max_cells * n_embd + 2 * max_positions * n_vocab)


class _Side:
    """One model's part of a projection: its head, its cells' normed vectors, its model's own logits and the
    running sums over the vocabulary blocks seen so far."""

    def __init__(self, head: Head, hidden: np.ndarray, final_logits: np.ndarray, tracked: np.ndarray, keep: int,
                 rows: int):
        n_pos, n_layers, _ = hidden.shape
        self.head, self.shape = head, (n_pos, n_layers)
        self.x = head.normed(hidden.reshape(n_pos * n_layers, -1))
        self.final = _f32(final_logits)
        f_max = self.final.max(axis=1, keepdims=True)
        self.f_lse = f_max[:, 0].astype(np.float64) + np.log(np.exp(self.final - f_max).sum(axis=1, dtype=np.float64))
        # tracked tokens' logits from their own rows (W rows dotted with the same normed vectors)
        self.tracked = np.asarray(tracked, dtype=np.int64).reshape(n_pos, -1)
        t_rows = head.token_rows(self.tracked)  # [P, K, d]
        zt = np.einsum("pld,pkd->plk", self.x.reshape(n_pos, n_layers, -1), t_rows).astype(np.float32)
        if head.bias is not None:
            zt += head.bias[self.tracked][:, None, :]
        head.cap(zt)
        self.acc = _Accumulator(n_pos, n_layers, max(1, min(keep, head.n_vocab)), zt, rows)
        self.z_buf = np.empty(n_pos * n_layers * rows, dtype=np.float32)  # reused by every block (no page faults)

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The lens's logits of vocabulary rows [start, stop) [P, L, B], added to the running sums; with the
        block's exp(z - running max) and the factor the earlier sums were rescaled by (for a pair's KL)."""
        z = np.matmul(self.x, self.head.rows(start, stop).T,
                      out=self.z_buf[: self.x.shape[0] * (stop - start)].reshape(self.x.shape[0], -1))
        self.head.finish(z, start, stop)
        z = z.reshape(*self.shape, -1)
        final = self.final[:, start:stop]
        e, shrink = self.acc.add(z, start, self.tracked, np.exp(final - self.f_lse[:, None]).astype(np.float32), final)
        return z, e, shrink

    def result(self) -> Projection:
        return self.acc.result(self.f_lse)


def project(head: Head, hidden: np.ndarray, final_logits: np.ndarray, tracked: np.ndarray, keep: int) -> Projection:
    """The lens of hidden [P, L, n_embd] (the residual stream of L layers at P positions; the last of the L is the
    model's last layer) against the model's own logits final_logits [P, V], over the vocabulary a block at a
    time. `tracked` [P, K]: token ids whose logprob and rank are wanted at every layer of each position."""
    return project_together([(head, hidden, final_logits, tracked)], keep)[0][0]


def project_together(models: list[tuple], keep: int) -> tuple[list[Projection], Agreement | None]:
    """project() of one or two models (each (head, hidden, final_logits, tracked), the same cells and vocabulary)
    in one pass over the vocabulary; with two, also their Agreement: KL(A || B) from the running sum of
    exp(z_A - m_A) (z_A - z_B), rescaled with A's log-sum-exp, so that no vocabulary row per cell is kept."""
    n_pos, n_layers, _ = models[0][1].shape
    n_cells = n_pos * n_layers
    rows = min(block_rows(h.n_embd, h.n_vocab, n_cells * len(models)) for h, *_ in models)
    sides = [_Side(h, hidden, final, tracked, keep, rows) for h, hidden, final, tracked in models]
    n_vocab = sides[0].head.n_vocab
    pair = len(sides) == 2
    cross = np.zeros((n_pos, n_layers))  # sum exp(z_A - m_A) (z_A - z_B), A's running max
    diff_buf = np.empty(n_cells * rows, dtype=np.float32) if pair else None
    for start in range(0, n_vocab, rows):
        stop = min(start + rows, n_vocab)
        seen = [side.block(start, stop) for side in sides]
        if pair:
            (z_a, e_a, shrink), (z_b, _, _) = seen
            d = np.subtract(z_a, z_b, out=diff_buf[: z_a.size].reshape(z_a.shape))
            cross = cross * shrink + np.matmul(e_a[..., None, :], d[..., :, None])[..., 0, 0]
    out = [side.result() for side in sides]
    if not pair:
        return out, None
    a, b = sides[0].acc, sides[1].acc
    lse_a, lse_b = a.lse(), b.lse()
    kl = np.maximum(cross / a.s0 - (lse_a - lse_b), 0.0)  # sum p_A (z_A - z_B) - (lse_A - lse_B)
    return out, Agreement(kl, out[0].top_ids[..., 0] == out[1].top_ids[..., 0])


class _Accumulator:
    """Running per-cell sums over vocabulary blocks: the log-sum-exp (max and scaled sum), the sum that gives
    the entropy, the one that gives KL to the final distribution, rank counts and the running top N."""

    def __init__(self, n_pos: int, n_layers: int, keep: int, zt: np.ndarray, block: int):
        shape = (n_pos, n_layers)
        self.scratch = np.empty(n_pos * n_layers * block, dtype=np.float32)
        self.keep, self.zt = keep, zt
        self.m = np.full(shape, -np.inf, dtype=np.float32)
        self.s0 = np.zeros(shape)  # sum exp(z - m)
        self.s1 = np.zeros(shape)  # sum exp(z - m) * z
        self.a = np.zeros(shape)  # sum p_final * (z - final logit): small where the lens agrees with the model
        self.above = np.zeros(zt.shape, dtype=np.int64)  # tokens with a logit above each tracked token's
        self.top_vals = np.full((*shape, keep), -np.inf, dtype=np.float32)  # (-inf: not yet filled)
        self.top_ids = np.zeros((*shape, keep), dtype=np.int64)
        self.d_max = np.full(n_pos, -np.inf)  # last layer: z - the model's logit, its extremes
        self.d_min = np.full(n_pos, np.inf)

    def add(self, z: np.ndarray, start: int, tracked: np.ndarray, p_final: np.ndarray,
            final: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One block: z [P, L, B] the lens's logits of vocabulary rows start..start+B; p_final and final [P, B]
        the model's probabilities and logits there. Each pass over z is one numpy call (the block is the cost).
        Returns exp(z - the new running max) (in the scratch buffer: valid until the next block) and the factor the
        earlier sums were rescaled by."""
        block_max = z.max(axis=2)
        m = np.maximum(self.m, block_max)
        e = np.subtract(z, m[..., None], out=self.scratch[: z.size].reshape(z.shape))
        np.exp(e, out=e)
        shrink = np.exp((self.m - m).astype(np.float64))
        self.s0 = self.s0 * shrink + e.sum(axis=2, dtype=np.float64)
        self.s1 = self.s1 * shrink + np.matmul(e[..., None, :], z[..., :, None])[..., 0, 0]
        self.m = m
        # sum p_final (z - final): a product for the other layers; the last layer's differences themselves, which
        # are small where the lens agrees with the model (no cancellation) and give the check's extremes
        self.a[:, :-1] += np.matmul(z[:, :-1], p_final[:, :, None])[..., 0] - (p_final * final).sum(axis=1)[:, None]
        diff = z[:, -1] - final
        self.a[:, -1] += np.matmul(diff[:, None, :], p_final[:, :, None])[:, 0, 0]
        self.d_max = np.maximum(self.d_max, diff.max(axis=1))
        self.d_min = np.minimum(self.d_min, diff.min(axis=1))
        stop = start + z.shape[2]
        for k in range(tracked.shape[1]):
            self.above[:, :, k] += np.count_nonzero(z > self.zt[:, :, k, None], axis=2)
            for p in np.nonzero((tracked[:, k] >= start) & (tracked[:, k] < stop))[0]:
                # the token's own product, computed in this block, may differ from zt by rounding: not "above" itself
                self.above[p, :, k] -= z[p, :, tracked[p, k] - start] > self.zt[p, :, k]
        self._merge_top(z, start, block_max)
        return e, shrink

    def _merge_top(self, z: np.ndarray, start: int, block_max: np.ndarray) -> None:
        """The running top N: the first block's by partition; after it, only the few entries above their cell's
        N-th best so far are merged in (a partition of every row of every block would cost more than the rest)."""
        n_keep, width = self.keep, z.shape[2]
        vals, ids = self.top_vals.reshape(-1, n_keep), self.top_ids.reshape(-1, n_keep)
        flat = z.reshape(-1, width)
        if start == 0:  # by eighths of the cells: the partition's int64 indices stay a quarter of the block's size
            n, step = min(n_keep, width), max(1, -(-flat.shape[0] // 8))
            for i in range(0, flat.shape[0], step):
                part = np.argpartition(flat[i: i + step], -n, axis=1)[:, -n:]
                vals[i: i + step, :n], ids[i: i + step, :n] = np.take_along_axis(flat[i: i + step], part, axis=1), part
            return
        rows, cols = np.nonzero(flat > vals.min(axis=1)[:, None])
        if not len(rows):
            return
        cells, first, counts = np.unique(rows, return_index=True, return_counts=True)
        slot = np.arange(len(rows)) - np.repeat(first, counts)
        cand_vals = np.full((len(cells), counts.max()), -np.inf, dtype=np.float32)
        cand_ids = np.zeros(cand_vals.shape, dtype=np.int64)
        at = np.repeat(np.arange(len(cells)), counts)
        cand_vals[at, slot], cand_ids[at, slot] = flat[rows, cols], cols + start
        both_vals = np.concatenate([vals[cells], cand_vals], axis=1)
        both_ids = np.concatenate([ids[cells], cand_ids], axis=1)
        best = np.argpartition(both_vals, -n_keep, axis=1)[:, -n_keep:]
        vals[cells], ids[cells] = np.take_along_axis(both_vals, best, axis=1), np.take_along_axis(both_ids, best, axis=1)

    def lse(self) -> np.ndarray:
        """Each cell's log-sum-exp over the blocks seen: [P, L] float64."""
        return self.m.astype(np.float64) + np.log(self.s0)

    def result(self, f_lse: np.ndarray) -> Projection:
        lse = self.lse()
        order = np.argsort(-self.top_vals, axis=2, kind="stable")
        shift = lse[:, -1] - f_lse
        return Projection(
            top_ids=np.take_along_axis(self.top_ids, order, axis=2),
            top_logprobs=np.take_along_axis(self.top_vals, order, axis=2) - lse[..., None],
            entropy=lse - self.s1 / self.s0,
            kl=np.maximum((lse - f_lse[:, None]) - self.a, 0.0),
            tracked_logprobs=self.zt - lse[..., None],
            tracked_ranks=self.above + 1,
            final_error=np.maximum(np.abs(self.d_max - shift), np.abs(self.d_min - shift)))
