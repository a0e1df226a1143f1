#!/usr/bin/env bash
# Feed an Icecast/HTTP stream (mp3, aac, ogg, HLS ...) to tagd: ffmpeg decodes it and
# publishes raw PCM on ZeroMQ for tagd's input
#   zmq+raw://127.0.0.1:5555?format=s16le&rate=44100&channels=2&stream=radio1
# Usage: examples/feed-url.sh URL [tcp://HOST:PORT]       (default tcp://127.0.0.1:5555)
set -euo pipefail
url=${1:?usage: feed-url.sh URL [tcp://HOST:PORT]}
endpoint=${2:-tcp://127.0.0.1:5555}
# A live stream paces itself (no -re); reconnect when the server drops the connection.
exec ffmpeg -nostdin -hide_banner -loglevel warning \
    -reconnect 1 -reconnect_streamed 1 -reconnect_delay_max 10 -i "$url" \
    -vn -f s16le -ar 44100 -ac 2 "zmq:$endpoint"
