"""Checking a whole vocabulary against a grammar with llama.cpp's own check, called on far fewer tokens.

llama.cpp's grammar apply (llama_grammar_apply_impl) decodes each candidate's piece into code points and walks
the grammar's stacks with them; over Gemma's 262,144 tokens that takes a quarter of a second or more, which the
exact removed-mass figure needs for every state a constrained sample reaches. Two things here cut that cost
without changing a single answer:

- **The vocabulary's own prefix tree.** A token's parent is the longest other token whose piece is a proper
  prefix of its piece ending on a whole UTF-8 character (" the" is the parent of " there", " t" of " the").
  The grammar rejects a token as soon as one of its code points cannot be matched, so when it refuses the
  parent it refuses the child: the parent's first code points are the child's. The walk checks the roots
  (tokens with no parent: single characters, end-of-generation tokens, empty pieces, pieces that do not begin
  with a whole character), then level by level only the children of the tokens it allowed. Where the grammar
  allows few characters (between JSON values, inside a number) that is a few percent of the vocabulary; inside
  a free string it is all of it, as before. A grammar left in the middle of a character by the previous token
  changes nothing: llama.cpp then refuses every piece that begins with a first byte, parents and children
  alike, and pieces that begin with a continuation byte are roots.
- **Threads.** llama.cpp's apply reads the grammar's state and never writes it (the function takes it const)
  and checks each candidate on its own, so a long list is cut into slices checked at once on the model's
  threads (ctypes releases the GIL during the call).

The tree is built once per model from its pieces as llama.cpp renders them for the grammar (special tokens as
text), about a second for Gemma's vocabulary, and kept while the model lives. GrammarSampler walks the whole
vocabulary once per grammar state and remembers the mask under the state (grammar_state.py).
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

SLICE_MIN = 16384  # candidates a thread checks at least: below that, starting threads costs more than it saves
WALK_MIN = 4096  # shorter lists are checked directly: the walk over the whole vocabulary would cost more


@dataclass(frozen=True)
class Prefixes:
    """The vocabulary's prefix tree: each token's parent (-1 for a root) and the token ids by depth."""

    parent: np.ndarray  # int32, one per token id
    levels: tuple[np.ndarray, ...]  # levels[0]: the roots; levels[d]: the tokens whose parent is in levels[d - 1]

    @staticmethod
    def of(pieces: list[bytes], eog: set[int]) -> "Prefixes":
        index: dict[bytes, int] = {}
        for t, p in enumerate(pieces):
            if t not in eog and p:
                index.setdefault(p, t)
        parent = np.full(len(pieces), -1, dtype=np.int32)
        for t, p in enumerate(pieces):
            if t in eog or not p or p[0] == 0:
                continue
            for k in range(len(p) - 1, 0, -1):
                found = index.get(p[:k])
                if found is not None and _whole_characters(p[:k]):
                    parent[t] = found
                    break
        depth, has = np.zeros(len(pieces), dtype=np.int32), parent >= 0
        while True:  # as many rounds as the longest chain of prefixes
            deeper = np.where(has, depth[np.maximum(parent, 0)] + 1, 0).astype(np.int32)
            if np.array_equal(deeper, depth):
                break
            depth = deeper
        return Prefixes(parent, tuple(np.flatnonzero(depth == d).astype(np.int32) for d in range(depth.max() + 1)))

    def walk(self, check_ids: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, known: np.ndarray,
             ok: np.ndarray) -> None:
        """Settle `ids` in the masks `known` (decided in this state) and `ok` (allowed), from check_ids
        (llama.cpp's check of a list of ids: a bool per id) called level by level on the roots among them and
        their ancestors, then only on the children of allowed tokens: a child of a refused token is refused
        unchecked. Tokens already known are not checked again."""
        need = np.zeros(len(self.parent), dtype=bool)
        need[ids] = True
        need &= ~known
        frontier = need
        while True:  # the ancestors of what is needed, up to the known ones or the roots
            up = self.parent[frontier & (self.parent >= 0)]
            up = up[~known[up] & ~need[up]]
            if not len(up):
                break
            need[up] = True
            frontier = np.zeros_like(need)
            frontier[up] = True
        for d, level in enumerate(self.levels):
            level = level[need[level]]
            if not len(level):
                continue
            todo = level if d == 0 else level[ok[self.parent[level]]]
            known[level] = True  # the rest of the level: children of refused tokens
            if len(todo):
                ok[todo] = check_ids(todo)

def _whole_characters(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_PREFIXES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


_PREFIXES_LOCK = threading.Lock()


def prefixes(model) -> Prefixes:
    """The model's prefix tree, built on first use (once, by whichever thread of a sweep gets there first) and kept
    while the model lives."""
    with _PREFIXES_LOCK:
        found = _PREFIXES.get(model)
        if found is None:
            found = _PREFIXES[model] = Prefixes.of([model.piece(t) for t in range(model.n_vocab)],
                                                   set(model.eog_tokens()))
        return found


@functools.lru_cache(maxsize=4)
def _pool(threads: int):
    """The threads that check slices of a candidate list (kept for the process's life)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads, thread_name_prefix="llamalens-grammar")


def in_slices(check: Callable[[int, int], None], n: int, threads: int) -> None:
    """check(start, stop) over [0, n) in slices of at least SLICE_MIN, at once on up to `threads` threads."""
    slices = min(threads, n // SLICE_MIN) or 1
    bounds = [n * i // slices for i in range(slices + 1)]
    if slices == 1:
        check(0, n)
    else:
        list(_pool(threads).map(lambda i: check(bounds[i], bounds[i + 1]), range(slices)))
