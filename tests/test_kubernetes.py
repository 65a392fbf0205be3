"""deploy/kubernetes: every manifest valid against a pinned Kubernetes version's schemas
(kubernetes-validate, strict: an unknown field is an error), and wired to the code as it is:
the containers' arguments parsed by the CLI's own parser, the keys from the Secret, the
gateway's --pools-dns naming the headless Service, the probes on the served ports, the
models file loaded by the gateway's loader, the pool's readiness command run against a
server that checks the key as the pool does. Unit level: no cluster, no daemon (~1 s)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from vllm_pool import access
from vllm_pool.cli import build_parser
from vllm_pool.daemon.arg_policy import check_args
from vllm_pool.daemon.server import parse_gpus
from vllm_pool.gateway import models_file
from vllm_pool.gateway.discovery import parse_dns

K8S_VERSION = "1.33.0"  # the schemas the manifests are checked against
DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "deploy", "kubernetes")
FILES = sorted(glob.glob(os.path.join(DEPLOY, "*.yaml")))


def _load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


DOCS = [(os.path.basename(f), d) for f in FILES for d in _load(f)]


def _one(kind: str, component: str | None = None) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind and (
        component is None or d["metadata"].get("labels", {}).get(
            "app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"want one {kind} ({component}), found {len(found)}"
    return found[0]


def _container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def _env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def _expand(c: dict, argv: list[str]) -> list[str]:
    """The kubelet's $(VAR) expansion; a reference to no variable of the container stays
    literal there (a misspelt name would become a literal key), so it fails here."""
    env = _env(c)

    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"{m.group(0)} names no env variable of {c['name']}"
        return m.group(0)  # kept as written: the test reads the wiring from the name
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, a) for a in argv]


def _parsed(workload: dict):
    c = _container(workload)
    assert c["command"] == ["vllm-pool"], c["command"]  # the console script of pyproject
    try:
        return build_parser().parse_args(_expand(c, c["args"]))
    except SystemExit as e:  # argparse: unknown flag, bad value, missing required
        pytest.fail(f"{workload['metadata']['name']}: args refused by vllm-pool's parser "
                    f"({e}): {c['args']}")


def _secret_ref(c: dict, var: str) -> tuple[str, str]:
    e = _env(c).get(var)
    assert e is not None, f"{c['name']}: no ${var}"
    ref = e.get("valueFrom", {}).get("secretKeyRef")
    assert ref and not ref.get("optional"), f"{c['name']}: ${var} is not from a Secret"
    secret = _one("Secret")
    assert ref["name"] == secret["metadata"]["name"], ref
    assert ref["key"] in secret["stringData"], f"Secret has no key {ref['key']!r}"
    return ref["name"], ref["key"]


def _port(c: dict, port) -> int:
    """A probe's or Service's port: a number, or the name of a container port."""
    if isinstance(port, int):
        return port
    (n,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return n


def _probe_ports(c: dict) -> dict[str, int]:
    out = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        p = c.get(kind)
        assert p is not None, f"{c['name']}: no {kind}"
        if "exec" in p:
            urls = re.findall(r"http://127\.0\.0\.1:(\d+)/health", " ".join(p["exec"]["command"]))
            assert urls, f"{c['name']} {kind}: the exec probe calls no /health"
            out[kind] = int(urls[0])
        else:
            out[kind] = _port(c, (p.get("httpGet") or p["tcpSocket"])["port"])
    return out


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("doc", DOCS, ids=[f"{f}:{d['kind']}" for f, d in DOCS])
def test_manifest_valid(doc):
    import kubernetes_validate

    _, d = doc
    try:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{d['kind']} {d['metadata']['name']}: {e.message}")
    assert d["metadata"]["namespace" if d["kind"] != "Namespace" else "name"] == "vllm-pool"


def test_every_kind_present():
    kinds = sorted(d["kind"] for _, d in DOCS)
    assert kinds == ["ConfigMap", "DaemonSet", "Deployment", "Namespace", "NetworkPolicy",
                     "Secret", "Service", "Service"], kinds


def test_pool_daemonset_args_and_key():
    ds = _one("DaemonSet")
    c = _container(ds)
    args = _parsed(ds)
    assert args.cmd == "serve" and args.gpus is not None
    # All of the node's GPUs: as many as the device plugin gives the container.
    assert len(parse_gpus(args.gpus)) == int(c["resources"]["limits"]["nvidia.com/gpu"])
    # Off loopback the pool refuses to start without a key: it must come from the Secret,
    # through the variable the code reads.
    assert not access.is_loopback(args.host)
    assert args.api_key is None  # a key on the command line would sit in the pod spec
    _secret_ref(c, access.API_KEY_ENV)
    # The gateway is in another pod: engines must bind an address it can reach.
    assert args.engine_host == "$(POD_IP)"
    assert _env(c)["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_pool_pod_spec():
    spec = _one("DaemonSet")["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert spec.get("hostIPC") or (shm and next(
        v for v in spec["volumes"] if v["name"] == shm[0]["name"]
    )["emptyDir"]["medium"] == "Memory"), "vLLM's shared memory needs more than 64 MiB"
    # Caches on a hostPath, so they outlive the pod.
    env = _env(c)
    host = {m["mountPath"] for m in c["volumeMounts"] for v in spec["volumes"]
            if v["name"] == m["name"] and "hostPath" in v}
    for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "HF_HOME",
                "VLLM_POOL_CACHE"):
        assert any(env[var]["value"].startswith(h + "/") for h in host), var
    # Engine stop (30 s + 10 s kill) then worker stop (20 s), for at least one of each.
    assert spec["terminationGracePeriodSeconds"] >= 60


def test_pool_probes_on_serve_port():
    ds = _one("DaemonSet")
    c, args = _container(ds), _parsed(ds)
    ports = _probe_ports(c)
    assert set(ports.values()) == {args.port}, ports
    # /health under a key needs the bearer header: the readiness probe must send it.
    assert "exec" in c["readinessProbe"] and access.API_KEY_ENV in " ".join(
        c["readinessProbe"]["exec"]["command"])


class _Health(BaseHTTPRequestHandler):
    """/health behind the pool's key rule (access.authorized); `status` when authorized."""
    key = b""
    status = 200

    def do_GET(self):
        ok = access.authorized(self.headers.get("authorization", "").encode(),
                               access.bearer(self.key.decode()))
        code = (self.status if ok else 401) if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("sent,status,passes", [("k1", 200, True), ("wrong", 200, False),
                                                 ("k1", 503, False)])
def test_pool_readiness_command_runs(sent, status, passes):
    """The exec probe's own command, pointed at a local server: it passes only with the
    right key and a 200 (the pool's 503 while starting must read as not ready)."""
    c = _container(_one("DaemonSet"))
    cmd = c["readinessProbe"]["exec"]["command"]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Health,), {
        "key": b"k1", "status": status}))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert cmd[0] == "python3"
        here = [sys.executable] + [a.replace("127.0.0.1:8100", f"127.0.0.1:{srv.server_port}")
                                   for a in cmd[1:]]
        r = subprocess.run(here, env={**os.environ, access.API_KEY_ENV: sent},
                           capture_output=True, timeout=c["readinessProbe"]["timeoutSeconds"])
    finally:
        srv.shutdown()
        srv.server_close()
    assert (r.returncode == 0) == passes, r.stderr.decode()[-500:]


def test_headless_service_lists_every_pool():
    ds, svc = _one("DaemonSet"), _one("Service", "pool")
    c, args = _container(ds), _parsed(ds)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True  # a 503 pool stays in DNS
    assert _selects(svc["spec"]["selector"], ds["spec"]["template"]["metadata"]["labels"])
    assert _selects(ds["spec"]["selector"]["matchLabels"],
                    ds["spec"]["template"]["metadata"]["labels"])
    (p,) = svc["spec"]["ports"]
    assert _port(c, p["targetPort"]) == args.port


def test_gateway_finds_the_pools_with_their_key():
    ds, dep, svc = _one("DaemonSet"), _one("Deployment"), _one("Service", "pool")
    pool_c, gw_c = _container(ds), _container(dep)
    pool_args, gw = _parsed(ds), _parsed(dep)
    assert gw.cmd == "gateway" and not gw.pool and not gw.pools_file
    name, port = parse_dns(gw.pools_dns)
    assert name == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    # Headless: the A records are the pods' own addresses, so the port is the pool's own.
    assert port == pool_args.port
    # The pools' key: the gateway sends $VLLM_POOL_API_KEY, the pools' own Secret key.
    assert _secret_ref(gw_c, access.API_KEY_ENV) == _secret_ref(pool_c, access.API_KEY_ENV)
    # Off loopback the gateway needs its clients' key: its own, from the Secret.
    assert not access.is_loopback(gw.gateway_host)
    m = re.fullmatch(r"\$\((\w+)\)", gw.api_key or "")
    assert m, f"--api-key {gw.api_key!r}: want $(VAR) from a Secret"
    assert _secret_ref(gw_c, m.group(1)) != _secret_ref(gw_c, access.API_KEY_ENV)
    # One gateway per set of pools, also during an update.
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"


def test_gateway_probes_and_service_on_its_port():
    dep, svc = _one("Deployment"), _one("Service", "gateway")
    c, gw = _container(dep), _parsed(dep)
    assert set(_probe_ports(c).values()) == {gw.gateway_port}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"  # keyless on the gateway
    assert _selects(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    assert [_port(c, p["targetPort"]) for p in svc["spec"]["ports"]] == [gw.gateway_port]


def test_models_configmap_loads_and_fits_a_pool(tmp_path):
    dep, cm = _one("Deployment"), _one("ConfigMap")
    c, gw = _container(dep), _parsed(dep)
    spec = dep["spec"]["template"]["spec"]
    # --models is the ConfigMap's file where the volume mounts it.
    (vol,) = [v for v in spec["volumes"] if v.get("configMap", {}).get("name")
              == cm["metadata"]["name"]]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    (item,) = vol["configMap"]["items"]
    assert gw.models == os.path.join(mount["mountPath"], item["path"])
    path = tmp_path / item["path"]
    path.write_text(cm["data"][item["key"]])
    entries = models_file.load(str(path))
    assert entries
    # What the gateway checks at start against one node's pool.
    ds_args = _parsed(_one("DaemonSet"))
    devices = [f"cuda:{i}" for i in range(len(parse_gpus(ds_args.gpus)))]
    models_file.check_against_pool(entries, devices, str(path), check_args)


def test_network_policy_admits_only_the_gateway():
    np_, ds, dep = _one("NetworkPolicy"), _one("DaemonSet"), _one("Deployment")
    assert _selects(np_["spec"]["podSelector"]["matchLabels"],
                    ds["spec"]["template"]["metadata"]["labels"])
    (rule,) = np_["spec"]["ingress"]
    (src,) = rule["from"]
    assert _selects(src["podSelector"]["matchLabels"],
                    dep["spec"]["template"]["metadata"]["labels"])
    assert not _selects(src["podSelector"]["matchLabels"],
                        ds["spec"]["template"]["metadata"]["labels"])


def test_secret_is_a_template():
    for k, v in _one("Secret")["stringData"].items():
        assert v.startswith("REPLACE-ME"), f"{k}: a real key must not be committed"
