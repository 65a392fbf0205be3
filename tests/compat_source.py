"""Read `compat.signature_of`'s form of a symbol from a vLLM source tree, without importing.

For a vLLM that no venv here can import: 0.26.0, the GPU kit's build (its source lies
unpacked by scripts/setup-static-env.sh). Top-level functions, classes, globals and
methods written in the named class itself are found, following `from x import name` and
`from x import *` re-exports; a method only inherited reads as "missing", so only methods a
class defines itself are compared this way.
"""

from __future__ import annotations

import ast
import os

MISSING = "missing"  # as compat.vllm_problems reads an absent symbol


def _args(a: ast.arguments) -> str:
    params: list[str] = []
    positional = a.posonlyargs + a.args
    first_default = len(positional) - len(a.defaults)
    for i, arg in enumerate(positional):
        params.append(arg.arg + ("=" if i >= first_default else ""))
    if a.vararg is not None:
        params.append(f"*{a.vararg.arg}")
    elif a.kwonlyargs:
        params.append("*")
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        params.append(arg.arg + ("=" if default is not None else ""))
    if a.kwarg is not None:
        params.append(f"**{a.kwarg.arg}")
    return "(" + ", ".join(params) + ")"


def _function(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    names = {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
    prefix = "static " if "staticmethod" in names else "class " if "classmethod" in names else ""
    return prefix + _args(node.args)


def _fields(node: ast.ClassDef) -> str:
    names = [s.target.id for s in node.body
             if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
             and "ClassVar" not in ast.unparse(s.annotation)]
    return "fields(" + ", ".join(names) + ")"


def _is_dataclass(node: ast.ClassDef) -> bool:
    return any("dataclass" in ast.unparse(d) for d in node.decorator_list)


def module_file(root: str, module: str) -> str | None:
    rel = module.split(".")[1:]  # root is the `vllm` package directory
    for cand in (os.path.join(root, *rel) + ".py", os.path.join(root, *rel, "__init__.py")):
        if os.path.isfile(cand):
            return cand
    return None


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def source_signature(root: str, module: str, path: str, _depth: int = 0) -> str:
    """The symbol's signature as written in the source tree, or MISSING."""
    f = module_file(root, module)
    if f is None or _depth > 5:
        return MISSING
    with open(f) as fh:
        body: list[ast.stmt] = ast.parse(fh.read()).body
    first, *rest = path.split(".")
    node = next((n for n in body if isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == first), None)
    if node is None:
        for n in body:
            targets = n.targets if isinstance(n, ast.Assign) else \
                [n.target] if isinstance(n, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == first for t in targets):
                return "global"
        # Re-exported: `from x import name` first, then every `from x import *`.
        is_pkg = f.endswith("__init__.py")
        imports = [n for n in body if isinstance(n, ast.ImportFrom)]
        for n in imports:
            if any((a.asname or a.name) == first for a in n.names):
                name = next(a.name for a in n.names if (a.asname or a.name) == first)
                return source_signature(root, _absolute(module, n, is_pkg),
                                        ".".join([name, *rest]), _depth + 1)
        for n in imports:
            if any(a.name == "*" for a in n.names):
                got = source_signature(root, _absolute(module, n, is_pkg), path, _depth + 1)
                if got != MISSING:
                    return got
        return MISSING
    for part in rest:
        if not isinstance(node, ast.ClassDef):
            return MISSING
        found = next((n for n in node.body if isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part), None)
        if found is None:
            attr = any(isinstance(n, (ast.Assign, ast.AnnAssign)) and any(
                isinstance(t, ast.Name) and t.id == part
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))
                for n in node.body)
            return "global" if attr else MISSING
        node = found
    if isinstance(node, ast.ClassDef):
        if _is_dataclass(node):
            return _fields(node)
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef)
                     and n.name == "__init__"), None)
        return _function(init) if init is not None else "class"
    return _function(node)
