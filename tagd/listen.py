"""`tagd listen ENDPOINT`: print what `tagd serve` publishes, for a person.

Subscribes to ``tags.<stream>`` and ``events.<stream>`` (all streams, or those named
with ``--stream``) and prints one line per message; ``--json`` prints the messages
themselves, one per line, for piping into jq.
"""

from __future__ import annotations

import json
import sys
import time

import click
import zmq

from tagd.publish import EVENTS_TOPIC, TAGS_TOPIC

TOP_TAGS_SHOWN = 5


def format_tags(message: dict) -> str:
    window = message["window"]
    ranked = sorted(message["scores"].items(), key=lambda item: -item[1])[:TOP_TAGS_SHOWN]
    over = set(message.get("tags", []))
    shown = ", ".join(f"{'*' if tag in over else ''}{tag} {score:.2f}" for tag, score in ranked)
    return (
        f"{_clock(message['published_at'])} {message['stream']} #{message['seq']} "
        f"[{window['start_s']:.1f}-{window['end_s']:.1f} s] "
        f"{message['latency_ms']['total']:.0f} ms  {shown}"
    )


def format_event(message: dict) -> str:
    relation = ">=" if message["state"] == "on" else "<"
    return (
        f"{_clock(message['published_at'])} {message['stream']} #{message['seq']} "
        f"{message['tag']} {message['state'].upper()} "
        f"({message['score']:.2f} {relation} {message['threshold']:.2f}"
        f"{'' if message['state'] == 'on' else ' - margin'})"
    )


def _clock(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix)) + f".{int(unix % 1 * 1000):03d}"


@click.command()
@click.argument("endpoint", default="tcp://127.0.0.1:5560")
@click.option("--stream", "streams", multiple=True, help="Only this stream (repeatable).")
@click.option("--events-only", is_flag=True, help="Only tag on/off events.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON messages, one per line.")
@click.option("--count", type=click.IntRange(min=1), help="Exit after this many messages.")
@click.option("--timeout", type=float, help="Exit 1 if nothing arrives for this many seconds.")
@click.option(
    "--server-key",
    type=click.Path(exists=True, dir_okay=False),
    help="CURVE: tagd's public key file (NAME.key), when tagd has [security].",
)
@click.option(
    "--key",
    type=click.Path(exists=True, dir_okay=False),
    help="CURVE: this listener's NAME.key_secret; its NAME.key must be allowed.",
)
def listen(
    endpoint: str,
    streams: tuple[str, ...],
    events_only: bool,
    as_json: bool,
    count: int | None,
    timeout: float | None,
    server_key: str | None,
    key: str | None,
) -> None:
    """Print the tags and events published on ENDPOINT [tcp://127.0.0.1:5560]."""
    kinds = [EVENTS_TOPIC] if events_only else [TAGS_TOPIC, EVENTS_TOPIC]
    wanted = {f"{kind}.{name}" for kind in kinds for name in streams}
    if bool(server_key) != bool(key):
        raise click.UsageError("CURVE needs both --server-key and --key")
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    if server_key:
        from tagd.sockets import SecurityError, secure_client

        try:
            secure_client(socket, server_key, key)
        except SecurityError as exc:
            raise click.ClickException(str(exc)) from None
    # Prefixes match more than one stream (tags.radio1 matches tags.radio10): filter exactly below.
    for prefix in sorted(wanted) or [f"{kind}." for kind in kinds]:
        socket.setsockopt_string(zmq.SUBSCRIBE, prefix)
    socket.connect(endpoint)
    received = 0
    try:
        while count is None or received < count:
            if timeout is not None and not socket.poll(int(timeout * 1000)):
                click.echo(f"tagd listen: nothing from {endpoint} for {timeout:g} s", err=True)
                sys.exit(1)
            frames = socket.recv_multipart()
            if len(frames) != 2:
                continue
            name = frames[0].decode("utf-8", errors="replace")
            if wanted and name not in wanted:
                continue
            received += 1
            if as_json:
                click.echo(frames[1].decode("utf-8", errors="replace"))
                continue
            message = json.loads(frames[1])
            line = (
                format_event(message)
                if name.startswith(EVENTS_TOPIC + ".")
                else format_tags(message)
            )
            click.echo(line)
    except KeyboardInterrupt:
        pass
    finally:
        socket.close()
        context.term()
