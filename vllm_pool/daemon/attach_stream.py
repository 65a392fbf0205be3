"""A streamed attach (`POST /instances?stream=true`): the attach runs in a thread of its own
and its phases go out as JSON lines as they finish (api_models: StartedEvent, PhaseEvent,
then DoneEvent or ErrorEvent).

A request the pool refuses before anything starts (bad arguments, no room, a name or
port taken) is answered as a plain HTTP error, as the plain POST answers it: `started`
says which case it is. A client that goes away does not stop the attach, as with the
plain POST.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from vllm_pool.api_models import (AttachBody, DoneEvent, ErrorEvent, InstanceInfo, PhaseEvent,
                                  StartedEvent)
from vllm_pool.daemon.background import start_thread
from vllm_pool.daemon.errors import AttachError
from vllm_pool.daemon.instance import Instance
from vllm_pool.states import InstanceState


class StreamedAttach:
    def __init__(self, pool, body: AttachBody, info: Callable[[Instance], InstanceInfo]):
        self.pool = pool
        self.body = body
        self.info = info
        self.inst: Instance | None = None
        self.accepted: InstanceInfo | None = None  # the instance as it was when accepted
        self.first = 0               # progress entries of an earlier attach (a wake's)
        self.waking = False
        self.result: Instance | None = None
        self.error: tuple[int, str] | None = None
        self.over = False
        self.started = threading.Event()   # accepted (inst set), or over

    def start(self) -> None:
        start_thread(f"PoolAttachStream-{self.body.name or self.body.model[-24:]}", self._run)

    def _on_start(self, inst: Instance) -> None:
        with inst.changed:
            self.first = len(inst.progress)
        self.waking = inst.state != InstanceState.ATTACHING
        # Taken now: a wake on CPU ends in milliseconds, before `lines` first runs.
        self.accepted = self.info(inst)
        self.inst = inst
        self.started.set()

    def _run(self) -> None:
        b = self.body
        try:
            self.result = self.pool.attach(
                b.model, tp=b.tp, pp=b.pp, name=b.name, port=b.port, devices=b.devices,
                args=b.args, env=b.env, timeout=b.timeout_s, on_start=self._on_start)
        except AttachError as e:
            self.error = (e.status, str(e))
        except Exception as e:  # noqa: BLE001 - the plain POST would answer 500
            self.error = (500, f"{type(e).__name__}: {e}")
        finally:
            inst = self.inst
            if inst is None:
                self.over = True
            else:
                with inst.changed:
                    self.over = True
                    inst.changed.notify_all()
            self.started.set()

    def lines(self) -> Iterator[bytes]:
        """The JSON lines (call once `started` is set and `inst` is not None)."""
        inst = self.inst
        yield _line(StartedEvent(instance=self.accepted or self.info(inst)))
        seen = self.first
        while True:
            with inst.changed:
                inst.changed.wait_for(lambda: len(inst.progress) > seen or self.over)
                new, over = inst.progress[seen:], self.over
                seen += len(new)
            for name, secs, nxt in new:
                yield _line(PhaseEvent(phase=name, seconds=secs, next=nxt))
            if over:
                break
        if self.result is not None:
            if self.waking:  # a wake's two steps, timed by park_wake as they end together
                ph = self.result.phases
                if "evict" in ph and "wake" in ph:
                    yield _line(PhaseEvent(phase="evict", seconds=round(ph["evict"], 4),
                                           next="wake"))
                    yield _line(PhaseEvent(phase="wake", seconds=round(ph["wake"], 4),
                                           next=None))
            yield _line(DoneEvent(instance=self.info(self.result)))
        else:
            status, detail = self.error or (500, "the attach ended without a result")
            yield _line(ErrorEvent(status=status, detail=detail))


def _line(ev) -> bytes:
    return ev.model_dump_json().encode() + b"\n"
