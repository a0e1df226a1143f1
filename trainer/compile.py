"""Compile an exported ONNX model to a TensorRT plan, with its card beside it.

``compile_engine("fcn4.onnx", "fcn4.plan", precision="fp16")`` writes ``fcn4.plan`` and
``fcn4.plan.json`` (the ONNX file's card plus how the plan was built). The plan has one
optimisation profile on ``waveform``: batch ``min_batch..max_batch``, tuned for
``opt_batch``; the daemon's batcher must not exceed ``max_batch``.

Precision:
  fp32  exact float32 (TF32 switched off, so plans agree with ONNX Runtime to ~1e-5)
  fp16  half precision for the network, float32 for the log-mel front end, whose power
        spectrum overflows half precision (a full-scale DC frame reaches 256² = 65,536),
        and float32 inputs and outputs. On TensorRT 10 that is BuilderFlag.FP16 with
        the front-end layers pinned to float32; TensorRT 11 has no weak typing, so the
        ONNX graph itself is converted (``convert_onnx_fp16``) and built strongly typed.

TensorRT is imported inside the functions: this module loads without it, and
``convert_onnx_fp16`` needs only onnx and onnxconverter-common.
"""

from __future__ import annotations

import datetime
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx

from tagd.card import ModelCard, read_card, sidecar_path
from trainer.export import INPUT_NAME

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
# Graph scopes (ONNX node-name prefixes from the exporter) kept in float32 under fp16.
FP32_SCOPES = ("/frontend/", "/input_bn/")
DEFAULT_WORKSPACE_GB = 4.0


class CompileError(RuntimeError):
    """TensorRT could not parse or build the model."""


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
    blocked = [node.name for node in model.graph.node if node.name.startswith(keep_fp32_scopes)]
    with warnings.catch_warnings():
        # it warns once per weight below float16's smallest normal; those become ±1e-7
        warnings.simplefilter("ignore", category=UserWarning)
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=blocked, disable_shape_infer=False
        )
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
    """Build a TensorRT plan from an exported ONNX model; write the card beside it."""
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

    # TensorRT 11 removed weak typing: half precision must be in the graph already
    weak_fp16 = precision == "fp16" and hasattr(trt.BuilderFlag, "FP16")
    strongly_typed = precision == "fp16" and not weak_fp16
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, strongly_typed))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))

    with tempfile.TemporaryDirectory() as scratch:
        source = onnx_path
        if strongly_typed:
            source = convert_onnx_fp16(onnx_path, Path(scratch) / "fp16.onnx")
        _parse(trt, network, logger, source)

    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        _pin_fp32_layers(trt, network, config)

    window = card.window_samples
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (min_batch, window), (opt_batch, window), (max_batch, window))
    config.add_optimization_profile(profile)

    cache = _load_timing_cache(config, timing_cache)
    log.info(
        "building %s (%s, batch %d..%d) with TensorRT %s",
        plan_path,
        precision,
        min_batch,
        max_batch,
        trt.__version__,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError(f"TensorRT could not build {onnx_path}; see the TensorRT log above")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        Path(timing_cache).write_bytes(bytes(cache.serialize()))

    profile_info = {
        "input": INPUT_NAME,
        "min_batch": min_batch,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
    }
    plan_card(card, precision, profile_info, trt.__version__, strongly_typed).save(
        sidecar_path(plan_path)
    )
    log.info("wrote %s and %s", plan_path, sidecar_path(plan_path).name)
    return plan_path


def plan_card(
    card: ModelCard, precision: str, profile: dict[str, Any], trt_version: str, strongly_typed: bool
) -> ModelCard:
    """The ONNX card with the TensorRT build recorded under ``export["tensorrt"]``."""
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
    """Keep the front end in float32 under BuilderFlag.FP16 (TensorRT 10)."""
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if not any(scope in layer.name for scope in FP32_SCOPES):
            continue
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
    data = b""
    if path is not None and Path(path).is_file():
        data = Path(path).read_bytes()
        log.info("timing cache: %s (%d bytes)", path, len(data))
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)  # False: refuse a cache from another device
    return cache
