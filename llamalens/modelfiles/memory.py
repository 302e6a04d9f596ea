"""Will it fit? The memory a command needs, estimated from the GGUF header before anything is loaded.

Why: a 13B model on a 16 GB laptop either fits or the kernel kills the process halfway through
loading, with no word on why. So every model command first adds up what llama.cpp will allocate
*and touch* (what resident memory counts), compares it with the memory available now, and refuses
with the numbers and the fixes when it is short; `--force` skips the check.

The parts (bytes), each as llama.cpp sizes it (vendored source: llama-kv-cache*.cpp,
llama-context.cpp; compute buffers fitted to the sizes its log reports, see tests/test_memory.py):
  weights   the tensor data: the file size (all parts of a split model), mmap'ed or read; the share
            of the last --gpu-layers repeating layers goes to VRAM instead when the build offloads.
  kv        for each attention layer: cells × (n_head_kv × (key_length + value_length)) × 2 B (F16
            cache); cells = --ctx × sequences (one unified cache), padded to 256. llama.cpp keeps
            full-size caches for sliding-window layers too (swa_full, its default); with swa_full off
            they hold min(cells, window × sequences + batch) cells.
  outputs   the logits llama.cpp keeps: rows asked for × n_vocab × 4 B.
  compute   the graph's scratch memory for one batch of tokens: the larger of the output projection
            (rows × n_vocab × 4 B) and attention (cells × batch × 4 B × (heads + 1), or × 2 B for the mask
            alone with flash attention), plus batch × (4 n_embd + 2 n_ff) × 4 B of activations.
  runtime   the interpreter, numpy and llama.cpp's libraries (RUNTIME_BYTES), and llama.cpp's vocabulary
            tables (VOCAB_BYTES per token): both measured, see below.
  analysis  what a command's own analysis holds beyond llama.cpp (the lens's projection buffers): the command
            says how much, as a function of the header (checked_load's `analysis`).
  repacked  weights llama.cpp's CPU backend copies into interleaved layouts (--repack on; Q4_0, Q4_K, IQ4_NL
            and MXFP4 matrices on x86 with AVX2, Q2_K with AVX-512 too; more types on ARM): the copy has the
            size of the original. With mmap (the default) the original's file pages were read to make it and
            stay resident until the kernel needs the memory back, so the process's peak RSS is `peak` = total
            + repacked; what it needs is `total`, since those pages are clean and reclaimable. A Q4_K_M 8B
            model on an AVX2 CPU repacks ~3.2 GB of its 4.9 GB: its peak RSS is ~1.6x its weights.
Available memory is the kernel's MemAvailable (Linux), else the physical pages the OS reports free;
$LLAMALENS_MEMORY_LIMIT (8G, 512M, ...) caps it.
VRAM is reported but not checked (llama-cpp-python has no portable query for it).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import asdict, dataclass

from llamalens.errors import LlamalensError
from llamalens.visible import size_text
from llamalens.modelfiles.gguf_header import GGUFHeader

MIB = 1 << 20
# Measured on this machine's build (Python 3.11, numpy, click, llama.cpp's CPU backend): peak RSS of the CLI
# with llama.cpp initialised and no model is 44 MB; a model's vocabulary adds about 256 B a token beyond its
# weights (Gemma's 262,144 tokens: ~70 MB; measured as the peak RSS of `next` minus weights and runtime).
RUNTIME_BYTES = 48 * MIB
VOCAB_BYTES = 256
KV_CELL_PAD = 256
F16 = 2
# Sliding-window layout per architecture when the header has no sliding_window_pattern key: every n-th
# layer is full attention (llama.cpp's load_swa_pattern(ml, n) in src/models/*.cpp).
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "gemma-embedding": 6, "cohere2": 4, "exaone4": 4,
               "llama4": 4, "olmo2": 4, "gpt-oss": 2}


class ModelTooBig(LlamalensError):
    """A model and settings that need more memory than the machine has available."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv: int
    outputs: int
    compute: int
    runtime: int
    weights_gpu: int  # offloaded with --gpu-layers (VRAM, not checked)
    available: int | None  # RAM available now (None: unknown)
    ctx: int
    sequences: int
    rows: int
    batch: int
    kv_cells: int
    repacked: int = 0  # weights copied into repacked layouts, their mapped file pages reclaimable (docstring)
    analysis: int = 0  # the command's own buffers beyond llama.cpp's (docstring)

    @property
    def total(self) -> int:
        """What the process will hold in RAM."""
        return self.weights + self.kv + self.outputs + self.compute + self.runtime + self.analysis

    @property
    def peak(self) -> int:
        """The peak RSS when nothing presses on memory: total, and the mapped pages of repacked weights."""
        return self.total + self.repacked

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "peak": self.peak, "fits": self.fits}

    def breakdown(self) -> str:
        """'weights 241.4 MiB + KV cache 36.0 MiB + ... = 1.27 GiB'."""
        parts = [("weights", self.weights), ("KV cache", self.kv), ("logits", self.outputs),
                 ("compute", self.compute), ("runtime", self.runtime)] + [("analysis", self.analysis)] * (self.analysis > 0)
        return " + ".join(f"{name} {gb(n)}" for name, n in parts) + f" = {gb(self.total)}"


# ggml types llama.cpp's CPU backend repacks (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type), by
# the build's CPU features as llama_print_system_info names them; a matrix needs a multiple of 8 rows.
_Q4_0, _Q2_K, _Q4_K, _Q5_K, _Q6_K, _Q8_0, _IQ4_NL, _MXFP4 = 2, 10, 12, 13, 14, 8, 20, 39
REPACKED_TYPES = (("AVX2 = 1", {_Q4_0, _Q4_K, _IQ4_NL, _MXFP4}), ("AVX512 = 1", {_Q2_K}),
                  ("MATMUL_INT8 = 1", {_Q4_0, _Q4_K, _Q5_K, _Q6_K, _IQ4_NL, _MXFP4, _Q8_0}),
                  ("DOTPROD = 1", {_Q4_0, _Q5_K, _Q6_K, _IQ4_NL, _MXFP4, _Q8_0}))


def repacked_types(system_info: str) -> set[int]:
    return set().union(*(types for feature, types in REPACKED_TYPES if feature in system_info))


@functools.cache
def _build_repacked_types() -> frozenset[int]:
    """The types this process's llama.cpp build repacks (its system info is fixed once it is loaded)."""
    from llamalens.core.runtime import system_info

    return frozenset(repacked_types(system_info()))


def _in_layers_from(tensor, first: int | None) -> bool:
    """Whether a tensor belongs to repeating layer `first` or a later one (the layers --gpu-layers offloads)."""
    m = re.match(r"blk\.(\d+)\.", tensor.name)
    return first is not None and m is not None and int(m[1]) >= first


def repacked_bytes(header: GGUFHeader, first_gpu_layer: int | None = None) -> int:
    """The bytes of weight matrices this build repacks (module docstring): 2-D, not the token embedding (read
    by rows, not multiplied), a multiple of 8 rows, and not in a layer offloaded to a GPU."""
    types = _build_repacked_types()
    return sum(t.n_bytes for t in header.tensors
               if t.ggml_type in types and len(t.shape) == 2 and t.shape[1] % 8 == 0
               and not t.name.startswith("token_embd") and not _in_layers_from(t, first_gpu_layer))


def gb(n: int | None) -> str:
    """A size as every command prints one (visible.size_text: MiB / GiB)."""
    return size_text(n)


def _per_layer(value, n_layer: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value[:n_layer]] + [int(value[-1])] * max(0, n_layer - len(value))
    return [int(value)] * n_layer


def _swa_layers(header: GGUFHeader, n_layer: int) -> list[bool]:
    window = header.arch_key("attention.sliding_window")
    if not window:
        return [False] * n_layer
    pattern = header.arch_key("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return [bool(x) for x in pattern[:n_layer]] + [False] * max(0, n_layer - len(pattern))
    n = int(pattern) if isinstance(pattern, int) else SWA_PATTERN.get(header.architecture, 1)
    return [n == 0 or il % n < n - 1 for il in range(n_layer)]


def pad(n: int, to: int = KV_CELL_PAD) -> int:
    return (max(int(n), 1) + to - 1) // to * to


def estimate(header: GGUFHeader, options, sequences: int = 1, rows: int | None = None, cells: int | None = None,
             weights: int | None = None, gpu_offload: bool = False, available: int | None = -1) -> MemoryEstimate:
    """The memory a command needs with these ModelOptions: `sequences` decoded side by side, `rows` logits
    rows asked for per decode (default one per sequence), `cells` KV cells in all (default --ctx per
    sequence). `weights` = the bytes of tensor data (a split model's parts together; default: this file's)."""
    n_layer = int(header.arch_key("block_count") or 0)
    n_embd = int(header.arch_key("embedding_length") or 0)
    n_head = _per_layer(header.arch_key("attention.head_count") or 0, n_layer)
    n_head_kv = _per_layer(header.arch_key("attention.head_count_kv") or n_head, n_layer)
    head = n_embd // max(1, max(n_head or [1]))
    k_len = int(header.arch_key("attention.key_length") or head)
    v_len = int(header.arch_key("attention.value_length") or head)
    n_ff = max(_per_layer(header.arch_key("feed_forward_length") or 0, max(n_layer, 1)))
    n_vocab = int(header.vocab_size or 0)
    sequences = max(1, int(sequences))
    batch = max(int(options.batch), sequences)
    rows = min(batch, max(1, int(rows if rows is not None else sequences)))
    cells = pad(max(int(cells if cells is not None else options.ctx * sequences), sequences))
    swa = _swa_layers(header, n_layer)
    window = int(header.arch_key("attention.sliding_window") or 0)
    swa_cells = cells if getattr(options, "swa_full", True) else min(cells, pad(window * sequences + batch))
    kv = sum((swa_cells if swa[il] else cells) * n_head_kv[il] * (k_len + v_len) * F16
             for il in range(n_layer) if n_head_kv[il] > 0)
    if options.flash_attn == "off":
        attention = cells * batch * 4 * (max(n_head or [0]) + 1)
    else:
        attention = cells * batch * F16
    compute = max(rows * n_vocab * 4, attention) + batch * (4 * n_embd + 2 * n_ff) * 4
    data = weights if weights is not None else sum(t.n_bytes for t in header.tensors)
    on_gpu, first = 0, None
    if gpu_offload and options.gpu_layers:
        n_off = n_layer if options.gpu_layers == -1 else min(n_layer, options.gpu_layers)
        first = n_layer - n_off
        layer_bytes = [t.n_bytes for t in header.tensors if _in_layers_from(t, first)]
        share = sum(layer_bytes) / max(1, sum(t.n_bytes for t in header.tensors))
        on_gpu = int(data * share)
    return MemoryEstimate(weights=data - on_gpu, kv=kv, outputs=rows * n_vocab * 4, compute=compute,
                          runtime=RUNTIME_BYTES + n_vocab * VOCAB_BYTES, weights_gpu=on_gpu,
                          available=available_ram() if available == -1 else available, ctx=int(options.ctx),
                          sequences=sequences, rows=rows, batch=batch, kv_cells=cells,
                          repacked=repacked_bytes(header, first) if getattr(options, "repack", "on") != "off"
                          and getattr(options, "mmap", True) else 0)


LAPTOP_RAM_GB = (8, 16, 32)
LAPTOP_USABLE = 0.75  # the OS, a browser and a desktop keep about a quarter of a laptop's RAM
LAPTOP_CONTEXTS = (2048, 4096, 8192, 16384, 32768, 65536, 131072)
LAPTOP_SEQUENCES = (1, 8, 32)


def laptops(header: GGUFHeader, options, weights: int | None = None) -> list[dict]:
    """What laptops of 8, 16 and 32 GB can run (three quarters of their RAM usable): for 1, 8 and 32 sequences
    decoded side by side (generate; a sweep's --parallel), the largest context a sequence (up to the model's own)
    that fits with these options, None where not even 2,048 does. Rows {"ram_gb", "usable", "contexts": {n: ctx}}."""
    from dataclasses import replace

    trained = int(header.arch_key("context_length") or 0) or LAPTOP_CONTEXTS[-1]
    out = []
    for ram in LAPTOP_RAM_GB:
        usable = int(ram * 2**30 * LAPTOP_USABLE)
        best = {}
        for n in LAPTOP_SEQUENCES:
            fits = [c for c in LAPTOP_CONTEXTS if c <= max(trained, LAPTOP_CONTEXTS[0])
                    and estimate(header, replace(options, ctx=c), sequences=n, weights=weights, available=usable).fits]
            best[n] = max(fits) if fits else None
        out.append({"ram_gb": ram, "usable": usable, "contexts": best})
    return out


def parse_size(text: str) -> int:
    """'8G', '512M', '1.5GB', '1000000' -> bytes (powers of 1024 for K, M, G, T)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ModelTooBig(f"LLAMALENS_MEMORY_LIMIT {text!r} is not a size; write e.g. 8G, 512M or a byte count")
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2] or " "))


def available_ram() -> int | None:
    """Bytes of RAM available to a new allocation now: Linux's MemAvailable, else free physical pages; at most
    $LLAMALENS_MEMORY_LIMIT when that is set (a budget that leaves room for other programs)."""
    limit = os.environ.get("LLAMALENS_MEMORY_LIMIT", "").strip()
    ram = _os_available()
    if limit:
        return parse_size(limit) if ram is None else min(ram, parse_size(limit))
    return ram


def _os_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check(est: MemoryEstimate, name: str) -> None:
    """Refuse an estimate that does not fit, naming the numbers and what would make it fit."""
    if est.fits is not False:
        return
    fixes = []
    if est.kv + est.compute > est.total * 0.2:
        fixes.append(f"a smaller --ctx (now {est.ctx}, KV cache {gb(est.kv)})")
    if est.sequences > 1:
        fixes.append(f"fewer parallel sequences (now {est.sequences})")
    if est.outputs + est.compute > est.total * 0.2:
        fixes.append(f"a smaller --batch (now {est.batch}; logits take {gb(est.outputs + est.compute)})")
    fixes.append("more --gpu-layers (on a GPU build)" if est.weights else "")
    fixes.append("a smaller quantization of the model (e.g. Q4_K_M rather than Q8_0 or F16)")
    raise ModelTooBig(
        f"{name} needs about {gb(est.total)} of RAM ({est.breakdown()}) but {gb(est.available)} is available; "
        f"try {', '.join(f for f in fixes if f)}; or pass --force to load it anyway"
    )


def for_model(found, options, sequences: int = 1, rows: int | None = None, cells: int | None = None,
              header=None, analysis=None) -> MemoryEstimate:
    """The estimate for a resolved model (stores.Found: all its parts) with these ModelOptions; `header`, its
    GGUF header when already read; `analysis(header)`, the bytes the command's own analysis adds."""
    from dataclasses import replace

    from llamalens.modelfiles.gguf_header import read_header
    from llamalens.core.runtime import supports_gpu_offload

    options.validate()
    header = header or read_header(found.path)
    est = estimate(header, options, sequences, rows, cells, weights=found.size,
                   gpu_offload=bool(options.gpu_layers) and supports_gpu_offload())
    return replace(est, analysis=int(analysis(header))) if analysis else est


def fit_sequences(found, options, wanted: int, per_sequence: int) -> tuple[int, MemoryEstimate]:
    """The most sequences side by side, from `wanted` down by halves to 1, whose estimate (`per_sequence` KV
    cells each) fits the RAM available now, with that estimate: how many a sweep decodes a batch when its
    --parallel is not given."""
    from llamalens.modelfiles.gguf_header import read_header

    header, n = read_header(found.path), max(1, wanted)
    while True:
        est = for_model(found, options, sequences=n, cells=n * per_sequence, header=header)
        if est.fits is not False or n == 1:
            return n, est
        n = max(1, n // 2)


def checked_load(found, options, sequences: int = 1, rows: int | None = None, cells: int | None = None,
                 announce=None, analysis=None):
    """Estimate, refuse when it will not fit (unless options.force), then load: a runtime.Model. `announce()` is
    called once the check has passed, just before llama.cpp opens the file; `analysis`: as for_model's."""
    from llamalens.modelfiles.gguf_header import read_header
    from llamalens.core.runtime import Model

    header = read_header(found.path)  # read once: for the estimate, then for the model (~0.1 s on a 262k vocabulary)
    est = for_model(found, options, sequences, rows, cells, header=header, analysis=analysis)
    if not options.force:
        check(est, found.source)
    if announce:
        announce()
    return Model(found.path, options, found=found, memory=est, header=header)
