"""``soundcard://DEVICE?rate=48000&channels=2&stream=NAME``: capture through PortAudio.

DEVICE is a PortAudio device name (or a unique part of one: ``default``, ``pulse``, an
ALSA PCM name from .asoundrc) or its index in ``python -m sounddevice``. ``format``
(s16le, s32le, f32le; default f32le) is the sample type asked of PortAudio, which
converts from what the card delivers. PortAudio's callback runs on its own real-time thread, so it only
copies the block into a queue; the reader thread scales it to float (as PcmDecoder scales
PCM) and the stream does the resampling and windowing.
An input overflow (the reader fell behind the card) is counted as a gap.

A block's arrival is when its last sample was captured, from PortAudio's timestamps
(the first sample's ADC time plus the block's length, against the callback's time),
not when the callback ran: the driver's buffering comes before the callback. Devices
that give no usable timestamps (zero, or a capture time in the future or more than
``MAX_CAPTURE_LAG_S`` back) get the callback's time.
"""

from __future__ import annotations

import logging
import queue
from urllib.parse import unquote

import numpy as np

from tagd.audio import PCM_FORMATS
from tagd.sources import POLL_INTERVAL_S, Source, SourceError
from tagd.stream import Arrival

log = logging.getLogger(__name__)

MAX_QUEUED_BLOCKS = 1000  # ~10 s of 10 ms blocks: beyond that the reader is stuck; drop
DEFAULT_FORMAT = "f32le"
DTYPES = {"s16le": "int16", "s32le": "int32", "f32le": "float32"}  # sounddevice's names
MAX_CAPTURE_LAG_S = 1.0  # a longer lag from capture to callback is a clock to distrust


class SoundcardSource(Source):
    schemes = ("soundcard",)
    options = ("format", "rate", "channels", "blocksize")
    _audio = None  # the sounddevice.InputStream, once open

    @classmethod
    def address_of(cls, spec) -> str:
        return unquote(spec.url_parts.netloc) or "default"

    def open(self) -> None:
        try:
            import sounddevice
        except OSError as exc:  # sounddevice raises OSError when libportaudio is missing
            raise SourceError(
                f"input {self.label}: PortAudio is not available ({exc}); install libportaudio2"
            ) from None
        self._blocks: queue.Queue[tuple[np.ndarray, Arrival, bool]] = queue.Queue(MAX_QUEUED_BLOCKS)
        self._lost_blocks = False  # set by the callback when the queue was full
        self._format = pcm_format = self.spec.format or DEFAULT_FORMAT
        self._scale = PCM_FORMATS[pcm_format][1]  # PortAudio's integers to [-1, 1]
        try:
            info = sounddevice.query_devices(self.spec.device, kind="input")
            self._rate = int(self.spec.rate or info["default_samplerate"])
            self._channels = int(self.spec.channels or min(2, info["max_input_channels"]))
            self._audio = sounddevice.InputStream(
                device=self.spec.device,
                samplerate=self._rate,
                channels=self._channels,
                dtype=DTYPES[pcm_format],
                blocksize=self.spec.blocksize,
                callback=self._callback,
            )
        except (ValueError, sounddevice.PortAudioError) as exc:
            raise SourceError(
                f"input {self.label}: cannot open soundcard {self.spec.device!r}: {exc}"
            ) from None
        except MemoryError:
            # PortAudio calls back through a cffi closure, which needs writable and
            # executable memory: systemd's MemoryDenyWriteExecute=yes forbids it.
            raise SourceError(
                f"input {self.label}: cannot open soundcard {self.spec.device!r}: no writable "
                f"and executable memory for PortAudio's callback (MemoryDenyWriteExecute?); "
                f"install deploy/systemd/soundcard.conf, which allows it"
            ) from None
        self._stream = self.hub.open(self.spec.stream_name(), self.label, pinned=True)
        log.info(
            "input %s: soundcard %r (%s) at %d Hz, %d channels",
            self.label,
            self.spec.device,
            info["name"],
            self._rate,
            self._channels,
        )

    def _callback(self, indata: np.ndarray, frames: int, time_info, status) -> None:
        try:
            arrival = captured(Arrival.now(), time_info, frames, self._rate)
            self._blocks.put_nowait((indata.copy(), arrival, bool(status.input_overflow)))
        except queue.Full:
            self._lost_blocks = True  # the reader fell behind; it counts the gap

    def _read(self) -> None:
        self._audio.start()
        while not self._stop.is_set():
            try:
                block, arrival, overflow = self._blocks.get(timeout=POLL_INTERVAL_S)
            except queue.Empty:
                continue
            if overflow or self._lost_blocks:
                self._lost_blocks = False
                self.metrics.gaps.labels(self._stream.name).inc()
            self._stream.push_frames(to_float(block, self._scale), self._rate, arrival)

    def _close(self) -> None:
        if self._audio is not None:  # None: never opened
            self._audio.stop()
            self._audio.close()


def to_float(block: np.ndarray, scale: float) -> np.ndarray:
    """PortAudio's block [frames, channels] as float32 in [-1, 1], as PcmDecoder scales PCM."""
    if block.dtype == np.float32:
        return block
    frames = block.astype(np.float32)
    frames *= np.float32(scale)
    return frames


def captured(now: Arrival, time_info, frames: int, rate: int) -> Arrival:
    """When the block's last sample was captured, from PortAudio's callback times.

    ``time_info`` has ``inputBufferAdcTime`` (the first sample's capture) and
    ``currentTime`` (the callback's), both on the stream's clock; ``now`` is the
    callback's time on ours.
    """
    adc, current = time_info.inputBufferAdcTime, time_info.currentTime
    if not adc or not current:
        return now
    lag = current - (adc + frames / rate)
    if not 0.0 <= lag <= MAX_CAPTURE_LAG_S:
        return now
    return Arrival(now.unix - lag, now.mono - lag)
