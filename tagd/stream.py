"""Per-stream pipelines: PCM in, windows at the model's rate out, never waiting.

A ``Stream`` is one named audio stream: PCM bytes (or float frames) → ``PcmDecoder``
(partial frames carried) → ``downmix`` → ``StreamResampler`` (streaming soxr, to the
card's rate) → ``Windower`` (one window in a ring) → a ``ReadyWindow`` every hop, handed
to a sink (the batcher) that must not block. Each stream is fed by one source thread.

A ``StreamHub`` holds the streams by name: sources open them, it enforces the stream
limit and ownership (one input per name), and ``sweep()`` (called every fraction of a
second) marks silent streams idle and evicts long-idle dynamic ones. When the limit is
reached, a new stream takes the place of the longest-idle dynamic stream, if any is
idle: a flood of stream ids is refused while the streams it displaced are live, and
cannot hold slots for ever.

A window's capture time (``ReadyWindow.captured``) is the arrival of the message that
carried its last sample: tagd/arrivals.py.

Stream time counts the audio received: a stream that falls silent is not fed zeros;
when data resumes its pipeline restarts (a new ``epoch``: a fresh window must fill
before the next prediction) and the gap is counted.

Messages of the multi-stream protocol carry a ``seq``. A message whose seq is not after
the last one (a repeat, or one overtaken by later ones) is refused, so audio is never
played back out of order; seq 0 is never refused: it means the producer started
counting again (a restart is a gap, spliced like a short silence). A jump forward is a gap: counted, and spliced over when the audio it lost
(estimated from the message's own duration) is under ``max_spliced_gap_s``, else the
window restarts rather than join unrelated audio. Float samples are cleaned (NaN, Inf,
beyond ±1) and counted before anything else sees them.

Live streams' hop grids are moved once, to spread their windows over the hop, by the
hub's sweep: tagd/phases.py.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tagd.arrivals import Arrival, CaptureTimes
from tagd.audio import (
    PCM_FORMATS,
    PcmDecoder,
    StreamResampler,
    clean_samples,
    downmix,
    frame_bytes,
)
from tagd.metrics import (
    CLEANED_NONFINITE,
    CLEANED_OUT_OF_RANGE,
    MALFORMED_OUT_OF_ORDER,
    MALFORMED_STREAM_TAKEN,
    MALFORMED_TOO_MANY_STREAMS,
    Metrics,
    Series,
)
from tagd.phases import PHASE_WINDOWS, place_live_streams
from tagd.windowing import Windower, WindowPool

log = logging.getLogger(__name__)

LIVE_CHECK_S = 2.0  # wall time over which a stream's audio rate is measured
LIVE_RATE = (0.8, 1.25)  # audio seconds per wall second of a live stream
# A seq this far or further behind the last is a producer that started counting again
# (from a number other than 0), not a late message: accepted, counted as a gap.
REORDER_WINDOW = 64
FLOAT_FORMATS = (None, "f32le")  # decoded shapes whose samples may be NaN or beyond ±1
# A mis-declared PCM input (ffmpeg told f32le, tagd told s16le) arrives at a whole-number
# multiple of real time, or as floats that are mostly garbage. Sustained this long, it is
# reported; a catch-up burst after network trouble is shorter and rarely at exactly 2x.
MISDECLARED_AFTER_S = 6.0
SUSPECT_RATES = (2.0, 0.5)  # audio seconds per wall second that a wrong declaration gives
SUSPECT_RATE_TOLERANCE = 0.1  # relative
MASS_CLEANING_SHARE = 0.01  # of float samples cleaned over a measurement
# Input is held back from the resampler while the next window is far from complete and
# resampled in one call: soxr's cost per call, and fetching its state (one per stream)
# back into the cache, fall with the size of the block (a 26 ms message at a time cost
# 1.7 x what 8 at once did, 100 streams). Its output does not depend on how the input is
# cut, so the windows are the same samples, completed by the same message.
RESAMPLE_BLOCK_S = 0.5  # the most input held, in seconds
RESAMPLE_MARGIN_S = 0.25  # nothing held once the input could end the next window this soon

# Epochs are unique across streams and their lifetimes, so that a stream evicted and
# opened again under the same name never continues an old average.
_epochs = itertools.count(1)


@dataclass(frozen=True)
class ReadyWindow:
    stream: str
    seq: int  # windows this stream has emitted before this one (gaps in seq = drops)
    epoch: int  # bumped when the stream restarts; averaging never spans epochs
    start: int  # stream position of the first sample, at the model's rate
    samples: np.ndarray  # float32 [window_samples]; the batcher recycles it once batched
    captured: Arrival  # when the message carrying the window's last sample arrived

    @property
    def end(self) -> int:
        return self.start + len(self.samples)


@dataclass(frozen=True)
class StreamGeometry:
    """What every stream needs from the model card (and --hop)."""

    sample_rate: int
    window_samples: int
    hop_samples: int


WindowSink = Callable[[ReadyWindow], None]


class StreamRefused(Exception):
    """A stream could not be opened, or refused a message; ``reason`` is a
    tagd_malformed_messages_total reason."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class Stream:
    def __init__(
        self,
        name: str,
        geometry: StreamGeometry,
        sink: WindowSink,
        metrics: Metrics,
        idle_after_s: float = float("inf"),
        max_spliced_gap_s: float = float("inf"),
        pool: WindowPool | None = None,
    ) -> None:
        self.name = name
        self.idle_after_s = idle_after_s
        self.max_spliced_gap_s = max_spliced_gap_s
        self.geometry = geometry
        self._sink = sink
        self._metrics = metrics
        # This stream's series, looked up once (the hub forgets them when it evicts it).
        self._audio_received = Series(metrics.audio_received, name)
        self._gaps = Series(metrics.gaps, name)
        self._idle_episodes = Series(metrics.idle_episodes, name)
        self.idle_gauge = Series(metrics.stream_idle, name)  # set by the hub's sweep
        self.last_audio_gauge = Series(metrics.stream_last_audio, name)
        self._windower = Windower(geometry.window_samples, geometry.hop_samples, pool)
        self._decoder: PcmDecoder | None = None
        self._resampler: StreamResampler | None = None
        self._shape: tuple[str | None, int, int] | None = None  # (format, rate, channels)
        self._last_seq: int | None = None
        self.epoch = 0
        self.windows_emitted = 0
        self.last_arrival: float | None = None  # monotonic; None until the first data
        self.last_unix: float | None = None  # the same moment in unix time, for metrics
        self.idle = True  # for reporting: StreamHub.sweep sets it, data clears it
        # Phase spreading: written by this stream's ingest thread, read by the sweeper,
        # except the delay, which the sweeper asks for and the ingest thread applies.
        self.live = False  # audio arrives at about real time
        self.window_times: deque[float] = deque(maxlen=PHASE_WINDOWS)  # completions, mono
        self.placed = False  # the hub has chosen this epoch's phase
        self.phase: float | None = None  # seconds into the hop where its windows complete
        self._audio_s = 0.0  # audio received this epoch, seconds
        self._rate_mark: tuple[float, float] | None = None  # (mono, audio seconds)
        self._declaration = DeclarationCheck(name, metrics)
        self._episode_lock = threading.Lock()  # the sweeper and the ingest thread count
        self._episode_counted: float | None = None  # last_arrival before that silence
        self._delay_lock = threading.Lock()
        self._pending_delay = 0  # samples to delay the next window by
        self._capture = CaptureTimes(geometry.sample_rate)  # the windows' capture times
        self._held: list[np.ndarray] = []  # mono input not resampled yet (RESAMPLE_BLOCK_S)
        self._held_frames = 0
        self._resampled_frames = 0  # input frames the resampler took since it started
        self._resampled_from = 0  # stream index where its output started
        # Held while feeding; the sweeper takes it to free an idle stream's ring.
        self._ingest_lock = threading.Lock()

    # -- feeding -------------------------------------------------------------------
    def push_pcm(
        self,
        payload: bytes,
        pcm_format: str,
        rate: int,
        channels: int,
        arrival: Arrival,
        seq: int | None = None,
    ) -> int:
        """Feed interleaved PCM bytes; returns how many windows it completed.

        Raises ``StreamRefused`` (out_of_order) for a message whose ``seq`` is not after
        the last one, and ``tagd.audio.AudioError`` for a format PcmDecoder does not know.
        """
        message_s = len(payload) / (frame_bytes(pcm_format, channels) * rate)
        with self._ingest_lock:
            self._prepare((pcm_format, rate, channels), arrival, seq, message_s)
            assert self._decoder is not None
            if pcm_format in FLOAT_FORMATS:  # cleaned per channel before the downmix
                return self._feed(self._decoder.decode(payload), rate, arrival)
            return self._feed(self._decoder.decode_mono(payload), rate, arrival)

    def push_frames(self, frames: np.ndarray, rate: int, arrival: Arrival) -> int:
        """Feed float frames [n, channels] or mono [n] (soundcards, files)."""
        channels = 1 if frames.ndim == 1 else frames.shape[1]
        with self._ingest_lock:
            self._prepare((None, rate, channels), arrival, None, len(frames) / rate)
            return self._feed(frames, rate, arrival)

    def release_idle_buffers(self, now_mono: float) -> bool:
        """Free the window ring of a stream silent for ``idle_after_s`` (any thread).

        Its next data restarts the window anyway (``_prepare``), so an idle stream needs
        no audio: 1.4 MB for FCN-4. True when it was released.
        """
        with self._ingest_lock:  # not while the ingest thread is feeding it
            if self.silent_for(now_mono) < self.idle_after_s:
                return False
            self._resample_held()  # where the stream's time stands when data comes again
            self._windower.release()
            return True

    def _prepare(
        self,
        shape: tuple[str | None, int, int],
        arrival: Arrival,
        seq: int | None,
        message_s: float,
    ) -> None:
        resumed = (
            self.silent_for(arrival.mono) >= self.idle_after_s and self.last_arrival is not None
        )
        gap_too_long = False
        if seq is not None and self._last_seq is not None and not resumed and shape == self._shape:
            gap_too_long = self._follow_seq(seq, message_s)  # raises for a repeat or a late one
        if shape != self._shape or resumed or gap_too_long:
            self._resample_held()  # the old epoch's input, through its own resampler
        if shape != self._shape:
            if self._shape is not None:
                log.info(
                    "stream %s: input changed from %s to %s; restarting",
                    self.name,
                    self._shape,
                    shape,
                )
            self._shape = shape
            pcm_format, rate, channels = shape
            self._declaration.declared(shape)
            self._decoder = PcmDecoder(pcm_format, channels) if pcm_format else None
            self._resampler = StreamResampler(rate, self.geometry.sample_rate)
            self._restart()
        elif resumed:
            # Counted here too: the sweeper, a fraction of a second behind, may not have
            # seen a silence just over idle_after_s. Either way it is the same episode.
            self.count_idle_episode()
            log.info("stream %s: data again after being idle; restarting its window", self.name)
            self._gaps.inc()
            self._restart()
        elif gap_too_long:
            self._restart()
        if seq is not None:
            self._last_seq = seq
        self.last_arrival = arrival.mono
        self.last_unix = arrival.unix
        self.idle = False

    def _follow_seq(self, seq: int, message_s: float) -> bool:
        """Check ``seq`` against the last one; True when the gap is too long to splice."""
        last = self._last_seq
        assert last is not None
        if seq == last + 1:
            return False
        if seq > last:
            self._gaps.inc()
            lost_s = (seq - last - 1) * message_s
            if lost_s > self.max_spliced_gap_s:
                log.info(
                    "stream %s: seq %d after %d lost about %.1f s; restarting its window",
                    self.name,
                    seq,
                    last,
                    lost_s,
                )
                return True
            return False
        if seq == 0 or last - seq >= REORDER_WINDOW:
            log.info("stream %s: seq %d after %d: the producer started again", self.name, seq, last)
            self._gaps.inc()
            return False
        raise StreamRefused(
            MALFORMED_OUT_OF_ORDER, f"stream {self.name!r}: seq {seq} is not after {last}"
        )

    def _restart(self) -> None:
        if self._decoder is not None:
            self._decoder.reset()
        if self._resampler is not None:
            self._resampler.reset()
        self._windower.restart_at(self._windower.total)
        self._capture.restart(self._windower.total)
        self._held.clear()
        self._held_frames = self._resampled_frames = 0
        self._resampled_from = self._windower.total
        self.epoch = next(_epochs)
        self.live, self.placed, self.phase = False, False, None
        self.window_times.clear()
        self._audio_s, self._rate_mark = 0.0, None
        with self._delay_lock:
            self._pending_delay = 0

    def _feed(self, frames: np.ndarray, rate: int, arrival: Arrival) -> int:
        if len(frames) == 0:
            return 0
        if self._shape is not None and self._shape[0] in FLOAT_FORMATS:
            frames = self._clean(frames)
        self._audio_received.inc(len(frames) / rate)
        self._track_rate(len(frames) / rate, arrival.mono)
        self._capture.note(len(frames), arrival)
        mono = downmix(frames)
        if self._hold(mono):
            return 0
        if self._held:
            mono = np.concatenate([*self._held, mono])
            self._held.clear()
            self._held_frames = 0
        return self._window(mono, rate, arrival)

    def _hold(self, mono: np.ndarray) -> bool:
        """Keep ``mono`` for the resampler's next call when no window can end before it."""
        resampler = self._resampler
        assert resampler is not None
        if resampler.passthrough:
            return False
        held = self._held_frames + len(mono)
        if held > RESAMPLE_BLOCK_S * resampler.from_rate:
            return False
        # what the resampler would have put out by now at most (it holds some back)
        reach = self._resampled_from + (self._resampled_frames + held) * (
            resampler.to_rate / resampler.from_rate
        )
        if reach >= self._windower.next_end - RESAMPLE_MARGIN_S * resampler.to_rate:
            return False
        self._held.append(mono.copy())  # a caller's frames may be its own buffer
        self._held_frames = held
        return True

    def _resample_held(self) -> None:
        """Put the held input through the resampler (before it restarts or the stream
        goes idle); its windows, if any, are the last message's."""
        if not self._held:
            return
        assert self._shape is not None and self.last_arrival is not None
        mono = np.concatenate(self._held)
        self._held.clear()
        self._held_frames = 0
        assert self.last_unix is not None
        self._window(mono, self._shape[1], Arrival(self.last_unix, self.last_arrival))

    def _window(self, mono: np.ndarray, rate: int, arrival: Arrival) -> int:
        """Resample input ``mono``, cut the windows it completes and hand them over."""
        assert self._resampler is not None
        self._resampled_frames += len(mono)
        mono = self._resampler.process(mono)
        if self._pending_delay:
            with self._delay_lock:
                delay, self._pending_delay = self._pending_delay, 0
            self._windower.delay_next(delay)
        windows = self._windower.push(mono)
        if windows:
            self.window_times.append(arrival.mono)
        for window in windows:
            self._sink(
                ReadyWindow(
                    self.name,
                    self.windows_emitted,
                    self.epoch,
                    window.start,
                    window.samples,
                    self._capture.captured(window.end, rate, arrival),
                )
            )
            self.windows_emitted += 1
        self._capture.forget_before(self._windower.next_end, rate)
        return len(windows)

    def _clean(self, frames: np.ndarray) -> np.ndarray:
        frames, nonfinite, out_of_range = clean_samples(frames)
        for kind, count in ((CLEANED_NONFINITE, nonfinite), (CLEANED_OUT_OF_RANGE, out_of_range)):
            if count:
                self._metrics.samples_cleaned.labels(self.name, kind).inc(count)
        self._declaration.cleaned(nonfinite + out_of_range, frames.size)
        return frames

    def _track_rate(self, audio_s: float, now_mono: float) -> None:
        self._audio_s += audio_s
        if self._rate_mark is None:
            self._rate_mark = (now_mono, self._audio_s)
            return
        since, audio_then = self._rate_mark
        if now_mono - since >= LIVE_CHECK_S:
            ratio = (self._audio_s - audio_then) / (now_mono - since)
            self._declaration.measured(ratio, now_mono - since)
            live = LIVE_RATE[0] <= ratio <= LIVE_RATE[1]
            if live != self.live:
                self.window_times.clear()  # a burst's completions say nothing of the phase
            self.live = live
            self._rate_mark = (now_mono, self._audio_s)

    def delay_next_window(self, samples: int) -> None:
        """Ask the ingest thread to emit the next window ``samples`` later (any thread)."""
        with self._delay_lock:
            self._pending_delay += samples

    # -- state ---------------------------------------------------------------------
    def count_idle_episode(self) -> None:
        """Count the silence since ``last_arrival`` once, whichever thread notices it first."""
        with self._episode_lock:
            if self._episode_counted == self.last_arrival:
                return
            self._episode_counted = self.last_arrival
        self._idle_episodes.inc()

    def silent_for(self, now_mono: float) -> float:
        return float("inf") if self.last_arrival is None else now_mono - self.last_arrival


class DeclarationCheck:
    """Whether a PCM stream's audio looks declared wrong, and the warning that says so.

    Two signs, each sustained for MISDECLARED_AFTER_S: the audio arrives at about 2x or
    0.5x real time (by the declared format, rate and channels), or over 1 % of float
    samples need cleaning. Then one WARNING names the likely cause and
    ``tagd_stream_misdeclared{stream}`` is 1, until the stream runs at real time and clean
    again (or is declared anew). Streams of float frames (soundcards, files) have no
    declaration to doubt and are not checked.
    """

    def __init__(self, stream: str, metrics: Metrics) -> None:
        self.stream = stream
        self._metrics = metrics
        self._shape: tuple[str, int, int] | None = None  # (format, rate, channels) declared
        self._suspect_s = 0.0  # how long the signs have lasted
        self.flagged = False
        self._cleaned = self._samples = 0  # float samples since the last measurement

    def declared(self, shape: tuple[str | None, int, int]) -> None:
        if self.flagged:
            log.info("stream %s: input declared anew as %s", self.stream, shape)
        pcm_format, rate, channels = shape
        self._shape = (pcm_format, rate, channels) if pcm_format else None
        self._suspect_s, self.flagged = 0.0, False
        self._cleaned = self._samples = 0
        if self._shape is not None:
            self._metrics.stream_misdeclared.labels(self.stream).set(0)

    def cleaned(self, count: int, samples: int) -> None:
        self._cleaned += count
        self._samples += samples

    def measured(self, ratio: float, over_s: float) -> None:
        """One measurement of the audio rate over ``over_s`` wall seconds."""
        if self._shape is None:
            return
        share = self._cleaned / self._samples if self._samples else 0.0
        self._cleaned = self._samples = 0
        rate_sign = next(
            (r for r in SUSPECT_RATES if abs(ratio / r - 1) <= SUSPECT_RATE_TOLERANCE), None
        )
        dirty = share >= MASS_CLEANING_SHARE
        if rate_sign is None and not dirty:
            self._suspect_s = 0.0
            if self.flagged and LIVE_RATE[0] <= ratio <= LIVE_RATE[1]:
                self.flagged = False
                self._metrics.stream_misdeclared.labels(self.stream).set(0)
                log.info("stream %s: audio at real time and clean again", self.stream)
            return
        self._suspect_s += over_s
        if self.flagged or self._suspect_s < MISDECLARED_AFTER_S:
            return
        self.flagged = True
        self._metrics.stream_misdeclared.labels(self.stream).set(1)
        pcm_format, rate, channels = self._shape
        signs = []
        if rate_sign is not None:
            signs.append(f"audio arrives at {ratio:.2f}x real time")
        if dirty:
            signs.append(f"{share:.0%} of its samples are NaN or beyond ±1")
        log.warning(
            "stream %s: %s for %.0f s: declared %s, %d Hz, %d channel(s); %s",
            self.stream,
            " and ".join(signs),
            self._suspect_s,
            pcm_format,
            rate,
            channels,
            likely_cause(pcm_format, rate_sign, dirty),
        )


def likely_cause(pcm_format: str, rate_sign: float | None, dirty: bool) -> str:
    """What a producer most likely sends instead of what it declared."""
    if rate_sign is not None:  # 2.0: twice the bytes tagd expects, 0.5: half
        width = PCM_FORMATS[pcm_format][0].itemsize * rate_sign
        formats = sorted(f for f, (dtype, _) in PCM_FORMATS.items() if dtype.itemsize == width)
        guess = f"the data looks like {' or '.join(formats)}? " if formats else ""
        how_many = "twice" if rate_sign > 1 else "half"
        return f"{guess}(or it sends {how_many} the rate or channels declared)"
    if dirty and pcm_format == "f32le":  # integers read as floats are mostly garbage
        return "the data looks like s16le or s32le?"
    return "check the producer's scaling"


@dataclass
class _Entry:
    stream: Stream
    owner: str  # the input that feeds it
    pinned: bool  # named in the config: never evicted


class StreamHub:
    def __init__(
        self,
        geometry: StreamGeometry,
        sink: WindowSink,
        metrics: Metrics,
        *,
        max_streams: int,
        idle_after_s: float,
        evict_after_s: float,
        spread_phases: bool = False,
        max_spliced_gap_s: float = float("inf"),
        on_evict: Callable[[str], None] | None = None,
        on_idle: Callable[[str], None] | None = None,
        pool: WindowPool | None = None,
    ) -> None:
        self.geometry = geometry
        self._pool = pool  # where every stream's windows come from (windowing.WindowPool)
        self.spread_phases = spread_phases
        self._sink = sink
        self._metrics = metrics
        self.max_streams = max_streams
        self.idle_after_s = idle_after_s
        self.evict_after_s = evict_after_s
        self.max_spliced_gap_s = max_spliced_gap_s
        self._on_evict = on_evict  # told each evicted name, from the evicting thread
        # told each stream that goes idle, from the sweeping thread: its next data
        # restarts it, so what was kept for its next window (incremental state) can go
        self._on_idle = on_idle
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def open(self, name: str, owner: str, *, pinned: bool = False) -> Stream:
        """The stream ``name`` fed by input ``owner``, created on first use.

        Raises ``StreamRefused`` when another input feeds that name, or the stream limit
        is reached and no dynamic stream is idle.
        """
        displaced = None
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                if entry.owner != owner:
                    raise StreamRefused(
                        MALFORMED_STREAM_TAKEN, f"stream {name!r} is already fed by {entry.owner}"
                    )
                return entry.stream
            if len(self._entries) >= self.max_streams:
                displaced = self._longest_idle()
                if displaced is None:
                    raise StreamRefused(
                        MALFORMED_TOO_MANY_STREAMS,
                        f"stream {name!r} refused: limits.max_streams={self.max_streams} reached",
                    )
                del self._entries[displaced]
                self._metrics.forget_stream(displaced)  # under the lock: before a reopen
            stream = Stream(
                name,
                self.geometry,
                self._sink,
                self._metrics,
                self.idle_after_s,
                self.max_spliced_gap_s,
                self._pool,
            )
            self._entries[name] = _Entry(stream, owner, pinned)
            self._metrics.known_streams.set(len(self._entries))
        log.info("stream %s opened by %s", name, owner)
        if displaced is not None:
            self._forget(displaced, f"to make room for {name}")
        return stream

    def _longest_idle(self) -> str | None:
        """The dynamic stream silent the longest among those sweep() marked idle (lock held)."""
        idle = [
            (e.stream.last_arrival, n)
            for n, e in self._entries.items()
            if e.stream.idle and e.stream.last_arrival is not None and not e.pinned
        ]
        return min(idle)[1] if idle else None

    def _forget(self, name: str, why: str) -> None:
        log.info("stream %s evicted %s", name, why)
        if self._on_evict is not None:
            self._on_evict(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def get(self, name: str) -> Stream | None:
        with self._lock:
            entry = self._entries.get(name)
        return entry.stream if entry else None

    def sweep(self, now_mono: float | None = None) -> list[str]:
        """Mark silent streams idle, evict long-idle unpinned ones, update the gauges.

        Returns the names evicted.
        """
        now_mono = time.perf_counter() if now_mono is None else now_mono
        evicted, went_idle = [], []
        with self._lock:
            active = 0
            for name, entry in list(self._entries.items()):
                stream = entry.stream
                silent = stream.silent_for(now_mono)
                if stream.last_unix is not None:
                    stream.last_audio_gauge.set(stream.last_unix)
                if silent < self.idle_after_s:
                    active += 1
                    stream.idle_gauge.set(0)
                    continue
                if not stream.idle:
                    stream.idle = True
                    went_idle.append(name)
                    stream.release_idle_buffers(now_mono)
                    stream.count_idle_episode()
                    log.info("stream %s idle: no data for %.1f s", name, silent)
                stream.idle_gauge.set(1)
                if not entry.pinned and self.evict_after_s and silent >= self.evict_after_s:
                    del self._entries[name]
                    self._metrics.forget_stream(name)  # under the lock: before a reopen
                    evicted.append(name)
            self._metrics.active_streams.set(active)
            self._metrics.known_streams.set(len(self._entries))
            if self.spread_phases:
                hop_s = self.geometry.hop_samples / self.geometry.sample_rate
                streams = [e.stream for e in self._entries.values()]
                place_live_streams(streams, hop_s, self.geometry.sample_rate)
        if self._on_idle is not None:
            for name in went_idle:
                self._on_idle(name)
        for name in evicted:
            self._forget(name, f"after {self.evict_after_s:.0f} s idle")
        return evicted
