"""Model files: finding them, reading their GGUF header, and sizing what loading them needs.

    find.py         `--model` as a path or a name, the search folders, the embedded default
    other_tools.py  models other tools keep on this machine (Ollama, LM Studio, Hugging Face cache)
    gguf_header.py  a GGUF file's header, read without loading its weights
    memory.py       will it fit: the memory a command needs, estimated before loading
"""
