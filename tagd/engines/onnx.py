"""ONNX Runtime backend: CPU by default, CUDA when onnxruntime-gpu provides it.

Session options that matter on a small CPU shared with ingest (docs/design.md has the
measurements), set in ``[onnxruntime]`` (``OnnxRuntimeConfig``, this backend's options):

- ``spinning``: ONNX Runtime's pool threads spin between the parallel parts of a run
  (faster than sleeping and waking) and, by ONNX Runtime's default, for a while after
  the run too, waiting for the next: in a daemon that runs a window every few tens of
  ms, CPU taken from the threads that read and publish streams. ``while_running`` (the
  default) spins during a run and stops when it returns, ``never`` does not spin at
  all, ``always`` is ONNX Runtime's default.
- ``intra_op_threads``: 0 lets ONNX Runtime take one thread per core.
- ``memory_arena``: the CPU arena keeps the activations of the largest batch run for
  the next; without it every run allocates afresh (slower).

``open_session`` is the one place a session is set up: the engine, the card's metadata
read, the export's parity checks and the benchmarks all open theirs through it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from tagd.card import GRAPH_NAMES, CardError, HopGraphs, ModelCard, onnx_card
from tagd.engines.base import Engine, EngineError, IncrementalEngine
from tagd.schema import Table

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
# spinning → (allow_spinning, force_spinning_stop) of the intra- and inter-op pools
SPINNING = {"while_running": ("1", "1"), "never": ("0", "0"), "always": ("1", "0")}
MAX_ENGINE_THREADS = 256
# ONNX Runtime moves a QDQ model's QuantizeLinear above a MaxPool so the pool runs on
# uint8, unblocked: for an int8 FCN-4 (tagd-train quantize keeps its first block float)
# that made a full window 1.4x float32's speed instead of 2.2x. No effect on float graphs.
DISABLED_OPTIMIZERS = ["QDQPropagationTransformer"]


def resolve_threads(configured: int | None = None, instances: int = 1) -> int:
    """Intra-op threads for each of ``instances`` sessions; 0 lets ONNX Runtime choose.

    ``configured``, else TAGD_ORT_THREADS, else one per core for a single session and
    the cores shared out among several (each taking them all would oversubscribe).
    """
    threads = configured or int(os.environ.get("TAGD_ORT_THREADS", "0"))
    if threads or instances <= 1:
        return threads
    return max(1, (os.cpu_count() or 1) // instances)


def open_session(
    path: str | Path,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    spinning: str = "while_running",
    memory_arena: bool = True,
):
    """An ONNX Runtime session of ``path``: the options above, graph optimisation on.

    ``threads`` 0 or None: TAGD_ORT_THREADS, else one per core (``resolve_threads``);
    ``providers`` None: CUDA where onnxruntime-gpu has it, else the CPU. EngineError when
    onnxruntime is missing or cannot load the file.
    """
    if spinning not in SPINNING:
        raise EngineError(f"spinning={spinning!r}: use one of {', '.join(SPINNING)}")
    # ONNX Runtime's Linux builds (1.29 on) send telemetry and keep a device id under
    # HOME, warning on stderr (before tagd says anything) when HOME is not writable, as
    # for a daemon's own user; tagd opts out unless ORT_DISABLE_TELEMETRY is set, read
    # once, before its environment starts (docs/deploy.md)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime as ort
    except ImportError:
        from tagd.engines import missing_sdk

        raise missing_sdk("onnxruntime", "onnxruntime") from None

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    resolved = resolve_threads(threads)
    if resolved:
        options.intra_op_num_threads = resolved
    options.enable_cpu_mem_arena = memory_arena
    allow_spinning, stop_after_run = SPINNING[spinning]
    for pool in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{pool}.allow_spinning", allow_spinning)
    options.add_session_config_entry("session.force_spinning_stop", stop_after_run)
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in PREFERRED_PROVIDERS if p in available]
    try:
        return ort.InferenceSession(
            str(path),
            sess_options=options,
            providers=list(providers),
            disabled_optimizers=DISABLED_OPTIMIZERS,
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise EngineError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc


class OnnxRuntimeConfig(Table):
    """Session options of the ONNX Runtime engine (.onnx models; other engines ignore them)."""

    threads: int = Field(
        0,
        ge=0,
        le=MAX_ENGINE_THREADS,
        description="Intra-op threads of each instance; 0: TAGD_ORT_THREADS if set, else one "
        "per core, shared out among `[batching]` instances.",
    )
    spinning: Literal[tuple(SPINNING)] = Field(
        "while_running",
        description="Pool threads spin while a run lasts and stop when it returns "
        '("while_running"), never spin ("never"), or spin on after each run ("always", '
        "ONNX Runtime's default: CPU taken from ingest).",
    )
    memory_arena: bool = Field(
        True, description="Reuse activation memory across runs (faster; keeps the RSS)."
    )

    def engine_options(self, instances: int = 1) -> dict[str, Any]:
        """Keyword arguments of ``OnnxEngine.load`` for each of ``instances`` instances."""
        threads = resolve_threads(self.threads, instances)
        return {
            "intra_op_threads": threads,
            "spinning": self.spinning,
            "memory_arena": self.memory_arena,
        }


class OnnxEngine(Engine):
    backend = "onnxruntime"
    options_section = "onnxruntime"
    has_incremental_graphs = True
    concurrent_runs = True  # a session's Run is thread-safe

    def __init__(self, path: Path, card: ModelCard, session, settings: dict[str, Any]):
        super().__init__(path, card)
        self._session = session
        self._settings = settings  # open_session's arguments, for the incremental graphs too
        self._input_name = session.get_inputs()[0].name
        self._output_name = session.get_outputs()[0].name
        self.providers = session.get_providers()

    @property
    def on_accelerator(self) -> bool:
        return self.providers != ["CPUExecutionProvider"]

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        spinning: str = "while_running",
        memory_arena: bool = True,
    ) -> OnnxEngine:
        """Load ``path``; ``intra_op_threads`` 0 or None: TAGD_ORT_THREADS, else one per core."""
        settings = {
            "threads": resolve_threads(intra_op_threads),
            "providers": providers,
            "spinning": spinning,
            "memory_arena": memory_arena,
        }
        session = open_session(path, **settings)
        settings["providers"] = session.get_providers()  # the graphs' sessions use the same
        card = onnx_card(path, dict(session.get_modelmeta().custom_metadata_map))
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise CardError(
                f"{path}: expected one input and one output, found "
                f"{[i.name for i in inputs]} → {[o.name for o in outputs]}"
            )
        card.check_io(list(inputs[0].shape), list(outputs[0].shape), source=str(path))
        engine = cls(path, card, session, settings)
        log.info("loaded %s with providers %s", engine.describe(), engine.providers)
        return engine

    def incremental(self, hop_samples: int) -> OnnxIncremental | None:
        """The prime and step graphs for ``hop_samples``, loaded with this engine's options.

        The prime graph is the full network with the state as extra outputs, so from then
        on ``run`` scores full windows with it and the main model's session is released:
        each session holds its own copy of the weights (FCN-4: about 100 MB).
        """
        found = self._incremental_files(hop_samples, "graph", "export again")
        if found is None:
            return None
        graph, paths = found
        self._session = None  # before loading the graphs: never three copies of the weights
        sessions = [open_session(path, **self._settings) for path in paths]
        incremental = OnnxIncremental(self.card, graph, *sessions)
        self._session = sessions[0]  # its first output is the scores, as the model's
        return incremental

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = self._check_batch(batch)
        (scores,) = self._session.run([self._output_name], {self._input_name: batch})
        return np.asarray(scores, dtype=np.float32)


class OnnxIncremental(IncrementalEngine):
    """Prime and step graphs on ONNX Runtime, with the main model's session options."""

    def __init__(self, card: ModelCard, graph: HopGraphs, prime, step):
        super().__init__(card, graph)
        self._prime, self._step = prime, step
        for name, session, expected in (
            (graph.prime, prime, graph.prime_inputs),
            (graph.step, step, graph.step_inputs),
        ):
            found = [i.name for i in session.get_inputs()]
            if found != expected:
                raise EngineError(
                    f"{name}: inputs {found}, the card says {expected}; export the model again"
                )
        self._step_inputs = graph.step_inputs
        self._outputs = graph.outputs

    def prime_and_embed(self, batch: np.ndarray):
        return self._split(self._prime.run(self._outputs, {GRAPH_NAMES.waveform: batch}))

    def step_and_embed(self, batch: np.ndarray, states: list[np.ndarray]):
        feeds = dict(
            zip(self._step_inputs, [batch, *self.check_states(states, len(batch))], strict=True)
        )
        return self._split(self._step.run(self._outputs, feeds))

    def _split(self, outputs: list[np.ndarray]):
        """(scores, states, embeddings or None) of the graph's outputs, in the card's order."""
        scores, *states = outputs
        embeddings = states.pop() if self.embeds else None
        return scores, states, embeddings
