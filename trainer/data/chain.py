"""A studio and a station's air drawn per training clip, for the model to hear through.

A tagger trained on the generator's clean output learns the generator's sound. Each
training clip goes instead through a ``Chain`` drawn from its seed (``draw``), applied in
two halves because the caller sets the clip's level between them (the level decides the
``loud`` and ``quiet`` tags):

- ``produce``, what a studio does: an EQ (a spectral tilt or a shelf, sometimes a
  presence bump), a room (reverb) and a broadcast compressor (single band, or three bands
  and a look-ahead limiter);
- ``transmit``, what the air does: a noise floor (hiss, pink noise or mains hum), a band
  limit (full, FM, AM or telephone, the last through a phone line's GSM or G.711 codec)
  and a lossy codec round trip through ffmpeg (mp3, AAC, Opus).

Guarantees: both return float32 of the input's length and are deterministic for a chain
and an input (the room's response and the noise come from ``Chain.seed``). ``produce``
keeps the input's RMS level. ``transmit`` keeps the time alignment (the codec's priming
samples are dropped, see ``_codec_round_trip``) and, for full band, the RMS level to
within about 1.5 dB: only band limits take energy away. ``Chain()`` changes nothing.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
from scipy import fft, signal
from scipy.ndimage import maximum_filter1d, uniform_filter1d

from trainer.data.dataset import DataError

# -- what can be drawn -----------------------------------------------------------------------
EQ_KINDS = {"flat": 0.15, "tilt": 0.45, "low shelf": 0.2, "high shelf": 0.2}  # probabilities
COMPRESSORS = {"off": 0.25, "single": 0.5, "multiband": 0.25}
NOISES = {"off": 0.25, "white": 0.3, "pink": 0.3, "hum": 0.15}
BANDS = {"full": 0.35, "fm": 0.35, "am": 0.17, "telephone": 0.13}
# (high-pass, low-pass) in Hz, 0 for none; AM's low-pass is drawn
BAND_EDGES_HZ = {"full": (0.0, 0.0), "fm": (30.0, 15_000.0), "telephone": (300.0, 3_400.0)}
AM_HIGHPASS_HZ, AM_LOWPASS_HZ = 100.0, (4_500.0, 5_000.0)
P_PRESENCE, P_REVERB, P_CODEC = 0.3, 0.5, 0.6


@dataclass(frozen=True)
class Codec:
    encoder: str  # ffmpeg's name for it
    file_name: str  # the container, by extension
    options: tuple[str, ...]  # speed settings: a cheap stream encoder, not an archival one
    bitrates_kbps: tuple[int, ...]
    weight: float  # how often it is drawn among the codecs ffmpeg can encode


CODECS = {
    "mp3": Codec(
        encoder="libmp3lame",
        file_name="clip.mp3",
        options=("-compression_level", "7"),
        bitrates_kbps=(32, 48, 64, 96, 128, 160, 192),
        weight=0.5,
    ),
    "aac": Codec(
        encoder="aac",
        file_name="clip.m4a",
        options=("-aac_coder", "fast"),
        bitrates_kbps=(48, 64, 96, 128),
        weight=0.25,
    ),
    "opus": Codec(
        encoder="libopus",
        file_name="clip.ogg",
        options=("-compression_level", "5"),
        bitrates_kbps=(16, 24, 32, 48, 64, 96),
        weight=0.25,
    ),
}

# A phone line's own codec, at TELEPHONE_RATE, for clips in the telephone band: what a
# phone-in on air went through (GSM on a mobile, G.711 on a fixed line). ffmpeg's raw
# format names; none has a delay to align.
PHONE_CODECS = {"gsm": 0.5, "mulaw": 0.25, "alaw": 0.25}

# -- how the stages work ---------------------------------------------------------------------
TILT_OCTAVES = 3.0  # a tilt turns flat beyond 125 Hz and 8 kHz: at most ±12 dB
SHELF_STEEPNESS = 2.0  # a shelf's gain changes over about an octave around its corner
PRESENCE_OCTAVES = 0.7  # the presence bump's width (one standard deviation)
ZERO_PHASE_PAD_SECONDS = 0.1  # takes an FFT filter's ringing: no clip end wraps onto the other
NOMINAL_DBFS = -18.0  # the alignment level a processor is set up for (EBU R68); see _compress
CROSSOVERS_HZ = (200.0, 3_000.0)  # the multiband compressor's bands
LIMITER_CREST_DB = 9.0  # the ceiling above the RMS going in: a loud FM station's crest factor
LIMITER_LOOKAHEAD_S = 0.0015
LIMITER_RELEASE_S = 0.05
HIGHPASS_ORDER, LOWPASS_ORDER = 6, 8  # band limits are steep: FM's protects the 19 kHz pilot
LOWPASS_RIPPLE_DB, LOWPASS_STOP_DB = 0.5, 60.0  # elliptic
TELEPHONE_RATE = 8_000  # a phone line's samples
HUM_HARMONICS = 8
PINK_FROM_HZ = 20.0  # pink noise stays flat below this, not infinite at DC
ROOM_STREAM, NOISE_STREAM = 1, 2  # random streams under Chain.seed
SILENCE_DB = -120.0


@dataclass(frozen=True)
class Chain:
    """One clip's studio and air, in the order applied; ``Chain()`` changes nothing."""

    # produce
    eq: str = "flat"  # one of EQ_KINDS
    eq_db: float = 0.0  # a tilt's dB per octave around eq_hz, or a shelf's gain
    eq_hz: float = 1_000.0  # a tilt's pivot or a shelf's corner
    presence_db: float = 0.0  # a bump around presence_hz; 0: none
    presence_hz: float = 3_000.0
    reverb_seconds: float = 0.0  # the room's RT60; 0: dry
    reverb_wet: float = 0.0
    compressor: str = "off"  # one of COMPRESSORS; multiband ends with a limiter
    threshold_dbfs: float = -24.0  # for a programme at NOMINAL_DBFS
    ratio: float = 1.0
    attack_ms: float = 10.0  # the RMS detector's time constant
    release_ms: float = 200.0
    # transmit
    noise: str = "off"  # one of NOISES
    noise_dbfs: float = -90.0  # its RMS level
    hum_hz: float = 50.0  # mains frequency, for noise "hum"
    band: str = "full"  # one of BANDS; telephone also goes through TELEPHONE_RATE
    highpass_hz: float = 0.0  # 0: none
    lowpass_hz: float = 0.0  # 0: none
    codec: str = "none"  # "none" or one of CODECS
    bitrate_kbps: int = 0
    seed: int = 0  # the room's impulse response and the noise
    phone_codec: str = "none"  # "none" or one of PHONE_CODECS: the telephone band's line

    def __post_init__(self) -> None:
        for field, value, known in (
            ("eq", self.eq, EQ_KINDS),
            ("compressor", self.compressor, COMPRESSORS),
            ("noise", self.noise, NOISES),
            ("band", self.band, BANDS),
            ("codec", self.codec, ["none", *CODECS]),
            ("phone_codec", self.phone_codec, ["none", *PHONE_CODECS]),
        ):
            if value not in known:
                raise ValueError(f"Chain.{field} must be one of {', '.join(known)}; got {value!r}")

    def describe(self) -> str:
        """A short line for logs, e.g. ``tilt -2.0 dB/oct, room 0.4 s wet 0.20, fm 15 kHz``."""
        parts = []
        if self.eq == "tilt":
            parts.append(f"tilt {self.eq_db:+.1f} dB/oct")
        elif self.eq != "flat":
            parts.append(f"{self.eq} {self.eq_db:+.0f} dB @ {_hz(self.eq_hz)}")
        if self.presence_db:
            parts.append(f"presence {self.presence_db:+.0f} dB @ {_hz(self.presence_hz)}")
        if self.reverb_seconds and self.reverb_wet:
            parts.append(f"room {self.reverb_seconds:.1f} s wet {self.reverb_wet:.2f}")
        if self.compressor != "off":
            name = "comp" if self.compressor == "single" else "multiband"
            limiter = " + limiter" if self.compressor == "multiband" else ""
            parts.append(f"{name} {self.ratio:.0f}:1 @ {self.threshold_dbfs:.0f}{limiter}")
        if self.noise != "off":
            kind = f"{self.hum_hz:.0f} Hz hum" if self.noise == "hum" else f"{self.noise} noise"
            parts.append(f"{kind} {self.noise_dbfs:.0f} dB")
        if self.band in ("fm", "am"):
            parts.append(f"{self.band} {_hz(self.lowpass_hz)}")
        elif self.band == "telephone":
            parts.append(
                "telephone" + (f" {self.phone_codec}" if self.phone_codec != "none" else "")
            )
        if self.codec != "none":
            parts.append(f"{self.codec} {self.bitrate_kbps}k")
        return ", ".join(parts) or "clean"


def _hz(hz: float) -> str:
    return f"{round(hz / 1000, 1):g} kHz" if hz >= 1000 else f"{hz:.0f} Hz"


# -- drawing ---------------------------------------------------------------------------------
@functools.cache
def ffmpeg_codecs() -> tuple[str, ...]:
    """The names in ``CODECS`` the installed ffmpeg can encode; none without ffmpeg."""
    if shutil.which("ffmpeg") is None:
        return ()
    listing = subprocess.run(
        ["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True, check=False
    ).stdout
    encoders = {line.split()[1] for line in listing.splitlines() if len(line.split()) > 1}
    return tuple(name for name, codec in CODECS.items() if codec.encoder in encoders)


def _pick(rng: np.random.Generator, probabilities: dict[str, float]) -> str:
    weights = np.array(list(probabilities.values()))
    return str(rng.choice(list(probabilities), p=weights / weights.sum()))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def draw(rng: np.random.Generator, codecs: bool = True) -> Chain:
    """A chain for one clip. Each stage takes the same draws whether it is on or off, and
    the codec is drawn last, so ``codecs=False`` changes nothing else.

    Codecs are those ffmpeg can encode here (Opus needs libopus); without ffmpeg all of
    ``CODECS``, so that ``transmit`` says what to install rather than quietly skipping."""
    seed = int(rng.integers(2**32))

    eq = _pick(rng, EQ_KINDS)
    tilt_db = float(rng.uniform(-4.0, 4.0))
    shelf_db = float(rng.uniform(-9.0, 9.0))
    low_corner, high_corner = _log_uniform(rng, 80, 300), _log_uniform(rng, 3_000, 8_000)
    eq_db, eq_hz = {
        "flat": (0.0, 1_000.0),
        "tilt": (tilt_db, 1_000.0),
        "low shelf": (shelf_db, low_corner),
        "high shelf": (shelf_db, high_corner),
    }[eq]
    presence = rng.random() < P_PRESENCE
    presence_db, presence_hz = float(rng.uniform(2.0, 6.0)), _log_uniform(rng, 2_000, 5_000)

    reverb = rng.random() < P_REVERB
    reverb_seconds, reverb_wet = float(rng.uniform(0.2, 1.5)), float(rng.uniform(0.05, 0.35))

    compressor = _pick(rng, COMPRESSORS)
    threshold_dbfs, ratio = float(rng.uniform(-30.0, -16.0)), _log_uniform(rng, 2.0, 8.0)
    attack_ms, release_ms = _log_uniform(rng, 3.0, 30.0), _log_uniform(rng, 50.0, 500.0)

    noise = _pick(rng, NOISES)
    noise_dbfs, hum_hz = float(rng.uniform(-75.0, -50.0)), 50.0 if rng.random() < 0.5 else 60.0

    band = _pick(rng, BANDS)
    am_lowpass_hz = float(rng.uniform(*AM_LOWPASS_HZ))
    am = band == "am"
    highpass_hz, lowpass_hz = (AM_HIGHPASS_HZ, am_lowpass_hz) if am else BAND_EDGES_HZ[band]

    codec, bitrate_kbps = "none", 0
    if codecs and rng.random() < P_CODEC:
        codec = _pick(rng, {name: CODECS[name].weight for name in ffmpeg_codecs() or CODECS})
        bitrate_kbps = int(rng.choice(CODECS[codec].bitrates_kbps))

    # drawn last, so that the other stages stay what they were before phone codecs
    phone_codec = _pick(rng, PHONE_CODECS) if codecs and band == "telephone" else "none"
    return Chain(
        phone_codec=phone_codec,
        eq=eq,
        eq_db=eq_db,
        eq_hz=eq_hz,
        presence_db=presence_db if presence else 0.0,
        presence_hz=presence_hz,
        reverb_seconds=reverb_seconds if reverb else 0.0,
        reverb_wet=reverb_wet if reverb else 0.0,
        compressor=compressor,
        threshold_dbfs=threshold_dbfs,
        ratio=ratio if compressor != "off" else 1.0,
        attack_ms=attack_ms,
        release_ms=release_ms,
        noise=noise,
        noise_dbfs=noise_dbfs,
        hum_hz=hum_hz,
        band=band,
        highpass_hz=highpass_hz,
        lowpass_hz=lowpass_hz,
        codec=codec,
        bitrate_kbps=bitrate_kbps,
        seed=seed,
    )


# -- produce: the studio ---------------------------------------------------------------------
def produce(audio: np.ndarray, sample_rate: int, chain: Chain) -> np.ndarray:
    """``audio`` (mono) through the chain's EQ, room and compressor, keeping its RMS level."""
    dry = np.asarray(audio, dtype=np.float64)
    out = _equalise(dry, sample_rate, chain)
    out = _room(out, sample_rate, chain)
    if chain.compressor == "single":
        out = _compress(out, sample_rate, chain)
    elif chain.compressor == "multiband":
        out = _limit(_compress_multiband(out, sample_rate, chain), sample_rate)
    return _match_rms(out, dry).astype(np.float32)


def _rms_db(audio: np.ndarray) -> float:
    return max(SILENCE_DB, float(10 * np.log10(np.mean(np.square(audio)) + 1e-30)))


def _match_rms(audio: np.ndarray, reference: np.ndarray) -> np.ndarray:
    if _rms_db(audio) <= SILENCE_DB:
        return audio
    return audio * 10 ** ((_rms_db(reference) - _rms_db(audio)) / 20)


def _zero_phase(
    audio: np.ndarray, sample_rate: int, gain_db: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """``audio`` through a zero-phase filter whose gain at each frequency is ``gain_db``."""
    n_fft = fft.next_fast_len(len(audio) + int(ZERO_PHASE_PAD_SECONDS * sample_rate), real=True)
    frequencies = fft.rfftfreq(n_fft, 1 / sample_rate)
    spectrum = fft.rfft(audio, n_fft) * 10 ** (gain_db(frequencies) / 20)
    return fft.irfft(spectrum, n_fft)[: len(audio)]


def _equalise(audio: np.ndarray, sample_rate: int, chain: Chain) -> np.ndarray:
    if chain.eq == "flat" and not chain.presence_db:
        return audio

    def gain_db(frequencies: np.ndarray) -> np.ndarray:
        octaves = np.log2(np.maximum(frequencies, 1.0) / chain.eq_hz)  # from the pivot/corner
        gain = np.zeros_like(frequencies)
        if chain.eq == "tilt":
            gain += chain.eq_db * np.clip(octaves, -TILT_OCTAVES, TILT_OCTAVES)
        elif chain.eq == "low shelf":
            gain += chain.eq_db / (1 + 2 ** (SHELF_STEEPNESS * octaves))
        elif chain.eq == "high shelf":
            gain += chain.eq_db / (1 + 2 ** (-SHELF_STEEPNESS * octaves))
        from_presence = np.log2(np.maximum(frequencies, 1.0) / chain.presence_hz)
        return gain + chain.presence_db * np.exp(-0.5 * (from_presence / PRESENCE_OCTAVES) ** 2)

    return _zero_phase(audio, sample_rate, gain_db)


def _room(audio: np.ndarray, sample_rate: int, chain: Chain) -> np.ndarray:
    """A room as exponentially decaying noise: 60 dB down after ``reverb_seconds``."""
    if not (chain.reverb_seconds and chain.reverb_wet):
        return audio
    rng = np.random.default_rng([chain.seed, ROOM_STREAM])
    t = np.arange(max(1, int(chain.reverb_seconds * sample_rate))) / sample_rate
    response = rng.standard_normal(len(t)) * 10 ** (-3 * t / chain.reverb_seconds)
    response /= np.sqrt(np.sum(np.square(response)))  # unit energy: wet about as loud as dry
    wet = signal.fftconvolve(audio, response)[: len(audio)]
    return (1 - chain.reverb_wet) * audio + chain.reverb_wet * wet


def _follow(reduction_db: np.ndarray, release_samples: float) -> np.ndarray:
    """A gain-reduction follower with an instant attack and an exponential release:
    ``g[t] = max(r[t], g[t - 1] * a)`` with ``a = exp(-1 / release_samples)``.

    Unrolled, ``g[t] = max over s <= t of r[s] * a ** (t - s)``: a running maximum,
    taken in logs so that ``a ** -t`` cannot overflow."""
    ramp = np.arange(len(reduction_db)) / release_samples
    return np.exp(np.maximum.accumulate(np.log(reduction_db + 1e-9) + ramp) - ramp)


def _compress(audio: np.ndarray, sample_rate: int, chain: Chain) -> np.ndarray:
    """A feed-forward RMS compressor, without make-up gain.

    Its threshold is set as for a programme at ``NOMINAL_DBFS``, with the input's own RMS
    standing in for that level: a drawn threshold squeezes a quiet input as much as a loud one."""
    threshold_db = chain.threshold_dbfs - NOMINAL_DBFS + _rms_db(audio)
    smoothing = np.exp(-1000 / (chain.attack_ms * sample_rate))
    mean_square = signal.lfilter([1 - smoothing], [1, -smoothing], np.square(audio))
    level_db = 10 * np.log10(mean_square + 1e-12)
    over_db = np.maximum(level_db - threshold_db, 0.0) * (1 - 1 / chain.ratio)
    reduction_db = _follow(over_db, chain.release_ms * sample_rate / 1000)
    return audio * 10 ** (-reduction_db / 20)


def _compress_multiband(audio: np.ndarray, sample_rate: int, chain: Chain) -> np.ndarray:
    """Bass, middle and treble compressed apart, each as if it were the whole programme:
    what makes broadcast processing sound dense."""
    low = signal.sosfilt(_crossover("lowpass", CROSSOVERS_HZ[0], sample_rate), audio)
    high = np.zeros_like(audio)
    if CROSSOVERS_HZ[1] < 0.45 * sample_rate:
        high = signal.sosfilt(_crossover("highpass", CROSSOVERS_HZ[1], sample_rate), audio)
    middle = audio - low - high  # the three add back up to the input exactly
    return sum(_compress(band, sample_rate, chain) for band in (low, middle, high))


def _limit(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """A look-ahead peak limiter: no peak above ``LIMITER_CREST_DB`` over the input's RMS."""
    ceiling_db = _rms_db(audio) + LIMITER_CREST_DB
    over_db = np.maximum(20 * np.log10(np.abs(audio) + 1e-12) - ceiling_db, 0.0)
    held_db = _follow(over_db, LIMITER_RELEASE_S * sample_rate)
    # The gain falls over the `ahead` samples before a peak and is fully down on it: the
    # maximum looks ahead over [t, t + ahead), the mean back over (t - ahead, t].
    ahead = max(1, round(LIMITER_LOOKAHEAD_S * sample_rate))
    coming_db = maximum_filter1d(held_db, ahead, origin=-(ahead // 2), mode="nearest")
    reduction_db = uniform_filter1d(coming_db, ahead, origin=(ahead - 1) // 2, mode="nearest")
    return audio * 10 ** (-reduction_db / 20)


@functools.cache
def _crossover(kind: str, hz: float, sample_rate: int) -> np.ndarray:
    return signal.butter(4, hz, kind, fs=sample_rate, output="sos")


# -- transmit: the air -----------------------------------------------------------------------
def transmit(audio: np.ndarray, sample_rate: int, chain: Chain) -> np.ndarray:
    """``audio`` (mono) with the chain's noise floor, through its band limit and codec.

    The noise comes first: hiss and hum enter the analogue path, so the receiver's band
    limit and the stream's encoder shape them as they shape the programme."""
    out = np.asarray(audio, dtype=np.float64) + _noise_floor(len(audio), sample_rate, chain)
    out = _band_limit(out, sample_rate, chain)
    out = _codec_round_trip(out, sample_rate, chain.codec, chain.bitrate_kbps)
    return out.astype(np.float32)


def _noise_floor(n: int, sample_rate: int, chain: Chain) -> np.ndarray:
    if chain.noise == "off":
        return np.zeros(n)
    rng = np.random.default_rng([chain.seed, NOISE_STREAM])
    if chain.noise == "hum":
        t = np.arange(n) / sample_rate
        harmonics = [k for k in range(1, HUM_HARMONICS + 1) if k * chain.hum_hz < sample_rate / 2]
        phases = rng.uniform(0, 2 * np.pi, len(harmonics))
        noise = sum(
            np.sin(2 * np.pi * k * chain.hum_hz * t + phase) / k
            for k, phase in zip(harmonics, phases, strict=True)
        )
    else:
        noise = rng.standard_normal(n)
        if chain.noise == "pink":  # power falling 3 dB per octave
            noise = _zero_phase(
                noise, sample_rate, lambda f: -10 * np.log10(np.maximum(f, PINK_FROM_HZ))
            )
    return noise * 10 ** ((chain.noise_dbfs - _rms_db(noise)) / 20)


def _band_limit(audio: np.ndarray, sample_rate: int, chain: Chain) -> np.ndarray:
    out = audio
    if chain.highpass_hz:
        out = signal.sosfilt(_band_filter("highpass", chain.highpass_hz, sample_rate), out)
    if chain.lowpass_hz and chain.lowpass_hz < 0.45 * sample_rate:  # else Nyquist is lower
        out = signal.sosfilt(_band_filter("lowpass", chain.lowpass_hz, sample_rate), out)
    if chain.band == "telephone" and sample_rate > TELEPHONE_RATE:
        narrow = soxr.resample(out, sample_rate, TELEPHONE_RATE)  # delay-compensated
        narrow = _phone_round_trip(narrow, chain.phone_codec)
        out = fit_length(soxr.resample(narrow, TELEPHONE_RATE, sample_rate), len(audio))
    return out


def _phone_round_trip(audio: np.ndarray, codec: str) -> np.ndarray:
    """``audio`` at TELEPHONE_RATE through a phone line's codec (raw stream, no delay)."""
    if codec == "none":
        return audio
    if shutil.which("ffmpeg") is None:
        raise DataError(
            f"this clip's chain encodes with {codec} through ffmpeg, which is not installed"
        )
    quiet = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y"]
    raw = ["-f", "f32le", "-ac", "1", "-ar", str(TELEPHONE_RATE)]
    encoder = {"gsm": ["-c:a", "libgsm"], "mulaw": [], "alaw": []}[codec]
    pcm = np.clip(audio, -1.0, 1.0).astype("<f4").tobytes()
    encoded = _ffmpeg(
        [*quiet, *raw, "-i", "-", *encoder, "-f", codec, "-"], pcm, f"{codec} encoding"
    )
    decoded = _ffmpeg(
        [*quiet, "-f", codec, "-ar", str(TELEPHONE_RATE), "-ac", "1", "-i", "-", *raw, "-"],
        encoded,
        f"{codec} decoding",
    )
    return fit_length(np.frombuffer(decoded, dtype="<f4").astype(np.float64), len(audio))


@functools.lru_cache(maxsize=64)
def _band_filter(kind: str, hz: float, sample_rate: int) -> np.ndarray:
    if kind == "highpass":
        return signal.butter(HIGHPASS_ORDER, hz, kind, fs=sample_rate, output="sos")
    return signal.ellip(
        LOWPASS_ORDER, LOWPASS_RIPPLE_DB, LOWPASS_STOP_DB, hz, kind, fs=sample_rate, output="sos"
    )


def fit_length(audio: np.ndarray, n: int) -> np.ndarray:
    """``audio`` cut or zero-padded to ``n`` samples."""
    return audio[:n] if len(audio) >= n else np.pad(audio, (0, n - len(audio)))


def _codec_round_trip(
    audio: np.ndarray, sample_rate: int, codec: str, bitrate_kbps: int
) -> np.ndarray:
    """``audio`` encoded and decoded by ffmpeg, sample-aligned with the input.

    The encoded clip goes to a file, not a pipe: only a seekable output gets the gapless
    information (mp3's LAME header, the mp4 edit list, Ogg's pre-skip) from which the
    decoder drops the encoder's priming samples. Through a pipe, mp3 comes back 1105
    samples late and AAC 1024."""
    if codec == "none":
        return audio
    if shutil.which("ffmpeg") is None:
        raise DataError(
            f"this clip's chain encodes with {codec} through ffmpeg, which is not installed; "
            "install ffmpeg (apt-get install ffmpeg) or draw chains with codecs=False"
        )
    spec = CODECS[codec]
    quiet = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y"]
    raw = ["-f", "f32le", "-ac", "1", "-ar", str(sample_rate)]
    with tempfile.TemporaryDirectory(prefix="tagd-chain-") as folder:
        encoded = Path(folder, spec.file_name)
        encode = ["-c:a", spec.encoder, "-b:a", f"{bitrate_kbps}k", *spec.options]
        pcm = audio.astype("<f4").tobytes()
        _ffmpeg([*quiet, *raw, "-i", "-", *encode, str(encoded)], pcm, f"{codec} encoding")
        decoded = _ffmpeg([*quiet, "-i", str(encoded), *raw, "-"], b"", f"{codec} decoding")
    return fit_length(np.frombuffer(decoded, dtype="<f4").astype(np.float64), len(audio))


def _ffmpeg(command: list[str], stdin: bytes, what: str) -> bytes:
    result = subprocess.run(command, input=stdin, capture_output=True, check=False)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace")[-500:]
        raise DataError(f"ffmpeg {what} failed ({result.returncode}): {message}")
    return result.stdout
