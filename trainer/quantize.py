"""Static int8 quantization of an exported model (``tagd-train quantize``).

ONNX Runtime's static quantization in QDQ form: QuantizeLinear/DequantizeLinear pairs
around the convolutions and the head, int8 weights per output channel, uint8 activations
with ranges calibrated (MinMax) on windows of a prepared training set. ONNX Runtime on a
CPU with VNNI fuses each QDQ pair into an integer kernel. TensorRT builds int8 engines
from QDQ graphs whose activations are symmetric int8: ``symmetric=True`` writes those.

What stays float: the log-mel front end (the STFT as a convolution, the mel matrix, the
log, the input BatchNorm) and the first block (convolution, ReLU, pool). They are found by
structure, not by name (the step graphs name their nodes differently): every convolution
over a single channel (the STFT's, the first layer's), every node they depend on, and
the ReLU and pool after it. tagd's ONNX Runtime sessions keep the QDQ pairs where they
are written (tagd.engines.onnx.DISABLED_OPTIMIZERS).

The incremental prime and step graphs the card names are quantized the same way, the
step graph calibrated on the state the float prime graph hands it, so a stream's state
is float between hops. Two parity checks run on windows of the validation split (not
the calibration windows): int8 full windows against float32 (``max_abs_diff`` in the
card's ``export.quantization``), and the int8 chain prime + steps against int8 full
windows (each graph's ``max_abs_diff``). Each is refused past its tolerance.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tagd.card import CARD_METADATA_KEY, GRAPH_NAMES, INT8, HopGraphs, ModelCard, read_card
from tagd.engines.onnx import open_session
from trainer.data.dataset import DataError, PreparedData, to_float
from trainer.export import ExportError, incremental_paths

log = logging.getLogger(__name__)

# Calibration windows. A trained FCN-5 calibrated on its rendered training set moved the
# scores of real recordings (which it never saw) by up to 0.38 with 64 windows drawn with
# repeats, 0.087 with 64 from as many clips, 0.043 with 256 (0.021 at the 90th percentile).
DEFAULT_WINDOWS = 256
PARITY_WINDOWS = 8  # validation windows each parity check runs
PARITY_HOPS = 4  # steps the int8 chain runs after its prime
# Refused past these (max abs difference of sigmoid scores): int8 rounding moves a
# trained FCN's scores by about 0.01-0.03; more means a range calibrated on unlike audio.
FLOAT_TOLERANCE = 0.1  # int8 full windows against float32
CHAIN_TOLERANCE = 0.1  # the int8 chain against int8 full windows
# Only these carry QDQ pairs; the state slicing, padding and concatenation of the step
# graphs stay float (quantizing every op made FCN-4's step graph 1.7x float32, these 2.5x).
QUANTIZED_OPS = ("Conv", "Gemm", "MaxPool", "Relu")
# Kept float after the first convolution: its map is the widest (FCN-4: 128 x 96 x 1366);
# requantizing it before the pool cost more than the int8 convolutions saved (about half
# of an int8 window's time in ONNX Runtime's profile).
FLOAT_FOLLOWERS = ("Relu", "MaxPool")


class QuantizeError(ExportError):
    """The model cannot be quantized, or its int8 scores stray past the tolerance."""


@dataclass(frozen=True)
class Recipe:
    """How to calibrate: how many windows, which, and what kind of activations."""

    windows: int = DEFAULT_WINDOWS
    seed: int = 0
    # uint8 activations with a zero point (False) are what ONNX Runtime's CPU kernels run
    # fastest (FCN-4: 175 ms a window, 353 ms symmetric); TensorRT takes only symmetric
    # int8 activations (zero point 0).
    symmetric: bool = False
    progress: bool = True

    @property
    def activations(self) -> str:
        return "int8 symmetric" if self.symmetric else "uint8"


@dataclass
class QuantizeResult:
    path: Path
    card: ModelCard
    max_abs_diff: float  # int8 full windows against float32, on validation windows
    mean_abs_diff: float


def int8_path(path: Path) -> Path:
    """Where the int8 model of ``path`` goes by default: ``fcn4.onnx`` → ``fcn4.int8.onnx``."""
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept in float: every convolution over one input channel (the
    STFT front end's, the first layer's), all the nodes it depends on, and the ReLU and
    pool that follow it (``FLOAT_FOLLOWERS``)."""
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    producer = {output: node for node in model.graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def single_channel(node: onnx.NodeProto) -> bool:
        weight = weights.get(node.input[1]) if len(node.input) > 1 else None
        return weight is not None and len(weight.dims) >= 3 and weight.dims[1] == 1

    first = [n for n in model.graph.node if n.op_type == "Conv" and single_channel(n)]
    if not first:
        raise QuantizeError("found no single-channel convolution (front end or first layer)")
    kept: dict[str, onnx.NodeProto] = {}
    pending = list(first)
    while pending:
        node = pending.pop()
        if node.name in kept:
            continue
        kept[node.name] = node
        pending.extend(producer[name] for name in node.input if name in producer)
    for node in first:
        following = consumers.get(node.output[0], [])
        while len(following) == 1 and following[0].op_type in FLOAT_FOLLOWERS:
            kept[following[0].name] = following[0]
            following = consumers.get(following[0].output[0], [])
    return sorted(kept)


def stream_runs(
    data: PreparedData, split: str, count: int, samples: int, seed: int
) -> Iterator[np.ndarray]:
    """``count`` stretches of ``samples`` float32 audio from clips of ``split`` in random
    order at random offsets, a clip shorter than that repeated end to end: never padded with
    silence, whose log-mel lies far below music's and would stretch the ranges."""
    clips = data.indices(split)
    if not clips:
        raise DataError(f"{data.root}: no {split} clips to take windows from")
    rng = np.random.default_rng(seed)
    # every clip once before any twice: the ranges see as many kinds of audio as they can
    order = np.concatenate([rng.permutation(clips) for _ in range(-(-count // len(clips)))])
    for i in order[:count]:
        clip = to_float(data.audio(int(i)))
        start = int(rng.integers(0, len(clip)))
        yield np.resize(np.roll(clip, -start), samples)


class WindowReader:
    """ONNX Runtime's CalibrationDataReader over ``total`` feeds made as they are asked
    for (FCN-4: 1.4 MB a window, 2.7 MB with a step's state), with a progress bar."""

    def __init__(
        self, feeds: Iterable[dict[str, np.ndarray]], total: int, what: str, progress: bool
    ):
        from tqdm import tqdm

        self._feeds = iter(
            tqdm(feeds, total=total, desc=f"calibrate {what}", unit="window", disable=not progress)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_graph(
    source: Path,
    target: Path,
    feeds: Iterable[dict[str, np.ndarray]],
    recipe: Recipe,
) -> int:
    """Write ``source`` statically quantized to ``target``; how many nodes stay float."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        # shape inference and ORT's constant folding first: the step graphs' conv biases
        # become initializers, which QDQ needs to quantize a conv at all
        prepared = Path(scratch) / source.name
        quant_pre_process(str(source), str(prepared))
        model = onnx.load(str(prepared))
        keep = float_nodes(model)
        quantize_static(
            model,
            str(target),
            WindowReader(feeds, recipe.windows, source.name, recipe.progress),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QInt8 if recipe.symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep,
            extra_options={"ActivationSymmetric": recipe.symmetric},
        )
    return len(keep)


def window_stack(runs: list[np.ndarray], size: int, offset: int = 0) -> np.ndarray:
    return np.stack([run[offset : offset + size] for run in runs])


def quantize_model(
    path: str | Path,
    data: PreparedData,
    out: str | Path | None = None,
    *,
    windows: int = DEFAULT_WINDOWS,
    seed: int = 0,
    symmetric: bool = False,
    progress: bool = True,
) -> QuantizeResult:
    """Write the int8 model of the float32 ONNX model at ``path`` (and of the incremental
    graphs its card names) to ``out`` (``int8_path`` by default), calibrated on
    ``windows`` windows of ``data``'s train split (``Recipe``); check it (see the module
    docstring)."""
    recipe = Recipe(windows, seed, symmetric, progress)
    path = Path(path)
    out = Path(out) if out is not None else int8_path(path)
    card = read_card(path)
    if card.precision != "float32":
        raise QuantizeError(f"{path} is {card.precision} already; quantize the float32 export")
    if data.sample_rate != card.sample_rate:
        raise DataError(
            f"{data.root} is prepared at {data.sample_rate} Hz, {card.name} takes "
            f"{card.sample_rate} Hz; prepare it at the model's rate"
        )
    if windows < 1:
        raise ValueError(f"windows must be at least 1, got {windows}")
    size = card.window_samples
    longest_hop = max([0, *card.incremental.hops])

    def calibration() -> Iterator[np.ndarray]:  # the same runs each time it is called
        return stream_runs(data, "train", windows, size + longest_hop, seed)

    split = "valid" if data.indices("valid") else "test"
    held_out = list(
        stream_runs(data, split, PARITY_WINDOWS, size + PARITY_HOPS * longest_hop, seed)
    )

    written = [out, *(p for hop in card.incremental.hops for p in incremental_paths(out, hop))]
    if path in written or any(
        p in written for h in card.incremental.hops for p in incremental_paths(path, h)
    ):
        raise QuantizeError(f"--out {out} would overwrite the float32 model; write beside it")
    try:
        return quantize_checked(path, out, card, data, calibration, held_out, split, recipe)
    except BaseException:
        # a model that failed its check, or half written, is not left to be served
        for leftover in written:
            leftover.unlink(missing_ok=True)
        raise


def quantize_checked(
    path: Path,
    out: Path,
    card: ModelCard,
    data: PreparedData,
    calibration: Callable[[], Iterator[np.ndarray]],
    held_out: list[np.ndarray],
    split: str,
    recipe: Recipe,
) -> QuantizeResult:
    size = card.window_samples
    float_full = open_session(path, threads=0)
    first = ({GRAPH_NAMES.waveform: run[None, :size]} for run in calibration())
    kept = quantize_graph(path, out, first, recipe)
    int8_full = open_session(out, threads=0)
    probe = window_stack(held_out, size)
    expected = float_full.run([GRAPH_NAMES.scores], {GRAPH_NAMES.waveform: probe})[0]
    actual = int8_full.run([GRAPH_NAMES.scores], {GRAPH_NAMES.waveform: probe})[0]
    difference = np.abs(actual - expected)
    if not float(difference.max()) <= FLOAT_TOLERANCE:
        raise QuantizeError(
            f"{out}: int8 scores differ from float32 by up to {difference.max():.3g} on "
            f"{split} windows (tolerance {FLOAT_TOLERANCE:g}); calibrate on more windows "
            f"of audio like the model's"
        )

    graphs = []
    for graph in card.incremental.graphs:
        graphs.append(
            quantize_hop(path, out, graph, calibration, held_out, int8_full, size, recipe)
        )
    int8_card = ModelCard.from_dict(card.to_dict())
    int8_card.precision = INT8
    int8_card.incremental = dataclasses.replace(card.incremental, graphs=tuple(graphs))
    int8_card.export = {
        **card.export,
        "quantization": quantization_info(data, recipe, kept, difference, split),
    }
    write_card(out, int8_card)
    log.info(
        "int8 %s: scores within %.3g of float32 (mean %.2g) on %d %s windows",
        out,
        difference.max(),
        difference.mean(),
        len(held_out),
        split,
    )
    return QuantizeResult(out, int8_card, float(difference.max()), float(difference.mean()))


def quantize_hop(
    path: Path,
    out: Path,
    graph: HopGraphs,
    calibration: Callable[[], Iterator[np.ndarray]],
    held_out: list[np.ndarray],
    int8_full,
    size: int,
    recipe: Recipe,
) -> HopGraphs:
    """Quantize one hop's prime and step graphs; their chain checked against int8 full
    windows. The step graph is calibrated on what it gets live: the next window and the
    state the (float) prime graph left."""
    hop = graph.hop_samples
    sources = incremental_paths(path, hop)
    prime_path, step_path = incremental_paths(out, hop)
    float_prime = open_session(sources[0], threads=0)
    outputs = graph.outputs[: 1 + len(graph.state)]  # the scores and state, not an embedding

    def step_feeds() -> Iterator[dict[str, np.ndarray]]:
        for run in calibration():
            first = run[None, :size]
            states = float_prime.run(outputs, {GRAPH_NAMES.waveform: first})[1:]
            feeds = [run[None, hop : hop + size], *states]
            yield dict(zip(graph.step_inputs, feeds, strict=True))

    prime_feeds = ({GRAPH_NAMES.waveform: run[None, :size]} for run in calibration())
    quantize_graph(sources[0], prime_path, prime_feeds, recipe)
    quantize_graph(sources[1], step_path, step_feeds(), recipe)

    prime, step = (open_session(p, threads=0) for p in (prime_path, step_path))
    worst, states = 0.0, []
    for k in range(PARITY_HOPS + 1):
        window = window_stack(held_out, size, k * hop)
        if k == 0:
            scores, *states = prime.run(outputs, {GRAPH_NAMES.waveform: window})
        else:
            feeds = dict(zip(graph.step_inputs, [window, *states], strict=True))
            scores, *states = step.run(outputs, feeds)
        full = int8_full.run([GRAPH_NAMES.scores], {GRAPH_NAMES.waveform: window})[0]
        worst = max(worst, float(np.abs(scores - full).max()))
    if not worst <= CHAIN_TOLERANCE:
        raise QuantizeError(
            f"{step_path}: the int8 chain differs from int8 full windows by {worst:.3g} "
            f"(tolerance {CHAIN_TOLERANCE:g})"
        )
    log.info("int8 chain at hop %d vs int8 full windows: max abs diff %.3g", hop, worst)
    return dataclasses.replace(
        graph, prime=prime_path.name, step=step_path.name, max_abs_diff=worst
    )


def quantization_info(
    data: PreparedData,
    recipe: Recipe,
    kept: int,
    difference: np.ndarray,
    split: str,
) -> dict[str, Any]:
    import onnxruntime

    return {
        "method": "onnxruntime static QDQ, MinMax, per-channel int8 weights",
        "activations": recipe.activations,
        "onnxruntime_version": onnxruntime.__version__,
        "quantized_ops": list(QUANTIZED_OPS),
        "float_nodes": kept,
        "calibration": {
            "data": str(data.root),
            "split": "train",
            "windows": recipe.windows,
            "seed": recipe.seed,
        },
        "parity_split": split,
        "max_abs_diff": float(difference.max()),
        "mean_abs_diff": float(difference.mean()),
    }


def write_card(path: Path, card: ModelCard) -> None:
    """Put ``card`` into the metadata of the ONNX file at ``path`` (replacing any)."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_METADATA_KEY, card.to_json()
    proto.producer_name = "tagd-train quantize"
    onnx.save(proto, str(path))
