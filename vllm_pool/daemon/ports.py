"""Engine ports: whether one is free, and a free one."""

from __future__ import annotations

import socket


def port_free(host: str, port: int) -> bool:
    """Whether the engine could bind `port`, checked the way its server binds
    (vLLM's create_server_socket: SO_REUSEADDR), so connections in TIME_WAIT from the
    instance that had the port before do not count as "in use"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str, taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            p = s.getsockname()[1]
        if p not in taken:
            return p
