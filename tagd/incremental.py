"""Incremental inference in `tagd serve` and `tagd tag`: each stream's state between hops.

An FCN's consecutive windows share most of their audio, and every layer is local in
time, so a window one hop after the last can be scored from the last window's state
plus what the hop adds (trainer.models.incremental has the why and the plan; docs/models.md
the picture). The exported model carries a *prime* graph (a whole window → scores and
state) and a *step* graph (a window and its predecessor's state → scores and the next
state) per hop (tagd.engines.base.IncrementalEngine).

The ``IncrementalRunner`` scores a batch of windows of any streams. It keeps, per
stream, the state of its last scored window with that window's epoch and where the next
window must start. A window that continues it exactly (same epoch, starting one hop
later) goes to the step graph; any other (a stream's first, one after a restart or a
gap, one after a dropped or failed window) to the prime graph, which recomputes it in
full and starts the chain again. Either way the scores are those of the full window.

A stream's state is ``IncrementalEngine.state_bytes`` (FCN-4: 1.3 MB) while it is held;
``forget`` drops it when a stream is evicted, so the memory is bounded by the stream
limit. Callers guarantee what the batcher does: a stream's windows are scored one at a
time, in order.

The runner is a ``tagd.scoring.Scorer``, as full windows are; ``choose_scorer`` picks one
of the two for `tagd serve` and `tagd tag`. Where the graphs also give each window's
embedding (``embeds``: a model exported with an aggregator), ``run_and_embed`` returns the
embeddings beside the scores, for the song aggregator (tagd.aggregate).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tagd.card import ModelCard
from tagd.engines.base import Engine, IncrementalEngine
from tagd.scoring import FULL, INCREMENTAL, FullWindows, Scorer, UpdateCounter, WindowKey

if TYPE_CHECKING:
    from tagd.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class _Carried:
    epoch: int
    next_start: int  # where a window must start to continue from this state
    states: list[np.ndarray]  # one per state tensor, without the batch axis


class IncrementalRunner:
    """The ``INCREMENTAL`` scorer (tagd.scoring.Scorer): steps where a window continues
    its stream's chain, primes elsewhere."""

    mode = INCREMENTAL
    carries_state = True
    max_consecutive = 1  # a stream's next window steps from the state its last one leaves

    def __init__(
        self, engines: Sequence[IncrementalEngine], on_updates: UpdateCounter | None = None
    ):
        """One engine per instance, sharing the streams' states; ``on_updates(mode,
        count)`` is told how many windows each graph scored."""
        self.engines = list(engines)
        self.engine = self.engines[0]
        self.hop_samples = self.engine.hop_samples
        self.state_bytes = self.engine.state_bytes
        self.embeds = self.engine.embeds  # run_and_embed gives the windows' embeddings
        self._carried: dict[str, _Carried] = {}
        self._on_updates = on_updates

    def describe(self) -> str:
        engine = self.engine
        return (
            f"incremental inference ({engine.reused_levels} levels reused, "
            f"{engine.step_macs / engine.full_macs:.0%} of a window's MACs, "
            f"{engine.state_bytes / 1e6:.2f} MB of state a stream)"
        )

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Both graphs once per batch size on silence, on every instance (once on one
        that instances share)."""
        for engine in dict.fromkeys(self.engines):
            for size in batch_sizes:
                silence = np.zeros((size, engine.card.window_samples), dtype=np.float32)
                _, states = engine.prime(silence)
                engine.step(silence, states)

    def run(self, keys: Sequence[WindowKey], batch: np.ndarray, instance: int = 0) -> np.ndarray:
        """Scores ``[len(keys), n_tags]`` of the windows ``batch`` (one row per key).

        A batch may hold consecutive windows of one stream (a batcher catching up): they
        go in rounds, a stream's second window after its first, so that it steps from the
        state its first leaves instead of being primed."""
        return self._run(keys, batch, instance, None)

    def run_and_embed(
        self, keys: Sequence[WindowKey], batch: np.ndarray, instance: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``run``'s scores and the windows' embeddings ``[len(keys), D]``, from the same
        graph runs (only where ``embeds``)."""
        size = self.engine.card.aggregator.embedding_size if self.embeds else 0
        if not size:
            raise ValueError("these incremental graphs give no embedding: export with one")
        embeddings = np.empty((len(keys), size), dtype=np.float32)
        return self._run(keys, batch, instance, embeddings), embeddings

    def _run(self, keys, batch: np.ndarray, instance: int, embeddings: np.ndarray | None):
        engine = self.engines[instance]
        scores = np.empty((len(keys), engine.card.n_tags), dtype=np.float32)
        for rows in rounds(keys):
            follows = [self.continues(keys[row]) for row in rows]
            steps = [row for row, step in zip(rows, follows, strict=True) if step]
            primes = [row for row, step in zip(rows, follows, strict=True) if not step]
            if steps:
                states = [
                    _batched([self._carried[keys[r].stream].states[i] for r in steps])
                    for i in range(len(engine.state_shapes))
                ]
                stepped = engine.step_and_embed(_rows(batch, steps), states)
                self._take(keys, steps, scores, embeddings, *stepped)
            if primes:
                primed = engine.prime_and_embed(_rows(batch, primes))
                self._take(keys, primes, scores, embeddings, *primed)
            if self._on_updates is not None:
                self._on_updates(INCREMENTAL, len(steps))
                self._on_updates(FULL, len(primes))
        return scores

    def continues(self, key: WindowKey) -> bool:
        """Whether the window follows the stream's last scored one: a step, not a prime.
        The batcher asks it of a stream's next window (none of its windows in flight)."""
        carried = self._carried.get(key.stream)
        return (
            carried is not None and carried.epoch == key.epoch and carried.next_start == key.start
        )

    def _take(
        self,
        keys,
        rows: list[int],
        scores: np.ndarray,
        embeddings: np.ndarray | None,
        got: np.ndarray,
        states: list[np.ndarray],
        got_embeddings: np.ndarray | None,
    ) -> None:
        scores[rows] = got
        if embeddings is not None:
            embeddings[rows] = got_embeddings
        for index, row in enumerate(rows):
            key = keys[row]
            # one row is the whole output array; of several, copy so that a stream's
            # state does not keep the batch's alive
            mine = [s[0] if len(rows) == 1 else s[index].copy() for s in states]
            self._carried[key.stream] = _Carried(key.epoch, key.start + self.hop_samples, mine)

    def forget(self, stream: str) -> None:
        self._carried.pop(stream, None)

    @property
    def streams_held(self) -> int:
        return len(self._carried)


def rounds(keys: Sequence[WindowKey]) -> list[list[int]]:
    """Rows of a batch in rounds: each stream's first window, then each one's second, …"""
    rounds: list[list[int]] = []
    seen: dict[str, int] = {}
    for row, key in enumerate(keys):
        nth = seen.get(key.stream, 0)
        seen[key.stream] = nth + 1
        if nth == len(rounds):
            rounds.append([])
        rounds[nth].append(row)
    return rounds


def _batched(states: list[np.ndarray]) -> np.ndarray:
    """Streams' states on a batch axis: a view of a batch of one (the CPU's batch: no
    copy of the stream's 1.3 MB each step), stacked for more."""
    return states[0][np.newaxis] if len(states) == 1 else np.stack(states)


def _rows(batch: np.ndarray, rows: list[int]) -> np.ndarray:
    """The batch's ``rows`` (increasing), without a copy when they are all of them."""
    return batch if len(rows) == len(batch) else batch[rows]


def choose_scorer(
    engines: Sequence[Engine],
    hop_samples: int,
    incremental: bool = True,
    on_updates: UpdateCounter | None = None,
    metrics: Metrics | None = None,
) -> Scorer:
    """How `tagd serve` and `tagd tag` score windows, one scorer over ``engines`` (one
    per instance): incremental inference when ``incremental`` is wanted (config
    ``incremental``, no ``--full-windows``) and the model has graphs for the hop, full
    windows otherwise, with the reason logged. EngineError when the card names graphs
    for the hop that do not load. A remote engine (``triton://``) keeps the streams'
    state on its servers and brings its own scorer, which counts into ``metrics``."""
    remote = engines[0].own_scorer(hop_samples, incremental, on_updates, metrics)
    if remote is not None:
        return remote
    if not incremental:
        log.info(
            "incremental inference off (incremental = false / --full-windows): "
            "every window is computed in full"
        )
        return FullWindows(engines, hop_samples, on_updates)
    # an engine that instances share (Engine.concurrent_runs) loads its graphs once
    loaded = {engine: engine.incremental(hop_samples) for engine in dict.fromkeys(engines)}
    graphs = [loaded[engine] for engine in engines]
    if graphs[0] is None:
        log.info("full windows: %s", missing_graph_hint(engines[0].card, hop_samples))
        return FullWindows(engines, hop_samples, on_updates)
    return IncrementalRunner(graphs, on_updates)


def reuse_summary(card: ModelCard, hop_samples: int) -> str:
    """What a hop lets incremental inference reuse, for the start-up log."""
    strides = card.incremental.time_strides
    if not strides:
        return f"{card.architecture} has no incremental graphs (only FCNs do)"
    levels = card.reusable_levels(hop_samples)
    if levels == 0:
        return (
            f"hop {hop_samples} samples is not a multiple of the {strides[0]}-sample frame "
            f"hop: no layer can be reused"
        )
    blocks = levels - 1
    what = "the log-mel frames" + (
        f" and conv blocks 1–{blocks}" if blocks > 1 else " and conv block 1" if blocks == 1 else ""
    )
    deeper = strides[levels] if levels < len(strides) else None
    more = f"; a multiple of {deeper} samples would reuse more" if deeper else ""
    return f"hop {hop_samples} samples can reuse {what}{more}"


def missing_graph_hint(card: ModelCard, hop_samples: int) -> str:
    """Why there is no incremental graph for a hop, and what to do."""
    exported = card.incremental.hops
    have = ", ".join(str(h) for h in exported) or "none"
    return (
        f"{reuse_summary(card, hop_samples)}, but the model has incremental graphs for "
        f"hops {have} only (samples); export with `tagd-train export --incremental-hop "
        f"{hop_samples / card.sample_rate:g}` for this one"
    )
