"""Lifecycle states of pool workers and attached instances.

Explicit states rather than flags: every transition is a named step, logged and shown by
`ls`, and the allocator only hands out workers that are IDLE.
"""

from __future__ import annotations

import enum


class WorkerState(str, enum.Enum):
    STARTING = "starting"    # process spawned, importing and warming up
    WARMING = "warming"      # up, running the pool's kernel warm-up attach; not free yet
    IDLE = "idle"            # warm, holds no model, free for the allocator
    RESERVED = "reserved"    # leased to an instance whose engine is starting
    ATTACHING = "attaching"  # building vLLM's worker and model runner
    SERVING = "serving"      # running vLLM's busy loop for an engine
    DETACHING = "detaching"  # tearing the model down, checking it is clean
    PARKED = "parked"        # holds a parked (sleeping) model; its device is free for others
    FAILED = "failed"        # dead or unclean: being killed and respawned
    STOPPED = "stopped"      # pool shutting down


class InstanceState(str, enum.Enum):
    ATTACHING = "attaching"
    SERVING = "serving"
    PARKING = "parking"      # being put to sleep (GPU: vLLM sleep level 1)
    PARKED = "parked"        # asleep: processes kept, weights in host memory, no KV cache
    WAKING = "waking"        # being woken for a re-attach
    DETACHING = "detaching"
    FAILED = "failed"
    DETACHED = "detached"


# Phase names of an attach, in order. Worker-side phases are measured inside the pool
# worker (rank 0's figures are reported); the others by the daemon.
ATTACH_PHASES = (
    "reserve",              # allocator picks and leases the workers
    "engine_start",         # engine process launched until its executor reaches the workers
    "worker_init",          # vLLM Worker built, distributed init among the peers
    "weight_load",          # load_model
    "memory_profiling",     # determine_available_memory (includes the first compile on GPU)
    "kv_cache",             # KV cache allocation
    "compile",              # torch.compile time as vLLM records it (part of the above)
    "graph_capture",        # CUDA graph capture (0 when eager)
    "warmup",               # compile_or_warm_up_model minus the capture
    "ready",                # last worker step until the API server answers /health
)


# Instance states whose processes are alive and leased (a crash of one fails the instance).
LIVE_INSTANCE_STATES = (InstanceState.ATTACHING, InstanceState.SERVING, InstanceState.PARKING,
                        InstanceState.PARKED, InstanceState.WAKING)
