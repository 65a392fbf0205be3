"""The user-path benchmark on CPU, end to end: the real shell commands against a real pool
(parking on) and plain vLLM, tiny models. Asserted: every step of the sequence succeeded,
the greedy tokens of A, A' and B are plain vLLM's (and A' is not A), and the JSON has the
fields the report is built from. No timing asserts: the figures are the benchmark's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import MODEL_CACHE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_path_bench_every_step_succeeds_with_plain_greedy_tokens(tmp_path, model_a,
                                                                     model_b):
    from vllm_pool.testing.tiny_model import build_model

    model_ft = build_model(os.path.join(MODEL_CACHE, "tiny-a-ft"), seed=2)
    out, md = tmp_path / "user.json", tmp_path / "user.md"
    # One cycle and one plain server per model (enough for the greedy comparison) keep it
    # within a few minutes on two cores; the figure of record runs the whole sequence.
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_user_path.py"),
         "--device", "cpu", "--model", model_a, "--model-finetune", model_ft,
         "--model-b", model_b, "--cycles", "1", "--plain", "models", "--route-reps", "1",
         "--timeout", "300", "--probe-timeout", "120", "--log-dir", str(tmp_path / "logs"),
         "--output-json", str(out), "--output-md", str(md)],
        capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["failed_steps"] == [], s["failed_steps"]
    names = [x["step"] for x in res["pool"]["steps"]]
    assert names == ["attach_a", "reattach_a", "attach_finetune", "swap_b", "attach_a_to_park",
                     "wake_a", "cycle_1", "same_port_first", "same_port_again"]
    assert s["all_pool_steps_ok"] and s["all_plain_steps_ok"]
    assert {x["step"] for x in res["plain"]["steps"]} == {"attach_a", "attach_finetune",
                                                          "swap_b"}
    # A, A' and B: every pool run gave plain vLLM's greedy tokens; A' has its own weights.
    assert s["greedy_match"], s["greedy"]
    assert s["greedy"]["a"]["pool_runs"] == 7 and s["finetune_differs_from_a"]
    steps = {x["step"]: x for x in res["pool"]["steps"]}
    assert steps["wake_a"]["woken"] and steps["wake_a"]["instance_id"] == \
        steps["attach_a_to_park"]["instance_id"]
    assert steps["same_port_again"]["port"] == steps["same_port_first"]["port"]
    for k in ("machine", "vllm_version", "cli", "models", "settings", "date"):
        assert res[k], k
    assert res["cli"]["route"] in ("vllm", "module", "vllm-pool") and res["cli"]["probes"]
    for x in res["pool"]["steps"]:
        assert {"to_first_completion_s", "attach_cmd_s", "phases", "engine_host"} <= set(x)
        assert "engine_start" in x["phases"] or x["woken"]
    assert res["pool"]["route"]["vllm_pool"]  # `vllm-pool ls` ran
    assert len(s["targets"]) == 7 and all("pass" in t and "measured" in t for t in s["targets"])
    assert "| target |" in md.read_text() and res["machine"] in md.read_text()
