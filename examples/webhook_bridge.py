"""Post tagd's tag events to an HTTP webhook as JSON, one POST per event.

Usage: python examples/webhook_bridge.py TAGD_ENDPOINT WEBHOOK_URL [STREAM ...]
e.g.   python examples/webhook_bridge.py tcp://127.0.0.1:5560 https://radio.example.org/hooks/tagd
       WEBHOOK_HEADER="X-API-Key: secret" python examples/webhook_bridge.py ...   (adds a header)

Every ``events.<stream>`` message (docs/topics.md: stream, tag, state "on"/"off", score,
threshold, window, published_at) is posted unchanged with Content-Type
application/json, which is what AzuraCast-style automation and most webhook receivers
take. A failed POST is logged and that event dropped: a webhook that is down must not
hold back the next event. Needs pyzmq only.
"""

import contextlib
import json
import logging
import os
import sys
import urllib.error
import urllib.request

import zmq

TIMEOUT_S = 5.0
log = logging.getLogger("webhook_bridge")


def post_json(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", **headers}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return response.status


def extra_headers() -> dict[str, str]:
    header = os.environ.get("WEBHOOK_HEADER", "")
    if not header:
        return {}
    name, _, value = header.partition(":")
    return {name.strip(): value.strip()}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    endpoint, url, streams = sys.argv[1], sys.argv[2], sys.argv[3:]
    wanted = {f"events.{name}" for name in streams}
    headers = extra_headers()
    context = zmq.Context()
    try:
        forward(context, endpoint, url, wanted, headers)
    finally:
        context.destroy(linger=0)  # sockets closed now, not by the interpreter's exit


def forward(context: zmq.Context, endpoint: str, url: str, wanted: set[str], headers: dict) -> None:
    """Post every event of the ``wanted`` topics (all when empty) to ``url``, for ever."""
    socket = context.socket(zmq.SUB)
    for prefix in sorted(wanted) or ["events."]:
        socket.setsockopt_string(zmq.SUBSCRIBE, prefix)
    socket.connect(endpoint)
    log.info("posting events from %s to %s", endpoint, url)
    while True:
        frames = socket.recv_multipart()
        if len(frames) != 2 or (wanted and frames[0].decode() not in wanted):
            continue  # not a tagd message, or a stream whose name only starts alike
        event = json.loads(frames[1])
        what = f"{event['stream']} {event['tag']} {event['state']}"
        try:
            status = post_json(url, frames[1], headers)
        except (urllib.error.URLError, OSError) as exc:  # HTTPError too: 4xx and 5xx
            log.warning("%s: POST %s failed (%s); event dropped", what, url, exc)
            continue
        log.info("%s: posted, HTTP %d", what, status)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
