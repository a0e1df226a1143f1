"""Keep the inference worker off the cores the engine's own threads are pinned to.

ONNX Runtime, left to choose its intra-op thread count, pins its pool threads one to a
core and leaves a core for the thread that calls ``run``, which it does not pin. A
tagd worker sleeps between windows and is woken by an input thread; the scheduler may
wake it on a pool thread's core, and then the two share that core while the free one
idles until the kernel balances them, several milliseconds later (docs/design.md has
what that cost). Pinning the worker to the cores no other thread of the process is
pinned to is the layout ONNX Runtime intends.

Nothing changes where no thread is pinned (TensorRT, torch, ONNX Runtime with
``[onnxruntime] threads`` set or several instances) or where no core would be left.
Linux only: elsewhere the calls are missing and this does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

log = logging.getLogger(__name__)


def free_cores(own: set[int], others: Iterable[set[int]]) -> set[int]:
    """The cores of ``own`` that no thread pinned to fewer cores than ``own`` holds."""
    pinned: set[int] = set()
    for cores in others:
        if cores and cores < own:
            pinned |= cores
    return own - pinned


def keep_off_pinned_cores() -> set[int] | None:
    """Pin the calling thread to the cores no other thread of this process is pinned to.

    Returns the cores it now runs on, or None when it left the thread as it was.
    """
    if not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"):
        return None
    me = threading.get_native_id()
    try:
        own = os.sched_getaffinity(0)
        others = []
        for entry in os.listdir("/proc/self/task"):
            tid = int(entry)
            if tid == me:
                continue
            try:
                others.append(os.sched_getaffinity(tid))
            except OSError:  # the thread ended meanwhile
                continue
        free = free_cores(own, others)
        if not free or free == own:
            return None
        os.sched_setaffinity(0, free)
    except OSError as exc:
        log.debug("could not set the inference worker's CPU affinity: %s", exc)
        return None
    log.info(
        "inference worker on cores %s, off the %s the engine's threads are pinned to",
        sorted(free),
        sorted(own - free),
    )
    return free
