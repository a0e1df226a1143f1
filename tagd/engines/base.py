"""The one interface every inference backend implements: tensors in, tensors out.

An engine takes float32 waveforms ``[batch, window_samples]`` at the card's sample rate
and returns sigmoid scores ``[batch, n_tags]``. Labels, thresholds and smoothing live
elsewhere (tagd.tagger). ``tagd.engines.BACKENDS`` maps each model file suffix to its
backend; optional SDKs are imported inside the backend module so that a missing one
fails at load with the pip extra to install.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from tagd.card import HopGraphs, ModelCard, read_card

if TYPE_CHECKING:
    from tagd.metrics import Metrics
    from tagd.scoring import Scorer, UpdateCounter

log = logging.getLogger(__name__)

# The batch an engine gets when [batching] max_batch is 0. On CPU a batch costs its
# windows' time one after the other and its activations stay in the runtime's arena:
# batching only adds memory and latency. Accelerators amortise a call over the batch.
CPU_MAX_BATCH = 1
ACCELERATOR_MAX_BATCH = 8


class EngineError(RuntimeError):
    """A model could not be loaded or run."""


class Engine(abc.ABC):
    backend: str = "?"  # short name, e.g. "onnxruntime", shown in metrics and logs
    # The `tagd serve` config section holding this backend's options (a dataclass whose
    # ``engine_options(instances)`` gives the keyword arguments of ``load``); None: none.
    options_section: ClassVar[str | None] = None
    # Whether ``incremental`` can return graphs (tagd.incremental), known before loading:
    # `--check-config` says which mode a model will run in without opening it.
    has_incremental_graphs: ClassVar[bool] = False
    # Whether ``run`` and the incremental graphs may be called from several threads at
    # once (ONNX Runtime's sessions): `[batching] instances` then share one loaded engine,
    # each worker running on it with its share of the cores, instead of loading it again.
    concurrent_runs: ClassVar[bool] = False

    def __init__(self, path: Path, card: ModelCard):
        self.path = Path(path)
        self.card = card

    # Largest batch the engine accepts; None for no limit (TensorRT profiles have one).
    max_batch: int | None = None

    @property
    def on_accelerator(self) -> bool:
        """Whether the engine runs on an accelerator (GPU) rather than the CPU."""
        return False

    @property
    def default_max_batch(self) -> int:
        """Windows per call when the configuration leaves it to the engine."""
        return ACCELERATOR_MAX_BATCH if self.on_accelerator else CPU_MAX_BATCH

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Scores ``[batch, n_tags]`` float32 for waveforms ``[batch, window_samples]``."""

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run once per batch size on silence, so the first live window pays nothing."""
        for size in batch_sizes:
            if self.max_batch is not None:
                size = min(size, self.max_batch)
            self.run(np.zeros((size, self.card.window_samples), dtype=np.float32))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory and handles."""

    @classmethod
    def read_card(cls, path: Path) -> ModelCard:
        """The card of a model file without loading the model (`--check-config`);
        CardError when it cannot be read. ONNX metadata or the ``.json`` beside the file."""
        return read_card(path)

    def own_scorer(
        self,
        hop_samples: int,
        incremental: bool = True,
        on_updates: UpdateCounter | None = None,
        metrics: Metrics | None = None,
    ) -> Scorer | None:
        """A scorer of the backend's own (a remote engine keeps the streams' state where
        it runs), or None: ``tagd.incremental.choose_scorer`` picks a local one."""
        return None

    def incremental(self, hop_samples: int) -> IncrementalEngine | None:
        """The incremental graphs exported for this hop (tagd.incremental), or None.

        None when the card names no graphs for the hop; EngineError when it names files
        that are missing or do not match it. Backends without the capability say None.
        """
        return None

    def _incremental_files(
        self, hop_samples: int, what: str, remedy: str
    ) -> tuple[HopGraphs, list[Path]] | None:
        """The card's graph entry for the hop and its prime and step files beside the
        model, or None; EngineError naming ``what`` (graph, plan) and ``remedy`` when one
        is missing."""
        graph = self.card.incremental_graph(hop_samples)
        if graph is None:
            return None
        paths = [self.path.with_name(name) for name in (graph.prime, graph.step)]
        for role, path in zip(("prime", "step"), paths, strict=True):
            if not path.is_file():
                raise EngineError(
                    f"{self.path}: its card names the {role} {what} {path.name} "
                    f"for hop {hop_samples}, which is not beside it; {remedy}, "
                    f"or serve with full windows"
                )
        return graph, paths

    def describe(self) -> str:
        return (
            f"{self.card.name} ({self.card.architecture}, {self.card.precision}) "
            f"on {self.backend} from {self.path}"
        )

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self.card.window_samples:
            raise EngineError(
                f"expected a batch [n, {self.card.window_samples}], got {list(batch.shape)}"
            )
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            raise EngineError(f"batch of {batch.shape[0]} exceeds max_batch {self.max_batch}")
        return batch


class IncrementalEngine(abc.ABC):
    """The two graphs of incremental inference at one hop (trainer.models.incremental).

    ``prime`` scores whole windows and returns the state each stream carries to its next
    window; ``step`` takes windows and the state of each one's previous window (exactly
    one hop earlier) and returns their scores and next state. States are float32 arrays
    ``[batch, *shape]``, one per entry of ``state_shapes``, in that order. Where the
    graphs also give the window embedding (``embeds``: a model exported with an
    aggregator), ``prime_and_embed`` and ``step_and_embed`` return it beside them.
    """

    def __init__(self, card: ModelCard, graph: HopGraphs):
        self.card = card
        self.hop_samples: int = graph.hop_samples
        self.state_names: list[str] = graph.state_names
        self.state_shapes: list[tuple[int, ...]] = graph.state_shapes
        self.state_bytes: int = graph.state_bytes
        self.reused_levels: int = graph.reused_levels
        self.step_macs: int = graph.step_macs
        self.full_macs: int = graph.full_macs
        self.embeds: bool = graph.embedding

    def prime(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Scores ``[batch, n_tags]`` and next states of whole windows."""
        scores, states, _ = self.prime_and_embed(batch)
        return scores, states

    def step(
        self, batch: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Scores and next states of windows one hop after those ``states`` came from."""
        scores, states, _ = self.step_and_embed(batch, states)
        return scores, states

    @abc.abstractmethod
    def prime_and_embed(
        self, batch: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
        """``prime``'s scores and states, and the embeddings ``[batch, D]`` (None where
        the graphs do not give them)."""

    @abc.abstractmethod
    def step_and_embed(
        self, batch: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
        """``step``'s scores and states, and the embeddings (None as ``prime_and_embed``)."""

    def check_states(self, states: list[np.ndarray], batch: int) -> list[np.ndarray]:
        if len(states) != len(self.state_shapes):
            raise EngineError(f"expected {len(self.state_shapes)} state tensors, got {len(states)}")
        checked = []
        for name, shape, state in zip(self.state_names, self.state_shapes, states, strict=True):
            state = np.ascontiguousarray(state, dtype=np.float32)
            if state.shape != (batch, *shape):
                raise EngineError(
                    f"state {name}: expected {[batch, *shape]}, got {list(state.shape)}"
                )
            checked.append(state)
        return checked
