"""The Million Song Dataset, with audio the user supplies.

MSD ships no audio, so tagd takes three kinds of plain-text file:

- an audio list: ``track_id<TAB>path`` per line; relative paths are relative to the list's
  folder. Tracks you have no audio for are simply absent.
- a tag list: ``track_id<TAB>tag`` per line, one pair per line (the Last.fm tags of the
  published top-50 benchmark, say); further columns (a count, a score) are ignored.
- optional split lists: one track id per line for each of train, valid and test (the
  published split of Choi et al.). Without them, a hash of the track id decides.

Lines starting with ``#`` and blank lines are skipped everywhere. The ``n_tags`` most
frequent tags among tracks with audio are kept; tracks with none of them are dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from trainer.data.dataset import SPLITS, Clip, DataError, LabelledSet, hashed_split, top_tags

log = logging.getLogger(__name__)

DEFAULT_N_TAGS = 50


def load_msd(
    audio_list: str | Path,
    tag_list: str | Path,
    split_lists: dict[str, str | Path] | None = None,
    n_tags: int | None = DEFAULT_N_TAGS,
) -> LabelledSet:
    audio_list, tag_list = Path(audio_list), Path(tag_list)
    audio_of = {
        track: _resolve(audio_list.parent, rest[0])
        for track, rest in _read_columns(audio_list, 2, "track_id<TAB>path")
    }
    tags_of: dict[str, list[str]] = {}
    for track, rest in _read_columns(tag_list, 2, "track_id<TAB>tag"):
        tags_of.setdefault(track, []).append(rest[0].strip())

    split_of: dict[str, str] | None = None
    if split_lists:
        unknown = set(split_lists) - set(SPLITS)
        if unknown:
            raise DataError(f"split lists must be named {', '.join(SPLITS)}, got {sorted(unknown)}")
        split_of = {}
        for split, list_path in split_lists.items():
            for track, _ in _read_columns(Path(list_path), 1, "track_id"):
                split_of[track] = split

    with_audio = [track for track in tags_of if track in audio_of]
    counts = Counter(tag for track in with_audio for tag in dict.fromkeys(tags_of[track]))
    tags = top_tags(counts, n_tags)
    index_of = {tag: i for i, tag in enumerate(tags)}
    clips, no_tags, unlisted = [], 0, 0
    for track in with_audio:
        present = tuple(sorted({index_of[t] for t in tags_of[track] if t in index_of}))
        if not present:
            no_tags += 1
            continue
        split = hashed_split(track) if split_of is None else split_of.get(track)
        if split is None:
            unlisted += 1
            continue
        clips.append(Clip(track, audio_of[track], present, split))

    notes = {
        "tagged tracks without audio (dropped)": len(tags_of) - len(with_audio),
        "tracks without any kept tag (dropped)": no_tags,
    }
    if split_of is not None:
        notes["tracks in no split list (dropped)"] = unlisted
    if not clips:
        raise DataError(
            f"no MSD track has both audio in {audio_list} and a tag in {tag_list}; "
            f"do the track ids match?"
        )
    result = LabelledSet(f"msd {tag_list}", tags, clips, notes)
    log.info("%s", result.summary())
    return result


def _resolve(folder: Path, audio: str) -> Path:
    path = Path(audio.strip())
    return path if path.is_absolute() else folder / path


def _read_columns(path: Path, n_columns: int, expected: str):
    """Yield (first column, remaining columns) of a tab-separated list."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < n_columns or not parts[0].strip():
            raise DataError(f"{path}:{line_number}: expected `{expected}`, got {line!r}")
        yield parts[0].strip(), parts[1:]
