"""Settings as typed records with their validation: SamplingSettings (how each token is chosen;
sampler.py builds the native chain from it) and ModelOptions (how a model is loaded and run).

The defaults are llama-cpp-python's `create_completion` defaults (temperature 0.8, top_k 40,
top_p 0.95, min_p 0.05, typical_p 1.0, repeat_penalty 1.0, 16 tokens), except the seed: llama-cpp-
python derives an unseeded call's seed from the previous call's, so results depend on call order;
llamalens always uses an explicit seed (default 0) and records it.

How the settings become a native llama.cpp chain, and in which order, is in sampler.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace

from .errors import InvalidSettings

FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # --flash-attn -> llama_context_params.flash_attn_type

# llama.cpp reads this seed as "pick a random one": never pass it on.
LLAMA_DEFAULT_SEED = 0xFFFFFFFF

# decoding strategies (issue 17)
STRATEGIES = ("sample", "greedy", "beam")
EARLY_STOPPING = ("false", "true", "never")
MAX_BEAMS = 64  # one KV sequence per beam (llama.cpp allows 256 in all)
MAX_BEST_OF = 64
CHAIN_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
                "presence_penalty", "penalty_last_n")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checked:
    """A settings record that lists its problems (each naming the allowed range) and can refuse them all at once."""

    def problems(self) -> list[str]:
        raise NotImplementedError

    def validate(self):
        problems = self.problems()
        if problems:
            raise InvalidSettings("; ".join(problems))
        return self


@dataclass(frozen=True)
class SamplingSettings(_Checked):
    temperature: float = 0.8  # 0 = greedy (argmax after penalties)
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    typical_p: float = 1.0  # 1.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64  # llama-cpp-python's last_n_tokens_size
    seed: int = 0
    # -- decoding strategy (issue 17): how a whole sequence is chosen; every field is a sweep axis ------
    # (beam.py; semantics of Hugging Face transformers' `generate`, differences stated there)
    strategy: str = "sample"  # sample: the chain above (temperature 0 = greedy); greedy; beam
    beams: int = 5  # beam: hypotheses kept per step (num_beams)
    length_penalty: float = 1.0  # beam: a hypothesis scores sum(logprob) / length ** length_penalty
    early_stopping: str = "false"  # beam: "true", "false" (HF's heuristic) or "never"
    num_return: int = 1  # beam: finished hypotheses returned, best first (num_return_sequences, <= beams)
    no_repeat_ngram: int = 0  # every strategy: no n-gram of prompt + output occurs twice (0 = off)
    best_of: int = 1  # sample: N draws, the one with the best sequence logprob is the sample
    best_of_by: str = "sum"  # sample: rank the draws by "sum" (sequence) or "mean" logprob
    # -- end of the decoding-strategy block ---------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.strategy == "greedy"

    def normalized(self) -> "SamplingSettings":
        """The same decoding with the fields it ignores at their defaults (a grid's product then holds no
        duplicates): greedy and beam ignore the sampler chain and seed-free best-of; sample ignores the
        beam fields; greedy is the chain at temperature 0."""
        d = SamplingSettings()
        beam_fields = dict(beams=d.beams, length_penalty=d.length_penalty, early_stopping=d.early_stopping,
                           num_return=d.num_return)
        chain = {f: getattr(d, f) for f in CHAIN_FIELDS if f != "temperature"}
        if self.strategy == "beam":
            return replace(self, **chain, temperature=0.0, best_of=1, best_of_by=d.best_of_by)
        out = replace(self, **beam_fields)
        if self.strategy == "greedy":
            out = replace(out, **chain, temperature=0.0, best_of=1, best_of_by=d.best_of_by)
        if out.best_of == 1:
            out = replace(out, best_of_by=d.best_of_by)
        return out

    def to_dict(self) -> dict:
        """All fields, except the decoding-strategy ones left at their defaults (so settings recorded before
        they existed read, and export, exactly as they did; from_dict fills them in)."""
        d = asdict(self)
        for f in STRATEGY_FIELDS:
            if d[f] == getattr(_DEFAULTS, f):
                del d[f]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def with_(self, **changes) -> "SamplingSettings":
        return replace(self, **changes)

    def problems(self) -> list[str]:
        """Each out-of-range value, named with its allowed range (empty when valid)."""
        out = []

        def bad(name, value, rule):
            out.append(f"{name.replace('_', '-')} {value!r} is out of range ({rule})")

        def finite(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not finite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "must be >= 0; 0 means greedy")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0; 0 turns it off")
        if not finite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]; 1 turns it off")
        if not finite(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "must be in [0, 1]; 0 turns it off")
        if not finite(self.typical_p) or not 0 <= self.typical_p <= 1:
            bad("typical_p", self.typical_p, "must be in [0, 1]; 1 turns it off")
        if not finite(self.repeat_penalty) or self.repeat_penalty <= 0:
            bad("repeat_penalty", self.repeat_penalty, "must be > 0; 1 turns it off")
        if not finite(self.frequency_penalty):
            bad("frequency_penalty", self.frequency_penalty, "must be a finite number")
        if not finite(self.presence_penalty):
            bad("presence_penalty", self.presence_penalty, "must be a finite number")
        if not isinstance(self.penalty_last_n, int) or self.penalty_last_n < -1:
            bad("penalty_last_n", self.penalty_last_n, "must be >= -1; -1 means the whole context")
        if not isinstance(self.seed, int) or not 0 <= self.seed < LLAMA_DEFAULT_SEED:
            bad("seed", self.seed, f"must be an integer in [0, {LLAMA_DEFAULT_SEED - 1}]")
        # decoding strategy (issue 17)
        if self.strategy not in STRATEGIES:
            bad("strategy", self.strategy, f"must be one of {', '.join(STRATEGIES)}")
        if not _int(self.beams) or not 1 <= self.beams <= MAX_BEAMS:
            bad("beams", self.beams, f"must be an integer in [1, {MAX_BEAMS}]")
        if not finite(self.length_penalty):
            bad("length_penalty", self.length_penalty, "must be a finite number; 0 = plain sum of logprobs")
        if self.early_stopping not in EARLY_STOPPING:
            bad("early_stopping", self.early_stopping, f"must be one of {', '.join(EARLY_STOPPING)}")
        if not _int(self.num_return) or not 1 <= self.num_return <= (self.beams if _int(self.beams) else 1):
            bad("num_return", self.num_return, "must be an integer in [1, beams]")
        if not _int(self.no_repeat_ngram) or self.no_repeat_ngram < 0:
            bad("no_repeat_ngram", self.no_repeat_ngram, "must be an integer >= 0; 0 turns it off")
        if not _int(self.best_of) or not 1 <= self.best_of <= MAX_BEST_OF:
            bad("best_of", self.best_of, f"must be an integer in [1, {MAX_BEST_OF}]")
        if self.best_of_by not in ("sum", "mean"):
            bad("best_of_by", self.best_of_by, "must be sum or mean")
        return out

    def label(self, seed: bool = True) -> str:
        """A short human label, e.g. 'T=0.7 k=40 p=0.95 min_p=0.05 seed=1' (without the seed: a sweep's
        configuration, whose seeds are an axis of their own)."""
        core = f"T={self.temperature:g}{' (greedy)' if self.greedy else ''} k={self.top_k} p={self.top_p:g} " \
               f"min_p={self.min_p:g}"
        if self.typical_p != 1.0:
            core += f" typ={self.typical_p:g}"
        if self.repeat_penalty != 1.0:
            core += f" rep={self.repeat_penalty:g}"
        if self.frequency_penalty:
            core += f" freq={self.frequency_penalty:g}"
        if self.presence_penalty:
            core += f" pres={self.presence_penalty:g}"
        core = self._strategy_label(core)
        return f"{core} seed={self.seed}" if seed else core

    def _strategy_label(self, chain: str) -> str:
        """The label's decoding-strategy part (issue 17): 'beam=5 lp=1', 'greedy', or the chain's label."""
        if self.strategy == "beam":
            core = f"beam={self.beams} lp={self.length_penalty:g}"
            if self.early_stopping != "false":
                core += f" early={self.early_stopping}"
            if self.num_return != 1:
                core += f" return={self.num_return}"
        elif self.strategy == "greedy":
            core = "greedy"
        else:
            core = chain + (f" best-of={self.best_of}" + (" by mean" if self.best_of_by == "mean" else "")
                            if self.best_of != 1 else "")
        return core + (f" no-repeat={self.no_repeat_ngram}" if self.no_repeat_ngram else "")


_DEFAULTS = SamplingSettings()
STRATEGY_FIELDS = ("strategy", "beams", "length_penalty", "early_stopping", "num_return", "no_repeat_ngram", "best_of",
                   "best_of_by")

# Settings that change nothing: the raw distribution (temperature 1, no truncation, no penalties).
NEUTRAL = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def changes_label(settings: SamplingSettings, base: SamplingSettings = NEUTRAL) -> str:
    """Only what differs from `base`, e.g. 'T=0.7 top_k=2' ('T=1' when nothing does)."""
    parts = [f"T={settings.temperature:g}"] if settings.temperature != base.temperature or settings == base else []
    for f in ("top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty", "presence_penalty"):
        if getattr(settings, f) != getattr(base, f):
            parts.append(f"{f}={getattr(settings, f):g}")
    return " ".join(parts)


@dataclass(frozen=True)
class ModelOptions(_Checked):
    """The options every model command takes (--gpu-layers, --ctx, --threads, --batch, --flash-attn, --mmap,
    --mlock, --force)."""

    gpu_layers: int = 0  # -1 = all
    ctx: int = 2048  # per-sequence context window: prompt + generated tokens
    threads: int | None = None
    batch: int = 512  # prompt tokens per decode call
    flash_attn: str = "auto"
    # --- loading and the memory check (issue 16: --mmap/--no-mmap, --mlock, --force) ---
    mmap: bool = True  # map the file (False: read it into memory)
    mlock: bool = False  # lock the weights in RAM (no swapping)
    force: bool = False  # load even when the memory estimate says it will not fit
    # --- end of issue 16's block ---

    @classmethod
    def from_dict(cls, d: dict | None) -> "ModelOptions":
        """The options a run recorded (unknown keys ignored, missing ones at their defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def threads_or_default(self) -> int:
        return self.threads or max(1, os.cpu_count() or 1)

    def problems(self) -> list[str]:
        out = []
        if self.ctx < 2:
            out.append(f"--ctx {self.ctx} is too small (at least 2)")
        if self.batch < 1:
            out.append(f"--batch {self.batch} must be >= 1")
        if self.threads is not None and self.threads < 1:
            out.append(f"--threads {self.threads} must be >= 1")
        if self.gpu_layers < -1:
            out.append(f"--gpu-layers {self.gpu_layers} must be >= -1 (-1 = all layers)")
        if self.flash_attn not in FLASH_ATTN:
            out.append(f"--flash-attn {self.flash_attn!r} must be one of on, off, auto")
        for flag in ("mmap", "mlock", "force"):
            if not isinstance(getattr(self, flag), bool):
                out.append(f"--{flag} must be true or false, not {getattr(self, flag)!r}")
        return out

    @property
    def load_mode(self) -> int | None:
        """llama_model_params.load_mode for --mmap/--no-mmap and --mlock (None: llama.cpp's default, mmap)."""
        if self.mmap and not self.mlock:
            return None
        return {(False, False): 0, (False, True): 2, (True, True): 3}[(self.mmap, self.mlock)]  # LLAMA_LOAD_MODE_*
