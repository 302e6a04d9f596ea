#!/usr/bin/env python
"""The measurements of scripts/gpu_check.sh (which builds what they need): a CUDA build against the CPU build.

    .venv/bin/python scripts/gpu_check.py --cpu-cli .venv/bin/llamalens --cuda-cli .venv-cuda/bin/llamalens \
        --cuda-tools .tools-cuda/bin [--shape llama3-8b] [--rounds 2]

1. Numbers: `score` of a text and greedy `generate` on the default model, CPU build against the CUDA build
   with --gpu-layers -1. The CPU build's own batch noise floor (a sweep's p99 |Δ logprob| between batched and
   single-sequence decoding) is the yardstick: the GPU's kernels differ from the CPU's as a batch shape does.
2. VRAM: the estimate's offloaded weights against the memory nvidia-smi reports for the process while it
   generates (the CUDA context and the KV cache and compute buffers, which the estimate does not place on the
   GPU, come on top: printed, not judged).
3. Speed: scripts/bench.py's llama.cpp-tool cases (B g Q w T U) with both sides offloading every layer.
One summary at the end; the exit status is 1 when a number is outside its bound.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "The history of the printing press begins"


def run_json(cli: str, *args) -> dict:
    out = subprocess.run([cli, *map(str, args), "--json"], capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"{cli} {' '.join(map(str, args))} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def numbers(cpu: str, cuda: str, text_file: str) -> list[tuple[str, bool]]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        noise = run_json(cpu, "sweep", PROMPT, "-t", "0", "--seeds", "1", "-n", "32", "--store", f"{tmp}/n.db")
    floor = max(noise["run"]["noise"]["p99_abs_dlogprob"], 1e-3)
    a = run_json(cpu, "score", "--file", text_file, "--ctx", 512)
    b = run_json(cuda, "score", "--file", text_file, "--ctx", 512, "--gpu-layers", -1)
    diffs = [abs(x["logprob"] - y["logprob"]) for x, y in zip(a["tokens"], b["tokens"])]
    diffs.sort()
    p99 = diffs[int(0.99 * (len(diffs) - 1))]
    ppl_a, ppl_b = a["totals"]["perplexity"], b["totals"]["perplexity"]
    g_a = run_json(cpu, "generate", PROMPT, "-n", 32, "-t", 0)
    g_b = run_json(cuda, "generate", PROMPT, "-n", 32, "-t", 0, "--gpu-layers", -1)
    same = next((i for i, (x, y) in enumerate(zip(g_a["tokens"], g_b["tokens"])) if x["id"] != y["id"]), 32)
    return [
        (f"score: p99 |Δ logprob| CPU vs CUDA {p99:.4f} nat over {len(diffs)} tokens (CPU batch noise floor p99 "
         f"{floor:.4f}; bound 10x)", p99 <= 10 * floor),
        (f"score: perplexity CPU {ppl_a:.4f}, CUDA {ppl_b:.4f} ({(ppl_b / ppl_a - 1) * 100:+.3f}%; bound 1%)",
         abs(ppl_b / ppl_a - 1) < 0.01),
        (f"generate -t 0: the first {same} of 32 tokens identical (greedy paths may part where two tokens are "
         "within the noise floor)", same >= 8),
    ]


def vram(cuda: str) -> list[tuple[str, bool]]:
    """The peak GPU memory of a `generate` process, polled from nvidia-smi, against the estimate's share."""
    proc = subprocess.Popen([cuda, "generate", PROMPT, "-n", 64, "--gpu-layers", -1, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    peak = 0

    def poll():
        nonlocal peak
        while proc.poll() is None:
            q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
            for line in q.stdout.splitlines():
                pid, mib = (x.strip() for x in line.split(","))
                if pid == str(proc.pid):
                    peak = max(peak, int(mib) * 2**20)
            time.sleep(0.05)

    t = threading.Thread(target=poll)
    t.start()
    out, _ = proc.communicate(timeout=600)
    t.join()
    est = json.loads(out)["model"]["memory_estimate"]
    return [(f"VRAM: estimate {est['weights_gpu'] / 2**20:.0f} MiB of weights offloaded; nvidia-smi peak "
             f"{peak / 2**20:.0f} MiB for the process (the CUDA context, KV cache and compute buffers on top)",
             est["weights_gpu"] > 0 and peak >= est["weights_gpu"])]


def speed(cpu: str, cuda: str, tools: str, shape: str | None, rounds: int) -> list[tuple[str, bool]]:
    cmd = [sys.executable, str(HERE / "bench.py"), "--build", f"cuda:{cuda}:{tools}", "--cases", "BgQwTU",
           "--rounds", str(rounds), "--gpu-layers", "-1"] + (["--shape", shape] if shape else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in out.stdout.splitlines() if "=" in ln and ("/" in ln or "RSS" in ln)]
    return [(f"bench{' ' + shape if shape else ''}: {ln.strip()}", out.returncode == 0) for ln in lines] or [
        (f"bench failed: {out.stderr[-1500:]}", False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-cli", required=True)
    ap.add_argument("--cuda-cli", required=True)
    ap.add_argument("--cuda-tools", required=True)
    ap.add_argument("--shape", default=None, help="Also run the bench on this model shape (scripts/shaped_model.py).")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from bench import bench_text_file

    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip()
    results = numbers(a.cpu_cli, a.cuda_cli, bench_text_file(2600)) + vram(a.cuda_cli)
    results += speed(a.cpu_cli, a.cuda_cli, a.cuda_tools, None, a.rounds)
    if a.shape:
        results += speed(a.cpu_cli, a.cuda_cli, a.cuda_tools, a.shape, 1)
    print(f"\nGPU check on {gpu}")
    for line, ok in results:
        print(f"  [{'ok' if ok else 'FAIL'}] {line}")
    sys.exit(0 if all(ok for _, ok in results) else 1)


if __name__ == "__main__":
    main()
