"""The log-mel front end, written as a part of the model graph.

The FCN models take raw waveforms and compute their own features: an STFT as a strided
conv1d with fixed Hann-windowed cos/sin kernels, power, a fixed Slaney mel filterbank as
a matmul, then decibels. Every op is one ONNX Runtime and TensorRT run natively (Conv,
Mul, Add, MatMul, Max, Log), so training and serving share one definition of the
features and the daemon only ever buffers samples.

The filterbank is computed here in numpy to match ``librosa.filters.mel`` with its
defaults (``htk=False``, ``norm="slaney"``); librosa itself is a test-only dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL  # 15 mels
_SLANEY_LOG_STEP = math.log(6.4) / 27.0  # mels per log-Hz above the break


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _SLANEY_HZ_PER_MEL
    above = (
        _SLANEY_BREAK_MEL
        + np.log(np.maximum(hz, _SLANEY_BREAK_HZ) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    )
    return np.where(hz >= _SLANEY_BREAK_HZ, above, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _SLANEY_HZ_PER_MEL
    above = _SLANEY_BREAK_HZ * np.exp(
        _SLANEY_LOG_STEP * (np.maximum(mel, _SLANEY_BREAK_MEL) - _SLANEY_BREAK_MEL)
    )
    return np.where(mel >= _SLANEY_BREAK_MEL, above, linear)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> np.ndarray:
    """Slaney-normalised triangular mel filters, float32 ``[n_mels, n_fft // 2 + 1]``."""
    f_max = sample_rate / 2.0 if f_max is None else f_max
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    # n_mels triangles need n_mels + 2 edges, evenly spaced in mels
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    widths_hz = np.diff(edges_hz)  # (n_mels + 1,)
    ramps = edges_hz[:, None] - fft_hz[None, :]  # (n_mels + 2, n_bins)
    rising = -ramps[:-2] / widths_hz[:-1, None]  # (n_mels, n_bins)
    falling = ramps[2:] / widths_hz[1:, None]  # (n_mels, n_bins)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney norm: each triangle has unit area in Hz, so bands carry comparable energy
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.astype(np.float32)


def dft_kernels(n_fft: int) -> np.ndarray:
    """Periodic-Hann-windowed cos and sin rows, float32 ``[2 * (n_fft // 2 + 1), 1, n_fft]``.

    Rows ``0..n_bins-1`` give the real part of each rfft bin, the rest the (negated)
    imaginary part; only their squares are used, so the sign does not matter.
    """
    n_bins = n_fft // 2 + 1
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)  # periodic Hann, as librosa's stft
    phase = 2.0 * np.pi * np.outer(np.arange(n_bins), n) / n_fft  # (n_bins, n_fft)
    kernels = np.concatenate((np.cos(phase), np.sin(phase))) * window
    return kernels[:, None, :].astype(np.float32)


@dataclass
class LogMelConfig:
    sample_rate: int = 12_000
    n_fft: int = 512
    hop_length: int = 256
    n_mels: int = 96
    f_min: float = 0.0
    f_max: float | None = None  # None: Nyquist
    amin: float = 1e-10  # power floor before the log: -100 dB, librosa's power_to_db default

    def n_frames(self, n_samples: int) -> int:
        """Frames for ``n_samples`` with centred framing (zero padding n_fft // 2 each side)."""
        return 1 + n_samples // self.hop_length


class LogMel(nn.Module):
    """Waveform ``[B, T]`` → log-mel power in dB ``[B, n_mels, 1 + T // hop]``."""

    def __init__(self, config: LogMelConfig | None = None):
        super().__init__()
        self.config = config or LogMelConfig()
        c = self.config
        self.n_bins = c.n_fft // 2 + 1
        # buffers, not parameters: the features are fixed, and travel with state_dict
        self.register_buffer("dft", torch.from_numpy(dft_kernels(c.n_fft)))
        self.register_buffer(
            "mel",
            torch.from_numpy(mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max)),
        )

    def power_mel(self, wave: torch.Tensor, centred: bool = True) -> torch.Tensor:
        """Mel power spectrogram ``[B, n_mels, frames]``, as librosa's melspectrogram.

        ``centred=False`` frames ``wave`` as it is, without padding: frame ``i`` is
        samples ``[i * hop, i * hop + n_fft)``. Incremental inference passes the frames'
        samples with their context (and the zeros of centring where a window has them).
        """
        c = self.config
        x = wave.unsqueeze(1)  # (B, 1, T)
        # zero padding by the conv: librosa's centred framing with pad_mode="constant"
        spec = nn.functional.conv1d(
            x, self.dft, stride=c.hop_length, padding=c.n_fft // 2 if centred else 0
        )  # (B, 2F, N)
        real, imag = spec[:, : self.n_bins], spec[:, self.n_bins :]  # (B, F, N) each
        power = real * real + imag * imag  # (B, F, N)
        return torch.matmul(self.mel, power)  # (B, M, N)

    def forward(self, wave: torch.Tensor, centred: bool = True) -> torch.Tensor:
        mel = self.power_mel(wave, centred)  # (B, M, N)
        # 10 * log10(x) written with the natural log, the op every runtime has
        return torch.log(torch.clamp(mel, min=self.config.amin)) * (
            10.0 / math.log(10.0)
        )  # (B, M, N)
