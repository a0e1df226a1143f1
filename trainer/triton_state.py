"""The incremental model for Triton's own backends: one ONNX graph with implicit state
(``sequence_batching.state``), built from a hop's prime and step graphs (docs/triton.md).

Triton's onnxruntime and tensorrt backends keep a sequence's state between requests
themselves: the model takes ``state.<name>`` inputs and returns ``next_state.<name>``
outputs, and the server feeds each request the state its sequence's last one returned
(zeros on START). That needs one graph that serves both kinds of request:

- ``audio`` ``[batch, N]``: N is the whole window on START, the hop's new samples
  otherwise (Triton batches requests of equal shapes only, so a batch is all of one kind);
- ``state.tail`` ``[batch, window - hop]``, the last window's samples after its first hop,
  and the step graph's ``state.<level>`` tensors.

The graph joins ``state.tail`` and ``audio`` and keeps the last ``window`` samples: on
START (zeros + a window) that is the window sent, otherwise (the tail + a hop) the
stream's next window. An ONNX ``If`` on ``N == window`` runs the prime graph or the step
graph on it, so a batch costs one of the two, not both; ``next_state.tail`` is the
window after its first hop. Scores equal full windows' (``check_implicit_state`` runs it
with ONNX Runtime against the whole-window model). The python backend cannot run it (it
drops returned state), so the tests here only check it with ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tagd.card import GRAPH_NAMES, HopGraphs, ModelCard
from tagd.engines.onnx import open_session

AUDIO_INPUT = "audio"
TAIL_STATE = "tail"  # the state tensor holding the last window's samples after its first hop
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class StateSpec:
    """One implicit state tensor of the combined graph, without its batch axis."""

    input_name: str
    output_name: str
    dims: tuple[int, ...]


def state_specs(card: ModelCard, graph: HopGraphs) -> list[StateSpec]:
    """The combined graph's state tensors: the tail, then the step graph's."""
    names = [TAIL_STATE, *graph.state_names]
    shapes = [(card.window_samples - graph.hop_samples,), *graph.state_shapes]
    return [
        StateSpec(GRAPH_NAMES.state_input_prefix + n, GRAPH_NAMES.state_output_prefix + n, s)
        for n, s in zip(names, shapes, strict=True)
    ]


def implicit_state_graph(
    card: ModelCard, graph: HopGraphs, prime_path: Path, step_path: Path, out_path: Path
) -> list[StateSpec]:
    """Write the combined graph of one hop to ``out_path``; its state tensors."""
    window, hop = card.window_samples, graph.hop_samples
    specs = state_specs(card, graph)
    prime, step = onnx.load(str(prime_path)), onnx.load(str(step_path))
    outer = {GRAPH_NAMES.waveform: "window"}
    outer.update({name: name for name in GRAPH_NAMES.state_inputs(graph.state_names)})
    then_branch = _branch(prime, "prime/", outer, "prime")
    else_branch = _branch(step, "step/", outer, "step")

    def constant(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node(
            "Constant",
            [],
            [name],
            value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values),
        )

    tail = specs[0]
    nodes = [
        constant("minus_window", [-window]),
        constant("hop", [hop]),
        constant("to_end", [INT64_MAX]),
        constant("time_axis", [1]),
        constant("window_samples", [window]),
        helper.make_node("Concat", [tail.input_name, AUDIO_INPUT], ["joined"], axis=1),
        helper.make_node("Slice", ["joined", "minus_window", "to_end", "time_axis"], ["window"]),
        helper.make_node("Shape", [AUDIO_INPUT], ["audio_shape"]),
        helper.make_node("Gather", ["audio_shape", "time_axis"], ["audio_samples"], axis=0),
        helper.make_node("Equal", ["audio_samples", "window_samples"], ["starts_1"]),
        helper.make_node("Squeeze", ["starts_1"], ["starts"]),
        helper.make_node(
            "If",
            ["starts"],
            [GRAPH_NAMES.scores, *(spec.output_name for spec in specs[1:])],
            then_branch=then_branch,
            else_branch=else_branch,
        ),
        helper.make_node("Slice", ["window", "hop", "to_end", "time_axis"], [tail.output_name]),
    ]
    inputs = [helper.make_tensor_value_info(AUDIO_INPUT, TensorProto.FLOAT, ["batch", "samples"])]
    outputs = [
        helper.make_tensor_value_info(GRAPH_NAMES.scores, TensorProto.FLOAT, ["batch", card.n_tags])
    ]
    for spec in specs:
        inputs.append(
            helper.make_tensor_value_info(spec.input_name, TensorProto.FLOAT, ["batch", *spec.dims])
        )
        outputs.append(
            helper.make_tensor_value_info(
                spec.output_name, TensorProto.FLOAT, ["batch", *spec.dims]
            )
        )
    combined = helper.make_model(
        helper.make_graph(nodes, "tagd_sequence", inputs, outputs),
        opset_imports=list(prime.opset_import),
        producer_name="tagd-train",
    )
    combined.ir_version = prime.ir_version
    onnx.checker.check_model(combined)
    onnx.save(combined, str(out_path))
    return specs


def _branch(model: onnx.ModelProto, prefix: str, outer: dict[str, str], name: str):
    """``model``'s graph as an If branch: its inputs read the outer graph's values
    (``outer``: its input name → the outer name), every other name prefixed."""

    def rename(value: str) -> str:
        return value if value == "" else outer.get(value, prefix + value)

    def copied(proto, name: str):
        copy = type(proto)()
        copy.CopyFrom(proto)
        copy.name = name
        return copy

    nodes = []
    for node in model.graph.node:
        copy = copied(node, prefix + node.name)
        copy.input[:] = [rename(v) for v in node.input]
        copy.output[:] = [rename(v) for v in node.output]
        nodes.append(copy)
    initializers = [copied(t, prefix + t.name) for t in model.graph.initializer]
    # the scores and state: Triton's sequence model gives no embedding (no song aggregator)
    kept = [o for o in model.graph.output if o.name != GRAPH_NAMES.embedding]
    outputs = [copied(o, prefix + o.name) for o in kept]
    return helper.make_graph(nodes, name, [], outputs, initializer=initializers)


def check_implicit_state(
    combined_path: Path,
    model_path: Path,
    card: ModelCard,
    specs: list[StateSpec],
    hop_samples: int,
    audio: np.ndarray,
) -> float:
    """Max abs difference from the whole-window model of the combined graph run as
    Triton would run it on ``audio`` ``[streams, samples]``: START with each stream's
    first window and zero state, then a hop at a time with the state it returned, then
    START again mid-stream (a restart) on stale state."""
    combined = open_session(combined_path, providers=["CPUExecutionProvider"])
    full = open_session(model_path, providers=["CPUExecutionProvider"])
    window = card.window_samples
    streams = len(audio)
    hops = (audio.shape[1] - window) // hop_samples + 1
    restart = hops // 2
    states = {s.input_name: np.zeros((streams, *s.dims), np.float32) for s in specs}
    worst = 0.0
    for k in range(hops):
        start = k * hop_samples
        windows = np.ascontiguousarray(audio[:, start : start + window])
        sent = windows if k in (0, restart) else windows[:, -hop_samples:]
        scores, *next_states = combined.run(None, {AUDIO_INPUT: sent, **states})
        states = dict(zip((s.input_name for s in specs), next_states, strict=True))
        (expected,) = full.run([GRAPH_NAMES.scores], {GRAPH_NAMES.waveform: windows})
        worst = max(worst, float(np.max(np.abs(scores - expected))))
    return worst
