"""Send audio files to `tagd serve` as named live streams (docs/protocol.md), in real time.

Usage: python examples/producer.py tcp://127.0.0.1:5571 radio1=one.wav radio2=two.flac
with:  tagd serve --engine fcn4.onnx --input zmq+pull://127.0.0.1:5571
When tagd has [security] (docs/operations.md), set TAGD_SERVER_KEY=server.key (tagd's
public key) and TAGD_CLIENT_KEY=NAME.key_secret (this producer's, allowed by tagd).
"""

import json
import os
import sys
import time

import soundfile
import zmq

endpoint, streams = sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:])
push = zmq.Context().socket(zmq.PUSH)
if os.environ.get("TAGD_SERVER_KEY"):  # CURVE: encrypted, and only allowed keys get in
    import zmq.auth

    push.curve_serverkey = zmq.auth.load_certificate(os.environ["TAGD_SERVER_KEY"])[0]
    push.curve_publickey, push.curve_secretkey = zmq.auth.load_certificate(
        os.environ["TAGD_CLIENT_KEY"]
    )
push.connect(endpoint)  # tagd's zmq+pull input binds; PUSH queues until it is there
audio = {name: soundfile.read(path, dtype="<i2", always_2d=True) for name, path in streams.items()}
start, tick = time.time(), 0.1  # one message per stream every 100 ms
for seq in range(int(max(len(pcm) / rate for pcm, rate in audio.values()) / tick) + 1):
    for name, (pcm, rate) in audio.items():
        chunk = pcm[round(seq * tick * rate) : round((seq + 1) * tick * rate)]
        header = {"format": "s16le", "rate": rate, "channels": pcm.shape[1], "seq": seq}
        if len(chunk):
            push.send_multipart([name.encode(), json.dumps(header).encode(), chunk.tobytes()])
    time.sleep(max(0.0, start + (seq + 1) * tick - time.time()))
push.close(linger=2000)  # let the last messages leave
