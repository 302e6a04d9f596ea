"""A llama.cpp grammar's state, read from its C++ structures, and the vocabulary masks remembered per state.

What llama.cpp's grammar apply allows (llama_grammar_apply_impl) is a function of the grammar's rules, its
stacks (each a list of pointers into the rules: where a parse may stand) and the partial UTF-8 character left
by the last token; nothing else. Two samplers made from the same GBNF text share their rules' shape, so a
stack written as (rule, element) positions instead of pointers names the same place in both. The set of
those stacks, the partial character and the lazy-trigger flags are therefore a key under which a whole
vocabulary's mask can be kept and reused: inside a JSON string, or any repetition, a grammar returns to the
same state token after token, and across the sequences of a sweep every sequence passes the same states.

The public API has no call that returns the stacks, so they are read from memory, in the layout of the
llama.cpp vendored by the pinned llama-cpp-python (src/llama-sampler.cpp, src/llama-grammar.h; another release
is not read: LAYOUT_VERSIONS):

    llama_sampler          { iface*, ctx* }
    llama_sampler_grammar  { vocab*, std::string grammar_str, std::string grammar_root, llama_grammar* }
    llama_grammar          { vocab*, vector<vector<element>> rules, vector<vector<element*>> stacks,
                             {uint32 value, int n_remain} partial_utf8, bool lazy, bool awaiting_trigger, ... }
    llama_grammar_element  { int type, uint32 value }                              (8 bytes)

A std::vector is three pointers (begin, end, capacity) in libstdc++, libc++ and MSVC alike; a std::string is
32 bytes in libstdc++ and MSVC and 24 in libc++. Every read is checked before it is trusted: the sampler's name
must be "grammar"; grammar_root must read as "root" in one of the three string layouts (which gives where the
grammar pointer is, and every read for that check lies inside the 64 bytes all three layouts have); the
grammar's first field must be the model's vocabulary; the rules and stacks must read as vectors, each rule
ending with an END element; each stack element must point at an element of a rule.
Where a check fails, `StateReader.key` returns None and the caller computes the mask without remembering it:
slower, never wrong.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections import OrderedDict

import numpy as np

_VEC = 24  # bytes of a std::vector: begin, end, capacity
_ELEMENT = 8  # bytes of a llama_grammar_element
LAYOUT_VERSIONS = ("0.3.36",)  # llama-cpp-python releases whose vendored llama.cpp has the layout below
MAX_STACKS = 1 << 16  # more stacks or deeper ones than this are taken as a misread: no key
MASK_BUDGET = 32 << 20  # bytes of packed masks kept per model and grammar text
GRAMMARS_KEPT = 4  # grammar texts per model whose masks are kept


def _address(pointer) -> int:
    """A pointer from llama-cpp-python (an int, or a ctypes pointer or c_void_p) as an int."""
    return pointer if isinstance(pointer, int) else ctypes.cast(pointer, ctypes.c_void_p).value or 0


def _word(addr: int) -> int:
    return ctypes.c_uint64.from_address(addr).value


def _words(addr: int, n: int) -> np.ndarray:
    return np.frombuffer(ctypes.string_at(addr, 8 * n), dtype=np.uint64) if n else np.zeros(0, np.uint64)


def _length(begin: int, end: int, cap: int, item: int) -> int | None:
    """The items of a std::vector from its three pointers; None when they do not read as one (not begin <= end <=
    capacity, part of an item, absurdly long)."""
    if not begin <= end <= cap or (end - begin) % item or (end - begin) // item >= MAX_STACKS:
        return None
    return (end - begin) // item


def _vector_ok(addr: int, item: int) -> bool:
    """Whether the std::vector at addr reads as one, with a buffer."""
    begin = _word(addr)
    return bool(begin) and _length(begin, _word(addr + 8), _word(addr + 16), item) is not None


def _grammar_field(ctx: int) -> int | None:
    """Where llama_sampler_grammar keeps its llama_grammar pointer, from how grammar_root ("root") is laid out;
    None when it is in none of the known layouts. Reads only the struct's first 64 bytes."""
    if _word(ctx + 40) == ctx + 56 and _word(ctx + 48) == 4 and ctypes.string_at(ctx + 56, 5) == b"root\0":
        return ctx + 72  # libstdc++: pointer, size, 16-byte buffer
    if ctypes.string_at(ctx + 40, 5) == b"root\0" and _word(ctx + 56) == 4:
        return ctx + 72  # MSVC: 16-byte buffer, size, capacity
    if ctypes.string_at(ctx + 32, 1)[0] in (4 << 1, 4) and ctypes.string_at(ctx + 33, 5) == b"root\0":
        return ctx + 56  # libc++: short string, size byte then the characters
    return None


class StateReader:
    """Reads one grammar sampler's state as a hashable key (None when its memory does not read as expected)."""

    def __init__(self, lib, sampler_ptr: int, vocab_ptr: int):
        self._grammar = None
        if (getattr(lib, "__version__", None) not in LAYOUT_VERSIONS or ctypes.sizeof(ctypes.c_void_p) != 8
                or lib.llama_sampler_name(sampler_ptr) != b"grammar"):
            return
        field = _grammar_field(_word(_address(sampler_ptr) + 8))
        if field is None:
            return
        grammar = _word(field)
        if not grammar or _word(grammar) != _address(vocab_ptr):
            return
        if not _vector_ok(grammar + 8, _VEC):
            return
        rules = _words(_word(grammar + 8), (_word(grammar + 16) - _word(grammar + 8)) // 8).reshape(-1, 3)
        # each rule a vector of elements ending with LLAMA_GRETYPE_END (type 0)
        if not 0 < len(rules) < MAX_STACKS or np.any(rules[:, 1] <= rules[:, 0]) or np.any(rules[:, 2] < rules[:, 1]) \
                or np.any((rules[:, 1] - rules[:, 0]) % _ELEMENT) \
                or any(ctypes.c_int32.from_address(end - _ELEMENT).value != 0 for end in rules[:, 1].tolist()):
            return
        if not _vector_ok(grammar + 32, _VEC):
            return
        order = np.argsort(rules[:, 0], kind="stable")
        self._begins, self._ends, self._order = rules[order, 0], rules[order, 1], order
        self._grammar = grammar

    def key(self) -> tuple | None:
        """The state as (stacks as sorted tuples of rule << 32 | element, the partial character (value, bytes
        to come) and the lazy flags); None when it cannot be read or a read fails its checks."""
        g = self._grammar
        if g is None:
            return None
        begin = _word(g + 32)
        n = _length(begin, _word(g + 40), _word(g + 48), _VEC)
        if n is None:
            return None
        stacks = []
        for b, e, cap in _words(begin, 3 * n).reshape(-1, 3).tolist():
            m = _length(b, e, cap, 8)
            if m is None:
                return None
            at = _words(b, m)
            i = np.searchsorted(self._begins, at, side="right") - 1
            if np.any(i < 0):
                return None
            off = at - self._begins[i]
            if np.any(at >= self._ends[i]) or np.any(off % _ELEMENT):
                return None
            stacks.append(tuple(((self._order[i].astype(np.uint64) << np.uint64(32)) | (off // _ELEMENT)).tolist()))
        value, remain = ctypes.c_uint32.from_address(g + 56).value, ctypes.c_int32.from_address(g + 60).value
        # the value of a finished character is left behind but never read again: only an open one counts
        return tuple(sorted(stacks)), (value if remain > 0 else 0, remain), ctypes.string_at(g + 64, 2)


class Masks:
    """Vocabulary masks (which tokens the grammar allows) by state key, least recently used dropped past
    MASK_BUDGET bytes; kept packed (one bit a token). Shared by the threads of a sweep."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab
        self._most = max(1, MASK_BUDGET // max(1, (n_vocab + 7) // 8))
        self._packed: OrderedDict = OrderedDict()
        self._making: dict = {}  # key -> Event, while one thread makes that state's mask
        self._lock = threading.Lock()

    def get(self, key, make) -> np.ndarray:
        """The mask remembered under `key`, or make()'s, then remembered. Sequences that reach a new state at the
        same step on different threads wait for the first one's mask instead of each making it."""
        while True:
            with self._lock:
                packed = self._packed.get(key)
                if packed is not None:
                    self._packed.move_to_end(key)
                    return np.unpackbits(packed, count=self.n_vocab).view(bool)
                waiting = self._making.get(key)
                if waiting is None:
                    waiting = self._making[key] = threading.Event()
                    break
            waiting.wait()  # then read it (or, had its maker failed, make it here)
        try:
            mask = make()
            with self._lock:
                self._packed[key] = np.packbits(mask)
                while len(self._packed) > self._most:
                    self._packed.popitem(last=False)
            return mask
        finally:
            with self._lock:
                del self._making[key]
            waiting.set()

    def __len__(self) -> int:
        return len(self._packed)


_MASKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MASKS_LOCK = threading.Lock()


def masks(model, gbnf: str) -> Masks:
    """The masks remembered for this model and grammar text: kept while the model lives, for its GRAMMARS_KEPT most
    recently used grammar texts (a server that is sent one grammar after another keeps a bounded amount)."""
    with _MASKS_LOCK:
        by_text = _MASKS.setdefault(model, OrderedDict())
        found = by_text.get(gbnf)
        if found is None:
            found = by_text[gbnf] = Masks(model.n_vocab)
        by_text.move_to_end(gbnf)
        while len(by_text) > GRAMMARS_KEPT:
            by_text.popitem(last=False)
        return found
