"""Export a tagger model to ONNX with its model card inside, and check parity.

The graph takes ``waveform`` float32 ``[batch, window_samples]`` and returns ``scores``
float32 ``[batch, n_tags]`` (sigmoid), with a dynamic batch axis: tagd.card's
``GRAPH_NAMES``. The card (tagd.card) goes into the ONNX ``metadata_props`` under
``CARD_METADATA_KEY``, so the file alone is enough for the daemon. With ``check=True``
ONNX Runtime and PyTorch score the same audio and the export fails if they disagree by
more than ``PARITY_TOLERANCE``.

For a model whose family has incremental graphs (``TaggerModel.incremental_graphs``:
the FCNs), two more graphs per streaming hop go beside it: ``<stem>.<hop>.prime.onnx``
(``waveform`` → ``scores``, ``next_state.<level>``…) and ``<stem>.<hop>.step.onnx``
(``waveform``, ``state.<level>``… → the same), named in the card's ``incremental``
section; their parity check runs them over consecutive windows against the full network.

We use the TorchScript exporter (``dynamo=False``): in torch 2.13 it exports every model
of the zoo with a dynamic batch axis in a second, to plain opset-17 ops.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from tagd.card import (
    CARD_METADATA_KEY,
    GRAPH_NAMES,
    CardError,
    HopGraphs,
    IncrementalSection,
    ModelCard,
    StateTensor,
)
from tagd.engines.onnx import open_session
from trainer.data.tags import exclusions
from trainer.models.base import TaggerModel

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4  # max abs difference of sigmoid scores, ONNX Runtime vs PyTorch
PARITY_BATCH = 2
PARITY_HOPS = 4  # consecutive windows the incremental graphs are checked over


class ExportError(RuntimeError):
    """The exported graph is broken or disagrees with PyTorch."""


@dataclass
class ExportResult:
    path: Path
    card: ModelCard
    max_abs_diff: float | None  # None when check=False


def default_tags(n_tags: int) -> list[str]:
    return [f"tag_{i:03d}" for i in range(n_tags)]


def export_info(opset: int) -> dict[str, Any]:
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "opset": opset,
    }


def card_for_model(
    model: TaggerModel, *, name: str | None = None, tags: list[str] | None = None
) -> ModelCard:
    """A card describing ``model`` as it is: audio contract, hyper-parameters, tag names."""
    tags = list(tags) if tags is not None else default_tags(model.n_tags)
    if len(tags) != model.n_tags:
        raise CardError(
            f"{model.arch} outputs {model.n_tags} scores but {len(tags)} tags were given"
        )
    return ModelCard(
        name=name or model.arch,
        architecture=model.arch,
        sample_rate=model.sample_rate,
        window_samples=model.window_samples,
        hop_samples=model.default_hop_samples,
        tags=tags,
        clip_seconds=model.clip_seconds,
        hyperparameters={**model.hparams, "n_tags": model.n_tags},
        excludes=exclusions(tags),
    )


def check_card_matches(card: ModelCard, model: TaggerModel) -> None:
    """Refuse to ship a card that promises a different audio contract than the model has."""
    expected = {
        "sample_rate": model.sample_rate,
        "window_samples": model.window_samples,
        "n_tags": model.n_tags,
    }
    wrong = [
        f"{k}: card {getattr(card, k)}, model {v}"
        for k, v in expected.items()
        if getattr(card, k) != v
    ]
    if wrong:
        raise CardError(f"card {card.name!r} does not match model {model.arch}: {'; '.join(wrong)}")


def probe_audio(batch: int, samples: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Music-like float32 audio ``[batch, samples]``: a chord with harmonics plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    out = np.empty((batch, samples), dtype=np.float32)
    for row in range(batch):
        root = 110.0 * 2 ** rng.uniform(0, 2)
        chord = sum(
            np.sin(2 * np.pi * root * ratio * harmonic * t) / harmonic
            for ratio in (1.0, 1.26, 1.5)
            for harmonic in (1, 2, 3)
        )
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t) ** 2
        out[row] = 0.1 * chord * envelope + 0.02 * rng.standard_normal(samples)
    return out


def export_onnx(
    model: TaggerModel,
    path: str | Path,
    *,
    card: ModelCard | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    incremental_hops: tuple[int, ...] = (),
    aggregator: str | Path | None = None,
) -> ExportResult:
    """Write ``model`` as ONNX with its card in the metadata; check ORT parity if asked.

    A model with incremental graphs (an FCN) also gets them for the card's hop and
    ``incremental_hops`` (samples), at those of them where a layer can be reused. With
    ``aggregator`` (an ``aggregator.pt``), its graphs go beside the model too
    (trainer.export_aggregator) and the card's ``aggregator`` section names them.
    """
    path = Path(path)
    if card is None:
        card = card_for_model(model, name=name, tags=tags)
    else:
        card = ModelCard.from_dict(card.to_dict())  # a copy: we fill in export info
        check_card_matches(card, model)
    card.export = {**card.export, **export_info(opset)}

    was_training = model.training
    model.eval()
    try:
        example = torch.from_numpy(
            probe_audio(PARITY_BATCH, model.window_samples, model.sample_rate)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        card.incremental = export_incremental(
            model,
            path,
            sorted({card.hop_samples, *incremental_hops}),
            opset=opset,
            check=check,
            embedding=aggregator is not None,
        )
        if aggregator is not None:
            from trainer.export_aggregator import export_aggregator  # it imports this module

            card.aggregator = export_aggregator(
                model, aggregator, path, tags=card.tags, opset=opset, check=check
            )
        write_onnx(model, (example,), path, [GRAPH_NAMES.waveform], [GRAPH_NAMES.scores], opset)
        proto = onnx.load(str(path))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = CARD_METADATA_KEY, card.to_json()
        proto.producer_name = "tagd-train"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
        log.info("exported %s to %s (opset %d)", model.arch, path, opset)

        max_abs_diff = None
        if check:
            with torch.no_grad():
                expected = model(example).numpy()
            actual = run_onnxruntime(path, example.numpy())
            max_abs_diff = float(np.max(np.abs(actual - expected)))
            if not max_abs_diff <= PARITY_TOLERANCE:  # also catches NaN
                raise ExportError(
                    f"{path}: ONNX Runtime and PyTorch disagree by {max_abs_diff:.3g} "
                    f"(tolerance {PARITY_TOLERANCE:g}); the graph uses an op that exports badly"
                )
            log.info("parity ONNX Runtime vs PyTorch: max abs diff %.2e", max_abs_diff)
    finally:
        model.train(was_training)
    return ExportResult(path=path, card=card, max_abs_diff=max_abs_diff)


def run_onnxruntime(path: str | Path, batch: np.ndarray, threads: int = 0) -> np.ndarray:
    """Scores from ONNX Runtime on CPU, for parity checks and benchmarks (``threads`` 0:
    TAGD_ORT_THREADS, else one per core, as the daemon)."""
    session = open_session(path, threads=threads, providers=["CPUExecutionProvider"])
    feeds = {GRAPH_NAMES.waveform: np.ascontiguousarray(batch, dtype=np.float32)}
    return session.run([GRAPH_NAMES.scores], feeds)[0]


def write_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int,
) -> None:
    """``module`` as an ONNX file with a dynamic batch axis on every input and output."""
    with warnings.catch_warnings():
        # the TorchScript exporter announces its own deprecation on every call
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # slices with a step (the STFT's strided framing) are left to the runtime to fold
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in input_names + output_names},
            opset_version=opset,
            do_constant_folding=True,
        )


def incremental_paths(path: Path, hop_samples: int) -> tuple[Path, Path]:
    """Where the prime and step graphs of ``path`` at ``hop_samples`` go."""
    return (
        path.with_name(f"{path.stem}.{hop_samples}.prime{path.suffix}"),
        path.with_name(f"{path.stem}.{hop_samples}.step{path.suffix}"),
    )


def export_incremental(
    model: TaggerModel,
    path: Path,
    hops: list[int],
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    embedding: bool = False,
) -> IncrementalSection:
    """Write the prime and step graphs for each hop that reuses a layer; the card's section
    (empty for a family without incremental graphs). With ``embedding`` (a model exported
    with an aggregator) both graphs also give the window embedding, the aggregator's input."""
    time_strides: tuple[int, ...] = ()
    graphs = []
    for hop in hops:
        built = model.incremental_graphs(hop, embedding)
        if built is None:
            log.info("hop %d samples reuses no layer of %s: no incremental graphs", hop, model.arch)
            continue
        time_strides = built.time_strides
        prime_path, step_path = incremental_paths(path, hop)
        graph = HopGraphs(
            hop_samples=hop,
            prime=prime_path.name,
            step=step_path.name,
            state=tuple(
                StateTensor(name, shape)
                for name, shape in zip(built.state_names, built.state_shapes, strict=True)
            ),
            state_bytes=built.state_bytes,
            reused_levels=built.reused_levels,
            step_macs=built.step_macs,
            full_macs=built.full_macs,
            embedding=embedding,
        )
        wave = torch.from_numpy(
            probe_audio(PARITY_BATCH, model.window_samples + PARITY_HOPS * hop, model.sample_rate)
        )
        first = wave[:, : model.window_samples]
        with torch.no_grad():
            states = built.prime(first)[1 : 1 + len(built.state_names)]  # not the embedding
        write_onnx(built.prime, (first,), prime_path, graph.prime_inputs, graph.outputs, opset)
        write_onnx(built.step, (first, *states), step_path, graph.step_inputs, graph.outputs, opset)
        if check:
            difference = check_incremental(model, graph, prime_path, step_path, wave)
            graph = dataclasses.replace(graph, max_abs_diff=difference)
        graphs.append(graph)
        log.info(
            "incremental graphs at hop %d: %s, %s (%.2f MB of state, %.0f %% of the MACs)",
            hop,
            prime_path.name,
            step_path.name,
            graph.state_bytes / 1e6,
            100 * graph.step_macs / graph.full_macs,
        )
    return IncrementalSection(time_strides=time_strides, graphs=tuple(graphs))


def check_incremental(
    model: TaggerModel, graph: HopGraphs, prime_path: Path, step_path: Path, wave: torch.Tensor
) -> float:
    """Max abs difference of the ORT prime/step chain from PyTorch's full windows: the
    scores, and the embeddings (relative to their largest) where the graphs give them."""
    prime, step = (
        open_session(p, providers=["CPUExecutionProvider"]) for p in (prime_path, step_path)
    )
    size, hop = model.window_samples, graph.hop_samples
    worst = 0.0
    states: list[np.ndarray] = []
    for k in range(PARITY_HOPS + 1):
        window = np.ascontiguousarray(wave[:, k * hop : k * hop + size].numpy())
        if k == 0:
            scores, *states = prime.run(graph.outputs, {GRAPH_NAMES.waveform: window})
        else:
            feeds = dict(zip(graph.step_inputs, [window, *states], strict=True))
            scores, *states = step.run(graph.outputs, feeds)
        with torch.no_grad():
            expected = model(torch.from_numpy(window)).numpy()
            if graph.embedding:
                *states, embedding = states
                expected_embedding = model.embed(torch.from_numpy(window)).numpy()
                scale = max(1.0, float(np.max(np.abs(expected_embedding))))
                worst = max(worst, float(np.max(np.abs(embedding - expected_embedding))) / scale)
        worst = max(worst, float(np.max(np.abs(scores - expected))))
    if not worst <= PARITY_TOLERANCE:
        raise ExportError(
            f"{step_path}: incremental inference disagrees with full windows by {worst:.3g} "
            f"(tolerance {PARITY_TOLERANCE:g})"
        )
    log.info("parity incremental (ONNX Runtime) vs full windows: max abs diff %.2e", worst)
    return worst
