"""The package's layers, read from its imports (module level and inside functions alike):
no import circle, and no import upward. From the top: the CLI and its routes; the gateway;
the daemon; the worker, engine and executor (the processes it starts); at the bottom compat,
messages, states, the control API's models and client, and the trust rules."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vllm_pool")

LAYERS = [  # (layer, module prefixes), bottom first
    (0, ("states", "messages", "compat", "api_models", "access", "client", "logs", "testing",
         "device_memory")),
    (1, ("worker", "engine", "executor")),
    (2, ("daemon",)),
    (3, ("gateway",)),
    (4, ("cli", "plugin", "__main__", "route", "vllm_main")),
]


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__") if rel != "__init__" else ""] = \
                    os.path.join(d, f)
    return out


def _layer(mod: str) -> int:
    for layer, prefixes in LAYERS:
        if mod.split(".")[0] in prefixes:
            return layer
    raise AssertionError(f"module vllm_pool.{mod} is in no layer: add it to LAYERS")


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (annotations only, never run)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            out.update(id(n) for b in node.body for n in ast.walk(b))
    return out


def _imports(path: str, mods: set[str]) -> set[str]:
    """vllm_pool modules imported by the file at run time (a package import counts as its
    module)."""
    found = set()
    tree = ast.parse(open(path).read())
    skip = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.startswith("vllm_pool."):
                m = n[len("vllm_pool."):]
                if m in mods:
                    found.add(m)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    names = set(mods) - {""}
    return {m: _imports(p, names) - {m} for m, p in mods.items() if m}


def test_no_import_goes_upward():
    bad = [f"vllm_pool.{m} (layer {_layer(m)}) imports vllm_pool.{d} (layer {_layer(d)})"
           for m, deps in sorted(_graph().items()) for d in sorted(deps)
           if _layer(d) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


# The modules that subclass vLLM's classes, and so import vLLM themselves (compat.py says
# why); every other module reaches vLLM through compat.
VLLM_IMPORTERS = {"compat", "executor", "worker.proc", "worker.sleep_backend"}


def test_only_compat_and_the_subclass_modules_import_vllm():
    bad = []
    for mod, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(n == "vllm" or n.startswith("vllm.") for n in names) \
                    and mod not in VLLM_IMPORTERS:
                bad.append(f"vllm_pool.{mod} imports {names[0]} (line {node.lineno})")
    assert not bad, "\n".join(bad)
