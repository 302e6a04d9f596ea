"""Write a tiny, deterministic llama-architecture GGUF with the `gguf` package (for fast tests).

2 layers, 64 dims, 4 heads, a 312-token SentencePiece-style vocabulary: <unk>, <s>, </s>, the 256
byte tokens <0x00>..<0xFF>, and 53 word pieces. Byte token <0x61> and the piece "a" both decode
to "a": two different ids with the same text, which llama-cpp-python's string-keyed top_logprobs
merges and we must keep apart. Weights are seeded random normals, so logits are spread enough to
make sampling settings matter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ["▁", "▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁dog", "▁and", "▁is", "▁of", "▁to", "▁in", "▁it",
         "▁he", "▁she", "▁was", "▁hello", "▁world", "ing", "ed", "er", "▁I", "'", ",", ".", "!", "?", "a", "e",
         "i", "o", "u", "s", "t", "n", "r", "l", "d", "h", "m", "c", "▁a", "▁b", "▁c", "▁d", "▁f", "▁g", "▁m",
         "▁p", "▁s", "▁w", "▁Pre", "▁post"]
N_VOCAB = 3 + 256 + len(WORDS)  # 312

# A chat template in the style of real ones: BOS and EOS from the variables, block tags indented on their own
# lines (so trim_blocks / lstrip_blocks change the output), a loop, a filter, and raise_exception.
TINY_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'tool' %}
    {{- raise_exception('a conversation cannot start with a tool message') }}
{%- endif %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
[sys] {{ message['content'] | trim }}
    {% elif message['role'] == 'user' %}
[user] {{ message['content'] }}{{ eos_token }}
    {% else %}
[bot] {{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[bot]
{%- endif %}"""


def write_tiny_gguf(path: str | Path, seed: int = 0, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                    n_ff: int = 128, ctx: int = 512, file_type_tag: str = "tiny", n_vocab: int = N_VOCAB,
                    pooling_type: int | None = None, causal: bool = True, chat_template: str | None = None,
                    split_max_tensors: int = 0, byte_tokens: bool = True, tied_pairs: bool = False,
                    eos_boost: float = 0.0) -> Path:
    """`n_vocab` > 312 appends synthetic pieces "▁x0", "▁x1", ... (for benchmarks at a realistic size).
    `pooling_type` (llama_pooling_type) and `causal=False` make it look like an embedding model.
    `chat_template` is written as tokenizer.chat_template (a Jinja chat template, e.g. TINY_CHAT_TEMPLATE).
    `split_max_tensors` > 0 writes a split model, NAME-0000k-of-0000n.gguf (returns the first part).
    `byte_tokens=False` leaves out the 256 byte tokens: a 56-token vocabulary, small enough for a beam per
    token (exhaustive-search tests); it tokenizes only text made of its word pieces.
    `tied_pairs=True` gives tokens 2i and 2i+1 the same output row: every logit has an equal twin (ties).
    `eos_boost` > 0 adds that multiple of the mean of the word pieces' output rows to EOS's row: the model then
    ends its text often (beam hypotheses that finish on end-of-generation)."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    w.add_name(f"llamalens {file_type_tag} test model")
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all F32
    if pooling_type is not None:
        w.add_pooling_type(gguf.PoolingType(pooling_type))
    if not causal:
        w.add_causal_attention(False)
    words = WORDS + [f"▁x{i}" for i in range(n_vocab - N_VOCAB)]
    n_bytes = 256 if byte_tokens else 0
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(n_bytes)] + words
    types = [2, 3, 3] + [6] * n_bytes + [1] * len(words)
    # longer pieces score higher so that SPM merges prefer them
    scores = [0.0, 0.0, 0.0] + [-1000.0] * n_bytes + [float(len(t)) - i * 0.001 for i, t in enumerate(words)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def t(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", t(len(tokens), n_embd, scale=1.0))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    out = t(len(tokens), n_embd, scale=0.5)
    if tied_pairs:
        out[1::2] = out[0::2][: len(tokens) // 2]
    if eos_boost:
        out[2] += eos_boost * out[3 + n_bytes:].sum(axis=0) / np.sqrt(len(words))
    w.add_tensor("output.weight", out)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", t(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", t(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", t(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return sorted(path.parent.glob(path.stem + "-00001-of-*.gguf"))[0]
    return path
