"""The core: llama.cpp's native handles and the decode loop.

    runtime.py     the llama.cpp boundary: a loaded Model, its decoding Contexts, tokens and their bytes
    sampler.py     the native sampler chain, built from SamplingSettings and applied to raw logits
    kernels.py     the optional C pass over a decode step's rows (_kernels.c), through ctypes
    stats.py       pure numerics on logits rows: log-softmax, entropy, ranks, top lists
    grammar.py     GBNF grammars and JSON schemas applied the way llama.cpp's common sampling does
    chat.py        chat templates: a conversation rendered as the prompt llama.cpp would feed the model
    strategies.py  pure functions of token sequences for the decoding strategies (n-gram blocking, beams)
    engine.py      the decode scheduler: slots, shared histories, one exact TokenRecord per token
    beam.py        beam search on the engine's context

Nothing here knows about the run store, reports or the command line.
"""
