"""Read and check a GGUF file's header without loading its weights.

Why our own reader: `gguf.GGUFReader` builds numpy views of every metadata array and takes about
12 s on the default model (its 262,144 token strings); `llamalens models` must list a folder of 13B
models in a blink, and every model command must reject a truncated or corrupt file *before*
llama.cpp sees it (llama.cpp may abort the process on some corrupt inputs). So this module walks
the header once with `struct` over an mmap, keeps scalars and short arrays, summarises long arrays
by element type and count, and checks that every tensor's data lies inside the file.

The layout (GGUF v2/v3, little endian):
    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv × (key: string, value_type u32, value)
    n_tensors × (name: string, n_dims u32, dims u64 × n_dims, ggml_type u32, offset u64)
    padding to `general.alignment` (default 32), then the tensor data section.
A string is a u64 length and that many bytes; an array is an element type u32, a count u64 and the
elements.

Walking a 262k-token vocabulary's strings takes ~0.2 s, on every start of every command. So a header, once
read and checked, is kept in a small JSON file in the user's cache ($LLAMALENS_CACHE_DIR, else
$XDG_CACHE_HOME/llamalens or ~/.cache/llamalens; folder headers/), named by the file's identity: its resolved
path, size, mtime_ns and a BLAKE2 hash of its first and last MiB. A file changed in any of these is read
again; a file that fails the checks is never cached; a cache that cannot be written or read is ignored; the
folder keeps the CACHE_MAX most recently written headers.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from llamalens.errors import InvalidModelFile

GGUF_MAGIC = b"GGUF"
# value type -> struct format (fixed-size types); 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this are kept as a summary only (the vocabulary, merges, scores, ...).
KEEP_ARRAY_MAX = 64


@dataclass(frozen=True)
class ArraySummary:
    """A long metadata array: its element type and length, not its elements."""

    element_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the data section
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", "unknown"))

    def arch_key(self, suffix: str, default=None):
        return self.get(f"{self.architecture}.{suffix}", default)

    @property
    def vocab_size(self) -> int | None:
        tokens = self.get("tokenizer.ggml.tokens")
        if isinstance(tokens, ArraySummary):
            return tokens.count
        if isinstance(tokens, list):
            return len(tokens)
        return self.arch_key("vocab_size")

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)


def _quant_sizes() -> dict[int, tuple[int, int]]:
    """ggml type id -> (elements per block, bytes per block), from the gguf package's table."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


class _Cursor:
    """Bounds-checked reads over the mapped file: running past the end means a truncated file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def _need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise InvalidModelFile(
                f"{self.path}: GGUF header is truncated or corrupt (reading {what} at byte {self.pos} "
                f"of {self.size}); the file is incomplete: download or convert it again"
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self._need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self, what: str):
        n = self.unpack("<Q", what)
        self._need(n, what)
        self.pos += n

    def value(self, vtype: int, what: str):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            if etype not in _SCALAR and etype != _STRING:
                raise InvalidModelFile(f"{self.path}: corrupt GGUF metadata ({what}: array of type {etype}); "
                                       "the file is damaged: download or convert it again")
            if count <= KEEP_ARRAY_MAX:
                return [self.value(etype, what) for _ in range(count)]
            if etype == _STRING:
                for _ in range(count):
                    self.skip_string(what)
            else:
                n = struct.calcsize(_SCALAR[etype]) * count
                self._need(n, what)
                self.pos += n
            return ArraySummary(etype, count)
        raise InvalidModelFile(f"{self.path}: corrupt GGUF metadata ({what}: unknown value type {vtype}); "
                               "the file is damaged: download or convert it again")


CACHE_VERSION = 1
CACHE_MAX = 256  # headers kept (a few KB each); temporary files of tests and conversions come and go
MIB = 1 << 20


def cache_dir() -> Path:
    """Where llamalens caches what it derives from files (headers/ here)."""
    explicit = os.environ.get("LLAMALENS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llamalens"


def file_identity(path: Path) -> str:
    """A key that changes when the file does: resolved path, size, mtime_ns, BLAKE2 of the first + last MiB."""
    st = path.stat()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(MIB))
        if st.st_size > MIB:
            f.seek(max(MIB, st.st_size - MIB))
            h.update(f.read(MIB))
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{h.hexdigest()}"
    return hashlib.sha256(key.encode("utf-8", errors="surrogateescape")).hexdigest()


def _to_json(v):
    if isinstance(v, ArraySummary):
        return {"array_summary": [v.element_type, v.count]}
    if isinstance(v, list):
        return [_to_json(x) for x in v]
    return v


def _from_json(v):
    if isinstance(v, dict):
        return ArraySummary(*v["array_summary"])
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def _cached(path: Path, key: str) -> GGUFHeader | None:
    try:
        d = json.loads((cache_dir() / "headers" / f"{key}.json").read_text(encoding="utf-8"))
        if d.get("version") != CACHE_VERSION:
            return None
        return GGUFHeader(path=path, version=d["gguf_version"], file_size=d["file_size"],
                          data_offset=d["data_offset"],
                          metadata={k: _from_json(v) for k, v in d["metadata"].items()},
                          tensors=[TensorInfo(n, tuple(shape), t, off, nb) for n, shape, t, off, nb in d["tensors"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(header: GGUFHeader, key: str) -> None:
    d = {"version": CACHE_VERSION, "gguf_version": header.version, "file_size": header.file_size,
         "data_offset": header.data_offset, "metadata": {k: _to_json(v) for k, v in header.metadata.items()},
         "tensors": [[t.name, list(t.shape), t.ggml_type, t.offset, t.n_bytes] for t in header.tensors]}
    folder = cache_dir() / "headers"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(d), encoding="utf-8")
        os.replace(tmp, folder / f"{key}.json")  # atomic: a reader sees the old file or the whole new one
        # only the cache's own entries (named by a sha256): a file of someone else's there is never removed
        kept = sorted((f for f in folder.glob("*.json") if re.fullmatch(r"[0-9a-f]{64}\.json", f.name)),
                      key=lambda f: f.stat().st_mtime_ns)
        for old in kept[: max(0, len(kept) - CACHE_MAX)]:  # the least recently written go first
            old.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass  # a read-only or full cache: the header is read again next time


def read_header(path: str | os.PathLike, cache: bool = True) -> GGUFHeader:
    """Parse and check a GGUF file's header (or take it from the cache, see the module docstring); raise
    InvalidModelFile naming what is wrong.

    >>> read_header("model.gguf").architecture   # doctest: +SKIP
    'gemma3'
    """
    path = Path(path)
    key = None
    if cache:
        try:
            key = file_identity(path)
        except OSError:
            key = None  # missing or unreadable: parse_header says which
        else:
            hit = _cached(path, key)
            if hit is not None:
                _check_layers(hit, path)  # an entry cached by a version that did not check yet
                return hit
    header = parse_header(path)
    if key is not None:
        _store(header, key)
    return header


def parse_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and check a GGUF file's header from the file itself; raise InvalidModelFile naming what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except FileNotFoundError:
        from llamalens.errors import ModelNotFound

        raise ModelNotFound(f"model file not found: {path}; check the path or run `llamalens models`") from None
    except OSError as e:
        raise InvalidModelFile(f"{path}: cannot read the model file ({e.strerror}); check its permissions") from None
    with f:
        if size < 24:
            raise InvalidModelFile(f"{path}: not a GGUF model ({size} bytes, too short); "
                                   "pass a .gguf file (convert other formats with llama.cpp's convert_hf_to_gguf.py)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path, size)


def _parse(buf, path: Path, size: int) -> GGUFHeader:
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise InvalidModelFile(
            f"{path}: not a GGUF model (starts with {magic!r}, expected b'GGUF'); pass a .gguf file "
            "(convert other formats with llama.cpp's convert_hf_to_gguf.py, see models/README.md)"
        )
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise InvalidModelFile(f"{path}: unsupported GGUF version {version} (llamalens reads 2 and 3); "
                               "re-convert the model with a current llama.cpp")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    # Every tensor entry and key takes at least 8 bytes: bigger counts are garbage, not a big model.
    if n_tensors > size // 8 or n_kv > size // 8:
        raise InvalidModelFile(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys in {size} bytes); "
                               "the file is damaged: download or convert it again")
    header = GGUFHeader(path=path, version=version, file_size=size)
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        vtype = cur.unpack("<I", f"the type of {key}")
        header.metadata[key] = cur.value(vtype, key)
    sizes = _quant_sizes()
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor {i}'s name")
        n_dims = cur.unpack("<I", f"tensor {name}")
        if n_dims > 8:
            raise InvalidModelFile(f"{path}: corrupt GGUF tensor table ({name} has {n_dims} dimensions); "
                                   "the file is damaged: download or convert it again")
        shape = tuple(cur.unpack("<Q", f"tensor {name}") for _ in range(n_dims))
        gtype = cur.unpack("<I", f"tensor {name}")
        offset = cur.unpack("<Q", f"tensor {name}")
        if gtype not in sizes:
            raise InvalidModelFile(f"{path}: tensor {name} has unknown type {gtype}; the file is damaged, or needs "
                                   "a newer llamalens / llama-cpp-python")
        block, type_size = sizes[gtype]
        n = 1
        for d in shape:
            n *= d
        infos.append((name, shape, gtype, offset, n // block * type_size))
    align = header.metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0:
        align = 32
    data_offset = (cur.pos + align - 1) // align * align
    header.data_offset = data_offset
    for name, shape, gtype, offset, n_bytes in infos:
        end = data_offset + offset + n_bytes
        if end > size:
            raise InvalidModelFile(
                f"{path}: GGUF file is truncated: tensor {name} ends at byte {end:,} but the file has {size:,} bytes; "
                "the download or copy is incomplete: fetch or convert it again"
            )
        header.tensors.append(TensorInfo(name, shape, gtype, offset, n_bytes))
    _check_layers(header, path)
    return header


# llama.cpp's LLAMA_MAX_LAYERS and LLAMA_MAX_EXPERTS (src/llama-hparams.h): it asserts these bounds while
# loading, which aborts the process; llamalens's memory estimate would also build a list per layer.
MAX_LAYERS, MAX_EXPERTS = 512, 1024


def _check_layers(header: GGUFHeader, path: Path) -> None:
    """Refuse a layer or expert count that llama.cpp aborts on (or that is not a count at all)."""
    for suffix, low, top in (("block_count", 1, MAX_LAYERS), ("expert_count", 0, MAX_EXPERTS),
                             ("expert_used_count", 0, MAX_EXPERTS)):
        value = header.arch_key(suffix)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not low <= value <= top):
            raise InvalidModelFile(f"{path}: corrupt GGUF metadata ({header.architecture}.{suffix} = {value!r}; "
                                   f"llama.cpp loads {low} to {top}); the file is damaged: download or convert it again")


def file_type_name(file_type: int | None) -> str:
    """`general.file_type` as llama.cpp names it (15 -> 'Q4_K_M')."""
    if file_type is None:
        return "unknown"
    try:
        from gguf.constants import LlamaFileType

        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (ValueError, ImportError):
        return f"type {file_type}"
