"""``file://PATH?stream=NAME&realtime=1&loop=0&chunk_ms=20``: an audio file as a live stream.

For demos, tests and the bench. The file is read in chunks of ``chunk_ms`` and, with
``realtime`` (the default), paced so that each chunk is pushed when it would have been
captured live; without it, as fast as the pipeline takes it (windows beyond what the
engine keeps up with are dropped and counted, as for any input). At the end the stream
goes idle, unless ``loop``.

libsndfile reads wav, flac and ogg block by block. mp3 goes through ffmpeg at the file's
own rate as the channels' mean, as ``tagd tag`` decodes it (libsndfile's block reads
garble mp3 granules at some block boundaries; docs/design.md). Other formats are decoded
by an ffmpeg subprocess straight to the model's rate.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import soundfile

from tagd.audio import ffmpeg_decode_command, mpeg_layout
from tagd.sources import Source, SourceError
from tagd.stream import Arrival

log = logging.getLogger(__name__)

FFMPEG_READ_BYTES = 1 << 16


class FileSource(Source):
    schemes = ("file",)
    options = ("realtime", "loop", "chunk_ms")
    needs_stream_name = False  # the file's stem

    @classmethod
    def address_of(cls, spec) -> str:
        parts = spec.url_parts
        return unquote(parts.netloc + parts.path)  # file:///abs/path or file://rel/path

    @classmethod
    def check(cls, spec, path: str, security) -> list[str]:
        if not spec.address:
            return [f"{path}.url: file:// needs a path, got {spec.url!r}"]
        return []

    def reserve(self) -> None:
        self.path = Path(self.spec.address)
        if not self.path.is_file():
            raise SourceError(f"input {self.label}: no such file: {self.path}")

    def open(self) -> None:
        self.reserve()
        # _ffmpeg: the decode command, or None for libsndfile's block reads
        mpeg = mpeg_layout(self.path)
        if mpeg is not None and shutil.which("ffmpeg") is not None:
            channels, self._rate = mpeg
            self._ffmpeg = ffmpeg_decode_command(self.path, self._rate, mean_of=channels)
        else:
            try:
                self._rate, self._ffmpeg = int(soundfile.info(str(self.path)).samplerate), None
            except (soundfile.LibsndfileError, RuntimeError):
                self._rate = self.hub.geometry.sample_rate
                self._ffmpeg = ffmpeg_decode_command(self.path, self._rate)
        self._stream = self.hub.open(self.spec.stream_name(), self.label, pinned=True)
        log.info(
            "input %s: %s at %d Hz%s",
            self.label,
            self.path,
            self._rate,
            " (via ffmpeg)" if self._ffmpeg else "",
        )

    def _read(self) -> None:
        chunk_frames = max(1, round(self._rate * self.spec.chunk_ms / 1000))
        started = time.perf_counter()
        pushed = 0  # frames pushed since started, for pacing
        while not self._stop.is_set():
            for frames in self._chunks(chunk_frames):
                if self._stop.is_set():
                    return
                if self.spec.realtime:
                    # Push each chunk when its last frame would have been captured live.
                    due = started + (pushed + len(frames)) / self._rate
                    if self._stop.wait(max(0.0, due - time.perf_counter())):
                        return
                self._stream.push_frames(frames, self._rate, Arrival.now())
                pushed += len(frames)
            if not self.spec.loop:
                log.info("input %s: end of %s", self.label, self.path)
                return

    def _chunks(self, chunk_frames: int) -> Iterator[np.ndarray]:
        if self._ffmpeg is None:
            with soundfile.SoundFile(str(self.path)) as handle:
                yield from handle.blocks(chunk_frames, dtype="float32", always_2d=True)
            return
        chunk_bytes = chunk_frames * 4
        with subprocess.Popen(
            self._ffmpeg, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        ) as process:
            assert process.stdout is not None
            try:
                while data := process.stdout.read(chunk_bytes):
                    usable = len(data) - len(data) % 4
                    yield np.frombuffer(data[:usable], dtype="<f4").astype(np.float32)
            finally:
                process.kill()
