#!/usr/bin/env python
"""Write a GGUF with the exact tensor shapes, vocabulary size and Q4_K_M tensor types of a real model family,
with random weights written directly in their quantized block formats (no full-precision intermediate).

    .venv/bin/python scripts/shaped_model.py --list
    .venv/bin/python scripts/shaped_model.py llama3-8b -o /tmp/llama3-8b.gguf
    .venv/bin/python scripts/shaped_model.py gemma3-4b            # cached under ~/.cache/llamalens/shaped/

What such a model is for: speed and memory at the sizes users run (decode, prefill, batched sweeps, the KV
cache and the fit check). Its numbers mean nothing: the weights are random. Per-token cost depends on the
shapes and block types, not on the values, so timings and memory match a real file of that family.

Tensor types follow llama.cpp's Q4_K_M rule (src/llama-quant.cpp): Q4_K everywhere, Q6_K for the output
matrix (the token embedding when it is tied to the output), and Q6_K for attn_v and ffn_down in the layers
where `use_more_bits` holds (the first and last eighth, and every third layer between). Norms are F32 ones,
biases F32 zeros. Block scales are set so that weights have a standard deviation of about 0.02 and every
activation stays finite.

The vocabulary has the family's size. The Gemma shape carries the default model's own tokenizer (the same
262,144 tokens); the others a SentencePiece-style one (byte tokens, common English words, then filler pieces),
so prompts tokenize as usual text does: a known word is one token, another a few.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamalens" / "shaped"
FILE_TYPE_Q4_K_M = 15


@dataclasses.dataclass(frozen=True)
class Shape:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    rope_base: float
    head_dim: int = 0  # 0: n_embd / n_head
    qkv_bias: bool = False  # Qwen 2: biases on q, k and v
    tied: bool = False  # no output.weight: the token embedding is the output matrix
    sliding_window: int = 0  # Gemma 3: local layers attend this far back

    @property
    def dh(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


SHAPES = {
    "llama3-8b": Shape("llama", 128256, 4096, 32, 32, 8, 14336, 8192, 500000.0),
    "qwen2.5-7b": Shape("qwen2", 152064, 3584, 28, 28, 4, 18944, 32768, 1000000.0, qkv_bias=True),
    "llama2-13b": Shape("llama", 32000, 5120, 40, 40, 40, 13824, 4096, 10000.0),
    "gemma3-4b": Shape("gemma3", 262144, 2560, 34, 8, 4, 10240, 32768, 1000000.0, head_dim=256, tied=True,
                       sliding_window=1024),
    "mistral-7b": Shape("llama", 32768, 4096, 32, 32, 8, 14336, 32768, 1000000.0),
}

# ggml block formats: (weights a block, bytes a block, [(byte offset of an f16 scale, its value)]).
# Q4_K: d, dmin, 12 scale bytes, 128 nibble bytes. Q6_K: 128 + 64 bytes of quants, 16 int8 scales, d.
# The values give weights of standard deviation ~0.02 from uniformly random quants and scales; dmin (Q4_K's
# offset) makes their mean ~0.
BLOCKS = {
    "Q4_K": (256, 144, [(0, 1.4e-4), (2, 1.05e-3)]),
    "Q6_K": (256, 210, [(208, 1.5e-5)]),
}


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensors(s: Shape):
    """(name, logical shape as ggml lists it (columns first), type) of every tensor, in file order."""
    yield "token_embd.weight", (s.n_embd, s.n_vocab), "Q6_K" if s.tied else "Q4_K"
    yield "output_norm.weight", (s.n_embd,), "F32"
    if not s.tied:
        yield "output.weight", (s.n_embd, s.n_vocab), "Q6_K"
    q, kv = s.n_head * s.dh, s.n_head_kv * s.dh
    for i in range(s.n_layer):
        p = f"blk.{i}."
        more = "Q6_K" if use_more_bits(i, s.n_layer) else "Q4_K"
        yield p + "attn_norm.weight", (s.n_embd,), "F32"
        yield p + "attn_q.weight", (s.n_embd, q), "Q4_K"
        yield p + "attn_k.weight", (s.n_embd, kv), "Q4_K"
        yield p + "attn_v.weight", (s.n_embd, kv), more
        if s.qkv_bias:
            yield p + "attn_q.bias", (q,), "F32"
            yield p + "attn_k.bias", (kv,), "F32"
            yield p + "attn_v.bias", (kv,), "F32"
        if s.arch == "gemma3":
            yield p + "attn_q_norm.weight", (s.dh,), "F32"
            yield p + "attn_k_norm.weight", (s.dh,), "F32"
            yield p + "post_attention_norm.weight", (s.n_embd,), "F32"
            yield p + "post_ffw_norm.weight", (s.n_embd,), "F32"
        yield p + "attn_output.weight", (q, s.n_embd), "Q4_K"
        yield p + "ffn_norm.weight", (s.n_embd,), "F32"
        yield p + "ffn_gate.weight", (s.n_embd, s.n_ff), "Q4_K"
        yield p + "ffn_up.weight", (s.n_embd, s.n_ff), "Q4_K"
        yield p + "ffn_down.weight", (s.n_ff, s.n_embd), more


def tensor_bytes(name: str, shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "F32":
        fill = 0.0 if name.endswith(".bias") else 1.0
        return np.full(shape[::-1], fill, dtype=np.float32)
    per_block, size, scales = BLOCKS[kind]
    cols, rows = shape[0], int(np.prod(shape[1:]))
    assert cols % per_block == 0, (name, shape, kind)
    blocks = rng.integers(0, 256, size=(rows * cols // per_block, size), dtype=np.uint8)
    for offset, value in scales:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, cols // per_block * size)


WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but have "
         "an they you were her she there would their we him been has when who will more no if out so said what up "
         "its about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three history printing press begins "
         "capital city water answer question model token").split()


def plain_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of n_vocab tokens: specials, the 256 bytes, words, filler pieces."""
    # every prefix of a word is a piece too: SentencePiece merges pairs into pieces that exist, so a word is
    # reached letter by letter ("▁h", "▁hi", "▁his", ...) instead of falling back to bytes
    forms = dict.fromkeys(f for w in WORDS for f in (w, w.capitalize()))
    pieces = [f"▁{w}"[:k] for w in forms for k in range(1, len(w) + 2)]
    words = list(dict.fromkeys(pieces + list("abcdefghijklmnopqrstuvwxyz.,!?'")))
    words += [f"▁x{i}" for i in range(n_vocab - 3 - 256 - len(words))]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + words
    scores = [0.0, 0.0, 0.0] + [-1000.0] * 256 + [float(len(t)) - i * 1e-6 for i, t in enumerate(words)]
    return tokens, scores, [2, 3, 3] + [6] * 256 + [1] * len(words)


def add_tokenizer(w, s: Shape) -> None:
    if s.arch == "gemma3":
        import gguf
        from llamalens.modelfiles.find import default_model_path  # the embedded model: its own tokenizer

        r = gguf.GGUFReader(str(default_model_path()))
        f = r.fields
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([bytes(f["tokenizer.ggml.tokens"].parts[i]) for i in f["tokenizer.ggml.tokens"].data])
        w.add_token_scores([float(f["tokenizer.ggml.scores"].parts[i][0]) for i in f["tokenizer.ggml.scores"].data])
        w.add_token_types([int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data])
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)
        return
    tokens, scores, types = plain_vocab(s.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def write(name: str, out: Path, seed: int = 0) -> Path:
    """Write shape `name` to `out` (through out.part, renamed when whole); returns out."""
    import gguf

    s = SHAPES[name]
    tmp = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), s.arch)
    w.add_name(f"llamalens shaped {name} (random weights)")
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(1e-6 if s.arch == "gemma3" else 1e-5)
    if s.head_dim:
        w.add_key_length(s.dh)
        w.add_value_length(s.dh)
    else:
        w.add_rope_dimension_count(s.dh)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    w.add_file_type(FILE_TYPE_Q4_K_M)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, s)
    plan = list(tensors(s))
    for tname, shape, kind in plan:
        if kind == "F32":
            w.add_tensor_info(tname, shape[::-1], np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            per_block, size, _ = BLOCKS[kind]
            rows, cols = int(np.prod(shape[1:])), shape[0]
            w.add_tensor_info(tname, (rows, cols // per_block * size), np.dtype(np.uint8),
                              rows * cols // per_block * size, raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for tname, shape, kind in plan:
        w.write_tensor_data(tensor_bytes(tname, shape, kind, rng))
    w.close()
    tmp.replace(out)
    return out


def cached(name: str) -> Path:
    """The shape's file in the cache, written the first time it is asked for."""
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; one of: {', '.join(SHAPES)}")
    out = CACHE / f"{name}-Q4_K_M.gguf"
    return out if out.exists() else write(name, out)


def describe(name: str) -> str:
    s = SHAPES[name]
    size = 0
    for _, shape, kind in tensors(s):
        n = int(np.prod(shape))
        size += n * 4 if kind == "F32" else n // BLOCKS[kind][0] * BLOCKS[kind][1]
    params = sum(int(np.prod(shape)) for _, shape, _ in tensors(s))
    return (f"{name:12s} {s.arch:7s} {params / 1e9:5.2f} B params  vocab {s.n_vocab:>7,}  {s.n_layer} layers  "
            f"embd {s.n_embd}  heads {s.n_head}/{s.n_head_kv} kv  ff {s.n_ff}  {size / 2**30:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="a shape (--list names them)")
    ap.add_argument("-o", "--output", type=Path, help=f"where to write (default: the cache, {CACHE})")
    ap.add_argument("--list", action="store_true", help="name the shapes, with their sizes")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.list or not a.name:
        print("\n".join(describe(n) for n in SHAPES))
        return
    if a.name not in SHAPES:
        sys.exit(f"unknown shape {a.name!r}; one of: {', '.join(SHAPES)} (--list)")
    t0 = time.perf_counter()
    out = write(a.name, a.output, a.seed) if a.output else cached(a.name)
    print(f"{out}  {out.stat().st_size / 2**30:.2f} GiB  {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
