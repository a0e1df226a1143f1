"""Export a song-level aggregator beside its model: two graphs and the card's section.

``tagd-train export CKPT --out m.onnx --aggregator run/aggregator.pt`` writes, beside
``m.onnx``:

- ``m.embed.onnx``: ``waveform`` → ``scores`` (the model's own window scores) and
  ``embedding`` (its last hidden layer), so one run per window gives both today's
  average and the aggregator's input;
- ``m.aggregator.onnx``: ``embedding``, ``state.<name>``… → ``scores`` (the song so far)
  and ``next_state.<name>``…, one window a call; the state is explicit, as the
  incremental graphs carry theirs (h and c of each LSTM layer; sum and count of the
  mean), zeros for a new song;

and the card's ``aggregator`` section (tagd.card's ``AggregatorSection``) that names
them. The parity check runs both graphs in ONNX Runtime over a probe song, window by
window, against PyTorch's aggregator on the whole sequence.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tagd.card import GRAPH_NAMES, AggregatorSection, StateTensor
from tagd.engines.onnx import open_session
from trainer.aggregate import load_aggregator
from trainer.export import PARITY_TOLERANCE, ExportError, probe_audio, write_onnx
from trainer.models.aggregator import Aggregator
from trainer.models.base import EMBEDDING_LAYER, TaggerModel

log = logging.getLogger(__name__)

PARITY_WINDOWS = 5  # windows of the probe song the aggregator graph is checked over


class EmbeddingGraph(nn.Module):
    """waveform (B, window) → scores (B, n_tags), embedding (B, D), in eval mode."""

    def __init__(self, model: TaggerModel):
        super().__init__()
        self.model = model

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.model.embed(wave)  # (B, D)
        return torch.sigmoid(self.model.head(embedding)), embedding  # eval: no dropout


class AggregatorStep(nn.Module):
    """embedding (B, D), *state → scores (B, n_tags), *next state."""

    def __init__(self, aggregator: Aggregator):
        super().__init__()
        self.aggregator = aggregator

    def forward(self, embedding: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, *following = self.aggregator.step(embedding, *state)
        return (torch.sigmoid(logits), *following)


def aggregator_paths(path: Path) -> tuple[Path, Path]:
    """Where the embedding and aggregator graphs of model ``path`` go."""
    return (
        path.with_name(f"{path.stem}.embed{path.suffix}"),
        path.with_name(f"{path.stem}.aggregator{path.suffix}"),
    )


def export_aggregator(
    model: TaggerModel,
    aggregator_file: str | Path,
    path: Path,
    *,
    tags: list[str],
    opset: int,
    check: bool = True,
) -> AggregatorSection:
    """Write both graphs beside ``path``; the card's section that names them."""
    aggregator, payload = load_aggregator(aggregator_file)
    trained_on = payload["cnn"]
    if trained_on["arch"] != model.arch or aggregator.config.embedding_size != model.embedding_size:
        raise ExportError(
            f"{aggregator_file} aggregates {trained_on['arch']} embeddings of "
            f"{aggregator.config.embedding_size} features; this model is {model.arch} with "
            f"{model.embedding_size}"
        )
    if list(payload["tags"]) != list(tags):
        raise ExportError(f"{aggregator_file} scores other tags than the model's card")
    if trained_on["finetuned"]:
        log.warning(
            "%s was trained with a fine-tuned CNN: export that run's cnn.pt with it",
            aggregator_file,
        )

    embed_path, aggregator_path = aggregator_paths(path)
    section = AggregatorSection(
        kind=aggregator.config.kind,
        embedding_layer=EMBEDDING_LAYER,
        embedding_size=model.embedding_size,
        embedding_graph=embed_path.name,
        graph=aggregator_path.name,
        hop_samples=int(payload["hop_samples"]),
        state=tuple(
            StateTensor(name, shape)
            for name, shape in zip(aggregator.state_names, aggregator.state_shapes(), strict=True)
        ),
        scores=payload["scores"],
    )
    was_training = model.training
    model.eval()
    try:
        song = torch.from_numpy(_probe_song(model, section.hop_samples))  # (T, window)
        # eval wrappers: the exporter puts a module back in the mode it found it in
        write_onnx(
            EmbeddingGraph(model).eval(),
            (song[:2],),
            embed_path,
            [GRAPH_NAMES.waveform],
            [GRAPH_NAMES.scores, GRAPH_NAMES.embedding],
            opset,
        )
        example = (torch.zeros(2, model.embedding_size), *aggregator.initial_state(2))
        write_onnx(
            AggregatorStep(aggregator).eval(),
            example,
            aggregator_path,
            section.inputs,
            section.outputs,
            opset,
        )
        if check:
            difference = check_aggregator(
                model, aggregator, section, embed_path, aggregator_path, song
            )
            section = dataclasses.replace(section, max_abs_diff=difference)
    finally:
        model.train(was_training)
    log.info("aggregator %s: %s, %s", section.kind, embed_path.name, aggregator_path.name)
    return section


def _probe_song(model: TaggerModel, hop: int) -> np.ndarray:
    """PARITY_WINDOWS windows ``hop`` apart of music-like probe audio."""
    wave = probe_audio(1, model.window_samples + (PARITY_WINDOWS - 1) * hop, model.sample_rate)[0]
    starts = range(0, PARITY_WINDOWS * hop, hop)
    return np.stack([wave[s : s + model.window_samples] for s in starts])


@torch.no_grad()
def check_aggregator(
    model: TaggerModel,
    aggregator: Aggregator,
    section: AggregatorSection,
    embed_path: Path,
    aggregator_path: Path,
    song: torch.Tensor,
) -> float:
    """Max abs difference of ORT's window-by-window chain from PyTorch, per window: the
    window scores, the embeddings, and the song-so-far scores."""
    embed = open_session(embed_path, threads=1, providers=["CPUExecutionProvider"])
    step = open_session(aggregator_path, threads=1, providers=["CPUExecutionProvider"])
    window_scores, embeddings = embed.run(
        [GRAPH_NAMES.scores, GRAPH_NAMES.embedding], {GRAPH_NAMES.waveform: song.numpy()}
    )
    expected_embeddings = model.embed(song)  # (T, D)
    worst = max(
        float(np.max(np.abs(window_scores - model(song).numpy()))),
        float(np.max(np.abs(embeddings - expected_embeddings.numpy())))
        / max(1.0, float(expected_embeddings.abs().max())),
    )
    aggregator.eval()
    state = section.initial_state(1)
    for t in range(len(song)):
        feeds = dict(zip(section.inputs, [embeddings[t : t + 1], *state], strict=True))
        scores, *state = step.run(section.outputs, feeds)
        prefix = expected_embeddings[None, : t + 1]  # (1, t + 1, D)
        expected = aggregator(prefix, torch.tensor([t + 1])).numpy()
        worst = max(worst, float(np.max(np.abs(scores - expected))))
    if not worst <= PARITY_TOLERANCE:
        raise ExportError(
            f"{aggregator_path}: ONNX Runtime's aggregator disagrees with PyTorch by "
            f"{worst:.3g} (tolerance {PARITY_TOLERANCE:g})"
        )
    log.info("parity aggregator (ONNX Runtime) vs PyTorch: max abs diff %.2e", worst)
    return worst
