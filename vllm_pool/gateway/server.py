"""Run the gateway: its own uvicorn server, port and event loop, in a thread of the daemon
process (`serve --models`) or of its own process (`vllm-pool gateway`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import threading

from vllm_pool import access
from vllm_pool.gateway.models_file import ModelEntry

logger = logging.getLogger("vllm_pool.gateway")


def add_gateway_args(p: argparse.ArgumentParser, models_required: bool) -> None:
    """The gateway's flags: of `serve --models` and of `vllm-pool gateway`."""
    g = p.add_argument_group("gateway", "one OpenAI endpoint for the models of a models "
                             "file, attached on demand (docs/gateway.md)")
    g.add_argument("--models", default=None, metavar="MODELS_YAML", required=models_required,
                   help="models file" + ("" if models_required else "; starts the gateway"))
    g.add_argument("--gateway-host", default="127.0.0.1",
                   help="gateway address (loopback default; otherwise --api-key is required, "
                        "and the gateway checks `Authorization: Bearer <key>` as vLLM does)")
    g.add_argument("--gateway-port", type=int, default=8000, help="gateway port")
    g.add_argument("--gateway-max-queue", type=int, default=1024,
                   help="requests that may wait for their model to be attached (over all "
                        "models); more get 429")
    g.add_argument("--gateway-queue-timeout", type=float, default=600.0,
                   help="seconds a request may wait for its model; then 503")
    g.add_argument("--gateway-max-turn", type=float, default=30.0,
                   help="grouped queue: seconds a model keeps admitting requests on a device "
                        "other models wait for; then it drains and gives way (docs/scale.md)")
    g.add_argument("--gateway-linger", type=float, default=1.0,
                   help="grouped queue: seconds an idle model keeps its device for its next "
                        "request before a waiting model takes it")


def checked_entries(args, api_key: str | None, devices: list[str]) -> list[ModelEntry]:
    """The models file of `serve --models` or `vllm-pool gateway`, checked whole against
    the pool's devices before the gateway starts; otherwise SystemExit naming the entry and
    field. Off loopback the gateway needs a key."""
    from vllm_pool.daemon.arg_policy import check_args
    from vllm_pool.gateway import models_file

    access.require_key_off_loopback(args.gateway_host, api_key, "--gateway-host")
    try:
        entries = models_file.load(args.models)
        models_file.check_against_pool(entries, devices, args.models, check_args)
    except models_file.ModelsFileError as e:
        raise SystemExit(f"models file refused: {e}") from None
    return entries


def bind(host: str, port: int) -> socket.socket:
    """Bind the gateway's port at start, so a taken port stops the daemon at once with
    the reason rather than leaving a daemon without its gateway."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"gateway: cannot listen on {host}:{port}: {e}") from None
    sock.set_inheritable(False)
    return sock


def group_policy(args):
    from vllm_pool.gateway.queue import GroupPolicy

    return GroupPolicy(max_turn_s=args.gateway_max_turn, linger_s=args.gateway_linger)


class Gateway:
    """The gateway's server on its own thread and event loop. `pool` is a pools.PoolSet,
    or one pool_view: LocalPool in the daemon (`serve --models`), a PoolSet of RemotePools
    in `vllm-pool gateway`."""

    def __init__(self, pool, entries: list[ModelEntry], sock: socket.socket,
                 api_key: str | None, max_queue: int, queue_timeout: float,
                 policy=None):
        import uvicorn

        from vllm_pool.gateway.app import build_gateway_app
        from vllm_pool.gateway.metrics import GatewayMetrics
        from vllm_pool.gateway.router import Router

        self.sock = sock
        self.metrics = GatewayMetrics()
        self.router = Router(pool, entries, self.metrics, max_queue=max_queue,
                             queue_timeout=queue_timeout, policy=policy)
        app = build_gateway_app(self.router, self.metrics, api_key)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                # many concurrent streams: no keep-alive cap below theirs
                                limit_concurrency=None, backlog=4096,
                                # Proxied answers carry the engine's Date and Server; ours
                                # would repeat them. No X-Forwarded-* rewriting: unused.
                                server_header=False, date_header=False,
                                proxy_headers=False)

        class _ThreadServer(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield  # signals belong to the daemon's main thread

        self.server = _ThreadServer(config)
        self.thread = threading.Thread(target=self._run, name="PoolGateway", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException:
            logger.exception("gateway server stopped with an error")

    def start(self) -> None:
        self.thread.start()
        host, port = self.sock.getsockname()[:2]
        logger.info("gateway at http://%s:%d/v1 (%d models)", host, port,
                    len(self.router.models))

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()


class EmbeddedGateway:
    """The gateway of `serve --models`, in the daemon's process beside its pool (a
    daemon.server.Companion): the models file is checked and the port bound before the
    pool starts, so a bad file or a taken port stops the daemon at once."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sock: socket.socket | None = None
        self.gateway: Gateway | None = None
        self.entries: list[ModelEntry] = []
        self.api_key: str | None = None

    def prepare(self, api_key: str | None, devices: list[str]) -> None:
        self.api_key = api_key
        self.entries = checked_entries(self.args, api_key, devices)
        self.sock = bind(self.args.gateway_host, self.args.gateway_port)

    def start(self, pool) -> None:
        from vllm_pool.gateway.pool_view import LocalPool

        self.gateway = Gateway(LocalPool(pool), self.entries, self.sock, self.api_key,
                               self.args.gateway_max_queue, self.args.gateway_queue_timeout,
                               group_policy(self.args))
        self.gateway.start()

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        elif self.sock is not None:
            self.sock.close()
