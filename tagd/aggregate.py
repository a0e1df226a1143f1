"""Song-level tags from a learned aggregator: the graphs the card's ``aggregator`` names.

A model exported with ``tagd-train export --aggregator`` has two graphs beside it
(tagd.card's ``AggregatorSection``): the embedding graph gives each window's scores and
its embedding in one run, and the aggregator graph advances a song's state by one window
and gives the song-so-far scores. Here they run on ONNX Runtime:

- ``AggregatorGraphs``: the two sessions, tensors in and out;
- ``SongChains``: a state per stream that advances one step per window, restarted from
  zeros where a window does not continue its stream's chain (another epoch, or not one
  hop after the last window), as incremental state is (tagd.incremental): the state
  after a run of windows is the state of one pass over that run, however the windows
  arrive;
- ``AggregatingScorer``: `tagd serve`'s scorer with a song per stream beside it
  (``aggregate = true``): each window's scores as before, and its embedding advancing
  its stream's chain, the song-so-far scores kept until the window is published;
- ``aggregate_file``: a whole file's windows (cut as `tagd tag` cuts them, at the hop
  the aggregator was trained at) through both graphs: the song's scores beside the
  average of its window scores.

ONNX Runtime is the daemon's own dependency: no torch here.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tagd.card import GRAPH_NAMES, AggregatorSection, ModelCard
from tagd.engines import EngineError
from tagd.engines.onnx import open_session
from tagd.incremental import IncrementalRunner
from tagd.publish import SCORE_DECIMALS
from tagd.scoring import FullWindows, RemoteScorer, Scorer, WindowKey
from tagd.tagfile import FileWindows

log = logging.getLogger(__name__)

# Song scores kept per stream until their windows are published: more than a batch holds
# of one stream's windows; a window whose batch failed is pushed out by later ones.
SONGS_KEPT_PER_STREAM = 64


class AggregatorGraphs:
    """The embedding and aggregator graphs beside ``model_path``, on ONNX Runtime; without
    ``embedding_graph`` only the aggregator's is loaded (the incremental graphs give the
    embeddings: no second copy of the CNN's weights in memory)."""

    def __init__(
        self,
        model_path: str | Path,
        card: ModelCard,
        threads: int | None = None,
        embedding_graph: bool = True,
    ):
        section = card.aggregator
        if section is None:
            raise EngineError(
                f"{model_path}: its card has no aggregator; export the model with "
                "`tagd-train export CKPT --aggregator RUN/aggregator.pt`"
            )
        model_path = Path(model_path)
        paths = [model_path.with_name(n) for n in (section.embedding_graph, section.graph)]
        for path in paths:
            if not path.is_file():
                raise EngineError(
                    f"{model_path}: its card names the aggregator graph {path.name}, which is "
                    "not beside it; copy it there or export again"
                )
        self.card = card
        self.section: AggregatorSection = section
        sessions = [
            open_session(path, threads=threads, providers=["CPUExecutionProvider"])
            for path in (paths if embedding_graph else paths[1:])
        ]
        self._embed = sessions[0] if embedding_graph else None
        self._step = sessions[-1]

    @property
    def hop_samples(self) -> int:
        return self.section.hop_samples

    def embed(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Waveforms (B, window_samples) → window scores (B, n_tags), embeddings (B, D)."""
        if self._embed is None:
            raise EngineError("the embedding graph was not loaded (embedding_graph=False)")
        feeds = {GRAPH_NAMES.waveform: np.ascontiguousarray(windows, dtype=np.float32)}
        scores, embeddings = self._embed.run([GRAPH_NAMES.scores, GRAPH_NAMES.embedding], feeds)
        return scores, embeddings

    def step(
        self, embeddings: np.ndarray, state: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embeddings (B, D) of the next window of B songs and their state → the songs'
        scores so far (B, n_tags) and the next state."""
        feeds = dict(zip(self.section.inputs, [embeddings, *state], strict=True))
        scores, *following = self._step.run(self.section.outputs, feeds)
        return scores, following


@dataclass
class SongChain:
    """One stream's song so far: where its next window must start, and the state."""

    epoch: int
    next_start: int  # samples into the stream
    state: list[np.ndarray]
    windows: int = 0


@dataclass
class SongChains:
    """Aggregator state per stream, one step per window, restarted on a break."""

    graphs: AggregatorGraphs
    hop_samples: int
    chains: dict[str, SongChain] = field(default_factory=dict)
    restarts: int = 0  # chains restarted on a break (a stream's first window is not one)

    def advance(
        self, stream: str, epoch: int, start: int, embedding: np.ndarray
    ) -> tuple[np.ndarray, int]:
        """The stream's window at ``start`` (samples) of ``epoch``: its song-so-far scores
        (n_tags) and how many windows the song holds now."""
        chain = self.chains.get(stream)
        if chain is None or chain.epoch != epoch or chain.next_start != start:
            if chain is not None:
                self.restarts += 1
            chain = SongChain(epoch, start, self.graphs.section.initial_state(1))
            self.chains[stream] = chain
        scores, chain.state = self.graphs.step(embedding.reshape(1, -1), chain.state)
        chain.next_start = start + self.hop_samples
        chain.windows += 1
        return scores[0], chain.windows

    def forget(self, stream: str) -> None:
        self.chains.pop(stream, None)


@dataclass
class SongTags:
    path: Path
    duration_s: float
    windows: int
    scores: np.ndarray  # [n_tags]: the aggregator's, after the last window
    average: np.ndarray  # [n_tags]: the mean of the window scores, today's song score


def aggregate_file(graphs: AggregatorGraphs, path: str | Path) -> SongTags:
    """A file's windows, at the aggregator's hop, through both graphs (AudioError when
    the file cannot be decoded or is too short)."""
    path = Path(path)
    card = graphs.card
    total = np.zeros(card.n_tags, dtype=np.float64)
    state = graphs.section.initial_state(1)
    scores = np.zeros((1, card.n_tags), dtype=np.float32)
    count = 0
    file_windows = FileWindows(path, card, graphs.hop_samples)
    for window in file_windows:
        window_scores, embedding = graphs.embed(window.samples[None])
        total += window_scores[0]
        scores, state = graphs.step(embedding, state)
        count += 1
    return SongTags(
        path,
        file_windows.samples / card.sample_rate,
        count,
        scores[0],
        (total / count).astype(np.float32),
    )


class AggregatingScorer:
    """A ``Scorer`` (tagd.scoring) that also advances each stream's song.

    ``run`` returns the windows' scores and steps their streams' chains
    (``SongChains``) with their embeddings, in the batch's order, which is each stream's
    order (the Scorer contract). ``song(window)`` gives a published window's song-so-far:
    ``{"aggregator", "windows", "scores"}``. ``forget`` drops the stream's chain with its
    inner state.

    Where the embeddings come from, cheapest first:

    - incremental inference whose graphs give them (``IncrementalRunner.embeds``, a
      model exported with its aggregator): the step that scores the window, so the song
      costs one aggregator step a hop more;
    - full windows: the embedding graph gives the scores with the embeddings, one
      window's CNN a hop, not two (the float32 export on ONNX Runtime's CPU provider,
      whatever the model file's precision or backend);
    - otherwise (incremental graphs exported without the embedding) the inner scorer's
      scores are kept and the embedding graph runs beside it: a whole window's CNN more
      a hop (docs/serve.md).
    """

    def __init__(self, inner: Scorer, graphs: AggregatorGraphs):
        self.inner, self.graphs = inner, graphs
        self.mode = inner.mode
        self.hop_samples = inner.hop_samples
        self.carries_state = inner.carries_state
        self.max_consecutive = inner.max_consecutive
        self.state_bytes = inner.state_bytes + sum(
            4 * int(np.prod(t.shape)) for t in graphs.section.state
        )
        self._chains = SongChains(graphs, inner.hop_samples)
        self._songs: dict[str, collections.deque] = {}
        self._lock = threading.Lock()  # different streams' windows run on several workers
        self._full_windows = inner if isinstance(inner, FullWindows) else None
        embeds = isinstance(inner, IncrementalRunner) and inner.embeds
        self._embedding_steps = inner if embeds else None

    def run(self, keys: Sequence[WindowKey], batch: np.ndarray, instance: int = 0) -> np.ndarray:
        if self._embedding_steps is not None:
            scores, embeddings = self._embedding_steps.run_and_embed(keys, batch, instance)
        elif self._full_windows is not None:
            scores, embeddings = self.graphs.embed(batch)
            self._full_windows.count(len(keys))
        else:
            scores = self.inner.run(keys, batch, instance)
            _, embeddings = self.graphs.embed(batch)
        self.advance(keys, embeddings)
        return scores

    def advance(self, keys: Sequence[WindowKey], embeddings: np.ndarray) -> None:
        """Step the streams of ``keys`` with their windows' ``embeddings`` [len(keys), D]."""
        with self._lock:
            for key, embedding in zip(keys, embeddings, strict=True):
                song, windows = self._chains.advance(key.stream, key.epoch, key.start, embedding)
                kept = self._songs.setdefault(
                    key.stream, collections.deque(maxlen=SONGS_KEPT_PER_STREAM)
                )
                kept.append((key.epoch, key.start, song, windows))

    def song(self, key: WindowKey) -> dict[str, Any] | None:
        """The song so far after ``key``'s window, once, as the tags message's ``song``
        field (docs/topics.md); None if the window was not scored here."""
        with self._lock:
            kept = self._songs.get(key.stream, ())
            for entry in kept:
                if entry[:2] == (key.epoch, key.start):
                    kept.remove(entry)
                    _, _, scores, windows = entry
                    tags = self.graphs.card.tags
                    return {
                        "aggregator": self.graphs.section.kind,
                        "windows": windows,
                        "scores": {
                            tag: round(float(score), SCORE_DECIMALS)
                            for tag, score in zip(tags, scores, strict=True)
                        },
                    }
        return None

    def continues(self, key: WindowKey) -> bool:
        return self.inner.continues(key)

    def forget(self, stream: str) -> None:
        self.inner.forget(stream)
        with self._lock:
            self._chains.forget(stream)
            self._songs.pop(stream, None)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        if self._full_windows is None:  # full windows: the embedding graph scores them
            self.inner.warmup(batch_sizes)
        for size in batch_sizes:
            embeddings = np.zeros((size, self.graphs.section.embedding_size), dtype=np.float32)
            if self._embedding_steps is None:
                _, embeddings = self.graphs.embed(
                    np.zeros((size, self.graphs.card.window_samples), dtype=np.float32)
                )
            self.graphs.step(embeddings, self.graphs.section.initial_state(size))

    def describe(self) -> str:
        inner = self.inner.describe()
        if self._full_windows is not None:
            inner += " (the embedding graph's scores)"
        elif self._embedding_steps is None:
            inner += " and the embedding graph"
        return f"{inner}, with a {self.graphs.section.kind} aggregator a stream"


def serve_problem(card: ModelCard, hop_samples: int) -> str | None:
    """Why `tagd serve` cannot publish songs with this card at this hop, or None (also
    what --check-config says)."""
    section = card.aggregator
    if section is None:
        return (
            "aggregate = true, but the model's card has no aggregator; export it with "
            "`tagd-train export CKPT --aggregator RUN/aggregator.pt`"
        )
    if section.hop_samples != hop_samples:
        rate = card.sample_rate
        return (
            f"the aggregator was trained on windows {section.hop_samples / rate:.3f} s apart, "
            f"the hop is {hop_samples / rate:.3f} s; set hop_seconds to "
            f"{section.hop_samples / rate:.3f} or turn aggregate off"
        )
    return None


def aggregating(inner: Scorer, model_path: str | Path, card: ModelCard) -> AggregatingScorer:
    """``inner`` with the model's aggregator beside it; EngineError when the engine is
    remote or ``serve_problem`` says why not."""
    if isinstance(inner, RemoteScorer):
        raise EngineError("aggregate = true needs a local model file, not a remote engine")
    problem = serve_problem(card, inner.hop_samples)
    if problem:
        raise EngineError(problem)
    incremental = isinstance(inner, IncrementalRunner)
    if incremental and not inner.embeds:
        log.info(
            "the incremental graphs give no window embedding: the embedding graph runs beside "
            "each step, a whole window's CNN more a hop; export the model again with "
            "`tagd-train export CKPT --aggregator RUN/aggregator.pt` to step the song for the "
            "price of its aggregator"
        )
    embedding_graph = not (incremental and inner.embeds)
    return AggregatingScorer(
        inner, AggregatorGraphs(model_path, card, embedding_graph=embedding_graph)
    )
