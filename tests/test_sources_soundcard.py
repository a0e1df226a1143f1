"""The soundcard input through a real PortAudio → ALSA path, without a soundcard.

ALSA's ``file`` plugin turns a raw PCM file into a capture device that PortAudio opens
like any card (TESTING-NOTES.md). PortAudio reads ALSA's configuration once, when
sounddevice is imported, so the capture runs in a subprocess whose HOME holds the
test's .asoundrc. The ``null`` slave is not paced, so the device delivers the file as
fast as it is read; the first windows must equal the file's, sample for sample.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from audio_fixtures import make_music

pytest.importorskip("sounddevice")

RATE = 48_000
REPO = Path(__file__).resolve().parents[1]

CAPTURE = textwrap.dedent(
    """
    import json, sys, threading
    import numpy as np, zmq
    from tagd.config import LimitsConfig, parse_input
    from tagd.metrics import Metrics
    from tagd.sources import make_source
    from tagd.stream import Arrival, Stream, StreamGeometry, StreamHub

    raw_path, url, wanted = sys.argv[1], sys.argv[2], int(sys.argv[3])
    geometry = StreamGeometry(sample_rate=8000, window_samples=4000, hop_samples=2000)
    windows, enough = [], threading.Event()

    def sink(window):
        windows.append(window)
        if len(windows) >= wanted:
            enough.set()

    metrics = Metrics()
    hub = StreamHub(geometry, sink, metrics, max_streams=4, idle_after_s=5.0, evict_after_s=0)
    source = make_source(parse_input(url), hub, metrics, zmq.Context(), LimitsConfig())
    source.open()
    source.start()
    captured = enough.wait(10)
    source.stop()
    joined = source.join(2.0)
    reference = []
    Stream("ref", geometry, reference.append, Metrics()).push_pcm(
        open(raw_path, "rb").read(), "s16le", 48000, 2, Arrival(0, 0))
    same = [bool(np.array_equal(a.samples, b.samples)) and a.start == b.start
            for a, b in zip(windows, reference[:wanted])]
    print(json.dumps({"captured": captured, "joined": joined, "same": same,
                      "reference": len(reference), "stream": windows[0].stream if windows else None}))
    """
)


def asoundrc(home: Path, raw: Path) -> None:
    (home / ".asoundrc").write_text(
        textwrap.dedent(
            f"""
            pcm.tagdtest {{
                type file
                slave.pcm "null"
                file "/dev/null"
                infile "{raw}"
                format "raw"
            }}
            """
        )
    )


def test_soundcard_input_captures_the_device_audio_exactly(tmp_path):
    frames = np.stack([make_music(2.0, RATE, seed=1), make_music(2.0, RATE, seed=2)], axis=1)
    raw = tmp_path / "capture.raw"
    raw.write_bytes((frames * 32767).astype("<i2").tobytes())
    asoundrc(tmp_path, raw)
    url = "soundcard://tagdtest?rate=48000&channels=2&format=s16le&stream=studio&blocksize=960"
    wanted = 3
    result = subprocess.run(
        [sys.executable, "-c", CAPTURE, str(raw), url, str(wanted)],
        env={**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["reference"] >= wanted
    assert report == {
        "captured": True,
        "joined": True,
        "same": [True] * wanted,
        "reference": report["reference"],
        "stream": "studio",
    }


def test_a_missing_soundcard_fails_to_open_with_one_line(tmp_path):
    script = textwrap.dedent(
        """
        import zmq
        from tagd.config import LimitsConfig, parse_input
        from tagd.metrics import Metrics
        from tagd.sources import SourceError, make_source
        from tagd.stream import StreamGeometry, StreamHub

        hub = StreamHub(StreamGeometry(8000, 4000, 2000), print, Metrics(), max_streams=1,
                        idle_after_s=1.0, evict_after_s=0)
        spec = parse_input("soundcard://no-such-card?stream=studio")
        try:
            make_source(spec, hub, Metrics(), zmq.Context(), LimitsConfig()).open()
        except SourceError as exc:
            print(exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "cannot open soundcard 'no-such-card'" in lines[0], result


# Under systemd's MemoryDenyWriteExecute=yes no memory may be writable and executable, and
# cffi's callback for PortAudio needs some. prctl(PR_SET_MDWE) (Linux 6.3+) sets the same
# rule on a process, so `tagd serve` can be run under it here.
UNDER_MDWE = textwrap.dedent(
    """
    import ctypes, os, runpy, sys
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
        sys.exit(77)  # the kernel cannot: skip
    sys.argv = ["tagd", *sys.argv[1:]]
    runpy.run_module("tagd.cli", run_name="__main__")
    """
)


def test_memory_deny_write_execute_is_a_one_line_startup_error_naming_the_drop_in(
    tmp_path, short_fcn4
):
    model = short_fcn4
    raw = tmp_path / "capture.raw"
    raw.write_bytes(np.zeros(48_000 * 2, dtype="<i2").tobytes())
    asoundrc(tmp_path, raw)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            UNDER_MDWE,
            "serve",
            "--engine",
            str(model),
            "--input",
            "soundcard://tagdtest?rate=48000&channels=2&format=s16le&stream=studio",
            "--metrics",
            "off",
            "--publish",
            "tcp://127.0.0.1:*",
        ],
        env={**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert result.returncode == 2, result.stderr
    first = result.stderr.splitlines()[0]  # the reason first, then the start-up log
    assert first.startswith("tagd serve: input studio: cannot open soundcard 'tagdtest'")
    assert "MemoryDenyWriteExecute" in first and "deploy/systemd/soundcard.conf" in first
    assert "Traceback" not in result.stderr


def test_a_block_arrives_when_its_last_sample_was_captured_not_at_the_callback():
    from types import SimpleNamespace

    from tagd.sources.soundcard import captured
    from tagd.stream import Arrival

    now = Arrival(1000.0, 50.0)
    # 480 frames at 48 kHz (10 ms) whose first sample was captured 30 ms before the
    # callback: the last one 20 ms before it
    times = SimpleNamespace(inputBufferAdcTime=7.970, currentTime=8.0)
    got = captured(now, times, 480, 48_000)
    assert got.unix == pytest.approx(999.98) and got.mono == pytest.approx(49.98)
    # no timestamps (some ALSA plugins), a capture "after" the callback, a clock jump
    for adc, current in ((0.0, 0.0), (8.0, 8.0), (1.0, 8.0)):
        times = SimpleNamespace(inputBufferAdcTime=adc, currentTime=current)
        assert captured(now, times, 480, 48_000) == now


@pytest.mark.parametrize("pcm_format", ["s16le", "s32le", "f32le"])
def test_a_soundcard_block_becomes_the_floats_pcm_decoding_gives(pcm_format):
    from tagd.audio import PCM_FORMATS, PcmDecoder
    from tagd.sources.soundcard import to_float

    dtype, scale = PCM_FORMATS[pcm_format]
    music = make_music(0.1, 48_000)
    if dtype.kind == "i":
        block = (np.stack([music, -music], axis=1) * (np.iinfo(dtype).max)).astype(
            dtype.newbyteorder("=")
        )
    else:
        block = np.stack([music, -music], axis=1).astype(np.float32)
    decoded = PcmDecoder(pcm_format, 2).decode(block.astype(dtype).tobytes())
    np.testing.assert_array_equal(to_float(block, scale), decoded)
