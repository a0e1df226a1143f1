"""Insert tagd's tags into Liquidsoap as metadata, through Liquidsoap's telnet server.

Usage: python examples/liquidsoap_bridge.py TAGD_ENDPOINT HOST:PORT STREAM=SOURCE_ID [...]
e.g.   python examples/liquidsoap_bridge.py tcp://127.0.0.1:5560 127.0.0.1:1234 radio1=live

In the Liquidsoap script (2.x):
    settings.server.telnet.set(true)         # the telnet server, on 127.0.0.1:1234
    live = insert_metadata(id="live", live)  # adds the server command live.insert

When the tags that are on for a stream change (``active`` in tags.<stream>, after tagd's
hysteresis; docs/topics.md), the bridge sends one line,
    live.insert tagd_tags="rock,guitar",tagd_model="fcn4"
and Liquidsoap replies "Done", then "END". Outputs downstream carry the new metadata.
Needs pyzmq only.
"""

import contextlib
import json
import logging
import socket
import sys

import zmq

log = logging.getLogger("liquidsoap_bridge")


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Telnet:
    """One connection to Liquidsoap's server, reopened when Liquidsoap restarts."""

    def __init__(self, host: str, port: int):
        self.address = (host, port)
        self.sock: socket.socket | None = None

    def command(self, line: str) -> list[str]:
        """Send one command line; return the reply's lines before "END"."""
        for attempt in (1, 2):
            try:
                if self.sock is None:
                    self.sock = socket.create_connection(self.address, timeout=5)
                    self.file = self.sock.makefile("rwb")
                self.file.write(line.encode() + b"\n")
                self.file.flush()
                reply = []
                while (raw := self.file.readline()) and raw.strip() != b"END":
                    reply.append(raw.decode().strip())
                if not raw:
                    raise ConnectionError("connection closed")
                return reply
            except OSError as exc:  # refused, reset, timed out, or closed by Liquidsoap
                if self.sock is not None:
                    self.sock.close()
                self.sock = None
                if attempt == 2:
                    raise ConnectionError(f"liquidsoap at {self.address}: {exc}") from exc
        return []


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    endpoint, server = sys.argv[1], sys.argv[2]
    sources = dict(arg.split("=", 1) for arg in sys.argv[3:])  # stream -> source id
    host, _, port = server.rpartition(":")
    telnet = Telnet(host, int(port))
    sub = zmq.Context().socket(zmq.SUB)
    for stream in sources:
        sub.setsockopt_string(zmq.SUBSCRIBE, f"tags.{stream}")
    sub.connect(endpoint)
    last: dict[str, list[str]] = {}  # the tags last inserted, per stream
    while True:
        frames = sub.recv_multipart()
        stream = frames[0].decode().removeprefix("tags.")
        if len(frames) != 2 or stream not in sources:
            continue  # tags.radio10 also matches the subscription tags.radio1
        message = json.loads(frames[1])
        if last.get(stream) == message["active"]:
            continue
        fields = {"tagd_tags": ",".join(message["active"]), "tagd_model": message["model"]}
        line = f"{sources[stream]}.insert " + ",".join(f"{k}={quote(v)}" for k, v in fields.items())
        try:
            reply = telnet.command(line)
        except ConnectionError as exc:
            log.warning("%s: not inserted: %s", stream, exc)
            continue
        if reply != ["Done"]:
            log.warning("%s: liquidsoap replied %r to %s", stream, reply, line)
        log.info("%s: %s", stream, line)
        last[stream] = message["active"]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
