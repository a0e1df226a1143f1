"""How close timeline boundaries are: `tagd tag --timeline` and `tagd serve` on a broadcast.

    .venv/bin/python bench/timeline.py --engine demo/fcn5.onnx [--minutes 10] [--long-minutes 30]

1. Builds a broadcast-like programme whose true timeline is known: music rendered by the
   trainer (trainer/data/rendered.py: General MIDI through FluidSynth) for 20-90 s,
   taking turns with espeak-ng speech for 10-40 s, every other speech turn over a music
   bed (ducked, as a presenter over a bed). Speech, with or without a bed, is "speech";
   the rest "music".
2. Runs `tagd tag --timeline --tags speech` on it, and `tagd serve` fed the file's own
   samples in real time (zmq+pull, ``--serve-speed`` times real time) into its as-run
   log (``--asrun``), read back with `tagd log`; the log's wall-clock times are put back
   on the stream's clock by the offset of its first window (its tags message carries
   the window's position and its capture time).
3. Prints, for both: each true speech/music boundary's distance to the nearest speech
   boundary found (median, p90), the frame accuracy (0.1 s frames, speech or not), and
   how far the two timelines agree with each other.
4. Loops the programme to ``--long-minutes`` (an mp3) and prints peak RSS and wall time
   of `tagd tag --timeline` against plain `tagd tag` on that file, in the same run.

It needs a model with a ``speech`` tag that hears speech: README's first steps make one
(demo/fcn5.onnx). The CPU is printed (lscpu's model name); only figures of one run compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from subprocess import PIPE

import numpy as np
import soundfile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # support: free ports

from support import free_port  # noqa: E402

from trainer.data import rendered  # noqa: E402

RATE = 22_050  # the programme's rate; ffmpeg and tagd resample it as a station's audio
MUSIC_S = (20.0, 90.0)
SPEECH_S = (10.0, 40.0)
FRAME_S = 0.1  # frame accuracy's resolution
TAGD = [sys.executable, "-m", "tagd.cli"]
STREAM = "radio1"
FEED_CHUNK_S = 0.1  # audio per message into tagd serve


# -- the programme ------------------------------------------------------------------------------
def music_piece(number: int, seed: int, seconds: float) -> rendered.Piece:
    """A composed piece with notes and no voice (the next number that has notes)."""
    while True:
        piece = rendered.compose(number, seed, seconds)
        if piece.tracks:
            return dataclasses.replace(piece, speech="", recorded_voice=None, recorded_music=None)
        number += 1


def build_programme(minutes: float, seed: int, path: Path) -> list[tuple[float, float]]:
    """Write the programme to ``path``; return its true speech intervals (seconds)."""
    rng = np.random.default_rng(seed)
    parts, speech, at, turn = [], [], 0.0, 0
    while at < minutes * 60:
        talking = turn % 2 == 1
        seconds = float(rng.uniform(*(SPEECH_S if talking else MUSIC_S)))
        piece = music_piece(1000 * seed + turn, seed, seconds)
        if talking:
            words = rendered._sentences(rng, seconds)
            bed = turn % 4 == 3  # every other speech turn over a music bed
            piece = dataclasses.replace(piece, speech=words, tracks=piece.tracks if bed else ())
            speech.append((at, at + seconds))
        audio = rendered.render(piece, seconds, RATE)
        parts.append(audio.astype(np.float32))
        at += seconds
        turn += 1
        print(f"  rendered {at / 60:5.1f} of {minutes:.1f} min", end="\r", file=sys.stderr)
    print(file=sys.stderr)
    soundfile.write(path, np.concatenate(parts), RATE)
    return speech


# -- measuring ----------------------------------------------------------------------------------
def boundaries(intervals: list[tuple[float, float]], duration: float) -> list[float]:
    """The edges of ``intervals`` that lie inside the file (not its start or end)."""
    return [t for interval in intervals for t in interval if 0.0 < t < duration - 1e-6]


def boundary_errors(truth: list[tuple[float, float]], found, duration: float) -> list[float]:
    found_edges = boundaries(found, duration)
    if not found_edges:
        return [float("inf")] * len(boundaries(truth, duration))
    edges = np.asarray(found_edges)
    return [float(np.min(np.abs(edges - t))) for t in boundaries(truth, duration)]


def frames(intervals, duration: float) -> np.ndarray:
    marks = np.zeros(int(duration / FRAME_S), dtype=bool)
    centres = (np.arange(len(marks)) + 0.5) * FRAME_S
    for start, end in intervals:
        marks |= (centres >= start) & (centres < end)
    return marks


def figures(truth, found, duration: float) -> dict:
    errors = boundary_errors(truth, found, duration)
    accuracy = float(np.mean(frames(truth, duration) == frames(found, duration)))
    return {
        "segments": len(found),
        "true_segments": len(truth),
        "boundary_median_s": float(np.median(errors)) if errors else None,
        "boundary_p90_s": float(np.percentile(errors, 90)) if errors else None,
        "frame_accuracy": accuracy,
    }


# -- the two commands ---------------------------------------------------------------------------
def tag_timeline(engine: Path, path: Path, hop: str | None) -> list[tuple[float, float]]:
    command = [*TAGD, "tag", str(path), "--engine", str(engine), "--timeline"]
    command += ["--format", "jsonl", "--tags", "speech", *(["--hop", hop] if hop else [])]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return [(r["start"], r["end"]) for r in map(json.loads, result.stdout.splitlines())]


def serve_timeline(
    engine: Path, path: Path, hop: str | None, speed: float, duration: float
) -> list:
    """`tagd serve` with an as-run log, fed the file's own samples over zmq+pull at
    ``speed`` times real time; its speech records on the stream's own clock.

    The log places stream time on the wall clock by the capture time of the epoch's first
    window (tagd.asrun.StreamClock); the tags message of that window carries both, so
    the offset is taken off exactly. Fed this way the daemon gets the file's samples from
    the first (a PUSH socket queues until tagd connects), as `tagd tag` decodes them."""
    port, publish = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="tagd-timeline-serve-") as tmp:
        asrun = Path(tmp) / "asrun.db"
        serve = [*TAGD, "serve", "--engine", str(engine), "--asrun", str(asrun)]
        serve += ["--input", f"zmq+pull://127.0.0.1:{port}", "--metrics", "off"]
        serve += ["--publish", f"tcp://127.0.0.1:{publish}", "--log-level", "info"]
        daemon = subprocess.Popen(serve + (["--hop", hop] if hop else []), cwd=REPO, stderr=PIPE)
        try:
            wait_ready(daemon)
            first = feed(path, port, publish, speed)
        finally:
            daemon.terminate()  # SIGTERM: open segments are written, ended "stop"
            daemon.wait(timeout=60)
        log = [*TAGD, "log", STREAM, "--db", str(asrun), "--format", "jsonl"]
        result = subprocess.run(log, capture_output=True, text=True, check=True, cwd=REPO)
    offset = first["captured_at"] - first["window"]["end_s"]
    found = []
    for record in map(json.loads, result.stdout.splitlines()):
        if record["tag"] != "speech":
            continue
        start, end = unix(record["start"]) - offset, unix(record["end"]) - offset
        if record["ended"] == "stop":  # on at the end: the daemon ends it at its last
            end = duration  # window's end, `tagd tag` at the file's (docs/timeline.md)
        found.append((start, end))
    return found


def wait_ready(daemon: subprocess.Popen) -> None:
    assert daemon.stderr is not None
    for line in daemon.stderr:
        if b"ready" in line:
            threading.Thread(target=daemon.stderr.read, daemon=True).start()  # drained
            return
    raise RuntimeError("tagd serve did not start")


def feed(path: Path, port: int, publish: int, speed: float) -> dict:
    """Send ``path``'s 16-bit samples as stream STREAM at ``speed`` times real time (the
    multi-stream protocol, docs/inputs.md); return the tags message of its first window."""
    import zmq

    context = zmq.Context()
    push, sub = context.socket(zmq.PUSH), context.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{publish}")
    sub.setsockopt(zmq.SUBSCRIBE, f"tags.{STREAM}".encode())
    push.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.5)  # the SUB's subscription reaches tagd before the first window
    samples, rate = soundfile.read(path, dtype="int16")
    chunk = round(rate * FEED_CHUNK_S)
    started = time.monotonic()
    for seq, at in enumerate(range(0, len(samples), chunk)):
        header = {"format": "s16le", "rate": rate, "channels": 1, "seq": seq}
        push.send_multipart(
            [STREAM.encode(), json.dumps(header).encode(), samples[at : at + chunk]]
        )
        time.sleep(max(0.0, started + (seq + 1) * FEED_CHUNK_S / speed - time.monotonic()))
    first = json.loads(sub.recv_multipart()[-1])  # the first window's, long since sent
    time.sleep(2.0)  # the last windows' inference
    push.close(linger=2000)
    sub.close(linger=0)
    context.term()
    return first


def unix(value) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def agreement(a, b, duration: float) -> dict:
    errors = boundary_errors(a, b, duration)
    return {
        "same_count": len(a) == len(b),
        "boundary_median_s": float(np.median(errors)) if errors else None,
        "boundary_max_s": float(np.max(errors)) if errors else None,
        "frame_agreement": float(np.mean(frames(a, duration) == frames(b, duration))),
    }


def peak_rss_and_time(command: list[str]) -> tuple[float, float]:
    """MB and seconds of ``command`` run in a fresh wrapper (its own children's peak)."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True
    )
    seconds, rss_kb = out.stdout.split()
    return float(rss_kb) / 1024, float(seconds)


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")]
        return f"{names[0]}, {os.cpu_count()} CPUs" if names else platform.processor()
    except OSError:
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, required=True, help="a model with a speech tag")
    parser.add_argument("--minutes", type=float, default=10.0, help="the programme's length")
    parser.add_argument("--long-minutes", type=float, default=180.0, help="0: skip")
    parser.add_argument("--hop", default=None, help="seconds between windows [the card's]")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-serve", action="store_true", help="skip the tagd serve run")
    parser.add_argument(
        "--serve-speed", type=float, default=1.0, help="tagd serve's feed, times real time"
    )
    args = parser.parse_args()

    print(f"CPU: {cpu_name()}; model {args.engine}; hop {args.hop or 'the card'}'s")
    with tempfile.TemporaryDirectory(prefix="tagd-timeline-") as tmp:
        folder = Path(tmp)
        programme = folder / "programme.wav"
        truth = build_programme(args.minutes, args.seed, programme)
        duration = soundfile.info(programme).duration
        print(f"programme: {duration / 60:.1f} min, {len(truth)} speech turns")
        tagged = tag_timeline(args.engine, programme, args.hop)
        print("tagd tag --timeline:", json.dumps(figures(truth, tagged, duration)))
        if not args.no_serve:
            served = serve_timeline(args.engine, programme, args.hop, args.serve_speed, duration)
            print("tagd serve (as-run):", json.dumps(figures(truth, served, duration)))
            print("serve vs tag:", json.dumps(agreement(tagged, served, duration)))
        if args.long_minutes:
            long_file = folder / "long.mp3"
            loops = int(args.long_minutes * 60 // duration) + 1
            subprocess.run(
                ["ffmpeg", "-v", "error", "-stream_loop", str(loops), "-i", str(programme)]
                + ["-t", str(args.long_minutes * 60), "-b:a", "128k", str(long_file)],
                check=True,
            )
            base = [*TAGD, "tag", str(long_file), "--engine", str(args.engine)]
            base += ["--hop", args.hop] if args.hop else []
            plain_mb, plain_s = peak_rss_and_time(base)
            timeline_mb, timeline_s = peak_rss_and_time([*base, "--timeline"])
            print(
                f"{args.long_minutes:.0f} min mp3: tagd tag {plain_s:.1f} s, {plain_mb:.0f} MB peak; "
                f"--timeline {timeline_s:.1f} s ({timeline_s / plain_s - 1:+.1%}), "
                f"{timeline_mb:.0f} MB peak"
            )


if __name__ == "__main__":
    main()
