"""What every tagger model is: a waveform-in, scores-out nn.Module that knows its audio.

A ``TaggerModel`` carries the facts the model card needs (sample rate, window, default
hop, clip length) and the hyper-parameters that rebuild it:
``create_model(model.arch, model.n_tags, **model.hparams)`` gives the same network.
"""

from __future__ import annotations

import dataclasses
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

    def forward_logits(self, wave: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward_logits(wave))  # (B, n_tags)
