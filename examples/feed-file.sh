#!/usr/bin/env bash
# Feed an audio file to tagd in real time: ffmpeg decodes it and publishes raw PCM on
# ZeroMQ, where tagd's input
#   zmq+raw://127.0.0.1:5555?format=s16le&rate=44100&channels=2&stream=radio1
# (deploy/systemd/tagd.toml) connects to it.
# Usage: examples/feed-file.sh FILE [tcp://HOST:PORT]     (default tcp://127.0.0.1:5555)
set -euo pipefail
file=${1:?usage: feed-file.sh FILE [tcp://HOST:PORT]}
endpoint=${2:-tcp://127.0.0.1:5555}
# -re reads at the file's own pace: tagd sees what a live stream would give it.
exec ffmpeg -nostdin -hide_banner -loglevel warning -re -i "$file" \
    -vn -f s16le -ar 44100 -ac 2 "zmq:$endpoint"
