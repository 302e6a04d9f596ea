"""llama-server, started for real by tests/server.py, as the reference for llama.cpp's own behaviour."""

from __future__ import annotations

from server import llama_server


def test_server_helper_starts_answers_and_stops(tiny_path):
    with llama_server(tiny_path, "--ctx-size", "256", "--parallel", "1", timeout=60) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        assert srv.get("/health")["status"] == "ok"
        reply = srv.post("/completion", {"prompt": "a", "n_predict": 1, "n_probs": 3})
        assert len(reply["completion_probabilities"][0]["top_logprobs"]) == 3
        proc = srv.proc
    assert proc.poll() is not None  # stopped on the way out
