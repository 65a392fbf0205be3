"""The attach benchmark runs end to end (one repetition, tiny workload) and its JSON has
every field the performance document relies on. Numbers are not checked here: speed is
shown by benchmark runs, never by timed asserts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_attach_json_has_every_field(tmp_path, model_a, model_b):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_attach.py"), "--device", "cpu",
         "--reps", "1", "--model", model_a, "--model-b", model_b, "--num-prompts", "8",
         "--input-len", "32", "--output-len", "8", "--concurrency", "4",
         "--log-dir", str(tmp_path / "logs"), "--output-json", str(out)],
        capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "speed-up to first completion" in r.stdout  # the table was printed
    res = json.loads(out.read_text())
    for k in ("machine", "device", "vllm_version", "model", "model_b", "settings", "runs",
              "summary", "pool_ready_s", "workers_at_start"):
        assert k in res, k
    kinds = {r["contender"] for r in res["runs"]}
    assert kinds == {"plain", "attach", "swap"}
    for run in res["runs"]:
        assert run["cache_mode"] in ("empty", "warm")
        if run["contender"] in ("plain", "attach"):
            assert {"health_s", "first_completion_s", "cache", "output"} <= set(run)
    att = next(r for r in res["runs"] if r["contender"] == "attach")
    assert {"phases", "detach_s", "memory_after_detach", "serving"} <= set(att)
    assert {"output_tok_per_s", "ttft_ms", "itl_ms"} <= set(att["serving"])
    m = res["summary"]["warm"]
    for k in ("plain", "attach", "swap", "speedup_first_completion", "serving_ratio",
              "same_greedy_output"):
        assert k in m, k
    assert m["same_greedy_output"] is True
