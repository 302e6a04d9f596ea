"""Beam search as an entry policy of the engine's scheduler (Beams): B beams as B sequences of one context.
The scheduler prefills, decodes and forks; the policy chooses the candidates and says which beams go on.

    prompt ──► prefill once (sequence 0) ──► row ──► step 0: one beam, its top 2B continuations
    every step, for the B live beams (one llama_decode with one token per beam, one output row each):
        row_b ──► raw log-softmax (RowStats: logprob, rank, entropy, top-N for the records)
              ──► banned tokens (no-repeat-ngram over prompt + beam) set aside
              ──► the beam's top 2B tokens, each scored sum_logprob(beam) + logprob(token)
        all B × 2B candidates, best first ──► the top 2B, in order:
            end-of-generation and among the first B  -> a finished hypothesis (score with length penalty)
            otherwise                                 -> a live beam of the next step, until B are live
        KV cells (Engine.fork): a parent's first child keeps its sequence; every other child takes the sequence
        of a beam that died (seq_rm) and gets a copy of its parent's cells (seq_cp: metadata only, the cache is
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

from llamalens.core.engine import Engine, Entry, Fork, Live, Request
from llamalens.core.runtime import Context, Model, round_ctx
from llamalens.core.stats import RowStats
from llamalens.core.strategies import banned_tokens, hypothesis_score
from llamalens.records import Alternative, Sample, Timing, TokenRecord
from llamalens.settings import SamplingSettings


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


@dataclass(frozen=True)
class Candidate:
    """One continuation of one beam at one step, what the search ranks (best first: total, then beam, token)."""

    total: float  # the beam's sum of raw logprobs + the token's
    beam: int  # the beam's index among the step's beams
    token: int
    logprob: float  # the token's raw logprob in the beam's row


def _text(model: Model, records: list[TokenRecord]) -> bytes:
    return b"".join(model.piece(t.id, special=False) for t in records if not t.eog)


class Beams(Entry):
    """Beam search as an entry policy of the engine's scheduler: the prompt enters once, prefilled in sequence 0;
    every step the policy chooses jointly over the live beams' rows (module docstring) and says which beams go on
    (Engine.fork: a kept candidate's parent forks, a beam without one dies); it ends the search by letting none go
    on. What it finds is read from it after the run (result)."""

    def __init__(self, engine: Engine, req: Request, max_new: int, exact: bool, t0: float):
        super().__init__(engine, {})
        self.req, self.model, self.max_new, self.exact, self.t0 = req, engine.model, max_new, exact, t0
        self.settings, self.n_logprobs = req.settings, req.n_logprobs
        self.n_beams, self.n_cand = req.settings.beams, 2 * req.settings.beams
        self.todo, self.step, self.prompt_ms, self.t_first = True, 0, 0.0, 0.0
        self.beams: list[Live] = []  # the beams of the last step chosen from
        self.hyps: list[Hypothesis] = []
        self.steps: list[dict] = []

    def waiting(self) -> bool:
        return self.todo

    def enter(self, ctx: Context, seq: int, step: int) -> tuple[Live, np.ndarray, RowStats] | None:
        """The prompt, prefilled once: the one beam of step 0."""
        if not self.todo:
            return None
        self.todo = False
        ptoks = self.req.prompt_tokens
        row = ctx.prefill(ptoks, seq=seq)
        self.prompt_ms = (time.perf_counter() - self.t0) * 1000
        root = self.histories.root(("prompt", tuple(ptoks)))
        live = self.engine.sequence(self.req, seq, len(ptoks), self.max_new, self.t0, root, root, chain=False)
        return live, row, RowStats.of(row, None, self.n_logprobs)

    def row_stats(self, block: np.ndarray) -> list[RowStats]:
        return [RowStats.of(row, None, self.n_logprobs) for row in block]

    def leave(self, ctx: Context, live: Live) -> None:
        ctx.seq_rm(live.slot)

    def choose(self, ctx: Context, slots: list[Live | None], served: list[tuple]) -> None:
        """One step: the candidates of every beam, the finished hypotheses, and the beams that go on."""
        step, n_beams = self.step, self.n_beams
        beams = self.beams = [members[0] for members, _, _ in served]  # one beam a row, in slot order
        rows = [row for _, row, _ in served]
        stats = [st for _, _, st in served]
        cands, banned = self._candidates(beams, rows, stats)
        if self.t_first == 0.0:
            self.t_first = time.perf_counter()
        nxt: list[Fork] = []
        finished = []
        for rank, c in enumerate(cands):
            beam = beams[c.beam]
            rec = _record(self.model, rows[c.beam], stats[c.beam], c.token, c.logprob, step, self.n_logprobs,
                          banned[c.beam], self.n_cand)
            if self.model.is_eog(c.token):
                if rank >= n_beams:
                    continue
                n = len(beam.records)
                h = Hypothesis(beam.records + [rec], c.total, n, hypothesis_score(c.total, n, self.settings.length_penalty),
                               "stop", step)
                _keep(self.hyps, h, n_beams)
                finished.append([c.beam, c.total, h.score])
            else:
                nxt.append(Fork(beam, c.token, rec, c.total))
            if len(nxt) == n_beams:
                break
        index = {id(beam): b for b, beam in enumerate(beams)}
        parents = {index[id(f.parent)] for f in nxt}
        self.steps.append({"step": step, "live": [[index[id(f.parent)], f.token, f.score] for f in nxt],
                           "dropped": [b for b in range(len(beams)) if b not in parents],
                           "finished": finished, "cutoff": cands[-1].total if cands else None,
                           "blocked": sum(len(x) for x in banned)})
        self.step += 1
        best_sum = cands[0].total if cands else -np.inf
        if _done(self.hyps, n_beams, self.settings, best_sum, step + 1, self.max_new) or not nxt:
            nxt = []
        elif step + 1 == self.max_new:  # max_tokens reached: every live beam is a hypothesis
            for f in nxt:
                recs = f.parent.records + [f.record]
                _keep(self.hyps, Hypothesis(recs, f.score, len(recs),
                                            hypothesis_score(f.score, len(recs), self.settings.length_penalty),
                                            "length", step), n_beams)
            nxt = []
        self.engine.fork(ctx, self, slots, nxt)  # none: the search ends

    def _candidates(self, beams: list[Live], rows: list[np.ndarray],
                    stats: list[RowStats]) -> tuple[list[Candidate], list[list[int]]]:
        """Each beam's top 2B continuations from its raw row (banned tokens set aside), all of them best first,
        cut to the top 2B; and each beam's banned tokens."""
        n_gram, ptoks = self.settings.no_repeat_ngram, self.req.prompt_tokens
        cands, banned = [], []
        for b, (beam, row, st) in enumerate(zip(beams, rows, stats)):
            ban = sorted(banned_tokens(ptoks + [t.id for t in beam.records], n_gram)) if n_gram else []
            banned.append(ban)
            k = min(self.n_cand + len(ban), row.shape[0])
            top = np.argpartition(-row, k - 1)[:k] if k < row.shape[0] else np.arange(row.shape[0])
            ban_set = set(ban)
            ids = sorted((int(i) for i in top if int(i) not in ban_set), key=lambda i: (-float(row[i]), i))
            for tok in ids[: self.n_cand]:
                lp = float(row[tok]) - st.lse
                cands.append(Candidate(beam.score + lp, b, tok, lp))
        cands.sort(key=lambda c: (-c.total, c.beam, c.token))
        return cands[: self.n_cand], banned

    def result(self, max_tokens: int) -> BeamResult:
        """The num_return best hypotheses, the best one as the Sample (its timing from the search's start)."""
        hyps = self.hyps
        if not hyps:  # no live beam was left (a vocabulary smaller than the beams, all banned): the beams so far
            hyps = [Hypothesis(b.records, b.score, len(b.records),
                               hypothesis_score(b.score, len(b.records), self.settings.length_penalty), "length",
                               self.step - 1)
                    for b in self.beams if b.records]
        hyps.sort(key=lambda h: -h.score)
        best, req = hyps[0], self.req
        t_end = time.perf_counter()
        text = _text(self.model, best.tokens).decode("utf-8", errors="replace")
        timing = Timing(prompt_tokens=len(req.prompt_tokens), generated_tokens=len(best.tokens),
                        prompt_ms=self.prompt_ms, first_token_ms=(self.t_first - self.t0) * 1000,
                        total_ms=(t_end - self.t0) * 1000)
        sample = Sample(prompt=req.prompt, prompt_token_ids=req.prompt_tokens, settings=self.settings.to_dict(),
                        max_tokens=max_tokens, text=text, finish_reason=best.finish, tokens=best.tokens, timing=timing,
                        key=req.key)
        return BeamResult(sample, hyps[: self.settings.num_return], self.steps, self.counts.get("decodes", 0),
                          self.counts.get("decoded_tokens", 0))


def beam_search(model: Model, prompt: str, settings: SamplingSettings, max_tokens: int = 16, n_logprobs: int = 5,
                exact: bool = False, prompt_tokens: list[int] | None = None, key=None) -> BeamResult:
    """Beam search with `settings.beams` beams (see the module docstring): the Beams policy run by the engine's
    scheduler in a context of `beams` sequences."""
    settings.validate()
    t0 = time.perf_counter()
    ptoks = list(prompt_tokens) if prompt_tokens is not None else model.prompt_tokens(prompt)
    model.check_fits(len(ptoks), model.options.ctx)
    n_beams = settings.beams
    max_new = max(1, min(max_tokens, model.options.ctx - len(ptoks)))
    engine = Engine(model, n_beams)
    policy = Beams(engine, Request(prompt, settings, max_tokens, n_logprobs, key=key, prompt_tokens=ptoks), max_new,
                   exact, t0)
    for _ in engine.run_policy(policy, n_beams, n_logprobs, n_ctx=round_ctx(len(ptoks) + n_beams * (max_new + 2) + 1),
                               n_seq_max=n_beams):
        pass  # no beam finishes as a sample of its own: the search's result is the policy's
    return policy.result(max_tokens)


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
