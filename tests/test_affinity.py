"""The inference worker keeps off the cores the engine's threads are pinned to."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tagd.affinity import free_cores


def test_free_cores_leaves_out_what_other_threads_are_pinned_to():
    assert free_cores({0, 1, 2, 3}, [{1}, {2}, {0, 1, 2, 3}]) == {0, 3}


def test_free_cores_ignores_threads_that_may_run_anywhere():
    assert free_cores({0, 1}, [{0, 1}, {0, 1}]) == {0, 1}


def test_free_cores_can_leave_nothing():
    assert free_cores({0, 1}, [{0}, {1}]) == set()


def test_free_cores_ignores_threads_pinned_outside_our_cores():
    # a thread on cores we may not use says nothing about ours
    assert free_cores({0, 1}, [{2}]) == {0, 1}


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and at least two usable cores",
)
def test_a_thread_moves_off_a_pinned_threads_core():
    # In a fresh process, so no engine threads from other tests are about.
    script = textwrap.dedent(
        """
        import os, threading
        from tagd.affinity import keep_off_pinned_cores

        cores = sorted(os.sched_getaffinity(0))
        pinned_core = cores[-1]
        ready, done = threading.Event(), threading.Event()

        def pinned():
            os.sched_setaffinity(0, {pinned_core})
            ready.set()
            done.wait()

        holder = threading.Thread(target=pinned)
        holder.start()
        ready.wait()
        result = {}

        def worker():
            result["returned"] = keep_off_pinned_cores()
            result["affinity"] = os.sched_getaffinity(0)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        done.set()
        holder.join()
        assert result["returned"] == set(cores[:-1]), result
        assert result["affinity"] == set(cores[:-1]), result
        assert pinned_core not in result["affinity"]

        # nothing pinned any more: a new worker stays where it was
        def unpinned():
            result["again"] = keep_off_pinned_cores()
        thread = threading.Thread(target=unpinned)
        thread.start()
        thread.join()
        assert result["again"] is None, result
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
