"""The core: llama.cpp's native handles and the decode loop.

    runtime.py     the llama.cpp boundary: a loaded Model, its decoding Contexts, tokens and their bytes
    sampler.py     the native sampler chain, built from SamplingSettings and applied to raw logits
    dist.py        dist's pick replayed in numpy, when it provably is the native dist's
    kernels.py     the optional C pass over a decode step's rows (_kernels.c), through ctypes
    stats.py       pure numerics on logits rows: log-softmax, entropy, ranks, top lists
    grammar.py     GBNF grammars and JSON schemas applied the way llama.cpp's common sampling does
    chat.py        chat templates: a conversation rendered as the prompt llama.cpp would feed the model
    strategies.py  pure functions of token sequences for the decoding strategies (n-gram blocking, beams)
    engine.py      the decode scheduler: slots, shared histories, one exact TokenRecord per token
    sequences.py   what the scheduler and its policies share: a request, a live sequence, a pick, a fork
    entries.py     the scheduler's entry policies for sweeps (prompts) and fork continuations
    beam.py        beam search, a policy of the scheduler (it chooses over all beams at once and forks them)
    held.py        a context kept between generations (serve), run by the scheduler with its own policy

Nothing here knows about the run store, reports or the command line.
"""
