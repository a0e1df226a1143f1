"""Audio in: decoding files, PCM byte streams, downmixing and resampling.

Everything returns mono float32 in [-1, 1] at the rate asked for. Decoding tries
soundfile (libsndfile: wav, flac, ogg) and falls back to an ffmpeg subprocess for
anything else; mp3 goes to ffmpeg first, at the file's own rate, because libsndfile
read block by block garbles some of its granules (docs/design.md). Resampling is soxr,
one-shot for files and streaming for live input.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soxr

log = logging.getLogger(__name__)

RESAMPLE_QUALITY = "HQ"  # soxr's high quality: transparent for tagging, cheap enough live

# PCM formats a producer may send: name → (numpy dtype, scale to [-1, 1])
PCM_FORMATS: dict[str, tuple[np.dtype, float]] = {
    "s16le": (np.dtype("<i2"), 1.0 / 32768.0),
    "s32le": (np.dtype("<i4"), 1.0 / 2147483648.0),
    "f32le": (np.dtype("<f4"), 1.0),
}


class AudioError(RuntimeError):
    """A file or stream could not be decoded."""


def downmix(frames: np.ndarray) -> np.ndarray:
    """[n] or [n, channels] → mono float32 [n] (channel mean)."""
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim == 1:
        return frames
    # Column by column: numpy's mean over a short last axis is several times slower for
    # a message's frames (docs/design.md). Bit for bit numpy's mean up to 7 channels
    # (same order, same division), within a rounding beyond.
    mono = frames[:, 0].copy()
    for channel in range(1, frames.shape[1]):
        mono += frames[:, channel]
    mono /= np.float32(frames.shape[1])
    return mono


def clean_samples(frames: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Float samples made safe for the model: NaN → 0, ±Inf → ±1, the rest clipped to [-1, 1].

    Returns the samples (the same array when nothing was wrong) and how many were
    non-finite and how many finite ones were out of range.
    """
    if len(frames) == 0 or (frames.min() >= -1.0 and frames.max() <= 1.0):  # NaN fails both
        return frames, 0, 0
    nonfinite = int(np.count_nonzero(~np.isfinite(frames)))
    cleaned = np.nan_to_num(frames, nan=0.0, posinf=1.0, neginf=-1.0)
    out_of_range = int(np.count_nonzero(np.abs(cleaned) > 1.0))
    np.clip(cleaned, -1.0, 1.0, out=cleaned)
    return cleaned, nonfinite, out_of_range


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return np.asarray(samples, dtype=np.float32)
    return soxr.resample(samples, from_rate, to_rate, quality=RESAMPLE_QUALITY).astype(
        np.float32, copy=False
    )


def decode_file(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode a whole audio file to mono float32 at ``sample_rate``."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    mpeg = mpeg_layout(path)
    if mpeg is not None and shutil.which("ffmpeg") is not None:
        channels, rate = mpeg
        # at the file's own rate, the channels' mean: soxr resamples it, as any other file
        samples = _run_ffmpeg(path, ffmpeg_decode_command(path, rate, mean_of=channels))
        return resample(samples, rate, sample_rate)
    try:
        samples, rate = _decode_soundfile(path)
    except AudioError as first_error:
        if shutil.which("ffmpeg") is None:
            raise AudioError(f"{first_error} (and ffmpeg is not installed to try)") from None
        log.debug("soundfile could not read %s (%s); trying ffmpeg", path, first_error)
        return _decode_ffmpeg(path, sample_rate)
    return resample(samples, rate, sample_rate)


DECODE_BLOCK_FRAMES = 1 << 16  # frames read (and downmixed) at a time


def _decode_soundfile(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 at the file's rate, downmixed block by block: a long multichannel
    file never sits in memory with all its channels."""
    import soundfile

    try:
        with soundfile.SoundFile(str(path)) as handle:
            rate = handle.samplerate
            samples = np.empty(max(handle.frames, 0), dtype=np.float32)
            filled, extra = 0, []  # extra: frames past the header's count, if any
            for block in handle.blocks(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True):
                mono = downmix(block)
                fits = min(len(mono), len(samples) - filled)
                samples[filled : filled + fits] = mono[:fits]
                filled += fits
                if fits < len(mono):
                    extra.append(mono[fits:])
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # ValueError: a raw stream libsndfile opens but cannot seek in (Asterisk's .gsm)
        raise AudioError(f"{path}: {exc}") from exc
    samples = np.concatenate([samples[:filled], *extra]) if extra else samples[:filled]
    if len(samples) == 0:
        raise AudioError(f"{path}: no audio in the file")
    return samples, rate


def mpeg_layout(path: str | Path) -> tuple[int, int] | None:
    """(channels, sample rate) of an MPEG audio file (mp3, mp2) from its header as
    libsndfile reads it; None for any other file, or one it cannot read."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return None
    mpeg = info.subtype.startswith("MPEG_LAYER")  # format "MP3" for layers I to III
    return (info.channels, info.samplerate) if mpeg else None


def _decode_ffmpeg(path: Path, sample_rate: int) -> np.ndarray:
    return _run_ffmpeg(path, ffmpeg_decode_command(path, sample_rate))


def _run_ffmpeg(path: Path, command: list[str]) -> np.ndarray:
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError(f"{path}: ffmpeg could not decode it: {reason[-1] if reason else '?'}")
    samples = np.frombuffer(bytearray(result.stdout), dtype="<f4")  # writable, one copy
    if len(samples) == 0:
        raise AudioError(f"{path}: no audio in the file")
    return samples


def ffmpeg_decode_command(path: str | Path, sample_rate: int, mean_of: int = 0) -> list[str]:
    """ffmpeg decoding ``path`` to mono float32 (f32le) at ``sample_rate`` on its stdout.

    ``mean_of``: the file's channel count, for the channels' mean (as ``downmix``) through a
    ``pan`` filter; 0 leaves the downmix to ffmpeg's ``-ac 1``, which weighs them otherwise.
    """
    if mean_of:
        mean = "+".join(f"{1 / mean_of!r}*c{channel}" for channel in range(mean_of))
        mono = ["-af", f"pan=mono|c0={mean}"]
    else:
        mono = ["-ac", "1"]
    return [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-i",
        str(path),
        "-vn",
        *mono,
        "-ar",
        str(sample_rate),
        "-f",
        "f32le",
        "-",
    ]


def frame_bytes(pcm_format: str, channels: int) -> int:
    """Bytes of one interleaved sample frame; AudioError for an unknown format."""
    if pcm_format not in PCM_FORMATS:
        raise AudioError(f"unknown PCM format {pcm_format!r}; known: {', '.join(PCM_FORMATS)}")
    if channels < 1:
        raise AudioError(f"channels must be at least 1, got {channels}")
    return PCM_FORMATS[pcm_format][0].itemsize * channels


# 16-bit samples times their power-of-two scale, and sums of up to 256 of them, are exact
# in float32 (24-bit mantissa): summing as integers first gives downmix's result.
SUMMED_EXACTLY = PCM_FORMATS["s16le"][0]
MAX_CHANNELS_SUMMED_EXACTLY = 256


class PcmDecoder:
    """Turns a byte stream of interleaved PCM into float32 frames.

    Messages need not align with sample frames: an incomplete trailing frame is carried
    over to the next ``decode`` call.
    """

    def __init__(self, pcm_format: str, channels: int):
        self.frame_bytes = frame_bytes(pcm_format, channels)
        self.dtype, self.scale = PCM_FORMATS[pcm_format]
        self.channels = channels
        self._carry = b""
        # decode_mono's scale and mean in one multiply where that is exact: both powers of two
        self._mono_factor = (
            np.float32(self.scale / channels) if channels & (channels - 1) == 0 else None
        )

    def reset(self) -> None:
        self._carry = b""

    def decode(self, payload: bytes) -> np.ndarray:
        """Frames [n, channels] float32 from ``payload`` plus any carried bytes."""
        frames = self._whole_frames(payload).astype(np.float32)
        if self.scale != 1.0:
            frames *= self.scale
        return frames

    def decode_mono(self, payload: bytes) -> np.ndarray:
        """``downmix(decode(payload))`` bit for bit, in fewer passes and no float copy of
        every channel where that is exact: 16-bit samples summed as integers (exact), then
        scaled by a power of two and divided once, as downmix divides its exact sum."""
        if self.dtype != SUMMED_EXACTLY or self.channels > MAX_CHANNELS_SUMMED_EXACTLY:
            return downmix(self.decode(payload))
        ints = self._whole_frames(payload)
        if self.channels == 1:
            mono = ints[:, 0].astype(np.float32)
        else:  # the sums are integers under 2^24: exact in float32, summed straight into it
            mono = np.add(ints[:, 0], ints[:, 1], dtype=np.float32)
            for channel in range(2, self.channels):
                mono += ints[:, channel]
        if self._mono_factor is not None:
            mono *= self._mono_factor
        else:
            mono *= np.float32(self.scale)
            mono /= np.float32(self.channels)
        return mono

    def _whole_frames(self, payload: bytes) -> np.ndarray:
        """The samples of the whole frames in the carried bytes and ``payload``, as sent
        ([n, channels], a view of the bytes); a trailing partial frame is carried."""
        data = self._carry + bytes(payload) if self._carry else bytes(payload)
        usable = len(data) - len(data) % self.frame_bytes
        self._carry = data[usable:]
        samples = np.frombuffer(data, dtype=self.dtype, count=usable // self.dtype.itemsize)
        return samples.reshape(-1, self.channels)


class StreamResampler:
    """Streaming soxr resampler for one mono stream; state carries across chunks."""

    def __init__(self, from_rate: int, to_rate: int):
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._stream = (
            None
            if from_rate == to_rate
            else soxr.ResampleStream(
                from_rate, to_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY
            )
        )

    @property
    def passthrough(self) -> bool:
        """The rates are the same: samples go through untouched."""
        return self._stream is None

    def process(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32)
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)

    def reset(self) -> None:
        if self._stream is not None:
            self._stream.clear()


# -- long files, a block at a time -------------------------------------------------------------
STREAM_BLOCK_FRAMES = 1 << 17  # frames read from the decoder at a time (~3 s at 44.1 kHz)


def decode_blocks(
    path: str | Path, sample_rate: int, block_frames: int = STREAM_BLOCK_FRAMES
) -> Iterator[np.ndarray]:
    """``decode_file``'s audio a block at a time, for files too long to hold whole.

    The decoder is chosen as ``decode_file`` chooses it (ffmpeg for MPEG, libsndfile
    else, ffmpeg when libsndfile cannot), and resampled by soxr's streaming resampler,
    so memory stays a few blocks whatever the length. Raises AudioError, before the first
    block when the file cannot be opened, or where its decoding fails.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    mpeg = mpeg_layout(path)
    have_ffmpeg = shutil.which("ffmpeg") is not None
    if mpeg is not None and have_ffmpeg:
        channels, rate = mpeg
        command = ffmpeg_decode_command(path, rate, mean_of=channels)
        return _resampled(_ffmpeg_blocks(path, command, block_frames), rate, sample_rate)
    import soundfile

    try:  # the first block read here: a file libsndfile opens but cannot read goes to ffmpeg
        handle = soundfile.SoundFile(str(path))
        blocks = handle.blocks(block_frames, dtype="float32", always_2d=True)
        first = next(blocks, None)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # ValueError: a raw stream libsndfile opens but cannot seek in (Asterisk's .gsm)
        if not have_ffmpeg:
            raise AudioError(f"{path}: {exc} (and ffmpeg is not installed to try)") from None
        log.debug("soundfile could not read %s (%s); trying ffmpeg", path, exc)
        command = ffmpeg_decode_command(path, sample_rate)
        return _ffmpeg_blocks(path, command, block_frames)
    if first is None:
        handle.close()
        raise AudioError(f"{path}: no audio in the file")
    mono = _soundfile_blocks(path, handle, first, blocks)
    return _resampled(mono, handle.samplerate, sample_rate)


def audio_duration(path: str | Path) -> float | None:
    """Seconds of audio in ``path`` from its header (libsndfile, else ffprobe); None when
    neither says."""
    import soundfile

    try:
        info = soundfile.info(str(path))
        if info.frames > 0 and info.samplerate > 0:
            return info.frames / info.samplerate
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        pass
    if shutil.which("ffprobe") is None:
        return None
    probe = ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0"]
    result = subprocess.run([*probe, str(path)], capture_output=True, text=True, check=False)
    try:
        return float(result.stdout.strip())
    except ValueError:
        return None


def _resampled(blocks: Iterator[np.ndarray], from_rate: int, to_rate: int) -> Iterator[np.ndarray]:
    resampler = StreamResampler(from_rate, to_rate)
    for block in blocks:
        out = resampler.process(block)
        if len(out):
            yield out
    tail = resampler.process(np.zeros(0, dtype=np.float32), last=True)
    if len(tail):
        yield tail


def _soundfile_blocks(path: Path, handle, first: np.ndarray, rest) -> Iterator[np.ndarray]:
    import soundfile

    with handle:
        yield downmix(first)
        try:
            for block in rest:
                yield downmix(block)
        except (soundfile.LibsndfileError, RuntimeError, ValueError) as exc:
            raise AudioError(f"{path}: {exc}") from exc


def _ffmpeg_blocks(path: Path, command: list[str], block_frames: int) -> Iterator[np.ndarray]:
    """ffmpeg's f32le stdout as blocks; its stderr goes to a file (a pipe nobody reads
    could fill and stall it). The process is ended if the reader stops early."""
    sample_bytes = 4
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)
        assert process.stdout is not None
        carry, samples = b"", 0
        try:
            while chunk := process.stdout.read(block_frames * sample_bytes):
                data = carry + chunk if carry else chunk
                usable = len(data) - len(data) % sample_bytes
                carry = data[usable:]
                samples += usable // sample_bytes
                yield np.frombuffer(data, dtype="<f4", count=usable // sample_bytes).copy()
            returncode = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
        if returncode != 0:
            errors.seek(0)
            reason = errors.read().decode(errors="replace").strip().splitlines()
            raise AudioError(f"{path}: ffmpeg could not decode it: {reason[-1] if reason else '?'}")
        if samples == 0:
            raise AudioError(f"{path}: no audio in the file")
