"""What every tagger model is: a waveform-in, scores-out nn.Module that knows its audio.

A ``TaggerModel`` carries the facts the model card needs (sample rate, window, default
hop, clip length) and the hyper-parameters that rebuild it:
``create_model(model.arch, model.n_tags, **model.hparams)`` gives the same network.
A family that can score a window from the last one's state declares how in
``incremental_graphs`` (FCN: trainer.models.incremental); export asks every model.
Every family ends in one dense layer, ``head``; ``embed`` is what that layer reads (the
last hidden layer, ``EMBEDDING_LAYER``), the window embedding that an aggregator over
many windows (trainer.models.aggregator) takes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def jsonable(value: Any) -> Any:
    """Tuples to lists, recursively, so hyper-parameters survive a JSON round trip."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def scaled(channels: int, width: float) -> int:
    """Channels after the width multiplier; never fewer than one."""
    return max(1, round(channels * width))


@dataclass(frozen=True)
class IncrementalGraphs:
    """A model's incremental plan at one hop, as export writes it: the two modules and
    what the card says of them (tagd.card's ``HopGraphs``, ``IncrementalSection``)."""

    prime: nn.Module  # waveform (B, window) → (scores, *state[, embedding])
    step: nn.Module  # waveform (B, window), *state → (scores, *next state[, embedding])
    state_names: tuple[str, ...]  # one per state tensor, in order
    state_shapes: tuple[tuple[int, ...], ...]  # of one stream, without the batch axis
    time_strides: tuple[int, ...]  # samples per column of each level, hop or not
    reused_levels: int
    state_bytes: int  # of one stream's state
    step_macs: int  # multiply-accumulates of one step
    full_macs: int  # of one whole window


EMBEDDING_LAYER = "head.input"  # what the card calls the window embedding: the head's input


class TaggerModel(nn.Module):
    """Base of the zoo. Subclasses give the hop and clip length and define ``forward_logits``."""

    arch: str  # registry name, set by create_model
    sample_rate: int  # Hz
    window_samples: int  # samples per input window
    default_hop_samples: int  # suggested hop when streaming; the daemon may override
    clip_seconds: float  # audio one clip-level prediction covers

    def __init__(self, config: Any, arch: str, *, hop_samples: int, clip_seconds: float):
        """``config`` has ``n_tags``, ``sample_rate`` and ``window_samples``."""
        super().__init__()
        self.config = config
        self.arch = arch
        self.n_tags = config.n_tags
        self.sample_rate = config.sample_rate
        self.window_samples = config.window_samples
        self.default_hop_samples = hop_samples
        self.clip_seconds = clip_seconds

    @property
    def hparams(self) -> dict[str, Any]:
        """The config minus ``n_tags``, JSON-able: what create_model needs besides the name."""
        fields = dataclasses.asdict(self.config)
        fields.pop("n_tags")
        return jsonable(fields)

    def incremental_graphs(
        self, hop_samples: int, embedding: bool = False
    ) -> IncrementalGraphs | None:
        """The prime and step modules that score windows ``hop_samples`` apart from the
        last window's state, exactly as ``forward`` (with ``embedding``, each also gives
        the window's ``embed`` as its last output); None when this family has none or
        the hop lets nothing be reused. The families that have them override this."""
        return None

    @property
    def embedding_size(self) -> int:
        """Features per window that ``embed`` gives: the output layer's inputs."""
        return self.head.in_features

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        """The window embedding (B, embedding_size): the last hidden layer, before the
        head's dropout. The families define it."""
        raise NotImplementedError

    def forward_logits(self, wave: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward_logits(wave))  # (B, n_tags)
