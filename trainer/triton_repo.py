"""A Triton Inference Server model repository from an exported model (docs/triton.md).

``write_repository(model.onnx, DIR)`` writes what ``tritonserver --model-repository DIR``
loads as it is, two models named from the card (or ``name``):

- ``<name>``: the whole-window graph on Triton's ``onnxruntime`` backend with dynamic
  batching (``waveform`` ``[window_samples]`` → ``scores`` ``[n_tags]``, tagd.card's
  ``GRAPH_NAMES``). The ``onnxruntime`` backend is in NVIDIA's images, not in the
  nvidia-pytriton wheel that the tests run, so this one is written for real servers only.
- ``<name>_seq``: incremental inference behind the sequence batcher, a ``python``
  backend model (trainer/triton_model.py) running the prime and step graphs of one hop
  with ONNX Runtime and keeping each sequence's state itself; strategy ``oldest`` (the
  sequences of different streams batch together, one request of each in flight), the
  START / END / CORRID controls, an idle timeout well above the hop, and room for
  ``max_sequences`` streams at once. Runs anywhere, CPU included.
- ``<name>_state`` (``implicit_state=True``): the same behind Triton's implicit state, for
  the onnxruntime (and tensorrt) backends: one graph that primes a START batch and steps
  the others (trainer/triton_state.py), checked against full windows with ONNX Runtime as
  it is written. The wheel the tests run cannot serve it (no onnxruntime backend).

Each model's card is ``card.json`` in its folder and, for the clients, the config
parameter ``tagd.card`` (tagd.engines.triton reads it with the model's config).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tagd.card import GRAPH_NAMES, CardError, HopGraphs, ModelCard, read_card

log = logging.getLogger(__name__)

CARD_PARAMETER = "tagd.card"  # the config parameter holding the model card's JSON
SEQUENCE_SUFFIX = "_seq"  # <name>_seq: the incremental model
STATE_SUFFIX = "_state"  # <name>_state: the incremental model on implicit state
IMPLICIT_STATE_TOLERANCE = 1e-4  # the export's parity tolerance
IMPLICIT_STATE_CHECK_HOPS = 6
MODEL_SOURCE = Path(__file__).with_name("triton_model.py")

# Streams one server takes at once. A radio stream never ENDs: one past this many waits
# until another ends or idles out (docs/deploy.md sizes it).
DEFAULT_MAX_SEQUENCES = 512
# Triton's default idle timeout is 1 s; a hop is seconds. A stream that stops sending for
# this long starts again with START (and the model frees its state).
DEFAULT_IDLE_SECONDS = 60.0
MIN_IDLE_HOPS = 4  # the idle timeout is at least this many hops
DEFAULT_MAX_BATCH = 32
QUEUE_DELAY_US = 2000  # how long a batch waits for more requests: nothing next to a hop


@dataclass
class TritonRepository:
    folder: Path
    full_model: str  # whole windows, onnxruntime backend
    sequence_model: str  # incremental, python backend
    hop_samples: int
    state_model: str | None = None  # incremental, implicit state (onnxruntime backend)
    state_max_abs_diff: float | None = None  # its check against full windows


def write_repository(
    model_path: str | Path,
    folder: str | Path,
    *,
    name: str | None = None,
    hop_samples: int | None = None,
    max_sequences: int = DEFAULT_MAX_SEQUENCES,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
    max_batch: int = DEFAULT_MAX_BATCH,
    instances: int = 1,
    gpu: bool = True,
    threads: int = 0,
    implicit_state: bool = False,
) -> TritonRepository:
    """Write the two models of an exported ONNX model (with its incremental graphs for
    ``hop_samples``, the card's hop by default) into ``folder``.

    ``gpu``: the whole-window model's instances on the GPU (KIND_GPU), else the CPU;
    the python model uses the GPU through ONNX Runtime's providers where it has them.
    CardError when the model has no incremental graphs for the hop."""
    model_path, folder = Path(model_path), Path(folder)
    card = read_card(model_path)
    name = name or card.name
    hop = hop_samples or card.hop_samples
    graph = card.incremental_graph(hop)
    if graph is None:
        exported = ", ".join(str(h) for h in card.incremental.hops) or "none"
        raise CardError(
            f"{model_path} has no incremental graphs for hop {hop} samples (exported: "
            f"{exported}); export with `tagd-train export --incremental-hop "
            f"{hop / card.sample_rate:g}`"
        )
    idle_seconds = max(idle_seconds, MIN_IDLE_HOPS * hop / card.sample_rate)

    full = folder / name
    (full / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, full / "1" / "model.onnx")
    card.save(full / "card.json")
    (full / "config.pbtxt").write_text(
        full_window_config(name, card, max_batch=max_batch, instances=instances, gpu=gpu)
    )

    sequence_name = name + SEQUENCE_SUFFIX
    sequence = folder / sequence_name
    (sequence / "1").mkdir(parents=True, exist_ok=True)
    for graph_file, role in ((graph.prime, "prime"), (graph.step, "step")):
        source = model_path.with_name(graph_file)
        if not source.is_file():
            raise CardError(f"{model_path}: its card names {source.name}, not beside it")
        shutil.copyfile(source, sequence / "1" / f"{role}.onnx")
    shutil.copyfile(MODEL_SOURCE, sequence / "1" / "model.py")
    card.save(sequence / "card.json")
    parameters = {
        "window_samples": str(card.window_samples),
        "hop_samples": str(hop),
        "n_tags": str(card.n_tags),
        "idle_seconds": f"{idle_seconds:g}",
        "prime": "prime.onnx",
        "step": "step.onnx",
        "state_inputs": json.dumps(GRAPH_NAMES.state_inputs(graph.state_names)),
        "threads": str(threads),
    }
    (sequence / "config.pbtxt").write_text(
        sequence_config(
            sequence_name,
            card,
            parameters,
            max_sequences=max_sequences,
            idle_seconds=idle_seconds,
            max_batch=max_batch,
            instances=instances,
        )
    )
    log.info("wrote Triton models %s and %s into %s", name, sequence_name, folder)
    written = TritonRepository(folder, name, sequence_name, hop)
    if implicit_state:
        written.state_model = name + STATE_SUFFIX
        written.state_max_abs_diff = write_state_model(
            model_path,
            folder / written.state_model,
            card,
            graph,
            parameters={k: parameters[k] for k in ("window_samples", "hop_samples", "n_tags")},
            max_sequences=max_sequences,
            idle_seconds=idle_seconds,
            max_batch=max_batch,
            instances=instances,
            gpu=gpu,
        )
    return written


def write_state_model(
    model_path: Path,
    folder: Path,
    card: ModelCard,
    graph: HopGraphs,
    *,
    parameters: dict[str, str],
    max_sequences: int,
    idle_seconds: float,
    max_batch: int,
    instances: int,
    gpu: bool,
) -> float:
    """The implicit-state model: its graph, checked against full windows (ExportError
    beyond the tolerance), card and config; the check's max abs difference."""
    from trainer.export import ExportError, probe_audio
    from trainer.triton_state import check_implicit_state, implicit_state_graph

    (folder / "1").mkdir(parents=True, exist_ok=True)
    combined = folder / "1" / "model.onnx"
    specs = implicit_state_graph(
        card,
        graph,
        model_path.with_name(graph.prime),
        model_path.with_name(graph.step),
        combined,
    )
    audio = probe_audio(
        2, card.window_samples + IMPLICIT_STATE_CHECK_HOPS * graph.hop_samples, card.sample_rate
    )
    worst = check_implicit_state(combined, model_path, card, specs, graph.hop_samples, audio)
    if not worst <= IMPLICIT_STATE_TOLERANCE:
        raise ExportError(
            f"{combined}: the implicit-state graph disagrees with full windows by {worst:.3g}"
        )
    log.info("implicit-state graph vs full windows (ONNX Runtime): max abs diff %.2e", worst)
    card.save(folder / "card.json")
    states = ",\n".join(
        f'    {{ input_name: "{s.input_name}" output_name: "{s.output_name}" '
        f"data_type: TYPE_FP32 dims: [ {', '.join(map(str, s.dims))} ] "
        f"initial_state: [ {{ data_type: TYPE_FP32 dims: [ {', '.join(map(str, s.dims))} ] "
        f'zero_data: true name: "zeros" }} ] }}'
        for s in specs
    )
    (folder / "config.pbtxt").write_text(
        _sequence_model_config(
            folder.name,
            "onnxruntime",
            card,
            f"  state [\n{states}\n  ]",
            parameters,
            max_sequences=max_sequences,
            idle_seconds=idle_seconds,
            max_batch=max_batch,
            kind="KIND_GPU" if gpu else "KIND_CPU",
            instances=instances,
        )
    )
    return worst


def full_window_config(
    name: str, card: ModelCard, *, max_batch: int, instances: int, gpu: bool
) -> str:
    """config.pbtxt of the whole-window model on the onnxruntime backend."""
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return f"""name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch}
input [
  {{ name: "{GRAPH_NAMES.waveform}" data_type: TYPE_FP32 dims: [ {card.window_samples} ] }}
]
output [
  {{ name: "{GRAPH_NAMES.scores}" data_type: TYPE_FP32 dims: [ {card.n_tags} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US} }}
instance_group [ {{ kind: {kind} count: {instances} }} ]
{_parameters({CARD_PARAMETER: card.to_json()})}
"""


def sequence_config(
    name: str,
    card: ModelCard,
    parameters: dict[str, str],
    *,
    max_sequences: int,
    idle_seconds: float,
    max_batch: int,
    instances: int,
) -> str:
    """config.pbtxt of the incremental python model behind the sequence batcher."""
    controls = "\n".join(
        f'    {{ name: "{control}" control [ {{ kind: CONTROL_SEQUENCE_{control} '
        f"{'data_type: TYPE_UINT64' if control == 'CORRID' else 'fp32_false_true: [ 0, 1 ]'} }} ] }}"
        + ("," if control != "CORRID" else "")
        for control in ("START", "END", "CORRID")
    )
    return _sequence_model_config(
        name,
        "python",
        card,
        f"  control_input [\n{controls}\n  ]",
        parameters,
        max_sequences=max_sequences,
        idle_seconds=idle_seconds,
        max_batch=max_batch,
        kind="KIND_CPU",  # the model picks its device through ONNX Runtime's providers
        instances=instances,
    )


def _sequence_model_config(
    name: str,
    backend: str,
    card: ModelCard,
    sequence_extra: str,
    parameters: dict[str, str],
    *,
    max_sequences: int,
    idle_seconds: float,
    max_batch: int,
    kind: str,
    instances: int,
) -> str:
    """config.pbtxt of an incremental model: ``audio`` (a window or a hop) → ``scores``,
    behind the sequence batcher (oldest), with ``sequence_extra`` (controls or state)."""
    return f"""name: "{name}"
backend: "{backend}"
max_batch_size: {max_batch}
input [
  {{ name: "audio" data_type: TYPE_FP32 dims: [ -1 ] }}
]
output [
  {{ name: "{GRAPH_NAMES.scores}" data_type: TYPE_FP32 dims: [ {card.n_tags} ] }}
]
sequence_batching {{
  max_sequence_idle_microseconds: {round(idle_seconds * 1e6)}
  oldest {{
    max_candidate_sequences: {max_sequences}
    max_queue_delay_microseconds: {QUEUE_DELAY_US}
  }}
{sequence_extra}
}}
instance_group [ {{ kind: {kind} count: {instances} }} ]
{_parameters({**parameters, CARD_PARAMETER: card.to_json()})}
"""


def _parameters(values: dict[str, str]) -> str:
    entries = ",\n".join(
        f'  {{ key: "{key}" value: {{ string_value: "{_text_escape(value)}" }} }}'
        for key, value in values.items()
    )
    return f"parameters [\n{entries}\n]"


def _text_escape(value: str) -> str:
    """A string as protobuf's text format reads it between double quotes (UTF-8 as is)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
