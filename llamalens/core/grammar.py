"""Grammars (GBNF) and JSON schemas: constrained generation the way llama.cpp's common/sampling.cpp does it.

    --grammar FILE.gbnf ─────────────────────────────┐
    --json-schema FILE.json ─► json_schema_to_gbnf ──┴─► GBNF text ─► one GrammarSampler per sequence
                                                                     (llama_sampler_init_grammar, "root")

Each step (engine.py calls `constrained_apply`), as common_sampler_sample with grammar_first = false, the
path llama-server and llama-cli take:
    raw row ─► the sampler chain, unchanged ─► token t
    the grammar allows t?  yes: t            (the chain ran once)
                           no:  the row with the grammar applied (every forbidden token's logit -inf)
                                ─► the chain again ─► t'   (it runs twice; its seeded RNG draws twice)
    then the grammar accepts the token, then the chain does (common_sampler_accept).

Removed mass: at every step, how much of the raw probability (softmax of the raw logits) the grammar
forbade: Σ p_raw over the tokens it forbids, from its mask of the whole vocabulary, so the figure is exact.
The mask is the answer of llama.cpp's own check of every token (about a quarter of a second over Gemma's 262k
tokens), found from far fewer checks by walking the vocabulary's prefix tree (grammar_check.py) and remembered
under the grammar's state (grammar_state.py), which repeats inside strings and repetitions and across the
sequences of a sweep. High values are "where the constraint fought the model".

JSON schemas are converted by llama-cpp-python's converter (llama_cpp.llama_grammar.json_schema_to_gbnf),
the only one callable from Python here. It is not the vendored llama.cpp's C++ converter (common/json-
schema-to-grammar.cpp, what llama-server uses for "json_schema"): on that converter's own test cases
(tests/test-json-schema-to-grammar.cpp) none of the grammars are identical. The largest difference is
whitespace: llama-cpp-python allows one optional space after each value (space ::= " "?), llama.cpp up to
two newlines and 20 spaces or tabs before closing brackets; number ranges and string escapes are written
differently too. Both accept JSON that fits the schema; a llama-server run with the same schema can still
choose other whitespace. For server-identical constraints convert the schema once with llama.cpp and pass
the result with --grammar.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llamalens.errors import InvalidInput
from llamalens.core.stats import log_softmax

MAX_SCHEMA_NESTING = 100  # JSON levels in a schema; the converter recurses per level (about 1,000 overflow it)


@dataclass(frozen=True)
class GrammarSpec:
    """The GBNF a run is constrained by, and where it came from ("grammar:FILE" or "json-schema:FILE")."""

    gbnf: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def read_grammar(grammar_file: str | None, json_schema_file: str | None) -> GrammarSpec | None:
    """--grammar FILE.gbnf or --json-schema FILE.json as GBNF text (None when neither is given)."""
    from llamalens.inputs import check_gbnf_nesting, check_json_nesting, read_utf8

    if grammar_file and json_schema_file:
        raise InvalidInput("give --grammar or --json-schema, not both (a schema is turned into a grammar)")
    if grammar_file:
        text = read_utf8(Path(grammar_file), "--grammar")
        if not text.strip():
            raise InvalidInput(f"--grammar: {grammar_file} is empty; write GBNF rules, starting with root ::= ...")
        check_gbnf_nesting(text, f"--grammar {grammar_file}")
        return GrammarSpec(text, f"grammar:{grammar_file}")
    if json_schema_file:
        text = read_utf8(Path(json_schema_file), "--json-schema")
        check_json_nesting(text, f"--json-schema {json_schema_file}", MAX_SCHEMA_NESTING)  # the converter recurses
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"--json-schema: {json_schema_file} is not JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(schema, dict):
            raise InvalidInput(f"--json-schema: {json_schema_file} holds a JSON {type(schema).__name__}, not a schema "
                               'object; e.g. {"type": "object", "properties": {"name": {"type": "string"}}}')
        empty = _empty_choice(schema)
        if empty:
            raise InvalidInput(f"--json-schema: {json_schema_file}: {empty} is an empty list, so no JSON value can fit "
                               "the schema; give it at least one choice (or remove it)")
        from llamalens.core.sampler import json_schema_to_gbnf

        try:
            gbnf = json_schema_to_gbnf(json.dumps(schema))
        except Exception as e:  # noqa: BLE001 - the converter raises whatever it meets
            raise InvalidInput(f"--json-schema: {json_schema_file} could not be converted to a grammar "
                               f"({type(e).__name__}: {e}); simplify the schema or write a --grammar") from None
        return GrammarSpec(gbnf, f"json-schema:{json_schema_file}")
    return None


def _empty_choice(node, where: str = "$") -> str | None:
    """Where a schema offers a choice of nothing ("enum": [], "anyOf": [], "oneOf": []), as a JSON path; None
    when it does not. (The converter would write a grammar that fails to parse, with a message about GBNF.)"""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("enum", "anyOf", "oneOf") and isinstance(value, list) and not value:
                return f"{where}.{key}"
            found = _empty_choice(value, f"{where}.{key}")
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _empty_choice(value, f"{where}[{i}]")
            if found:
                return found
    return None


def check_grammar(model, spec: GrammarSpec | None) -> None:
    """Parse the grammar once against the model's vocabulary: InvalidInput when llama.cpp cannot."""
    if spec is None:
        return
    from llamalens.core.sampler import GrammarSampler

    GrammarSampler(model, spec.gbnf, where=spec.source.replace(":", " ", 1)).close()


def removed_mass(logprobs: np.ndarray, forbidden: np.ndarray) -> float:
    """Σ p_raw over the forbidden token ids."""
    return float(np.exp(logprobs[forbidden]).sum()) if len(forbidden) else 0.0


def _removed(row: np.ndarray, ok: np.ndarray, lse: float | None) -> float:
    """The raw mass the mask `ok` forbids in `row`; with the row's log-sum-exp `lse`, summed over whichever side
    of the mask is smaller (1 − the allowed mass when few tokens are allowed) without a log-softmax of the row."""
    if lse is None:
        return removed_mass(log_softmax(row), np.flatnonzero(~ok))
    allowed = np.flatnonzero(ok)
    if 2 * len(allowed) < len(ok):
        return max(0.0, 1.0 - float(np.exp(row[allowed].astype(np.float64) - lse).sum()))
    return float(np.exp(row[~ok].astype(np.float64) - lse).sum())


def constrained_apply(sampler, grammar, row: np.ndarray, buffers, grammar_buffers, ids: np.ndarray | None = None,
                      lse: float | None = None) -> tuple[np.ndarray, int, float]:
    """The chain's pick under the grammar, as common_sampler_sample makes it (see the module docstring):
    (survivors, selected index, raw probability mass the grammar forbade at this step). The index is None when
    the grammar allows no token the chain can pick (a dead end: the sample ends with finish_reason "grammar").
    `ids`: the prefilter's top k (Sampler.apply: the same survivors and pick as the whole row); `lse`: the row's
    log-sum-exp, when known."""
    survivors, sel = sampler.apply(row, buffers, ids)
    ok = grammar.mask(grammar_buffers)
    removed = _removed(row, ok, lse)
    if ok[int(survivors["id"][sel])]:
        return survivors, sel, removed
    # resample: the grammar on the whole row first, then the chain again
    masked = np.where(ok, row, -np.inf).astype(np.float32)
    if not np.isfinite(masked).any():  # nothing the grammar allows is left (e.g. only EOS, and --ignore-eos)
        return survivors, None, removed
    survivors, sel = sampler.apply(masked, buffers)
    # llama.cpp aborts the process when its grammar is made to accept a token it forbids: never hand it one
    return survivors, (sel if ok[int(survivors["id"][sel])] else None), removed


# -- what show, the report and next say ------------------------------------------------------------------
@dataclass
class Fight:
    """Where a grammar fought the model in a run: the mean removed mass per configuration, the worst positions."""

    mean_by_config: dict[int, float]
    worst: list[tuple[int, int, int, str, str, float]]  # (sample_idx, config_idx, position, text, hex, removed)
    mean: float
    tokens: int


def fight(samples, by_sample: dict, k: int = 10) -> Fight | None:
    """From a run's finished samples (their extra["grammar_removed"]) and tokens; None without a grammar."""
    rows = []
    for s in samples:
        removed = (s.extra or {}).get("grammar_removed")
        if removed is None:
            continue
        for t, r in zip(by_sample.get(s.sample_idx, []), removed):
            rows.append((s.sample_idx, s.config_idx, t.position, t.text, t.bytes, float(r)))
    if not rows:
        return None
    by_config: dict[int, list[float]] = {}
    for r in rows:
        by_config.setdefault(r[1], []).append(r[5])
    worst = sorted(rows, key=lambda r: (-r[5], r[0], r[2]))[:k]
    return Fight({c: float(np.mean(v)) for c, v in sorted(by_config.items())}, worst,
                 float(np.mean([r[5] for r in rows])), len(rows))


def describe_removed(removed: list[float], texts: list[str], k: int = 3) -> str:
    """One line: the mean removed mass of a sample and its worst positions."""
    if not removed:
        return "the grammar constrained no token"
    worst = sorted(range(len(removed)), key=lambda i: -removed[i])[:k]
    spots = ", ".join(f"#{i} {texts[i]} {removed[i]:.1%}" for i in worst)
    return (f"the grammar removed {np.mean(removed):.1%} of the raw probability mass per token on average; "
            f"where it fought the model most: {spots}")


@dataclass
class NextUnderGrammar:
    """The next-token distribution before and after a grammar: raw p, p renormalised over the allowed tokens."""

    removed: float
    allowed: int
    rows: list[tuple[int, float, float]]  # (token id, raw logprob, p under the grammar; 0 = forbidden)


def next_under_grammar(model, prompt: str, spec: GrammarSpec, top: int = 10) -> NextUnderGrammar:
    """The raw top tokens and the grammar's top tokens after a prompt, with both probabilities."""
    from llamalens.core.runtime import round_ctx
    from llamalens.core.sampler import Candidates, GrammarSampler

    tokens = model.prompt_tokens(prompt)
    model.check_fits(len(tokens), model.options.ctx)
    with model.context(n_ctx=round_ctx(len(tokens) + 1)) as ctx:
        row = ctx.prefill(tokens).astype(np.float64)
    lp = log_softmax(row)
    with GrammarSampler(model, spec.gbnf, where=spec.source.replace(":", " ", 1)) as g:
        buffers = Candidates(model.n_vocab)
        ok = g.allowed(buffers.ids, buffers).copy()
    kept = np.exp(lp) * ok
    under = kept / kept.sum() if kept.sum() > 0 else kept
    raw_top = np.argsort(-lp)[:top]
    grammar_top = np.argsort(-under)[: min(top, int(ok.sum()))]
    ids = sorted(set(raw_top.tolist()) | set(grammar_top.tolist()), key=lambda i: -lp[i])
    return NextUnderGrammar(removed_mass(lp, np.flatnonzero(~ok)), int(ok.sum()),
                            [(int(i), float(lp[i]), float(under[i])) for i in ids])
