import json
import struct

import pytest

from llamalens.errors import InvalidModelFile, ModelNotFound
from llamalens.modelfiles.gguf_header import ArraySummary, read_header
from llamalens.modelfiles.find import model_info
from tiny_gguf import N_VOCAB


def test_header_of_tiny_model(tiny_path):
    h = read_header(tiny_path)
    assert h.architecture == "llama"
    assert h.vocab_size == N_VOCAB
    assert isinstance(h.get("tokenizer.ggml.tokens"), ArraySummary)
    assert h.arch_key("block_count") == 2
    assert len(h.tensors) == 3 + 2 * 9
    emb = next(t for t in h.tensors if t.name == "token_embd.weight")
    assert emb.shape == (64, N_VOCAB) and emb.n_bytes == 64 * N_VOCAB * 4
    # the last tensor ends exactly at the end of the file (after alignment padding at most)
    end = max(h.data_offset + t.offset + t.n_bytes for t in h.tensors)
    assert h.file_size - 32 < end <= h.file_size


def test_model_info_from_header(tiny_path):
    info = model_info(tiny_path)
    assert (info.architecture, info.quantization, info.vocab_size, info.context_length) == ("llama", "ALL_F32", N_VOCAB, 512)
    assert info.n_params == N_VOCAB * 64 * 2 + 64 + 2 * (64 * 2 + 4 * 64 * 64 + 3 * 64 * 128)


def test_truncated_file_is_refused(tiny_path, tmp_path):
    data = tiny_path.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InvalidModelFile, match="truncated.*output.weight|truncated: tensor"):
        read_header(bad)
    bad.write_bytes(data[:5000])  # cut inside the metadata
    with pytest.raises(InvalidModelFile, match="truncated or corrupt"):
        read_header(bad)


def test_wrong_magic_and_short_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(InvalidModelFile, match="not a GGUF model.*expected b'GGUF'"):
        read_header(f)
    f.write_bytes(b"GGUF")
    with pytest.raises(InvalidModelFile, match="too short"):
        read_header(f)


def test_corrupt_counts(tmp_path, tiny_path):
    data = bytearray(tiny_path.read_bytes())
    struct.pack_into("<Q", data, 8, 2**60)  # tensor count
    f = tmp_path / "c.gguf"
    f.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFile, match="corrupt GGUF header"):
        read_header(f)


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        read_header(tmp_path / "nope.gguf")


def test_header_cache_hit_equals_parse_and_follows_changes(tiny_path, tmp_path, monkeypatch):
    """The cached header is the parsed one; a file changed in place (same size) is read again; a file cut
    after it was cached is still refused; an unwritable cache is ignored."""
    import os

    from llamalens.modelfiles.gguf_header import parse_header

    monkeypatch.setenv("LLAMALENS_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    data = bytearray(tiny_path.read_bytes())
    f.write_bytes(bytes(data))
    first = read_header(f)
    assert len(list((tmp_path / "cache" / "headers").glob("*.json"))) == 1
    again = read_header(f)
    ref = parse_header(f)
    assert (again.metadata, again.tensors, again.data_offset, again.file_size, again.version) == (
        ref.metadata, ref.tensors, ref.data_offset, ref.file_size, ref.version)
    assert first.metadata == again.metadata and isinstance(again.get("tokenizer.ggml.tokens"), ArraySummary)
    # the same size, one metadata value changed (block_count 2 -> 3), mtime kept: the content hash tells
    at = data.index(b"llama.block_count") + len(b"llama.block_count") + 4  # key, then the u32 value type
    st = os.stat(f)
    data[at] = 3
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert read_header(f).arch_key("block_count") == 3
    f.write_bytes(bytes(data[: len(data) - 1000]))
    with pytest.raises(InvalidModelFile, match="truncated"):
        read_header(f)
    monkeypatch.setattr("llamalens.modelfiles.gguf_header.CACHE_MAX", 2)  # the folder keeps the most recent headers only
    for i in range(3):
        (tmp_path / f"copy{i}.gguf").write_bytes(tiny_path.read_bytes())
        read_header(tmp_path / f"copy{i}.gguf")
    assert len(list((tmp_path / "cache" / "headers").glob("*.json"))) == 2
    (tmp_path / "ro").write_text("a file where the cache folder should be")
    monkeypatch.setenv("LLAMALENS_CACHE_DIR", str(tmp_path / "ro"))
    assert read_header(tiny_path).vocab_size == N_VOCAB


def test_quantize_writes_the_asked_type(gemma_q8_path, tmp_path):
    """ll.quantize (llama.cpp's quantizer) writes the file type asked for; the header is read back with the
    gguf package (not llamalens's reader); a name it does not know and a corrupt source are clear errors."""
    import gguf

    import llamalens as ll
    from llamalens.errors import InvalidInput

    reader = gguf.GGUFReader(str(gemma_q8_path))  # conftest's Q8_0 copy, made by ll.quantize
    field = reader.fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    with pytest.raises(InvalidInput, match="Q8_0, Q5_0"):
        ll.quantize(gemma_q8_path, tmp_path / "x.gguf", "Q9_9")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gemma_q8_path.read_bytes()[:4096])
    with pytest.raises(InvalidModelFile):
        ll.quantize(bad, tmp_path / "y.gguf", "Q8_0")
    assert not (tmp_path / "y.gguf").exists()


def test_quantize_command(tiny_path, tmp_path):
    """`llamalens quantize SRC DST TYPE`: the file in the type asked for; from a quantized source, a note that the
    result is no better a reference than it; an existing DST, a folder that is not there and an unknown type are
    refused before any work, and no half file is left."""
    from clirun import cli

    q8, q4 = tmp_path / "t-q8_0.gguf", tmp_path / "t-q4_0.gguf"
    out = json.loads(cli("quantize", tiny_path, q8, "q8_0", "--threads", 1, "--json").stdout)
    assert read_header(q8).get("general.file_type") == 7 and out["type"] == "Q8_0" and out["note"] is None
    res = cli("quantize", q8, q4, "Q4_0")
    assert read_header(q4).get("general.file_type") == 2
    assert "note: the source is itself quantized (Q8_0)" in res.output and "no better a reference" in res.output
    for args, words in [((q8, q4, "Q4_0"), "exists"), ((q8, tmp_path / "no" / "x.gguf", "Q4_0"), "does not exist"),
                        ((q8, tmp_path / "x.gguf", "Q9_9"), "not one llamalens makes")]:
        res = cli("quantize", *args, ok=False)
        assert res.exit_code == 1 and words in res.output and "Traceback" not in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-q4_0.gguf", "t-q8_0.gguf"]
