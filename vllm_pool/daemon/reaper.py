"""The daemon's reaper: a small process that outlives its daemon and, if the daemon dies
before it has stopped everything (kill -9, the OOM killer, at any point of its shutdown
included), removes what the daemon would have: it stops the recorded processes that do not
end themselves, unlinks the instances' shared memory and removes the run directory.

Why a process of its own: the segments outlive the processes that made them. vLLM's
EngineCore creates the broadcast ring (`psm_*`, 160 MiB on 0.32 with its tensor arena),
but vLLM's API server force-kills EngineCore and its multiprocessing resource tracker when
it stops (`mode=abort timeout=0s`), so the ring is never unlinked by its creator. The
daemon removes it after each detach, from the names the workers report; a dead daemon
cannot, and every process that could has exited too. The next daemon's start reclaims from
the state file, but only if one is started, with the same file.

The daemon feeds the reaper its state snapshot (state_file.snapshot, one JSON line per
change) on a pipe and says `done` after its own clean stop; EOF before `done` means the
daemon died. The reaper then gives the recorded processes a few seconds to end themselves
(they do, on EOF of their own pipes), kills those that do not, and removes the rest with
the state file's own reclaim (state_file.reclaim_record). It lives in a session of its
own, so a signal to the daemon's process group does not reach it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

# Long enough for a worker's "daemon gone" exit (5 s: worker/main.py) and an engine
# group's SIGTERM stop; a process still there after it is hung or stopped.
GRACE_S = 10.0


class Reaper:
    """The daemon's end of its reaper."""

    def __init__(self, log_path: str, state_path: str | None = None, grace: float = GRACE_S):
        r, self._w = os.pipe()
        argv = [sys.executable, "-m", "vllm_pool.daemon.reaper", "--fd", str(r),
                "--grace", str(grace)]
        if state_path:
            argv += ["--state-file", state_path]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, pass_fds=(r,), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        os.close(r)
        self.pid = self.proc.pid

    def record(self, snapshot_json: bytes) -> None:
        """The daemon's latest snapshot: what is left if it dies now."""
        if self._w is None:
            return
        try:
            os.write(self._w, snapshot_json + b"\n")
        except OSError:  # the reaper died: the state file is then the only record
            self._close()

    def done(self, timeout: float = 5.0) -> None:
        """The daemon stopped everything itself: the reaper exits without acting."""
        if self._w is not None:
            try:
                os.write(self._w, b"done\n")
            except OSError:
                pass
            self._close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _close(self) -> None:
        try:
            os.close(self._w)
        except OSError:
            pass
        self._w = None


def _log(msg: str) -> None:
    print(f"(PoolReaper pid={os.getpid()}) {time.strftime('%m-%d %H:%M:%S')} {msg}",
          flush=True)


def run(fd: int, state_path: str | None, grace: float = GRACE_S) -> int:
    import msgspec

    from vllm_pool.daemon import state_file

    last = None
    with os.fdopen(fd, "rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if line == b"done":
                return 0
            if line:
                last = line
    if last is None:
        return 0
    rec = msgspec.json.decode(last, type=state_file.StateRecord)
    _log(f"daemon {rec.daemon_pid} died before its clean stop; reclaiming what it left")
    for line in state_file.reclaim_record(rec, grace=grace):
        _log(line)
    if state_path:
        on_disk = state_file.load(state_path)
        if on_disk is not None and on_disk.daemon_pid == rec.daemon_pid:
            try:  # reclaimed: nothing left for a next daemon's start
                os.unlink(state_path)
            except FileNotFoundError:
                pass
    _log("done")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(prog="vllm-pool-reaper")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--state-file", default=None)
    p.add_argument("--grace", type=float, default=GRACE_S)
    a = p.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the daemon
    try:
        import setproctitle

        setproctitle.setproctitle("vllm-pool-reaper")
    except ImportError:
        pass
    sys.exit(run(a.fd, a.state_file, a.grace))


if __name__ == "__main__":
    main()
