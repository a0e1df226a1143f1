"""Phase spreading: live streams' windows spread evenly over the hop.

Live streams complete their windows at arbitrary phases of the hop, and windows that
complete together queue behind each other at the engine. With ``spread_phases`` the hub
places each live stream (audio arriving at about real time) once, in the middle of the
largest gap between the phases of the streams placed before it, by delaying its next
window: the hop grid of that stream moves once by less than a hop, and the engine sees
evenly spaced windows instead of bursts. Streams fed faster than real time (files,
catch-up) are never moved, so their windows stay where an offline run puts them.

A stream's phase is the circular mean of its last ``PHASE_WINDOWS`` completions:
completions wobble by a message and a resampler block (~0.2 s).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

PHASE_WINDOWS = 3  # completions a live stream's phase is taken from


class Placeable(Protocol):
    """What placement reads and writes of a stream (tagd.stream.Stream)."""

    name: str
    live: bool  # audio arrives at about real time
    idle: bool
    window_times: Sequence[float]  # its last completions, monotonic seconds
    placed: bool  # its phase is chosen for this epoch
    phase: float | None  # seconds into the hop where its windows complete

    def delay_next_window(self, samples: int) -> None: ...


def place_live_streams(streams: Iterable[Placeable], hop_s: float, sample_rate: int) -> None:
    """Place every live stream not yet placed, in name order, each in the middle of the
    largest gap left by those placed before it (its own phase if it is the first)."""
    streams = list(streams)
    live = [s for s in streams if s.live and not s.idle and len(s.window_times) >= PHASE_WINDOWS]
    phases = [s.phase for s in streams if s.placed and not s.idle and s.phase is not None]
    for stream in sorted((s for s in live if not s.placed), key=lambda s: s.name):
        own = circular_mean(list(stream.window_times), hop_s)
        target = largest_gap_middle(phases, hop_s) if phases else own
        delay_s = (target - own) % hop_s
        stream.delay_next_window(round(delay_s * sample_rate))
        stream.phase, stream.placed = target, True
        phases.append(target)
        log.debug(
            "stream %s placed at %.3f s of the hop (delayed %.3f s)", stream.name, target, delay_s
        )


def largest_gap_middle(phases: list[float], period: float) -> float:
    """The middle of the largest gap between points on a circle of circumference ``period``."""
    ordered = sorted(p % period for p in phases)
    ends = ordered[1:] + [ordered[0] + period]
    size, begin = max((end - begin, begin) for begin, end in zip(ordered, ends, strict=True))
    return (begin + size / 2) % period


def circular_mean(times: list[float], period: float) -> float:
    """The mean position of ``times`` on a circle of circumference ``period``, in [0, period)."""
    angles = 2 * np.pi * (np.asarray(times) % period) / period
    mean = np.angle(np.mean(np.exp(1j * angles)))
    return float(mean % (2 * np.pi) * period / (2 * np.pi))
