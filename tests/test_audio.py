import shutil
import subprocess

import numpy as np
import pytest
import soundfile
from audio_fixtures import make_music

from tagd.audio import AudioError, PcmDecoder, StreamResampler, decode_file, downmix, resample


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def test_wav_is_downmixed_and_resampled(tmp_path):
    left, right = tone(440, 2.0, 44100), tone(440, 2.0, 44100)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 44100)
    mono = decode_file(path, 12000)
    assert mono.dtype == np.float32
    assert len(mono) == pytest.approx(24000, abs=2)
    assert dominant_frequency(mono, 12000) == pytest.approx(440, abs=2)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
@pytest.mark.parametrize("suffix", [".mp3", ".flac", ".ogg", ".m4a"])
def test_compressed_formats_decode(tmp_path, suffix):
    wav = tmp_path / "in.wav"
    soundfile.write(wav, tone(1000, 3.0, 22050), 22050)
    out = tmp_path / f"song{suffix}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), str(out)], check=True)
    mono = decode_file(out, 16000)
    assert len(mono) == pytest.approx(48000, rel=0.05)
    assert dominant_frequency(mono, 16000) == pytest.approx(1000, abs=5)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
@pytest.mark.parametrize(("suffix", "rate"), [(".gsm", 8000), (".g722", 16000)])
def test_raw_telephone_formats_decode(tmp_path, suffix, rate):
    """Asterisk's voice prompts: raw GSM (libsndfile opens it, then cannot seek in it)
    and raw G.722 (libsndfile refuses it); both go through ffmpeg."""
    wav = tmp_path / "in.wav"
    soundfile.write(wav, tone(440, 2.0, rate), rate)
    out = tmp_path / f"prompt{suffix}"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(wav), "-ac", "1", "-ar", str(rate), str(out)],
        check=True,
    )
    mono = decode_file(out, 16000)
    assert len(mono) == pytest.approx(32000, rel=0.05)
    assert dominant_frequency(mono, 16000) == pytest.approx(440, abs=5)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
@pytest.mark.parametrize("channels", [1, 2])
def test_mp3_decodes_as_one_whole_read_and_quietly(tmp_path, capfd, channels):
    """libsndfile read block by block garbles granules at some block boundaries, and
    libmpg123 complains on stderr (this mono 16 kHz mp3, as MagnaTagATune's, makes it
    complain); decode_file's mp3 path gives a whole-file read's samples, channels averaged."""
    music = [make_music(12.0, 16_000, seed=4 + c) / (1 + c) for c in range(channels)]
    wav, mp3 = tmp_path / "in.wav", tmp_path / "song.mp3"
    soundfile.write(wav, np.stack(music, axis=1), 16_000)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(wav), "-q:a", "4", str(mp3)], check=True
    )
    capfd.readouterr()
    whole, rate = soundfile.read(mp3, dtype="float32", always_2d=True)  # no block boundaries
    mono = decode_file(mp3, rate)
    assert len(mono) == len(whole) > 2 * 65_536
    assert np.abs(mono - whole.mean(axis=1)).max() < 1e-5
    assert "libmpg123" not in capfd.readouterr().err


def test_unreadable_files_raise_audio_error(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        decode_file(tmp_path / "missing.wav", 12000)
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(b"this is not audio" * 100)
    with pytest.raises(AudioError, match="garbage.mp3"):
        decode_file(garbage, 12000)
    empty = tmp_path / "empty.mp3"
    empty.write_bytes(b"")
    with pytest.raises(AudioError):
        decode_file(empty, 12000)


@pytest.mark.parametrize(
    "pcm_format, dtype, scale", [("s16le", "<i2", 32767), ("f32le", "<f4", 1.0)]
)
def test_pcm_decoder_carries_partial_frames(pcm_format, dtype, scale):
    rng = np.random.default_rng(1)
    frames = rng.uniform(-0.9, 0.9, size=(500, 2))
    payload = (frames * scale).astype(dtype).tobytes()
    decoder = PcmDecoder(pcm_format, channels=2)
    pieces = [decoder.decode(payload[i : i + 333]) for i in range(0, len(payload), 333)]
    decoded = np.concatenate(pieces)
    assert decoded.shape == (500, 2)
    np.testing.assert_allclose(decoded, frames, atol=1e-4)


@pytest.mark.parametrize(
    "pcm_format, dtype", [("s16le", "<i2"), ("s32le", "<i4"), ("f32le", "<f4")]
)
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 6])
def test_pcm_decoder_mono_is_the_downmix_bit_for_bit(pcm_format, dtype, channels):
    # The daemon feeds integer PCM through decode_mono: any difference from
    # downmix(decode()) would change scores against tagd tag and earlier releases.
    rng = np.random.default_rng(2)
    info = np.iinfo(dtype) if dtype != "<f4" else None
    if info is not None:
        samples = rng.integers(info.min, info.max, size=(700, channels), endpoint=True)
        samples[0], samples[1] = info.min, info.max  # the extremes, alone and mixed
        samples[2, ::2], samples[2, 1::2] = info.min, info.max
    else:
        samples = rng.uniform(-1, 1, size=(700, channels))
    payload = samples.astype(dtype).tobytes()
    mono, separate = PcmDecoder(pcm_format, channels), PcmDecoder(pcm_format, channels)
    cuts = [0, 5, 333, 1001, 2500, len(payload)]  # partial frames carried across messages
    got = [mono.decode_mono(payload[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    want = [downmix(separate.decode(payload[a:b])) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert np.concatenate(got).dtype == np.float32
    assert np.array_equal(np.concatenate(got), np.concatenate(want))
    assert len(np.concatenate(got)) == 700


def test_pcm_decoder_rejects_unknown_formats():
    with pytest.raises(AudioError, match="unknown PCM format 'u8'"):
        PcmDecoder("u8", 2)


def test_stream_resampler_matches_one_shot_resampling():
    samples = tone(330, 3.0, 44100) + 0.1 * tone(2500, 3.0, 44100)
    one_shot = resample(samples, 44100, 12000)
    stream = StreamResampler(44100, 12000)
    chunks = [stream.process(samples[i : i + 1234]) for i in range(0, len(samples), 1234)]
    chunks.append(stream.process(np.zeros(0, dtype=np.float32), last=True))
    streamed = np.concatenate(chunks)
    assert len(streamed) == len(one_shot)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-3)


def test_downmix_averages_channels():
    frames = np.array([[1.0, 0.0], [0.5, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(downmix(frames), [0.5, 0.5])


@pytest.mark.parametrize("channels", [2, 3, 6, 8])
def test_downmix_is_the_channel_mean_the_training_data_was_made_with(channels):
    # Prepared training data went through numpy's mean; live streams must get the same.
    frames = np.random.default_rng(channels).standard_normal((1152, channels)).astype(np.float32)
    mono = downmix(frames)
    assert mono.dtype == np.float32
    expected = frames.mean(axis=1, dtype=np.float32)
    if channels < 8:  # numpy sums pairwise from 8 on: then within a rounding
        np.testing.assert_array_equal(mono, expected)
    np.testing.assert_allclose(mono, expected, rtol=0, atol=1e-6)
