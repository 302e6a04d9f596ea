"""Settings as typed records with their validation: SamplingSettings (how each token is chosen;
sampler.py builds the native chain from it) and ModelOptions (how a model is loaded and run).

The defaults are llama-cpp-python's `create_completion` defaults (temperature 0.8, top_k 40,
top_p 0.95, min_p 0.05, typical_p 1.0, repeat_penalty 1.0, 16 tokens), except the seed: llama-cpp-
python derives an unseeded call's seed from the previous call's, so results depend on call order;
llamalens always uses an explicit seed (default 0) and records it.

How the settings become a native llama.cpp chain, and in which order, is in sampler.py.

Two chain styles (`chain`): "llama-cpp-python" (the default: exactly `create_completion`'s chain,
so runs stay comparable with llama-cpp-python and with older runs) and "llama.cpp" (exactly
common/sampling.cpp's `common_sampler_init`, the chain llama-server and llama-cpp build). The
llama.cpp samplers (DRY, XTC, top-n-sigma, dynamic temperature, mirostat, adaptive-p, logit bias,
ignore_eos, a custom order) have llama.cpp's names, defaults and ranges (vendored common/common.h
and tools/server/server-schema.cpp) and exist only in the llama.cpp chain: the llama-cpp-python
chain refuses them with an error naming `--chain llama.cpp`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace

from llamalens.errors import InvalidSettings

FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # --flash-attn -> llama_context_params.flash_attn_type

# llama.cpp reads this seed as "pick a random one": never pass it on.
LLAMA_DEFAULT_SEED = 0xFFFFFFFF

# decoding strategies
STRATEGIES = ("sample", "greedy", "beam")
EARLY_STOPPING = ("false", "true", "never")
MAX_BEAMS = 64  # one KV sequence per beam (llama.cpp allows 256 in all)
MAX_BEST_OF = 64
MAX_LAST_N = 2**20  # penalty windows: llama.cpp keeps a buffer of this many tokens (10**9 took 15 GB)
MAX_THREADS = 512  # ggml's GGML_MAX_N_THREADS: more crashes llama.cpp's thread pool
MAX_LENGTH_PENALTY = 10.0  # |length_penalty|: length ** 10 stays finite and non-zero for any length a context holds
CHAIN_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
                "presence_penalty", "penalty_last_n")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

CHAINS = ("llama-cpp-python", "llama.cpp")
# llama-server's stage names (common_sampler_types_from_names' canonical names), in its default order
SAMPLER_NAMES = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature",
                 "adaptive_p")
DEFAULT_SAMPLERS = "penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature"
DRY_BREAKERS = ("\n", ":", "\"", "*")
# aliases llama.cpp accepts for the stage names (kebab-case, no dash, and a few more)
SAMPLER_ALIASES = {**{n.replace("_", "-"): n for n in SAMPLER_NAMES if "_" in n},
                   **{n.replace("_", ""): n for n in SAMPLER_NAMES if "_" in n},
                   "nucleus": "top_p", "temp": "temperature", "typ": "typ_p", "typical_p": "typ_p"}
# the fields only the llama.cpp chain has (a llama-cpp-python chain refuses them when not at their defaults)
LLAMA_CPP_ONLY = ("samplers", "min_keep", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
                  "dry_sequence_breakers", "xtc_probability", "xtc_threshold", "top_n_sigma", "dynatemp_range",
                  "dynatemp_exponent", "mirostat", "mirostat_tau", "mirostat_eta", "adaptive_target", "adaptive_decay",
                  "logit_bias", "ignore_eos")



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
    """One sampling configuration: llama-cpp-python's create_completion defaults, llama.cpp's own samplers (with
    chain="llama.cpp") and the decoding strategies (greedy, beam, best-of, no-repeat-ngram); seed included.

    Immutable and validated: problems() lists what is out of range, with the fix; with_(**changes) copies;
    label() is the short text `show` and the reports use. SamplingSettings(temperature=0) is greedy.
    """

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
    # -- decoding strategy: how a whole sequence is chosen; every field is a sweep axis ------
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
    # ---- llama.cpp's chain and its own samplers -------------------------------------------
    # Defaults are llama-server's (common_params_sampling); every stage below is off at its default.
    chain: str = "llama-cpp-python"  # or "llama.cpp" (see the module docstring)
    samplers: str = DEFAULT_SAMPLERS  # llama.cpp chain: the order of its stages, llama-server's names
    min_keep: int = 0  # llama.cpp chain (llama-cpp-python's chain always keeps >= 1)
    dry_multiplier: float = 0.0  # 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64  # 0 = off
    dry_sequence_breakers: tuple[str, ...] = DRY_BREAKERS
    xtc_probability: float = 0.0  # 0 = off
    xtc_threshold: float = 0.1  # > 0.5 = off
    top_n_sigma: float = -1.0  # <= 0 = off
    dynatemp_range: float = 0.0  # 0 = off
    dynatemp_exponent: float = 1.0
    mirostat: int = 0  # 0 = off, 1 = mirostat, 2 = mirostat 2.0 (replaces the samplers list)
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    adaptive_target: float = -1.0  # < 0 = off; "adaptive_p" in samplers uses it
    adaptive_decay: float = 0.9
    logit_bias: tuple[tuple[int | str, float], ...] = ()  # (token id or text, bias); -inf bans
    ignore_eos: bool = False  # bans every end-of-generation token, as llama-server does
    # ---- end of llama.cpp's samplers --------------------------------------------------------------------

    def __post_init__(self):
        # stored runs come back from JSON with lists: keep the record hashable and equal to the original
        object.__setattr__(self, "dry_sequence_breakers", tuple(self.dry_sequence_breakers))
        object.__setattr__(self, "logit_bias", parse_logit_bias(self.logit_bias))

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
        """Every field, except the decoding-strategy ones left at their defaults (settings recorded before they
        existed read, and export, exactly as they did; from_dict fills them in); a llama-cpp-python chain also
        leaves out the llama.cpp fields (at their defaults: it refuses others), for the same reason."""
        d = asdict(self)
        for f in STRATEGY_FIELDS:
            if d[f] == getattr(_DEFAULTS, f):
                del d[f]
        if self.chain == "llama-cpp-python":
            for name in ("chain",) + LLAMA_CPP_ONLY:
                d.pop(name)
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
        if not isinstance(self.penalty_last_n, int) or not -1 <= self.penalty_last_n <= MAX_LAST_N:
            bad("penalty_last_n", self.penalty_last_n, f"must be in [-1, {MAX_LAST_N}]; -1 means the whole context")
        if not isinstance(self.seed, int) or not 0 <= self.seed < LLAMA_DEFAULT_SEED:
            bad("seed", self.seed, f"must be an integer in [0, {LLAMA_DEFAULT_SEED - 1}]")
        # decoding strategy
        if self.strategy not in STRATEGIES:
            bad("strategy", self.strategy, f"must be one of {', '.join(STRATEGIES)}")
        if not _int(self.beams) or not 1 <= self.beams <= MAX_BEAMS:
            bad("beams", self.beams, f"must be an integer in [1, {MAX_BEAMS}]")
        if not finite(self.length_penalty) or abs(self.length_penalty) > MAX_LENGTH_PENALTY:
            bad("length_penalty", self.length_penalty, f"must be a number in [-{MAX_LENGTH_PENALTY:g}, "
                f"{MAX_LENGTH_PENALTY:g}]; 0 = plain sum of logprobs, 1 = mean")
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
        return out + self._llama_cpp_problems(finite)

    def _llama_cpp_problems(self, finite) -> list[str]:
        """The llama.cpp samplers' ranges (server-schema.cpp's limits), and the chain they need."""
        out: list[str] = []

        def check(name, ok, rule):
            if not ok:
                out.append(f"{name.replace('_', '-')} {getattr(self, name)!r} is out of range ({rule})")

        check("chain", self.chain in CHAINS, f"must be one of {', '.join(CHAINS)}")
        unknown = [n for n in split_samplers(self.samplers) if n not in SAMPLER_NAMES]
        if unknown or not split_samplers(self.samplers):
            out.append(f"samplers {self.samplers!r}: {'unknown stage ' + repr(unknown[0]) if unknown else 'empty'} "
                       f"(stages are {';'.join(SAMPLER_NAMES)}, separated by ';')")
        check("min_keep", _int(self.min_keep) and self.min_keep >= 0, "must be an integer >= 0")
        check("dry_multiplier", finite(self.dry_multiplier) and self.dry_multiplier >= 0, "must be >= 0; 0 turns it off")
        check("dry_base", finite(self.dry_base) and self.dry_base >= 1, "must be >= 1")
        check("dry_allowed_length", _int(self.dry_allowed_length) and self.dry_allowed_length >= 0,
              "must be an integer >= 0")
        check("dry_penalty_last_n", _int(self.dry_penalty_last_n) and 0 <= self.dry_penalty_last_n <= MAX_LAST_N,
              f"must be an integer in [0, {MAX_LAST_N}]; 0 turns it off")
        check("dry_sequence_breakers", bool(self.dry_sequence_breakers) and all(
            isinstance(b, str) and b for b in self.dry_sequence_breakers), "must be non-empty strings, at least one")
        check("xtc_probability", finite(self.xtc_probability) and 0 <= self.xtc_probability <= 1,
              "must be in [0, 1]; 0 turns it off")
        check("xtc_threshold", finite(self.xtc_threshold) and 0 <= self.xtc_threshold <= 1,
              "must be in [0, 1]; above 0.5 it never fires")
        check("top_n_sigma", finite(self.top_n_sigma), "must be a finite number; <= 0 turns it off")
        check("dynatemp_range", finite(self.dynatemp_range) and self.dynatemp_range >= 0, "must be >= 0; 0 turns it off")
        check("dynatemp_exponent", finite(self.dynatemp_exponent), "must be a finite number")
        check("mirostat", self.mirostat in (0, 1, 2) and _int(self.mirostat), "must be 0 (off), 1 or 2")
        check("mirostat_tau", finite(self.mirostat_tau) and self.mirostat_tau >= 0, "must be >= 0")
        check("mirostat_eta", finite(self.mirostat_eta) and self.mirostat_eta >= 0, "must be >= 0")
        check("adaptive_target", finite(self.adaptive_target) and self.adaptive_target <= 1,
              "must be <= 1; negative turns it off")
        check("adaptive_decay", finite(self.adaptive_decay) and 0 <= self.adaptive_decay <= 0.99, "must be in [0, 0.99]")
        for key, bias in self.logit_bias:
            if not (isinstance(bias, (int, float)) and not isinstance(bias, bool) and not math.isnan(bias)
                    and bias != math.inf):
                out.append(f"logit-bias {key!r}: bias {bias!r} must be a number (or -inf / false to ban the token)")
            if isinstance(key, int) and key < 0 or isinstance(key, str) and not key:
                out.append(f"logit-bias {key!r}: give a token id >= 0 or a non-empty text")
        check("ignore_eos", isinstance(self.ignore_eos, bool), "must be true or false")
        if self.chain == "llama-cpp-python":
            changed = [f.name for f in fields(self) if f.name in LLAMA_CPP_ONLY
                       and getattr(self, f.name) != f.default]
            if changed:
                out.append(f"{changed[0].replace('_', '-')} is a llama.cpp sampler setting: add --chain llama.cpp "
                           "(create_completion's chain has no such stage)")
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
        if self.chain != "llama-cpp-python":
            core += " " + llama_cpp_label(self)
        core = self._strategy_label(core)
        return f"{core} seed={self.seed}" if seed else core

    def _strategy_label(self, chain: str) -> str:
        """The label's decoding-strategy part: 'beam=5 lp=1', 'greedy', or the chain's label."""
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


def split_samplers(text: str) -> list[str]:
    """'top_k;temp' -> ['top_k', 'temperature']: llama-server's names, its aliases folded (case-insensitive)."""
    names = [part.strip().lower() for part in str(text).replace(",", ";").split(";") if part.strip()]
    return [SAMPLER_ALIASES.get(n, n) for n in names]


def parse_logit_bias(value) -> tuple[tuple[int | str, float], ...]:
    """llama-server's forms: [[id or text, bias], ...] or {"id or text": bias}; a bias of false bans the token
    (-inf). Text keys that are whole numbers are token ids, as llama-server reads them."""
    if isinstance(value, dict):
        value = list(value.items())
    out = []
    for item in value or ():
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise InvalidSettings(f"logit-bias {item!r} must be a pair: token id or text, and a bias")
        key, bias = item
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        if bias is False:
            bias = -math.inf
        out.append((key, bias if isinstance(bias, bool) else float(bias) if isinstance(bias, (int, float)) else bias))
    return tuple(out)


def llama_cpp_label(s: "SamplingSettings") -> str:
    """The llama.cpp chain's part of a label: what differs from llama-server's defaults."""
    base = SamplingSettings(chain="llama.cpp")
    parts = ["chain=llama.cpp"]
    for name in LLAMA_CPP_ONLY:
        v = getattr(s, name)
        if v != getattr(base, name):
            shown = ";".join(split_samplers(v)) if name == "samplers" else \
                ",".join(f"{k!r}:{b:g}" if isinstance(k, str) else f"{k}:{b:g}" for k, b in v) if name == "logit_bias" else \
                "|".join(v) if name == "dry_sequence_breakers" else v
            parts.append(f"{name}={shown:g}" if isinstance(shown, float) else f"{name}={shown}")
    return " ".join(parts)


# Settings that change nothing: the raw distribution (temperature 1, no truncation, no penalties).
_DEFAULTS = SamplingSettings()
STRATEGY_FIELDS = ("strategy", "beams", "length_penalty", "early_stopping", "num_return", "no_repeat_ngram", "best_of",
                   "best_of_by")


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
    """The options every model command takes (--gpu-layers, --ctx, --threads, --batch, --flash-attn,
    --ubatch, --swa-full, --repack, --mmap, --mlock, --force). --ubatch, --swa-full and --repack change the
    numbers (README, noise floor): llama-cpp-python's `Llama()` runs with a full-size SWA cache, llama-server
    with a small one (`server_context` below gives its defaults)."""

    gpu_layers: int = 0  # -1 = all
    ctx: int = 2048  # per-sequence context window: prompt + generated tokens
    threads: int | None = None
    batch: int = 512  # prompt tokens per decode call
    flash_attn: str = "auto"
    ubatch: int | None = None  # physical batch (llama_context_params.n_ubatch); None = batch
    swa_full: str = "on"  # "on": full-size SWA cache (llama_context_default_params, Llama()); "off": llama-server's
    repack: str = "on"  # weight repacking into CPU-friendly layouts (llama_model_params.use_extra_bufts)
    # "on": decode a prompt in llama-server's pieces. On a model with sliding-window attention and a small SWA
    # cache, llama-server decodes the last 4 + ubatch and the last 4 prompt tokens in batches of their own (to
    # checkpoint its context there); other batch shapes give other logits (0.07 nats on the default model).
    server_prefill: str = "off"
    # --- loading and the memory check (--mmap/--no-mmap, --mlock, --force) ---
    mmap: bool = True  # map the file (False: read it into memory)
    mlock: bool = False  # lock the weights in RAM (no swapping)
    force: bool = False  # load even when the memory estimate says it will not fit
    # --- end of loading and the memory check ---

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
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            out.append(f"--threads {self.threads} is out of range (1..{MAX_THREADS}; this machine has "
                       f"{os.cpu_count() or 1} CPUs)")
        if self.gpu_layers < -1:
            out.append(f"--gpu-layers {self.gpu_layers} must be >= -1 (-1 = all layers)")
        if self.flash_attn not in FLASH_ATTN:
            out.append(f"--flash-attn {self.flash_attn!r} must be one of on, off, auto")
        if self.ubatch is not None and self.ubatch < 1:
            out.append(f"--ubatch {self.ubatch} must be >= 1")
        for name in ("swa_full", "repack", "server_prefill"):
            if getattr(self, name) not in ("on", "off"):
                out.append(f"--{name.replace('_', '-')} {getattr(self, name)!r} must be on or off")
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


# llama-server's context defaults that differ from ModelOptions' (tools/server, common/common.h): a small SWA
# cache, a 2048-token logical batch over 512-token micro-batches; repacking and flash attention 'auto' as ours.
SERVER_CONTEXT = dict(swa_full="off", batch=2048, ubatch=512, repack="on", flash_attn="auto", server_prefill="on")


def server_prompt_pieces(n: int, n_batch: int, n_ubatch: int) -> list[int]:
    """The batch sizes llama-server decodes an n-token prompt in, on a model with sliding-window attention
    and a small SWA cache (tools/server/server-context.cpp: a batch ends at n_batch tokens, or where
    4 + n_ubatch or 4 prompt tokens are left)."""
    pieces, done = [], 0
    tails = {min(n_batch, off) for off in (4 + n_ubatch, 4)}
    while done < n:
        cur = 0
        while done < n and cur < n_batch:
            done, cur = done + 1, cur + 1
            if n - done in tails:
                break
        pieces.append(cur)
    return pieces
