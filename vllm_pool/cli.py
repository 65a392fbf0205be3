"""`vllm-pool serve|attach|detach|ls|gateway` (also reached as `vllm serve-pool|attach|detach`,
`vllm pool ls|gateway`).

attach/detach/ls are thin clients of the control API (`client.py`): they import neither
torch nor vLLM, so they answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time

from vllm_pool.api_models import PhaseEvent, StartedEvent
from vllm_pool.client import DEFAULT_POOL, POOL_URL_ENV, PoolClient, PoolError


def _pool_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", default=None,
                   help=f"control API URL (default ${POOL_URL_ENV} or {DEFAULT_POOL})")


def build_parser(prog: str = "vllm-pool") -> argparse.ArgumentParser:
    from vllm_pool.daemon.server import add_serve_args
    from vllm_pool.gateway.server import add_gateway_args

    p = argparse.ArgumentParser(prog=prog, description="Warm GPU worker pool for vLLM.")
    sub = p.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="start a pool daemon")
    add_serve_args(serve)
    add_gateway_args(serve, models_required=False)
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


class _Progress:
    """An attach's phases on stderr as they finish (stdout keeps the result alone): one
    live line rewritten in place on a terminal, a plain line per phase otherwise."""

    def __init__(self, label: str, out=sys.stderr):
        self.out = out
        self.live = out.isatty()
        self.t0 = self.since = time.perf_counter()
        self.label, self.phase = label, "reserve"
        self.lock = threading.Lock()
        self.ended = threading.Event()
        if self.live:  # the elapsed time moves while a phase runs
            threading.Thread(target=self._tick, daemon=True).start()

    def __call__(self, ev) -> None:
        with self.lock:
            if isinstance(ev, StartedEvent):
                i = ev.instance
                self.label = i.name
                if i.state != "attaching":
                    self.phase = "wake"
                if not self.live:
                    self._print(f"{'waking' if self.phase == 'wake' else 'attaching'} "
                                f"{i.model} as {i.name} (id {i.id}) on {','.join(i.devices)}, "
                                f"port {i.port}")
            elif isinstance(ev, PhaseEvent):
                if not self.live:
                    self._print(f"  {ev.phase:<18}{ev.seconds:8.2f}s")
                self.phase, self.since = ev.next, time.perf_counter()
            self._draw()

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _draw(self) -> None:
        if not self.live or self.ended.is_set():
            return
        now = time.perf_counter()
        line = (f"attaching {self.label}: {self.phase or 'done'} {now - self.since:.1f}s "
                f"(total {now - self.t0:.1f}s)")
        width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be rewritten
        self.out.write("\r" + line[:width] + "\x1b[K")
        self.out.flush()

    def _tick(self) -> None:
        while not self.ended.wait(0.2):
            with self.lock:
                self._draw()

    def close(self) -> None:
        with self.lock:
            self.ended.set()
            if self.live:
                self.out.write("\r\x1b[K")
                self.out.flush()


def cmd_attach(args: argparse.Namespace, extra: list[str]) -> int:
    body = {"model": args.model, "tp": args.tp, "pp": args.pp, "name": args.name,
            "port": args.port, "args": extra, "timeout_s": args.attach_timeout,
            "env": dict(kv.split("=", 1) for kv in args.env if "=" in kv),
            "devices": args.devices.split(",") if args.devices else None}
    t0 = time.perf_counter()
    # --json: the plain call, so nothing but the JSON is printed.
    progress = None if args.json else _Progress(args.name or args.model)
    try:
        inst = PoolClient(args.pool).attach(body, timeout=args.attach_timeout + 60,
                                            on_event=progress)
    except PoolError as e:
        if progress is not None:
            progress.close()
        print(f"attach failed: {e}", file=sys.stderr)
        return 1
    except BaseException:  # ^C: leave the terminal's line clean (the attach goes on)
        if progress is not None:
            progress.close()
        raise
    if progress is not None:
        progress.close()
    if args.json:
        print(inst.model_dump_json(indent=2))
        return 0
    how = "woke parked" if inst.woken else "attached"
    print(f"{how} {inst.model} as {inst.name} (id {inst.id}) on {','.join(inst.devices)} in "
          f"{time.perf_counter() - t0:.2f}s ({inst.engine_host} engine host)")
    print(f"endpoint: {inst.url}/v1")
    print(f"phases:   {_fmt_phases(inst.phases)}")
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    try:
        inst = PoolClient(args.pool).detach(args.ref, args.park)
    except PoolError as e:
        print(f"detach failed: {e}", file=sys.stderr)
        return 1
    if inst.state == "parked":
        print(f"parked {inst.name} (id {inst.id}) in {inst.phases.get('park', 0):.2f}s; "
              f"host memory {_mib(inst.host_bytes)}")
    else:
        print(f"detached {inst.name} (id {inst.id}) in {inst.phases.get('detach', 0):.2f}s")
    return 0


def _mib(b: int) -> str:
    return f"{b / 2**20:.0f}MiB"


def cmd_ls(args: argparse.Namespace) -> int:
    client = PoolClient(args.pool)
    try:
        workers, instances = client.workers(), client.instances()
        devices = client.devices()
    except PoolError as e:
        print(f"ls failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"workers": [w.model_dump(mode="json") for w in workers],
                          "instances": [i.model_dump(mode="json") for i in instances],
                          "devices": [d.model_dump(mode="json") for d in devices]},
                         indent=2))
        return 0
    names = {i.id: i.name for i in instances}
    # MEMORY and IDLE: the worker's own (GPU: its process, NVML); DEVICE FREE: the device's.
    print(f"{'SLOT':<5}{'DEVICE':<9}{'STATE':<11}{'PID':<9}{'INSTANCE':<20}{'MEMORY':<10}"
          f"{'IDLE':<10}DEVICE FREE")
    for w in workers:
        free = w.device_free_bytes
        print(f"{w.slot:<5}{w.device:<9}{w.state.value:<11}{str(w.pid):<9}"
              f"{names.get(w.instance_id, w.instance_id or '-'):<20}"
              f"{_mib(w.memory_bytes):<10}{_mib(w.baseline_bytes):<10}"
              + (f"{_mib(free)} of {_mib(w.device_total_bytes)}" if free is not None else "-"))
        wu = w.kernel_warmup
        if wu is not None and wu.state in ("waiting", "retrying", "failed"):
            retry = f", next try in {wu.retry_in_s:.0f}s" if wu.retry_in_s else ""
            print(f"    kernel warm-up {wu.state} ({wu.failures} failed{retry}): {wu.error}")
    print()
    print(f"{'NAME':<20}{'MODEL':<32}{'TP':<4}{'PORT':<7}{'STATE':<11}{'UPTIME':<9}ATTACH")
    for i in instances:
        up = f"{i.uptime_s:.0f}s" if i.uptime_s is not None else "-"
        total = i.phases.get("total")
        print(f"{i.name:<20}{i.model[-31:]:<32}{i.tp:<4}{i.port:<7}"
              f"{i.state.value:<11}{up:<9}{f'{total:.2f}s' if total else '-'}"
              + (f"  host memory {_mib(i.host_bytes)}" if i.state == "parked" else "")
              + (f"  error: {i.error}" if i.error else ""))
        if i.phases:
            print(f"    {i.engine_host or '-'} engine; phases: {_fmt_phases(i.phases)}")
    print()
    # The whole device (all processes): what packing places the next attach against.
    print(f"{'DEVICE':<9}{'TOTAL':<11}{'USED':<11}{'FREE':<11}INSTANCES")
    for d in devices:
        fig = [f"{v}MiB" if v is not None else "-" for v in (d.total_mib, d.used_mib, d.free_mib)]
        print(f"{d.device:<9}{fig[0]:<11}{fig[1]:<11}{fig[2]:<11}{', '.join(d.instances) or '-'}")
    return 0


def _main(argv: list[str] | None, prog: str) -> int:
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
        from vllm_pool.gateway.server import EmbeddedGateway

        return serve(args, [EmbeddedGateway(args)] if args.models else [])
    if args.cmd == "gateway":
        from vllm_pool.gateway.standalone import run

        return run(args)
    if args.cmd == "attach":
        return cmd_attach(args, extra)
    if args.cmd == "detach":
        return cmd_detach(args)
    return cmd_ls(args)


def main(argv: list[str] | None = None, prog: str = "vllm-pool") -> int:
    try:
        return _main(argv, prog)
    except BrokenPipeError:  # the reader went away (`vllm-pool ls | head -1`): no traceback
        sys.stderr.close()
        return 1


if __name__ == "__main__":
    sys.exit(main())
