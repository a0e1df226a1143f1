"""From engine scores to what is published: clip averaging, thresholds, hysteresis.

Per stream, the ``Tagger`` keeps the recent segment scores and the on/off state of each
tag. A published prediction is the mean of the segment scores whose windows lie within
the last ``card.clip_seconds`` of stream time: for an FCN that is the one window, for a
sample-level model the ~10 segments covering the last 29.1 s (Lee et al. 2017). A
stream restart (a new epoch) starts the average afresh.

Events are what playout automation acts on, so they are damped: a tag turns on after
``on_after`` consecutive predictions at or over its threshold and off when a prediction
falls under its threshold minus ``off_margin``. A tag the card excludes while another is
on (``ModelCard.excludes``: ``instrumental`` while ``speech`` is) is neither over nor
active then; its score is published unchanged.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tagd.card import ModelCard
from tagd.stream import ReadyWindow

ON = "on"
OFF = "off"


@dataclass(frozen=True)
class TagEvent:
    tag: str
    state: str  # ON or OFF
    score: float
    threshold: float


@dataclass
class Prediction:
    stream: str
    seq: int
    start: int  # stream position of the first sample averaged, at the model's rate
    end: int  # stream position just past the last sample
    segments: int  # windows averaged
    scores: np.ndarray  # float32 [n_tags], mean over the segments
    over: list[str]  # tags at or over their threshold now, highest score first
    active: list[str]  # tags on after hysteresis, highest score first
    events: list[TagEvent] = field(default_factory=list)


# The clip mean: up to EXACT_SEGMENTS segments (an FCN's one, a SampleCNN's ~10 at the
# card's hop) it is summed afresh, exactly as numpy's mean. A short --hop puts hundreds
# of segments in a clip (too slow to average afresh each window: docs/design.md):
# then it is a running float64 sum, recomputed every RESUM_EVERY updates so that rounding
# cannot build up.
EXACT_SEGMENTS = 16
RESUM_EVERY = 1000


@dataclass
class _StreamState:
    epoch: int
    segments: deque  # of (start, end, scores)
    over_count: np.ndarray  # int [n_tags]: consecutive predictions at/over threshold
    on: np.ndarray  # bool [n_tags]: each tag's hysteresis on its own
    active: np.ndarray  # bool [n_tags]: published, ``on`` less the card's exclusions
    total: np.ndarray  # float64 [n_tags]: sum of the segments' scores
    updates: int = 0

    def add(self, start: int, end: int, scores: np.ndarray, oldest_start: int) -> None:
        """Add a segment; drop those starting before ``oldest_start``."""
        self.segments.append((start, end, scores))
        dropped = []
        while self.segments and self.segments[0][0] < oldest_start:
            dropped.append(self.segments.popleft()[2])
        self.updates += 1
        if len(self.segments) <= EXACT_SEGMENTS or self.updates % RESUM_EVERY == 0:
            self.total = np.sum([s for _, _, s in self.segments], axis=0, dtype=np.float64)
            return
        self.total += scores
        for old in dropped:
            self.total -= old

    def clear(self) -> None:
        self.segments.clear()
        self.total[:] = 0.0


class Tagger:
    def __init__(self, card: ModelCard, *, on_after: int = 2, off_margin: float = 0.1):
        if on_after < 1:
            raise ValueError("on_after must be at least 1")
        self.card = card
        self.tags = list(card.tags)
        self.thresholds = np.asarray(card.thresholds, dtype=np.float32)
        self.on_after = on_after
        self.off_margin = off_margin
        self.clip_samples = round(card.clip_seconds * card.sample_rate)
        self._states: dict[str, _StreamState] = {}

    def update(self, window: ReadyWindow, scores: np.ndarray) -> Prediction:
        """Take one window's scores; return what to publish for its stream."""
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if len(scores) != len(self.tags):
            raise ValueError(f"got {len(scores)} scores for {len(self.tags)} tags")
        state = self._states.get(window.stream)
        if state is None:
            state = self._states[window.stream] = self._fresh_state(window.epoch)
        if state.epoch != window.epoch:
            state.epoch = window.epoch
            state.clear()

        state.add(window.start, window.end, scores, oldest_start=window.end - self.clip_samples)
        mean = (state.total / len(state.segments)).astype(np.float32)

        events = self._hysteresis(state, mean)
        order = np.argsort(-mean, kind="stable")
        over = self.card.exclude(mean >= self.thresholds)
        return Prediction(
            stream=window.stream,
            seq=window.seq,
            start=state.segments[0][0],
            end=window.end,
            segments=len(state.segments),
            scores=mean,
            over=[self.tags[i] for i in order if over[i]],
            active=[self.tags[i] for i in order if state.active[i]],
            events=events,
        )

    def forget(self, stream: str) -> None:
        self._states.pop(stream, None)

    def _fresh_state(self, epoch: int) -> _StreamState:
        n = len(self.tags)
        return _StreamState(
            epoch,
            deque(),
            np.zeros(n, dtype=np.int64),
            np.zeros(n, dtype=bool),
            np.zeros(n, dtype=bool),
            np.zeros(n, dtype=np.float64),
        )

    def _hysteresis(self, state: _StreamState, scores: np.ndarray) -> list[TagEvent]:
        over = scores >= self.thresholds
        state.over_count = np.where(over, state.over_count + 1, 0)
        turn_on = ~state.on & (state.over_count >= self.on_after)
        turn_off = state.on & (scores < self.thresholds - self.off_margin)
        state.on = (state.on | turn_on) & ~turn_off
        # What is published: each tag's own hysteresis, less the tags the card says
        # cannot hold beside one that is on (instrumental while speech is).
        active = self.card.exclude(state.on)
        changed = active != state.active
        state.active = active
        events = [
            TagEvent(
                self.tags[i], ON if active[i] else OFF, float(scores[i]), float(self.thresholds[i])
            )
            for i in np.flatnonzero(changed)
        ]
        return sorted(events, key=lambda e: (e.state != OFF, -e.score))
