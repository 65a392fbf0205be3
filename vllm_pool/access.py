"""Who may call the pool's control API and the gateway: the trust rules in one place.

Loopback needs no key. Any other address needs one, from the flag or $VLLM_POOL_API_KEY,
and then every call must carry `Authorization: Bearer <key>` (vLLM's --api-key convention).
"""

from __future__ import annotations

import hmac
import ipaddress
import os

API_KEY_ENV = "VLLM_POOL_API_KEY"


def api_key(flag: str | None) -> str | None:
    """The key in force: the flag's, else the environment's."""
    return flag or os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_key_off_loopback(host: str, key: str | None, flag: str) -> None:
    """SystemExit naming the flag when `host` is not loopback and there is no key."""
    if not is_loopback(host) and not key:
        raise SystemExit(f"{flag} {host} is not loopback: an API key is required "
                         f"(--api-key or ${API_KEY_ENV})")


def bearer(key: str) -> bytes:
    return f"Bearer {key}".encode()


def authorized(header: bytes, expected: bytes | None) -> bool:
    """Whether an Authorization header value matches (constant time); no key: anyone."""
    return expected is None or hmac.compare_digest(header, expected)
