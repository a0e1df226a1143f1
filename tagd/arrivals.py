"""When audio arrived, and which arrival a window's capture time comes from.

A window is captured when the message carrying its last sample arrived. The resampler
holds audio back (soxr releases its output in blocks; docs/design.md says how long), so
that is earlier than the message that completed the window. ``CaptureTimes`` keeps the
arrivals of the few messages that can still hold the next window's last sample, and
says which one that is: bounded state, fed by one stream's ingest thread.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Arrival:
    """When a message arrived: unix time for messages, a monotonic clock for durations."""

    unix: float
    mono: float

    @classmethod
    def now(cls) -> Arrival:
        return cls(time.time(), time.perf_counter())


class CaptureTimes:
    """Arrivals of one stream's input, to time the windows cut from its resampled output.

    An epoch starts at stream index ``start`` (at the model's rate), where the resampler
    starts afresh; from there the input frames of the epoch and the output samples line
    up in time (soxr's output sample k is input time k / model rate).
    """

    def __init__(self, model_rate: int) -> None:
        self.model_rate = model_rate
        # (input frames of this epoch up to and including a message, its arrival)
        self._arrivals: deque[tuple[int, Arrival]] = deque()
        self._frames = 0
        self._start = 0

    def restart(self, start: int) -> None:
        """A new epoch from stream index ``start``: earlier arrivals no longer count."""
        self._arrivals.clear()
        self._frames, self._start = 0, start

    def note(self, frames: int, arrival: Arrival) -> None:
        """A message of ``frames`` input frames arrived."""
        self._frames += frames
        self._arrivals.append((self._frames, arrival))

    def captured(self, end: int, rate: int, completed: Arrival) -> Arrival:
        """Arrival of the message that carried the sample before stream index ``end``;
        ``completed`` (the message that completed the window) when none is known."""
        self.forget_before(end, rate)
        return self._arrivals[0][1] if self._arrivals else completed

    def forget_before(self, end: int, rate: int) -> None:
        """Drop the arrivals of messages that all lie before the window ending at ``end``."""
        needed = self._frames_needed(end, rate)
        while self._arrivals and self._arrivals[0][0] < needed:
            self._arrivals.popleft()

    def __len__(self) -> int:
        return len(self._arrivals)

    def _frames_needed(self, end: int, rate: int) -> int:
        """Input frames of this epoch (at ``rate``) that hold the sample before ``end``."""
        return (end - 1 - self._start) * rate // self.model_rate + 1
