"""Realistic labelled music the project makes itself: General MIDI pieces rendered by FluidSynth.

Each clip is a short piece written for it (melody, chords, bass, drums; random tempo,
key, meter and General MIDI programs), rendered with FluidSynth and a General MIDI
soundfont, and in some clips speech from ``espeak-ng``, alone or over ducked music. The
tags follow from the rendering, never from listening:

- an instrument family (``piano`` … ``choir``) when a part plays a program of it;
- ``drums`` when the drum channel plays;
- ``fast`` / ``slow`` from the tempo (bands with a gap between them, so that neither tag
  is a coin toss at its edge);
- ``loud`` / ``quiet`` from the level the mix is set to (loud mixes are also limited);
- ``speech`` when a voice talks, ``solo`` when one instrument plays alone,
  ``instrumental`` when there is music and no voice (no speech, no choir).

So that a model learns the sound and not the generator, what it must not learn from is
drawn per clip too (``Sources`` says from what):

- the soundfont, from every General MIDI soundfont installed (``SOUNDFONTS``);
- a production and transmission chain (``trainer/data/chain.py``: EQ, room, compression,
  telephone / AM / FM band limits, lossy codecs, a noise floor);
- the voice: espeak-ng, or real recorded speech from Debian packages
  (``trainer/data/recordings.py``), alone or over the music at a drawn ducking, and in a
  quarter of the talking clips down a phone line (a phone-in: GSM or G.711 at 8 kHz);
- the music: a rendered piece, or an excerpt of a real recording (game scores, hold
  music). Nobody named that recording's instruments, tempo or drums: such a clip knows
  only ``speech``, ``instrumental`` (where its package says), ``loud`` and ``quiet``, and
  leaves the other tags unknown (``Piece.known``; the manifest's ``known`` column).

Everything a clip is made of comes from a ``numpy`` generator seeded by ``(seed, clip
number)``, and the tools run with fixed settings, so the same seed gives the same clips
whatever the number of jobs. The pieces are composed before the sources are drawn, so the
same seed with other soundfonts gives the same pieces played on other instruments. Needs
the Debian packages ``fluidsynth``, ``fluid-soundfont-gm`` and ``espeak-ng``
(``scripts/install.sh`` installs them and the other soundfonts).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import soxr

from trainer.data.chain import PHONE_CODECS, Chain, fit_length, produce, transmit
from trainer.data.chain import draw as draw_chain
from trainer.data.dataset import DataError
from trainer.data.manifest import write_manifest
from trainer.data.midi import DRUM_CHANNEL, Note, Track, write_midi
from trainer.data.mtt import FOLDER_SPLITS
from trainer.data.recordings import Recording
from trainer.data.recordings import load as load_recording
from trainer.data.synthetic import assign_splits, write_annotations, write_mp3

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 29.1  # a MagnaTagATune clip
DEFAULT_SAMPLE_RATE = 16_000  # MagnaTagATune's mp3s
SPLIT_FRACTIONS = {"train": 0.7, "valid": 0.1, "test": 0.2}  # 280 / 40 / 80 of 400
# Every General MIDI soundfont Debian ships as .sf2, by name: (path, package). The .sf3
# ones are left out: FluidSynth decodes their samples at every start (~20 s a clip).
SOUNDFONTS: dict[str, tuple[str, str]] = {
    "fluidr3": ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "fluid-soundfont-gm"),
    "musescore": (
        "/usr/share/sounds/sf2/MuseScore_General_Full.sf2",
        "musescore-general-soundfont-lossless",
    ),
    "timgm6mb": ("/usr/share/sounds/sf2/TimGM6mb.sf2", "timgm6mb-soundfont"),
    "opl3": ("/usr/share/sounds/sf2/OPL-3_FM_128M.sf2", "opl3-soundfont"),  # an FM chip's sound
    "csound": ("/usr/share/sounds/sf2/sf_GMbank.sf2", "csound-soundfont"),
}

# General MIDI program families (programs counted from 0). Only programs that sound like
# their family's name are used: no harmonica among organs, no timpani among strings.
FAMILIES: dict[str, tuple[int, ...]] = {
    "piano": tuple(range(0, 8)),
    "bells": tuple(range(8, 16)),  # chromatic percussion: celesta … dulcimer
    "organ": (16, 17, 18, 19, 20),
    "guitar": tuple(range(24, 32)),
    "bass": tuple(range(32, 40)),
    "strings": (40, 41, 42, 44, 45, 48, 49, 50, 51),
    "choir": (52, 53, 54),
    "brass": (56, 57, 58, 59, 60, 61, 62, 63),
    "woodwind": tuple(range(64, 76)),  # saxes, reeds, flutes
    "synth": tuple(range(80, 96)),  # leads and pads
}
MELODY_FAMILIES = (
    "piano",
    "bells",
    "organ",
    "guitar",
    "strings",
    "brass",
    "woodwind",
    "synth",
    "choir",
)
CHORD_FAMILIES = ("piano", "organ", "guitar", "strings", "brass", "synth", "choir", "bells")
SOLO_FAMILIES = ("piano", "guitar", "strings", "brass", "woodwind", "organ", "bells")

TEMPO_BANDS = {"slow": (60, 84), "medium": (96, 120), "fast": (136, 176)}  # beats per minute
LEVELS_DBFS = {"quiet": (-38, -31), "medium": (-25, -19), "loud": (-13, -10)}  # mix RMS

TAGS = [*FAMILIES, "drums", "fast", "slow", "loud", "quiet", "speech", "solo", "instrumental"]

P_SPEECH = 0.15  # clips with a voice talking (about half of them over ducked music)
P_SPEECH_ALONE = 0.4
P_SOLO = 0.15
P_DRUMS, P_BASS, P_CHORDS, P_MELODY = 0.6, 0.75, 0.8, 0.85
DUCKED_DB = (-20.0, -8.0)  # music under speech, relative to the speech: a bed to a mix
# With real recordings (Sources.speech / .music): more talk, half of it real voices, and a
# fifth of the music real recordings.
P_SPEECH_WITH_RECORDINGS = 0.3
P_RECORDED_VOICE = 0.6
P_RECORDED_MUSIC = 0.2
GAP_SECONDS = (0.25, 0.9)  # between consecutive recorded prompts in a talk segment
PARTIAL_KNOWN = ("speech", "instrumental", "loud", "quiet")  # what a real recording knows
P_PHONE_IN = 0.25  # a talking clip's voice comes down a phone line (GSM or G.711), the bed not
MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)
PROGRESSIONS = ((0, 4, 5, 3), (0, 3, 4, 4), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 0, 4), (0, 1, 4, 0))
_RADIO_TALK = (
    "the morning show news weather traffic today tonight music station radio listen "
    "welcome back here with you next hour stay tuned call us now city road sunny rain "
    "cloudy warm cold north south east west bridge delays minutes update sports game "
    "team win score coming up after this break thanks for joining our guest talks about "
    "new album tour concert tickets friday weekend festival local time five ten twenty "
    "degrees wind light heavy clear skies later this evening competition prize winner "
    "request line open phone lines number lucky afternoon drive home safe journey"
)
WORDS = tuple(_RADIO_TALK.split())
ESPEAK_VOICES = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4")


@dataclass(frozen=True)
class Sources:
    """What clips may be made of beyond the composed notes: soundfonts by name, real
    recordings by package (``trainer/data/recordings.py``), and whether a chain is drawn."""

    soundfonts: tuple[str, ...] = ("fluidr3",)
    speech: dict[str, tuple[Recording, ...]] = field(default_factory=dict)
    music: dict[str, tuple[Recording, ...]] = field(default_factory=dict)
    chain: bool = False

    def describe(self) -> str:
        parts = [f"soundfonts {', '.join(self.soundfonts)}"]
        for kind, pool in (("speech", self.speech), ("music", self.music)):
            if pool:
                parts.append(f"real {kind} from {', '.join(pool)}")
        parts.append("a production/transmission chain per clip" if self.chain else "no chain")
        return "; ".join(parts)


@dataclass(frozen=True)
class Piece:
    """What a clip is made of, drawn from its seed before anything is rendered."""

    tags: tuple[str, ...]
    bpm: float
    beats_per_bar: int
    tracks: tuple[Track, ...]  # empty: speech alone, or recorded music
    level_dbfs: float
    speech: str  # words to say; "" for none
    voice: str  # espeak-ng voice+variant
    speech_rate: int  # words per minute
    speech_pitch: int  # 0-99
    soundfont: str = "fluidr3"  # SOUNDFONTS key
    ducked_db: float = -14.0  # music under a voice, relative to it
    recorded_voice: tuple[str, int] | None = None  # (package, first recording): real speech
    recorded_music: tuple[str, int, float] | None = None  # (package, recording, where 0-1)
    chain: Chain | None = None
    known: tuple[str, ...] | None = None  # the tags the labels speak for; None: all
    phone_line: str = "none"  # the voice's phone codec (chain.PHONE_CODECS): a phone-in

    @property
    def talking(self) -> bool:
        return bool(self.speech) or self.recorded_voice is not None


def make_sources(
    soundfonts: str = "all", recordings: str = "train", chain: bool = True, progress: bool = False
) -> Sources:
    """``Sources`` from command-line words: soundfonts ``all`` (those installed) or names,
    comma-separated; recordings ``train`` (the packages the trainer may learn from),
    ``none`` or package names (fetched into the cache, trainer/data/recordings.py)."""
    from trainer.data import recordings as catalog

    names = installed_soundfonts() if soundfonts == "all" else tuple(_words(soundfonts))
    check_tools(names)
    if recordings == "none":
        packages = []
    elif recordings == "train":
        packages = [name for name, p in catalog.PACKAGES.items() if p.role == "train"]
    else:
        packages = _words(recordings)
    by_kind: dict[str, dict[str, list[Recording]]] = {"speech": {}, "music": {}}
    for recording in catalog.fetch(packages, progress=progress) if packages else []:
        by_kind[recording.kind].setdefault(recording.package, []).append(recording)
    return Sources(
        soundfonts=names,
        speech={p: tuple(r) for p, r in sorted(by_kind["speech"].items())},
        music={p: tuple(r) for p, r in sorted(by_kind["music"].items())},
        chain=chain,
    )


def _words(text: str) -> list[str]:
    return [word.strip() for word in text.split(",") if word.strip()]


def soundfont_path(name: str) -> Path:
    if name not in SOUNDFONTS:
        raise DataError(f"unknown soundfont {name!r}; known: {', '.join(SOUNDFONTS)}")
    path, package = SOUNDFONTS[name]
    if not Path(path).is_file():
        raise DataError(
            f"soundfont {name} not found at {path}; install the Debian package {package}"
        )
    return Path(path)


def installed_soundfonts() -> tuple[str, ...]:
    """The soundfonts of ``SOUNDFONTS`` that are installed here."""
    return tuple(name for name, (path, _) in SOUNDFONTS.items() if Path(path).is_file())


def check_tools(soundfonts: tuple[str, ...] = ("fluidr3",)) -> tuple[Path, ...]:
    """The soundfonts' paths; a clear error naming what is missing."""
    missing = [tool for tool in ("fluidsynth", "espeak-ng") if shutil.which(tool) is None]
    if missing:
        raise DataError(
            f"rendered clips need {' and '.join(missing)}; install the Debian packages "
            "fluidsynth, fluid-soundfont-gm and espeak-ng (scripts/install.sh does)"
        )
    if not soundfonts:
        raise DataError("no soundfont to render with; install fluid-soundfont-gm")
    return tuple(soundfont_path(name) for name in soundfonts)


# -- composing -------------------------------------------------------------------------------
def compose(number: int, seed: int, seconds: float, sources: Sources | None = None) -> Piece:
    """The clip's piece; then, from a second generator, what it is played and heard through."""
    piece = _compose_notes(
        number, seed, seconds, recordings=bool(sources and (sources.speech or sources.music))
    )
    return piece if sources is None else _draw_sources(piece, number, seed, sources)


def _draw_sources(piece: Piece, number: int, seed: int, sources: Sources) -> Piece:
    """Soundfont, chain, voice, recorded music: drawn apart from the notes, so that the
    same seed with other sources keeps its pieces."""
    rng = np.random.default_rng([seed, number, 1])
    soundfont = str(rng.choice(sources.soundfonts))
    chain = draw_chain(rng) if sources.chain else None
    ducked = float(rng.uniform(*DUCKED_DB))
    voice = music = None
    if piece.talking and sources.speech and rng.random() < P_RECORDED_VOICE:
        package = str(rng.choice(sorted(sources.speech)))
        voice = (package, int(rng.integers(len(sources.speech[package]))))
    tags, known = list(piece.tags), None
    if piece.tracks and sources.music and rng.random() < P_RECORDED_MUSIC:
        package = str(rng.choice(sorted(sources.music)))
        music = (
            package,
            int(rng.integers(len(sources.music[package]))),
            float(rng.uniform(0.1, 0.9)),
        )
        instrumental = sources.music[package][music[1]].instrumental
        # Only what the recording is known to be; its instruments and tempo nobody named.
        known = tuple(
            t
            for t in PARTIAL_KNOWN
            if t != "instrumental" or instrumental is not None or piece.talking
        )
        tags = [t for t in tags if t in ("speech", "loud", "quiet")]
        if instrumental and not piece.talking:
            tags.append("instrumental")
    phone_line = "none"  # drawn last: the draws above stay what they were without it
    if sources.chain and piece.talking and rng.random() < P_PHONE_IN:
        phone_line = str(rng.choice(list(PHONE_CODECS)))
    return dataclasses.replace(
        piece,
        tags=tuple(tags),
        soundfont=soundfont,
        chain=chain,
        ducked_db=ducked,
        recorded_voice=voice,
        speech=piece.speech if voice is None else "",
        recorded_music=music,
        tracks=() if music else piece.tracks,
        known=known,
        phone_line=phone_line,
    )


def _compose_notes(number: int, seed: int, seconds: float, recordings: bool = False) -> Piece:
    rng = np.random.default_rng([seed, number])
    band = rng.choice(list(TEMPO_BANDS))
    bpm = float(rng.uniform(*TEMPO_BANDS[band]))
    beats_per_bar = 3 if rng.random() < 0.25 else 4
    bars = int(np.ceil(seconds * bpm / 60 / beats_per_bar)) + 1  # one more: no early ending
    root = 48 + int(rng.integers(12))  # the key's tonic, C3 … B3
    scale = MAJOR if rng.random() < 0.6 else MINOR
    degrees = [PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))][b % 4] for b in range(bars)]

    talking = rng.random() < (P_SPEECH_WITH_RECORDINGS if recordings else P_SPEECH)
    speech_alone = talking and rng.random() < P_SPEECH_ALONE
    solo = not talking and rng.random() < P_SOLO
    tracks: list[Track] = []
    families: set[str] = set()

    def program_of(family_choices: tuple[str, ...]) -> tuple[str, int]:
        family = str(rng.choice(family_choices))
        return family, int(rng.choice(FAMILIES[family]))

    if solo:
        family, program = program_of(SOLO_FAMILIES)
        notes = _melody(rng, root, scale, degrees, beats_per_bar)
        if family in ("piano", "guitar", "organ"):  # they accompany themselves
            notes += _chords(rng, root, scale, degrees, beats_per_bar)
        tracks.append(Track(0, program, notes))
        families.add(family)
    elif not speech_alone:
        parts = {
            "melody": rng.random() < P_MELODY,
            "chords": rng.random() < P_CHORDS,
            "bass": rng.random() < P_BASS,
            "drums": rng.random() < P_DRUMS,
        }
        if not any(parts[p] for p in ("melody", "chords")):
            parts["melody"] = True
        if parts["melody"]:
            family, program = program_of(MELODY_FAMILIES)
            tracks.append(Track(0, program, _melody(rng, root, scale, degrees, beats_per_bar)))
            families.add(family)
        if parts["chords"]:
            family, program = program_of(CHORD_FAMILIES)
            chords = _chords(rng, root, scale, degrees, beats_per_bar)
            tracks.append(Track(1, program, chords, volume=90))
            families.add(family)
        if parts["bass"]:
            program = int(rng.choice(FAMILIES["bass"]))
            tracks.append(Track(2, program, _bass(rng, root, scale, degrees, beats_per_bar)))
            families.add("bass")
        if parts["drums"]:
            tracks.append(Track(DRUM_CHANNEL, None, _drums(rng, bars, beats_per_bar, band)))
            families.add("drums")

    level_band = str(rng.choice(list(LEVELS_DBFS), p=[0.25, 0.5, 0.25]))
    level = float(rng.uniform(*LEVELS_DBFS[level_band]))
    speech = _sentences(rng, seconds) if talking else ""
    voice = f"{rng.choice(ESPEAK_VOICES)}+{rng.choice(ESPEAK_VARIANTS)}"

    tags = [t for t in FAMILIES if t in families]
    if "drums" in families:
        tags.append("drums")
    if tracks and band != "medium":
        tags.append(str(band))
    if level_band != "medium":
        tags.append(level_band)
    if talking:
        tags.append("speech")
    if solo:
        tags.append("solo")
    if tracks and not talking and "choir" not in families:
        tags.append("instrumental")
    return Piece(
        tags=tuple(tags),
        bpm=bpm,
        beats_per_bar=beats_per_bar,
        tracks=tuple(tracks),
        level_dbfs=level,
        speech=speech,
        voice=voice,
        speech_rate=int(rng.integers(140, 190)),
        speech_pitch=int(rng.integers(25, 75)),
    )


def _pitch(root: int, scale: tuple[int, ...], step: int) -> int:
    """Scale step ``step`` above the tonic (negative below), as a MIDI key."""
    octave, index = divmod(step, len(scale))
    return root + 12 * octave + scale[index]


def _melody(rng, root, scale, degrees, beats_per_bar) -> list[Note]:
    """A random walk on the scale around the chord of each bar, an octave or two up."""
    notes, step = [], 7 + int(rng.integers(7))
    durations = np.array([0.5, 1.0, 1.0, 1.5, 2.0])
    for bar, degree in enumerate(degrees):
        beat = 0.0
        while beat < beats_per_bar:
            duration = float(min(rng.choice(durations), beats_per_bar - beat))
            step = int(np.clip(step + rng.integers(-2, 3), 5, 16))
            if rng.random() < 0.3:  # lean on the bar's chord
                step = 7 + degree + 2 * int(rng.integers(3))
            if rng.random() > 0.12:  # the rest are rests
                velocity = int(rng.integers(80, 112))
                notes.append(
                    Note(
                        bar * beats_per_bar + beat,
                        duration * 0.95,
                        _pitch(root, scale, step),
                        velocity,
                    )
                )
            beat += duration
    return notes


def _triad(root, scale, degree) -> list[int]:
    return [_pitch(root, scale, degree + k) for k in (0, 2, 4)]


def _chords(rng, root, scale, degrees, beats_per_bar) -> list[Note]:
    """Block chords a bar (or half a bar) long, or an arpeggio, one style per piece."""
    style = int(rng.integers(3))
    notes = []
    for bar, degree in enumerate(degrees):
        keys = _triad(root, scale, degree)
        start = bar * beats_per_bar
        velocity = int(rng.integers(55, 85))
        if style == 0:
            notes += [Note(start, beats_per_bar * 0.98, k, velocity) for k in keys]
        elif style == 1:
            for half in (0, beats_per_bar / 2):
                notes += [Note(start + half, beats_per_bar / 2 * 0.9, k, velocity) for k in keys]
        else:
            for beat in range(beats_per_bar * 2):
                notes.append(
                    Note(start + beat / 2, 0.5, keys[beat % 3] + 12 * (beat // 3 % 2), velocity)
                )
    return notes


def _bass(rng, root, scale, degrees, beats_per_bar) -> list[Note]:
    """The chord's root on every beat, or on the first beat and the fifth on the middle one."""
    walking = rng.random() < 0.5
    notes = []
    for bar, degree in enumerate(degrees):
        low = _pitch(root - 24, scale, degree)
        start = bar * beats_per_bar
        velocity = int(rng.integers(85, 110))
        if walking:
            notes += [Note(start + b, 0.9, low, velocity) for b in range(beats_per_bar)]
        else:
            notes.append(Note(start, beats_per_bar / 2 * 0.95, low, velocity))
            notes.append(
                Note(start + beats_per_bar / 2, beats_per_bar / 2 * 0.95, low + 7, velocity)
            )
    return notes


KICK, SNARE, CLOSED_HAT, OPEN_HAT, CRASH, RIDE = 36, 38, 42, 46, 49, 51


def _drums(rng, bars, beats_per_bar, band) -> list[Note]:
    """Kick on the downbeats, snare on the backbeats, hats in eighths (sixteenths when slow)."""
    hat = RIDE if rng.random() < 0.3 else CLOSED_HAT
    subdivision = 4 if band == "slow" else 2
    notes = [Note(0, 1, CRASH, 100)]
    for bar in range(bars):
        start = bar * beats_per_bar
        for beat in range(beats_per_bar):
            if beat == 0 or (beats_per_bar == 4 and beat == 2):
                notes.append(Note(start + beat, 0.5, KICK, int(rng.integers(95, 120))))
            if beat in ((1, 3) if beats_per_bar == 4 else (1, 2)):
                notes.append(Note(start + beat, 0.5, SNARE, int(rng.integers(85, 110))))
            for k in range(subdivision):
                notes.append(
                    Note(start + beat + k / subdivision, 0.25, hat, int(rng.integers(55, 85)))
                )
        if bar % 4 == 3:
            notes.append(Note(start + beats_per_bar - 0.5, 0.5, OPEN_HAT, 90))
    return notes


def _sentences(rng, seconds: float) -> str:
    """Enough random sentences to keep a voice talking for ``seconds`` (about 2.5 words/s)."""
    words = int(seconds * 3.2) + 10
    out = []
    while words > 0:
        n = int(rng.integers(6, 14))
        sentence = " ".join(str(w) for w in rng.choice(WORDS, n))
        out.append(sentence.capitalize() + ".")
        words -= n
    return " ".join(out)


# -- rendering -------------------------------------------------------------------------------
def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        raise DataError(
            f"{what} failed ({result.returncode}): {result.stderr.decode(errors='replace')[-500:]}"
        )


def _rms_db(audio: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(audio, dtype=np.float64)) + 1e-12))


def render(
    piece: Piece, seconds: float, sample_rate: int, sources: Sources | None = None
) -> np.ndarray:
    """The clip as float32 mono at ``sample_rate``, ``seconds`` long."""
    sources = sources or Sources()
    n = int(round(seconds * sample_rate))
    with tempfile.TemporaryDirectory(prefix="tagd-render-") as tmp:
        music = np.zeros(n)
        if piece.tracks:
            midi, raw = Path(tmp, "piece.mid"), Path(tmp, "piece.raw")
            write_midi(midi, list(piece.tracks), piece.bpm, piece.beats_per_bar)
            _run(
                [
                    "fluidsynth",
                    "-ni",
                    "-q",
                    "-g",
                    "0.6",
                    "-r",
                    str(sample_rate),
                    "-O",
                    "float",
                    "-T",
                    "raw",
                    "-E",
                    "little",
                    "-F",
                    str(raw),
                    str(soundfont_path(piece.soundfont)),
                    str(midi),
                ],
                "fluidsynth",
            )
            stereo = np.fromfile(raw, dtype="<f4").reshape(-1, 2)
            music = fit_length(stereo.mean(axis=1, dtype=np.float64), n)
        elif piece.recorded_music:
            package, number, where = piece.recorded_music
            music = _excerpt(sources.music[package][number], where, n, sample_rate)
        voice = None
        if piece.speech:
            wav = Path(tmp, "speech.wav")
            _run(
                [
                    "espeak-ng",
                    "-v",
                    piece.voice,
                    "-s",
                    str(piece.speech_rate),
                    "-p",
                    str(piece.speech_pitch),
                    "-w",
                    str(wav),
                    piece.speech,
                ],
                "espeak-ng",
            )
            voice, rate = soundfile.read(wav, dtype="float64")
            voice = fit_length(soxr.resample(voice, rate, sample_rate), n)
        elif piece.recorded_voice:
            package, first = piece.recorded_voice
            voice = _talk(sources.speech[package], first, n, sample_rate)
    if voice is not None:
        if piece.phone_line != "none":  # the caller's line; the studio's bed stays wide
            voice = transmit(
                voice.astype(np.float32),
                sample_rate,
                Chain(
                    band="telephone",
                    highpass_hz=300.0,
                    lowpass_hz=3_400.0,
                    phone_codec=piece.phone_line,
                ),
            ).astype(np.float64)
        voice *= 10 ** ((-20 - _rms_db(voice)) / 20)
        if music.any():
            music *= 10 ** ((-20 + piece.ducked_db - _rms_db(music)) / 20)
        mix = voice + music
    else:
        mix = music
    if piece.chain is not None:
        mix = produce(mix, sample_rate, piece.chain).astype(np.float64)
    mix *= 10 ** ((piece.level_dbfs - _rms_db(mix)) / 20)
    # A soft limiter: transparent at normal levels, and a loud master is a driven one.
    mix = np.tanh(mix * (1.6 if "loud" in piece.tags else 1.0))
    if piece.chain is not None:
        mix = transmit(mix.astype(np.float32), sample_rate, piece.chain)
    return mix.astype(np.float32)


def _excerpt(recording: Recording, where: float, n: int, sample_rate: int) -> np.ndarray:
    """``n`` samples of a recording from ``where`` (0-1) of its length; looped if shorter."""
    audio = load_recording(recording, sample_rate).astype(np.float64)
    if len(audio) < n:
        audio = np.tile(audio, n // max(len(audio), 1) + 1)
    start = int(where * (len(audio) - n))
    return audio[start : start + n]


def _talk(pool: tuple[Recording, ...], first: int, n: int, sample_rate: int) -> np.ndarray:
    """A talk segment: consecutive recordings of one package from ``first`` (wrapping),
    with short pauses between them (drawn from ``first``), ``n`` samples."""
    rng = np.random.default_rng(first)
    pieces, have, k = [], 0, 0
    while have < n and k < len(pool):
        audio = load_recording(pool[(first + k) % len(pool)], sample_rate).astype(np.float64)
        gap = np.zeros(int(rng.uniform(*GAP_SECONDS) * sample_rate))
        pieces += [audio, gap]
        have += len(audio) + len(gap)
        k += 1
    return fit_length(np.concatenate(pieces), n)


def generate(
    clips: int | list[int],
    seed: int = 0,
    seconds: float = DEFAULT_SECONDS,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    jobs: int = 2,
    progress: bool = False,
    sources: Sources | None = None,
):
    """Yield ``(clip number, Piece, audio)`` in clip order, rendering ``jobs`` at a time;
    ``clips`` is a count (numbers 0 …) or the numbers."""
    from tqdm import tqdm

    check_tools(sources.soundfonts if sources else ("fluidr3",))

    def one(number: int) -> tuple[int, Piece, np.ndarray]:
        piece = compose(number, seed, seconds, sources)
        return number, piece, render(piece, seconds, sample_rate, sources)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        # map() keeps clip order; the bar counts clips as they are yielded
        numbers = range(clips) if isinstance(clips, int) else clips
        rendered = pool.map(one, numbers)
        yield from tqdm(
            rendered, total=len(numbers), desc="render", unit="clip", disable=not progress
        )


def write_rendered(
    root: str | Path,
    n_clips: int,
    seed: int = 0,
    seconds: float = DEFAULT_SECONDS,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    layout: str = "mtt",
    audio_format: str = "mp3",
    jobs: int = 2,
    progress: bool = False,
    sources: Sources | None = None,
    splits: tuple[str, ...] | None = None,
) -> Path:
    """Render ``n_clips`` into ``root``; returns the annotations file or the manifest.

    ``splits``: render only the clips of these splits (the test pieces again with other
    sources, say); the clips keep their numbers.

    ``layout="mtt"``: ``annotations_final.csv`` and folders ``0``-``f``, split by folder
    as MagnaTagATune is (70 / 10 / 20 %). ``layout="manifest"``: ``audio/`` and
    ``manifest.csv`` with the same splits, a ``known`` column for the clips of real
    recordings (partial labels), and where each clip came from: soundfont, chain,
    recordings (package, version, path).
    """
    if layout not in ("mtt", "manifest"):
        raise DataError(f"layout must be mtt or manifest, got {layout!r}")
    if audio_format not in ("mp3", "wav"):
        raise DataError(f"audio format must be mp3 or wav, got {audio_format!r}")
    if layout == "mtt" and sources and sources.music:
        raise DataError(
            "real recorded music has partial labels, which only the manifest layout holds; use layout manifest"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    splits_of = assign_splits(n_clips, seed, SPLIT_FRACTIONS)
    folders = {s: [f for f, fs in FOLDER_SPLITS.items() if fs == s] for s in SPLIT_FRACTIONS}
    rows, known, origins = [], [], {"soundfont": [], "chain": [], "recordings": []}
    numbers = [n for n in range(n_clips) if splits is None or splits_of[n] in splits]
    for number, piece, audio in generate(
        numbers, seed, seconds, sample_rate, jobs, progress, sources
    ):
        split = splits_of[number]
        folder = folders[split][number % len(folders[split])] if layout == "mtt" else "audio"
        (root / folder).mkdir(exist_ok=True)
        relative = f"{folder}/rendered-{number:05d}.{audio_format}"
        if audio_format == "mp3":
            write_mp3(root / relative, audio, sample_rate)
        else:
            soundfile.write(root / relative, audio, sample_rate, subtype="PCM_16")
        rows.append((number, piece.tags, relative, split))
        known.append(list(piece.known) if piece.known is not None else None)
        origins["soundfont"].append(piece.soundfont if piece.tracks else "")
        phone = f"voice by phone ({piece.phone_line}); " if piece.phone_line != "none" else ""
        origins["chain"].append(phone + (piece.chain.describe() if piece.chain else ""))
        origins["recordings"].append(_recordings_of(piece, sources))

    if layout == "manifest":
        manifest = root / "manifest.csv"
        write_manifest(
            manifest,
            [(rel, list(tags), split) for _, tags, rel, split in rows],
            known=known,
            extra=origins,
        )
        return manifest
    annotations = write_annotations(root, TAGS, [row[:3] for row in rows])
    log.info("rendered %d clips in MagnaTagATune layout to %s", len(rows), root)
    return annotations


def _recordings_of(piece: Piece, sources: Sources | None) -> str:
    """Where a clip's real recordings come from: ``package=version:path`` (the first of a
    talk segment), ``;``-joined."""
    used = []
    if piece.recorded_voice and sources:
        package, first = piece.recorded_voice
        used.append(sources.speech[package][first])
    if piece.recorded_music and sources:
        package, number, _ = piece.recorded_music
        used.append(sources.music[package][number])
    return ";".join(f"{r.package}={r.version}:{r.relative}" for r in used)
