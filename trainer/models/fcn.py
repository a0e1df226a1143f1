"""Fully convolutional networks on log-mel input (Choi, Fazekas, Sandler, ISMIR 2016).

FCN-3..7 take a whole 29.12 s clip at 12 kHz (349,440 samples → 96 × 1,366 log-mel) and
shrink it to a 1 × 1 map with 3 × 3 convolutions and max pools, then one dense layer to
the tags. The mel front end is part of the model (trainer.models.frontend), so the
exported graph takes the waveform.

Pools use floor mode, which gives the map sizes of the papers README for FCN-4
(48 × 341, 12 × 68, 4 × 8, 1 × 1); a global max over whatever is left closes the
network, so a preset whose pools do not reach exactly 1 × 1 still works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.models.base import IncrementalGraphs, TaggerModel, scaled
from trainer.models.frontend import LogMel, LogMelConfig
from trainer.models.incremental import incremental_graphs

FCN_SAMPLE_RATE = 12_000
FCN_FRAMES = 1_366  # 29.12 s of 256-sample hops, centred framing
FCN_HOP_LENGTH = 256
# Streaming hop: a fresh 29.12 s prediction about every 3 s, on a whole number of the
# deepest time stride that is at most MAX_ALIGNED_STRIDE_S, so that incremental inference
# (trainer.models.incremental) reuses every layer below it: FCN-4 160 frames, 3.413 s.
TARGET_HOP_S = 3.0
MAX_ALIGNED_STRIDE_S = 4.5


@dataclass
class FCNConfig:
    channels: tuple[int, ...] = (128, 384, 768, 2048)  # FCN-4, Table 1
    pools: tuple[tuple[int, int], ...] = ((2, 4), (4, 5), (3, 8), (4, 8))  # (freq, time)
    extra_1x1: tuple[int, ...] = ()  # FCN-6/7: 1 × 1 convs on the 1 × 1 map
    n_tags: int = 50
    width: float = 1.0  # channel multiplier: the slides' narrow nets, tiny test models
    # Dropout only before the output layer by default; Choi et al.'s 0.5 after every pool
    # (the "choi2016" recipe) is right for full-size nets on MTT, not for narrow nets on a
    # few hundred clips (docs/training.md has the measurements).
    dropout: float = 0.0  # after every pool
    head_dropout: float = 0.5  # before the output layer
    sample_rate: int = FCN_SAMPLE_RATE
    n_mels: int = 96
    n_fft: int = 512
    hop_length: int = FCN_HOP_LENGTH
    n_frames: int = FCN_FRAMES

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.pools = tuple((int(f), int(t)) for f, t in self.pools)
        self.extra_1x1 = tuple(int(c) for c in self.extra_1x1)
        if len(self.channels) != len(self.pools):
            raise ValueError(
                f"FCN needs one pool per conv layer: {len(self.channels)} channels, "
                f"{len(self.pools)} pools"
            )
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")

    @property
    def window_samples(self) -> int:
        # centred framing: frames = 1 + samples // hop
        return (self.n_frames - 1) * self.hop_length


def aligned_hop_samples(config: FCNConfig) -> int:
    """The default hop: the multiple of the deepest stride ≤ MAX_ALIGNED_STRIDE_S nearest 3 s."""
    frame_s = config.hop_length / config.sample_rate
    stride = 1  # cumulative time stride in frames
    for _, pool_t in config.pools:
        if stride * pool_t * frame_s > MAX_ALIGNED_STRIDE_S:
            break
        stride *= pool_t
    multiple = max(1, round(TARGET_HOP_S / (stride * frame_s)))
    return multiple * stride * config.hop_length


class ConvBlock(nn.Module):
    """3 × 3 conv ('same') → BN → ReLU → max pool → dropout (none by default)."""

    def __init__(self, in_channels: int, out_channels: int, pool: tuple[int, int], dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(pool)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.pool(self.activations(x)))  # (B, C, H // ph, W // pw)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Conv, BN and ReLU: the map before the pool (incremental steps pool parts of it)."""
        return self.activate(self.conv(x))  # (B, C, H, W)

    def activate(self, conv_output: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(conv_output))


class Conv1x1(nn.Module):
    """1 × 1 conv → BN → ReLU: FCN-6/7's extra nonlinearity on the final map."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))  # (B, C', H, W)


class FCN(TaggerModel):
    def __init__(self, config: FCNConfig, arch: str = "fcn"):
        c = config
        super().__init__(
            c,
            arch,
            hop_samples=aligned_hop_samples(c),
            clip_seconds=c.window_samples / c.sample_rate,  # one window is one clip
        )

        self.frontend = LogMel(LogMelConfig(c.sample_rate, c.n_fft, c.hop_length, c.n_mels))
        # per-band input normalisation, as Choi's bn_0_freq
        self.input_bn = nn.BatchNorm1d(c.n_mels)
        widths = [scaled(ch, c.width) for ch in c.channels]
        self.blocks = nn.ModuleList(
            ConvBlock(cin, cout, pool, c.dropout)
            for cin, cout, pool in zip([1, *widths[:-1]], widths, c.pools, strict=True)
        )
        extra = [scaled(ch, c.width) for ch in c.extra_1x1]
        extra_inputs = [widths[-1], *extra][: len(extra)]
        self.extra = nn.ModuleList(
            Conv1x1(cin, cout) for cin, cout in zip(extra_inputs, extra, strict=True)
        )
        self.head_drop = nn.Dropout(c.head_dropout)
        self.head = nn.Linear(extra[-1] if extra else widths[-1], c.n_tags)

    def feature_maps(self, wave: torch.Tensor) -> list[torch.Tensor]:
        """The map after each conv block, for inspection and the shape tests."""
        x = self.input_bn(self.frontend(wave)).unsqueeze(1)  # (B, 1, M, N)
        maps = []
        for block in self.blocks:
            x = block(x)  # (B, C_i, H_i, W_i)
            maps.append(x)
        return maps

    def incremental_graphs(
        self, hop_samples: int, embedding: bool = False
    ) -> IncrementalGraphs | None:
        """Every layer is local in time: the levels a hop shifts by whole columns are
        reused (trainer.models.incremental has the plan)."""
        return incremental_graphs(self, hop_samples, embedding)

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.feature_maps(wave)[-1]  # (B, C, 1, 1) for the paper presets
        for layer in self.extra:
            x = layer(x)  # (B, C', 1, 1)
        return torch.amax(x, dim=(2, 3))  # (B, C)

    def forward_logits(self, wave: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.embed(wave)))  # (B, n_tags)


# Tables 1 and 2 of Choi et al. 2016: (channels, pools, extra 1 × 1 convs)
_FCN5_CHANNELS = (128, 256, 512, 1024, 2048)
_FCN5_POOLS = ((2, 4), (2, 4), (2, 4), (3, 5), (4, 4))
FCN_PRESETS: dict[str, dict] = {
    "fcn3": dict(channels=(256, 768, 2048), pools=((3, 5), (4, 16), (8, 17))),
    "fcn4": dict(channels=(128, 384, 768, 2048), pools=((2, 4), (4, 5), (3, 8), (4, 8))),
    "fcn5": dict(channels=_FCN5_CHANNELS, pools=_FCN5_POOLS),
    "fcn6": dict(channels=_FCN5_CHANNELS, pools=_FCN5_POOLS, extra_1x1=(1024,)),
    "fcn7": dict(channels=_FCN5_CHANNELS, pools=_FCN5_POOLS, extra_1x1=(1024, 1024)),
}
