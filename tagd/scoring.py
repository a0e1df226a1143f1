"""Scoring windows: the one interface `tagd serve`, `tagd tag` and any engine to come use.

A ``Scorer`` takes batches of windows of any streams and returns their scores. Two modes
implement it, each named once here: ``FULL`` computes every window whole
(``FullWindows``), ``INCREMENTAL`` scores a window from its stream's last one
(tagd.incremental's ``IncrementalRunner``). The names are the values of
``tagd_window_updates_total{mode}`` and ``tagd_engine_info{inference}``.
``tagd.incremental.choose_scorer`` is where a mode is chosen; ``resolve_hop`` is the hop
in samples that both commands and ``--check-config`` use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from tagd.card import ModelCard
    from tagd.engines.base import Engine

INCREMENTAL = "incremental"  # from the stream's last window's state
FULL = "full"  # the whole window

# ``on_updates(mode, count)``: a scorer tells how many windows it scored in each mode.
UpdateCounter = Callable[[str, int], None]


class WindowKey(Protocol):
    """What a scorer needs of a window: whose it is and where it lies in the stream."""

    stream: str
    epoch: int
    start: int


@dataclass(frozen=True)
class WindowAt:
    """A ``WindowKey`` of its own, for windows that are not a stream's (a file's, a test's)."""

    stream: str
    epoch: int
    start: int


class Scorer(Protocol):
    """Scores of windows of any streams, a stream's windows ``hop_samples`` apart.

    What an implementation guarantees:

    - **The full windows' scores.** Each row ``run`` returns is what the engine's
      whole-window inference gives for that window (within the export's parity check,
      1e-4), whatever came before it: a stream's first window, one after a gap, a
      restart (a new epoch) or a dropped window.
    - **A stream's windows in order.** It may rely on its callers handing over a stream's
      windows in stream order and none while another of them is being scored (the
      batcher's rule, and `tagd tag`'s); a batch may hold consecutive windows of one
      stream. Different streams' windows may be scored on different instances at once.
    - **State bounded by forget.** It keeps at most ``state_bytes`` for a stream between
      calls, and nothing once ``forget(stream)`` has dropped it.
    """

    mode: str  # INCREMENTAL or FULL: tagd_engine_info{inference}
    hop_samples: int
    state_bytes: int  # kept per stream between its windows; 0: nothing
    carries_state: bool  # continues() can be true: a batcher should run those first
    # How many consecutive windows of one stream are worth one engine call; None: any.
    max_consecutive: int | None

    def run(self, keys: Sequence[WindowKey], batch: np.ndarray, instance: int = 0) -> np.ndarray:
        """Scores ``[len(keys), n_tags]`` of ``batch`` ``[len(keys), window_samples]`` (a
        row per key), on the engine instance ``instance``."""
        ...

    def continues(self, key: WindowKey) -> bool:
        """Whether the window would be scored from its stream's state, not in full."""
        ...

    def forget(self, stream: str) -> None:
        """Drop what is kept for ``stream``: its next window is scored as a first."""
        ...

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run what ``run`` runs once per batch size on silence, on every instance."""
        ...

    def describe(self) -> str:
        """The mode in a few words, for the start-up log."""
        ...


@runtime_checkable
class RemoteScorer(Scorer, Protocol):
    """A Scorer whose inference runs on other machines (tagd.engines.triton): it also
    says how long each window was away, for ``latency_ms.remote`` (docs/topics.md)."""

    def round_trips(self) -> np.ndarray:
        """Seconds from sending each row of the calling thread's last ``run`` to its
        answer, ``[rows]``: network, the server's queue and its inference."""
        ...


class FullWindows:
    """Every window through its engine instance's whole-window inference; nothing kept."""

    mode = FULL
    state_bytes = 0
    carries_state = False

    def __init__(
        self, engines: Sequence[Engine], hop_samples: int, on_updates: UpdateCounter | None = None
    ):
        """One engine per instance; ``on_updates`` as ``IncrementalRunner``'s."""
        self.engines = list(engines)
        self.hop_samples = hop_samples
        self.max_consecutive = self.engines[0].max_batch
        self._on_updates = on_updates

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        for engine in dict.fromkeys(self.engines):  # one that instances share: once
            engine.warmup(batch_sizes)

    def run(self, keys: Sequence[WindowKey], batch: np.ndarray, instance: int = 0) -> np.ndarray:
        scores = self.engines[instance].run(batch)
        self.count(len(keys))
        return scores

    def count(self, windows: int) -> None:
        """Tell ``on_updates`` of ``windows`` full windows scored (also where another
        graph scored them for this scorer: tagd.aggregate's embedding graph)."""
        if self._on_updates is not None:
            self._on_updates(FULL, windows)

    def continues(self, key: WindowKey) -> bool:
        return False

    def forget(self, stream: str) -> None:
        pass

    def describe(self) -> str:
        return "full windows"


def resolve_hop(card: ModelCard, seconds: float | None) -> int:
    """The hop in samples: ``seconds`` (``--hop``, ``hop_seconds``) as the card snaps it
    to its frames (``ModelCard.hop_from_seconds``), or the card's own hop."""
    return card.hop_samples if seconds is None else card.hop_from_seconds(seconds)
