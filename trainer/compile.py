"""Compile an exported ONNX model to a TensorRT plan, with its card beside it.

``compile_engine("fcn4.onnx", "fcn4.plan", precision="fp16")`` writes ``fcn4.plan`` and
``fcn4.plan.json`` (the ONNX file's card plus how the plan was built). The plan has one
optimisation profile on ``waveform``: batch ``min_batch..max_batch``, tuned for
``opt_batch``; the daemon's batcher must not exceed ``max_batch``.

An FCN's card names incremental graphs (trainer.export): each prime and step ONNX graph
becomes a plan too, named as the ONNX one with the plan's stem and suffix
(``fcn4.40960.step.onnx`` → ``fcn4.40960.step.plan``), with the same precision and a
profile over the same batches on every input (the states' other axes are fixed); the
sidecar card names the plans.

Precision:
  fp32  exact float32 (TF32 switched off, so plans agree with ONNX Runtime to ~1e-5)
  fp16  half precision for the network, float32 for the log-mel front end, whose power
        spectrum overflows half precision (a full-scale DC frame reaches 256² = 65,536),
        and for what the front end is computed from (the step graphs slice and pad the
        waveform first); float32 inputs and outputs, states included. On TensorRT 10
        that is BuilderFlag.FP16 with those layers pinned to float32; TensorRT 11 has
        no weak typing, so the ONNX graph itself is converted (``convert_onnx_fp16``)
        and built strongly typed.

TensorRT is imported inside the functions: this module loads without it, and
``convert_onnx_fp16`` needs only onnx and onnxconverter-common.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx

from tagd.card import GRAPH_NAMES, ModelCard, read_card, sidecar_path
from trainer.export import incremental_paths

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
# Modules kept in float32 under fp16. The exporter names their nodes "/frontend/Conv",
# and a second call of the same module in one graph (the step graphs compute the
# log-mel frames at both edges) "/frontend_1/Conv".
FP32_SCOPES = ("frontend", "input_bn")
DEFAULT_WORKSPACE_GB = 4.0


class CompileError(RuntimeError):
    """TensorRT could not parse or build the model."""


def in_fp32_scope(name: str, scopes: tuple[str, ...] = FP32_SCOPES) -> bool:
    """Whether an ONNX node (or the TensorRT layer parsed from it) is in a float32 scope."""
    pattern = "|".join(re.escape(scope) for scope in scopes)
    return re.search(rf"/({pattern})(_\d+)?/", name) is not None


def fp32_nodes(
    names: list[str],
    inputs: list[list[str]],
    outputs: list[list[str]],
    scopes: tuple[str, ...] = FP32_SCOPES,
) -> set[int]:
    """Indices of the nodes in float32 scopes and of every node those are computed from.

    The nodes of a graph are given as their names and their input and output tensor
    names. Upstream of the front end is only the waveform (sliced and padded, in the
    step graphs) and integer shape arithmetic.
    """
    producer = {tensor: index for index, outs in enumerate(outputs) for tensor in outs}
    found = {index for index, name in enumerate(names) if in_fp32_scope(name, scopes)}
    pending = list(found)
    while pending:
        for tensor in inputs[pending.pop()]:
            index = producer.get(tensor)
            if index is not None and index not in found:
                found.add(index)
                pending.append(index)
    return found


def convert_onnx_fp16(
    onnx_path: str | Path, out_path: str | Path, *, keep_fp32_scopes: tuple[str, ...] = FP32_SCOPES
) -> Path:
    """Write a float16 copy of an ONNX model with float32 I/O and float32 front end.

    The card in the metadata is carried over unchanged. Runs anywhere ONNX Runtime does
    (the float16 graph is slower on CPU, but numerically what TensorRT 11 will build).
    """
    from onnxconverter_common import float16

    model = onnx.load(str(onnx_path))
    _inline_shared_initializers(model)
    _separate_consumed_outputs(model.graph)
    nodes = list(model.graph.node)
    kept = fp32_nodes(
        [n.name for n in nodes],
        [list(n.input) for n in nodes],
        [list(n.output) for n in nodes],
        keep_fp32_scopes,
    )
    blocked = {nodes[i].name for i in kept}
    with warnings.catch_warnings():
        # it warns once per weight below float16's smallest normal; those become ±1e-7
        warnings.simplefilter("ignore", category=UserWarning)
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=sorted(blocked), disable_shape_infer=False
        )
    float32 = {
        tensor for node in converted.graph.node if node.name in blocked for tensor in node.output
    }
    float32 |= {value.name for value in converted.graph.input}
    _drop_cast_round_trips(converted.graph, float32)
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(converted)
    out_path = Path(out_path)
    onnx.save(converted, str(out_path))
    log.info("fp16 graph: %s (%d nodes kept float32)", out_path, len(blocked))
    return out_path


def _inline_shared_initializers(model: onnx.ModelProto) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    The exporter shares equal initializers between layers through Identity nodes; if
    one user stays float32 and another goes float16, the shared tensor cannot be both.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _separate_consumed_outputs(graph: onnx.GraphProto) -> None:
    """Give each graph output that nodes also read an Identity of its own.

    A step graph's next state of one level is also the input of the next block. The
    converter's float32 Cast for an output takes the output's name, and a node that read
    it would then get float32 where it was converted to take float16.
    """
    outputs = {value.name for value in graph.output}
    consumed = {tensor for node in graph.node for tensor in node.input} & outputs
    if not consumed:
        return
    inner = {name: f"{name}.inner" for name in consumed}
    for node in graph.node:
        for field in (node.input, node.output):
            for i, tensor in enumerate(field):
                field[i] = inner.get(tensor, tensor)
    for name in sorted(consumed):
        graph.node.append(
            onnx.helper.make_node("Identity", [inner[name]], [name], name=f"{name}.identity")
        )


def _drop_cast_round_trips(graph: onnx.GraphProto, float32: set[str]) -> None:
    """Let float32 nodes read float32 tensors directly, not through float16 and back.

    The converter casts each float32 node's output to float16 and back for each float32
    consumer; it drops the pair only when the output has one consumer. Between the DFT
    and the two slices of its real and imaginary parts that rounded the spectrum to
    float16. ``float32`` names tensors known to be float32 (a float16 Cast of one of
    them and the float32 Cast of that are a round trip).
    """

    def cast_to(node: onnx.NodeProto) -> int | None:
        if node.op_type != "Cast":
            return None
        return next(a.i for a in node.attribute if a.name == "to")

    to_half = {
        node.output[0]: node.input[0]
        for node in graph.node
        if cast_to(node) == onnx.TensorProto.FLOAT16 and node.input[0] in float32
    }
    outputs = {value.name for value in graph.output}
    replaced = {
        node.output[0]: to_half[node.input[0]]
        for node in graph.node
        if cast_to(node) == onnx.TensorProto.FLOAT
        and node.input[0] in to_half
        and node.output[0] not in outputs
    }
    if not replaced:
        return
    keep = [node for node in graph.node if node.output[0] not in replaced]
    for node in keep:
        for i, tensor in enumerate(node.input):
            node.input[i] = replaced.get(tensor, tensor)
    used = {tensor for node in keep for tensor in node.input} | outputs
    keep = [node for node in keep if node.output[0] not in to_half or node.output[0] in used]
    del graph.node[:]
    graph.node.extend(keep)
    log.debug("dropped %d float16 round trips between float32 nodes", len(replaced))


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def compile_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    timing_cache: str | Path | None = None,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
) -> Path:
    """Build a TensorRT plan from an exported ONNX model, and one per incremental graph
    its card names; write the card beside the plan."""
    try:
        import tensorrt as trt
    except ImportError:
        raise CompileError(
            "tensorrt is not installed; install it with: pip install 'tagd[tensorrt]'"
        ) from None
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}"
        )
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    card = read_card(onnx_path)
    builds = [(onnx_path, plan_path), *incremental_builds(card, onnx_path, plan_path)]
    for source, _ in builds:
        if not source.is_file():
            raise CompileError(
                f"{onnx_path}: its card names {source.name}, which is not beside "
                f"it; export the model again"
            )

    builder = _PlanBuilder(
        trt, precision, (min_batch, opt_batch, max_batch), workspace_gb, timing_cache
    )
    for source, target in builds:
        builder.build(source, target)
    if timing_cache is not None:
        Path(timing_cache).write_bytes(bytes(builder.cache.serialize()))

    profile_info = {
        "input": GRAPH_NAMES.waveform,
        "min_batch": min_batch,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
    }
    plan_card(
        card, precision, profile_info, trt.__version__, builder.strongly_typed, plan_path
    ).save(sidecar_path(plan_path))
    log.info(
        "wrote %s and %s",
        ", ".join(str(target) for _, target in builds),
        sidecar_path(plan_path).name,
    )
    return plan_path


def incremental_builds(
    card: ModelCard, onnx_path: Path, plan_path: Path
) -> list[tuple[Path, Path]]:
    """(ONNX graph, plan) of each prime and step graph the card names, prime first."""
    builds = []
    for graph in card.incremental.graphs:
        prime_plan, step_plan = incremental_paths(plan_path, graph.hop_samples)
        builds.append((onnx_path.with_name(graph.prime), prime_plan))
        builds.append((onnx_path.with_name(graph.step), step_plan))
    return builds


class _PlanBuilder:
    """What every plan of one compile shares: the precision, the batches, the timing cache."""

    def __init__(
        self,
        trt: Any,
        precision: str,
        batches: tuple[int, int, int],
        workspace_gb: float,
        timing_cache: str | Path | None,
    ):
        self.trt = trt
        self.precision = precision
        self.batches = batches
        self.workspace_bytes = int(workspace_gb * 2**30)
        # TensorRT 11 removed weak typing: half precision must be in the graph already
        self.weak_fp16 = precision == "fp16" and hasattr(trt.BuilderFlag, "FP16")
        self.strongly_typed = precision == "fp16" and not self.weak_fp16
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.cache = _load_timing_cache(self.builder.create_builder_config(), timing_cache)

    def build(self, onnx_path: Path, plan_path: Path) -> None:
        trt = self.trt
        network = self.builder.create_network(_network_flags(trt, self.strongly_typed))
        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        config.set_timing_cache(self.cache, False)  # False: refuse a cache from another device

        with tempfile.TemporaryDirectory() as scratch:
            source = onnx_path
            if self.strongly_typed:
                source = convert_onnx_fp16(onnx_path, Path(scratch) / "fp16.onnx")
            _parse(trt, network, self.logger, source)

        if self.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        if self.weak_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
            _pin_fp32_layers(trt, network, config)
        config.add_optimization_profile(self._profile(network, onnx_path))

        low, _, high = self.batches
        log.info(
            "building %s (%s, batch %d..%d) with TensorRT %s",
            plan_path,
            self.precision,
            low,
            high,
            trt.__version__,
        )
        serialized = self.builder.build_serialized_network(network, config)
        if serialized is None:
            raise CompileError(f"TensorRT could not build {onnx_path}; see the TensorRT log above")
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_bytes(bytes(serialized))

    def _profile(self, network: Any, onnx_path: Path) -> Any:
        """Every input's batch axis over the batches; its other axes as the graph has them."""
        profile = self.builder.create_optimization_profile()
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            rest = tuple(tensor.shape)[1:]
            if any(dim < 0 for dim in rest):
                raise CompileError(
                    f"{onnx_path}: input {tensor.name} {list(tensor.shape)} has a "
                    f"dynamic axis besides the batch; export the model again"
                )
            low, opt, high = ((batch, *rest) for batch in self.batches)
            profile.set_shape(tensor.name, low, opt, high)
        return profile


def plan_card(
    card: ModelCard,
    precision: str,
    profile: dict[str, Any],
    trt_version: str,
    strongly_typed: bool,
    plan_path: str | Path,
) -> ModelCard:
    """The ONNX card with the TensorRT build recorded under ``export["tensorrt"]`` and
    the incremental graphs named by their plans beside ``plan_path``."""
    plan = ModelCard.from_dict(card.to_dict())
    plan.export = {
        **plan.export,
        "tensorrt": {
            "version": trt_version,
            "precision": precision,
            "strongly_typed": strongly_typed,
            "profile": profile,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }
    graphs = []
    for graph in plan.incremental.graphs:
        prime_plan, step_plan = incremental_paths(Path(plan_path), graph.hop_samples)
        graphs.append(dataclasses.replace(graph, prime=prime_plan.name, step=step_plan.name))
    plan.incremental = dataclasses.replace(plan.incremental, graphs=tuple(graphs))
    return plan


def _network_flags(trt: Any, strongly_typed: bool) -> int:
    # explicit batch is the only mode since TensorRT 10 (the flag is deprecated, ignored)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileError(f"TensorRT cannot parse {onnx_path}: {errors}")


def _pin_fp32_layers(trt: Any, network: Any, config: Any) -> None:
    """Keep the front end, and what it is computed from, in float32 under BuilderFlag.FP16
    (TensorRT 10)."""
    layers = [network.get_layer(index) for index in range(network.num_layers)]

    def tensor_names(count: int, get) -> list[str]:
        tensors = (get(i) for i in range(count))
        return [tensor.name for tensor in tensors if tensor is not None]  # optional inputs

    kept = fp32_nodes(
        [layer.name for layer in layers],
        [tensor_names(layer.num_inputs, layer.get_input) for layer in layers],
        [tensor_names(layer.num_outputs, layer.get_output) for layer in layers],
    )
    pinned = 0
    for index in sorted(kept):
        layer = layers[index]
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not all(out.dtype == trt.float32 for out in outputs):
            continue  # shape and index tensors keep their types
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
        pinned += 1
    if hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"):
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    log.debug("pinned %d front-end layers to float32", pinned)


def _load_timing_cache(config: Any, path: str | Path | None) -> Any:
    """The timing cache every plan's build reads and adds to (saved after the last)."""
    data = b""
    if path is not None and Path(path).is_file():
        data = Path(path).read_bytes()
        log.info("timing cache: %s (%d bytes)", path, len(data))
    return config.create_timing_cache(data)
