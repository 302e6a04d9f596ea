"""The logit lens of a prompt: what each layer would predict at each position, and its stored runs.

    LensSpec (prompt, targets, positions, layers, top) ──check()──► lens(model, spec[, other]) ──► LensResult
        core/unembed.Head(model.header)    the final norm and output matrix; an unknown architecture is refused
        core/lens.capture(...)             one decode; each layer's residual stream at the wanted positions
        core/unembed.project_together(...) per cell: top N, entropy, KL to the model's own distribution, the rank
                                           and probability of the model's final top token and of each target;
                                           with a second model (same vocabulary and layers), its lens of the same
                                           cells and KL(first || second) there, in the same pass

A cell (position p, layer l) is the distribution of the token after p that the model's head gives the residual
stream after layer l. The last layer's cell is the model's own distribution recomputed: its largest difference
from llama.cpp's logits (`final_check`) is measured on every run and stored with it.

A run of kind "lens" stores one LensResult (its single sample's extra); `show`, `report` and `export` read it.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from llamalens.errors import InvalidInput, LlamalensError, StoreError
from llamalens.records import Rich
from llamalens.run.lifecycle import RunInterrupted
from llamalens.run.tree import TreeKind

MAX_TOKENS = 512  # prompt tokens: one decode, one batch
MAX_POSITIONS = 128  # positions looked at (each keeps the model's logits row: n_vocab floats)
DEFAULT_POSITIONS = 32  # without --positions: the last this many
MAX_CELLS = 8192  # positions x layers
MAX_TOP = 50
MAX_TARGETS = 8
KEEP = 10  # top tokens computed per cell at least: the last-layer check compares the top 10
EXTRA_VERSION = 1


@dataclass
class LensSpec:
    """What a lens looks at: `positions` and `layers` as the user wrote them ("0,4,-1", "2:10", None = default)."""

    prompt: str
    targets: list[str] = field(default_factory=list)
    positions: str | None = None
    layers: str | None = None
    top: int = 5
    attention: str | None = None  # a prompt position ("-1"): each layer's attention weights of that token, per head

    def check(self) -> "LensSpec":
        if not isinstance(self.prompt, str) or not self.prompt:
            raise InvalidInput("the lens needs a non-empty prompt")
        if not 1 <= int(self.top) <= MAX_TOP:
            raise InvalidInput(f"--top {self.top} is out of range; give 1 to {MAX_TOP}")
        if len(self.targets) > MAX_TARGETS:
            raise InvalidInput(f"{len(self.targets)} targets; the lens follows at most {MAX_TARGETS}: give fewer --target")
        if any(not t for t in self.targets):
            raise InvalidInput("a --target is empty; give the text of a token, e.g. --target ' Paris'")
        for text, what in ((self.positions, "--positions"), (self.layers, "--layers")):
            if text is not None and not re.fullmatch(r"\s*-?\d*\s*(:\s*-?\d*\s*)?(,\s*-?\d*\s*(:\s*-?\d*\s*)?)*", text):
                raise InvalidInput(f"{what} {text!r} is not a list of indices; write e.g. '0,4,-1' or '2:10' "
                                   "(a Python slice: -1 is the last, 2:10 stops before 10)")
        if self.attention is not None and not re.fullmatch(r"\s*-?\d+\s*", str(self.attention)):
            raise InvalidInput(f"--attention {self.attention!r} is not one position; write e.g. -1 (the last token) "
                               "or 5")
        return self


def indices(text: str | None, n: int, what: str, default: list[int]) -> list[int]:
    """'0,4,-1' / '2:10' / ':' -> sorted distinct indices in range(n); None -> default."""
    if text is None or not text.strip():
        return default
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if ":" in part:
            a, b = (s.strip() for s in part.split(":", 1))
            out.update(range(n)[slice(int(a) if a else None, int(b) if b else None)])
            continue
        i = int(part)
        if not -n <= i < n:
            raise InvalidInput(f"{what} {i} is out of range: there are {n} (0 to {n - 1}, or -1 for the last)")
        out.add(i % n)
    if not out:
        raise InvalidInput(f"{what} {text!r} selects nothing of 0 to {n - 1}")
    return sorted(out)


@dataclass
class Ranked:
    """A token followed through the layers: its text, and at one cell its probability and rank."""

    id: int
    text: str
    prob: float = 0.0
    logprob: float = 0.0
    rank: int = 0


def _ranked_dicts(tokens: list[Ranked]) -> list[dict]:
    return [{"id": t.id, "text": t.text, "prob": t.prob, "logprob": t.logprob} for t in tokens]


def _ranked_list(items: list[dict]) -> list[Ranked]:
    return [Ranked(t["id"], t["text"], t["prob"], t["logprob"], i + 1) for i, t in enumerate(items)]


@dataclass
class OtherCell:
    """The second model's lens at the same cell (`lens -m A -m B`): KL(A || B) between the two cells'
    distributions, whether their top tokens agree, and B's top tokens."""

    kl: float
    same_top: bool
    top: list[Ranked]

    def to_dict(self) -> dict:
        return {"kl": self.kl, "same_top": self.same_top, "top": _ranked_dicts(self.top)}

    @classmethod
    def from_dict(cls, d: dict) -> "OtherCell":
        return cls(d["kl"], d["same_top"], _ranked_list(d["top"]))


@dataclass
class LensCell:
    layer: int
    top: list[Ranked]
    entropy: float
    kl_to_final: float
    final: Ranked  # the model's final top token at this position
    target: list[Ranked]
    other: OtherCell | None = None  # with two models: the second one's lens here

    def to_dict(self) -> dict:
        d = {"layer": self.layer, "top": _ranked_dicts(self.top),
             "entropy": self.entropy, "kl_to_final": self.kl_to_final,
             "final": {"id": self.final.id, "text": self.final.text, "prob": self.final.prob,
                       "rank": self.final.rank},
             "target": [{"text": t.text, "id": t.id, "prob": t.prob, "rank": t.rank} for t in self.target]}
        if self.other is not None:
            d["other"] = self.other.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LensCell":
        return cls(d["layer"], _ranked_list(d["top"]),
                   d["entropy"], d["kl_to_final"], Ranked(**{"logprob": 0.0, **d["final"]}),
                   [Ranked(t["id"], t["text"], t["prob"], 0.0, t["rank"]) for t in d["target"]],
                   OtherCell.from_dict(d["other"]) if d.get("other") else None)


@dataclass
class LensPosition:
    position: int
    token: str  # the prompt's token at this position (visible text is made by the printers)
    next: str | None  # the prompt's next token, when there is one
    layers: list[LensCell]
    settles_at: int | None  # the first layer from which the final top token is the top token at every later layer

    def to_dict(self) -> dict:
        return {"position": self.position, "token": self.token, "next": self.next, "settles_at": self.settles_at,
                "layers": [c.to_dict() for c in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "LensPosition":
        return cls(d["position"], d["token"], d.get("next"), [LensCell.from_dict(c) for c in d["layers"]],
                   d.get("settles_at"))


@dataclass
class LensResult(Rich):
    """A prompt's logit lens: its positions (each with its layers, the model's last layer last). In a notebook it
    shows as its report; to_pandas(): a row per (position, layer) cell."""

    _display = "lens"

    prompt: str
    tokens: list[str]  # every prompt token's text
    targets: list[dict]  # {"text", "id", "token", "n_tokens"}: the first token of each target is followed
    layers: list[int]
    n_layer: int
    positions: list[LensPosition]
    head: dict  # core/unembed.Head.describe()
    final_check: dict  # {"max_abs_logprob_diff", "same_top10"}: the last layer against llama.cpp's logits
    model: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    run_id: int | None = None
    other: dict | None = None  # with two models: the second's {"model", "head", "final_check"}; cells hold its lens
    attention: dict | None = None  # {"position", "layers": [{"layer", "heads": [[weight per position 0..p]]}]}

    def to_dict(self) -> dict:
        return {"lens": EXTRA_VERSION, "prompt": self.prompt, "tokens": self.tokens, "targets": self.targets,
                "layers": self.layers, "n_layer": self.n_layer, "head": self.head, "final_check": self.final_check,
                "model": self.model, "notes": self.notes, "run_id": self.run_id, "other": self.other,
                "attention": self.attention,
                "positions": [p.to_dict() for p in self.positions]}

    @classmethod
    def from_dict(cls, d: dict) -> "LensResult":
        if not isinstance(d, dict) or d.get("lens") != EXTRA_VERSION:
            raise StoreError("this lens run was stored by another llamalens version; run the lens again")
        return cls(d["prompt"], d["tokens"], d["targets"], d["layers"], d["n_layer"],
                   [LensPosition.from_dict(p) for p in d["positions"]], d["head"], d["final_check"],
                   d.get("model", {}), d.get("notes", []), d.get("run_id"), d.get("other"), d.get("attention"))

    def to_pandas(self, table: str = "cells"):
        """table "cells": a row per (position, layer); "attention" (with --attention): a row per (layer, head,
        attended position) with its weight."""
        import pandas as pd

        if table not in ("cells", "attention"):
            raise InvalidInput(f"table {table!r}: a lens has the tables 'cells' and 'attention'")
        return pd.DataFrame(self.cells() if table == "cells" else self.attention_rows())

    def cells(self) -> list[dict]:
        """One row per (position, layer): the table `export` writes and the Python API's DataFrame."""
        rows = []
        for p in self.positions:
            for c in p.layers:
                row = {"position": p.position, "token": p.token, "layer": c.layer, "top_id": c.top[0].id,
                       "top_text": c.top[0].text, "top_prob": c.top[0].prob, "entropy": c.entropy,
                       "kl_to_final": c.kl_to_final, "final_id": c.final.id, "final_text": c.final.text,
                       "final_prob": c.final.prob, "final_rank": c.final.rank}
                for k, t in enumerate(c.target):
                    row[f"target{k}_text"], row[f"target{k}_prob"], row[f"target{k}_rank"] = t.text, t.prob, t.rank
                if c.other is not None:
                    row.update(other_kl=c.other.kl, other_same_top=c.other.same_top, other_top_id=c.other.top[0].id,
                               other_top_text=c.other.top[0].text, other_top_prob=c.other.top[0].prob)
                rows.append(row)
        return rows

    def attention_rows(self) -> list[dict]:
        """With --attention: a row per (layer, head, attended position) with its weight (the attention table)."""
        if self.attention is None:
            return []
        return [{"position": self.attention["position"], "layer": a["layer"], "head": h, "attended": k,
                 "attended_token": self.tokens[k], "weight": w}
                for a in self.attention["layers"] for h, row in enumerate(a["heads"]) for k, w in enumerate(row)]

    def by_layer(self) -> list[dict]:
        """With two models: per layer, KL(A || B) over the positions (mean, max) and the share of positions whose
        top tokens agree."""
        if self.other is None:
            return []
        out = []
        for k, layer in enumerate(self.layers):
            cells = [p.layers[k].other for p in self.positions]
            kl = [c.kl for c in cells]
            out.append({"layer": layer, "mean_kl": float(np.mean(kl)), "max_kl": float(np.max(kl)),
                        "same_top": sum(c.same_top for c in cells) / len(cells)})
        return out


def settles_at(top_ids: list[int], layers: list[int], final: int) -> int | None:
    """The first layer from which `final` is the top token at every later layer looked at (None: never)."""
    at = None
    for layer, top in zip(layers, top_ids):
        if top != final:
            at = None
        elif at is None:
            at = layer
    return at


def _sizes(model, spec: LensSpec, n_tokens: int, n_layer: int) -> tuple[list[int], list[int]]:
    if n_tokens > MAX_TOKENS:
        raise InvalidInput(f"the prompt is {n_tokens} tokens; the lens decodes at most {MAX_TOKENS} in one batch: "
                           "shorten it")
    model.check_fits(n_tokens, model.options.ctx)
    positions = indices(spec.positions, n_tokens, "--positions",
                        list(range(max(0, n_tokens - DEFAULT_POSITIONS), n_tokens)))
    layers = indices(spec.layers, n_layer, "--layers", list(range(n_layer)))
    layers = sorted(set(layers) | {n_layer - 1})  # the last layer: the reference and the check
    if len(positions) > MAX_POSITIONS or len(positions) * len(layers) > MAX_CELLS:
        raise InvalidInput(f"{len(positions)} positions x {len(layers)} layers is too many cells (at most "
                           f"{MAX_POSITIONS} positions and {MAX_CELLS} cells); narrow --positions or --layers")
    return positions, layers


def _target_tokens(model, targets: list[str]) -> list[dict]:
    out = []
    for text in targets:
        ids = model.tokenize(text, add_bos=False, special=False)
        if not ids:
            raise InvalidInput(f"the target {text!r} makes no token; give a text the model can spell")
        out.append({"text": text, "id": ids[0], "token": model.token_text(ids[0])[0], "n_tokens": len(ids)})
    return out


@dataclass
class _Look:
    """One model's decode of the prompt for the lens: its head, the cells' residual streams and its own logits."""

    head: object  # core/unembed.Head
    tokens: list[int]
    positions: list[int]
    layers: list[int]
    n_layer: int
    capture: object  # core/lens.Capture
    tracked: np.ndarray  # [P, 1 + targets]: the model's final top token, then the targets


def _look(model, spec: LensSpec, targets: list[dict] | None = None,
          attention_at: int | None = None) -> tuple[_Look, list[dict]]:
    from llamalens.core.lens import capture
    from llamalens.core.unembed import Head

    head = Head(model.header)  # refuses an architecture it does not know before anything is decoded
    n_layer = int(model.header.arch_key("block_count") or 0)
    tokens = model.prompt_tokens(spec.prompt)
    positions, layers = _sizes(model, spec, len(tokens), n_layer)
    targets = _target_tokens(model, spec.targets) if targets is None else targets
    cap = capture(model, tokens, positions, layers, attention_at)
    final_top = cap.logits.argmax(axis=1)
    tracked = np.stack([final_top] + [np.full(len(positions), t["id"]) for t in targets], axis=1)
    return _Look(head, tokens, positions, layers, n_layer, cap, tracked), targets


def _check_pair(a_model, b_model, a: _Look, b_tokens: list[int], b_layers: int) -> None:
    from llamalens.looks.compare import check_same_vocab

    check_same_vocab(a_model, b_model)
    if b_tokens != a.tokens:
        raise InvalidInput(f"{a_model.path.name} and {b_model.path.name} tokenize the prompt differently; their "
                           "lenses cannot be compared position by position")
    if b_layers != a.n_layer:
        raise InvalidInput(f"{a_model.path.name} has {a.n_layer} layers and {b_model.path.name} {b_layers}; the lens "
                           "compares two models layer by layer (give two quantizations of one model)")


def _check(pr, look: _Look) -> dict:
    own_top10 = np.argsort(-look.capture.logits, axis=1, kind="stable")[:, :KEEP]
    return {"max_abs_logprob_diff": float(pr.final_error.max()),
            "same_top10": bool((own_top10 == pr.top_ids[:, -1, :KEEP]).all())}


def lens(model, spec: LensSpec, other=None) -> LensResult:
    """The logit lens of spec.prompt on a loaded Model (core/runtime.py). `other`: with two models, a callable
    that loads the second (a context manager closing it): it is decoded while the first stays loaded, closed, and
    both are projected in one pass; each cell then also holds the second's lens and KL(first || second)."""
    from llamalens.core.unembed import project_together

    spec.check()
    at = _attention_position(model, spec)
    a, targets = _look(model, spec, attention_at=at)
    looks, other_info = [a], None
    if other is not None:
        with other() as m_b:
            n_layer_b = int(m_b.header.arch_key("block_count") or 0)
            _check_pair(model, m_b, a, m_b.prompt_tokens(spec.prompt), n_layer_b)
            b, _ = _look(m_b, spec, targets)
            b.tracked[:, 1:] = a.tracked[:, 1:]  # the same target ids (one vocabulary)
            looks.append(b)
            other_info = {"model": m_b.info.to_dict(), "head": b.head.describe()}
    keep = max(spec.top, KEEP)
    prs, agree = project_together([(x.head, x.capture.hidden.transpose(1, 0, 2), x.capture.logits, x.tracked)
                                   for x in looks], keep)
    notes = [f"target {t['text']!r} is {t['n_tokens']} tokens; the lens follows its first, {t['token']!r}"
             for t in targets if t["n_tokens"] > 1]
    if other_info is not None:
        other_info["final_check"] = _check(prs[1], looks[1])
    texts = [model.token_text(t)[0] for t in a.tokens]
    out = []
    for j, p in enumerate(a.positions):
        cells = [_cell(model, prs[0], j, k, layer, a.tracked[j], targets, spec.top) for k, layer in enumerate(a.layers)]
        if agree is not None:
            for k, c in enumerate(cells):
                c.other = OtherCell(float(agree.kl[j, k]), bool(agree.same_top[j, k]),
                                    _tops(model, prs[1], j, k, spec.top))
        out.append(LensPosition(p, texts[p], texts[p + 1] if p + 1 < len(a.tokens) else None, cells,
                                settles_at([c.top[0].id for c in cells], a.layers, int(a.tracked[j, 0]))))
    return LensResult(spec.prompt, texts, targets, a.layers, a.n_layer, out, a.head.describe(), _check(prs[0], a),
                      model=model.info.to_dict(), notes=notes, other=other_info,
                      attention=None if at is None else _attention(a.capture.attention, at))


# the weight a row may put outside positions 0..p (float32 rounding of a softmax; more means the KV cells do not
# hold the positions in order, and the weights are not shown)
OUTSIDE_TOLERANCE = 1e-4


def _attention_position(model, spec: LensSpec) -> int | None:
    """The prompt position whose attention is recorded (None: none); refused unless flash attention is off."""
    if spec.attention is None:
        return None
    if model.options.flash_attn != "off":
        raise InvalidInput("the attention view reads the attention weights, which flash attention never forms: load the "
                           "model with flash attention off (--flash-attn off; the command sets it with --attention)")
    n = len(model.prompt_tokens(spec.prompt))
    return indices(str(spec.attention), n, "--attention", [])[0]


def _attention(weights: dict, at: int) -> dict:
    layers = []
    for layer in sorted(weights):
        w = weights[layer].astype(np.float64)
        outside = float(w[:, at + 1:].sum(axis=1).max(initial=0.0))
        if outside > OUTSIDE_TOLERANCE or np.abs(w[:, : at + 1].sum(axis=1) - 1).max() > OUTSIDE_TOLERANCE:
            raise LlamalensError(f"layer {layer}'s attention weights put {outside:.2g} outside positions 0 to {at}: the KV "
                             "cache does not hold the prompt in order here, so they cannot be placed on its tokens")
        layers.append({"layer": layer, "heads": [[float(x) for x in row] for row in weights[layer][:, : at + 1]]})
    return {"position": at, "layers": layers}


def _ranked(model, t: int, lp: float, rank: int) -> Ranked:
    return Ranked(int(t), model.token_text(int(t))[0], float(np.exp(lp)), float(lp), int(rank))


def _tops(model, pr, j: int, k: int, top: int) -> list[Ranked]:
    return [_ranked(model, t, lp, i + 1) for i, (t, lp) in enumerate(zip(pr.top_ids[j, k, :top],
                                                                          pr.top_logprobs[j, k, :top]))]


def _cell(model, pr, j: int, k: int, layer: int, tracked, targets: list[dict], top: int) -> LensCell:
    followed = [_ranked(model, t, pr.tracked_logprobs[j, k, q], pr.tracked_ranks[j, k, q])
                for q, t in enumerate(tracked)]
    for f, t in zip(followed[1:], targets):
        f.text = t["text"]
    return LensCell(layer, _tops(model, pr, j, k, top), float(pr.entropy[j, k]), float(pr.kl[j, k]), followed[0],
                    followed[1:])


@contextmanager
def lens_of(models: list, spec: LensSpec, load, say=None):
    """The lens of one model, or of two compared layer by layer: `load(model, analysis)` loads one as a context
    manager (with the memory check's `analysis`; `say`, memory_need's); yields (the first model, still loaded, and
    the LensResult)."""
    if not 1 <= len(models) <= 2:
        raise InvalidInput(f"the lens takes one model, or two to compare (-m A -m B); got {len(models)}")
    need = memory_need(spec, len(models), say)
    with load(models[0], need) as model:
        yield model, lens(model, spec, None if len(models) == 1 else (lambda: load(models[1], need)))


def _most_positions(spec: LensSpec) -> int:
    """The most positions the spec can select, known before the prompt is tokenized (a token has at least one
    byte; with BOS and EOS at most 2 more)."""
    most = min(MAX_POSITIONS, len(spec.prompt.encode("utf-8")) + 2)
    if spec.positions is None or not spec.positions.strip():
        return min(most, DEFAULT_POSITIONS)
    parts = spec.positions.split(",")
    return most if any(":" in part for part in parts) else min(most, len(parts))


def memory_need(spec: LensSpec, models: int, say=None):
    """For the memory check (memory.checked_load's `analysis`): the bytes this lens adds to the model at most, per
    its header (the layers the spec selects, the positions it can); `say(text)` states it before the model loads."""
    def need(header) -> int:
        from llamalens.core.unembed import lens_bytes
        from llamalens.visible import size_text

        n_layer = int(header.arch_key("block_count") or 0)
        n_layers = len(set(indices(spec.layers, n_layer, "--layers", list(range(n_layer)))) | {n_layer - 1})
        positions = _most_positions(spec)
        n = lens_bytes(header, models, min(MAX_CELLS, positions * n_layers), positions)
        if say is not None:
            say(f"the lens's own buffers: up to {size_text(n)} beyond the model (counted in the memory check)")
        return n

    return need


# -- stored runs ---------------------------------------------------------------------------------------
def save(store, model, result: LensResult, name: str | None, command: str) -> int:
    """Store a lens as a finished run of kind "lens": one sample (the prompt) whose extra is the result."""
    from llamalens.core.runtime import library_versions
    from llamalens.records import RunOptions, Sample, Timing
    from llamalens.run.sweep import hardware
    from llamalens.settings import SamplingSettings

    options = RunOptions(max_tokens=0, n_logprobs=0, prompts=(result.prompt,), model_options=model.options, parallel=1)
    sample = Sample(result.prompt, [], {}, 0, "", "stop", [], Timing(len(result.tokens), 0, 0.0, 0.0, 0.0))
    run_id = store.create_run(name=name, command=command, model=model.describe(), model_hash=store.model_hash(model.path),
                              versions=library_versions(), hardware=hardware(model), options=options,
                              configs=[SamplingSettings()], plan=[(0, 0, 0, result.prompt)], kind=LENS.name,
                              first=(0, sample, None))
    result.run_id = run_id
    store.set_extra(run_id, 0, result.to_dict())
    store.set_status(run_id, "done")
    return run_id


def load_lens(store, run_id) -> LensResult:
    info = store.run(run_id)
    samples = store.samples(info.id)
    if info.kind != LENS.name or not samples:
        raise StoreError(f"run {info.id} is not a finished lens run")
    result = LensResult.from_dict(samples[0].extra)
    result.run_id = info.id
    return result


def with_lens_columns(run, frame):
    """A lens run's export: its cells, one row per (position, layer) (a lens has no generated tokens)."""
    if not run.samples:
        raise StoreError(f"run {run.info.id} is not a finished lens run")
    return LensResult.from_dict(run.samples[0].extra).to_pandas()


class LensInterrupted(RunInterrupted):
    unit = "lenses"


class LensKind(TreeKind):
    """The lens run kind: computed in one go by `llamalens lens` and stored finished; nothing to resume (the
    lifecycle's other steps are a tree's: one chunk, no statistics, finish = done)."""

    name = "lens"
    interrupted = LensInterrupted

    def pending(self, model, store, info):
        raise StoreError(f"run {info.id} is a finished lens; it has nothing to resume: read it with `llamalens show` "
                         "/ `export` / `report`, or run `llamalens lens` again")

    def decode(self, model, items, shared, stats):
        raise StoreError("a lens run is not decoded in chunks")


LENS = LensKind()
