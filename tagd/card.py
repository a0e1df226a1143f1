"""The model card: the one contract between the trainer and the daemon.

A card says everything the daemon may assume about a model: which audio it takes
(sample rate, window length, default hop), what it returns (tag names in output
order, per-tag thresholds) and where it came from (architecture, training data,
scores, export versions) and, for a model with incremental graphs, which graphs
beside it carry a stream from one hop to the next (``IncrementalSection``). It travels
inside an ONNX file as metadata under ``CARD_METADATA_KEY`` and beside a TensorRT plan
as ``<plan>.json``. ``GRAPH_NAMES`` are the tensor names every graph has: export writes
them, the engines and the TensorRT compiler read them.

Cards are plain JSON, never pickle: they come off disk from users.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tagd.windowing import clip_window_starts, min_clip_samples

log = logging.getLogger(__name__)

CARD_SCHEMA_VERSION = 1
CARD_METADATA_KEY = "tagd.card"  # key of the card in ONNX metadata_props
HOP_SNAP_S = 0.002  # a hop in seconds this close to a whole number of frames is snapped to it
# What a model file computes in: float32 as exported, int8 as `tagd-train quantize` writes it
# (QDQ: int8 weights and activations, the front end in float).
FLOAT32, INT8 = "float32", "int8"
PRECISIONS = (FLOAT32, INT8)


class CardError(ValueError):
    """A model card is missing, malformed, or disagrees with its model."""


@dataclass(frozen=True)
class GraphNames:
    """The tensor names of tagd's graphs, the contract between export and the engines.

    The whole-window graph takes ``waveform`` float32 ``[batch, window_samples]`` and
    returns ``scores`` float32 ``[batch, n_tags]`` (sigmoid). The incremental graphs of a
    hop (tagd.incremental): the prime graph takes the waveform and returns the scores and
    ``next_state.<level>`` for each state tensor; the step graph takes the waveform and
    ``state.<level>``… and returns what the prime graph returns. Of a model exported
    with an aggregator (``HopGraphs.embedding``), both also return ``embedding``, last.
    """

    waveform: str = "waveform"
    scores: str = "scores"
    embedding: str = "embedding"  # a window's last hidden layer (the card's ``aggregator``)
    state_input_prefix: str = "state."
    state_output_prefix: str = "next_state."

    def state_inputs(self, levels: Sequence[str]) -> list[str]:
        return [self.state_input_prefix + level for level in levels]

    def state_outputs(self, levels: Sequence[str]) -> list[str]:
        return [self.state_output_prefix + level for level in levels]


GRAPH_NAMES = GraphNames()


def _checked_keys(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` checked to be a JSON object with ``cls``'s fields: no unknown keys, none
    of the required ones missing; CardError naming ``where`` otherwise."""
    if not isinstance(data, dict):
        raise CardError(f"{where} is a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CardError(f"unknown {where} keys: {', '.join(unknown)}")
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise CardError(f"{where} lacks: {', '.join(missing)}")
    return data


@dataclass(frozen=True)
class StateTensor:
    """One tensor of the state a stream carries between hops, without its batch axis."""

    name: str  # the level it keeps, e.g. "block2"; the graphs' tensors add GRAPH_NAMES' prefixes
    shape: tuple[int, ...]  # FCN: channels, frequency rows, columns

    @classmethod
    def from_dict(cls, data: Any, where: str) -> StateTensor:
        data = _checked_keys(cls, data, where)
        return cls(name=data["name"], shape=tuple(data["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape)}


def _stateful_from_dict(cls: type, data: Any, where: str) -> Any:
    """A graph entry with a ``state`` list of StateTensors (``HopGraphs``,
    ``AggregatorSection``) from its JSON object; CardError naming ``where``."""
    data = _checked_keys(cls, data, where)
    state = data["state"]
    if not isinstance(state, list):
        raise CardError(f"{where}.state is a list, got {type(state).__name__}")
    tensors = tuple(
        StateTensor.from_dict(tensor, f"{where}.state[{i}]") for i, tensor in enumerate(state)
    )
    return cls(**{**data, "state": tensors})


def _stateful_to_dict(entry: Any) -> dict[str, Any]:
    """The JSON object of such an entry; ``max_abs_diff`` only where parity was checked."""
    data = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}
    data["state"] = [tensor.to_dict() for tensor in entry.state]
    if entry.max_abs_diff is None:
        del data["max_abs_diff"]
    return data


@dataclass(frozen=True)
class HopGraphs:
    """The prime and step graphs exported for one hop, files beside the model."""

    hop_samples: int
    prime: str  # file name: a whole window → scores and state
    step: str  # file name: a window and the last one's state → scores and the next state
    state: tuple[StateTensor, ...]
    state_bytes: int  # of one stream's state
    reused_levels: int  # log-mel frames and conv blocks taken from the state
    step_macs: int  # multiply-accumulates of one step
    full_macs: int  # of one whole window
    max_abs_diff: float | None = None  # export's parity check of the chain; None: not run
    # Both graphs also output the window's embedding (exported with an aggregator); a
    # card without the key has none and writes back without it.
    embedding: bool = False

    @property
    def state_names(self) -> list[str]:
        return [tensor.name for tensor in self.state]

    @property
    def state_shapes(self) -> list[tuple[int, ...]]:
        return [tensor.shape for tensor in self.state]

    @property
    def prime_inputs(self) -> list[str]:
        return [GRAPH_NAMES.waveform]

    @property
    def step_inputs(self) -> list[str]:
        return [GRAPH_NAMES.waveform, *GRAPH_NAMES.state_inputs(self.state_names)]

    @property
    def outputs(self) -> list[str]:
        """Of the prime and the step graph alike: the scores, the next state, then the
        window's embedding where the graphs give it."""
        embedding = [GRAPH_NAMES.embedding] if self.embedding else []
        return [GRAPH_NAMES.scores, *GRAPH_NAMES.state_outputs(self.state_names), *embedding]

    @classmethod
    def from_dict(cls, data: Any, where: str) -> HopGraphs:
        graph = _stateful_from_dict(cls, data, where)
        if not isinstance(graph.embedding, bool):
            raise CardError(f"{where}.embedding is true or false, got {graph.embedding!r}")
        return graph

    def to_dict(self) -> dict[str, Any]:
        data = _stateful_to_dict(self)
        if not self.embedding:
            del data["embedding"]
        return data


@dataclass(frozen=True)
class IncrementalSection:
    """The card's ``incremental`` section: what incremental inference (tagd.incremental)
    may reuse at a hop, and the graphs exported for some hops. Empty for a model family
    without incremental graphs (written ``{}``)."""

    # Samples per column of each level (log-mel frames, then each conv block): a hop
    # that is a multiple of time_strides[i] can reuse levels 0..i.
    time_strides: tuple[int, ...] = ()
    graphs: tuple[HopGraphs, ...] = ()  # one per hop exported

    def graph(self, hop_samples: int) -> HopGraphs | None:
        return next((g for g in self.graphs if g.hop_samples == hop_samples), None)

    @property
    def hops(self) -> list[int]:
        return [graph.hop_samples for graph in self.graphs]

    @classmethod
    def from_dict(cls, data: Any) -> IncrementalSection:
        data = _checked_keys(cls, data, "incremental")
        graphs = data.get("graphs", [])
        if not isinstance(graphs, list):
            raise CardError(f"incremental.graphs is a list, got {type(graphs).__name__}")
        return cls(
            time_strides=tuple(data.get("time_strides", ())),
            graphs=tuple(
                HopGraphs.from_dict(graph, f"incremental.graphs[{i}]")
                for i, graph in enumerate(graphs)
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        if not self.time_strides and not self.graphs:
            return {}
        return {
            "time_strides": list(self.time_strides),
            "graphs": [graph.to_dict() for graph in self.graphs],
        }


@dataclass(frozen=True)
class AggregatorSection:
    """The card's ``aggregator`` section, present only for a model exported with one: a
    song-level aggregator over window embeddings (trainer.models.aggregator) and the two
    graphs beside the model that run it.

    ``embedding_graph`` takes ``waveform`` and returns ``scores`` (as the model's graph)
    and ``embedding`` float32 ``[batch, embedding_size]``. ``graph`` takes ``embedding``
    and ``state.<name>``… and returns ``scores`` (the song so far, sigmoid) and
    ``next_state.<name>``…; a song's state starts at zeros and advances one step per
    window, the windows ``hop_samples`` apart (the hop it was trained at).
    """

    kind: str  # "lstm" (the thesis's) or "mean" (bag of frames)
    embedding_layer: str  # which layer of the model the embedding is
    embedding_size: int
    embedding_graph: str  # file name beside the model
    graph: str  # file name beside the model
    hop_samples: int
    state: tuple[StateTensor, ...]
    scores: dict[str, Any] = field(default_factory=dict)  # held-out: aggregator vs average
    max_abs_diff: float | None = None  # export's parity check; None: not run

    @property
    def state_names(self) -> list[str]:
        return [tensor.name for tensor in self.state]

    @property
    def inputs(self) -> list[str]:
        return [GRAPH_NAMES.embedding, *GRAPH_NAMES.state_inputs(self.state_names)]

    @property
    def outputs(self) -> list[str]:
        return [GRAPH_NAMES.scores, *GRAPH_NAMES.state_outputs(self.state_names)]

    def initial_state(self, batch: int = 1) -> list[np.ndarray]:
        """Zeros: the state before a song's (or a stream's) first window."""
        return [np.zeros((batch, *tensor.shape), dtype=np.float32) for tensor in self.state]

    @classmethod
    def from_dict(cls, data: Any) -> AggregatorSection:
        return _stateful_from_dict(cls, data, "aggregator")

    def to_dict(self) -> dict[str, Any]:
        return _stateful_to_dict(self)


@dataclass
class ModelCard:
    name: str  # a human name for this trained model, e.g. "fcn4-mtt"
    architecture: str  # registry name in trainer.models, e.g. "fcn4"
    sample_rate: int  # Hz of the waveform the model takes
    window_samples: int  # samples per input window
    hop_samples: int  # default hop between windows when streaming
    tags: list[str]  # output order
    thresholds: list[float] = field(default_factory=list)  # per tag; 0.5 when not tuned
    # Audio one clip-level prediction covers. FCN: one window. Sample-level models:
    # the mean of the segments covering the last ~29.1 s, as in Lee et al. 2017.
    clip_seconds: float = 0.0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    # Incremental streaming inference (tagd.incremental): the strides of the levels a hop
    # can reuse, and per hop exported the prime and step files beside the model, the
    # state tensors a stream carries between hops and the multiply-accumulates per update.
    incremental: IncrementalSection = field(default_factory=IncrementalSection)
    # Tags that cannot hold together: a tag is off while any tag it names is on
    # ("instrumental" means music with no voice: off while "speech" is on). Written only
    # when not empty; applied by ``exclude`` wherever on/off is decided.
    excludes: dict[str, list[str]] = field(default_factory=dict)
    # The arithmetic of the file the card travels with (PRECISIONS); written only when not
    # float32, so a card from before quantization reads and writes back as it was.
    precision: str = FLOAT32
    # A song-level aggregator and its graphs (``AggregatorSection``); written only when
    # there is one, so a card without one reads and writes back as it was.
    aggregator: AggregatorSection | None = None
    schema_version: int = CARD_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.thresholds:
            self.thresholds = [0.5] * len(self.tags)
        self.validate()
        if not self.clip_seconds:
            self.clip_seconds = self.window_samples / self.sample_rate

    # -- derived -----------------------------------------------------------------
    @property
    def n_tags(self) -> int:
        return len(self.tags)

    @property
    def window_seconds(self) -> float:
        return self.window_samples / self.sample_rate

    @property
    def hop_seconds(self) -> float:
        return self.hop_samples / self.sample_rate

    @property
    def windows_per_clip(self) -> int:
        """How many windows, one hop apart, a clip-level prediction averages."""
        if self.clip_seconds <= self.window_seconds:
            return 1
        extra = self.clip_seconds * self.sample_rate - self.window_samples
        return 1 + int(extra // self.hop_samples)

    @property
    def min_clip_samples(self) -> int:
        """The shortest file ``tagd tag`` and evaluation score (tagd.windowing's rule)."""
        return min_clip_samples(self.window_samples)

    def incremental_graph(self, hop_samples: int) -> HopGraphs | None:
        """The incremental graphs exported for ``hop_samples``, if any (see ``incremental``)."""
        return self.incremental.graph(hop_samples)

    def hop_from_seconds(self, seconds: float) -> int:
        """A hop given in seconds, in samples: one within HOP_SNAP_S of a whole number of
        the model's frames is taken as that number (``--hop 3.413`` is 40,960 samples,
        FCN-4's aligned hop, not the 40,956 it rounds to), so incremental inference can
        reuse what the hop allows."""
        samples = max(1, round(seconds * self.sample_rate))
        strides = self.incremental.time_strides
        if strides:
            snapped = max(strides[0], round(samples / strides[0]) * strides[0])
            if abs(snapped - samples) <= HOP_SNAP_S * self.sample_rate:
                return snapped
        return samples

    def reusable_levels(self, hop_samples: int) -> int:
        """How many levels (log-mel frames, then conv blocks) a hop lets a stream reuse."""
        count = 0
        for stride in self.incremental.time_strides:
            if hop_samples % stride:
                break
            count += 1
        return count

    def clip_window_starts(self, length: int, hop_samples: int | None = None) -> range:
        """Where the windows of a ``length``-sample clip start, at the card's hop by default."""
        return clip_window_starts(length, self.window_samples, hop_samples or self.hop_samples)

    # -- checks ------------------------------------------------------------------
    def over(self, scores: np.ndarray) -> np.ndarray:
        """Which tags ``scores`` (``[..., n_tags]``) put on: at or over their thresholds,
        less the exclusions."""
        return self.exclude(np.asarray(scores) >= np.asarray(self.thresholds, dtype=np.float32))

    def exclude(self, on: np.ndarray) -> np.ndarray:
        """``on`` (bool, ``[..., n_tags]``) less the card's exclusions (``exclusions_applied``)."""
        return exclusions_applied(on, self.tags, self.excludes)

    def validate(self) -> None:
        problems = []
        if self.schema_version > CARD_SCHEMA_VERSION:
            problems.append(
                f"schema_version {self.schema_version} is newer than this tagd "
                f"understands ({CARD_SCHEMA_VERSION}); upgrade tagd"
            )
        for key in ("sample_rate", "window_samples", "hop_samples"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{key} must be a positive integer, got {value!r}")
        if not self.tags:
            problems.append("tags must name at least one tag")
        elif len(set(self.tags)) != len(self.tags):
            problems.append("tags must be unique")
        if len(self.thresholds) != len(self.tags):
            problems.append(
                f"thresholds has {len(self.thresholds)} values for {len(self.tags)} tags"
            )
        elif not all(0.0 <= float(t) <= 1.0 for t in self.thresholds):
            problems.append("thresholds must lie in [0, 1]")
        for tag, by in self.excludes.items():
            unknown = [t for t in [tag, *by] if t not in self.tags]
            if unknown or tag in by or not by:
                problems.append(
                    f"excludes[{tag!r}] must name other tags of the card, got {by!r}"
                    + (f" (not tags: {', '.join(unknown)})" if unknown else "")
                )
        if self.precision not in PRECISIONS:
            problems.append(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.aggregator is None and any(g.embedding for g in self.incremental.graphs):
            problems.append(
                "incremental graphs give an embedding but the card has no aggregator section "
                "to say its size"
            )
        if problems:
            raise CardError("invalid model card: " + "; ".join(problems))

    def check_io(self, input_shape: list, output_shape: list, source: str) -> None:
        """Refuse a model whose I/O shapes disagree with this card.

        Shapes come from the engine; symbolic dimensions (batch) are strings or None
        or -1 and are not checked.
        """

        def fixed(dim: Any) -> bool:
            return isinstance(dim, int) and dim > 0

        if len(input_shape) != 2 or len(output_shape) != 2:
            raise CardError(
                f"{source}: expected input [batch, samples] and output [batch, tags], "
                f"engine has input {input_shape} and output {output_shape}"
            )
        if fixed(input_shape[1]) and input_shape[1] != self.window_samples:
            raise CardError(
                f"{source}: engine input takes {input_shape[1]} samples per window but "
                f"the card says window_samples={self.window_samples}"
            )
        if fixed(output_shape[1]) and output_shape[1] != self.n_tags:
            raise CardError(
                f"{source}: engine outputs {output_shape[1]} scores but the card "
                f"names {self.n_tags} tags"
            )

    # -- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (str subclasses such as torch's version become str)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["incremental"] = self.incremental.to_dict()
        if not self.excludes:  # a card without exclusions reads as it did before them
            del data["excludes"]
        if self.precision == FLOAT32:  # and one of a float32 model as before precisions
            del data["precision"]
        if self.aggregator is None:
            del data["aggregator"]
        else:
            data["aggregator"] = self.aggregator.to_dict()
        return json.dumps(data, indent=2, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if not isinstance(data, dict):
            raise CardError(f"a model card is a JSON object, got {type(data).__name__}")
        data = _checked_keys(cls, data, "model card")
        try:
            incremental = IncrementalSection.from_dict(data.get("incremental", {}))
            aggregator = data.get("aggregator")
            if aggregator is not None:
                aggregator = AggregatorSection.from_dict(aggregator)
            return cls(**{**data, "incremental": incremental, "aggregator": aggregator})
        except TypeError as exc:
            raise CardError(f"malformed model card: {exc}") from exc

    @classmethod
    def from_json(cls, text: str, source: str = "card") -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CardError(f"{source}: model card is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


def exclusions_applied(
    on: np.ndarray, tags: Sequence[str], excludes: dict[str, list[str]]
) -> np.ndarray:
    """``on`` (bool, ``[..., len(tags)]``) with each tag of ``excludes`` turned off where a
    tag it names is on. Applied once: a tag turned off excludes nothing."""
    if not excludes:
        return on
    tags = list(tags)
    out = on.copy()
    for tag, by in excludes.items():
        blocking = np.any(on[..., [tags.index(b) for b in by]], axis=-1)
        out[..., tags.index(tag)] &= ~blocking
    return out


def sidecar_path(model_path: str | Path) -> Path:
    """Where the card of a non-ONNX model file lives: ``fcn4.plan`` → ``fcn4.plan.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def read_card(model_path: str | Path) -> ModelCard:
    """Read the card of a model file: ONNX metadata, else the ``.json`` beside it."""
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        return onnx_card(model_path, _onnx_metadata(model_path))
    sidecar = sidecar_path(model_path)
    if not sidecar.exists():
        raise CardError(
            f"{model_path} has no model card: expected {sidecar} beside it "
            f"(`tagd-train compile` writes it)"
        )
    return ModelCard.from_json(sidecar.read_text(), source=str(sidecar))


def onnx_card(model_path: Path, metadata: dict[str, str]) -> ModelCard:
    """The card of an ONNX model from its metadata (an ONNX Runtime session's
    ``custom_metadata_map``), else from the ``.json`` beside it: the one rule for
    ``read_card`` and the ONNX engine, which has a session already."""
    text = metadata.get(CARD_METADATA_KEY)
    if text is not None:
        return ModelCard.from_json(text, source=str(model_path))
    sidecar = sidecar_path(model_path)
    if sidecar.exists():
        return ModelCard.from_json(sidecar.read_text(), source=str(sidecar))
    raise CardError(
        f"{model_path} carries no model card (metadata key {CARD_METADATA_KEY!r}) "
        f"and there is no {sidecar.name} beside it; export it with `tagd-train export`"
    )


def _onnx_metadata(model_path: Path) -> dict[str, str]:
    # onnxruntime reads metadata without loading the onnx package (a train-extra
    # dependency the daemon goes without); a one-thread session on the CPU is cheap next
    # to running one.
    from tagd.engines import EngineError
    from tagd.engines.onnx import open_session

    try:
        session = open_session(model_path, threads=1, providers=["CPUExecutionProvider"])
    except EngineError as exc:
        raise CardError(f"not a readable ONNX model: {exc}") from exc
    return dict(session.get_modelmeta().custom_metadata_map)
