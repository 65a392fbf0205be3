"""Benchmark: CUDA graph capture sizes against attach time and serving speed.

vLLM captures one CUDA graph per batch size in `cudagraph_capture_sizes` (by default
1, 2, 4, then every 8 up to 256 and every 16 up to `max_cudagraph_capture_size`); a batch
between two sizes is padded up to the next. Fewer sizes capture faster, at the cost of
padding. This runs each variant of `--variant NAME=ARGS` (extra `vllm serve` arguments)
through one pool, interleaved over `--reps` (the order alternates), and for each attach
records the phases (graph_capture, compile, total), the greedy output, and the serving
workload at each of `--concurrencies` (decode batches of that size). JSON plus a table.

    python benchmarks/bench_capture.py --device gpu --model /root/models/l1b \
        --engine-args "--dtype bfloat16 --max-model-len 2048" \
        --variant 'default=' \
        --variant "pow2=--compilation-config '{\"cudagraph_capture_sizes\":[1,2,4,8,16,32,64,128,256,512]}'"
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time

from bench_attach import Pool, build_models, first_completion, save, serving
from common import machine, start_run


def parse_variant(s: str) -> tuple[str, list[str]]:
    name, sep, args = s.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant wants NAME=ARGS, got {s!r}")
    return name, shlex.split(args)


def attach_once(a, pool: Pool, model: str, name: str, args: list[str]) -> dict:
    run = copy.copy(a)
    run.engine_args = [*a.engine_args, *args]
    t0 = time.perf_counter()
    inst = pool.attach(run, model, name, {})
    out = first_completion(inst.url, model)
    res = {"first_completion_s": time.perf_counter() - t0, "phases": inst.phases,
           "output": out, "serving": {}}
    for c in a.concurrencies:
        w = copy.copy(a)
        w.concurrency = c
        res["serving"][str(c)] = serving(inst.url, model, w)
    pool.detach(name)
    return res


def summarize(result: dict) -> dict:
    med = statistics.median
    base = None
    out = {}
    for name in result["variants"]:
        rs = [r for r in result["runs"] if r["variant"] == name]
        s = {k: med(r["phases"].get(k, 0.0) for r in rs)
             for k in ("graph_capture", "compile", "memory_profiling", "total")}
        s["first_completion_s"] = med(r["first_completion_s"] for r in rs)
        s["serving"] = {c: {"output_tok_per_s": med(r["serving"][c]["output_tok_per_s"]
                                                    for r in rs),
                            "itl_p50_ms": med(r["serving"][c]["itl_ms"]["p50"] for r in rs),
                            "ttft_p50_ms": med(r["serving"][c]["ttft_ms"]["p50"] for r in rs)}
                        for c in rs[0]["serving"]}
        if base is None:
            base = s
        else:
            s["throughput_vs_" + result["variants_order"][0]] = {
                c: s["serving"][c]["output_tok_per_s"] / base["serving"][c]["output_tok_per_s"]
                for c in s["serving"]}
        out[name] = s
    outs = {json.dumps(r["output"]) for r in result["runs"]}
    out["same_greedy_output"] = len(outs) == 1
    return out


def print_table(result: dict) -> None:
    s = result["summary"]
    first = result["variants_order"][0]
    print(f"\n=== CUDA graph capture sizes | {result['machine']} | vLLM "
          f"{result['vllm_version']} | model {os.path.basename(result['model'].rstrip('/'))} "
          f"| {result['settings']['reps']} reps, medians ===")
    conc = list(s[first]["serving"])
    print(f"{'variant':<10}{'capture s':>10}{'compile s':>10}{'attach s':>10}"
          + "".join(f"{'tok/s @' + c:>12}{'ITL50 ms':>10}" for c in conc))
    for name in result["variants_order"]:
        v = s[name]
        print(f"{name:<10}{v['graph_capture']:>10.2f}{v['compile']:>10.2f}{v['total']:>10.2f}"
              + "".join(f"{v['serving'][c]['output_tok_per_s']:>12.0f}"
                        f"{v['serving'][c]['itl_p50_ms']:>10.2f}" for c in conc))
        ratio = v.get("throughput_vs_" + first)
        if ratio:
            print(f"{'':<10}throughput / {first}: "
                  + ", ".join(f"@{c} {r:.3f}" for c, r in ratio.items()))
    print(f"same greedy output, all variants: {s['same_greedy_output']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    p.add_argument("--gpus", default="0")
    p.add_argument("--cpu-slots", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--model", default=None, help="default: the tiny model built here")
    p.add_argument("--model-b", default=None, help=argparse.SUPPRESS)
    p.add_argument("--engine-args", default="--dtype bfloat16 --max-model-len 2048",
                   help="`vllm serve` arguments shared by every variant")
    p.add_argument("--variant", action="append", type=parse_variant, required=True,
                   help="NAME=ARGS: extra `vllm serve` arguments of one variant (repeat)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--concurrencies", default="16,48",
                   help="serving workload at each of these concurrencies")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--serving-rounds", type=int, default=2)
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-cli", choices=["vllm-pool", "vllm"], default="vllm-pool")
    p.add_argument("--kernel-warmup", choices=["auto", "off", "eager", "compiled"],
                   default="auto")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    a.concurrencies = [int(c) for c in a.concurrencies.split(",")]
    scratch, log_dir = start_run(a, "bench-capture-")
    model = a.model or build_models(a, scratch)[0]
    import vllm  # noqa: F401  (version only)

    names = [n for n, _ in a.variant]
    if len(set(names)) != len(names):
        raise SystemExit("variant names must differ")
    result = {"benchmark": "capture", "machine": machine(a.device),
              "vllm_version": vllm.__version__, "model": model,
              "settings": {k: v for k, v in vars(a).items()
                           if k not in ("output_json", "log_dir", "variant")},
              "variants": {n: args for n, args in a.variant}, "variants_order": names,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": []}
    pool = Pool(a, log_dir)
    result["pool_ready_s"] = pool.ready_s
    try:
        for rep in range(a.reps):
            order = a.variant if rep % 2 == 0 else list(reversed(a.variant))
            for name, args in order:
                r = attach_once(a, pool, model, f"cap-{name}-{rep}", args)
                r.update(variant=name, rep=rep)
                result["runs"].append(r)
                save(result, a.output_json, partial=True)
                print(f"[rep {rep}] {name}: attach {r['phases'].get('total', 0):.2f}s "
                      f"(graph_capture {r['phases'].get('graph_capture', 0):.2f}s), "
                      + ", ".join(f"@{c} {v['output_tok_per_s']:.0f} tok/s"
                                  for c, v in r["serving"].items()), flush=True)
    finally:
        pool.stop()
    result["summary"] = summarize(result)
    save(result, a.output_json, partial=False)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
