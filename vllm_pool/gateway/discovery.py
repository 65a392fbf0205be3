"""Where the gateway's pools are: `--pool URL` (repeatable), `--pools-file FILE` (one URL a
line, `#` comments; re-read when it changes) and `--pools-dns NAME:PORT` (every A record of
NAME is a pool at http://ADDRESS:PORT, re-resolved every few seconds: a Kubernetes headless
Service). `Discovery.urls()` is the union, in that order, without repeats.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable

logger = logging.getLogger("vllm_pool.gateway")

DNS_EVERY_S = 5.0


def normalize(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def parse_pools_file(text: str) -> list[str]:
    """One URL a line; blank lines and `#` comments ignored."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(normalize(line))
    return out


def parse_dns(spec: str) -> tuple[str, int]:
    """`NAME:PORT` -> (NAME, PORT); ValueError otherwise."""
    name, sep, port = spec.rpartition(":")
    if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--pools-dns wants NAME:PORT, got {spec!r}")
    return name, int(port)


def resolve_a(name: str, port: int) -> list[str]:
    """The IPv4 addresses of `name` (its A records), sorted."""
    infos = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)
    return sorted({i[4][0] for i in infos}, key=socket.inet_aton)


class Discovery:
    """The pool URLs of the flags. Reading the file and resolving the name happen in
    `urls()`, which the gateway calls from a thread each time it refreshes the pools."""

    def __init__(self, pools: list[str] | None = None, pools_file: str | None = None,
                 pools_dns: str | None = None, dns_every_s: float = DNS_EVERY_S,
                 resolve: Callable[[str, int], list[str]] = resolve_a,
                 clock: Callable[[], float] = time.monotonic):
        self.static = [normalize(u) for u in pools or []]
        self.pools_file = pools_file
        self.dns = parse_dns(pools_dns) if pools_dns else None
        self.dns_every_s = dns_every_s
        self._resolve = resolve
        self._clock = clock
        self._file_key: tuple | None = None
        self._file_urls: list[str] = []
        self._dns_at: float | None = None
        self._dns_urls: list[str] = []

    @property
    def dynamic(self) -> bool:
        return bool(self.pools_file or self.dns)

    def _from_file(self) -> list[str]:
        try:
            st = os.stat(self.pools_file)
        except OSError as e:
            if self._file_key is not None:
                logger.warning("pools file %s: %s; keeping its last list", self.pools_file, e)
                self._file_key = None
            return self._file_urls
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key != self._file_key:
            with open(self.pools_file, encoding="utf-8") as f:
                self._file_urls = parse_pools_file(f.read())
            self._file_key = key
        return self._file_urls

    def _from_dns(self) -> list[str]:
        now = self._clock()
        if self._dns_at is None or now - self._dns_at >= self.dns_every_s:
            self._dns_at = now
            name, port = self.dns
            try:
                self._dns_urls = [f"http://{a}:{port}" for a in self._resolve(name, port)]
            except OSError as e:
                # No record (yet): a headless Service without ready pods has none.
                logger.warning("pools DNS %s:%d: %s", name, port, e)
                self._dns_urls = []
        return self._dns_urls

    def urls(self) -> list[str]:
        found = list(self.static)
        if self.pools_file:
            found += self._from_file()
        if self.dns:
            found += self._from_dns()
        return list(dict.fromkeys(found))
