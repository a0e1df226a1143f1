"""From predictions to a timeline: segments per tag, and the formats they are written in.

A ``Segmenter`` follows the ``Tagger``'s hysteresis (its ``events``) per stream, so
`tagd serve` and `tagd tag --timeline` cut the same audio into the same segments: a
segment exists exactly while the Tagger has its tag on. The hysteresis decides *that*
a segment exists; its edges are placed finer than a window (docs/timeline.md), by one
of two rules (``EDGES``).

``level`` (the default): when the segment closes, each edge goes where the tag's score
crossed the level halfway between the level inside the segment (its peak score) and
the level outside it, interpolated between the two windows' centres on either side:

- **start**: outside is the median score of the windows in the window length before
  the threshold crossing (below); the rising crossing nearest it, among the windows from
  one window length before it to one after it;
- **end**: outside is the score of the prediction that turned the tag off (the windows
  after it are not seen when the segment closes); the falling crossing nearest the
  threshold crossing, among the windows of the last window length.

Where no such crossing is among those windows (the start of the audio; a segment still
open at ``close``), or the edge is the card's exclusion's (``ModelCard.excludes``: the
tag's own score did not cross its threshold there), an edge stays where ``threshold``
puts it:

``threshold``:

- **start**: halfway between the centre of the last prediction under the threshold and
  the centre of the first one at or over it, of the run of predictions over the
  threshold that turned the tag on (``on_after`` predictions before the ON event, not the
  event itself); the start of the audio when the first prediction was already over.
- **end**: halfway between the centre of the last prediction at or over the threshold
  and the centre of the next one (predictions in the hysteresis band, under the
  threshold but not yet under threshold minus ``off_margin``, do not extend it); where
  the audio ended when the tag was still on then (``close``).

A prediction's centre is the middle of the audio it covers (one window for an FCN,
the clip for a sample-level model). A window's score follows how much of it the tag
fills; where it crosses the threshold the tag fills about half of it, so the boundary
lies near the window's centre, and between two windows' centres one hop apart: the
midpoint is off by at most half a hop for a model that crosses at half a window.
A model's threshold (max F1 over clips) is seldom the score of a half-filled window, so
``level`` places an edge at the score halfway between the segment's and its
surroundings' instead, which follows the segment's own levels (speech over a music bed
scores lower than speech alone).

``mean`` and ``peak`` are over the tag's scores of the predictions from the first to
the last at or over its threshold. Times are seconds on the stream's (the file's) own
clock: sample positions at the model's rate divided by that rate.

Writers: ``FORMATS`` maps a name (``csv``, ``jsonl``, ``audacity``, ``vtt``, ``srt``) to a
``TimelineFormat``, a header written once and a text per segment; ``write_timeline``
writes an iterable of segments in one, one segment at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from tagd.tagger import OFF, ON, Prediction


@dataclass(frozen=True)
class Segment:
    stream: str  # the stream's name; for `tagd tag --timeline`, the file's path
    tag: str
    start: float  # seconds on the stream's own clock
    end: float
    mean: float  # the tag's mean score over the segment's predictions
    peak: float  # its highest
    predictions: int = 0  # how many predictions the mean is over
    # True: the tag was still on where the audio ended (end of file, shutdown, a snapshot
    # of what is on now); ``end`` is then where the audio ended, not where the tag turned off
    open: bool = False

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class _Scores:
    """A tag's scores over a run of predictions: sum, count, peak."""

    total: float = 0.0
    count: int = 0
    peak: float = -math.inf

    def add(self, score: float) -> None:
        self.total += score
        self.count += 1
        self.peak = max(self.peak, score)

    def merge(self, other: _Scores) -> None:
        self.total += other.total
        self.count += other.count
        self.peak = max(self.peak, other.peak)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass
class _TagTrack:
    """One tag of one stream: the run over threshold, and the segment while it is on."""

    run_start: float | None = None  # boundary before the current run over threshold
    run: _Scores = field(default_factory=_Scores)
    on: bool = False
    start: float = 0.0  # the open segment's start
    kept: _Scores = field(default_factory=_Scores)  # up to its last prediction over
    band: _Scores = field(default_factory=_Scores)  # since then (under it, still on)
    end: float | None = None  # after its last prediction over; None: the last one was over
    # ``level`` edges: the level before the segment (None: no window before its start),
    # and (centre, score) of the windows around its start, collected until ``head_until``
    outside: float | None = None
    head: list[tuple[float, float]] = field(default_factory=list)
    head_until: float = -math.inf


@dataclass
class _StreamTrack:
    last_centre: float | None = None  # seconds; None before the first prediction
    last_end: float = 0.0  # seconds: end of the audio the last prediction covered
    tags: dict[str, _TagTrack] = field(default_factory=dict)
    # ``level`` edges: (centre, the segmented tags' scores) of the predictions whose
    # centres lie within one window length of the last one's
    recent: deque[tuple[float, np.ndarray]] = field(default_factory=deque)


EDGES = ("level", "threshold")  # how a segment's edges are placed (the module's docstring)


class Segmenter:
    """Segments per stream and tag, from a Tagger's predictions fed in stream order.

    ``update`` returns the segments a prediction closed; ``close(stream)`` those still
    open (end of file, shutdown), ``close_all`` every stream's; ``open_segments`` shows
    them without closing. What is kept per stream is a few numbers per tag, and for
    ``level`` edges the scores of the last window length of predictions (and of about
    two window lengths around each open segment's start).
    """

    def __init__(
        self,
        tags: Sequence[str],
        sample_rate: int,
        only: Collection[str] | None = None,
        edges: str = "level",
    ):
        """``tags``: the model card's, in score order; ``only``: the tags to segment (all
        when None; unknown names are a ValueError); ``edges``: one of ``EDGES``."""
        if edges not in EDGES:
            raise ValueError(f"unknown edge placement {edges!r}; known: {', '.join(EDGES)}")
        self.edges = edges
        self.tags = list(tags)
        if only is not None:
            unknown = sorted(set(only) - set(self.tags))
            if unknown:
                raise ValueError(
                    f"unknown tag(s) {', '.join(unknown)}; the model's: {', '.join(self.tags)}"
                )
        wanted = set(self.tags) if only is None else set(only)
        self._index = {tag: i for i, tag in enumerate(self.tags) if tag in wanted}
        self._rows = list(self._index.values())  # the segmented tags' scores, in order
        self.sample_rate = sample_rate
        self._streams: dict[str, _StreamTrack] = {}

    @property
    def segmented_tags(self) -> list[str]:
        return list(self._index)

    def update(self, prediction: Prediction) -> list[Segment]:
        """Follow one prediction of its stream; return the segments it closed."""
        stream = self._streams.setdefault(prediction.stream, _StreamTrack())
        start_s = prediction.start / self.sample_rate
        end_s = prediction.end / self.sample_rate
        centre = (start_s + end_s) / 2
        # where a crossing between the last prediction and this one is placed
        crossing = start_s if stream.last_centre is None else (stream.last_centre + centre) / 2
        over = set(prediction.over)
        turned = {event.tag: event.state for event in prediction.events}
        thresholds = {event.tag: event.threshold for event in prediction.events}
        level = self.edges == "level"
        if level:  # one window length of the segmented tags' scores
            stream.recent.append((centre, np.asarray(prediction.scores)[self._rows]))
            while stream.recent and stream.recent[0][0] < centre - (end_s - start_s):
                stream.recent.popleft()
        closed = []
        for column, (tag, i) in enumerate(self._index.items()):
            track = stream.tags.get(tag)
            if track is None:
                track = stream.tags[tag] = _TagTrack()
            score = float(prediction.scores[i])
            is_over = tag in over
            if not is_over:
                track.run_start = None
            elif track.run_start is None:
                track.run_start, track.run = crossing, _Scores()
            if is_over:
                track.run.add(score)
            event = turned.get(tag)
            if event == ON:
                track.on = True
                track.start = crossing if track.run_start is None else track.run_start
                track.kept = _Scores()
                track.kept.merge(track.run)  # the run over threshold, this prediction included
                track.end, track.band = (None, _Scores()) if is_over else (crossing, _Scores())
                if not is_over:  # on once a tag excluding it went off (ModelCard.excludes)
                    track.band.add(score)
                if level:
                    self._open_head(stream, track, column, end_s - start_s, thresholds[tag])
            elif event == OFF:
                if track.on:
                    end = crossing if track.end is None else track.end
                    segment = self._segment(prediction.stream, tag, track, end)
                    if level:
                        # off under its threshold, not by a tag that excludes it
                        after = score if score < thresholds[tag] else None
                        segment = self._level_edges(segment, stream, track, column, after)
                    closed.append(segment)
                track.on = False
                track.head = []
            elif track.on and is_over:
                if track.end is not None:  # back over the threshold from within the band
                    track.kept.merge(track.band)
                    track.end = None
                track.kept.add(score)
            elif track.on:  # under the threshold, still on: the hysteresis band
                if track.end is None:
                    track.end, track.band = crossing, _Scores()
                track.band.add(score)
            if level and track.on and event != ON and centre <= track.head_until:
                track.head.append((centre, score))
        stream.last_centre, stream.last_end = centre, end_s
        return closed

    @staticmethod
    def _open_head(
        stream: _StreamTrack, track: _TagTrack, column: int, span: float, threshold: float
    ) -> None:
        """At an ON: the level before the segment's start, and the windows around it so far."""
        before = [scores[column] for c, scores in stream.recent if c < track.start]
        track.outside = float(np.median(before)) if before else None
        if track.outside is not None and track.outside >= threshold:
            track.outside = None  # no rise: on once a tag that excluded it went off
        track.head = [(c, float(scores[column])) for c, scores in stream.recent]
        track.head_until = track.start + span

    def _level_edges(
        self,
        segment: Segment,
        stream: _StreamTrack,
        track: _TagTrack,
        column: int,
        after: float | None,
    ) -> Segment:
        """``segment`` with its edges where the score crossed halfway between its peak and
        the level outside (``after``: the score that turned it off; None: keep its end)."""
        start, end = segment.start, segment.end
        if track.outside is not None:
            half = (track.outside + segment.peak) / 2
            start = _crossing(track.head, half, rising=True, near=start)
        if after is not None:
            half = (after + segment.peak) / 2
            recent = [(c, float(scores[column])) for c, scores in stream.recent]
            end = _crossing(recent, half, rising=False, near=end)
        return dataclasses.replace(segment, start=start, end=max(end, start))

    def open_segments(self, stream: str) -> list[Segment]:
        """The stream's segments still open, ``end`` where its audio ends now (open=True);
        with ``level`` edges, their starts placed by the windows seen so far."""
        track = self._streams.get(stream)
        if track is None:
            return []
        columns = {tag: column for column, tag in enumerate(self._index)}
        segments = []
        for tag, tagged in track.tags.items():
            if not tagged.on:
                continue
            end = track.last_end if tagged.end is None else tagged.end
            segment = self._segment(stream, tag, tagged, end, True)
            if self.edges == "level":
                segment = self._level_edges(segment, track, tagged, columns[tag], None)
            segments.append(segment)
        return segments

    def close(self, stream: str, end: float | None = None) -> list[Segment]:
        """End the stream: its open segments (open=True), ended where their tag last was
        over the threshold, or at ``end`` seconds (where the audio ended: a file's length;
        by default the end of the audio the last prediction covered) if it still was then;
        the stream is forgotten."""
        track = self._streams.get(stream)
        if track is not None and end is not None:
            track.last_end = end
        segments = self.open_segments(stream)
        self.forget(stream)
        return segments

    def close_all(self) -> list[Segment]:
        return [segment for stream in list(self._streams) for segment in self.close(stream)]

    def forget(self, stream: str) -> None:
        self._streams.pop(stream, None)

    @staticmethod
    def _segment(
        stream: str, tag: str, track: _TagTrack, end: float, open: bool = False
    ) -> Segment:
        return Segment(
            stream=stream,
            tag=tag,
            start=track.start,
            end=max(end, track.start),
            mean=track.kept.mean,
            peak=track.kept.peak if track.kept.count else 0.0,
            predictions=track.kept.count,
            open=open,
        )


def _crossing(
    scores: Sequence[tuple[float, float]], level: float, rising: bool, near: float
) -> float:
    """Where ``scores`` ((centre, score) in time order) crossed ``level`` upwards
    (``rising``) or downwards, interpolated between the centres on either side: the
    crossing nearest ``near`` (the threshold's edge), or ``near`` when there is none."""
    found = None
    for (c0, s0), (c1, s1) in itertools.pairwise(scores):
        if (s0 < level <= s1) if rising else (s0 >= level > s1):
            at = c0 + (level - s0) / (s1 - s0) * (c1 - c0)
            if found is None or abs(at - near) < abs(found - near):
                found = at
    return near if found is None else found


# -- formats ------------------------------------------------------------------------------------
# times in milliseconds (finer than any hop, and what WebVTT and SRT can say), except
# Audacity's labels, which take its own six decimals
SCORE_DECIMALS = 4


def clock(seconds: float, decimal_mark: str = ".") -> str:
    """``HH:MM:SS.mmm`` (WebVTT; SRT with ``decimal_mark=","``), hours as many digits as needed."""
    millis = _millis(seconds)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    whole, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{decimal_mark}{millis:03d}"


def _millis(seconds: float) -> int:
    """Whole milliseconds, half up: every format rounds a time the same way."""
    return max(0, math.floor(seconds * 1000 + 0.5))


def _seconds(value: float) -> str:
    millis = _millis(value)
    return f"{millis // 1000}.{millis % 1000:03d}"


def _score(value: float) -> str:
    return f"{value:.{SCORE_DECIMALS}f}"


def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _csv(segment: Segment, number: int) -> str:
    fields = [
        _csv_field(segment.stream),
        _seconds(segment.start),
        _seconds(segment.end),
        _csv_field(segment.tag),
        _score(segment.mean),
        _score(segment.peak),
    ]
    return ",".join(fields) + "\n"


def _jsonl(segment: Segment, number: int) -> str:
    record = {
        "stream": segment.stream,
        "tag": segment.tag,
        "start": _millis(segment.start) / 1000,
        "end": _millis(segment.end) / 1000,
        "mean": round(segment.mean, SCORE_DECIMALS),
        "peak": round(segment.peak, SCORE_DECIMALS),
        "predictions": segment.predictions,
        "open": segment.open,
    }
    return json.dumps(record) + "\n"


def _audacity(segment: Segment, number: int) -> str:
    # Audacity's label track: start, end (seconds) and the label, tab-separated
    return f"{segment.start:.6f}\t{segment.end:.6f}\t{segment.tag}\n"


def _vtt(segment: Segment, number: int) -> str:
    return f"{number}\n{clock(segment.start)} --> {clock(segment.end)}\n{segment.tag}\n\n"


def _srt(segment: Segment, number: int) -> str:
    return f"{number}\n{clock(segment.start, ',')} --> {clock(segment.end, ',')}\n{segment.tag}\n\n"


@dataclass(frozen=True)
class TimelineFormat:
    name: str
    suffix: str  # of a file written in it
    header: str  # written once, before the first segment
    render: Callable[[Segment, int], str]  # a segment's text; its number counts from 1
    description: str


FORMATS: dict[str, TimelineFormat] = {
    fmt.name: fmt
    for fmt in (
        TimelineFormat(
            "csv", ".csv", "stream,start,end,tag,mean,peak\n", _csv, "CSV with a header line"
        ),
        TimelineFormat("jsonl", ".jsonl", "", _jsonl, "one JSON object per segment"),
        TimelineFormat("audacity", ".txt", "", _audacity, "Audacity label track"),
        TimelineFormat("vtt", ".vtt", "WEBVTT\n\n", _vtt, "WebVTT captions"),
        TimelineFormat("srt", ".srt", "", _srt, "SubRip (SRT) subtitles"),
    )
}


def timeline_format(name: str) -> TimelineFormat:
    """The format called ``name``; a ValueError naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown timeline format {name!r}; known: {', '.join(FORMATS)}") from None


def write_timeline(
    segments: Iterable[Segment], out: TextIO, fmt: str | TimelineFormat, first_number: int = 1
) -> int:
    """Write ``fmt``'s header and then each segment as it comes; return how many.

    WebVTT and SRT players want cues in start order: give them segments sorted by start
    (``in_start_order``)."""
    fmt = timeline_format(fmt) if isinstance(fmt, str) else fmt
    out.write(fmt.header)
    count = 0
    for count, segment in enumerate(segments, start=1):
        out.write(fmt.render(segment, first_number + count - 1))
    return count


def in_start_order(segments: Iterable[Segment]) -> list[Segment]:
    """Sorted by start, then tag (a segment is ~200 bytes: a day of them is a few MB)."""
    return sorted(segments, key=lambda s: (s.start, s.end, s.tag))
