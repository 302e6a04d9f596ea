"""Embeddings of texts, and how alike they are (cosine similarity).

    texts ──► tokens (as llama.cpp's embedding tools: the model's BOS/EOS added, special text not parsed)
          ──► one embeddings context (pooling NONE): every token's final hidden state
              one text per llama_decode by default, so a text's vector never depends on the others;
              --parallel N packs N texts into each decode (faster, vectors move by batch noise)
          ──► pooled in numpy ──► EmbeddingSet: vectors, cosine matrix, nearest neighbours, ranking

Pooling (how one vector is made from the token vectors):
  mean      the mean over the text's own tokens, without the BOS/EOS the tokenizer adds. The default
            for generative models: in a causal model the BOS vector is the same for every text (an
            attention sink with a large norm), and averaging it in pulls every pair together
            (Gemma 3 270M: cos(king, man) 0.63 with it, 0.42 without).
  mean-all  the mean over every token, BOS included: llama.cpp's MEAN pooling, what llama-server and
            llama-cpp-python's `Llama(embedding=True).embed()` return.
  last      the last token's vector (llama.cpp's LAST pooling; what decoder embedders use).
  first     the first token's vector (llama.cpp's CLS pooling, for BERT-style encoders). Refused for a
            causal model that adds BOS: every text would get the same vector.
  model     the pooling the GGUF declares (`<arch>.pooling_type`: embedding models such as BGE or
            nomic-embed); for a model that declares none, `mean`.
Each is computed from the same per-token vectors llama.cpp returns, and the tests check `mean-all` and
`last` against llama-cpp-python's pooled output.

A text must fit the context: a text longer than --ctx is an error naming it, never silently truncated
(llama-cpp-python's embed() truncates). llama.cpp computes every token's logits even in embeddings mode
(about 2.3× the time of a plain prefill on Gemma's 262k vocabulary), so a causal model's long text is
decoded in --batch chunks to keep memory at batch × vocabulary floats; an encoder's text is one decode.
Vectors are kept as float32 n_texts × n_embd; cosine similarity is computed in float64.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from llamalens.errors import InvalidArgument, InvalidInput, InvalidSettings, PromptTooLong
from llamalens.core.runtime import Model

POOLINGS = ("mean", "mean-all", "last", "first", "model")
_DECLARED = {1: "mean-all", 2: "first", 3: "last"}  # llama_pooling_type -> ours (0 = none, 4 = rank)


@dataclass
class EmbeddingSet:
    """Pooled vectors of some texts from one model, and what they say about each other."""

    model: dict
    pooling: str
    texts: list[str]
    n_tokens: list[int]
    vectors: np.ndarray  # float32, (len(texts), n_embd), not normalized
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    parallel: int = 1  # texts per decode (1: each vector independent of the other texts)

    def unit(self) -> np.ndarray:
        v = self.vectors.astype(np.float64)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.where(norms == 0, 1.0, norms)

    @functools.cached_property
    def _cosine(self) -> np.ndarray:
        u = self.unit()
        c = np.clip(u @ u.T, -1.0, 1.0)
        c.setflags(write=False)
        return c

    def cosine(self) -> np.ndarray:
        """The cosine similarity of every pair (float64, 1 on the diagonal; computed once, read-only)."""
        return self._cosine

    def nearest(self) -> list[tuple[int, float]]:
        """For each text, the most similar other text and their cosine (-1, nan without others)."""
        c = self.cosine().copy()
        np.fill_diagonal(c, -np.inf)
        out = []
        for i in range(len(self.texts)):
            j = int(np.argmax(c[i])) if len(self.texts) > 1 else -1
            out.append((j, float(c[i, j]) if j >= 0 else float("nan")))
        return out

    def pairs(self, n: int = 20) -> list[tuple[int, int, float]]:
        """The n most similar pairs (i < j), most similar first."""
        c = self.cosine()
        i, j = np.triu_indices(len(self.texts), k=1)
        order = np.argsort(-c[i, j], kind="stable")[:n]
        return [(int(i[k]), int(j[k]), float(c[i[k], j[k]])) for k in order]

    def rank(self, query: np.ndarray) -> list[tuple[int, float]]:
        """Texts by cosine similarity to a query vector, most similar first."""
        q = query.astype(np.float64)
        q = q / (np.linalg.norm(q) or 1.0)
        sims = self.unit() @ q
        order = np.argsort(-sims, kind="stable")
        return [(int(k), float(sims[k])) for k in order]

    def to_dict(self, vectors: bool = False) -> dict:
        d = {"model": self.model, "pooling": self.pooling, "n_embd": int(self.vectors.shape[1]),
             "texts": [{"text": t, "tokens": n, "norm": float(np.linalg.norm(v.astype(np.float64)))}
                       for t, n, v in zip(self.texts, self.n_tokens, self.vectors)],
             "cosine": self.cosine().round(6).tolist(), "seconds": self.seconds, "parallel": self.parallel,
             "notes": self.notes}
        if vectors:
            for t, v in zip(d["texts"], self.vectors):
                t["vector"] = [float(x) for x in v]
        return d


def declared_pooling(model: Model) -> str | None:
    """The pooling the GGUF declares, as one of POOLINGS (None when it declares none)."""
    value = model.header.arch_key("pooling_type")
    if value is None or int(value) == 0:
        return None
    if int(value) not in _DECLARED:
        raise InvalidSettings(f"{model.path.name} declares pooling type {value} (a reranker's classification head); "
                              "llamalens embeds with mean, last or first pooling only")
    return _DECLARED[int(value)]


def is_causal(model: Model) -> bool:
    return bool(model.header.arch_key("attention.causal", True))


def resolve_pooling(model: Model, pooling: str) -> str:
    """Check a --pooling value against the model; 'model' becomes what the model declares (or mean)."""
    if pooling not in POOLINGS:
        raise InvalidSettings(f"--pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    if pooling == "model":
        pooling = declared_pooling(model) or "mean"
    if pooling == "first" and is_causal(model) and model.add_bos:
        raise InvalidSettings(f"--pooling first takes the first token's vector, and {model.path.name} is a causal model "
                              "that starts every text with BOS: every text would get the same vector. "
                              "Use --pooling mean or last")
    return pooling


def text_tokens(model: Model, text: str) -> tuple[list[int], slice]:
    """A text's tokens as llama.cpp's embedding tools make them, and the slice that is the text itself
    (without the BOS/EOS/SEP the tokenizer adds)."""
    full = model.tokenize(text, add_bos=True, special=False)
    body = model.tokenize(text, add_bos=False, special=False)
    for k in range(len(full) - len(body) + 1):
        if full[k:k + len(body)] == body:
            return full, slice(k, k + len(body))
    return full, slice(0, len(full))  # the tokenizer merged across the added tokens: use them all


def pool(rows: np.ndarray, own: slice, pooling: str) -> np.ndarray:
    """One vector from a text's token vectors (float64 accumulation, float32 result)."""
    if pooling == "mean":
        sel = rows[own] if own.stop > own.start else rows
        return sel.astype(np.float64).mean(axis=0).astype(np.float32)
    if pooling == "mean-all":
        return rows.astype(np.float64).mean(axis=0).astype(np.float32)
    if pooling == "last":
        return rows[-1].copy()
    if pooling == "first":
        return rows[0].copy()
    raise InvalidSettings(f"unknown pooling {pooling!r}")


def check_request(texts: list[str], query: str | None = None) -> None:
    """What a comparison needs (two texts, or a query and one text or more), checked before loading a model."""
    if texts:
        check_texts(texts)  # a list of texts, before the query is put in front of it
    if query is None and len(texts) < 2:
        raise InvalidInput(f"give at least two texts to compare (got {len(texts)}), or --query and one text or more")
    if query is not None and not texts:
        raise InvalidInput("--query needs texts to rank: give them as arguments or with --file")
    check_texts(([query] if query is not None else []) + list(texts))


@dataclass
class Ranking:
    """Texts ranked by cosine similarity to a query: (index into the texts, cosine), most similar first."""

    query: str
    vector: np.ndarray
    order: list[tuple[int, float]]

    def to_dict(self, texts: list[str], vectors: bool = False) -> dict:
        d = {"text": self.query, "ranking": [{"index": k, "text": texts[k], "cosine": c} for k, c in self.order]}
        if vectors:
            d["vector"] = [float(x) for x in self.vector]
        return d


def rank_by_query(model: Model, query: str, texts: list[str], pooling: str = "model", parallel: int = 1,
                  on_progress: Callable[[int, int], None] | None = None) -> tuple["EmbeddingSet", Ranking]:
    """Embed the query with the texts (one set, the same pooling) and rank the texts by similarity to it."""
    check_texts(texts)
    both = embed_texts(model, [query] + list(texts), pooling, parallel, on_progress)
    qvec = both.vectors[0]
    es = replace(both, texts=both.texts[1:], n_tokens=both.n_tokens[1:], vectors=both.vectors[1:])
    return es, Ranking(query, qvec, es.rank(qvec))


def check_texts(texts: list[str]) -> None:
    """Refuse an empty list, an empty text, or what is not a list of texts (before any model is loaded)."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
        raise InvalidArgument(f"texts={texts!r:.40}: give a list of texts, e.g. [\"king\", \"queen\"] (one text "
                              "would be split into its characters)")
    if not all(isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise InvalidArgument(f"texts holds {type(bad).__name__} {bad!r:.40}; every text must be a str")
    if not texts:
        raise InvalidInput("no texts to embed; give at least one")
    for i, t in enumerate(texts, 1):
        if not t.strip():
            raise InvalidInput(f"text {i} is empty; every text needs at least one non-space character")


def _groups(lengths: list[int], n_seq: int, n_batch: int):
    """Consecutive texts packed into decodes of at most n_seq texts and n_batch tokens; a text longer than
    n_batch is a group of its own (decoded in chunks)."""
    group, used = [], 0
    for k, n in enumerate(lengths):
        if group and (len(group) >= n_seq or used + n > n_batch):
            yield group
            group, used = [], 0
        group.append(k)
        used += n
    if group:
        yield group


def embed_texts(model: Model, texts: list[str], pooling: str = "model", parallel: int = 1,
                on_progress: Callable[[int, int], None] | None = None) -> EmbeddingSet:
    """Embed each text: its tokens' final hidden states from llama.cpp, pooled.

    `parallel` texts share each llama_decode (1 = each text alone, vectors independent of the others).
    """
    check_texts(texts)
    if parallel < 1:
        raise InvalidSettings(f"--parallel {parallel} must be >= 1")
    pooling = resolve_pooling(model, pooling)
    tokenized = [text_tokens(model, t) for t in texts]
    longest = max(len(toks) for toks, _ in tokenized)
    limit = model.options.ctx
    for i, (toks, _) in enumerate(tokenized, 1):
        if len(toks) > limit:
            raise PromptTooLong(f"text {i} is {len(toks)} tokens but --ctx is {limit}; the whole text must fit the "
                                f"context: raise --ctx (the model was trained on {model.n_ctx_train}) or shorten it")
    # A decode holds `parallel` short texts, or one text. llama.cpp computes every output token's logits
    # even in embeddings mode, so a causal model's long text is decoded in --batch chunks (the KV cache
    # carries the context; llama.cpp itself splits a batch into ubatches this way): memory stays at
    # batch × vocabulary floats. A non-causal encoder needs the whole text in one decode.
    lengths = [len(toks) for toks, _ in tokenized]
    n_batch = min(longest, model.options.batch) if is_causal(model) else longest
    parallel = min(parallel, len(texts))
    if parallel > 1:
        n_batch = max(n_batch, min(model.options.batch, sum(lengths)))
    vectors = np.zeros((len(texts), model.n_embd), dtype=np.float32)
    t0 = time.perf_counter()
    with model.context(n_ctx=max(n_batch, longest, 16), n_seq_max=parallel, n_batch=n_batch, embeddings=True) as ctx:
        done = 0
        for group in _groups(lengths, ctx.n_seq_max, ctx.n_batch):
            ctx.clear()
            toks, pos, seqs = [], [], []
            for s, k in enumerate(group):
                tk = tokenized[k][0]
                toks += tk
                pos += range(len(tk))
                seqs += [s] * len(tk)
            rows = []  # a packed group fits one decode; a lone text longer than n_batch takes several
            for a in range(0, len(toks), ctx.n_batch):
                n = min(ctx.n_batch, len(toks) - a)
                ctx.decode(toks[a:a + n], pos[a:a + n], seqs[a:a + n], [1] * n)
                rows += [ctx.embedding(j) for j in range(n)]
            starts = np.cumsum([0] + [lengths[k] for k in group])
            for s, k in enumerate(group):
                vectors[k] = pool(np.stack(rows[starts[s]:starts[s + 1]]), tokenized[k][1], pooling)
            done += len(group)
            if on_progress:
                on_progress(done, len(texts))
    seconds = time.perf_counter() - t0
    notes = []
    if not np.all(np.isfinite(vectors)):
        notes.append("some vectors hold NaN or infinite values: the model's output overflowed")
    return EmbeddingSet(model.describe(), pooling, list(texts), [len(t) for t, _ in tokenized], vectors, seconds, notes,
                        parallel)
