"""The engine fork server: one warm process (vLLM imported, no CUDA context) that forks an
engine host per attach in milliseconds, so no attach waits for an interpreter to import vLLM.

Why a fork server rather than spares started after each attach: a spare takes as long to
warm as a cold start (17 s on the H200), so back-to-back attaches found it still importing.
A fork is ready at once, however many attaches come in a row.

The daemon holds the other end of the control socket. Each `Fork` datagram carries two
descriptors, the host's order pipe and its log file; the child starts a session of its own
(the engine's process group is then the child's pid, as for a spawned host), points its
output at the log and waits for its order (entry.run_host). The server is the hosts' parent:
it reaps them and reports each exit code. EOF on the control socket means the daemon is
gone: the server exits; its hosts end on EOF of their own order pipes.

The server forks from its one thread: nothing else runs here, so a child inherits no lock
held by another thread.

It is also the hosts' child subreaper. A host's API server exits before the EngineCore it
SIGKILLs is reaped, so EngineCore (and its helper) became zombies of PID 1, and the
daemon's detach waited for the engine's process group to be gone until PID 1 got round to
reaping them: 1.1-1.6 s of a 1.5 s CPU detach. Orphans now come here and are reaped at
once (SIGCHLD wakes the loop); only the hosts it forked are reported.
"""

from __future__ import annotations

import os
import select
import signal
import socket
from collections.abc import Callable

from vllm_pool import messages


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _become_subreaper() -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False  # orphans go to PID 1, as before: slower detaches, nothing wrong


def _reap(sock: socket.socket, hosts: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in hosts:  # not an orphan of one of them
            hosts.discard(pid)
            _send(sock, messages.HostExited(pid=pid,
                                            returncode=os.waitstatus_to_exitcode(status)))


def _send(sock: socket.socket, msg) -> None:
    try:
        sock.send(messages.encode(msg))
    except OSError:
        pass  # the daemon is gone; EOF ends the loop


def _child(sock: socket.socket, wake: tuple[int, int], cmd_fd: int, log_fd: int,
           run_host: Callable) -> None:
    code = 1
    try:
        sock.close()
        signal.set_wakeup_fd(-1)
        for fd in wake:
            os.close(fd)
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        run_host(os.fdopen(cmd_fd, "rb"))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report it in the host's log, then exit
        import traceback

        traceback.print_exc()
    finally:
        try:
            import sys

            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(ctl_fd: int, run_host: Callable) -> None:
    sock = socket.socket(fileno=ctl_fd)
    _become_subreaper()
    wake = os.pipe()
    for fd in wake:
        os.set_blocking(fd, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that it wakes the loop
    signal.set_wakeup_fd(wake[1])
    hosts: set[int] = set()
    _send(sock, messages.ServerReady(pid=os.getpid()))
    while True:
        r, _, _ = select.select([sock, wake[0]], [], [], 1.0)
        if wake[0] in r:
            try:
                os.read(wake[0], 512)
            except BlockingIOError:
                pass
        _reap(sock, hosts)
        if sock not in r:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, 4096, 2)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            return  # the daemon went away
        req = messages.decode_fork(data.rstrip(b"\n"))
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            _child(sock, wake, fds[0], fds[1], run_host)
        hosts.add(pid)
        for fd in fds:
            os.close(fd)
        _send(sock, messages.Forked(seq=req.seq, pid=pid))
