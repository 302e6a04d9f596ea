"""The llama.cpp boundary: loading a model, tokenizing, token bytes, and decoding contexts.

We do not use the high-level `llama_cpp.Llama`: it serves one sequence, and even without
`logits_all` it allocates an n_batch × n_vocab float32 buffer (537 MB for Gemma 3's 262k vocab).
Instead a `Model` holds the weights once (`llama_model_load_from_file`) and hands out `Context`s
made with `llama_init_from_model`, each with its own KV cache, `n_seq_max` parallel sequences and
a unified KV cache (so a shared prompt prefix is copied between sequences by metadata only).

Every file is checked by `gguf_file.read_header` before llama.cpp opens it: a truncated or corrupt
file is refused with a clear message instead of reaching native code.

Prompts are tokenized exactly as llama-cpp-python's `create_completion` does: BOS (when the model
adds one), then the text with special tokens parsed, then EOS/SEP only when the model's
`add_eos_token` says so.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from pathlib import Path

import numpy as np

from llamalens.errors import InvalidArgument, InvalidInput, InvalidModelFile, LlamalensError, PromptTooLong
from llamalens.modelfiles.gguf_header import read_header
from llamalens.modelfiles.find import ModelInfo, model_info
from llamalens.records import token_text
from llamalens.settings import FLASH_ATTN, ModelOptions, server_prompt_pieces



# llama.cpp's own log: kept (last lines) for error messages, printed only with LLAMALENS_VERBOSE=1.
LOG_TAIL: deque[str] = deque(maxlen=40)
_log_cb = None


def llama_cpp_module():
    """Import llama_cpp lazily (it loads a native library) and route its log through us.

    Only this module and sampler.py call it: every native handle is owned here or there."""
    global _log_cb
    import llama_cpp

    if _log_cb is None:
        verbose = bool(os.environ.get("LLAMALENS_VERBOSE"))

        def on_log(level, text, _user):
            line = text.decode("utf-8", errors="replace") if text else ""
            LOG_TAIL.append(line)
            if verbose:
                sys.stderr.write(line)

        _log_cb = llama_cpp.llama_log_callback(on_log)  # keep a reference: C holds the pointer
        llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))
    return llama_cpp


def last_log_error() -> str:
    """The last error-looking line llama.cpp logged, for our messages."""
    for line in reversed(LOG_TAIL):
        if "error" in line.lower() or "failed" in line.lower():
            return line.strip()
    return ""


def round_ctx(n_cells: int) -> int:
    """A context size for n_cells KV cells: rounded up to a multiple of 256, as llama.cpp pads it."""
    return (max(int(n_cells), 1) + 255) // 256 * 256


def library_versions() -> dict:
    """The versions a run records: llamalens, llama-cpp-python, Python, numpy."""
    from llamalens.version import __version__
    return {"llamalens": __version__, "llama_cpp_python": llama_cpp_module().__version__,
            "python": sys.version.split()[0], "numpy": np.__version__}


def system_info() -> str:
    """llama.cpp's own description of the build: the CPU features it uses (AVX2, AVX512, ...), backends."""
    return llama_cpp_module().llama_print_system_info().decode(errors="replace").strip()


def build_info() -> dict:
    """What llama.cpp was built with: its system info and, for scripts/install.sh builds, the CMake flags."""
    stamp = Path(sys.prefix) / "llamalens-cmake-args"
    try:
        cmake_args = stamp.read_text(encoding="utf-8").strip()
    except OSError:
        cmake_args = None
    return {"system_info": system_info(), "cmake_args": cmake_args}


def builtin_chat_templates() -> list[str]:
    """The names of llama.cpp's built-in chat templates (llama_chat_builtin_templates): chatml, gemma, llama3, ..."""
    lib = llama_cpp_module()
    n = int(lib.llama_chat_builtin_templates(None, 0))
    out = (ctypes.c_char_p * n)()
    lib.llama_chat_builtin_templates(out, n)
    return [name.decode() for name in out]


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can put layers on a GPU (--gpu-layers does anything)."""
    return bool(llama_cpp_module().llama_supports_gpu_offload())


# llama_ftype values (llama.h) of the quantizations `quantize` makes
QUANT_TYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
               "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
               "BF16": 32}


def quantize(src, dst, kind: str = "Q8_0", threads: int = 0) -> Path:
    """Write a `kind` quantization (a QUANT_TYPES name, e.g. "Q8_0", "Q2_K") of the GGUF model `src` to `dst`
    with llama.cpp's own quantizer (llama_model_quantize; requantizing an already quantized file is allowed,
    as llama-quantize --allow-requantize does). threads 0: all cores. Returns dst."""
    name = str(kind).upper()
    if name not in QUANT_TYPES:
        raise InvalidInput(f"quantization {kind!r} is not one llamalens makes; choose one of "
                           + ", ".join(QUANT_TYPES))
    read_header(Path(src))  # a truncated or corrupt file is refused before native code reads it
    lib = llama_cpp_module()
    params = lib.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[name]
    params.allow_requantize = True
    params.nthread = int(threads)
    tmp = Path(str(dst) + ".part")  # written under another name and renamed: a failure leaves no half file
    try:
        if lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise LlamalensError(f"llama.cpp could not quantize {src} to {name} ({last_log_error() or 'no message'})")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(dst)


FULL_PRECISION = ("ALL_F32", "F32", "F16", "BF16")  # general.file_type names a quantization can be measured from


def quantized_source_note(src, kind: str) -> str | None:
    """What to say when `src` is itself quantized: a quantization made from it carries its error too, so it is
    no better a reference than `src` (None for an F32/F16/BF16 source)."""
    from llamalens.modelfiles.gguf_header import file_type_name

    source = file_type_name(read_header(Path(src)).get("general.file_type"))
    if source in FULL_PRECISION:
        return None
    return (f"the source is itself quantized ({source}): its {str(kind).upper()} copy carries the source's error "
            f"and its own, so it is no better a reference than {Path(src).name}; compare the two with the "
            "source as model A, or start from an F16/BF16/F32 file to measure a quantization")


class NativeHandle:
    """Something that owns a native llama.cpp object: freed by close(), by `with`, or when collected."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _utf8(text) -> bytes:
    """A text's UTF-8 bytes for llama.cpp, checked first: a text (or bytes), with no lone surrogate."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    if not isinstance(text, str):
        raise InvalidArgument(f"a prompt or text must be a str, not {type(text).__name__} ({text!r:.40})")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"the text holds a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start} "
                           "(half of a UTF-16 pair, not a character); write the character itself") from None


class Model(NativeHandle):
    """A loaded GGUF model: weights, vocabulary and a cache of token bytes."""

    def __init__(self, path: str | os.PathLike, options: ModelOptions | None = None, found=None, memory=None,
                 header=None):
        """`found` (stores.Found): where the file came from; `memory` (memory.MemoryEstimate): the estimate the
        load was checked against. Both are recorded by describe(). `header`: the file's GGUF header, when the
        caller has read it already (memory.checked_load)."""
        self.path = Path(path)
        self.options = options or ModelOptions()
        self.options.validate()
        self.header = header if header is not None else read_header(self.path)
        self.found, self.memory = found, memory
        lib = llama_cpp_module()
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if self.options.gpu_layers == -1 else self.options.gpu_layers
        if self.options.load_mode is not None:
            params.load_mode = self.options.load_mode
        params.use_extra_bufts = self.options.repack == "on"  # llama-server's --repack / --no-repack
        self.ptr = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise InvalidModelFile(
                f"{self.path}: llama.cpp could not load this model (architecture {self.header.architecture!r}); "
                "it may need a newer llama-cpp-python, or the file is damaged. Set LLAMALENS_VERBOSE=1 for llama.cpp's log"
                + (f" (llama.cpp: {last_log_error()})" if last_log_error() else "")
            )
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        # native samplers that are costly to build for this vocabulary (sampler.py: DRY's breakers), kept to be
        # cloned per sequence; the model owns them and frees them with itself
        self.sampler_prototypes: dict = {}
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self.ptr))
        self.bos = int(lib.llama_vocab_bos(self.vocab))
        self.eos = int(lib.llama_vocab_eos(self.vocab))
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self.add_eos = bool(lib.llama_vocab_get_add_eos(self.vocab))
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._texts: dict[int, tuple[str, str]] = {}  # token_text's, per token: every record's alternatives ask
        self._eog: list[int] | None = None
        self._spellable: frozenset[str] | None = None  # _check_spellable's, made at the first tokenize
        self._lib = lib

    # -- identity ----------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return model_info(self.path, self.header, found=self.found)

    def describe(self) -> dict:
        d = self.info.to_dict()
        d["gpu_layers"] = self.options.gpu_layers
        d["build"] = build_info()
        if self.memory is not None:
            d["memory_estimate"] = self.memory.to_dict()
        return d

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str | bytes, add_bos: bool = False, special: bool = True) -> list[int]:
        raw = _utf8(text)
        self._check_spellable(raw)
        lib = self._lib
        n_max = len(raw) + 8
        buf = (lib.llama_token * n_max)()
        n = lib.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            buf = (lib.llama_token * n_max)()
            n = lib.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, add_bos, special)
            if n < 0:
                raise LlamalensError(f"llama.cpp could not tokenize the text ({len(raw)} bytes)")
        return list(buf[:n])

    def _check_spellable(self, raw: bytes) -> None:
        """llama.cpp's SentencePiece tokenizer spells a character that no token holds with byte tokens, and
        aborts the process (std::out_of_range) when the vocabulary has none: with such a vocabulary, text with a
        character that is not a token of its own is refused before it is tokenized."""
        if self._spellable is None:
            self._spellable = self._single_char_tokens()
        if not self._spellable:  # a vocabulary with byte tokens (or not SentencePiece's) spells anything
            return
        text = raw.decode("utf-8", errors="replace").replace(" ", "\u2581")
        missing = sorted({c for c in text if c not in self._spellable})
        if missing:
            shown = ", ".join(f"U+{ord(c):04X}" for c in missing[:8])
            raise InvalidInput(f"{self.path.name}'s vocabulary has no byte tokens and no token for {shown}; "
                               "llama.cpp cannot tokenize such text with it (it would abort): leave those characters "
                               "out, or use another model")

    def _single_char_tokens(self) -> frozenset[str]:
        """The one-character tokens of a SentencePiece vocabulary without byte tokens; empty for any other."""
        lib = self._lib
        if int(lib.llama_vocab_type(self.vocab)) != lib.LLAMA_VOCAB_TYPE_SPM:
            return frozenset()
        chars = set()
        for t in range(self.n_vocab):  # byte tokens come early in such vocabularies: the scan ends there
            if int(lib.llama_vocab_get_attr(self.vocab, t)) & lib.LLAMA_TOKEN_ATTR_BYTE:
                return frozenset()
            piece = (lib.llama_vocab_get_text(self.vocab, t) or b"").decode("utf-8", errors="replace")
            if len(piece) == 1:
                chars.add(piece)
        return frozenset(chars)

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The tokens create_completion would feed for this prompt (BOS + text [+ EOS/SEP])."""
        lib = self._lib
        sep_id = int(lib.llama_vocab_sep(self.vocab))  # (llama.cpp now folds CLS into BOS)
        bos = [self.bos] if self.add_bos and self.bos != -1 else []
        eos = [sep_id if sep_id != -1 else self.eos] if (self.add_eos or sep_id != -1) else []
        body = self.tokenize(prompt, add_bos=False, special=True) if prompt else []
        return bos + body + eos

    def token_text(self, token: int) -> tuple[str, str]:
        """(display text, hex bytes) of one token, control tokens rendered (see runtime.token_text)."""
        t = self._texts.get(token)
        if t is None:
            t = self._texts[token] = token_text(self.piece(token))
        return t

    def piece(self, token: int, special: bool = True) -> bytes:
        """The exact bytes of one token (special=True renders control tokens such as <eos>)."""
        key = (token, special)
        b = self._pieces.get(key)
        if b is None:
            lib = self._lib
            buf = ctypes.create_string_buffer(64)
            n = lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            b = buf.raw[: max(n, 0)]
            self._pieces[key] = b
        return b

    def chat_template(self) -> str | None:
        """The GGUF's own chat template (tokenizer.chat_template), or None when it has none."""
        raw = self._lib.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def apply_builtin_template(self, name: str, messages: list[dict], add_assistant: bool = True) -> str:
        """A conversation rendered by llama.cpp's own C++ template `name` (llama_chat_apply_template)."""
        lib = self._lib
        keep = [(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages]
        chat = (lib.llama_chat_message * len(keep))(*[lib.llama_chat_message(r, c) for r, c in keep])
        size = 256 + 2 * sum(len(r) + len(c) for r, c in keep)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_chat_apply_template(name.encode(), chat, len(keep), add_assistant, buf, size)
            if n < 0:
                raise LlamalensError(f"llama.cpp's chat template {name!r} could not render this conversation")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n
        raise LlamalensError(f"llama.cpp's chat template {name!r} kept growing its output")

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token id (what llama-server bans with ignore_eos)."""
        if self._eog is None:
            self._eog = [t for t in range(self.n_vocab) if self.is_eog(t)]
        return self._eog

    def suppress_tokens(self) -> list[int]:
        """The vocab's suppress tokens (GGUF tokenizer.ggml.suppress_tokens): llama.cpp's chain bans them."""
        n = ctypes.c_int32(0)
        ptr = self._lib.llama_vocab_get_suppress_tokens(self.vocab, ctypes.byref(n))
        return [int(ptr[i]) for i in range(n.value)] if ptr and n.value > 0 else []

    def check_fits(self, n_prompt: int, ctx: int) -> None:
        if n_prompt + 1 > ctx:
            raise PromptTooLong(
                f"the prompt is {n_prompt} tokens but the context holds {ctx}; shorten the prompt or raise --ctx "
                f"(the model was trained on {self.n_ctx_train})"
            )

    # -- contexts ----------------------------------------------------------------------------
    def context(self, n_ctx: int, n_seq_max: int = 1, n_batch: int | None = None,
                embeddings: bool = False, eval_callback=None) -> "Context":
        """A decoding context; with embeddings=True it returns each output token's hidden state
        (pooling NONE: every token's vector, pooled by the caller) instead of logits. `eval_callback`: a
        ggml_backend_sched_eval_callback that the scheduler asks about every graph node (core/lens.py's)."""
        return Context(self, n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch or self.options.batch,
                       embeddings=embeddings, eval_callback=eval_callback)

    @property
    def n_swa(self) -> int:
        """The sliding-window size of the model's SWA layers (0: none)."""
        return int(self._lib.llama_model_n_swa(self.ptr))

    @property
    def n_embd(self) -> int:
        return int(self._lib.llama_model_n_embd(self.ptr))

    def close(self) -> None:
        for proto in getattr(self, "sampler_prototypes", {}).values():
            self._lib.llama_sampler_free(proto)
        self.sampler_prototypes = {}
        if getattr(self, "ptr", None):
            self._lib.llama_model_free(self.ptr)
            self.ptr = None


class Context(NativeHandle):
    """A llama.cpp context: a KV cache for up to n_seq_max sequences and one reusable batch."""

    def __init__(self, model: Model, n_ctx: int, n_seq_max: int, n_batch: int, embeddings: bool = False,
                 eval_callback=None):
        lib = model._lib
        self.model, self._lib = model, lib
        n_seq_max = max(1, min(n_seq_max, int(lib.llama_max_parallel_sequences())))
        self.n_batch = max(n_batch, n_seq_max)
        p = lib.llama_context_default_params()
        # llama.cpp clamps n_batch to n_ctx but reserves an output per sequence: n_ctx < n_seq_max
        # would abort in GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)
        p.n_ctx = max(n_ctx, n_seq_max)
        p.n_batch = self.n_batch
        p.n_ubatch = self.n_ubatch = min(self.n_batch, model.options.ubatch or self.n_batch)
        p.swa_full = model.options.swa_full == "on"
        p.n_seq_max = n_seq_max
        p.kv_unified = True
        p.n_threads = p.n_threads_batch = model.options.threads_or_default()
        p.flash_attn_type = FLASH_ATTN[model.options.flash_attn]
        p.no_perf = True
        if embeddings:
            p.embeddings = True
            p.pooling_type = lib.LLAMA_POOLING_TYPE_NONE  # per-token vectors; embed.py pools them
        if eval_callback is not None:
            p.cb_eval = eval_callback
        self._eval_callback = eval_callback  # kept while the context lives: llama.cpp holds the pointer
        self.ptr = lib.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            raise LlamalensError(
                f"llama.cpp could not create a context of {n_ctx} tokens × {n_seq_max} sequences; "
                "lower --ctx or the number of parallel sequences"
            )
        self.n_ctx = int(lib.llama_n_ctx(self.ptr))
        self.n_seq_max = n_seq_max
        self.mem = lib.llama_get_memory(self.ptr)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._tok = np.ctypeslib.as_array(self.batch.token, shape=(self.n_batch,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(self.n_batch,))
        self._nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(self.n_batch,))
        self._out = np.ctypeslib.as_array(self.batch.logits, shape=(self.n_batch,))
        self._seq = [self.batch.seq_id[i] for i in range(self.n_batch)]
        self._fields = (self.batch.token, self.batch.pos, self.batch.n_seq_id, self.batch.logits)  # ctypes pointers
        self.n_vocab = model.n_vocab
        # llama_get_logits(_ith) returning plain addresses (llama-cpp-python's return float pointers to cast)
        at = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
        self._logits_at = at(ctypes.cast(self._lib.llama_get_logits, ctypes.c_void_p).value)
        ith = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)
        self._logits_ith_at = ith(ctypes.cast(self._lib.llama_get_logits_ith, ctypes.c_void_p).value)
        self._views: dict[tuple[int, int], np.ndarray] = {}

    def decode(self, tokens, positions, seqs, outputs) -> None:
        """Decode one batch: token i at positions[i] of sequence seqs[i]; outputs[i] asks for its logits."""
        n = len(tokens)
        if n > self.n_batch:
            raise ValueError(f"batch of {n} tokens exceeds n_batch {self.n_batch}")
        if n <= 8:  # a step's few tokens through ctypes: numpy's slice assignments cost 20 us in the cold cache
            tok, pos, nseq, out = self._fields
            for i, (t, p, s, o) in enumerate(zip(tokens, positions, seqs, outputs)):
                tok[i], pos[i], nseq[i], out[i] = t, p, 1, o
                self._seq[i][0] = s
        else:
            self._tok[:n] = tokens
            self._pos[:n] = positions
            self._nseq[:n] = 1
            self._out[:n] = outputs
            for i, s in enumerate(seqs):
                self._seq[i][0] = s
        self.batch.n_tokens = n
        rc = self._lib.llama_decode(self.ptr, self.batch)
        if rc != 0:
            raise LlamalensError(
                f"llama_decode failed (code {rc}{': the KV cache is full' if rc == 1 else ''}); "
                "lower the number of parallel sequences or raise --ctx"
            )

    def prompt_pieces(self, n: int) -> list[int]:
        """The batch sizes a prompt of n tokens is decoded in: n_batch at a time, or llama-server's pieces
        (ModelOptions.server_prefill) on a model with sliding-window attention and a small SWA cache."""
        opts = self.model.options
        if opts.server_prefill == "on" and opts.swa_full == "off" and self.model.n_swa > 0:
            return server_prompt_pieces(n, self.n_batch, self.n_ubatch)
        return [min(self.n_batch, n - i) for i in range(0, n, self.n_batch)]

    def prefill(self, tokens: list[int], seq: int = 0, start: int = 0) -> np.ndarray:
        """Decode a prompt into one sequence (in prompt_pieces); return a copy of the last row's logits."""
        return self.prefill_rows(tokens, len(tokens) - 1, seq=seq, start=start)[0]

    def prefill_rows(self, tokens: list[int], first: int, stop: int | None = None, seq: int = 0,
                     start: int = 0) -> np.ndarray:
        """prefill, keeping the logits of tokens[first:stop] (stop None: to the end): a copy, [rows, n_vocab], row i
        the logits after tokens[: first + i + 1]. The caller bounds their number: n_vocab x 4 bytes a row here, and
        as much again in llama.cpp's output buffer (which keeps its size) while a piece is decoded."""
        if not tokens:
            raise ValueError("empty prompt")
        stop = len(tokens) if stop is None else stop
        out = np.empty((max(stop - first, 0), self.n_vocab), dtype=np.float32)
        i = 0
        for size in self.prompt_pieces(len(tokens)):
            chunk = tokens[i : i + size]
            outs = [1 if first <= i + k < stop else 0 for k in range(len(chunk))]
            self.decode(chunk, range(start + i, start + i + len(chunk)), [seq] * len(chunk), outs)
            n_out = sum(outs)
            if n_out:
                at = max(first, i) - first
                for j in range(n_out):  # output j of the piece (logits(i) counts batch entries, -1 the last output)
                    out[at + j] = self.logits(j - n_out)
            i += size
        return out

    def logits(self, i: int) -> np.ndarray:
        """A view of output row i of the last decode (valid until the next decode)."""
        ptr = self._lib.llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def logits_block(self, n: int) -> np.ndarray:
        """A [n, n_vocab] view of the first n output rows of the last decode, in batch order (valid until the next
        decode): llama_get_logits' buffer, one contiguous block, row i the same memory as logits(i). The view of a
        (buffer address, n) is made once and kept: making it took 90 us a step in the cold cache after a decode,
        most of a one-row step's share."""
        start = self._logits_at(self.ptr)
        first = self._logits_ith_at(self.ptr, 0)
        last = first if n == 1 else self._logits_ith_at(self.ptr, n - 1)
        if not start or first != start or last != start + (n - 1) * self.n_vocab * 4:
            return np.stack([self.logits(i) for i in range(n)])  # not one block in batch order: copy the rows
        view = self._views.get((start, n))
        if view is None:
            if len(self._views) >= 256:
                self._views.clear()
            view = self._views[start, n] = np.ctypeslib.as_array(
                (ctypes.c_float * (n * self.n_vocab)).from_address(start)).reshape(n, self.n_vocab)
        return view

    def embedding(self, i: int) -> np.ndarray:
        """A copy of the hidden-state vector of output i of the last decode (an embeddings context)."""
        ptr = self._lib.llama_get_embeddings_ith(self.ptr, i)
        if not ptr:
            raise LlamalensError(f"llama.cpp returned no embedding for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).copy()

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self._lib.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self._lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_pos_min(self, seq: int) -> int:
        """The smallest position whose cell a sequence still holds (-1: none); above 0 when a sliding window
        dropped the older ones."""
        return int(self._lib.llama_memory_seq_pos_min(self.mem, seq))

    def clear(self) -> None:
        self._lib.llama_memory_clear(self.mem, True)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.llama_batch_free(self.batch)
            self._lib.llama_free(self.ptr)
            self.ptr = None
