"""One as-run log for many tagd daemons: collect their segments into a database elsewhere.

Usage: python examples/asrun_collector.py DB ENDPOINT [ENDPOINT ...] [--idle-after SECONDS]
       [--server-key tagd.key --key collector.key_secret]

Each `tagd serve` can keep its own as-run log ([asrun] path, docs/deploy.md). Where a
station group wants every stream's segments in one place (an archive host, the
compliance office), this runs there: it subscribes to ``tags.`` on every daemon given
(ZeroMQ reconnects by itself when one restarts), follows each stream's predictions with
tagd's own ``Segmenter`` and writes what ends through tagd's own ``AsRunLog`` into DB.
So DB has the schema of a daemon's log, and ``tagd log STREAM --db DB`` prints it.
One line per segment written goes to stdout.

The tags messages carry what the daemon's own log is made of: the window in stream
time, its capture time (``captured_at``), every score, the tags over threshold and those
on after hysteresis (``active``, docs/topics.md); a tag entering or leaving ``active`` is
the daemon's on or off event. A stream that sends nothing for ``--idle-after`` seconds
(the daemon's ``limits.idle_after_s`` or more) has its segments ended, as the daemon
does when the stream goes idle. What a subscriber misses (a restart of this collector,
a queue at ``publish.sndhwm``) it cannot see: a segment spanning the gap is joined or
cut there; the daemons' own logs stay complete.

Daemons with ``[security]`` (CURVE, docs/operations.md) let in only the clients whose
public key they list: give ``--server-key`` (the daemons' public ``.key``) and ``--key``
(this collector's ``.key_secret`` from ``tagd keys generate``, its ``.key`` copied into
each daemon's ``curve_allowed_clients``), as ``tagd listen`` takes them. Every endpoint
then needs that server key: daemons with different keys need a collector each.

Needs tagd installed on that host (``pip install tagd``: no PyTorch) and pyzmq.
"""

import argparse
import itertools
import json
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from tagd.asrun import ENDED_IDLE, ENDED_OFF, ENDED_STOP, AsRunLog, Record, StreamClock, iso_utc
from tagd.metrics import Metrics
from tagd.sockets import SecurityError, secure_client
from tagd.tagger import OFF, ON, Prediction, TagEvent
from tagd.timeline import Segmenter

POSITIONS_PER_S = 1000  # stream positions in milliseconds: the messages' own precision
EPOCH_JUMP_S = 1.0  # a capture-time offset that moves this much: the stream restarted
POLL_MS = 500


@dataclass
class Followed:
    """What the collector keeps of one stream."""

    segmenter: Segmenter  # of the stream's own model's tags
    epoch: int
    offset: float  # captured_at - end_s: where stream time lies on the wall clock
    active: list[str] = field(default_factory=list)  # tags on in its last message
    heard: float = 0.0  # time.monotonic() of its last message


class Collector:
    """Segments from the tags messages of any number of streams, into an AsRunLog."""

    def __init__(self, asrun: AsRunLog, idle_after_s: float) -> None:
        self.asrun = asrun
        self.idle_after_s = idle_after_s
        self.clock = StreamClock()
        self.streams: dict[str, Followed] = {}
        self.epochs = itertools.count(1)

    def take(self, message: dict) -> None:
        name, window, scores = message["stream"], message["window"], message["scores"]
        offset = message["captured_at"] - window["end_s"]
        stream = self.streams.get(name)
        if stream is None:
            stream = Followed(Segmenter(list(scores), POSITIONS_PER_S), next(self.epochs), offset)
            self.streams[name] = stream
        elif abs(offset - stream.offset) > EPOCH_JUMP_S:
            stream.epoch, stream.offset = next(self.epochs), offset
        self.clock.note(
            name, stream.epoch, window["start_s"], window["end_s"], offset + window["end_s"]
        )
        active = message["active"]
        turned = [TagEvent(t, OFF, scores[t], 0.0) for t in stream.active if t not in active]
        turned += [TagEvent(t, ON, scores[t], 0.0) for t in active if t not in stream.active]
        prediction = Prediction(
            stream=name,
            seq=message["seq"],
            start=round(window["start_s"] * POSITIONS_PER_S),
            end=round(window["end_s"] * POSITIONS_PER_S),
            segments=window["segments"],
            scores=np.array(list(scores.values()), dtype=np.float32),
            over=message["tags"],
            active=active,
            events=turned,
        )
        stream.active, stream.heard = active, time.monotonic()
        self.write(stream.segmenter.update(prediction), ENDED_OFF)

    def end_idle_streams(self) -> None:
        now = time.monotonic()
        for name, stream in list(self.streams.items()):
            if now - stream.heard >= self.idle_after_s:
                self.write(stream.segmenter.close(name), ENDED_IDLE)
                del self.streams[name]

    def end_all(self) -> None:
        for name, stream in self.streams.items():
            self.write(stream.segmenter.close(name), ENDED_STOP)

    def write(self, segments, ended: str) -> None:
        records = [Record.placed(s, self.clock, ended) for s in segments]
        self.asrun.put(records)
        for r in records:
            print(f"{r.stream} {r.tag} {iso_utc(r.start)} {iso_utc(r.end)} {r.ended}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", help="the SQLite file to write (created; appended to)")
    parser.add_argument("endpoints", nargs="+", help="tagd's publish endpoints")
    parser.add_argument("--idle-after", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--server-key", metavar="FILE", help="CURVE: the daemons' public key")
    parser.add_argument("--key", metavar="FILE", help="CURVE: this collector's .key_secret")
    args = parser.parse_args()
    if bool(args.server_key) != bool(args.key):
        parser.error("CURVE needs both --server-key and --key")

    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    if args.server_key:
        try:
            secure_client(socket, args.server_key, args.key)
        except SecurityError as exc:
            parser.exit(2, f"asrun_collector.py: {exc}\n")
    asrun = AsRunLog(args.db, Metrics())
    asrun.start()
    collector = Collector(asrun, args.idle_after)
    socket.setsockopt_string(zmq.SUBSCRIBE, "tags.")
    for endpoint in args.endpoints:
        socket.connect(endpoint)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    while not stopping:
        if socket.poll(POLL_MS):
            topic, body = socket.recv_multipart()
            message = json.loads(body)
            if topic.decode() == f"tags.{message['stream']}":  # prefixes match more
                collector.take(message)
        collector.end_idle_streams()
    collector.end_all()
    asrun.close(timeout=5.0)
    socket.close(linger=0)
    context.term()


if __name__ == "__main__":
    main()
