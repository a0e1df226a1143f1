"""How close timeline boundaries are: `tagd tag --timeline` and `tagd serve` on a broadcast.

    .venv/bin/python bench/timeline.py --engine demo/fcn5.onnx [--minutes 10] [--long-minutes 30]

1. Builds a broadcast-like programme whose true timeline is known: music rendered by the
   trainer (trainer/data/rendered.py: General MIDI through FluidSynth) for 20-90 s,
   taking turns with espeak-ng speech for 10-40 s, every other speech turn over a music
   bed (ducked, as a presenter over a bed). Speech, with or without a bed, is "speech";
   the rest "music".
2. Runs `tagd tag --timeline --tags speech` on it, and `tagd serve` into its as-run log
   (``--asrun``), read back with `tagd log`: fed the file's own samples over zmq+pull
   (``--serve-speed`` times real time), or by ffmpeg ``-re`` into zmq+raw (``--feed
   ffmpeg``). The log's wall-clock times are put back on the stream's clock by the
   offset of its first window (its tags message carries the window's position and its
   capture time).
3. Prints, for both: each true speech/music boundary's distance to the nearest speech
   boundary found (median, p90), the frame accuracy (0.1 s frames, speech or not), and
   how far the two timelines agree; for `tagd tag`, each boundary's signed error and the
   share of the window speech filled where the score crossed its placement level. `tagd tag`
   runs with both edge placements (``--edges threshold``, then the default ``level``:
   docs/timeline.md), the per-boundary lines are the default's.
4. Loops the programme to ``--long-minutes`` (an mp3) and prints peak RSS and wall time
   of `tagd tag --timeline` against plain `tagd tag` on that file, in the same run,
   taking turns ``--repeats`` times (``--long-only``: this part alone).

It needs a model with a ``speech`` tag that hears speech: README's first steps make one
(demo/fcn5.onnx). The CPU is printed (lscpu's model name); only figures of one run compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

from machine import cpu  # noqa: E402  (bench/machine.py)
from support import free_port  # noqa: E402

from tagd.engines import backend_of  # noqa: E402
from trainer.data import rendered  # noqa: E402

RATE = 22_050  # the programme's rate; ffmpeg and tagd resample it as a station's audio
MUSIC_S = (20.0, 90.0)
SPEECH_S = (10.0, 40.0)
FRAME_S = 0.1  # frame accuracy's resolution
FILE_EDGE_S = 0.5  # an edge this near the file's start or end is the file's, no boundary
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


def build_programme(
    minutes: float, seed: int, path: Path
) -> tuple[list[tuple[float, float]], list[bool]]:
    """Write the programme to ``path``; return its true speech intervals (seconds) and
    whether each is over a music bed."""
    rng = np.random.default_rng(seed)
    parts, speech, beds, at, turn = [], [], [], 0.0, 0
    while at < minutes * 60:
        talking = turn % 2 == 1
        seconds = float(rng.uniform(*(SPEECH_S if talking else MUSIC_S)))
        piece = music_piece(1000 * seed + turn, seed, seconds)
        if talking:
            words = rendered._sentences(rng, seconds)
            bed = turn % 4 == 3  # every other speech turn over a music bed
            piece = dataclasses.replace(piece, speech=words, tracks=piece.tracks if bed else ())
            speech.append((at, at + seconds))
            beds.append(bed)
        audio = rendered.render(piece, seconds, RATE)
        parts.append(audio.astype(np.float32))
        at += seconds
        turn += 1
        print(f"  rendered {at / 60:5.1f} of {minutes:.1f} min", end="\r", file=sys.stderr)
    print(file=sys.stderr)
    soundfile.write(path, np.concatenate(parts), RATE)
    return speech, beds


# -- measuring ----------------------------------------------------------------------------------
def boundaries(intervals: list[tuple[float, float]], duration: float) -> list[float]:
    """The edges of ``intervals`` that lie inside the file (not at its start or end)."""
    return [
        t for interval in intervals for t in interval if FILE_EDGE_S < t < duration - FILE_EDGE_S
    ]


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


def each_boundary(truth, beds, found, duration: float, window_s: float) -> list[str]:
    """A line per true boundary: which edge, over a bed or not, the signed error of the
    nearest found edge (+: found later), and how much of a window the speech filled
    in the window centred on the found edge, where the score crossed the level the edge
    was placed at (0.5 + error / window at an onset, 0.5 - error / window at an end)."""
    edges = np.asarray(boundaries(found, duration) or [np.inf])
    lines = []
    for (start, end), bed in zip(truth, beds, strict=True):
        for kind, t in (("on", start), ("off", end)):
            if not FILE_EDGE_S < t < duration - FILE_EDGE_S:
                continue
            error = float(edges[np.argmin(np.abs(edges - t))] - t)
            fill = 0.5 + error / window_s if kind == "on" else 0.5 - error / window_s
            where = "over a bed" if bed else "alone"
            lines.append(
                f"  speech {kind:3s} at {t:6.1f} s ({where:10s}): {error:+6.1f} s, "
                f"speech filled {fill:.0%} of the window"
            )
    return lines


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
def tag_timeline(
    engine: Path, path: Path, hop: str | None, edges: str = "level"
) -> list[tuple[float, float]]:
    command = [*TAGD, "tag", str(path), "--engine", str(engine), "--timeline"]
    command += ["--format", "jsonl", "--tags", "speech", "--edges", edges]
    command += ["--hop", hop] if hop else []
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return [(r["start"], r["end"]) for r in map(json.loads, result.stdout.splitlines())]


def serve_timeline(
    engine: Path, path: Path, hop: str | None, how: str, speed: float, duration: float
) -> list:
    """`tagd serve` with an as-run log, fed ``path`` (``how``: ``pull``, the file's own
    samples over zmq+pull at ``speed`` times real time; ``ffmpeg``, ffmpeg ``-re`` into a
    zmq+raw input at the file's own rate); its speech records on the stream's own clock.

    The log places stream time on the wall clock by the capture time of the epoch's first
    window (tagd.asrun.StreamClock); the tags message of that window carries both, so
    the offset is taken off exactly. Fed by zmq+pull the daemon gets the file's samples
    from the first (a PUSH socket queues until tagd connects), as `tagd tag` decodes
    them; ffmpeg's PUB sends before tagd's SUB has joined, so its stream starts a little
    into the file (docs/timeline.md)."""
    port, publish = free_port(), free_port()
    rate = soundfile.info(path).samplerate
    inputs = {
        "pull": f"zmq+pull://127.0.0.1:{port}",
        "ffmpeg": f"zmq+raw://127.0.0.1:{port}?format=s16le&rate={rate}&channels=1&stream={STREAM}",
    }
    with tempfile.TemporaryDirectory(prefix="tagd-timeline-serve-") as tmp:
        asrun = Path(tmp) / "asrun.db"
        serve = [*TAGD, "serve", "--engine", str(engine), "--asrun", str(asrun)]
        serve += ["--input", inputs[how], "--metrics", "off"]
        serve += ["--publish", f"tcp://127.0.0.1:{publish}", "--log-level", "info"]
        daemon = subprocess.Popen(serve + (["--hop", hop] if hop else []), cwd=REPO, stderr=PIPE)
        try:
            wait_ready(daemon)
            first = feed(path, how, port, publish, speed)
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


def feed(path: Path, how: str, port: int, publish: int, speed: float) -> dict:
    """Send ``path`` to tagd as stream STREAM; return the tags message of its first window."""
    import zmq

    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{publish}")
    sub.setsockopt(zmq.SUBSCRIBE, f"tags.{STREAM}".encode())
    time.sleep(0.5)  # the SUB's subscription reaches tagd before the first window
    if how == "ffmpeg":
        command = ["ffmpeg", "-v", "error", "-re", "-i", str(path), "-f", "s16le", "-ac", "1"]
        subprocess.run([*command, f"zmq:tcp://127.0.0.1:{port}"], check=True)
    else:
        push = context.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        push_samples(push, path, speed)
        push.close(linger=2000)
    first = json.loads(sub.recv_multipart()[-1])  # the first window's, long since sent
    time.sleep(2.0)  # the last windows' inference
    sub.close(linger=0)
    context.term()
    return first


def push_samples(push, path: Path, speed: float) -> None:
    """``path``'s 16-bit samples at ``speed`` times real time (the multi-stream protocol,
    docs/inputs.md)."""
    samples, rate = soundfile.read(path, dtype="int16")
    chunk = round(rate * FEED_CHUNK_S)
    started = time.monotonic()
    for seq, at in enumerate(range(0, len(samples), chunk)):
        header = {"format": "s16le", "rate": rate, "channels": 1, "seq": seq}
        push.send_multipart(
            [STREAM.encode(), json.dumps(header).encode(), samples[at : at + chunk]]
        )
        time.sleep(max(0.0, started + (seq + 1) * FEED_CHUNK_S / speed - time.monotonic()))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, required=True, help="a model with a speech tag")
    parser.add_argument("--minutes", type=float, default=10.0, help="the programme's length")
    parser.add_argument("--long-minutes", type=float, default=180.0, help="0: skip")
    parser.add_argument("--hop", default=None, help="seconds between windows [the card's]")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-serve", action="store_true", help="skip the tagd serve run")
    parser.add_argument(
        "--feed",
        choices=("pull", "ffmpeg"),
        default="pull",
        help="tagd serve's input: the file's samples over zmq+pull, or ffmpeg -re into zmq+raw",
    )
    parser.add_argument(
        "--serve-speed", type=float, default=1.0, help="--feed pull: times real time"
    )
    parser.add_argument("--long-only", action="store_true", help="only the long file's part")
    parser.add_argument("--repeats", type=int, default=1, help="long file: runs of each")
    args = parser.parse_args()

    print(f"CPU: {cpu()}; model {args.engine}; hop {args.hop or 'the card'}'s")
    with tempfile.TemporaryDirectory(prefix="tagd-timeline-") as tmp:
        folder = Path(tmp)
        programme = folder / "programme.wav"
        truth, beds = build_programme(args.minutes, args.seed, programme)
        duration = soundfile.info(programme).duration
        print(f"programme: {duration / 60:.1f} min, {len(truth)} speech turns")
        if not args.long_only:
            accuracy(args, programme, truth, beds, duration)
        if args.long_minutes:
            long_file(args, programme, duration, folder / "long.mp3")


def accuracy(args, programme: Path, truth, beds, duration: float) -> None:
    before = tag_timeline(args.engine, programme, args.hop, edges="threshold")
    print("tagd tag --timeline --edges threshold:", json.dumps(figures(truth, before, duration)))
    tagged = tag_timeline(args.engine, programme, args.hop)
    print("tagd tag --timeline (--edges level):", json.dumps(figures(truth, tagged, duration)))
    window_s = backend_of(args.engine).read_card(args.engine).window_seconds
    print("\n".join(each_boundary(truth, beds, tagged, duration, window_s)))
    if not args.no_serve:
        served = serve_timeline(
            args.engine, programme, args.hop, args.feed, args.serve_speed, duration
        )
        print("tagd serve (as-run):", json.dumps(figures(truth, served, duration)))
        print("serve vs tag:", json.dumps(agreement(tagged, served, duration)))


def long_file(args, programme: Path, duration: float, path: Path) -> None:
    """Peak RSS and wall time of plain `tagd tag` and of --timeline on the programme
    looped to ``--long-minutes`` (an mp3), taking turns ``--repeats`` times: the fastest
    of each, and the highest peak."""
    loops = int(args.long_minutes * 60 // duration) + 1
    subprocess.run(
        ["ffmpeg", "-v", "error", "-stream_loop", str(loops), "-i", str(programme)]
        + ["-t", str(args.long_minutes * 60), "-b:a", "128k", str(path)],
        check=True,
    )
    base = [*TAGD, "tag", str(path), "--engine", str(args.engine)]
    base += ["--hop", args.hop] if args.hop else []
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "timeline": []}
    for turn in range(args.repeats):
        for name, command in (("plain", base), ("timeline", [*base, "--timeline"])):
            runs[name].append(peak_rss_and_time(command))
            mb, seconds = runs[name][-1]
            print(f"  {name} #{turn + 1}: {seconds:.1f} s, {mb:.0f} MB peak", file=sys.stderr)
    (plain_mb, plain_s), (timeline_mb, timeline_s) = (
        (max(mb for mb, _ in runs[name]), min(s for _, s in runs[name])) for name in runs
    )
    print(
        f"{args.long_minutes:.0f} min mp3: tagd tag {plain_s:.1f} s, {plain_mb:.0f} MB peak; "
        f"--timeline {timeline_s:.1f} s ({timeline_s / plain_s - 1:+.1%}), "
        f"{timeline_mb:.0f} MB peak (fastest of {args.repeats})"
    )


if __name__ == "__main__":
    main()
