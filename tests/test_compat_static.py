"""What the pool needs of the installed vLLM, checked without starting an engine.

Runs in every CI leg against that leg's vLLM (0.32.0, 0.27.1, and 0.33.0 in the static leg,
scripts/static-check.sh, where no engine can run), and against the Python source of
0.26.0 (the GPU kit's vLLM) where scripts/setup-static-env.sh unpacked it. Each symbol is
its own test, so a change in vLLM fails CI with the symbol's name. The checks are the
pool worker's own (`compat.vllm_problems`, called by `compat.check_vllm` at worker start).
"""

from __future__ import annotations

import glob
import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import vllm_pool
from tests.compat_source import MISSING, source_signature
from vllm_pool import compat

VERSION = compat.installed_vllm_version()
pytestmark = pytest.mark.skipif(VERSION is None, reason="no vLLM installed")

SOURCE_ROOTS = sorted(glob.glob(os.path.join(
    os.path.expanduser(os.environ.get("VLLM_POOL_VLLM_SOURCES", "~/.cache/vllm-pool/src")),
    "vllm-*", "vllm")))


def _key_id(key: tuple[str, str]) -> str:
    return f"{key[0]}.{key[1]}"


def test_installed_version_is_in_range_by_metadata_alone():
    """What `vllm-pool serve` checks first: the installed version, read from package
    metadata, in a process that has not imported vLLM (and does not import it)."""
    code = ("import sys; from vllm_pool import compat; print(compat.check_vllm_version()); "
            "assert 'vllm' not in sys.modules, 'the version check imported vLLM'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=os.path.dirname(
                             os.path.dirname(vllm_pool.__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == VERSION


def test_every_vllm_pool_module_imports():
    """Each module of the package imports against this vLLM (the executor, the worker's
    WorkerProc subclass and sleep backend, the engine host, ...)."""
    failed = {}
    for m in pkgutil.walk_packages(vllm_pool.__path__, "vllm_pool."):
        if m.name.endswith(".__main__"):  # runs the CLI
            continue
        try:
            importlib.import_module(m.name)
        except Exception as e:  # noqa: BLE001 - reported below, by module
            failed[m.name] = f"{type(e).__name__}: {e}"
    assert not failed, failed


def test_every_vllm_module_the_pool_names_imports():
    from vllm_pool.engine import entry

    # The engine host's prewarm list may name modules a version moved (it skips those).
    moved = {"vllm.entrypoints.openai.cli_args"}
    mods = {m for m, _ in compat.REQUIRED_SYMBOLS} | {m for m, _ in compat.SIGNATURES} \
        | {m for m in entry.PREWARM if m.startswith("vllm.") and m not in moved}
    failed = {}
    for m in sorted(mods):
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001
            failed[m] = f"{type(e).__name__}: {e}"
    assert not failed, failed


@pytest.mark.parametrize("key", compat.REQUIRED_SYMBOLS, ids=_key_id)
def test_required_symbol(key):
    try:
        compat.resolve_symbol(*key)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"vLLM {VERSION}: {_key_id(key)} missing ({e})")


@pytest.mark.parametrize("key", list(compat.SIGNATURES), ids=_key_id)
def test_signature_is_the_one_the_pool_was_written_for(key):
    want = compat.expected_signature(key, VERSION)
    assert want is not None, f"SIGNATURES has no entry for vLLM {VERSION}"
    try:
        got = compat.signature_of(compat.resolve_symbol(*key))
    except (ImportError, AttributeError):
        got = "missing"
    assert got == want, f"vLLM {VERSION}: {_key_id(key)} is {got}; the pool was written for {want}"


def test_the_workers_check_passes():
    """compat.check_vllm is what each pool worker runs before it reports ready: range,
    symbols, and signatures (those only logged there)."""
    assert compat.check_vllm() == compat.vllm_version()
    assert compat.vllm_problems() == ([], [])


def test_compile_factors_ignore_what_the_pool_sets_per_attach(monkeypatch):
    """The engine environment the pool adds per attach (its run directory, the lease, fork,
    the startup plan) must not enter vLLM's compile-cache key, or no two attaches would
    share compiled graphs (nor the pool with plain `vllm serve`)."""
    import vllm.envs as envs

    def factors(run_dir: str, startup_plan: str, method: str) -> dict:
        monkeypatch.setenv("VLLM_RPC_BASE_PATH", run_dir)
        monkeypatch.setenv("VLLM_POOL_RUN_DIR", run_dir)
        monkeypatch.setenv("VLLM_POOL_LEASE", f'{{"dir": "{run_dir}"}}')
        monkeypatch.setenv("VLLM_ENABLE_STARTUP_PLAN", startup_plan)
        monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", method)
        envs.disable_envs_cache()
        return envs.compile_factors()

    assert factors("/run/a", "1", "fork") == factors("/run/b", "0", "spawn")


@pytest.mark.skipif(not SOURCE_ROOTS, reason="no unpacked vLLM source (setup-static-env.sh)")
@pytest.mark.parametrize("root", SOURCE_ROOTS, ids=lambda r: os.path.basename(os.path.dirname(r)))
def test_source_tree_has_what_the_pool_needs(root):
    """A vLLM no venv here imports (0.26.0, the GPU kit's), read from its source: every
    required symbol is there and every signature is the one written for that version."""
    version = os.path.basename(os.path.dirname(root)).removeprefix("vllm-")
    missing = [_key_id(k) for k in compat.REQUIRED_SYMBOLS
               if source_signature(root, *k) == MISSING]
    changed = []
    for key in compat.SIGNATURES:
        want = compat.expected_signature(key, version)
        got = source_signature(root, *key)
        if got != want:
            changed.append(f"{_key_id(key)}: {got}, written for {want}")
    assert (missing, changed) == ([], []), f"vLLM {version} source"


def test_the_check_off_the_cpu_platform_imports_no_cpu_worker_module():
    """vLLM's CPU worker modules patch torch.cuda.Event, Stream and the device memory
    reading at import: the worker's check on a GPU must leave them unimported (on the
    H200 importing them broke every compile and vLLM's memory check)."""
    import subprocess
    import sys

    code = ("import sys; from vllm_pool import compat; compat.vllm_problems(on_cpu=False)\n"
            "print(sorted(m for m in sys.modules if compat._cpu_only(m)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == "[]", out


def test_the_pools_gpu_memory_utilization_default_is_vllms():
    """The daemon packs an attach without `--gpu-memory-utilization` at vLLM's default,
    which it keeps as a constant (it does not import vLLM)."""
    assert compat.vllm_gpu_memory_utilization_default() == compat.GPU_MEMORY_UTILIZATION_DEFAULT
