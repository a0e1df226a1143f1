"""Real speech and music from Debian packages, fetched at run time, never committed.

``PACKAGES`` is the catalog: what each package holds, which of its files are real
recordings (never text-to-speech output, tracker modules, MIDI or short sound effects),
and its role. ``train`` packages may be trained on. ``heldout`` packages are only for
testing, and none shares a Debian source with a train package.

``fetch`` downloads a package with ``apt-get download`` into the cache (``$TAGD_CACHE``,
else ``~/.cache/tagd``, then ``/debian``), unpacks it once with ``dpkg-deb -x`` into a
temporary folder that is renamed into place, and lists its recordings sorted by path.
Once a package is unpacked, fetching it again reads the cache and runs neither tool.

``write_recordings_set`` turns packages into a labelled set: ``manifest.csv`` (read by
``trainer.data.manifest``) and 16-bit wav clips of ``seconds`` under ``audio/``:

- music: one excerpt from the middle of each track (of the sum of its stems, where a
  package ships a piece as stems). Tracks under 10 s are skipped. Tracks shorter than a
  clip are looped, as their games loop them.
- speech: the prompts of one package, in path order with 0.3-0.8 s of silence between
  them, make one long talk that is cut into consecutive clips. A clip never mixes two
  packages.

Speech clips are tagged ``speech``. Music clips are tagged ``instrumental`` when the
package is known to have no voice. The ``known`` column lists the tags a row's labels
speak for: both for speech, both for music whose ``instrumental`` is known, only
``speech`` otherwise. ``split`` is left empty for the caller to decide. Every clip is
normalised to -20 dBFS RMS, or less where a peak would otherwise pass 0.99. The same
packages, seed and settings give the same clips.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
from tqdm import tqdm

from tagd.audio import AudioError, decode_file, resample
from trainer.data.dataset import DataError
from trainer.data.manifest import TAG_SEPARATOR

log = logging.getLogger(__name__)

Kind = Literal["speech", "music"]
Role = Literal["train", "heldout"]

DEFAULT_SECONDS = 29.1  # a MagnaTagATune clip, as in trainer.data.rendered
DEFAULT_SAMPLE_RATE = 16_000
MIN_TRACK_SECONDS = 10.0  # shorter music is a sting or a jingle, not a piece
SPEECH_GAP_SECONDS = (0.3, 0.8)  # the pause between two prompts, as a talker's
MIN_LAST_CLIP_FILL = 0.5  # a package's last speech clip is kept, padded, if this full
TARGET_RMS_DBFS = -20.0
PEAK_LIMIT = 0.99  # normalising never takes a sample past this
SILENT_DBFS = -60.0  # a quieter clip is dropped: there is nothing in it to label
MAX_SOURCES_NAMED = 4  # recordings named in a row's source column; more are counted
UNPACKED_MARKER = ".tagd-unpacked"  # the package version, inside a finished tree
DECODE_JOBS = min(8, os.cpu_count() or 1)
MANIFEST_COLUMNS = ["path", "tags", "split", "known", "package", "version", "source"]


@dataclass(frozen=True)
class Package:
    """A Debian package of recordings, and which of its files to take."""

    name: str
    kind: Kind
    role: Role
    # music: True when no track has a voice, None when unknown or some do; speech: False
    instrumental: bool | None
    debian_source: str  # binary packages of one source share recordings or a production
    # fnmatch patterns on the path inside the package ("*" also matches "/")
    include: tuple[str, ...]
    licence: str  # as usr/share/doc/<name>/copyright gives it for the recordings
    note: str
    exclude: tuple[str, ...] = ()
    # music: the files of one folder are the stems of one piece (a band's parts recorded
    # apart, as a rhythm game ships them), summed into one track; held-out sets only
    stems: bool = False

    def takes(self, relative: str) -> bool:
        return any(fnmatchcase(relative, p) for p in self.include) and not any(
            fnmatchcase(relative, p) for p in self.exclude
        )


@dataclass(frozen=True)
class Recording:
    package: str
    version: str  # the Debian package version it came from
    kind: Kind
    path: Path  # absolute, in the cache
    relative: str  # inside the package, e.g. usr/share/asterisk/moh/x.wav
    instrumental: bool | None


def _asterisk_core_sounds(language: str, voice: str, licence: str) -> Package:
    return Package(
        name=f"asterisk-core-sounds-{language}-g722",
        kind="speech",
        role="train",
        instrumental=False,
        debian_source="asterisk-core-sounds",
        include=("usr/share/asterisk/sounds/*.g722",),
        exclude=("*/silence/*",),  # silence/1..10: that many seconds of nothing
        licence=licence,
        note=f"Asterisk phone prompts read by {voice}, studio recordings, G.722 16 kHz",
    )


PACKAGES: dict[str, Package] = {
    package.name: package
    for package in (
        # -- train: speech
        _asterisk_core_sounds("en", "Allison Smith (US English)", "CC-BY-SA-3.0"),
        _asterisk_core_sounds("es", "Allison Smith (Mexican Spanish)", "CC-BY-SA-3.0"),
        _asterisk_core_sounds("fr", "June Wallack (Canadian French)", "CC-BY-SA-3.0"),
        _asterisk_core_sounds("it", "Carlo Flora (Italian)", "CC-BY-3.0"),
        _asterisk_core_sounds("ru", "IvrvoiceRU (Russian)", "CC-BY-3.0"),
        Package(
            name="fillets-ng-data-cs",
            kind="speech",
            role="train",
            instrumental=False,
            debian_source="fillets-ng-data",
            include=("usr/share/games/fillets-ng/sound/*/cs/*.ogg",),
            licence="GPL-2",
            note="Czech dialogue of Fish Fillets NG, voice actors, ogg 22/44 kHz",
        ),
        Package(
            name="tuxpaint-stamps-default",
            kind="speech",
            role="train",
            instrumental=False,
            debian_source="tuxpaint-stamps",
            # stamp.ogg is the stamp's sound effect; stamp_desc[_lang].* says its name
            include=(
                "usr/share/tuxpaint/stamps/*_desc*.ogg",
                "usr/share/tuxpaint/stamps/*_desc*.wav",
            ),
            licence="GPL-2",
            note="Tux Paint stamp names read by volunteers in 14 languages, ogg 44 kHz",
        ),
        # -- train: music
        Package(
            name="wesnoth-1.16-music",
            kind="music",
            role="train",
            instrumental=None,  # orchestral; not every track checked for choir
            debian_source="wesnoth-1.16",
            include=("usr/share/games/wesnoth/1.16/data/core/music/*.ogg",),
            exclude=("*/silence.ogg",),
            licence="GPL-2+",
            note="The Battle for Wesnoth soundtrack, orchestral, ogg 44 kHz",
        ),
        Package(
            name="hyperrogue-music",
            kind="music",
            role="train",
            instrumental=True,
            debian_source="hyperrogue",
            include=("usr/share/hyperrogue/music/*.ogg",),  # not sounds/: effects
            licence="CC-BY-SA-3.0",
            note="HyperRogue soundtrack (Shawn Parrotte, Lincoln Domina, Will Savino), ogg",
        ),
        Package(
            name="frozen-bubble-data",
            kind="music",
            role="train",
            instrumental=True,
            debian_source="frozen-bubble",
            # the three themes; the rest of snd/ are effects under 3 s
            include=("usr/share/games/frozen-bubble/snd/*zik*.ogg",),
            licence="GPL-2",
            note="Frozen Bubble's intro and main themes, ogg 44 kHz",
        ),
        Package(
            name="asterisk-moh-opsound-wav",
            kind="music",
            role="train",
            instrumental=True,
            debian_source="asterisk-moh-opsound",
            include=("usr/share/asterisk/moh/*.wav",),
            licence="CC-BY-SA-3.0",
            note="Asterisk's hold music from opsound.org, 5 tracks, wav 8 kHz",
        ),
        Package(
            name="warzone2100-music",
            kind="music",
            role="train",
            instrumental=True,
            debian_source="warzone2100",
            include=("usr/share/games/warzone2100/music/*.opus",),
            licence="GPL-2+ (Aftermath album also CC-BY-SA-3.0+)",
            note="Warzone 2100 soundtracks (original, legacy, Aftermath), opus 48 kHz",
        ),
        # -- held out: speech
        Package(
            name="asterisk-prompt-es-co",
            kind="speech",
            role="heldout",
            instrumental=False,
            debian_source="asterisk-prompt-es-co",
            include=("usr/share/asterisk/sounds/es/*.gsm",),
            licence="GPL-2",
            note="Colombian Spanish phone prompts (July E. Jiménez, Avatar Ltda.), GSM 8 kHz",
        ),
        Package(
            name="asterisk-prompt-fr-armelle",
            kind="speech",
            role="heldout",
            instrumental=False,
            debian_source="asterisk-prompt-fr-armelle",
            include=("usr/share/asterisk/sounds/fr/*.gsm",),
            licence="BSD-style (redistribution with notice)",
            note="French phone prompts read by Armelle Desjardins, GSM 8 kHz",
        ),
        Package(
            name="asterisk-prompt-it-menardi-wav",
            kind="speech",
            role="heldout",
            instrumental=False,
            debian_source="asterisk-prompt-it",
            include=("usr/share/asterisk/sounds/it_IT_f_Menardi/*.wav",),
            exclude=("*/silence/*",),
            licence="CC-BY-SA-3.0",
            note="Italian phone prompts, Menardi / Paola Dal Zot voice, wav 8 kHz",
        ),
        Package(
            name="ktuberling-data",
            kind="speech",
            role="heldout",
            instrumental=False,
            debian_source="ktuberling",
            include=(
                "usr/share/ktuberling/sounds/*/*.ogg",
                "usr/share/ktuberling/sounds/*/*.wav",
                "usr/share/ktuberling/sounds/*/*.opus",
            ),
            exclude=(
                "usr/share/ktuberling/sounds/sr@*",  # byte-for-byte copies of sr/
                # smeared, band-limited words: neither a plain recording nor ruled out as synthesis
                "usr/share/ktuberling/sounds/ga/*",
            ),
            licence="GPL-2+",
            note="KTuberling object names read by translators in 22 languages, single words",
        ),
        Package(
            name="klettres-data",
            kind="speech",
            role="heldout",
            instrumental=False,
            debian_source="klettres",
            include=(
                "usr/share/klettres/*/alpha/*.ogg",
                "usr/share/klettres/*/syllab/*.ogg",
            ),
            licence="GPL-2+",
            note="KLettres letters and syllables read by native speakers, 19 languages, ogg",
        ),
        # -- held out: music
        Package(
            name="asc-music",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="asc-music",
            include=("usr/share/games/asc/music/*.mp3",),
            licence="GPL-2+",
            note="Advanced Strategic Command soundtrack (Michael Kievernagel), 3 mp3 22 kHz",
        ),
        Package(
            name="xmoto-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="xmoto",
            include=("usr/share/games/xmoto/Textures/Musics/*.ogg",),
            licence="GPL-2+",
            note="X-Moto soundtrack (Jens Erler, Cubulo), electronic, ogg 44 kHz",
        ),
        Package(
            name="colobot-common-sounds",
            kind="music",
            role="heldout",
            instrumental=True,
            debian_source="colobot",
            include=("usr/share/games/colobot/music/*.ogg",),  # not sounds/: effects
            licence="GPL-3+",
            note="Colobot soundtracks (Daniel Roux 2001, Emxx52 Gold Edition), ogg 44 kHz",
        ),
        Package(
            name="extremetuxracer-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="extremetuxracer",
            include=("usr/share/games/etr/music/*.ogg",),  # not sounds/: effects
            licence="GPL-2+",
            note="Extreme Tux Racer music (race, menu and credits themes), ogg 44 kHz",
        ),
        Package(
            name="drascula-music",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="drascula",
            include=("usr/share/scummvm/drascula/audio/*.ogg",),  # de/, en/ …: links to it
            licence="Drascula licence (freeware, free redistribution)",
            note="Drascula: The Vampire Strikes Back score, 31 tracks, ogg 44 kHz",
        ),
        # Nobody here has listened to every track of the packages below for a voice, so
        # their `instrumental` is unknown (None), as for the ones above.
        Package(
            name="hedgewars-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="hedgewars",
            include=("usr/share/games/hedgewars/Data/Music/*.ogg",),  # not Sounds/: effects
            licence="GPL-2",
            note="Hedgewars themes (rock, oriental, pirate, olympics, ...), 26 tracks, ogg 44 kHz",
        ),
        Package(
            name="supertux-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="supertux",
            include=("usr/share/games/supertux2/music/*.ogg",),
            # the first games' tunes, tracker modules (chipdisko.mod, salcon.mod ...) rendered
            exclude=("*/music/retro/*", "*/chipdisko.ogg", "*/salcon.ogg"),
            licence="GPL-2+",
            note="SuperTux 0.6 score (forest, antarctic, castle, misc, tropical), ogg 44 kHz",
        ),
        Package(
            name="freedroidrpg-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="freedroidrpg",
            include=("usr/share/freedroidrpg/data/sound/music/*.ogg",),  # not effects/
            licence="GPL-2+",
            note="FreedroidRPG score (ambient, battle, town, temple), 16 tracks, ogg 44 kHz",
        ),
        Package(
            name="marsshooter-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="marsshooter",
            include=(
                "usr/share/games/marsshooter/audio/music/*.ogg",
                "usr/share/games/marsshooter/audio/menu.ogg",
                "usr/share/games/marsshooter/audio/tutorial.ogg",
            ),  # not announcer/, toon/: spoken words and effects
            licence="CC-BY-SA-3.0",
            note="M.A.R.S. soundtrack by the band Obsidian Shell, 12 tracks, ogg 44 kHz",
        ),
        Package(
            name="openclonk-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="openclonk",
            include=("usr/share/games/openclonk/Music.ocg/*.ogg",),
            licence="CC-BY-3.0",
            note="OpenClonk music (K-Pone and others), 8 tracks, ogg 44 kHz",
        ),
        Package(
            name="lincity-ng-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="lincity-ng",
            include=("usr/share/games/lincity-ng/music/*.ogg",),  # not sounds/: effects
            licence="GPL-2+",
            note="LinCity-NG music (pronobozo, Robert van Herk: City Blues ...), 3 tracks, ogg",
        ),
        Package(
            name="zaz-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="zaz",
            include=("usr/share/games/zaz/mus*.ogg",),
            licence="CC-BY-SA-3.0",
            note="Zaz music by Leonard Ritter, 4 tracks, ogg 44 kHz",
        ),
        Package(
            name="scorched3d-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="scorched3d",
            include=("usr/share/games/scorched3d/data/globalmods/none/data/music/*.ogg",),
            licence="GPL-2+",
            note="Scorched 3D music loops, 3 tracks, ogg 44 kHz",
        ),
        Package(
            name="lugaru-data",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="lugaru",
            include=("usr/share/games/lugaru/Sounds/Music*.ogg",),  # not the ambiences
            licence="CC-BY-SA-3.0",
            note="Lugaru HD music, 5 pieces of 28-64 s, ogg 22 kHz",
        ),
        Package(
            name="fretsonfire-songs-muldjord",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="fretsonfire-songs-muldjord",
            # song.ogg: the band less the lead guitar, guitar.ogg: the lead guitar
            include=("usr/share/games/fretsonfire/data/songs/muldjord/*/*.ogg",),
            licence="CC-BY-SA-3.0",
            note="4 songs by El Senator of the Danish metal band Muldjord, as stems, ogg 44 kHz",
            stems=True,
        ),
        Package(
            name="fretsonfire-songs-sectoid",
            kind="music",
            role="heldout",
            instrumental=None,
            debian_source="fretsonfire-songs-sectoid",
            include=("usr/share/games/fretsonfire/data/songs/sectoid/*/*.ogg",),
            licence="Expat",
            note="4 rock and metal songs by Sectoid (Carlos Viola Iborra), as stems, ogg 44 kHz",
            stems=True,
        ),
    )
}

# one of each under ~25 MB to download, for tests and quick checks
SMALL_TRAIN_SPEECH = "asterisk-core-sounds-it-g722"  # 10 MB
SMALL_TRAIN_MUSIC = "asterisk-moh-opsound-wav"  # 14 MB
SMALL_HELDOUT_SPEECH = "asterisk-prompt-es-co"  # 1 MB
SMALL_HELDOUT_MUSIC = "drascula-music"  # 36 MB, 31 tracks


# -- fetching ----------------------------------------------------------------------------------
def default_cache() -> Path:
    """``$TAGD_CACHE/debian``, else ``~/.cache/tagd/debian``."""
    return Path(os.environ.get("TAGD_CACHE") or Path.home() / ".cache" / "tagd") / "debian"


def get_package(name: str) -> Package:
    """The catalog entry for ``name``; DataError listing the known ones."""
    if name not in PACKAGES:
        raise DataError(f"unknown recordings package {name!r}; known: {', '.join(PACKAGES)}")
    return PACKAGES[name]


def fetch(
    packages: str | Iterable[str], cache_dir: str | Path | None = None, progress: bool = False
) -> list[Recording]:
    """The recordings of ``packages``, package by package, each sorted by path.

    Downloads and unpacks what the cache (``cache_dir``, else ``default_cache()``) lacks.
    """
    chosen = [get_package(name) for name in ([packages] if isinstance(packages, str) else packages)]
    cache = Path(cache_dir) if cache_dir is not None else default_cache()
    recordings: list[Recording] = []
    bar = tqdm(chosen, desc="debian packages", unit="package", disable=not progress)
    for entry in bar:
        bar.set_postfix_str(entry.name)
        tree, version = _unpacked(entry, cache)
        recordings += _list_recordings(entry, tree, version)
    return recordings


def _unpacked(entry: Package, cache: Path) -> tuple[Path, str]:
    """The package's tree in the cache and its version, downloading it if need be."""
    tree = cache / entry.name
    marker = tree / UNPACKED_MARKER
    if marker.is_file():
        return tree, marker.read_text(encoding="utf-8").strip()
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise DataError(
            f"fetching {entry.name} needs {' and '.join(missing)}: recordings come from "
            "Debian packages, so this needs a Debian or Ubuntu system with apt"
        )
    cache.mkdir(parents=True, exist_ok=True)
    # Everything happens in a scratch folder beside the tree; the rename publishes it whole,
    # so an interrupted run leaves no half tree. The .deb goes with the scratch folder.
    with tempfile.TemporaryDirectory(prefix=f".{entry.name}-", dir=cache) as scratch:
        deb = _download(entry.name, Path(scratch))
        version = _run(["dpkg-deb", "-f", str(deb), "Version"], entry.name).strip()
        staging = Path(scratch) / "tree"
        _run(["dpkg-deb", "-x", str(deb), str(staging)], entry.name)
        (staging / UNPACKED_MARKER).write_text(version + "\n", encoding="utf-8")
        if tree.exists():  # a tree without a marker: not one this module finished
            shutil.rmtree(tree)
        staging.rename(tree)
    log.info("unpacked %s %s into %s", entry.name, version, tree)
    return tree, version


def _download(name: str, folder: Path) -> Path:
    hint = "check the name, that apt knows it (apt-get update) and can reach a Debian mirror"
    _run(["apt-get", "download", name], name, cwd=folder, hint=hint)
    debs = list(folder.glob("*.deb"))
    if len(debs) != 1:
        raise DataError(f"{name}: apt-get download left {len(debs)} .deb files, expected one")
    return debs[0]


def _run(command: list[str], name: str, cwd: Path | None = None, hint: str = "") -> str:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DataError(f"fetching {name} needs {command[0]}, which is not installed") from None
    if result.returncode != 0:
        raise DataError(
            f"{name}: {' '.join(command[:2])} failed: {_stderr_tail(result.stderr)}"
            + (f"; {hint}" if hint else "")
        )
    return result.stdout


def _stderr_tail(stderr: str, lines: int = 3) -> str:
    # As root, apt warns on every download that it could not drop to the _apt user.
    useful = [line for line in stderr.splitlines() if line.strip() and "unsandboxed" not in line]
    return " | ".join(useful[-lines:]) or "no message"


def _list_recordings(entry: Package, tree: Path, version: str) -> list[Recording]:
    found = []
    for path in tree.rglob("*"):
        # a link repeats a file already listed; an empty file (one in the ru prompts) is none
        if path.is_symlink() or not path.is_file() or path.stat().st_size == 0:
            continue
        relative = path.relative_to(tree).as_posix()
        if entry.takes(relative):
            found.append(
                Recording(
                    entry.name, version, entry.kind, path.resolve(), relative, entry.instrumental
                )
            )
    if not found:
        raise DataError(
            f"{entry.name} {version}: no file matches {', '.join(entry.include)}; the catalog "
            "in trainer/data/recordings.py does not fit this version of the package"
        )
    return sorted(found, key=lambda recording: recording.relative)


# -- decoding ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawCodec:
    """A header-less telephony codec: ffmpeg must be told it; rate and bitrate are fixed."""

    ffmpeg_format: str
    sample_rate: int
    bytes_per_second: int


# decode_file reaches both only through its ffmpeg fallback, after libsndfile refuses or
# fails on them; naming the format here skips that attempt, and duration() needs the rates.
RAW_CODECS = {
    ".gsm": RawCodec("gsm", 8000, 33 * 50),  # GSM 06.10: a 33-byte frame every 20 ms
    ".g722": RawCodec("g722", 16000, 8000),  # G.722 at 64 kbit/s
}


def load(recording: Recording, sample_rate: int) -> np.ndarray:
    """The recording as mono float32 at ``sample_rate``."""
    codec = RAW_CODECS.get(recording.path.suffix)
    try:
        if codec is None:
            return decode_file(recording.path, sample_rate)
        return resample(_decode_raw(recording.path, codec), codec.sample_rate, sample_rate)
    except AudioError as exc:
        raise DataError(f"{recording.package}: {exc}") from exc


def _decode_raw(path: Path, codec: RawCodec) -> np.ndarray:
    command = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-f",
        codec.ffmpeg_format,
        "-i",
        str(path),
        "-ac",
        "1",
        "-f",
        "f32le",
        "-",
    ]
    try:
        result = subprocess.run(command, capture_output=True, check=False)
    except FileNotFoundError:
        raise AudioError(f"{path}: decoding {codec.ffmpeg_format} needs ffmpeg") from None
    if result.returncode != 0 or not result.stdout:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError(f"{path}: ffmpeg could not decode it: {reason[-1] if reason else '?'}")
    return np.frombuffer(bytearray(result.stdout), dtype="<f4")


def duration(recording: Recording) -> float:
    """The recording's length from its header (or size), without decoding it."""
    codec = RAW_CODECS.get(recording.path.suffix)
    if codec is not None:
        return recording.path.stat().st_size / codec.bytes_per_second
    try:
        return soundfile.info(str(recording.path)).duration
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return len(load(recording, DEFAULT_SAMPLE_RATE)) / DEFAULT_SAMPLE_RATE


# -- labelled sets -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ClipPlan:
    """One clip of a package: the recordings in it and, for speech, where each starts in
    seconds from the clip's start (negative: it began in the clip before)."""

    package: Package
    number: int  # among the package's clips, before any selection
    recordings: tuple[Recording, ...]
    starts: tuple[float, ...]


def labels(entry: Package) -> tuple[list[str], list[str]]:
    """(tags, known tags) of every clip of ``entry``."""
    if entry.kind == "speech":
        return ["speech"], ["speech", "instrumental"]
    if entry.instrumental is None:
        return [], ["speech"]
    return (["instrumental"] if entry.instrumental else []), ["speech", "instrumental"]


def write_recordings_set(
    root: str | Path,
    packages: Iterable[str],
    *,
    seconds: float = DEFAULT_SECONDS,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    max_clips_per_package: int | None = None,
    seed: int = 0,
    progress: bool = False,
    cache_dir: str | Path | None = None,
    split: str = "",
) -> Path:
    """Write clips of ``packages`` under ``root/audio`` and their manifest; its path.

    ``max_clips_per_package`` keeps that many clips of each package, spread evenly over
    it from an offset the seed draws. ``split`` goes in every row ("": the reader decides).
    """
    if seconds <= 0 or sample_rate <= 0:
        raise DataError(f"seconds and sample_rate must be positive, got {seconds}, {sample_rate}")
    if max_clips_per_package is not None and max_clips_per_package < 1:
        raise DataError(f"max_clips_per_package must be at least 1, got {max_clips_per_package}")
    names = list(dict.fromkeys([packages] if isinstance(packages, str) else packages))
    recordings = fetch(names, cache_dir=cache_dir, progress=progress)
    with ThreadPoolExecutor(DECODE_JOBS) as pool:
        lengths = dict(zip(recordings, pool.map(duration, recordings), strict=True))
    plans = []
    for name in names:
        entry = PACKAGES[name]
        # seeded by the package's name: adding a package leaves the others' clips as they were
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        own = [recording for recording in recordings if recording.package == name]
        planned = _plan(entry, own, [lengths[r] for r in own], seconds, rng)
        kept = [planned[i] for i in _spread(len(planned), max_clips_per_package, rng)]
        log.info("%s: %d clips of %d recordings, %d kept", name, len(planned), len(own), len(kept))
        plans += kept

    root = Path(root)
    window = round(seconds * sample_rate)
    with ThreadPoolExecutor(DECODE_JOBS) as pool:
        jobs = pool.map(lambda plan: _write_clip(plan, root, window, sample_rate), plans)
        rows = list(tqdm(jobs, total=len(plans), desc="clips", unit="clip", disable=not progress))
    silent = rows.count(None)
    if silent:
        log.warning("dropped %d silent clips (under %s dBFS)", silent, SILENT_DBFS)
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.csv"
    partial = manifest.with_suffix(".csv.partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows([*row[:2], split, *row[3:]] for row in rows if row is not None)
    partial.replace(manifest)  # a manifest only ever lists clips that are all written
    log.info("wrote %d clips to %s", len(rows) - silent, manifest)
    return manifest


def _plan(
    entry: Package, recordings: list[Recording], lengths: list[float], seconds: float, rng
) -> list[_ClipPlan]:
    if entry.kind == "music":  # a track a clip; _render takes its middle
        pieces: dict[str, list[tuple[Recording, float]]] = {}
        for recording, length in zip(recordings, lengths, strict=True):
            key = recording.relative.rsplit("/", 1)[0] if entry.stems else recording.relative
            pieces.setdefault(key, []).append((recording, length))
        tracks = [
            tuple(r for r, _ in stems)
            for stems in pieces.values()
            if max(length for _, length in stems) >= MIN_TRACK_SECONDS
        ]
        return [
            _ClipPlan(entry, number, track, (0.0,) * len(track))
            for number, track in enumerate(tracks)
        ]
    # Speech: the prompts end to end with a pause between them, a talk cut into clips.
    pauses = rng.uniform(*SPEECH_GAP_SECONDS, size=len(recordings))
    pauses[0] = 0.0
    starts = np.cumsum(pauses + np.concatenate([[0.0], lengths[:-1]]))
    ends = starts + np.asarray(lengths)
    talk = float(ends[-1])
    n_clips = int(talk // seconds) + int(talk % seconds >= MIN_LAST_CLIP_FILL * seconds)
    plans = []
    for number in range(n_clips):
        begin = number * seconds
        inside = np.flatnonzero((starts < begin + seconds) & (ends > begin))
        recordings_inside = tuple(recordings[i] for i in inside)
        plans.append(_ClipPlan(entry, number, recordings_inside, tuple(starts[inside] - begin)))
    return plans


def _spread(n: int, count: int | None, rng) -> list[int]:
    """``count`` of ``range(n)`` evenly spaced from a random offset (all when None)."""
    if count is None or count >= n:
        return list(range(n))
    offset = rng.random()
    return [int((k + offset) * n / count) for k in range(count)]


def _render(plan: _ClipPlan, window: int, sample_rate: int) -> np.ndarray:
    if plan.package.kind == "music":
        stems = [load(recording, sample_rate) for recording in plan.recordings]
        track = np.zeros(max(len(stem) for stem in stems), dtype=np.float32)
        for stem in stems:  # one stem: the track itself
            track[: len(stem)] += stem
        if len(track) < window:
            return np.resize(track, window)  # loop a short track, as its game does
        middle = (len(track) - window) // 2
        return track[middle : middle + window]
    clip = np.zeros(window, dtype=np.float32)
    for recording, start in zip(plan.recordings, plan.starts, strict=True):
        samples = load(recording, sample_rate)
        offset = round(start * sample_rate)
        begin, end = max(0, offset), min(window, offset + len(samples))
        if begin < end:
            clip[begin:end] = samples[begin - offset : end - offset]
    return clip


def _write_clip(plan: _ClipPlan, root: Path, window: int, sample_rate: int) -> list[str] | None:
    """Render, normalise and write one clip; its manifest row, or None when it is silent."""
    clip = _render(plan, window, sample_rate)
    normalised = _normalise(clip)
    if normalised is None:
        return None
    relative = f"audio/{plan.package.name}/{plan.number:05d}.wav"
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), normalised, sample_rate, subtype="PCM_16")
    tags, known = labels(plan.package)
    sources = [recording.relative for recording in plan.recordings]
    if len(sources) > MAX_SOURCES_NAMED:
        hidden = len(sources) - MAX_SOURCES_NAMED
        sources = [*sources[: MAX_SOURCES_NAMED - 1], f"… {hidden} more", sources[-1]]
    return [
        relative,
        TAG_SEPARATOR.join(tags),
        "",
        TAG_SEPARATOR.join(known),
        plan.package.name,
        plan.recordings[0].version,
        TAG_SEPARATOR.join(sources),
    ]


def _normalise(samples: np.ndarray) -> np.ndarray | None:
    """At TARGET_RMS_DBFS, or lower where a peak would pass PEAK_LIMIT; None when silent."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    if rms <= 10 ** (SILENT_DBFS / 20):
        return None
    gain = min(10 ** (TARGET_RMS_DBFS / 20) / rms, PEAK_LIMIT / float(np.max(np.abs(samples))))
    return (samples * gain).astype(np.float32)
