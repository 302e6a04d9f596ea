"""The native sampler chain, owned by one object: built from SamplingSettings, applied to raw logits.

    SamplingSettings ──► Sampler (a llama.cpp sampler chain; freed by close() / `with`)
    raw logits row ──► Candidates (one reusable llama_token_data buffer) ──► Sampler.apply
                   ──► survivors (id, logit after temperature, p) + the chosen index

The chain is built exactly as llama-cpp-python's `Llama._init_sampler` builds it, so that the same
settings and seed choose the same tokens:
    penalties(last_n, repeat, frequency, presence)
    temperature == 0 -> greedy
    otherwise        -> top_k -> typical_p -> top_p -> min_p -> temperature -> dist(seed)
Temperature comes after the truncating samplers, so the candidate set depends on top_k,
typical_p, top_p, min_p and the penalties, never on temperature.

A chain with top_k whose earlier stages leave the logits alone can be fed only the row's top k (apply's
`ids`; `_prefilter_k` says when that gives the same survivors and pick). `choose` then makes the whole pick in one
C call (kernels.pick_ids: fill, chain, dist, the pick's log-probability and rank), not ten numpy and ctypes calls.

dist's pick over a large candidate set is made in numpy when it is provably the same pick (core/dist.py:
Draws replays dist's random numbers, dist_select makes its pick or says it cannot tell), by `Sampler.choose`.
`apply` always runs the native dist (its survivors carry dist's p). A pure
temperature chain (every other stage off) is not even copied into a llama_token_data array: its logits
are the row divided by the temperature, as temp's loop divides them.

`Sampler(settings, n_vocab, upto=STAGE)` stops the chain after that stage and leaves out the final
pick: applying it shows what that much of the chain leaves of a distribution (the sampler view).

The llama.cpp chain (settings.chain == "llama.cpp") is built as common/sampling.cpp's
`common_sampler_init` builds it for llama-server and llama-cli (the vendored source):
    logit_bias(user biases, + every EOG token at -inf with ignore_eos, + the vocab's suppress tokens)
    mirostat == 0 -> each stage of `samplers` in its order (penalties, dry, top_n_sigma, top_k,
                     typ_p, top_p, min_p, xtc, temperature = temp_ext with dynatemp), all with min_keep,
                     then adaptive_p (when `samplers` names it) or dist(seed)
    mirostat == 1 -> temp -> mirostat(n_vocab, seed, tau, eta, m=100)
    mirostat == 2 -> temp -> mirostat_v2(seed, tau, eta)
There is no greedy branch: temperature 0 keeps only the top token, and dist picks it. llama-server
also feeds every prompt token to the chain's accept() before the first sample (penalties and DRY
see the prompt); `Sampler.for_sequence` does the same for this chain, and only for this chain
(create_completion's accept() sees generated tokens only). It needs the Model (the vocab: DRY's
sequence breakers, text logit biases, EOG tokens). Each stage has its own builder below, so a new
stage (a grammar) is one more builder and one more name.

This module and runtime.py are the only ones that touch llama_cpp; nobody else frees a pointer.
"""

from __future__ import annotations

import ctypes
import math
from typing import Callable

import numpy as np

from llamalens.core import grammar_check, grammar_state, kernels
from llamalens.errors import InvalidInput, LlamalensError
from llamalens.inputs import check_gbnf_nesting
from llamalens.core.runtime import LOG_TAIL, NativeHandle, last_log_error, llama_cpp_module
from llamalens.settings import SamplingSettings, split_samplers
from llamalens.core.dist import Draws, dist_select
from llamalens.core.stats import sampled_logprob, work_array

STAGES = ("penalties", "top_k", "typical_p", "top_p", "min_p", "temperature")

TOKEN_DATA = kernels.TOKEN_DATA  # llama.cpp's llama_token_data: {int32 id; float logit; float p}


def post_sampling(survivors: np.ndarray, n: int) -> list[tuple[int, float]]:
    """llama-server's post_sampling_probs: the top n survivors by p after the chain, p == 0 left out."""
    order = np.argsort(-survivors["p"], kind="stable")[:n]
    return [(int(survivors["id"][i]), float(survivors["p"][i])) for i in order if survivors["p"][i] > 0]


class Candidates:
    """A reusable llama_token_data buffer of n_vocab entries, so a step does not allocate one (the engine keeps
    one for all its sequences and steps)."""

    def __init__(self, n_vocab: int):
        self.data = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        fresh = np.zeros(n_vocab, dtype=TOKEN_DATA)
        fresh["id"] = self.ids
        self._fresh = fresh.view(np.uint8)  # (id, 0, 0) for every token, as bytes
        self._bytes = self.data.view(np.uint8)
        self._logits = self.data.view(np.float32).reshape(n_vocab, 3)[:, 1]
        self._at = self.data.ctypes.data
        self._array = None  # the llama_token_data_array over data, made once (Sampler._run)
        self.pick = kernels.PickResult()  # kernels.pick_ids' results (Sampler.choose)

    def fill(self, row: np.ndarray) -> np.ndarray:
        """(id, logit, 0) for every token of the row: one memcpy of the ids and zeros, one strided write of the
        logits (the chain sorts and truncates the buffer in place, so all of it is rewritten each time)."""
        np.copyto(self._bytes, self._fresh)
        self._logits[:] = row
        return self.data

    def fill_ids(self, row: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(id, logit, 0) for the given ids only (the prefilter's top k, in any order), at the buffer's start in id
        order: one C call with the kernel (a sort and three strided writes in numpy cost 90 us a pick in the cold
        cache after a decode)."""
        n = ids.shape[0]
        part = self.data[:n]
        if kernels.LIB is not None and row.dtype == np.float32 and row.flags.c_contiguous:
            kernels.fill_ids(row, np.ascontiguousarray(ids, np.int32), self._at)
            return part
        ids = np.sort(ids)
        part["id"] = ids
        part["logit"] = row[ids]
        part["p"] = 0.0
        return part

    def array(self, lib, n: int):
        """The llama_token_data_array over the buffer's first n entries, unsorted, nothing selected: one struct kept
        and reset on each call (samplers may repoint its data), valid until the next."""
        arr = self._array
        if arr is None:
            self._data_p = self.data.ctypes.data_as(lib.llama_token_data_p)
            arr = self._array = lib.llama_token_data_array(data=self._data_p, size=n, selected=-1, sorted=False)
        else:
            arr.data, arr.size, arr.selected, arr.sorted = self._data_p, n, -1, False
        return arr


def _llama_cpp_python_stages(lib, s: SamplingSettings, n_vocab: int) -> list[tuple[str, Callable]]:
    """create_completion's chain (Llama._init_sampler): min_keep 1, greedy at temperature 0."""
    min_keep = 1
    stages = [("penalties", lambda: lib.llama_sampler_init_penalties(
        n_vocab, s.penalty_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))]
    if not s.greedy:
        stages += [("top_k", lambda: lib.llama_sampler_init_top_k(s.top_k)),
                   ("typical_p", lambda: lib.llama_sampler_init_typical(s.typical_p, min_keep)),
                   ("top_p", lambda: lib.llama_sampler_init_top_p(s.top_p, min_keep)),
                   ("min_p", lambda: lib.llama_sampler_init_min_p(s.min_p, min_keep)),
                   ("temperature", lambda: lib.llama_sampler_init_temp(s.temperature))]
    final = (lambda: lib.llama_sampler_init_greedy()) if s.greedy else (lambda: lib.llama_sampler_init_dist(s.seed))
    return stages + [("greedy" if s.greedy else "dist", final)]


def logit_biases(s: SamplingSettings, model) -> list[tuple[int, float]]:
    """common_sampler_init's merged biases: the user's (text keys tokenized as llama-server does: no BOS, no
    special tokens), then every EOG token at -inf when ignore_eos, then the vocab's suppress tokens at -inf."""
    out: list[tuple[int, float]] = []
    for key, bias in s.logit_bias:
        if isinstance(key, int):
            if 0 <= key < model.n_vocab:  # llama-server drops ids outside the vocabulary
                out.append((key, bias))
        else:
            out += [(t, bias) for t in model.tokenize(key, add_bos=False, special=False)]
    if s.ignore_eos:
        out += [(t, -math.inf) for t in model.eog_tokens()]
    return out + [(t, -math.inf) for t in model.suppress_tokens()]


def _logit_bias_stage(lib, s: SamplingSettings, model) -> list[tuple[str, Callable]]:
    biases = logit_biases(s, model)
    if not biases:
        return []

    def make():
        arr = (lib.llama_logit_bias * len(biases))(*[lib.llama_logit_bias(t, b) for t, b in biases])
        return lib.llama_sampler_init_logit_bias(model.n_vocab, len(biases), arr)  # copies the array
    return [("logit_bias", make)]


def _dry_stage(lib, s: SamplingSettings, model) -> Callable:
    """DRY, as llama_sampler_init_dry builds it. Building one scans the whole vocabulary for the sequence
    breakers (~0.1 s on a 262k vocabulary), so the model keeps one fresh prototype per setting and each
    sequence gets a clone (llama_sampler_dry_clone copies the processed breakers and the, still empty, state:
    the same sampler)."""
    key = ("dry", s.dry_multiplier, s.dry_base, s.dry_allowed_length, s.dry_penalty_last_n, s.dry_sequence_breakers)

    def make():
        proto = model.sampler_prototypes.get(key)
        if proto is None:
            breakers = [b.encode("utf-8") for b in s.dry_sequence_breakers]
            arr = (ctypes.c_char_p * len(breakers))(*breakers)  # DRY tokenizes and copies them
            proto = model.sampler_prototypes[key] = lib.llama_sampler_init_dry(
                model.vocab, s.dry_multiplier, s.dry_base, s.dry_allowed_length, s.dry_penalty_last_n, arr,
                len(breakers))
        return lib.llama_sampler_clone(proto)
    return make


def _llama_cpp_stage(lib, name: str, s: SamplingSettings, model) -> Callable:
    """One stage of `samplers`, with common_sampler_init's arguments."""
    k = s.min_keep
    return {
        "penalties": lambda: lib.llama_sampler_init_penalties(model.n_vocab, s.penalty_last_n, s.repeat_penalty,
                                                              s.frequency_penalty, s.presence_penalty),
        "dry": _dry_stage(lib, s, model),
        "top_n_sigma": lambda: lib.llama_sampler_init_top_n_sigma(s.top_n_sigma),
        "top_k": lambda: lib.llama_sampler_init_top_k(s.top_k),
        "typ_p": lambda: lib.llama_sampler_init_typical(s.typical_p, k),
        "top_p": lambda: lib.llama_sampler_init_top_p(s.top_p, k),
        "min_p": lambda: lib.llama_sampler_init_min_p(s.min_p, k),
        "xtc": lambda: lib.llama_sampler_init_xtc(s.xtc_probability, s.xtc_threshold, k, s.seed),
        "temperature": lambda: lib.llama_sampler_init_temp_ext(s.temperature, s.dynatemp_range, s.dynatemp_exponent),
    }[name]


def _llama_cpp_stages(lib, s: SamplingSettings, model) -> list[tuple[str, Callable]]:
    """common_sampler_init's chain (see the module docstring); the last stage is the pick."""
    stages = _logit_bias_stage(lib, s, model)
    if s.mirostat == 1:
        return stages + [("temperature", lambda: lib.llama_sampler_init_temp(s.temperature)),
                         ("mirostat", lambda: lib.llama_sampler_init_mirostat(model.n_vocab, s.seed, s.mirostat_tau,
                                                                              s.mirostat_eta, 100))]
    if s.mirostat == 2:
        return stages + [("temperature", lambda: lib.llama_sampler_init_temp(s.temperature)),
                         ("mirostat", lambda: lib.llama_sampler_init_mirostat_v2(s.seed, s.mirostat_tau,
                                                                                 s.mirostat_eta))]
    names = split_samplers(s.samplers)
    stages += [(n, _llama_cpp_stage(lib, n, s, model)) for n in names if n != "adaptive_p"]
    if "adaptive_p" in names:
        return stages + [("adaptive_p", lambda: lib.llama_sampler_init_adaptive_p(s.adaptive_target, s.adaptive_decay,
                                                                                  s.seed))]
    return stages + [("dist", lambda: lib.llama_sampler_init_dist(s.seed))]


PREFILTER_MAX_K = 1024  # top_k above this gets the full array (the prefilter's candidates grow with k)
_LOGIT_KEEPING = {  # stages that leave the logits alone with these settings (their apply returns at once)
    "penalties": lambda s: s.penalty_last_n == 0 or (s.repeat_penalty == 1.0 and s.frequency_penalty == 0.0
                                                     and s.presence_penalty == 0.0),
    "dry": lambda s: s.dry_multiplier == 0.0 or s.dry_penalty_last_n == 0,
    "top_n_sigma": lambda s: s.top_n_sigma <= 0.0,
}


def _prefilter_k(s: SamplingSettings, names: list[str], n_vocab: int) -> int:
    """k when the chain may be fed only the row's top k tokens instead of all of them, else 0.

    llama.cpp's top_k keeps the k largest logits sorted by a non-stable partial sort (std::partial_sort for
    k <= 128, its bucket sort above). When every stage before it leaves the logits alone (penalties, DRY and
    top_n_sigma off: their apply returns first, not even touching `sorted`; no logit_bias stage) and the k+1
    largest logits are all different (RowStats.top_k_ids checks), the k it keeps and their order are unique:
    the same from the whole row as from those k in id order. Every later stage (typical, top_p, min_p, xtc,
    temperature, dist) sees only those k, so the chain's survivors, pick and RNG state are the same. With a
    tie among the k+1 the order of equal logits depends on the input's layout, and the engine takes the full
    row. The same holds for `upto` chains that reach top_k."""
    k = s.top_k
    if "top_k" not in names or not 0 < k < n_vocab or k > PREFILTER_MAX_K:
        return 0
    for name in names[: names.index("top_k")]:
        keeps = _LOGIT_KEEPING.get(name)
        if keeps is None or not keeps(s):  # (the float comparisons: a value that is 1.0 / 0.0 as float32 but not
            return 0                      # as a Python float only turns the prefilter off)
    return k


def prefilter_k(settings: SamplingSettings, model) -> int:
    """The top-k prefilter's k for this settings' chain on this model (0: the chain gets every token)."""
    return _prefilter_k(settings, stage_names(settings, model), model.n_vocab)


PICKS = ("greedy", "dist", "mirostat", "adaptive_p")  # stages that choose the token

REPLICA_MIN = 4096  # survivors from which dist_select is tried (below, llama.cpp's dist is cheaper than numpy)
NO_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: dist seeds itself from the clock (nothing to replay)


def stage_names(settings: SamplingSettings, model=None) -> list[str]:
    """The stages of this settings' chain, in order, the pick (dist, greedy, mirostat, adaptive_p) last."""
    lib = llama_cpp_module()
    if settings.chain == "llama.cpp":
        return [n for n, _ in _llama_cpp_stages(lib, settings, model)]
    return [n for n, _ in _llama_cpp_python_stages(lib, settings, 0)]


class Sampler(NativeHandle):
    """One native llama.cpp sampler chain for one sequence (stateful: penalties see accepted tokens).

    A chain that ends in dist with a fixed seed keeps its dist apart from the other stages (`_dist`), with the
    Draws that replay its random numbers: `apply` runs it after them, `choose` may pick in numpy instead
    (dist_select), and both advance the other by one draw, so every pick sees the draw it would have seen."""

    def __init__(self, settings: SamplingSettings, n_vocab: int, upto: str | None = None, model=None):
        lib = self._lib = llama_cpp_module()
        self.settings = s = settings
        if s.chain == "llama.cpp":
            if model is None:
                raise ValueError("the llama.cpp chain needs the model (its vocabulary)")
            stages = _llama_cpp_stages(lib, s, model)
        else:
            stages = _llama_cpp_python_stages(lib, s, n_vocab)
        names = [n for n, _ in stages]
        if upto is not None and upto not in names[:-1]:
            raise ValueError(f"unknown stage {upto!r}; this chain's stages: {', '.join(names[:-1])}")
        self.stages = names if upto is None else names[: names.index(upto) + 1]
        self.prefilter_k = _prefilter_k(s, self.stages, n_vocab)  # apply(row, buffers, ids) takes the top k
        replay = self.stages[-1] == "dist" and 0 <= s.seed < NO_SEED
        self.ptr = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        for _name, make in stages[: len(self.stages) - replay]:
            lib.llama_sampler_chain_add(self.ptr, make())  # the chain owns its stages
        self._dist = stages[-1][1]() if replay else None
        # the chain's and the dist's addresses, for the prefiltered pick in one C call (choose, kernels.pick_ids)
        self._at = ctypes.cast(self.ptr, ctypes.c_void_p).value
        self._dist_at = ctypes.cast(self._dist, ctypes.c_void_p).value if replay else None
        self._draws = Draws(s.seed) if replay else None
        self._one = np.zeros(1, dtype=TOKEN_DATA)  # the 1-entry array on which dist makes a draw and no pick
        # the chain leaves the logits as they are but for a plain temperature: choose skips the array
        self._temperature = np.float32(s.temperature) if replay and _temperature_only(s, self.stages) else None

    @classmethod
    def for_sequence(cls, settings: SamplingSettings, model, prompt_tokens) -> "Sampler":
        """The chain that samples one sequence after `prompt_tokens`: the llama.cpp chain has seen the prompt
        (llama-server's init_sampler accepts every prompt token), create_completion's has not."""
        sampler = cls(settings, model.n_vocab, model=model)
        if settings.chain == "llama.cpp":
            for t in prompt_tokens:
                sampler.accept(t)
        return sampler

    def _run(self, row: np.ndarray, buffers: Candidates | None, ids: np.ndarray | None):
        """The chain's stages on a raw row (without a kept-apart dist): (the llama_token_data_array, the buffer it
        points into (keep it alive while the array is used), whether that buffer is this call's own)."""
        lib = self._lib
        n = row.shape[0]
        own = buffers is None
        if own:
            cand = np.zeros(n, dtype=TOKEN_DATA)
            cand["id"] = np.arange(n, dtype=np.int32)
            cand["logit"] = row
            arr = lib.llama_token_data_array(data=cand.ctypes.data_as(lib.llama_token_data_p), size=n, selected=-1,
                                             sorted=False)
        else:
            cand = buffers.fill_ids(row, ids) if ids is not None else buffers.fill(row)
            arr = buffers.array(lib, cand.shape[0])
        lib.llama_sampler_apply(self.ptr, ctypes.byref(arr))
        return arr, cand, own

    def _native_dist(self, arr, skip: bool = True) -> None:
        """llama.cpp's dist on the array; Draws passes over its draw unless this pick took it already."""
        self._lib.llama_sampler_apply(self._dist, ctypes.byref(arr))
        if skip:
            self._draws.skip()

    @staticmethod
    def _survivors(arr) -> np.ndarray:
        # samplers may repoint `data`: read the survivors where the array now says they are
        size = int(arr.size)
        return np.frombuffer((ctypes.c_char * (size * TOKEN_DATA.itemsize)).from_address(
            ctypes.addressof(arr.data.contents)), dtype=TOKEN_DATA, count=size)

    def apply(self, row: np.ndarray, buffers: Candidates | None = None,
              ids: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Apply the chain to a raw logits row (with `ids`, to those tokens of it only: the prefilter's top
        prefilter_k in any order, from RowStats.top_k_list, which gives the same result; needs `buffers`).

        Returns (survivors, selected): the candidates left after the chain (a structured array with
        fields id, logit (after temperature when the chain has one), p) and the chosen index (-1
        without a final pick). With `buffers` the survivors are a view, valid until the next apply
        (and while this sampler lives); without, a copy.
        """
        arr, cand, own = self._run(row, buffers, ids)
        if self._dist is not None:
            self._native_dist(arr)
        survivors = self._survivors(arr)
        return (survivors.copy() if own else survivors), int(arr.selected)

    def choose(self, row: np.ndarray, buffers: Candidates, ids: np.ndarray | None = None,
               block_sums: np.ndarray | None = None, ranks: tuple[int, int] | None = None) -> tuple[int, float, int]:
        """The chain's pick for a raw row, as apply would make it: (token, its log-probability among the
        survivors after temperature (0.0 for greedy), how many survivors). Large survivor sets are picked by
        dist_select when it can tell (see the module docstring). `block_sums`: this very row's
        RowStats.dist_block_sums, which a temperature-1 chain's dist_select then takes instead of its own pass.

        With the prefilter's `ids` and the C kernels the pick is one C call (kernels.pick_ids: the same fill,
        chain, dist and log-probability as _run, _survivors, _native_dist and outcome below; at most
        PREFILTER_MAX_K survivors, so never dist_select's). It also ranks the chosen token in the row's top list
        `ranks` (RowStats.ranks): buffers.pick then holds its raw logit and rank; its rank is 0 after any other
        path."""
        row = np.asarray(row, dtype=np.float32)  # what the chain sees (Candidates hold float32 logits)
        out = buffers.pick
        out.rank = 0
        if ids is not None and kernels.LIB is not None and row.flags.c_contiguous and ids.dtype == np.int32 and (
                ids.flags.c_contiguous):
            token = kernels.pick_ids(self._lib, row, ids, buffers._at, self._at, self._dist_at,
                                     not self.settings.greedy, ranks, out)
            if token >= 0:
                if self._dist is not None:
                    self._draws.skip()
                return (token, 0.0, 1) if self.settings.greedy else (token, out.lp, out.survivors)
            raise LlamalensError(f"the sampler chain left {out.survivors} candidates and selected index "
                                 f"{out.selected} of a prefiltered top {ids.shape[0]}: there is no pick to record")
        lse = None  # set when this pick's draw was taken from Draws (dist then draws its own, in step)
        if self._temperature is not None and ids is None and row.shape[0] >= REPLICA_MIN:
            logits = row if self._temperature == 1.0 else np.divide(  # temp's `logit /= temp`
                row, self._temperature, out=work_array("temp", row.shape[0]))
            i, lse = self._select(logits, block_sums if self._temperature == 1.0 else None)
            if i is not None:
                return i, float(logits[i]) - lse, row.shape[0]
        arr, _, _ = self._run(row, buffers, ids)
        survivors = self._survivors(arr)
        if self._dist is not None and lse is None and survivors.shape[0] >= REPLICA_MIN:
            logits = np.ascontiguousarray(survivors["logit"])
            if not arr.sorted or logits[0] == logits.max():  # dist takes a sorted array's first logit as its max
                i, lse = self._select(logits)
                if i is not None:
                    return int(survivors["id"][i]), float(logits[i]) - lse, len(survivors)
        if self._dist is not None:
            self._native_dist(arr, skip=lse is None)
        return self.outcome(survivors, int(arr.selected), lse)

    def outcome(self, survivors: np.ndarray, sel: int, lse: float | None = None) -> tuple[int, float, int]:
        """What the engine records of a pick among these survivors: (token, its log-probability among them after
        temperature, how many), or (token, 0.0, 1) for greedy settings on either chain. `lse`: their float64
        log-sum-exp when dist_select has it."""
        token = int(survivors["id"][sel])
        if self.settings.greedy:
            return token, 0.0, 1
        if lse is not None and math.isfinite(lse):
            return token, float(survivors["logit"][sel]) - lse, len(survivors)
        return token, sampled_logprob(survivors, sel), len(survivors)

    def _select(self, logits: np.ndarray, block_sums: np.ndarray | None = None) -> tuple[int | None, float]:
        """dist_select on this pick's draw; when it is sure, dist makes its own draw without a pick, to stay in step."""
        i, lse = dist_select(logits, self._draws.next(), block_sums)
        if i is not None:
            self._dist_draw()
        return i, lse

    def _dist_draw(self) -> None:
        """dist's own draw for a pick made here: one apply on a 1-entry array draws once and picks nothing."""
        lib = self._lib
        one = lib.llama_token_data_array(data=self._one.ctypes.data_as(lib.llama_token_data_p), size=1,
                                         selected=-1, sorted=False)
        lib.llama_sampler_apply(self._dist, ctypes.byref(one))

    def accept(self, token: int) -> None:
        """Tell the chain which token was chosen (the penalties count it; dist's accept does nothing)."""
        self._lib.llama_sampler_accept(self.ptr, int(token))
        self._mask = None

    def reset(self) -> None:
        self._lib.llama_sampler_reset(self.ptr)
        if self._dist is not None:
            self._lib.llama_sampler_reset(self._dist)
            self._draws = Draws(self.settings.seed)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.llama_sampler_free(self.ptr)
            self.ptr = None
        if getattr(self, "_dist", None):
            self._lib.llama_sampler_free(self._dist)
            self._dist = None


def _temperature_only(s: SamplingSettings, stages: list[str]) -> bool:
    """create_completion's chain leaves the logits alone but for the temperature's division: penalties off,
    top_k <= 0, typical_p and top_p >= 1, min_p <= 0, as their float32 values (each stage's apply returns at
    once then), and a temperature above 0."""
    f32 = np.float32
    off = {"penalties": _LOGIT_KEEPING["penalties"](s), "top_k": s.top_k <= 0, "typical_p": f32(s.typical_p) >= 1,
           "top_p": f32(s.top_p) >= 1, "min_p": f32(s.min_p) <= 0, "temperature": f32(s.temperature) > 0}
    return stages[:-1] == list(STAGES) and all(off.values())


# Where llama-sampler.cpp (vendored) keeps mirostat's state: struct llama_sampler_mirostat {int32 n_vocab; uint32
# seed, seed_cur; float tau, eta; int32 m; float mu; std::mt19937 rng} and _v2 {uint32 seed, seed_cur; float tau,
# eta, mu; rng}: the byte offsets of tau, eta and mu, by the stage's llama_sampler_name.
_MIROSTAT_FIELDS = {b"mirostat": (12, 16, 24), b"mirostat-v2": (8, 12, 16)}


def mirostat_mu(sampler: Sampler) -> float | None:
    """μ (bits), the surprise bound the chain's mirostat stage uses at its next apply. llama.cpp has no getter, so
    it is read from the stage's native state at the vendored struct's offsets, and only when that read checks:
    the tau and eta fields must hold the settings' values (float32), so a layout that moved is never taken for μ.
    None when the chain has no mirostat stage or the check fails."""
    lib, s = sampler._lib, sampler.settings
    for i in range(int(lib.llama_sampler_chain_n(sampler.ptr))):
        stage = lib.llama_sampler_chain_get(sampler.ptr, i)
        fields = _MIROSTAT_FIELDS.get(lib.llama_sampler_name(stage))
        base = stage.contents.ctx if fields else None
        if not base:
            continue
        tau, eta, mu = (ctypes.c_float.from_address(base + off).value for off in fields)
        if tau != float(np.float32(s.mirostat_tau)) or eta != float(np.float32(s.mirostat_eta)):
            return None
        return mu
    return None


class _stderr_caught:
    """Native writes to file descriptor 2 go to a temporary file while inside; .text() reads them."""

    def __enter__(self):
        import os
        import sys
        import tempfile

        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import os

        os.dup2(self._saved, 2)
        os.close(self._saved)

    def text(self) -> str:
        self._tmp.seek(0)
        return self._tmp.read().decode("utf-8", errors="replace")


class GrammarSampler(NativeHandle):
    """llama.cpp's grammar sampler for one sequence (llama_sampler_init_grammar, start rule "root"): kept apart
    from the chain, as common/sampling.cpp keeps it (grammar.py says how the engine uses it). Stateful: each
    accepted token advances it."""

    def __init__(self, model, gbnf: str, where: str = "the grammar", threads: int | None = None):
        check_gbnf_nesting(gbnf, where)
        lib = self._lib = llama_cpp_module()
        # for mask(): the model (its prefix tree), the masks remembered by state, the current state's mask
        self._model, self._masks, self._mask = model, grammar_state.masks(model, gbnf), None
        self._threads = max(1, int(threads or model.options.threads_or_default()))
        LOG_TAIL.clear()  # so that the error below is this grammar's
        # llama.cpp's grammar parser prints why it failed on stderr (not through the log): catch it
        with _stderr_caught() as caught:
            self.ptr = lib.llama_sampler_init_grammar(model.vocab, gbnf.encode("utf-8"), b"root")
        if not self.ptr:  # llama.cpp returns NULL
            why = next((ln.split("error parsing grammar:", 1)[1].strip() for ln in caught.text().splitlines()
                        if "error parsing grammar:" in ln), "") or last_log_error() or next(
                (ln.strip() for ln in reversed(LOG_TAIL) if "grammar" in ln.lower()), "")
            if "left recursion" in why:  # llama.cpp names the rule only by its index
                raise InvalidInput(f"{where} is left-recursive (llama.cpp: {why}): a rule can reach itself before "
                                   "matching any text, e.g. root ::= root \"a\" | \"b\", which llama.cpp cannot run; "
                                   "write it as a repetition, e.g. root ::= \"b\" \"a\"*")
            raise InvalidInput(f"{where} does not parse as GBNF" + (f" (llama.cpp: {why})" if why else "")
                               + "; fix it (the start rule must be named root)")
        self._state = grammar_state.StateReader(lib, self.ptr, model.vocab)

    def allowed(self, ids: np.ndarray, buffers: Candidates | None = None) -> np.ndarray:
        """Which of the token ids `ids` the grammar allows now (a bool per id): it sets the others' logits to
        -inf. A short list is checked directly unless the state's mask is known; a long one through mask()."""
        if self._mask is None and len(ids) < grammar_check.WALK_MIN:
            return self._check(np.asarray(ids, dtype=np.int32), buffers)
        return self.mask(buffers)[ids]

    def mask(self, buffers: Candidates | None = None) -> np.ndarray:
        """Which tokens of the whole vocabulary the grammar allows now (a bool per token id; read-only). Found
        under the state's key (grammar_state: the same state, the same mask) or settled by walking the
        vocabulary's prefix tree (grammar_check: the answers of llama.cpp's check of every token, from far
        fewer checks) and remembered; with `buffers` (n_vocab entries) the checks allocate nothing."""
        if self._mask is not None:
            return self._mask

        def make() -> np.ndarray:
            n = self._model.n_vocab
            known, ok = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
            grammar_check.prefixes(self._model).walk(lambda sub: self._check(sub, buffers),
                                                     np.arange(n, dtype=np.int32), known, ok)
            return ok

        key = self._state.key()
        found = make() if key is None else self._masks.get(key, make)
        found.flags.writeable = False
        self._mask = found
        return found

    def _check(self, ids: np.ndarray, buffers: Candidates | None) -> np.ndarray:
        """llama.cpp's check of every id in `ids`, in slices on the threads (grammar_check.in_slices)."""
        lib, n = self._lib, len(ids)
        cand = np.zeros(n, dtype=TOKEN_DATA) if buffers is None else buffers.data[:n]
        cand["id"] = ids
        cand["logit"] = 0.0
        cand["p"] = 0.0

        def apply(start: int, stop: int) -> None:
            part = cand[start:stop]
            arr = lib.llama_token_data_array(data=part.ctypes.data_as(lib.llama_token_data_p), size=len(part),
                                             selected=-1, sorted=False)
            lib.llama_sampler_apply(self.ptr, ctypes.byref(arr))

        grammar_check.in_slices(apply, n, self._threads)
        return cand["logit"] == 0.0

    def accept(self, token: int) -> None:
        self._lib.llama_sampler_accept(self.ptr, int(token))
        self._mask = None

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.llama_sampler_free(self.ptr)
            self.ptr = None


def json_schema_to_gbnf(schema_text: str) -> str:
    """A JSON schema converted to GBNF by llama-cpp-python's converter (llama_cpp.llama_grammar), the only one
    callable from Python here; grammar.py says how its output differs from the vendored llama.cpp's C++ one.
    (Here because only this module and runtime.py import llama_cpp.)"""
    llama_cpp_module()
    from llama_cpp.llama_grammar import json_schema_to_gbnf as convert

    return convert(schema_text)
