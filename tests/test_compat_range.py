"""The supported vLLM range (0.26-0.33) at both ends and just outside each, and the
per-version lookup of the signatures the pool was written for. No vLLM is imported."""

from __future__ import annotations

import pytest

from vllm_pool import compat


@pytest.mark.parametrize("version", ["0.26.0", "0.26.1", "0.32.0", "0.33.0", "0.33.4",
                                     "0.33.0+cpu"])
def test_supported_versions_pass(version):
    assert compat.check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.25.9", "0.25.1", "0.34.0", "0.34.0rc1", "1.0.0"])
def test_versions_outside_the_range_are_refused_naming_the_range(version):
    with pytest.raises(compat.UnsupportedVLLM) as e:
        compat.check_vllm_version(version)
    assert str(e.value) == (f"vLLM {version} is not supported by this vllm-pool: "
                            "version out of range; supported: 0.26-0.33")


def test_range_and_its_message_agree():
    assert compat.SUPPORTED == ((0, 26), (0, 33))
    assert compat.SUPPORTED_STR == "0.26-0.33"


def test_no_vllm_installed_is_refused(monkeypatch):
    monkeypatch.setattr(compat, "installed_vllm_version", lambda: None)
    with pytest.raises(compat.UnsupportedVLLM, match="vLLM is not installed; vllm-pool needs "
                       r"vLLM 0\.26-0\.33"):
        compat.check_vllm_version()


def test_serve_refuses_out_of_range_and_starts_past_the_check_in_range(monkeypatch):
    """`vllm-pool serve`'s first step: 0.34.0 stops it with the message; with 0.33.0 it
    goes on to the next check (a non-loopback host without a key, which stops it there)."""
    import argparse

    from vllm_pool import logs
    from vllm_pool import access
    from vllm_pool.daemon import server

    monkeypatch.setattr(logs, "configure_logging", lambda name: None)  # keep pytest's
    args = argparse.Namespace(host="0.0.0.0", api_key=None)
    monkeypatch.delenv(access.API_KEY_ENV, raising=False)
    monkeypatch.setattr(compat, "installed_vllm_version", lambda: "0.34.0")
    with pytest.raises(SystemExit, match="version out of range; supported: 0.26-0.33"):
        server.serve(args)
    monkeypatch.setattr(compat, "installed_vllm_version", lambda: "0.33.0")
    with pytest.raises(SystemExit, match="is not loopback: an API key is required"):
        server.serve(args)


def test_expected_signature_takes_the_latest_entry_at_or_before_the_version(monkeypatch):
    key = ("m", "f")
    monkeypatch.setitem(compat.SIGNATURES, key, {"0.26": "(a)", "0.32": "(a, b=)"})
    assert compat.expected_signature(key, "0.26.0") == "(a)"
    assert compat.expected_signature(key, "0.31.9") == "(a)"
    assert compat.expected_signature(key, "0.32.0") == "(a, b=)"
    assert compat.expected_signature(key, "0.33.0+cpu") == "(a, b=)"
    assert compat.expected_signature(key, "0.25.0") is None
    assert compat.expected_signature(("m", "other"), "0.32.0") is None


def test_signature_of_writes_names_defaults_and_kinds():
    assert compat.signature_of(compat.resolve_symbol(__name__, "K.m")) == \
        "(self, a, b=, *args, c, d=, **kw)"
    assert compat.signature_of(compat.resolve_symbol(__name__, "K.s")) == "static (x, *, y=)"
    assert compat.signature_of(compat.resolve_symbol(__name__, "K.c")) == "class (cls, v)"


class K:  # found by dotted path: compat.resolve_symbol imports this module
    def m(self, a, b=1, *args, c, d=2, **kw): ...

    @staticmethod
    def s(x, *, y=0): ...

    @classmethod
    def c(cls, v): ...
