"""`vllm-pool serve|attach|detach|ls|gateway` (also reached as `vllm serve-pool|attach|detach`,
`vllm pool ls|gateway`).

attach/detach/ls are thin HTTP clients on the standard library: they import neither torch
nor vLLM, so they answer in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

DEFAULT_POOL = os.environ.get("VLLM_POOL_URL", "http://127.0.0.1:8100")


class PoolError(Exception):
    """A control call failed; `status` is the HTTP status, None if the pool was not reached."""

    def __init__(self, msg: str, status: int | None = None):
        super().__init__(msg)
        self.status = status


def request(pool: str, method: str, path: str, body: dict | None = None,
            timeout: float = 3600.0, key: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(pool.rstrip("/") + path, data=data, method=method)
    req.add_header("content-type", "application/json")
    key = key or os.environ.get("VLLM_POOL_API_KEY")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail", e.reason)
        except Exception:
            detail = e.reason
        raise PoolError(f"HTTP {e.code}: {detail}", e.code) from None
    except (urllib.error.URLError, OSError) as e:
        raise PoolError(f"cannot reach the pool at {pool}: {e}") from None


def _pool_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", default=DEFAULT_POOL,
                   help="control API URL (default $VLLM_POOL_URL or http://127.0.0.1:8100)")


def build_parser(prog: str = "vllm-pool") -> argparse.ArgumentParser:
    from vllm_pool.daemon.server import add_serve_args

    p = argparse.ArgumentParser(prog=prog, description="Warm GPU worker pool for vLLM.")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_serve_args(sub.add_parser("serve", help="start a pool daemon"))
    a = sub.add_parser("attach", help="attach a model to free workers (any other "
                                      "`vllm serve` argument is passed through)")
    _pool_arg(a)
    a.add_argument("--model", required=True)
    a.add_argument("--tp", "--tensor-parallel-size", "-tp", dest="tp", type=int, default=1)
    a.add_argument("--pp", "--pipeline-parallel-size", "-pp", dest="pp", type=int, default=1)
    a.add_argument("--port", type=int, default=None, help="engine port (default: a free one)")
    a.add_argument("--name", default=None)
    a.add_argument("--devices", default=None, help="pin to devices, e.g. cuda:0,cuda:1")
    a.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for this engine (repeatable)")
    a.add_argument("--attach-timeout", type=float, default=900.0)
    a.add_argument("--json", action="store_true", help="print the instance as JSON")
    d = sub.add_parser("detach", help="stop an instance and return its workers")
    _pool_arg(d)
    d.add_argument("ref", metavar="ID|NAME")
    d.add_argument("--park", action="store_true", default=None,
                   help="park instead: keep the instance asleep for a fast re-attach "
                        "(pool started with --enable-parking)")
    d.add_argument("--no-park", dest="park", action="store_false",
                   help="detach for real even if the pool parks by default")
    gw = sub.add_parser("gateway", help="the gateway in a process of its own, in front of a "
                                        "running pool: it can be restarted while the models "
                                        "it attached keep serving")
    _pool_arg(gw)
    from vllm_pool.daemon.server import add_gateway_args

    add_gateway_args(gw, models_required=True)
    gw.add_argument("--pool-wait", type=float, default=300.0,
                    help="seconds to wait for the pool to be ready at start")
    gw.add_argument("--api-key", default=None,
                    help="key the gateway requires of its clients (or $VLLM_POOL_API_KEY, "
                         "which is also sent to the pool); mandatory off loopback")
    ls = sub.add_parser("ls", help="list workers and instances")
    _pool_arg(ls)
    ls.add_argument("--json", action="store_true")
    return p


def _fmt_phases(phases: dict) -> str:
    return "  ".join(f"{k}={v:.2f}s" for k, v in phases.items())


def cmd_attach(args: argparse.Namespace, extra: list[str]) -> int:
    body = {"model": args.model, "tp": args.tp, "pp": args.pp, "name": args.name,
            "port": args.port, "args": extra, "timeout_s": args.attach_timeout,
            "env": dict(kv.split("=", 1) for kv in args.env if "=" in kv),
            "devices": args.devices.split(",") if args.devices else None}
    t0 = time.perf_counter()
    try:
        inst = request(args.pool, "POST", "/instances", body)
    except PoolError as e:
        print(f"attach failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(inst, indent=2))
        return 0
    how = "woke parked" if inst.get("woken") else "attached"
    print(f"{how} {inst['model']} as {inst['name']} (id {inst['id']}) on "
          f"{','.join(inst['devices'])} in {time.perf_counter() - t0:.2f}s "
          f"({inst['engine_host']} engine host)")
    print(f"endpoint: {inst['url']}/v1")
    print(f"phases:   {_fmt_phases(inst['phases'])}")
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    query = "" if args.park is None else f"?park={str(args.park).lower()}"
    try:
        inst = request(args.pool, "DELETE", f"/instances/{args.ref}{query}")
    except PoolError as e:
        print(f"detach failed: {e}", file=sys.stderr)
        return 1
    if inst["state"] == "parked":
        print(f"parked {inst['name']} (id {inst['id']}) in {inst['phases'].get('park', 0):.2f}s; "
              f"host memory {_mib(inst['host_bytes'])}")
    else:
        print(f"detached {inst['name']} (id {inst['id']}) in "
              f"{inst['phases'].get('detach', 0):.2f}s")
    return 0


def _mib(b: int) -> str:
    return f"{b / 2**20:.0f}MiB"


def cmd_ls(args: argparse.Namespace) -> int:
    try:
        workers = request(args.pool, "GET", "/workers", timeout=30)
        instances = request(args.pool, "GET", "/instances", timeout=30)
    except PoolError as e:
        print(f"ls failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"workers": workers, "instances": instances}, indent=2))
        return 0
    names = {i["id"]: i["name"] for i in instances}
    # MEMORY and IDLE: the worker's own (GPU: its process, NVML); DEVICE FREE: the device's.
    print(f"{'SLOT':<5}{'DEVICE':<9}{'STATE':<11}{'PID':<9}{'INSTANCE':<20}{'MEMORY':<10}"
          f"{'IDLE':<10}DEVICE FREE")
    for w in workers:
        free = w.get("device_free_bytes")
        print(f"{w['slot']:<5}{w['device']:<9}{w['state']:<11}{str(w['pid']):<9}"
              f"{names.get(w['instance_id'], w['instance_id'] or '-'):<20}"
              f"{_mib(w['memory_bytes']):<10}{_mib(w['baseline_bytes']):<10}"
              + (f"{_mib(free)} of {_mib(w['device_total_bytes'])}" if free is not None else "-"))
        wu = w.get("kernel_warmup") or {}
        if wu.get("state") in ("waiting", "retrying", "failed"):
            retry = f", next try in {wu['retry_in_s']:.0f}s" if wu.get("retry_in_s") else ""
            print(f"    kernel warm-up {wu['state']} ({wu['failures']} failed{retry}): "
                  f"{wu['error']}")
    print()
    print(f"{'NAME':<20}{'MODEL':<32}{'TP':<4}{'PORT':<7}{'STATE':<11}{'UPTIME':<9}ATTACH")
    for i in instances:
        up = f"{i['uptime_s']:.0f}s" if i["uptime_s"] is not None else "-"
        total = i["phases"].get("total")
        print(f"{i['name']:<20}{i['model'][-31:]:<32}{i['tp']:<4}{i['port']:<7}"
              f"{i['state']:<11}{up:<9}{f'{total:.2f}s' if total else '-'}"
              + (f"  host memory {_mib(i['host_bytes'])}" if i["state"] == "parked" else "")
              + (f"  error: {i['error']}" if i["error"] else ""))
        if i["phases"]:
            print(f"    {i['engine_host'] or '-'} engine; phases: {_fmt_phases(i['phases'])}")
    return 0


def main(argv: list[str] | None = None, prog: str = "vllm-pool") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    if argv and argv[0] == "attach":
        args, extra = parser.parse_known_args(argv)
        # `vllm-pool attach ... -- --dtype x`: the separator is ours, not vLLM's.
        extra = [a for a in extra if a != "--"]
    else:
        args, extra = parser.parse_args(argv), []
    if args.cmd == "serve":
        from vllm_pool.daemon.server import serve

        return serve(args)
    if args.cmd == "gateway":
        from vllm_pool.gateway.standalone import run

        return run(args)
    if args.cmd == "attach":
        return cmd_attach(args, extra)
    if args.cmd == "detach":
        return cmd_detach(args)
    return cmd_ls(args)


if __name__ == "__main__":
    sys.exit(main())
