"""10^5 generated messages, malformed and valid, at one running daemon over a real socket.

Hypothesis draws each example's mix of faults and a seed; the messages themselves are
generated in bulk from the seed (hypothesis could not draw 10^5 of them one by one) and
sent over one PUSH socket to the `zmq+pull` input of one in-process Server, which runs
for the whole test. One socket keeps the order, so the test knows what the daemon saw
and can say exactly what each counter must read.

Each example carries three valid streams among the faults: ``a`` (clean s16le stereo at
16 kHz, with repeats and late copies of its messages mixed in), ``d`` (f32le mono with
NaN, Inf and out-of-range samples) and ``g`` (s16le mono with sequence gaps: short ones
spliced, one long one that restarts the window). Afterwards the daemon must be alive and
ready, every refusal counted under its reason, the valid streams' audio counted to the
sample, and their scores equal to the engine's on the windows of a clean run: the same
audio in one piece (``d`` cleaned; ``g`` cut where its long gap restarted it).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
import zmq
from audio_fixtures import make_music
from support import (
    SHORT_FCN,
    Listener,
    make_config,
    reference_windows,
    s16le,
    scrape,
    serving,
    socket_port,
    wait_for,
)

from tagd.metrics import MALFORMED_REASONS
from tagd.stream import Arrival, ReadyWindow, Stream

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MESSAGES_PER_EXAMPLE = 5_000
EXAMPLES = 21  # 21 x 5,000 > 10^5 with the valid streams' messages
MAX_STREAMS = 12
MAX_MESSAGE_BYTES = 16_384
MAX_SPLICED_GAP_S = 0.5
MODEL_RATE = 12_000  # the short FCN-4's card: streams at this rate are not resampled
HOP_S = 0.5
BAD_KINDS = (
    "too_large",
    "frames",
    "stream_id",
    "header",
    "format",
    "rate",
    "channels",
    "pcm",
    "flood",
    "out_of_order",
)

# -- the valid streams -----------------------------------------------------------------------


def chunk_sizes(rng: np.random.Generator, total: int, low: int, high: int) -> list[int]:
    sizes = []
    while total > 0:
        size = min(total, int(rng.integers(low, high)))
        sizes.append(size)
        total -= size
    return sizes


def header(fmt: str, rate: int, channels: int, **extra) -> bytes:
    return json.dumps({"format": fmt, "rate": rate, "channels": channels, **extra}).encode()


class ValidStreams:
    """This example's three valid streams: their messages and what a clean run makes of them."""

    def __init__(self, prefix: str, rng: np.random.Generator):
        self.names = {"a": f"{prefix}a", "d": f"{prefix}d", "g": f"{prefix}g"}
        seed = int(rng.integers(1 << 30))
        # a: s16le stereo at 16 kHz, resampled by the daemon
        stereo = np.stack(
            [make_music(3.0, 16_000, seed=seed), make_music(3.0, 16_000, seed=seed + 1)], 1
        )
        self.a_pcm = s16le(stereo)
        self.a = self._split(self.names["a"], self.a_pcm, 4, rng, ("s16le", 16_000, 2))
        # d: f32le mono with NaN, ±Inf and out-of-range samples; the clean run gets them cleaned
        clean = make_music(3.0, MODEL_RATE, seed=seed + 2)
        dirty = clean.copy()
        spots = rng.choice(len(clean), size=60, replace=False)
        nan, inf, big = spots[:20], spots[20:35], spots[35:]
        dirty[nan] = np.nan
        dirty[inf] = np.where(rng.random(len(inf)) < 0.5, np.inf, -np.inf)
        dirty[big] = rng.uniform(1.5, 100.0, len(big)) * rng.choice([-1, 1], len(big))
        clean[nan], clean[inf], clean[big] = 0.0, np.sign(dirty[inf]), np.sign(dirty[big])
        self.d_clean = clean.astype("<f4").tobytes()
        self.d = self._split(
            self.names["d"], dirty.astype("<f4").tobytes(), 4, rng, ("f32le", MODEL_RATE, 1)
        )
        self.cleaned = {"nonfinite": len(nan) + len(inf), "out_of_range": len(big)}
        # g: 0.1 s messages of s16le mono; short gaps (spliced) and one long (restart)
        g_audio = make_music(8.0, MODEL_RATE, seed=seed + 3)
        per = MODEL_RATE // 10
        messages = [s16le(g_audio[i * per : (i + 1) * per]) for i in range(80)]
        long_gap = set(range(36, 44))  # 0.8 s lost: over max_spliced_gap_s
        short = {int(i) for i in rng.choice([*range(3, 33), *range(47, 77)], size=4, replace=False)}
        kept = [i for i in range(80) if i not in long_gap | short]
        self.g = [
            [self.names["g"].encode(), header("s16le", MODEL_RATE, 1, seq=i), messages[i]]
            for i in kept
        ]
        self.g_gaps = sum(1 for x, y in zip(kept, kept[1:], strict=False) if y != x + 1)
        self.g_segments = [
            b"".join(messages[i] for i in kept if i < 36),
            b"".join(messages[i] for i in kept if i > 36),
        ]
        self.audio_s = {
            "a": len(self.a_pcm) / 4 / 16_000,
            "d": len(self.d_clean) / 4 / MODEL_RATE,
            "g": len(kept) * per / MODEL_RATE,
        }

    @staticmethod
    def _split(name, payload, frame_bytes, rng, shape) -> list[list[bytes]]:
        fmt, rate, channels = shape
        frames = chunk_sizes(rng, len(payload) // frame_bytes, 50, 3000)
        out, offset = [], 0
        for seq, count in enumerate(frames):
            piece = payload[offset : offset + count * frame_bytes]
            out.append([name.encode(), header(fmt, rate, channels, seq=seq, t=time.time()), piece])
            offset += count * frame_bytes
        return out

    def expected_windows(self, geometry) -> dict[str, list[ReadyWindow]]:
        windows = {
            "a": reference_windows(self.a_pcm, 16_000, 2, geometry),
            "d": f32_windows(self.d_clean, geometry),
            "g": [],
        }
        position = 0  # g: each segment windowed on its own, stream time running on
        for segment in self.g_segments:
            samples = np.frombuffer(segment, "<i2").astype(np.float32) / 32768
            stream = Stream("ref", geometry, windows["g"].append, _quiet_metrics())
            stream._windower.restart_at(position)
            stream.push_frames(samples, MODEL_RATE, Arrival(0, 0))
            position += len(samples)
        return windows


def f32_windows(payload: bytes, geometry) -> list[ReadyWindow]:
    windows: list[ReadyWindow] = []
    Stream("ref", geometry, windows.append, _quiet_metrics()).push_pcm(
        payload, "f32le", MODEL_RATE, 1, Arrival(0, 0)
    )
    return windows


def _quiet_metrics():
    from tagd.metrics import Metrics

    return Metrics()


# -- the faults ---------------------------------------------------------------------------------

BAD_IDS = [b"", b"a.b", b"\xff\xfe", b"x" * 65, b"-lead", b"sp ace", b"_x", "é".encode(), b"a\x00"]
NOT_OBJECTS = [b"5", b"[1, 2]", b'"text"', b"null", b"true", b"[" * 2000 + b"]" * 2000, b" " * 5000]
BAD_FORMATS = ["mp3", "S16LE", "", 16, None, ["s16le"], {"f": 1}]
BAD_RATES = [0, -1, 999, 768_001, 10**12, "44100", 44100.0, True, None]
BAD_CHANNELS = [0, 65, -2, 2.0, "2", True, None, 10**9]
NO_BRACE = np.frombuffer(bytes(b for b in range(256) if b != ord("{")), np.uint8)


def bad_messages(
    kind: str, count: int, rng: np.random.Generator, ids: list[bytes], pool: bytes
) -> list[list[bytes]]:
    """``count`` messages that must each be refused as ``kind`` (flood and out_of_order aside)."""
    ok = header("s16le", 16_000, 2)

    def some_id() -> bytes:
        return ids[int(rng.integers(len(ids)))]

    def blob(low: int, high: int) -> bytes:
        size, start = int(rng.integers(low, high)), int(rng.integers(0, len(pool) - high))
        return pool[start : start + size]

    out = []
    for _ in range(count):
        pick = int(rng.integers(1 << 20))
        if kind == "too_large":  # every frame under ZMQ_MAXMSGSIZE, together over the limit
            name = some_id()
            overhead = len(name) + len(ok)
            extra = 4 * (pick % (overhead // 4 - 1))  # the PCM frame alone stays under it
            out.append([name, ok, pool[: MAX_MESSAGE_BYTES - overhead + 4 + extra]])
        elif kind == "frames":
            out.append([blob(1, 30) for _ in range((1, 2, 4, 5, 6)[pick % 5])])
        elif kind == "stream_id":
            out.append([BAD_IDS[pick % len(BAD_IDS)], ok, blob(4, 5)])
        elif kind == "header":
            variant = pick % 5
            if variant == 0:
                raw = rng.choice(NO_BRACE, int(rng.integers(1, 60))).tobytes()
            elif variant == 1:
                raw = NOT_OBJECTS[pick % len(NOT_OBJECTS)]
            elif variant == 2:
                fields = {"format": "s16le", "rate": 16_000, "channels": 2}
                for key in rng.choice(list(fields), int(rng.integers(1, 4)), replace=False):
                    del fields[key]
                raw = json.dumps(fields).encode()
            elif variant == 3:
                raw = header("s16le", 16_000, 2, seq=[-1, "x", 1.5, None][pick % 4])
            else:
                raw = header("s16le", 16_000, 2, t=["noon", True, None][pick % 3])
            out.append([some_id(), raw, pool[:400]])
        elif kind == "format":
            out.append(
                [some_id(), header(BAD_FORMATS[pick % len(BAD_FORMATS)], 16_000, 2), pool[:400]]
            )
        elif kind == "rate":
            out.append(
                [some_id(), header("s16le", BAD_RATES[pick % len(BAD_RATES)], 2), pool[:400]]
            )
        elif kind == "channels":
            out.append(
                [
                    some_id(),
                    header("s16le", 16_000, BAD_CHANNELS[pick % len(BAD_CHANNELS)]),
                    pool[:400],
                ]
            )
        elif kind == "pcm":  # empty, or not a whole number of 4-byte frames
            out.append(
                [some_id(), ok, b"" if pick % 4 == 0 else pool[: 4 * (pick % 100) + 1 + pick % 3]]
            )
        else:
            raise ValueError(kind)
    return out


def out_of_order_copies(messages: list[list[bytes]], count: int, rng: np.random.Generator):
    """``messages`` with ``count`` repeats (right after the original) or late copies
    (after one to five later messages) mixed in; never of seq 0, which means a restart."""
    after: dict[int, list[list[bytes]]] = {}
    for _ in range(count):
        k = int(rng.integers(1, len(messages)))
        late = k + 1 < len(messages) and rng.random() < 0.5
        slot = min(len(messages) - 1, k + int(rng.integers(1, 6))) if late else k
        after.setdefault(slot, []).append(messages[k])
    return [m for i, original in enumerate(messages) for m in (original, *after.get(i, []))]


# -- the daemon ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(export_model):
    model = export_model("fcn4", **SHORT_FCN)
    with socket_port() as port:
        config = make_config(
            model,
            [f"zmq+pull://127.0.0.1:{port}"],
            batching={"max_pending_per_stream": 100_000, "spread_phases": False},
            limits={
                "max_streams": MAX_STREAMS,
                "idle_after_s": 600.0,
                "evict_after_s": 600.0,
                "max_message_bytes": MAX_MESSAGE_BYTES,
                "max_spliced_gap_s": MAX_SPLICED_GAP_S,
            },
        )
    config.hop_seconds = HOP_S
    with serving(config) as server:
        listener = Listener(server, "tags.v")
        listener.socket.setsockopt(zmq.RCVHWM, 0)
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        yield server, push, listener, f"127.0.0.1:{port}"
        push.close(linger=0)
        context.term()
        listener.close()


def test_a_flood_of_generated_messages_never_hurts_the_valid_streams(daemon):
    server, push, listener, label = daemon
    geometry = server.hub.geometry
    sample = server.metrics.sample
    expected_refusals: Counter[str] = Counter()
    sent_messages = []

    def refused(reason: str) -> float:
        return sample("tagd_malformed_messages_total", {"input": label, "reason": reason}) or 0.0

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @example(weights=dict.fromkeys(BAD_KINDS, 1), seed=0)
    @given(
        weights=st.fixed_dictionaries({kind: st.integers(1, 10) for kind in BAD_KINDS}),
        seed=st.integers(0, 2**32 - 1),
    )
    def one_example(weights: dict[str, int], seed: int) -> None:
        rng = np.random.default_rng(seed)
        prefix = f"v{len(sent_messages)}"
        valid = ValidStreams(prefix, rng)
        pool = rng.bytes(1 << 16)
        budget = MESSAGES_PER_EXAMPLE - len(valid.a) - len(valid.d) - len(valid.g)
        share = np.array([weights[k] for k in BAD_KINDS], dtype=float)
        counts = dict(zip(BAD_KINDS, rng.multinomial(budget, share / share.sum()), strict=True))

        # Each stream keeps its own order; the rest lands anywhere. First messages go first,
        # so that the flood cannot take the valid streams' places.
        ooo = rng.multinomial(counts["out_of_order"], [0.5, 0.5])
        sequences = [
            out_of_order_copies(valid.a, int(ooo[0]), rng),
            out_of_order_copies(valid.d, int(ooo[1]), rng),
            valid.g,
        ]
        ids = [name.encode() for name in valid.names.values()] + [b"newcomer"]
        bad = []
        for kind in BAD_KINDS[:-2]:
            messages = bad_messages(kind, int(counts[kind]), rng, ids, pool)
            bad += messages
            expected_refusals[kind] += len(messages)
        flood = [
            [f"f{prefix}x{i}".encode(), header("s16le", MODEL_RATE, 1, seq=0), pool[:240]]
            for i in range(int(counts["flood"]))
        ]
        items = [(-1.0, seq[0]) for seq in sequences]
        for sequence in sequences:
            keys = np.sort(rng.random(len(sequence) - 1))
            items += list(zip(keys.tolist(), sequence[1:], strict=True))
        items += list(zip(rng.random(len(bad) + len(flood)).tolist(), bad + flood, strict=True))
        items.sort(key=lambda item: item[0])
        room = MAX_STREAMS - len(valid.names)
        flood_ids = {frames[0] for frames in flood}
        opened = [f[0].decode() for _, f in items if f[0] in flood_ids][:room]
        expected_refusals["too_many_streams"] += max(0, len(flood) - room)
        expected_refusals["out_of_order"] += counts["out_of_order"]

        for _, frames in items:
            push.send_multipart(frames)
        sent_messages.append(len(items))

        # Every message read: refusals all counted, the valid audio all received.
        def caught_up() -> bool:
            audio = [
                sample("tagd_audio_received_seconds_total", {"stream": valid.names[k]}) or 0
                for k in "adg"
            ]
            return all(refused(r) >= n for r, n in expected_refusals.items()) and all(
                a >= valid.audio_s[k] - 1e-9 for a, k in zip(audio, "adg", strict=True)
            )

        wait_for(caught_up, "the streams to catch up", timeout=60)
        for name in valid.names.values():
            stream = server.hub.get(name)
            wait_for(
                lambda s=stream, n=name: (
                    (sample("tagd_windows_published_total", {"stream": n}) or 0)
                    >= s.windows_emitted
                ),
                name,
                timeout=60,
            )
        assert {r: refused(r) for r in MALFORMED_REASONS if refused(r)} == {
            r: float(n) for r, n in expected_refusals.items() if n
        }
        for key, name in valid.names.items():
            received = sample("tagd_audio_received_seconds_total", {"stream": name})
            assert received == pytest.approx(valid.audio_s[key], abs=1e-9), key
        for flooder in opened:
            assert sample("tagd_audio_received_seconds_total", {"stream": flooder}) == 0.01
        assert sample("tagd_stream_gaps_total", {"stream": valid.names["a"]}) is None
        assert sample("tagd_stream_gaps_total", {"stream": valid.names["g"]}) == valid.g_gaps
        for kind, n in valid.cleaned.items():
            assert (
                sample("tagd_samples_cleaned_total", {"stream": valid.names["d"], "kind": kind})
                == n
            )

        # Scores: what a clean run gives, window for window.
        want = valid.expected_windows(geometry)
        published = {k: server.hub.get(name).windows_emitted for k, name in valid.names.items()}
        listener.collect(until_quiet=2.0, count=len(listener.messages) + sum(published.values()))
        for key, name in valid.names.items():
            got = {m["seq"]: m for m in listener.on(f"tags.{name}")}
            assert len(got) == published[key]
            assert published[key] >= len(want[key]) - (key == "a")  # soxr's tail may differ
            common = sorted(set(got) & set(range(len(want[key]))))  # a clean run's seq: its index
            assert len(common) >= len(want[key]) - 1, key
            scores = server.engine.run(np.stack([want[key][s].samples for s in common]))
            for row, seq in enumerate(common):
                message = got[seq]
                assert message["window"]["start_s"] == pytest.approx(
                    want[key][seq].start / MODEL_RATE, abs=1e-6
                )
                np.testing.assert_allclose(
                    [message["scores"][t] for t in server.engine.card.tags],
                    scores[row],
                    atol=2e-6,
                    err_msg=f"{key} seq {seq}",
                )
        # Make room for the next example the way silence would: evict everything.
        server.hub.sweep(now_mono=time.perf_counter() + 10**6)
        assert server.hub.names() == []

    one_example()
    assert sum(sent_messages) >= 100_000
    assert server.is_healthy() and scrape(server, "/healthz")[0] == 200
    assert all(source._thread.is_alive() for source in server.sources)
    assert refused("unhandled") == 0
    status, text = scrape(server)
    assert status == 200 and "tagd_malformed_messages_total" in text
