"""A Standard MIDI File writer, just enough for rendered training music.

Written from the SMF 1.0 specification: a format-1 file is an ``MThd`` header chunk
(format, track count, ticks per quarter note) and one ``MTrk`` chunk per track. A track
is a list of events, each preceded by its delta time in ticks as a variable-length
quantity (7 bits a byte, high bit set on all but the last). The events used here:

- note on ``0x9n key velocity`` and note off ``0x8n key 0`` on channel ``n``;
- program change ``0xCn program`` (General MIDI programs 0-127; channel 9 is drums);
- controller ``0xBn 7 volume``;
- meta events ``0xFF type length data``: tempo (0x51, microseconds per quarter note),
  time signature (0x58) and end of track (0x2F).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

TICKS_PER_BEAT = 480
DRUM_CHANNEL = 9  # General MIDI: channel 10, counted from 1


@dataclass(frozen=True)
class Note:
    start: float  # beats from the start of the piece
    duration: float  # beats
    pitch: int  # MIDI key 0-127
    velocity: int  # 1-127


@dataclass
class Track:
    channel: int  # 0-15
    program: int | None  # General MIDI program; None on the drum channel
    notes: list[Note] = field(default_factory=list)
    volume: int = 100  # controller 7


def _vlq(value: int) -> bytes:
    """A variable-length quantity: 7 bits a byte, most significant first."""
    if value < 0:
        raise ValueError(f"delta times are not negative, got {value}")
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def _track_bytes(events: list[tuple[int, int, bytes]]) -> bytes:
    """``events`` as (tick, order, bytes); at one tick, lower order goes first."""
    out, now = bytearray(), 0
    for tick, _, data in sorted(events, key=lambda e: (e[0], e[1])):
        out += _vlq(tick - now) + data
        now = tick
    end = max((tick for tick, _, _ in events), default=0)
    out += _vlq(end - now) + b"\xff\x2f\x00"
    return bytes(out)


def midi_bytes(tracks: list[Track], bpm: float, beats_per_bar: int = 4) -> bytes:
    """A format-1 Standard MIDI File: a tempo track, then one track per ``Track``."""
    tempo = round(60_000_000 / bpm)  # microseconds per quarter note
    conductor = [
        (0, 0, b"\xff\x51\x03" + tempo.to_bytes(3, "big")),
        # numerator, denominator as a power of two (4 → 2), MIDI clocks per click, 32nds per quarter
        (0, 0, b"\xff\x58\x04" + bytes([beats_per_bar, 2, 24, 8])),
    ]
    chunks = [_track_bytes(conductor)]
    for track in tracks:
        ch = track.channel
        events: list[tuple[int, int, bytes]] = [(0, 0, bytes([0xB0 | ch, 7, track.volume]))]
        if track.program is not None:
            events.append((0, 0, bytes([0xC0 | ch, track.program])))
        for note in track.notes:
            on = round(note.start * TICKS_PER_BEAT)
            off = max(on + 1, round((note.start + note.duration) * TICKS_PER_BEAT))
            # note offs before note ons at the same tick: a repeated key re-sounds
            events.append((on, 2, bytes([0x90 | ch, note.pitch, note.velocity])))
            events.append((off, 1, bytes([0x80 | ch, note.pitch, 0])))
        chunks.append(_track_bytes(events))
    header = struct.pack(">HHH", 1, len(chunks), TICKS_PER_BEAT)
    return _chunk(b"MThd", header) + b"".join(_chunk(b"MTrk", c) for c in chunks)


def write_midi(path: str | Path, tracks: list[Track], bpm: float, beats_per_bar: int = 4) -> None:
    Path(path).write_bytes(midi_bytes(tracks, bpm, beats_per_bar))
