"""A compare run read back (run/compare.py): per compared model, llama-perplexity's statistics against the base,
and the ladder (the models by file size, with bits per weight) that quant publishers chart.

    Ladder.models      one LadderModel per model, the base first: file, header, bits per weight, size
    Ladder.stats(k)    every figure of llama-perplexity --kl-divergence for model k (looks/kld_stats.py)
    Ladder.table()     one row per compared model, sorted by file size: size, bpw, PPL ratio, KLD mean / 99%, ...
    Ladder.worst(k, n) the n positions where model k drifts most from the base, with both models' top tokens
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from llamalens.records import Rich
from llamalens.store import RunInfo, Store

LADDER_COLUMNS = ["model", "quantization", "file_size", "bpw", "tokens", "ppl", "ppl_ratio", "ln_ppl_ratio",
                  "kld_mean", "kld_error", "kld_p99", "kld_max", "dp_rms", "same_top"]


@dataclass
class LadderModel:
    index: int
    path: str
    info: dict  # Model.describe()
    sha256: str
    bpw: float

    @property
    def name(self) -> str:
        return self.info.get("name") or self.path

    @property
    def file_size(self) -> int:
        return int(self.info.get("file_size") or 0)

    @property
    def quantization(self) -> str:
        return str(self.info.get("quantization") or "?")


@dataclass
class ModelDrift:
    """One compared model's per-token values, in text order."""

    positions: np.ndarray
    kld: np.ndarray
    lp_q: np.ndarray
    lp_base: np.ndarray
    same_top: np.ndarray
    worst: list[dict] = field(default_factory=list)
    windows_done: int = 0
    seconds: float = 0.0
    accept: np.ndarray | None = None  # --draft: Σ min(p_base, p_model) per token
    segments: list[int] = field(default_factory=list)  # tokens of each window (sample), in order
    hit: np.ndarray | None = None  # --draft: whether this model's top token is the text's token


@dataclass
class Ladder(Rich):
    """Several models against one base on the same tokens (`llamalens compare` with any number of models).

    to_pandas(): one row per compared model, by file size (LADDER_COLUMNS); in a notebook, the compare report."""

    _display = "ladder"
    info: RunInfo
    models: list[LadderModel]
    drift: dict[int, ModelDrift]  # by model index (1..)
    protocol: str
    ctx: int
    stride: int | None
    n_tokens: int
    n_windows: int
    notes: list[str] = field(default_factory=list)
    flips: object = None  # looks/flips.Flips when the run has questions (compare --prompts)
    source: dict | None = None  # compare --run: the stored run whose generated tokens are the text
    draft: bool = False  # compare --draft: the base is a target, the other models its drafts

    def draft_stats(self, k: int) -> dict:
        """Model k as a draft for the base (looks/draft.py): acceptance and expected tokens per round."""
        from llamalens.looks.draft import draft_statistics

        d = self.drift[k]
        return draft_statistics(d.accept, d.hit, d.segments)

    def describe_tokens(self) -> str:
        """What the figures are computed on, in words."""
        if self.source:
            return (f"{self.n_tokens:,} generated tokens of run {self.source['run']} "
                    f"({len(self.source['samples'])} sample(s), each after its own prompt)")
        return (f"{self.n_tokens:,} tokens, {self.protocol}, ctx {self.ctx}"
                + (f", stride {self.stride}" if self.stride else "") + f", {self.n_windows} window(s)")

    @property
    def base(self) -> LadderModel:
        return self.models[0]

    @property
    def complete(self) -> bool:
        windows = not self.n_windows or (all(d.windows_done == self.n_windows for d in self.drift.values())
                                         and len(self.drift) == len(self.models) - 1)
        answers = self.flips is None or len(self.flips.answers) == len(self.models) * len(self.flips.questions)
        return windows and answers

    def stats(self, k: int) -> dict:
        from llamalens.looks.kld_stats import kld_statistics

        d = self.drift[k]
        return kld_statistics(-d.lp_q, -d.lp_base, d.kld, d.same_top)

    def by_size(self) -> list[LadderModel]:
        """The compared models by file size, smallest first (then by name)."""
        return sorted(self.models[1:], key=lambda m: (m.file_size, m.name))

    def table(self) -> list[dict]:
        out = []
        for m in self.by_size():
            if m.index not in self.drift:
                continue
            s = self.stats(m.index)
            out.append({"model": m.name, "quantization": m.quantization, "file_size": m.file_size, "bpw": m.bpw,
                        "tokens": s["tokens"], "ppl": s["ppl_q"], "ppl_ratio": s["ppl_ratio"],
                        "ln_ppl_ratio": s["ln_ppl_ratio"], "kld_mean": s["kld_mean"], "kld_error": s["kld_error"],
                        "kld_p99": s["kld_p99"], "kld_max": s["kld_max"], "dp_rms": s["dp_rms"],
                        "same_top": s["same_top"]})
        return out

    @staticmethod
    def where(p: dict) -> str:
        """A worst position's place: its token position in the text, or `sample:position` in a run's answers."""
        return f"{p['sample']}:{p['position']}" if "sample" in p else str(p["position"])

    def worst(self, k: int, n: int = 20) -> list[dict]:
        return sorted(self.drift[k].worst, key=lambda p: (-p["kld"], p["position"]))[:n]

    def to_dict(self, with_tokens: bool = False) -> dict:
        out = {"run": self.info.id, "kind": "compare", "status": self.info.status, "source": self.source,
               "protocol": self.protocol,
               "ctx": self.ctx, "stride": self.stride, "tokens": self.n_tokens, "windows": self.n_windows,
               "notes": self.notes, "base": _model_dict(self.base), "ladder": self.table(), "models": []}
        for m in self.models[1:]:
            d = self.drift.get(m.index)
            entry = {**_model_dict(m), "windows_done": d.windows_done if d else 0}
            if d is not None:
                entry.update(statistics=self.stats(m.index), worst=self.worst(m.index))
                if self.draft and d.accept is not None:
                    entry["draft"] = self.draft_stats(m.index)
                if with_tokens:
                    entry["tokens"] = {"position": d.positions.tolist(), "kld": d.kld.tolist(),
                                       "logprob_q": d.lp_q.tolist(), "logprob_base": d.lp_base.tolist(),
                                       "same_top": d.same_top.tolist()}
            out["models"].append(entry)
        if self.flips is not None:
            out["flips"] = self.flips.to_dict()
        return out

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.table(), columns=LADDER_COLUMNS)

    def __repr__(self) -> str:
        rows = ", ".join(f"{r['quantization']} KLD {r['kld_mean']:.5f}" for r in self.table())
        return f"<Ladder run {self.info.id}: {len(self.models) - 1} models vs {self.base.name} on {self.n_tokens} tokens: {rows}>"


def _model_dict(m: LadderModel) -> dict:
    return {"index": m.index, "name": m.name, "path": m.path, "quantization": m.quantization,
            "file_size": m.file_size, "bpw": None if math.isnan(m.bpw) else m.bpw, "sha256": m.sha256}


def load_ladder(store: Store, run_id) -> Ladder:
    """A compare run read back: what is saved of it so far (an interrupted run gives its finished units)."""
    from llamalens.looks.flips import Flips, Question
    from llamalens.run.answers import AnswerResult
    from llamalens.run.compare import UnitResult, read_spec

    info = store.run(run_id)
    spec = read_spec(store, info.id)
    models = [LadderModel(i, e["path"], e["info"], e["sha256"], float(e["bpw"]) if e.get("bpw") is not None
                          else math.nan) for i, e in enumerate(spec["models"])]
    units: dict[int, list] = {}
    answers = {}
    for s in store.samples(info.id):
        if s.extra and s.extra.get("role") == "unit":
            u = UnitResult.from_extra(s.sample_idx, s.extra)
            units.setdefault(u.model, []).append(u)
        elif s.extra and s.extra.get("role") == "answer":
            a = AnswerResult.from_extra(s.sample_idx, s.extra).answer
            answers[(a.model, a.question)] = a
    drift = {}
    for k, us in units.items():
        us.sort(key=lambda u: u.window)
        arrays = [np.concatenate([getattr(u, name) for u in us]) for name in ("positions", "kld", "lp_q", "lp_base",
                                                                               "same_top")]
        drafted = all(u.accept is not None for u in us)
        accept, hit = ((np.concatenate([u.accept for u in us]), np.concatenate([u.hit for u in us])) if drafted
                       else (None, None))
        drift[k] = ModelDrift(*arrays, [p for u in us for p in u.worst], len(us), sum(u.seconds for u in us), accept,
                              [len(u.kld) for u in us], hit)
    n_tokens = len(spec["stream"]) - spec["offset"]
    source = spec.get("source")
    if source:  # a stored run's samples: the generated tokens are the text; each worst position named by sample
        n_tokens = sum(w[1] - w[2] for w in spec["windows"])
        for us in units.values():
            for u in us:
                sample_idx, start, n_prompt = source["samples"][u.window]
                for p in u.worst:
                    p.update(sample=sample_idx, position=p["position"] - start - n_prompt)
    flips = None
    if spec.get("questions"):
        flips = Flips([Question.from_dict(q) for q in spec["questions"]], [m.info for m in models], answers,
                      spec.get("normalize", "none"), int(spec.get("max_tokens", 0)))
    return Ladder(info, models, drift, spec["protocol"], spec["ctx"], spec.get("stride"), n_tokens,
                  len(spec["windows"]), list(spec.get("notes", [])), flips, source, bool(spec.get("draft")))


COMPARISON_TOKEN_COLUMNS = ["run_id", "row", "model", "model_name", "quantization", "window", "sample", "question",
                            "position",
                            "token_id", "text", "kld", "logprob_q", "logprob_base", "dp", "same_top", "flipped"]


def comparison_tokens(run, _tokens=None):
    """What `export` writes for a compare run (the compare kind's token_columns), read from the run's saved units
    (a run.loaded.LoadedRun): row "kld", one per compared model and scored token of the text; with questions,
    row "answer", one per model and token of its greedy answer (flipped: at or after the first token where it
    differs from the base's answer), and row "pick", one per model and multiple-choice question (text: the option
    it picks, logprob_q: that option's logprob, flipped: not the base's pick)."""
    import pandas as pd

    from llamalens.looks.flips import Flips, Question
    from llamalens.run.answers import AnswerResult
    from llamalens.run.compare import UnitResult

    spec = next((s.extra for s in run.samples if s.extra and s.extra.get("role") == "spec"), None)
    if spec is None:
        return pd.DataFrame([], columns=COMPARISON_TOKEN_COLUMNS)
    stream, offset, models = spec["stream"], spec["offset"], spec["models"]
    source = (spec.get("source") or {}).get("samples")
    rows, answers = [], {}
    for s in sorted(run.samples, key=lambda s: (s.prompt_idx, s.seed)):
        if s.extra and s.extra.get("role") == "answer" and "answer" in s.extra:
            a = AnswerResult.from_extra(s.sample_idx, s.extra).answer
            answers[(a.model, a.question)] = a
        if not (s.extra and s.extra.get("role") == "unit" and "kld" in s.extra):
            continue
        u = UnitResult.from_extra(s.sample_idx, s.extra)
        info = models[u.model]["info"]
        # compare --run: the window is a sample of the source run, the position one in its generated tokens
        sample, shift = (source[u.window][0], source[u.window][1] + source[u.window][2]) if source else (None, 0)
        for p, kld, lq, lb, same in zip(u.positions.tolist(), u.kld.tolist(), u.lp_q.tolist(), u.lp_base.tolist(),
                                        u.same_top.tolist()):
            rows.append([run.id, "kld", u.model, info.get("name"), info.get("quantization"), u.window, sample, None,
                         p - shift, stream[p + offset], None, kld, lq, lb, math.exp(lq) - math.exp(lb), same, None])
    flips = Flips([Question.from_dict(q) for q in spec.get("questions", [])], [m["info"] for m in models], answers,
                  spec.get("normalize", "none"))
    for (k, i), a in sorted(answers.items()):
        rows += _answer_rows(run.id, flips, models[k]["info"], k, i, a)
    df = pd.DataFrame(rows, columns=COMPARISON_TOKEN_COLUMNS)
    return df.astype({c: "Int64" for c in ("window", "sample", "question", "position", "token_id")})  # integers, or empty


def _answer_rows(run_id: int, flips, info: dict, k: int, i: int, a) -> list[list]:
    d = flips.detail(k, i) if k else None
    head = [run_id, None, k, info.get("name"), info.get("quantization"), None, None, i]
    q = flips.questions[i]
    if q.options:
        pick = a.pick(flips.normalize)
        return [[*head[:1], "pick", *head[2:], None, None, q.options[pick], None, a.scores[pick], None, None, None,
                 d["flipped"] if d else None]]
    at = d["at"] if d else None
    return [[*head[:1], "answer", *head[2:], j, t, text, None, lp, None, None, None,
             (at is not None and j >= at) if d else None]
            for j, (t, text, lp) in enumerate(zip(a.tokens, a.texts, a.logprobs))]
