"""What an instance leaves outside its processes, and its removal: the one clean-up of
shared memory and run directories, for a detach, a failed attach, the daemon's shutdown,
and (from the state file) the next daemon after a crash.

The names come from two places: segments the workers reported (vLLM's broadcast queues),
and patterns of segments named after the instance (vLLM's CPU TP communicator names its
segments `<VLLM_DIST_IDENT>-...`: the rendezvous file's name on 0.32, known here; the tcp
port before, reported by the workers once initialised).
"""

from __future__ import annotations

import glob
import os
import shutil

from vllm_pool import compat


def shm_globs(instance_id: str, dist_idents: set[str] | list[str]) -> list[str]:
    """Patterns (in /dev/shm) of the segments named after an instance."""
    return [f"*{compat.dist_ident(instance_id)}*"] + \
        [compat.cpu_tp_shm_glob(ident) for ident in sorted(dist_idents)]


def remove(shm_names: set[str] | list[str], globs: list[str], run_dir: str = "") -> int:
    """Remove the segments (named, and matching `globs`) and the run directory; the
    number of segments removed."""
    names = {n.lstrip("/") for n in shm_names}
    for pattern in globs:
        names.update(os.path.basename(p) for p in glob.glob(os.path.join("/dev/shm", pattern)))
    removed = 0
    for name in names:
        try:
            os.unlink(os.path.join("/dev/shm", name))
            removed += 1
        except OSError:
            pass
    if run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return removed
