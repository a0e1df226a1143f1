"""The production and transmission chain: what each stage does to measured audio."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from audio_fixtures import make_music
from scipy import signal

from trainer.data.chain import (
    BANDS,
    CODECS,
    COMPRESSORS,
    EQ_KINDS,
    NOISES,
    PHONE_CODECS,
    Chain,
    draw,
    ffmpeg_codecs,
    produce,
    transmit,
)
from trainer.data.dataset import DataError

RATE = 16_000
TELEPHONE = Chain(band="telephone", highpass_hz=300, lowpass_hz=3_400)
AM = Chain(band="am", highpass_hz=100, lowpass_hz=4_700)
FM = Chain(band="fm", highpass_hz=30, lowpass_hz=15_000)
# Everything on, with the slowest settings: a worst case for length, finiteness and speed.
HEAVY = Chain(
    eq="tilt",
    eq_db=-3,
    presence_db=4,
    reverb_seconds=1.2,
    reverb_wet=0.3,
    compressor="multiband",
    threshold_dbfs=-28,
    ratio=6,
    attack_ms=3,
    release_ms=300,
    noise="pink",
    noise_dbfs=-55,
    band="telephone",
    highpass_hz=300,
    lowpass_hz=3_400,
    seed=5,
)


def rms_db(audio: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(audio, dtype=np.float64))))


def white_noise(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(round(seconds * sample_rate))
    return (0.05 * noise).astype(np.float32)


def needs(codec: str) -> None:
    if codec not in ffmpeg_codecs():
        pytest.skip(f"this ffmpeg cannot encode {codec}")


# -- drawing ---------------------------------------------------------------------------------
def test_draw_is_deterministic_per_seed():
    assert draw(np.random.default_rng(7)) == draw(np.random.default_rng(7))
    assert draw(np.random.default_rng(7)) != draw(np.random.default_rng(8))


def test_draws_cover_every_stage_at_the_stated_rates():
    chains = [draw(np.random.default_rng(seed)) for seed in range(2_000)]
    share = {
        field: Counter(getattr(chain, field) for chain in chains)
        for field in ("eq", "compressor", "noise", "band", "codec")
    }
    assert set(share["eq"]) == set(EQ_KINDS)
    assert set(share["compressor"]) == set(COMPRESSORS)
    assert set(share["noise"]) == set(NOISES)
    assert set(share["band"]) == set(BANDS)
    assert set(share["codec"]) == {"none", *ffmpeg_codecs()} and len(share["codec"]) >= 3
    assert 0.10 <= share["band"]["telephone"] / 2_000 <= 0.16
    assert share["band"]["full"] + share["band"]["fm"] > 0.6 * 2_000
    assert 0.35 <= share["codec"]["none"] / 2_000 <= 0.45
    assert 0.20 <= share["compressor"]["off"] / 2_000 <= 0.30
    reverb_off = sum(chain.reverb_seconds == 0 for chain in chains)
    assert 0.45 <= reverb_off / 2_000 <= 0.55

    for chain in chains:
        if chain.reverb_seconds:
            assert 0.2 <= chain.reverb_seconds <= 1.5 and 0 < chain.reverb_wet <= 0.35
        if chain.compressor != "off":
            assert 2 <= chain.ratio <= 8
        if chain.eq == "tilt":
            assert abs(chain.eq_db) <= 4
        if chain.noise != "off":
            assert -75 <= chain.noise_dbfs <= -50
        if chain.band == "am":
            assert 4_500 <= chain.lowpass_hz <= 5_000 and chain.highpass_hz == 100
        if chain.codec != "none":
            assert chain.bitrate_kbps in CODECS[chain.codec].bitrates_kbps
        assert (chain.phone_codec != "none") == (chain.band == "telephone")
    assert {chain.phone_codec for chain in chains} == {"none", *PHONE_CODECS}


def test_turning_codecs_off_changes_nothing_else():
    for seed in range(50):
        with_codec = draw(np.random.default_rng(seed))
        without = draw(np.random.default_rng(seed), codecs=False)
        assert without == dataclasses.replace(
            with_codec, codec="none", bitrate_kbps=0, phone_codec="none"
        )


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="full, fm, am, telephone; got 'shortwave'"):
        Chain(band="shortwave")


def test_describe_names_each_stage_that_is_on():
    chain = dataclasses.replace(HEAVY, codec="mp3", bitrate_kbps=96)
    assert chain.describe() == (
        "tilt -3.0 dB/oct, presence +4 dB @ 3 kHz, room 1.2 s wet 0.30, "
        "multiband 6:1 @ -28 + limiter, pink noise -55 dB, telephone, mp3 96k"
    )
    assert Chain().describe() == "clean"


# -- both halves -----------------------------------------------------------------------------
def test_the_clean_chain_changes_nothing():
    audio = make_music(1.0, RATE)
    np.testing.assert_array_equal(produce(audio, RATE, Chain()), audio)
    np.testing.assert_array_equal(transmit(audio, RATE, Chain()), audio)


@pytest.mark.parametrize("sample_rate", [16_000, 44_100])
def test_drawn_chains_keep_length_dtype_and_finiteness(sample_rate):
    chains = [draw(np.random.default_rng(seed), codecs=False) for seed in range(12)]
    chains += [dataclasses.replace(HEAVY, codec=c, bitrate_kbps=64) for c in ffmpeg_codecs()]
    for length in (100, 23_457):  # shorter than the room and the codec's frames; odd
        audio = make_music(length / sample_rate, sample_rate, seed=length)
        silence = np.zeros(length, dtype=np.float32)
        for chain in chains:
            for clip in (audio, silence):
                produced = produce(clip, sample_rate, chain)
                sent = transmit(produced, sample_rate, chain)
                for out in (produced, sent):
                    assert out.shape == clip.shape and out.dtype == np.float32, chain
                    assert np.all(np.isfinite(out)), chain


def test_produce_and_transmit_are_deterministic():
    chain = dataclasses.replace(HEAVY, codec=(ffmpeg_codecs() or ("none",))[0], bitrate_kbps=64)
    audio = make_music(2.0, RATE)
    first = transmit(produce(audio, RATE, chain), RATE, chain)
    again = transmit(produce(audio, RATE, chain), RATE, chain)
    np.testing.assert_array_equal(first, again)
    other_seed = dataclasses.replace(chain, seed=chain.seed + 1)
    assert not np.array_equal(transmit(produce(audio, RATE, other_seed), RATE, other_seed), first)


# -- produce ---------------------------------------------------------------------------------
def test_produce_keeps_the_rms_level():
    audio = make_music(3.0, RATE, level=0.05)
    for seed in range(6):
        chain = draw(np.random.default_rng(seed), codecs=False)
        assert rms_db(produce(audio, RATE, chain)) == pytest.approx(rms_db(audio), abs=0.01)


def loud_then_quiet(seconds: float = 4.0) -> np.ndarray:
    """Music whose second half is 20 dB below its first."""
    audio = make_music(seconds, RATE)
    audio[len(audio) // 2 :] *= 0.1
    return audio


def halves_db(audio: np.ndarray) -> float:
    """How much louder the first half is than the second, skipping the edges' transients."""
    half, skip = len(audio) // 2, RATE // 2
    return rms_db(audio[skip:half]) - rms_db(audio[half + skip :])


def crest_db(audio: np.ndarray) -> float:
    return float(20 * np.log10(np.max(np.abs(audio)))) - rms_db(audio)


def test_compression_narrows_the_dynamic_range():
    audio = loud_then_quiet()
    assert halves_db(audio) == pytest.approx(20, abs=0.3)
    # 4:1 from 6 dB under the programme's RMS: the loud half, 9 dB over, loses 6.75 dB
    single = Chain(compressor="single", threshold_dbfs=-24, ratio=4, attack_ms=10, release_ms=100)
    assert halves_db(produce(audio, RATE, single)) == pytest.approx(20 - 6.75, abs=1.0)

    multiband = dataclasses.replace(single, compressor="multiband")
    squeezed = produce(audio, RATE, multiband)
    assert halves_db(squeezed) < 20 - 6
    assert crest_db(squeezed) < crest_db(audio) - 4  # the limiter holds the peaks down


def decay_seconds(audio: np.ndarray, start: int) -> float:
    """RT60 read from the slope of the level after ``start`` (20 ms frames, -5 to -35 dB)."""
    frame = RATE // 50
    tail = audio[start : start + (len(audio) - start) // frame * frame].astype(np.float64)
    level_db = 10 * np.log10(np.mean(tail.reshape(-1, frame) ** 2, axis=1) + 1e-30)
    level_db -= level_db[0]
    fit = (level_db < -5) & (level_db > -35) & (np.arange(len(level_db)) > 0)
    slope_db_per_s = np.polyfit(np.flatnonzero(fit) * frame / RATE, level_db[fit], 1)[0]
    return -60 / slope_db_per_s


@pytest.mark.parametrize("reverb_seconds", [0.3, 1.2])
def test_a_room_makes_an_impulse_decay_over_its_reverb_time(reverb_seconds):
    impulse = np.zeros(3 * RATE, dtype=np.float32)
    at = RATE // 10
    impulse[at] = 1.0
    after = at + RATE // 50  # past the direct sound
    dry = produce(impulse, RATE, dataclasses.replace(HEAVY, reverb_seconds=0, compressor="off"))
    assert np.max(np.abs(dry[after:])) < 1e-3 * np.max(np.abs(dry))  # the EQ rings only briefly

    room = Chain(reverb_seconds=reverb_seconds, reverb_wet=0.3, seed=3)
    wet = produce(impulse, RATE, room)
    assert rms_db(wet[after:]) - rms_db(wet) > -20  # much of the energy arrives late
    assert decay_seconds(wet, after) == pytest.approx(reverb_seconds, rel=0.2)


# -- transmit --------------------------------------------------------------------------------
def band_db(original: np.ndarray, sent: np.ndarray, sample_rate: int, low: float, high: float):
    """How much the band low..high Hz lost, in dB (Welch spectra of both)."""
    frequencies, before = signal.welch(original, sample_rate, nperseg=4096)
    _, after = signal.welch(sent, sample_rate, nperseg=4096)
    inside = (frequencies >= low) & (frequencies <= high)
    return float(10 * np.log10(np.mean(after[inside]) / np.mean(before[inside])))


@pytest.mark.parametrize(
    ("chain", "sample_rate", "kept", "removed"),
    [
        (TELEPHONE, 16_000, [(400, 3_200)], [(20, 120), (4_500, 7_900)]),
        (AM, 16_000, [(150, 4_400)], [(5_600, 7_900)]),
        (FM, 44_100, [(100, 14_500)], [(16_500, 21_000)]),
        (Chain(), 44_100, [(20, 21_000)], []),
    ],
    ids=["telephone", "am", "fm", "full"],
)
def test_band_limits_remove_what_the_air_cannot_carry(chain, sample_rate, kept, removed):
    noise = white_noise(4.0, sample_rate)
    sent = transmit(noise, sample_rate, chain)
    for low, high in kept:
        assert band_db(noise, sent, sample_rate, low, high) > -1.0, (low, high)
    for low, high in removed:
        assert band_db(noise, sent, sample_rate, low, high) < -30.0, (low, high)


def lag_ms(reference: np.ndarray, shifted: np.ndarray, sample_rate: int) -> float:
    correlation = signal.correlate(shifted, reference, mode="full", method="fft")
    return (int(np.argmax(correlation)) - (len(reference) - 1)) / sample_rate * 1000


@pytest.mark.parametrize("sample_rate", [16_000, 44_100])
@pytest.mark.parametrize("codec", list(CODECS))
def test_a_codec_round_trip_stays_aligned_and_at_level(codec, sample_rate):
    needs(codec)
    audio = make_music(3.0, sample_rate, seed=1, level=0.1)
    bitrate = CODECS[codec].bitrates_kbps[len(CODECS[codec].bitrates_kbps) // 2]
    sent = transmit(audio, sample_rate, Chain(codec=codec, bitrate_kbps=bitrate))
    assert abs(lag_ms(audio, sent, sample_rate)) <= 2.0
    assert rms_db(sent) == pytest.approx(rms_db(audio), abs=1.5)
    assert np.corrcoef(audio, sent)[0, 1] > 0.9  # the same music, not just the same level


@pytest.mark.parametrize("phone_codec", list(PHONE_CODECS))
def test_a_phone_line_codec_is_heard_and_adds_no_delay(phone_codec):
    if not ffmpeg_codecs():
        pytest.skip("phone codecs go through ffmpeg")
    audio = make_music(3.0, RATE, seed=3, level=0.1)
    line = Chain(band="telephone", highpass_hz=300.0, lowpass_hz=3_400.0)
    clean = transmit(audio, RATE, line)
    coded = transmit(audio, RATE, dataclasses.replace(line, phone_codec=phone_codec))
    assert abs(lag_ms(clean, coded, RATE)) <= 0.5
    assert np.corrcoef(clean, coded)[0, 1] > 0.9  # the same line
    assert rms_db(coded - clean) < rms_db(clean) - 10 and not np.allclose(coded, clean, atol=1e-4)


def test_full_band_transmission_keeps_a_quiet_clip_level():
    audio = make_music(3.0, RATE, seed=2)
    audio *= 10 ** ((-38 - rms_db(audio)) / 20)  # the bottom of the quiet band
    full = {"band": "full", "highpass_hz": 0.0, "lowpass_hz": 0.0, "noise_dbfs": -50.0}
    for seed in range(6):
        chain = dataclasses.replace(draw(np.random.default_rng(seed)), **full)
        assert rms_db(transmit(audio, RATE, chain)) == pytest.approx(-38, abs=1.5), chain


def test_a_codec_without_ffmpeg_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg on it
    with pytest.raises(DataError, match=r"ffmpeg.*not installed.*codecs=False"):
        transmit(make_music(0.5, RATE), RATE, Chain(codec="mp3", bitrate_kbps=128))
