#!/usr/bin/env bash
# Feed an ALSA capture device (a studio line-in, a loopback) to tagd through ffmpeg, for
# tagd's input
#   zmq+raw://127.0.0.1:5555?format=s16le&rate=44100&channels=2&stream=radio1
# `arecord -L` lists the devices. tagd can also open a soundcard itself (soundcard://).
# Usage: examples/feed-alsa.sh [DEVICE] [tcp://HOST:PORT]  (default: default, tcp://127.0.0.1:5555)
set -euo pipefail
device=${1:-default}
endpoint=${2:-tcp://127.0.0.1:5555}
exec ffmpeg -nostdin -hide_banner -loglevel warning \
    -f alsa -channels 2 -sample_rate 48000 -i "$device" \
    -f s16le -ar 44100 -ac 2 "zmq:$endpoint"
