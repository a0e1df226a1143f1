"""The in-graph log-mel front end matches librosa, the reference the papers used."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from trainer.models.frontend import LogMel, LogMelConfig, hz_to_mel, mel_filterbank, mel_to_hz

SR, N_FFT, HOP, N_MELS = 12_000, 512, 256, 96
FCN_WINDOW = 349_440  # 29.12 s


def relative_frobenius(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def test_filterbank_equals_librosa_slaney():
    ours = mel_filterbank(SR, N_FFT, N_MELS)
    ref = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS)  # htk=False, norm="slaney"
    assert ours.shape == (N_MELS, N_FFT // 2 + 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)


def test_mel_scale_round_trips_and_breaks_at_1khz():
    hz = np.array([0.0, 500.0, 1000.0, 3000.0, 6000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(hz)), hz, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(hz_to_mel(hz), librosa.hz_to_mel(hz), rtol=1e-10)


def test_power_mel_matches_librosa_on_music(music):
    audio = music(10.0, SR, seed=3)
    ref = librosa.feature.melspectrogram(
        y=audio, sr=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, power=2.0
    )
    frontend = LogMel()
    with torch.no_grad():
        ours = frontend.power_mel(torch.from_numpy(audio)[None])[0].numpy()
    assert ours.shape == ref.shape
    assert relative_frobenius(ours, ref) < 1e-4


def test_decibels_match_librosa_power_to_db(music):
    audio = music(3.0, SR, seed=4)
    ref = librosa.power_to_db(
        librosa.feature.melspectrogram(y=audio, sr=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS),
        ref=1.0,
        amin=1e-10,
        top_db=None,
    )
    with torch.no_grad():
        ours = LogMel()(torch.from_numpy(audio)[None])[0].numpy()
    # dB errors are absolute; quiet bins are where float32 rounding shows most
    assert np.max(np.abs(ours - ref)) < 0.05
    assert np.mean(np.abs(ours - ref)) < 1e-3


def test_fcn_window_gives_1366_frames_and_batches_independently():
    frontend = LogMel()
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.standard_normal((2, FCN_WINDOW)).astype(np.float32) * 0.1)
    with torch.no_grad():
        both = frontend(batch)
        second = frontend(batch[1:])
    assert both.shape == (2, N_MELS, 1366)
    assert LogMelConfig().n_frames(FCN_WINDOW) == 1366
    torch.testing.assert_close(both[1:], second, atol=1e-4, rtol=0)


def test_silence_is_floored_not_minus_infinity():
    with torch.no_grad():
        db = LogMel()(torch.zeros(1, 4096))
    assert torch.isfinite(db).all()
    assert torch.allclose(db, torch.full_like(db, -100.0))


def test_features_are_buffers_not_parameters():
    frontend = LogMel()
    assert list(frontend.parameters()) == []
    assert set(frontend.state_dict()) == {"dft", "mel"}


@pytest.mark.parametrize("sample_rate,n_fft,n_mels", [(16_000, 512, 128), (22_050, 1024, 64)])
def test_other_configurations_match_librosa(sample_rate, n_fft, n_mels, music):
    audio = music(2.0, sample_rate, seed=5)
    ref = librosa.feature.melspectrogram(
        y=audio, sr=sample_rate, n_fft=n_fft, hop_length=n_fft // 2, n_mels=n_mels
    )
    frontend = LogMel(LogMelConfig(sample_rate, n_fft, n_fft // 2, n_mels))
    with torch.no_grad():
        ours = frontend.power_mel(torch.from_numpy(audio)[None])[0].numpy()
    assert relative_frobenius(ours, ref) < 1e-4
