"""Any stored run in the explorer's tree format (each sample a branch without a parent), and a stored sample
adopted as the root of a new tree, so that it can be branched from when its model file is the loaded one."""

from __future__ import annotations

from dataclasses import replace

from llamalens.errors import InvalidInput
from llamalens.records import RunOptions, Sample, Timing
from llamalens.run.tree import TREE, TreeExtra, add_branch, create_tree, load_tree
from llamalens.serve.explorer import Explorer

MAX_SAMPLES = 500  # samples a stored run shows in the explorer


def stored_run(explorer: Explorer, run_id: int) -> dict:
    st = explorer.store()
    info = st.run(run_id)
    if info.kind == TREE.name:
        return dict(load_tree(st, run_id).to_dict(), branchable=explorer.made_here(info))
    configs = st.configs(info.id)
    samples = st.samples(info.id)[:MAX_SAMPLES]
    tokens = st.tokens_by_sample(info.id)
    branches = []
    for s in samples:
        path = tokens.get(s.sample_idx, [])
        lps = [t.logprob for t in path]
        branches.append({"branch": s.sample_idx, "parent": None, "at": None, "status": s.status, "forced": [],
                         "tokens": [t.to_dict() for t in path], "own_from": 0, "text": s.text or "",
                         "finish_reason": s.finish_reason, "prompt": s.prompt,
                         "settings": configs[s.config_idx].to_dict() if s.config_idx < len(configs) else {},
                         "sequence_logprob": sum(lps), "mean_logprob": sum(lps) / len(lps) if lps else None})
    return {"tree": None, "run": info.id, "name": info.name, "kind": info.kind, "status": info.status,
            "model": info.model.name, "prompt": samples[0].prompt if samples else "", "branches": branches,
            "truncated": info.n_done > MAX_SAMPLES, "branchable": explorer.made_here(info)}


def adopt(explorer: Explorer, run_id: int, sample_idx: int) -> dict:
    """A new tree whose root is a stored sample (its tokens copied, nothing decoded): {tree, branch: 0}."""
    st = explorer.store()
    info = st.run(run_id)
    if not explorer.made_here(info):
        raise InvalidInput(f"run {run_id} was made with another model file ({info.model.name}); restart the server "
                           "with that model to branch from it")
    sample = next((s for s in st.samples(info.id) if s.sample_idx == sample_idx), None)
    if sample is None:
        raise InvalidInput(f"run {run_id} has no finished sample {sample_idx}")
    if info.kind == TREE.name:
        tree = load_tree(st, run_id)
        ids = tree.generation_prompt(sample_idx, len(tree.path(sample_idx)), [])
        prompt = tree.prompt
        # a branch's path joins its parent's records, its forced ones and its own: numbered again from 0
        records = [replace(t, position=i) for i, t in enumerate(tree.path(sample_idx))]
    else:
        prompt, records = sample.prompt, [t for _, t in st.tokens(info.id, sample_idx)]
        ids = explorer.model.prompt_tokens(prompt)
    settings = st.configs(info.id)[sample.config_idx]
    options = RunOptions(prompts=(prompt,), model_options=explorer.model.options, parallel=1)
    tid = create_tree(st, explorer.model, prompt, ids, options, f"from run {info.id} sample {sample_idx}",
                      explorer.command)
    explorer.adopted(tid)
    extra = TreeExtra(prompt_tokens=ids)
    b = add_branch(st, tid, prompt, settings, extra)
    text = "".join(t.text for t in records if not t.eog)
    st.save_sample(tid, b, Sample(prompt, ids, settings.to_dict(), len(records), text, sample.finish_reason or "length",
                                  records, sample.timing or Timing(len(ids), len(records), 0, 0, 0)), extra=extra.to_dict())
    return {"tree": tid, "branch": b}
