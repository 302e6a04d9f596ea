"""The models other tools already keep on this machine: Ollama, LM Studio, the Hugging Face hub cache
and llama.cpp's download cache. Read only, offline: nothing here opens a socket or downloads.

Where each store is (the tools' own documented rules; the first that is set wins):
  ollama     $OLLAMA_MODELS, else ~/.ollama/models (macOS, Windows, a user install on Linux) and,
             on Linux, the system service's /usr/share/ollama/.ollama/models.
             manifests/<registry>/<namespace>/<name>/<tag> is JSON whose layer of media type
             application/vnd.ollama.image.model names a blob: blobs/sha256-<hex> is a plain GGUF.
  lmstudio   LM Studio's home (the folder named in ~/.lmstudio-home-pointer, else ~/.lmstudio):
             its settings.json "downloadsFolder" when set, else <home>/models; plus the older
             ~/.cache/lm-studio/models. Files are <publisher>/<repo>/<file>.gguf.
  hf         $HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub,
             ~/.cache/huggingface/hub. Repos are models--<org>--<name>; files snapshots/<rev>/...,
             the revision refs/main names first.
  llama.cpp  $LLAMA_CACHE, else ~/Library/Caches/llama.cpp (macOS), %LOCALAPPDATA%\\llama.cpp
             (Windows), $XDG_CACHE_HOME/llama.cpp or ~/.cache/llama.cpp: flat <org>_<repo>_<file>.gguf
             files (older llama.cpp -hf) and hub-layout models--* repos (newer ones).
$LLAMALENS_STORES limits the search (comma-separated store names, or `none`).

Names `--model` accepts for them:
  ollama:NAME[:TAG]                    TAG defaults to latest; NAME may be ns/name or host/ns/name
  hf:ORG/REPO[:QUANT|:FILE]            from the cache only; QUANT matches a file name (Q4_K_M)
  lmstudio:PUBLISHER/REPO[/FILE.gguf]  FILE may be left out when the repo holds one model
A split GGUF (name-00001-of-00003.gguf) is one model, listed and loaded by its first part.

`Found` is one model in a store: the file to load, its parts, where it came from (`source`, the
name that resolves to it again) and, for Ollama, the blob's digest.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llamalens.errors import InvalidModelFile, ModelNotFound

STORES = ("ollama", "lmstudio", "hf", "llama.cpp")
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY, OLLAMA_NAMESPACE = "registry.ollama.ai", "library"
SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class Found:
    path: Path  # the file llama.cpp opens (a split model's first part)
    store: str  # ollama, lmstudio, hf, llama.cpp, folder
    source: str  # the --model name that finds it again: ollama:llama3.2:3b, hf:org/repo:file, ...
    parts: tuple[Path, ...] = field(default=())
    digest: str = ""  # Ollama: the model layer's sha256

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in (self.parts or (self.path,)))


# -- where the stores are ---------------------------------------------------------------------------
def _env_path(env, name: str) -> Path | None:
    value = env.get(name, "").strip()
    return Path(value).expanduser() if value else None


def ollama_roots(env=os.environ, home: Path | None = None, platform: str = sys.platform) -> list[Path]:
    home = home or Path.home()
    if _env_path(env, "OLLAMA_MODELS"):
        return [_env_path(env, "OLLAMA_MODELS")]
    roots = [home / ".ollama" / "models"]
    if platform.startswith("linux"):
        roots.append(Path("/usr/share/ollama/.ollama/models"))
    return roots


def lmstudio_roots(env=os.environ, home: Path | None = None, platform: str = sys.platform) -> list[Path]:
    home = home or Path.home()
    lms_home = home / ".lmstudio"
    try:
        pointed = (home / ".lmstudio-home-pointer").read_text(encoding="utf-8").strip()
        if pointed:
            lms_home = Path(pointed).expanduser()
    except OSError:
        pass
    models = lms_home / "models"
    try:
        folder = json.loads((lms_home / "settings.json").read_text(encoding="utf-8")).get("downloadsFolder")
        if isinstance(folder, str) and folder.strip():
            models = Path(folder.strip()).expanduser()
    except (OSError, ValueError, AttributeError):
        pass
    return [models, home / ".cache" / "lm-studio" / "models"]


def hf_roots(env=os.environ, home: Path | None = None, platform: str = sys.platform) -> list[Path]:
    home = home or Path.home()
    for name, sub in (("HF_HUB_CACHE", ()), ("HUGGINGFACE_HUB_CACHE", ()), ("HF_HOME", ("hub",)),
                      ("XDG_CACHE_HOME", ("huggingface", "hub"))):
        base = _env_path(env, name)
        if base:
            return [base.joinpath(*sub)]
    return [home / ".cache" / "huggingface" / "hub"]


def llama_cache_roots(env=os.environ, home: Path | None = None, platform: str = sys.platform) -> list[Path]:
    home = home or Path.home()
    if _env_path(env, "LLAMA_CACHE"):
        return [_env_path(env, "LLAMA_CACHE")]
    if platform == "win32":
        base = _env_path(env, "LOCALAPPDATA") or home / "AppData" / "Local"
    elif platform == "darwin":
        base = home / "Library" / "Caches"
    else:
        base = _env_path(env, "XDG_CACHE_HOME") or home / ".cache"
    return [base / "llama.cpp"]


ROOTS = {"ollama": ollama_roots, "lmstudio": lmstudio_roots, "hf": hf_roots, "llama.cpp": llama_cache_roots}


def enabled_stores(env=os.environ) -> tuple[str, ...]:
    text = env.get("LLAMALENS_STORES")
    if text is None:
        return STORES
    wanted = [s.strip().lower() for s in text.split(",") if s.strip()]
    if wanted in ([], ["none"]):
        return ()
    unknown = [s for s in wanted if s not in STORES]
    if unknown:
        raise ModelNotFound(f"LLAMALENS_STORES names unknown store(s) {', '.join(unknown)}; use a comma-separated "
                            f"list of {', '.join(STORES)}, or none")
    return tuple(s for s in STORES if s in wanted)


def store_roots(env=os.environ, home: Path | None = None) -> dict[str, list[Path]]:
    """Each enabled store's folders (existing or not), in search order."""
    return {s: ROOTS[s](env, home) for s in enabled_stores(env)}


# -- split files ------------------------------------------------------------------------------------
def split_parts(path: Path) -> tuple[Path, ...]:
    """All parts of a split GGUF given its first part (just the file when it is not split). A missing part
    is an error naming it."""
    m = SPLIT.match(path.name)
    if not m:
        return (path,)
    count = int(m["count"])
    parts = tuple(path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise InvalidModelFile(f"{path}: split model is missing part(s) {', '.join(missing)}; "
                               "download every part into the same folder")
    return parts


def is_later_part(path: Path) -> bool:
    m = SPLIT.match(path.name)
    return bool(m) and int(m["no"]) != 1


def gguf_files(folder: Path) -> list[Path]:
    """The GGUFs under a folder (sorted; later parts of split models left out)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.gguf") if p.is_file() and not is_later_part(p))


# -- Ollama -----------------------------------------------------------------------------------------
def ollama_reference(name: str) -> tuple[str, str, str, str]:
    """'llama3.2:3b' -> (registry, namespace, model, tag) as Ollama fills in the defaults."""
    model, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    parts = model.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, OLLAMA_NAMESPACE] + parts
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY] + parts
    if len(parts) != 3 or not all(parts) or not tag or not all(_plain(x) for x in parts + [tag]):
        raise ModelNotFound(f"ollama:{name} is not an Ollama model name; write ollama:NAME[:TAG], e.g. "
                            "ollama:llama3.2:3b (or ollama:NAMESPACE/NAME:TAG)")
    return parts[0], parts[1], parts[2], tag


def _plain(part: str) -> bool:
    """A name that stays one folder level down when joined to a path: not '.', '..', absolute or with a
    separator (so that a model name can never reach outside its store)."""
    return part not in (".", "..") and not any(c in part for c in "/\\\0") and not part.startswith("~")


def _inside(path: Path, root: Path) -> bool:
    """`path`, its links followed, lies under `root` (its links followed)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def ollama_name(registry: str, namespace: str, model: str, tag: str) -> str:
    """The short name Ollama shows (library models without registry and namespace)."""
    if registry == OLLAMA_REGISTRY:
        base = model if namespace == OLLAMA_NAMESPACE else f"{namespace}/{model}"
    else:
        base = f"{registry}/{namespace}/{model}"
    return f"{base}:{tag}"


def read_ollama_manifest(root: Path, manifest: Path) -> Found:
    """The model blob an Ollama manifest names, checked to be there and to be GGUF."""
    rel = manifest.relative_to(root / "manifests").parts
    label = "ollama:" + (ollama_name(*rel) if len(rel) == 4 else "/".join(rel))
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
        layers = doc["layers"]
        layer = next(x for x in layers if x.get("mediaType") == OLLAMA_MODEL_LAYER)
        digest = str(layer["digest"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InvalidModelFile(f"{label}: Ollama manifest {manifest} is not readable JSON with layers; "
                               f"run `ollama pull {label[7:]}` again") from None
    except StopIteration:
        raise InvalidModelFile(f"{label}: Ollama manifest {manifest} has no model layer "
                               f"({OLLAMA_MODEL_LAYER}); it is not a model llama.cpp can load") from None
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise InvalidModelFile(f"{label}: Ollama manifest {manifest} names a malformed blob digest {digest!r}; "
                               f"run `ollama pull {label[7:]}` again")
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise InvalidModelFile(f"{label}: the model blob {blob.name} its manifest names is missing from {blob.parent}; "
                               f"run `ollama pull {label[7:]}` again")
    with open(blob, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InvalidModelFile(f"{label}: the model blob {blob} is not GGUF (starts with {magic!r}); only GGUF "
                               "models can be loaded")
    return Found(blob, "ollama", label, (blob,), digest)


def _ollama_manifests(root: Path) -> list[Path]:
    base = root / "manifests"
    if not base.is_dir():
        return []
    return sorted(p for p in base.glob("*/*/*/*") if p.is_file())


# -- the listing --------------------------------------------------------------------------------------
def _hf_repo_files(repo_dir: Path) -> list[tuple[str, Path]]:
    """(relative file name, path) of the GGUFs in a hub-cache repo's current snapshot."""
    snaps = repo_dir / "snapshots"
    if not snaps.is_dir():
        return []
    rev = None
    try:
        rev = (repo_dir / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        pass
    if rev and not (_plain(rev) and _inside(snaps / rev, snaps)):  # a revision names a folder in snapshots/
        rev = None
    dirs = [snaps / rev] if rev and (snaps / rev).is_dir() else \
        sorted((d for d in snaps.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)[:1]
    return [(p.relative_to(dirs[0]).as_posix(), p) for d in dirs for p in gguf_files(d)]


def _hf_repos(root: Path) -> list[tuple[str, Path]]:
    if not root.is_dir():
        return []
    return [(d.name[len("models--"):].replace("--", "/"), d) for d in sorted(root.glob("models--*")) if d.is_dir()]


def _found(path: Path, store: str, source: str) -> Found:
    return Found(path, store, source, split_parts(path))


def scan(env=os.environ, home: Path | None = None, problems: list | None = None) -> list[Found]:
    """Every model in the enabled stores. A broken entry (a manifest, a missing part) is left out of the list,
    and (store, path, message) appended to `problems`."""
    out: list[Found] = []

    def add(store, where, make, *args):
        try:
            out.append(make(*args))
        except (InvalidModelFile, ModelNotFound) as e:
            if problems is not None:
                problems.append((store, where, str(e)))

    for store, roots in store_roots(env, home).items():
        for root in roots:
            if store == "ollama":
                for m in _ollama_manifests(root):
                    add(store, m, read_ollama_manifest, root, m)
            elif store == "lmstudio":
                for p in gguf_files(root):
                    add(store, p, _found, p, store, "lmstudio:" + p.relative_to(root).as_posix())
            else:
                for repo, d in _hf_repos(root):
                    for rel, p in _hf_repo_files(d):
                        add(store, p, _found, p, store, f"hf:{repo}:{rel}")
                if store == "llama.cpp" and root.is_dir():
                    for p in sorted(q for q in root.glob("*.gguf") if q.is_file() and not is_later_part(q)):
                        add(store, p, _found, p, store, p.name.removesuffix(".gguf"))
    return out


# -- resolving a store name -----------------------------------------------------------------------------
def _one(name: str, candidates: list[Found], what: str, fix: str) -> Found:
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelNotFound(f"no {what} matches {name}; {fix}")
    listed = ", ".join(c.source for c in candidates)
    raise ModelNotFound(f"{name} is ambiguous: it matches {len(candidates)} models ({listed}); pass one of these names")


def resolve_store_name(name: str, env=os.environ, home: Path | None = None) -> Found:
    """ollama:..., hf:..., lmstudio:... -> the model, or ModelNotFound / InvalidModelFile saying why."""
    kind, _, rest = name.partition(":")
    kind = kind.lower()
    store = {"ollama": "ollama", "hf": "hf", "lmstudio": "lmstudio"}[kind]
    if store not in enabled_stores(env):
        raise ModelNotFound(f"{name}: the {store} store is turned off by LLAMALENS_STORES; add {store} to it")
    roots = ROOTS[store](env, home)
    where = ", ".join(str(r) for r in roots)
    if kind == "ollama":
        reg, ns, model, tag = ollama_reference(rest)
        for root in roots:
            manifest = root / "manifests" / reg / ns / model / tag
            if manifest.is_file() and _inside(manifest, root / "manifests"):
                return read_ollama_manifest(root, manifest)
        raise ModelNotFound(f"{name}: Ollama has no model {ollama_name(reg, ns, model, tag)} (looked in {where}); "
                            f"run `ollama pull {ollama_name(reg, ns, model, tag)}` or `llamalens models` to list what is there")
    if kind == "hf":
        repo, _, pick = rest.partition(":")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelNotFound(f"{name} is not a Hugging Face name; write hf:ORG/REPO[:QUANT or :FILE]")
        found = []
        for root in roots + llama_cache_roots(env, home) * ("llama.cpp" in enabled_stores(env)):
            d = root / ("models--" + repo.replace("/", "--"))
            for rel, p in _hf_repo_files(d) if d.is_dir() else []:
                found.append(_found(p, "hf" if root in roots else "llama.cpp", f"hf:{repo}:{rel}"))
        if not found:
            raise ModelNotFound(f"{name}: {repo} has no GGUF in the Hugging Face cache ({where}); llamalens never "
                                f"downloads: fetch it first with `huggingface-cli download {repo}`")
        if pick:
            low = pick.lower()
            exact = [f for f in found if f.source.split(":", 2)[2].lower() in (low, low + ".gguf")
                     or f.path.name.lower() in (low, low + ".gguf")]
            found = exact or [f for f in found if low in f.path.name.lower()]
        return _one(name, found, f"GGUF in {repo}", f"the cached files are {', '.join(p.path.name for p in found)}"
                    if found else "run `llamalens models` to list the cached files")
    parts = rest.strip("/").split("/")
    if len(parts) not in (2, 3) or not all(parts) or not all(_plain(x) for x in parts):
        raise ModelNotFound(f"{name} is not an LM Studio name; write lmstudio:PUBLISHER/REPO[/FILE.gguf]")
    found = []
    for root in roots:
        d = root.joinpath(*parts[:2])
        if len(parts) == 3:
            p = d / parts[2]
            if p.is_file():
                return _found(p, "lmstudio", "lmstudio:" + "/".join(parts))
        else:
            found += [_found(p, "lmstudio", "lmstudio:" + p.relative_to(root).as_posix()) for p in gguf_files(d)]
    return _one(name, found, "LM Studio model", f"looked in {where}; run `llamalens models` to list the models there")
