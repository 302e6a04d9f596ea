"""llamalens as an lm-evaluation-harness backend (docs/eval.md).

    scoring.py     (context, continuation) token pairs scored: each alone (exact) or contexts shared and batched
    lm_tokens.py   lm-eval's requests in tokens: the context/continuation boundary, truncation, rolling windows
    generation.py  generate_until on the decode engine: stop strings, max_gen_toks, greedy or sampled
    harness.py     LlamalensLM, the lm_eval.api.model.LM (imports lm_eval: the optional 'eval' extra)
    run.py         the use case of `llamalens eval` and ll.evaluate: tasks checked, evaluated, lm-eval's files
    tasks/         the shipped local tasks (llamalens_capitals, llamalens_fables): run offline anywhere
"""
