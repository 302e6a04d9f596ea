"""A tree of branches explored in `llamalens serve`: a run of kind "tree" that grows one branch at a time.

    branch 0, the root     the prompt's own generation
    branch b               parent p, position `at`, forced token ids (the alternative the user chose at `at`, or the
                           tokens of a continuation typed there); it is generated from
                               root prompt tokens + p's path[:at] + forced
                           and its path, what it shows, is p's path[:at] + the forced tokens + its own tokens
A branch is a sample of the run: planned (pending) when it starts, saved with its tokens when it ends (finished,
cancelled, or its client gone), so a server killed mid-generation loses only the branch in flight. What a sample
records beyond its tokens is a TreeExtra (samples.extra, versioned): parent, at, the forced tokens with their
records (the raw statistics of each forced token at its position; candidates 0: the chain did not choose it),
and the root's prompt token ids. A branch's settings are one of the run's configs (added as they come).

A tree has nothing pending to resume: the lifecycle's pending() says it grows in `llamalens serve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llamalens.errors import StoreError
from llamalens.records import RunOptions, TokenRecord
from llamalens.run.lifecycle import RunInterrupted
from llamalens.settings import SamplingSettings
from llamalens.store import RunInfo, Store

EXTRA_VERSION = 1


@dataclass
class TreeExtra:
    """What a branch records beyond its tokens (samples.extra)."""

    parent: int | None = None
    at: int | None = None
    forced: list[TokenRecord] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)  # the root's prompt ids (on the root only)

    def to_dict(self) -> dict:
        return {"tree": EXTRA_VERSION, "parent": self.parent, "at": self.at,
                "forced": [r.to_dict() for r in self.forced], "prompt_tokens": self.prompt_tokens}

    @classmethod
    def from_dict(cls, d: dict | None) -> "TreeExtra":
        d = d or {}
        return cls(d.get("parent"), d.get("at"), [TokenRecord.from_dict(r) for r in d.get("forced", [])],
                   list(d.get("prompt_tokens", [])))


@dataclass
class Branch:
    index: int
    parent: int | None
    at: int | None
    forced: list[TokenRecord]
    tokens: list[TokenRecord]  # its own, after the forced ones
    text: str
    finish_reason: str | None
    settings: SamplingSettings
    status: str = "done"

    def to_dict(self, path: list[TokenRecord]) -> dict:
        lps = [t.logprob for t in path]
        return {"branch": self.index, "parent": self.parent, "at": self.at, "status": self.status,
                "forced": [r.to_dict() for r in self.forced], "tokens": [t.to_dict() for t in path],
                "own_from": len(path) - len(self.tokens), "text": self.text, "finish_reason": self.finish_reason,
                "settings": self.settings.to_dict(), "sequence_logprob": sum(lps),
                "mean_logprob": sum(lps) / len(lps) if lps else None}


@dataclass
class Tree:
    """A tree run read back: its prompt, the root's prompt token ids and its branches by index."""

    info: RunInfo
    prompt: str
    prompt_tokens: list[int]
    branches: dict[int, Branch]

    def path(self, b: int) -> list[TokenRecord]:
        """The tokens a branch shows: its parent's path up to `at`, its forced tokens, its own."""
        br = self.branches[b]
        if br.parent is None:
            return list(br.tokens)
        return self.path(br.parent)[: br.at] + br.forced + br.tokens

    def generation_prompt(self, parent: int, at: int, forced: list[int]) -> list[int]:
        """The token ids a branch of `parent` forced at `at` is generated from."""
        return self.prompt_tokens + [t.id for t in self.path(parent)[:at]] + list(forced)

    def to_dict(self) -> dict:
        return {"tree": self.info.id, "name": self.info.name, "kind": self.info.kind, "status": self.info.status,
                "model": self.info.model.name, "prompt": self.prompt,
                "branches": [b.to_dict(self.path(i)) for i, b in sorted(self.branches.items())]}


def create_tree(store: Store, model, prompt: str, prompt_tokens: list[int], options: RunOptions, name: str | None,
                command: str) -> int:
    """A new tree run (no branch yet), running while its server holds it."""
    from llamalens.core.runtime import library_versions
    from llamalens.run.sweep import hardware

    return store.create_run(name=name, command=command, model=model.describe(), model_hash=store.model_hash(model.path),
                            versions=library_versions(), hardware=hardware(model), options=options, configs=[], plan=[],
                            kind=TREE.name)


def add_branch(store: Store, tree: int, prompt: str, settings: SamplingSettings, extra: TreeExtra) -> int:
    """A branch planned (pending) in the store before it is generated; its index."""
    config = store.add_config(tree, settings)
    return store.add_sample(tree, prompt, config, settings.seed, extra.to_dict())


def load_tree(store: Store, run_id: int | str) -> Tree:
    info = store.run(run_id)
    configs = store.configs(info.id)
    tokens = store.tokens_by_sample(info.id)
    branches, prompt, root_ids = {}, "", []
    for s in store.samples(info.id, only_done=False):
        x = TreeExtra.from_dict(s.extra)
        if s.sample_idx == 0 or x.parent is None:
            prompt, root_ids = s.prompt, x.prompt_tokens or root_ids
        branches[s.sample_idx] = Branch(s.sample_idx, x.parent, x.at, x.forced, tokens.get(s.sample_idx, []),
                                        s.text or "", s.finish_reason, configs[s.config_idx], s.status)
    return Tree(info, prompt, root_ids, branches)


def forced_record(model, row, token: int, position: int, n_logprobs: int) -> TokenRecord:
    """The record of a token the user forced at a position: its raw statistics in that position's row; the
    chain did not choose it (sampled_logprob NaN is stored as 0, candidates 0)."""
    from llamalens.core.confidence import renyi_to_uniform
    from llamalens.core.stats import RowStats
    from llamalens.records import alternatives

    st = RowStats.of(row, None, n_logprobs).for_token(row, token)
    text, hexb = model.token_text(token)
    lp = st.logprob if math.isfinite(st.logprob) else -1e30
    return TokenRecord(position, token, text, hexb, lp, 0.0, st.rank, st.entropy, 0,
                       alternatives(model.token_text, *st.top_lists(n_logprobs)), model.is_eog(token),
                       renyi=renyi_to_uniform(row, st.lse))


class TreeInterrupted(RunInterrupted):
    unit = "branches"


class TreeKind:
    """The tree run kind: grown by `llamalens serve`, never resumed."""

    name = "tree"
    interrupted = TreeInterrupted

    def pending(self, model, store, info):
        raise StoreError(f"run {info.id} is a tree of branches explored in `llamalens serve`; it has nothing to "
                         "resume: open it there, or read it with `llamalens show` / `export` / `report`")

    def decode(self, model, items, shared, stats):
        raise StoreError("a tree run is not decoded in chunks")

    def chunks(self, items, size):
        return [items]

    def keep_stats(self, store, run_id, stats) -> None:
        pass

    def finish(self, model, store, run_id, work) -> None:
        store.set_status(run_id, "done")


TREE = TreeKind()
