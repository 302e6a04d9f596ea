"""Constrained decoding, side by side (scripts/bench.py cases X, Z and A): a JSON-schema sweep through llamalens
against the same sweep unconstrained and against llama-server with the same grammar.

    X  llamalens sweep "A person, as JSON:" --json-schema person.json -t 0,0.8 --seeds S -n 24 --chain llama.cpp
    Z  the same sweep without the schema (the unconstrained speed at the same shape)
    A  llama-server (-np 2S, same context per slot, same threads) given the same GBNF text through "grammar":
       2S requests sent at once (the temperatures and seeds of h), so that it batches them as the sweep does

The grammar is the GBNF that llamalens itself uses for the schema (llama-cpp-python's converter, run in the build's
interpreter), so both sides are constrained by the same rules; llama-server's own "json_schema" converter writes
another grammar (whitespace rules differ). Speeds are counted as llama-batched-bench's S_TG counts them: each
sequence's tokens after its first over its time after its first, summed over the sequences (llamalens: the
sweep's --json summary; llama-server: each reply's timings.predicted_per_second). Samples stop at the grammar's
end, so X and A decode fewer than 24 tokens a sequence; Z decodes 24.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPT = "A person, as JSON:"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}}, "required": ["name", "age", "city"]}
TEMPERATURES = (0.0, 0.8)
SEEDS = 4
N_GEN = 24
CTX_PER_SEQ = 128


def _schema_file(tmp: str) -> str:
    path = os.path.join(tmp, "person.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(SCHEMA, f)
    return path


def tcase_sweep(measure, b, model, t, constrained: bool) -> dict:
    """Case X (constrained) or Z: the sweep's decode speed (S_TG), its whole run, and its tokens."""
    n_seqs = len(TEMPERATURES) * SEEDS
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--json-schema", _schema_file(tmp)] if constrained else []
        r = measure([b.cli, "sweep", PROMPT, *extra, "-t", ",".join(map(str, TEMPERATURES)), "--seeds", SEEDS,
                     "-n", N_GEN, "--chain", "llama.cpp", "--parallel", n_seqs, "--threads", t,
                     "--ctx", CTX_PER_SEQ, "--json", "--store", os.path.join(tmp, "runs.db"), "--model", model])
    d = json.loads(r["stdout"])
    gen = sum(row["samples"] * row["tokens_per_s"] for row in d["summary"])
    n = sum(row["tokens"] for row in d["summary"]) if "tokens" in d["summary"][0] else None  # a row's total
    run = d["run"]
    secs = run["finished"] - run["created"]
    return {"tok_s": gen, "gen_tok_s": gen, "whole_tok_s": (n or 0) / secs, "tokens": n, "run_s": secs,
            "rss_mb": r["rss_mb"], "wall_s": r["wall_s"]}


def _gbnf(b) -> str:
    """The schema as llamalens turns it into GBNF (llama-cpp-python's converter, in the build's interpreter)."""
    py = b.cli.parent / "python"
    code = ("import json, sys; from llama_cpp.llama_grammar import json_schema_to_gbnf; "
            "print(json_schema_to_gbnf(sys.argv[1]))")
    return subprocess.run([str(py), "-c", code, json.dumps(SCHEMA)], capture_output=True, text=True,
                          check=True).stdout


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcase_server(offload, b, model, t) -> dict:
    """Case A: llama-server with the same GBNF, the sweep's 2S sequences sent at once (it batches its slots)."""
    n_seqs = len(TEMPERATURES) * SEEDS
    gbnf = _gbnf(b)
    port = _free_port()
    log = tempfile.TemporaryFile()
    cmd = offload([b.tool("llama-server"), "-m", model, "--host", "127.0.0.1", "--port", port, "-np", n_seqs,
                   "-c", CTX_PER_SEQ * n_seqs, "-t", t, "-tb", t])
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise SystemExit("llama-server did not start:\n" + log.read().decode(errors="replace")[-2000:])
            time.sleep(0.3)
        bodies = [{"prompt": PROMPT, "n_predict": N_GEN, "temperature": temp, "seed": seed, "grammar": gbnf,
                   "cache_prompt": False} for temp in TEMPERATURES for seed in range(SEEDS)]
        _post(base + "/completion", dict(bodies[0], n_predict=2))  # warm-up, outside the timing
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n_seqs) as pool:
            replies = list(pool.map(lambda body: _post(base + "/completion", body), bodies))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    n = sum(rep["timings"]["predicted_n"] for rep in replies)
    gen = sum(rep["timings"]["predicted_per_second"] for rep in replies if rep["timings"]["predicted_n"] > 1)
    return {"tok_s": gen, "gen_tok_s": gen, "whole_tok_s": n / wall, "tokens": n, "wall_s": wall, "rss_mb": 0.0}
