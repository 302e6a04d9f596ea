"""Stored runs in the explorer's token view, and a stored sample adopted as the root of a new tree so that it can be
branched from when its model file is the loaded one.

Each run kind says how its samples read as branches (RunKind.explore, run/kinds.py): a sweep's samples are roots
side by side; a fork's continuations are branches of its base path, forced at their position; a tree is itself.
A kind whose records are not token sequences (a lens, a comparison of models) is refused with a 400 that names
the commands that show it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llamalens.errors import InvalidInput
from llamalens.records import RunOptions, Sample, Timing, TokenRecord
from llamalens.run.tree import TreeExtra, add_branch, create_tree, load_tree
from llamalens.serve.explorer import Explorer
from llamalens.settings import SamplingSettings
from llamalens.store import RunInfo, Store

MAX_SAMPLES = 500  # samples a stored run shows in the explorer


@dataclass
class StoredBranch:
    """One sample of a stored run as the token view shows it: its whole path of records (a branch's parent's first
    `at`, its forced ones, its own), numbered from 0."""

    index: int
    path: list[TokenRecord]
    prompt: str
    settings: SamplingSettings
    text: str = ""
    finish_reason: str | None = None
    status: str = "done"
    parent: int | None = None
    at: int | None = None
    forced: list[TokenRecord] = field(default_factory=list)
    prompt_tokens: list[int] | None = None  # the ids the path follows (None: the prompt's own tokenization)

    def to_dict(self) -> dict:
        lps = [t.logprob for t in self.path]
        own_from = 0 if self.parent is None else (self.at or 0) + len(self.forced)
        return {"branch": self.index, "parent": self.parent, "at": self.at, "status": self.status,
                "forced": [r.to_dict() for r in self.forced], "tokens": [t.to_dict() for t in self.path],
                "own_from": own_from, "text": self.text, "finish_reason": self.finish_reason, "prompt": self.prompt,
                "settings": self.settings.to_dict(), "sequence_logprob": sum(lps),
                "mean_logprob": sum(lps) / len(lps) if lps else None}


def _numbered(records: list[TokenRecord]) -> list[TokenRecord]:
    return [replace(t, position=i) for i, t in enumerate(records)]


def samples_as_branches(store: Store, info: RunInfo) -> list[StoredBranch]:
    """A run whose samples are each a prompt and its generated tokens (a sweep: sampled, greedy, beams): roots."""
    configs = store.configs(info.id)
    tokens = store.tokens_by_sample(info.id)
    return [StoredBranch(s.sample_idx, _numbered(tokens.get(s.sample_idx, [])), s.prompt,
                         configs[s.config_idx] if s.config_idx < len(configs) else SamplingSettings(), s.text or "",
                         s.finish_reason, s.status)
            for s in store.samples(info.id, only_done=False)[:MAX_SAMPLES]]


def fork_as_branches(store: Store, info: RunInfo) -> list[StoredBranch]:
    """A fork run: its base path as the root, each continuation a branch of it forced at its position (the forced
    token's record is the base's alternative there: its raw statistics at that position)."""
    from llamalens.run.fork_records import Continuation, is_continuation

    out = samples_as_branches(store, info)
    base = out[0].path if out else []
    for b, s in zip(out[1:], store.samples(info.id, only_done=False)[1:MAX_SAMPLES]):
        if not is_continuation(s.extra):
            continue
        c = Continuation.from_dict(s.extra)
        forced = _forced_from(base[c.position], c) if c.position < len(base) else None
        if forced is None:  # a position past the base path's stored tokens: shown as its own root
            continue
        b.parent, b.at, b.forced = 0, c.position, [forced]
        b.path = _numbered(base[: c.position] + [forced] + b.path)
    return out


def _forced_from(there: TokenRecord, c) -> TokenRecord | None:
    """The record of the token a continuation forced where the base path has `there`."""
    if c.forced_token == there.id:
        return there
    k = next((k for k, a in enumerate(there.top) if a.id == c.forced_token), None)
    if k is None:
        return None
    a = there.top[k]
    return TokenRecord(there.position, a.id, a.text, a.bytes, a.logprob, 0.0, k + 1, there.entropy, 0, there.top,
                       renyi=there.renyi)


def tree_as_branches(store: Store, info: RunInfo) -> list[StoredBranch]:
    """A tree run: its branches as they are."""
    tree = load_tree(store, info.id)
    return [StoredBranch(i, _numbered(tree.path(i)), tree.prompt, b.settings, b.text, b.finish_reason, b.status,
                         b.parent, b.at, b.forced, tree.prompt_tokens)
            for i, b in sorted(tree.branches.items())]


def _branches(st: Store, info: RunInfo) -> list[StoredBranch]:
    from llamalens.run.kinds import kind

    k = kind(info.kind)
    if not k.explore:
        raise InvalidInput(f"run {info.id} is a {info.kind} run: its records are not a generated text, so the token "
                           f"view cannot show it; `llamalens show {info.id}` or `llamalens report {info.id} -o "
                           f"{info.kind}.html` does")
    return k.hook("explore")(st, info)


def stored_run(explorer: Explorer, run_id: int) -> dict:
    """A stored run in the tree format: `tree` is its id when it is a tree (it grows), else None; `branchable`
    whether the loaded model file made it."""
    st = explorer.store()
    info = st.run(run_id)
    branches = _branches(st, info)
    is_tree = all(b.prompt_tokens is not None for b in branches) and bool(branches)
    return {"tree": info.id if is_tree else None, "run": info.id, "name": info.name, "kind": info.kind,
            "status": info.status, "model": info.model.name, "prompt": branches[0].prompt if branches else "",
            "branches": [b.to_dict() for b in branches], "truncated": info.n_done > MAX_SAMPLES,
            "branchable": explorer.made_here(info)}


def adopt(explorer: Explorer, run_id: int, sample_idx: int) -> dict:
    """A new tree whose root is a stored sample's whole path (its records copied, nothing decoded): {tree, branch: 0}."""
    st = explorer.store()
    info = st.run(run_id)
    if not explorer.made_here(info):
        raise InvalidInput(f"run {run_id} was made with another model file ({info.model.name}); restart the server "
                           "with that model to branch from it")
    stored = next((b for b in _branches(st, info) if b.index == sample_idx and b.status == "done"), None)
    if stored is None:
        raise InvalidInput(f"run {run_id} has no finished sample {sample_idx}")
    prompt, records = stored.prompt, stored.path
    ids = list(stored.prompt_tokens) if stored.prompt_tokens is not None else explorer.model.prompt_tokens(prompt)
    options = RunOptions(prompts=(prompt,), model_options=explorer.model.options, parallel=1)
    tid = create_tree(st, explorer.model, prompt, ids, options, f"from run {info.id} sample {sample_idx}",
                      explorer.command)
    explorer.adopted(tid)
    extra = TreeExtra(prompt_tokens=ids)
    b = add_branch(st, tid, prompt, stored.settings, extra)
    text = "".join(t.text for t in records if not t.eog)
    st.save_sample(tid, b, Sample(prompt, ids, stored.settings.to_dict(), len(records), text,
                                  stored.finish_reason or "length", records, Timing(len(ids), len(records), 0, 0, 0)),
                   extra=extra.to_dict())
    return {"tree": tid, "branch": b}
