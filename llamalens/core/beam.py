"""Beam search on the batched engine's primitives: B beams as B sequences of one context.

    prompt ──► prefill once (sequence 0) ──► row ──► step 0: one beam, its top 2B continuations
    every step, for the B live beams (one llama_decode with one token per beam, one output row each):
        row_b ──► raw log-softmax (RowStats: logprob, rank, entropy, top-N for the records)
              ──► banned tokens (no-repeat-ngram over prompt + beam) set aside
              ──► the beam's top 2B tokens, each scored sum_logprob(beam) + logprob(token)
        all B × 2B candidates, best first ──► the top 2B, in order:
            end-of-generation and among the first B  -> a finished hypothesis (score with length penalty)
            otherwise                                 -> a live beam of the next step, until B are live
        KV cells: a parent's first child keeps its sequence; every other child takes the sequence of a
        beam that died (seq_rm) and gets a copy of its parent's cells (seq_cp: metadata only, the cache is
        unified); dead beams' cells are freed with seq_rm.
    ──► stop when early stopping says so, or at max_tokens (then every live beam is a hypothesis)
    ──► the num_return best hypotheses, the best one as the Sample, and what each step pruned

Semantics are those of Hugging Face transformers' `generate` (num_beams, length_penalty, early_stopping,
num_return_sequences, no_repeat_ngram_size), as its BeamSearchScorer / BeamHypotheses implement them:
  * score = sum of the raw logprobs / length ** length_penalty, where length counts the generated tokens
    before the end-of-generation token, whose logprob is in the sum (decoding.hypothesis_score);
  * the B best finished hypotheses are kept; a finished candidate counts only when it ranks among the
    first B of the step's 2B candidates;
  * early_stopping "true": done once B hypotheses are finished; "false": done when the best live
    candidate's sum divided by the current length ** length_penalty cannot beat the worst kept
    hypothesis; "never": the same bound taken at max_tokens when length_penalty > 0.
Where llamalens differs: a hypothesis finishing at once (length 0) is scored as length 1 (transformers
divides by zero); the sampler chain's penalties, temperature and stop strings are not applied to beams
(transformers can sample within beams, `do_sample` with num_beams; llamalens's beams are deterministic);
the beam of step 0 is the prompt alone, where transformers starts B copies scored -1e9 but the first.

Records: the sample's tokens are the best hypothesis's, each with the raw-distribution record of the
row it was chosen from (logprob, rank, entropy, top-N, and the ids no-repeat-ngram banned there);
`candidates` is 2B (the continuations each beam offers), `sampled_logprob` 0 (nothing is sampled).

`exact=True` decodes each beam's token in its own llama_decode call (one sequence at a time, like
`--exact` sweeps), so the logits do not depend on how many beams share a batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from llamalens.core.strategies import banned_tokens, hypothesis_score
from llamalens.records import Alternative, Sample, Timing, TokenRecord
from llamalens.core.runtime import Model, round_ctx
from llamalens.settings import SamplingSettings
from llamalens.core.stats import RowStats


@dataclass
class Hypothesis:
    """A finished beam: its tokens (end-of-generation last when it stopped), sum logprob and score."""

    tokens: list[TokenRecord]
    sum_logprob: float
    length: int  # as scored: generated tokens before the end-of-generation token
    score: float
    finish: str  # "stop" or "length"
    step: int  # the step it finished at

    def to_dict(self, model: Model | None = None) -> dict:
        d = {"ids": [t.id for t in self.tokens], "sum_logprob": self.sum_logprob, "length": self.length,
             "score": self.score, "finish": self.finish, "step": self.step}
        if model is not None:
            d["text"] = _text(model, self.tokens).decode("utf-8", errors="replace")
        return d


@dataclass
class BeamResult:
    sample: Sample  # the best hypothesis
    hypotheses: list[Hypothesis]  # the num_return best, best first
    steps: list[dict] = field(default_factory=list)  # per step: live beams, dropped beams, finished ones
    decode_calls: int = 0
    scored_tokens: int = 0  # beam tokens decoded (each one a scored continuation)

    def extra(self, model: Model) -> dict:
        """What samples.extra keeps of a beam search."""
        return {"strategy": "beam", "hypotheses": [h.to_dict(model) for h in self.hypotheses], "steps": self.steps,
                "decode_calls": self.decode_calls, "scored_tokens": self.scored_tokens}


@dataclass
class _Beam:
    slot: int
    records: list[TokenRecord]
    sum_lp: float

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.records]


def _text(model: Model, records: list[TokenRecord]) -> bytes:
    return b"".join(model.piece(t.id, special=False) for t in records if not t.eog)


def beam_search(model: Model, prompt: str, settings: SamplingSettings, max_tokens: int = 16, n_logprobs: int = 5,
                exact: bool = False, prompt_tokens: list[int] | None = None, key=None) -> BeamResult:
    """Beam search with `settings.beams` beams (see the module docstring).

    One function, longer than the house's limit: the search's state (live beams, finished hypotheses, the
    stopping bound, the context's sequences) is read by every step, and the steps are commented in order."""
    settings.validate()
    t0 = time.perf_counter()
    ptoks = list(prompt_tokens) if prompt_tokens is not None else model.prompt_tokens(prompt)
    model.check_fits(len(ptoks), model.options.ctx)
    n_beams, n_gram = settings.beams, settings.no_repeat_ngram
    max_new = max(1, min(max_tokens, model.options.ctx - len(ptoks)))
    hyps: list[Hypothesis] = []
    steps: list[dict] = []
    calls = scored = 0
    n_cand = 2 * n_beams
    with model.context(n_ctx=round_ctx(len(ptoks) + n_beams * (max_new + 2) + 1), n_seq_max=n_beams) as ctx:
        rows = [ctx.prefill(ptoks, seq=0)]
        prompt_ms = (time.perf_counter() - t0) * 1000
        t_first = 0.0
        beams = [_Beam(0, [], 0.0)]
        for step in range(max_new):
            # 1. each beam's top 2B continuations from its raw row
            cands = []  # (total, beam index, token, token logprob)
            stats, banned = [], []
            for b, (beam, row) in enumerate(zip(beams, rows)):
                st = RowStats.of(row, None, n_logprobs)
                ban = sorted(banned_tokens(ptoks + beam.ids, n_gram)) if n_gram else []
                stats.append(st)
                banned.append(ban)
                k = min(n_cand + len(ban), row.shape[0])
                top = np.argpartition(-row, k - 1)[:k] if k < row.shape[0] else np.arange(row.shape[0])
                ban_set = set(ban)
                ids = sorted((int(i) for i in top if int(i) not in ban_set), key=lambda i: (-float(row[i]), i))
                for tok in ids[:n_cand]:
                    lp = float(row[tok]) - st.lse
                    cands.append((beam.sum_lp + lp, b, tok, lp))
            cands.sort(key=lambda c: (-c[0], c[1], c[2]))
            cands = cands[:n_cand]
            if t_first == 0.0:
                t_first = time.perf_counter()
            # 2. finished hypotheses and the next step's beams
            nxt: list[tuple[int, TokenRecord, float]] = []  # (parent, record, sum)
            finished = []
            for rank, (total, b, tok, lp) in enumerate(cands):
                rec = _record(model, rows[b], stats[b], tok, lp, step, n_logprobs, banned[b], n_cand)
                if model.is_eog(tok):
                    if rank >= n_beams:
                        continue
                    h = Hypothesis(beams[b].records + [rec], total, len(beams[b].records),
                                   hypothesis_score(total, len(beams[b].records), settings.length_penalty), "stop",
                                   step)
                    _keep(hyps, h, n_beams)
                    finished.append([b, total, h.score])
                else:
                    nxt.append((b, rec, total))
                if len(nxt) == n_beams:
                    break
            parents = {p for p, _, _ in nxt}
            steps.append({"step": step, "live": [[p, r.id, s] for p, r, s in nxt],
                          "dropped": [b for b in range(len(beams)) if b not in parents], "finished": finished,
                          "cutoff": cands[-1][0] if cands else None, "blocked": sum(len(x) for x in banned)})
            best_sum = cands[0][0] if cands else -np.inf
            if _done(hyps, n_beams, settings, best_sum, step + 1, max_new) or not nxt:
                break
            if step + 1 == max_new:  # max_tokens reached: every live beam is a hypothesis
                for p, rec, total in nxt:
                    recs = beams[p].records + [rec]
                    _keep(hyps, Hypothesis(recs, total, len(recs),
                                           hypothesis_score(total, len(recs), settings.length_penalty), "length",
                                           step), n_beams)
                break
            # 3. KV cells: first child keeps the parent's sequence, others copy it into a dead beam's
            free = [b.slot for i, b in enumerate(beams) if i not in parents] + \
                   [s for s in range(n_beams) if s not in {b.slot for b in beams}]
            taken: set[int] = set()
            new_beams = []
            for p, rec, total in nxt:
                parent = beams[p]
                if parent.slot not in taken:
                    slot = parent.slot
                else:
                    slot = free.pop(0)
                    ctx.seq_rm(slot)
                    ctx.seq_cp(parent.slot, slot)
                taken.add(slot)
                new_beams.append(_Beam(slot, parent.records + [rec], total))
            for s in free:
                ctx.seq_rm(s)
            beams = new_beams
            # 4. one decode for all beams (or one per beam, exact)
            pos = len(ptoks) + step
            toks = [b.records[-1].id for b in beams]
            slots = [b.slot for b in beams]
            if exact:
                rows = []
                for tok, slot in zip(toks, slots):
                    ctx.decode([tok], [pos], [slot], [1])
                    rows.append(ctx.logits(0).copy())
                    calls += 1
            else:
                ctx.decode(toks, [pos] * len(toks), slots, [1] * len(toks))
                rows = [ctx.logits(i) for i in range(len(toks))]
                calls += 1
            scored += len(toks)
    if not hyps:  # no live beam was left (a vocabulary smaller than the beams, all banned): the beams so far
        hyps = [Hypothesis(b.records, b.sum_lp, len(b.records),
                           hypothesis_score(b.sum_lp, len(b.records), settings.length_penalty), "length", step)
                for b in beams if b.records]
    hyps.sort(key=lambda h: -h.score)
    best = hyps[0]
    t_end = time.perf_counter()
    text = _text(model, best.tokens).decode("utf-8", errors="replace")
    timing = Timing(prompt_tokens=len(ptoks), generated_tokens=len(best.tokens), prompt_ms=prompt_ms,
                    first_token_ms=(t_first - t0) * 1000, total_ms=(t_end - t0) * 1000)
    sample = Sample(prompt=prompt, prompt_token_ids=ptoks, settings=settings.to_dict(), max_tokens=max_tokens,
                    text=text, finish_reason=best.finish, tokens=best.tokens, timing=timing, key=key)
    return BeamResult(sample, hyps[: settings.num_return], steps, calls, scored)


def _record(model: Model, row: np.ndarray, st: RowStats, tok: int, lp: float, position: int, n_logprobs: int,
            blocked: list[int], n_cand: int) -> TokenRecord:
    text, hex_bytes = model.token_text(tok)
    at = st.for_token(row, tok)
    top = [Alternative(int(i), *model.token_text(int(i)), float(v))
           for i, v in zip(st.top_ids[:n_logprobs], st.top_logprobs[:n_logprobs])]
    return TokenRecord(position=position, id=tok, text=text, bytes=hex_bytes, logprob=lp, sampled_logprob=0.0,
                       rank=at.rank, entropy=st.entropy, candidates=n_cand, top=top, eog=model.is_eog(tok),
                       blocked=blocked)


def _keep(hyps: list[Hypothesis], h: Hypothesis, n_beams: int) -> None:
    """Add a finished hypothesis to the B best (transformers' BeamHypotheses.add)."""
    if len(hyps) < n_beams or h.score > min(x.score for x in hyps):
        hyps.append(h)
        if len(hyps) > n_beams:
            hyps.remove(min(hyps, key=lambda x: x.score))


def _done(hyps: list[Hypothesis], n_beams: int, s: SamplingSettings, best_sum: float, cur_len: int,
          max_len: int) -> bool:
    """transformers' BeamHypotheses.is_done with early_stopping true / false / never."""
    if len(hyps) < n_beams:
        return False
    if s.early_stopping == "true":
        return True
    length = max_len if (s.early_stopping == "never" and s.length_penalty > 0) else cur_len
    return min(h.score for h in hyps) >= best_sum / (length ** s.length_penalty)
