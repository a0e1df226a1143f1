"""Sample-level CNNs on raw waveforms (Lee et al. SMC 2017; Kim et al. ICASSP 2018).

An m^n-DCNN reads m^(n+1) samples: a strided conv (length m, stride m) then n blocks
that each end in a max pool of m, so the last map is one step long. The 3^9 default
reads 59,049 samples (2.68 s at 22,050 Hz); a clip score is the mean over the segments
of 29.1 s of audio, so the default hop is one window (non-overlapping segments).

Blocks (Kim et al. 2018, arXiv 1710.10451):
  basic  conv m → BN → ReLU → max pool m                     (Lee et al. 2017, Table 1)
  se     basic with squeeze-excitation before the pool
  res    conv → BN → ReLU → dropout 0.2 → conv → BN, + shortcut, ReLU, max pool
  rese   res with squeeze-excitation after the second BN, before the add
Heads:
  plain        conv 1×1 512 → BN → ReLU → dropout 0.5 → dense → tags
  multi-level  global max pool of the last three blocks, concatenated (256+256+512),
               → dense 1,024 → BN → ReLU → dropout 0.5 → dense → tags
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.models.base import TaggerModel, scaled

SAMPLECNN_SAMPLE_RATE = 22_050
SAMPLECNN_CLIP_SECONDS = 29.1  # MagnaTagATune clip length: segment scores are averaged over it
BLOCK_KINDS = ("basic", "se", "res", "rese")
MULTI_LEVEL_DEPTH = 3  # blocks whose pooled outputs the multi-level head concatenates


def default_channels(n: int) -> tuple[int, ...]:
    """Lee et al.'s widths generalised to n blocks: 128, 128, 256 × (n - 3), 512."""
    if n < 3:
        raise ValueError(f"SampleCNN needs at least 3 blocks, got n={n}")
    return (128, 128, *([256] * (n - 3)), 512)


@dataclass
class SampleCNNConfig:
    n_tags: int = 50
    m: int = 3  # filter and pool length
    n: int = 9  # number of blocks; window = m ** (n + 1)
    channels: tuple[int, ...] | None = None  # per block; None: default_channels(n)
    first_channels: int = 128  # the strided conv
    head_channels: int = 512  # conv 1×1 of the plain head
    width: float = 1.0  # channel multiplier, for tiny test models
    dropout: float = 0.5  # before the output layer
    block: str = "basic"  # one of BLOCK_KINDS; fixed by the registry name
    multi_level: bool = False  # fixed by the registry name ("-ml")
    se_ratio: float = 16.0  # SE excitation width = C × ratio (Kim et al. amplify, not reduce)
    res_dropout: float = 0.2  # between the two convs of a res/rese block
    ml_hidden: int = 1024  # dense layer of the multi-level head
    sample_rate: int = SAMPLECNN_SAMPLE_RATE
    clip_seconds: float = SAMPLECNN_CLIP_SECONDS

    def __post_init__(self) -> None:
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"block must be one of {', '.join(BLOCK_KINDS)}, got {self.block!r}")
        if self.m < 2:
            raise ValueError(f"m must be at least 2, got {self.m}")
        if self.channels is not None:
            self.channels = tuple(int(c) for c in self.channels)
            if len(self.channels) != self.n:
                raise ValueError(f"channels lists {len(self.channels)} blocks but n={self.n}")
        if self.multi_level and self.n < MULTI_LEVEL_DEPTH:
            raise ValueError(f"the multi-level head needs n >= {MULTI_LEVEL_DEPTH}")
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")

    @property
    def window_samples(self) -> int:
        return self.m ** (self.n + 1)

    @property
    def block_channels(self) -> tuple[int, ...]:
        channels = self.channels if self.channels is not None else default_channels(self.n)
        return tuple(scaled(c, self.width) for c in channels)


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1):
        super().__init__()
        padding = 0 if stride > 1 else "same"
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))  # (B, C', L')


class SqueezeExcite(nn.Module):
    """Global average → dense C·ratio → ReLU → dense C → sigmoid → rescale channels."""

    def __init__(self, channels: int, ratio: float):
        super().__init__()
        hidden = max(1, round(channels * ratio))
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=2)  # (B, C)
        s = torch.sigmoid(self.excite(torch.relu(self.squeeze(s))))  # (B, C)
        return x * s.unsqueeze(2)  # (B, C, L)


class BasicBlock(nn.Module):
    """conv → BN → ReLU [→ SE] → max pool."""

    def __init__(self, cin: int, cout: int, c: SampleCNNConfig, se: bool):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, c.m)
        self.se = SqueezeExcite(cout, c.se_ratio) if se else nn.Identity()
        self.pool = nn.MaxPool1d(c.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.se(self.conv(x)))  # (B, C', L // m)


class ResBlock(nn.Module):
    """conv → BN → ReLU → dropout → conv → BN [→ SE], + shortcut, ReLU, max pool."""

    def __init__(self, cin: int, cout: int, c: SampleCNNConfig, se: bool):
        super().__init__()
        self.conv1 = ConvBNReLU(cin, cout, c.m)
        self.drop = nn.Dropout(c.res_dropout)
        self.conv2 = nn.Conv1d(cout, cout, c.m, padding="same", bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.se = SqueezeExcite(cout, c.se_ratio) if se else nn.Identity()
        # identity shortcut where shapes allow, else a projection
        self.shortcut = (
            nn.Identity()
            if cin == cout
            else nn.Sequential(nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout))
        )
        self.pool = nn.MaxPool1d(c.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.conv1(x))  # (B, C', L)
        y = self.se(self.bn2(self.conv2(y)))  # (B, C', L)
        return self.pool(torch.relu(y + self.shortcut(x)))  # (B, C', L // m)


class SampleCNN(TaggerModel):
    def __init__(self, config: SampleCNNConfig, arch: str = "samplecnn"):
        c = config
        # non-overlapping segments, averaged over clip_seconds
        super().__init__(c, arch, hop_samples=c.window_samples, clip_seconds=c.clip_seconds)

        first = scaled(c.first_channels, c.width)
        self.stem = ConvBNReLU(1, first, c.m, stride=c.m)
        block_class = ResBlock if c.block in ("res", "rese") else BasicBlock
        se = c.block in ("se", "rese")
        widths = c.block_channels
        self.blocks = nn.ModuleList(
            block_class(cin, cout, c, se)
            for cin, cout in zip([first, *widths[:-1]], widths, strict=True)
        )
        if c.multi_level:
            pooled = sum(widths[-MULTI_LEVEL_DEPTH:])
            hidden = scaled(c.ml_hidden, c.width)
            self.neck = nn.Sequential(
                nn.Linear(pooled, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()
            )
        else:
            hidden = scaled(c.head_channels, c.width)
            self.neck = ConvBNReLU(widths[-1], hidden, 1)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(hidden, c.n_tags)

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.stem(wave.unsqueeze(1))  # (B, C0, T / m)
        levels = []
        for block in self.blocks:
            x = block(x)  # (B, C_i, T / m^(i+1))
            levels.append(x)
        if self.config.multi_level:
            pooled = [
                torch.amax(level, dim=2) for level in levels[-MULTI_LEVEL_DEPTH:]
            ]  # (B, C_i) each
            x = self.neck(torch.cat(pooled, dim=1))  # (B, hidden)
        else:
            x = torch.amax(self.neck(x), dim=2)  # (B, hidden): the map is 1 step long
        return x

    def forward_logits(self, wave: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.embed(wave)))  # (B, n_tags)


SAMPLECNN_PRESETS: dict[str, dict] = {
    f"samplecnn{'' if block == 'basic' else '-' + block}{'-ml' if ml else ''}": dict(
        block=block, multi_level=ml
    )
    for block in BLOCK_KINDS
    for ml in (False, True)
}
