"""Print what `tagd serve` publishes: the smallest consumer worth copying.

Usage: python examples/subscriber.py [tcp://127.0.0.1:5560] [STREAM ...]

tagd publishes multipart [topic, JSON] messages on a ZeroMQ PUB socket (docs/topics.md):
``tags.<stream>`` after every window (scores, the tags over threshold, the tags on after
hysteresis) and ``events.<stream>`` when a tag turns on or off. ZeroMQ matches
subscriptions by prefix (``tags.radio1`` also matches ``tags.radio10``), so the topic is
checked exactly here. Needs pyzmq only.
"""

import json
import sys

import zmq

KINDS = ("tags", "events")


def subscribe(context: zmq.Context, endpoint: str, streams: list[str]) -> zmq.Socket:
    socket = context.socket(zmq.SUB)
    prefixes = [f"{kind}.{name}" for kind in KINDS for name in streams] or [f"{k}." for k in KINDS]
    for prefix in prefixes:
        socket.setsockopt_string(zmq.SUBSCRIBE, prefix)
    socket.connect(endpoint)  # ZeroMQ reconnects by itself if tagd restarts
    return socket


def describe(topic: str, message: dict) -> str:
    if topic.startswith("events."):
        return f"{message['stream']} {message['tag']} {message['state']} ({message['score']:.2f})"
    top = sorted(message["scores"].items(), key=lambda item: -item[1])[:3]
    scores = ", ".join(f"{tag} {score:.2f}" for tag, score in top)
    active = ", ".join(message["active"]) or "-"
    return f"{message['stream']} #{message['seq']} on: {active}  top: {scores}"


def main() -> None:
    endpoint = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5560"
    streams = sys.argv[2:]
    wanted = {f"{kind}.{name}" for kind in KINDS for name in streams}
    context = zmq.Context()
    socket = subscribe(context, endpoint, streams)
    try:
        while True:
            frames = socket.recv_multipart()
            if len(frames) != 2:
                continue  # not a tagd message
            topic = frames[0].decode()
            if wanted and topic not in wanted:
                continue
            print(describe(topic, json.loads(frames[1])), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        context.destroy(linger=0)  # sockets closed now, not by the interpreter's exit


if __name__ == "__main__":
    main()
