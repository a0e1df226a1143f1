"""Windows over audio: one definition for the daemon, `tagd tag` and the trainer's evaluation.

A ``Windower`` keeps exactly one window of audio in a fixed ring buffer and emits a copy
of it every ``hop_samples`` once the first ``window_samples`` have arrived. Feeding the
same audio in any chunking yields the same windows at the same stream positions.

``clip_windows`` covers a whole clip with the windows a stream of it would give, and
says how a clip shorter than one window is scored (the rule is stated below, once).

In the daemon the copies come from a ``WindowPool`` and go back to it once the batcher
has copied them into a batch or dropped them: with glibc's mmap threshold fixed (see
``tagd.server.release_freed_memory``) every fresh window would be a new mapping, with
page faults to fill it and an munmap to free it on the engine's cores (docs/design.md
has the measured cost).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    start: int  # index in the stream of the window's first sample
    samples: np.ndarray  # float32 [window_samples]; from a Windower, a copy the caller owns

    @property
    def end(self) -> int:
        return self.start + len(self.samples)


class WindowPool:
    """Window buffers to reuse, shared by every stream's ``Windower``; thread-safe.

    ``take`` returns a free buffer, or a new one when none is free; ``give`` returns a
    buffer nobody reads any more, kept while fewer than ``capacity`` are free. The
    caller of ``give`` vouches that nothing holds the buffer: the next ``take`` writes
    a window over it.
    """

    def __init__(self, window_samples: int, capacity: int):
        if window_samples <= 0 or capacity < 0:
            raise ValueError("window_samples must be positive and capacity not negative")
        self.window_samples = window_samples
        self.capacity = capacity
        self._free: deque[np.ndarray] = deque()  # append and pop are atomic in CPython

    def take(self) -> np.ndarray:
        try:
            return self._free.pop()
        except IndexError:
            return np.empty(self.window_samples, dtype=np.float32)

    def give(self, buffer: np.ndarray) -> None:
        if buffer.shape != (self.window_samples,) or buffer.dtype != np.float32:
            raise ValueError(f"not a window of this pool: {buffer.dtype} {buffer.shape}")
        if len(self._free) < self.capacity:  # racy by a buffer or two; harmless
            self._free.append(buffer)

    @property
    def free(self) -> int:
        return len(self._free)


class Windower:
    def __init__(self, window_samples: int, hop_samples: int, pool: WindowPool | None = None):
        if window_samples <= 0 or hop_samples <= 0:
            raise ValueError("window_samples and hop_samples must be positive")
        if pool is not None and pool.window_samples != window_samples:
            raise ValueError(f"a pool of {pool.window_samples}-sample windows for {window_samples}")
        self.window_samples = window_samples
        self.hop_samples = hop_samples
        self._pool = pool
        self._ring: np.ndarray | None = np.zeros(window_samples, dtype=np.float32)
        self.reset()

    def reset(self) -> None:
        """Forget all audio: the next window starts with the next sample pushed."""
        self._write_at = 0  # ring index of the next sample
        self._filled = 0  # valid samples in the ring
        self.total = 0  # samples pushed since reset (stream time)
        self._next_end = self.window_samples  # stream index where the next window ends

    def restart_at(self, stream_index: int) -> None:
        """Reset and count stream time from ``stream_index`` (after a gap, say)."""
        self.reset()
        self.total = stream_index
        self._next_end = stream_index + self.window_samples

    def release(self) -> None:
        """Forget all audio and free the ring until samples come again (an idle stream)."""
        self.restart_at(self.total)
        self._ring = None

    def delay_next(self, samples: int) -> None:
        """Emit the next window ``samples`` later; the hop grid moves with it.

        The daemon uses this once per live stream to spread window completions of many
        streams over the hop, so that they do not queue behind each other.
        """
        if samples < 0:
            raise ValueError("a window can be delayed, not advanced")
        self._next_end += samples

    @property
    def next_end(self) -> int:
        """Stream index where the next window will end."""
        return self._next_end

    @property
    def buffered(self) -> int:
        return self._filled

    def push(self, samples: np.ndarray) -> list[Window]:
        """Append mono float32 samples; return the windows completed by them."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        windows: list[Window] = []
        pos = 0
        while pos < len(samples):
            take = min(self._next_end - self.total, len(samples) - pos)
            self._write(samples[pos : pos + take])
            pos += take
            self.total += take
            if self.total == self._next_end:
                windows.append(Window(self.total - self.window_samples, self._read()))
                self._next_end += self.hop_samples
        return windows

    def _write(self, chunk: np.ndarray) -> None:
        size = self.window_samples
        if self._ring is None:  # released while idle
            self._ring = np.zeros(size, dtype=np.float32)
        if len(chunk) >= size:
            self._ring[:] = chunk[-size:]
            self._write_at = 0
            self._filled = size
            return
        first = min(len(chunk), size - self._write_at)
        self._ring[self._write_at : self._write_at + first] = chunk[:first]
        self._ring[: len(chunk) - first] = chunk[first:]
        self._write_at = (self._write_at + len(chunk)) % size
        self._filled = min(size, self._filled + len(chunk))

    def _read(self) -> np.ndarray:
        if self._pool is None:
            window = np.empty(self.window_samples, dtype=np.float32)
        else:
            window = self._pool.take()
        assert self._ring is not None  # a window is read only after samples were written
        tail = self.window_samples - self._write_at  # oldest samples first
        window[:tail] = self._ring[self._write_at :]
        window[tail:] = self._ring[: self._write_at]
        return window


# -- whole clips --------------------------------------------------------------------------------
# The one rule for a clip that is on disk, used by `tagd tag`, by evaluation and threshold
# choice in the trainer, and stated in docs/models.md:
#
# - windows start on the hop grid from the clip's first sample, as a stream's windows do,
#   and every window lies inside the clip (the tail past the last one is not scored);
# - a clip shorter than one window but at least MIN_CLIP_FRACTION of one is a single
#   window, zero-padded at its end (as Choi et al. 2016 padded short MTT clips);
# - a shorter clip is an error that names the minimum.
MIN_CLIP_FRACTION = 0.25


class ClipTooShortError(ValueError):
    """A clip holds less audio than the shortest that a model scores."""

    def __init__(self, length: int, minimum: int):
        super().__init__(f"{length} samples is shorter than the minimum of {minimum}")
        self.length = length
        self.minimum = minimum


def min_clip_samples(window_samples: int) -> int:
    """The shortest clip that is scored (zero-padded to one window)."""
    return max(1, math.ceil(window_samples * MIN_CLIP_FRACTION))


def clip_window_starts(length: int, window_samples: int, hop_samples: int) -> range:
    """Where the windows of a ``length``-sample clip start; raises ClipTooShortError."""
    if window_samples <= 0 or hop_samples <= 0:
        raise ValueError("window_samples and hop_samples must be positive")
    if length >= window_samples:
        return range(0, length - window_samples + 1, hop_samples)
    if length >= min_clip_samples(window_samples):
        return range(1)
    raise ClipTooShortError(length, min_clip_samples(window_samples))


def clip_windows(samples: np.ndarray, window_samples: int, hop_samples: int) -> Iterator[Window]:
    """The windows of a whole clip, one at a time (``clip_window_starts`` says where).

    A window is a view into ``samples`` (read it, do not write it), or a padded copy for
    a clip shorter than one window, so a long file costs no more than its samples.
    """
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    for start in clip_window_starts(len(samples), window_samples, hop_samples):
        piece = samples[start : start + window_samples]
        if len(piece) < window_samples:
            piece = np.pad(piece, (0, window_samples - len(piece)))
        yield Window(start, piece)
