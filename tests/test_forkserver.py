"""The engine fork server (engine/forkserver.py) as its own process, over its real control
socket: it forks hosts, reports their exits, and reaps the orphans they leave (a host's
API server exits before the EngineCore it kills is reaped), so nothing waits on PID 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

from vllm_pool import messages

# A host that forks a grandchild in its own group and exits at once: the grandchild, an
# orphan from then on, writes its ppid to the log and exits a moment later.
SERVER = textwrap.dedent("""
    import os, sys, time
    from vllm_pool.engine import forkserver

    def run_host(cmd):
        order = cmd.readline()
        if os.fork() == 0:
            time.sleep(0.5)
            print("orphan", os.getpid(), os.getppid(), flush=True)
            os._exit(0)
        print("host", os.getpid(), order.decode().strip(), flush=True)

    forkserver.serve(int(sys.argv[1]), run_host)
""")


def _recv(sock: socket.socket, timeout: float = 10.0):
    sock.settimeout(timeout)
    return messages.decode_fork_reply(sock.recv(4096).rstrip(b"\n"))


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return None  # gone: reaped


def test_fork_server_reports_its_hosts_and_reaps_their_orphans(tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(theirs.fileno())],
                              pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        ready = _recv(ours, 60)
        assert isinstance(ready, messages.ServerReady) and ready.pid == server.pid
        log = tmp_path / "host.log"
        cmd_r, cmd_w = os.pipe()
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        socket.send_fds(ours, [messages.encode(messages.Fork(seq=1))], [cmd_r, log_fd])
        os.close(cmd_r)
        os.close(log_fd)
        forked = _recv(ours)
        assert isinstance(forked, messages.Forked) and forked.seq == 1
        os.write(cmd_w, b"go\n")
        exited = _recv(ours)
        assert exited == messages.HostExited(pid=forked.pid, returncode=0)
        os.close(cmd_w)

        deadline = time.monotonic() + 10
        while "orphan" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = dict(ln.split(" ", 1) for ln in log.read_text().splitlines())
        assert lines["host"] == f"{forked.pid} go"
        orphan, ppid = (int(x) for x in lines["orphan"].split())
        assert ppid == server.pid, "the orphan went to another reaper than the fork server"
        while _state(orphan) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _state(orphan) is None, f"orphan {orphan} left as {_state(orphan)}"
        # Only the host it forked is reported, never the orphan.
        ours.settimeout(0.3)
        try:
            extra = ours.recv(4096)
        except TimeoutError:
            extra = b""
        assert extra == b""
    finally:
        ours.close()  # EOF: the server exits
        assert server.wait(30) == 0
