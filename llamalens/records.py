"""Typed records at the boundaries: what the engine yields and what every command prints or stores.

llama-cpp-python's nested dicts (string-keyed `top_logprobs`, np.float32 values) are converted
nowhere: the engine reads raw logits and fills these records directly. Token text is kept twice:
`bytes` (hex, exact: a token may be a partial UTF-8 sequence) and `text` (UTF-8 decoded with
U+FFFD for invalid bytes, for display only). Alternatives are keyed by token id, never by text.

A run's stored description is typed too: RunOptions (what was generated), Hardware (where), and
StoredSample (one planned sample and, once done, its outcome); store.RunInfo holds them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from llamalens.settings import ModelOptions


def token_text(raw: bytes) -> tuple[str, str]:
    """A token's (display text, exact bytes as hex): the text is UTF-8 with U+FFFD for invalid bytes
    (a token may be part of a character), the hex keeps every byte."""
    return raw.decode("utf-8", errors="replace"), raw.hex()


@dataclass(frozen=True)
class Alternative:
    """One of the most likely next tokens in the raw distribution."""

    id: int
    text: str
    bytes: str  # hex
    logprob: float

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)


def alternatives(text_of, ids, logprobs) -> list[Alternative]:
    """Alternatives from parallel arrays of token ids and logprobs; text_of(id) -> (text, hex), Model.token_text."""
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    logprobs = logprobs.tolist() if hasattr(logprobs, "tolist") else logprobs
    return [Alternative(int(i), *text_of(int(i)), float(lp)) for i, lp in zip(ids, logprobs)]


class _WithProbs:
    """`prob` and a `to_dict` that adds probabilities next to logprobs (for tokens with `top` alternatives)."""

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d.get("blocked", True):  # no-repeat-ngram banned nothing here: the record reads as before it existed
            del d["blocked"]
        if "renyi" in d and d["renyi"] is None:  # a record made without its full row (a beam's, an older store's)
            del d["renyi"]
        d["prob"] = self.prob
        for a in d["top"]:
            a["prob"] = math.exp(a["logprob"])
        return d


# the columns of a to_pandas() token table (Sample, Score): attribute names, `id` as token_id
TOKEN_FRAME = ["position", "token_id", "text", "bytes", "logprob", "prob", "rank", "entropy"]


def token_frame(tokens, extra: tuple[str, ...] = ()):
    """Token records as a pandas DataFrame: TOKEN_FRAME's columns, then `extra` attributes."""
    import pandas as pd

    cols = TOKEN_FRAME + list(extra)
    return pd.DataFrame([[getattr(t, "id" if c == "token_id" else c) for c in cols] for t in tokens], columns=cols)


HTML_DISPLAY: list = []  # the renderer of Rich results, (kind, obj) -> HTML; set by the package (llamalens/__init__.py)


class Rich:
    """Rich display in Jupyter / VS Code: `_repr_html_` is the report's own rendering (reports/notebook.py)
    of the result kind named by `_display`. Records sit below the reports, so the renderer is handed in
    (HTML_DISPLAY) by the package that wires the layers, not imported from here."""

    _display = ""

    def _repr_html_(self) -> str | None:
        return HTML_DISPLAY[0](self._display, self) if HTML_DISPLAY else None


@dataclass
class TokenRecord(_WithProbs):
    """One generated (or scored) token and what the model thought when it chose it."""

    position: int  # 0-based index in the generated sequence
    id: int
    text: str
    bytes: str  # hex of the token's exact bytes
    logprob: float  # log-softmax of the raw logits (pre-sampler), as llama-cpp-python reports
    sampled_logprob: float  # log p in the distribution actually sampled from; 0.0 when greedy
    rank: int  # 1-based rank of this token in the raw distribution
    entropy: float  # nats, of the full raw distribution
    candidates: int  # tokens that survived the truncating samplers (1 when greedy)
    top: list[Alternative] = field(default_factory=list)
    eog: bool = False  # an end-of-generation token: it ended the sample and is not part of `text`
    blocked: list[int] = field(default_factory=list)  # ids no-repeat-ngram banned here (kept in samples.extra)
    # D_1/2(raw distribution || uniform) in nats, over the full row (core/confidence.py); None where not recorded
    renyi: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "TokenRecord":
        d = {k: v for k, v in d.items() if k != "prob"}
        d["top"] = [Alternative(**{k: v for k, v in a.items() if k != "prob"}) for a in d.get("top", [])]
        return cls(**d)


@dataclass
class Timing:
    prompt_tokens: int
    generated_tokens: int
    prompt_ms: float  # prefill, or copying a shared prompt's cache
    first_token_ms: float  # from the request's start to its first sampled token
    total_ms: float

    @property
    def tokens_per_s(self) -> float:
        gen_ms = self.total_ms - self.first_token_ms
        n = self.generated_tokens - 1
        return n / gen_ms * 1000.0 if n > 0 and gen_ms > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Timing":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass
class Sample(Rich):
    """One generated completion: its settings, its tokens, and how it ended.

    to_pandas(): one row per token (TOKEN_FRAME, then sampled_logprob, candidates, eog); in a notebook the
    text shows coloured by probability, each token's alternatives on hover."""

    _display = "sample"

    prompt: str
    prompt_token_ids: list[int]
    settings: dict
    max_tokens: int
    text: str
    finish_reason: str  # "stop" (end of generation or a stop string), "length", or "grammar" (it allowed no token)
    tokens: list[TokenRecord]
    timing: Timing
    key: object = None  # the caller's handle (a sweep's sample index)
    grammar_removed: list[float] | None = None  # per token, the raw mass a grammar forbade (None: no grammar)

    def to_dict(self) -> dict:
        tokens = [t.to_dict() for t in self.tokens]
        for t, removed in zip(tokens, self.grammar_removed or []):
            t["grammar_removed"] = removed
        return {
            "prompt": self.prompt,
            "prompt_tokens": len(self.prompt_token_ids),
            "settings": self.settings,
            "max_tokens": self.max_tokens,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "tokens": tokens,
            "timing": self.timing.to_dict(),
        }

    def to_pandas(self):
        return token_frame(self.tokens, ("sampled_logprob", "candidates", "eog"))

    def __repr__(self) -> str:
        return (f"<Sample {len(self.tokens)} tokens, finish {self.finish_reason}: "
                f"{self.prompt[-40:]!r} + {self.text[:60]!r}>")


@dataclass
class ScoredToken(_WithProbs):
    """One token of a given text, teacher-forced: what the model thought of it before seeing it."""

    position: int  # 0-based index among the text's tokens (BOS not counted)
    id: int
    text: str
    bytes: str  # hex
    logprob: float  # log-softmax of the raw logits at the previous position
    rank: int
    entropy: float
    top: list[Alternative] = field(default_factory=list)


def _known(cls, d: dict | None) -> dict:
    """The keys of a stored dict that are fields of cls (a store from another version may have more or fewer)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (d or {}).items() if k in names}


@dataclass(frozen=True)
class RunOptions:
    """What a sweep generates, as recorded with the run (the grid itself is in the run's configs)."""

    max_tokens: int = 32
    n_logprobs: int = 5
    stop: tuple[str, ...] = ()
    exact: bool = False
    parallel: int = 32  # sequences per llama_decode call (1 when exact)
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    model_options: ModelOptions = ModelOptions()
    chats: tuple[dict, ...] = ()  # per prompt, the chat.ChatPrompt it was rendered from (empty: raw prompts)
    grammar: dict | None = None  # grammar.GrammarSpec.to_dict() constraining every sample (None: none)

    @classmethod
    def from_dict(cls, d: dict | None) -> "RunOptions":
        k = _known(cls, d)
        for name in ("stop", "prompts", "seeds", "chats"):
            if name in k:
                k[name] = tuple(k[name])
        k["model_options"] = ModelOptions.from_dict(k.get("model_options"))
        return cls(**k)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("chats", "grammar"):  # left out when unused, so a run of raw prompts reads as before
            if not d[name]:
                del d[name]
        return d


@dataclass(frozen=True)
class Hardware:
    """Where a run was computed: threads, offload, flash attention, and llama.cpp's own build description."""

    threads: int | None = None
    gpu_layers: int = 0
    flash_attn: str = "auto"
    machine: str = ""
    system: str = ""
    llama_cpp_system_info: str = ""  # llama_print_system_info(): the CPU features the build uses
    cmake_args: str | None = None  # the flags scripts/install.sh built llama-cpp-python with (None: unknown)
    workers: int = 1  # processes that decoded the run (more than one: on Ray, llamalens/run/ray.py)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Hardware":
        return cls(**_known(cls, d))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StoredSample:
    """One planned sample of a run: its place in the grid, and once done, its text and timing."""

    sample_idx: int
    prompt_idx: int
    config_idx: int
    seed: int
    prompt: str
    status: str  # 'pending' or 'done'
    text: str | None = None
    finish_reason: str | None = None
    timing: Timing | None = None
    completed: float | None = None  # unix time the sample was committed
    extra: dict | None = None  # what the run's kind records of this sample beyond its tokens (store.py)
