"""MagnaTagATune in its published layout.

``annotations_final.csv`` is tab-separated with every field quoted: ``"clip_id"``, one
0/1 column per tag (188 of them), ``"mp3_path"`` (e.g. ``f/artist-album-01-title-0-29.mp3``).
The mp3s sit in folders ``0``-``9`` and ``a``-``f`` under the audio root.

The usual protocol (Choi et al. 2016, Lee et al. 2017): keep the 50 most frequent tags,
drop clips that have none of them, split by folder: ``0``-``b`` train, ``c`` valid,
``d``-``f`` test. A split file replaces the folder rule.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

from trainer.data.dataset import Clip, DataError, LabelledSet, check_split, top_tags

log = logging.getLogger(__name__)

ANNOTATIONS_NAME = "annotations_final.csv"
ID_COLUMN = "clip_id"
PATH_COLUMN = "mp3_path"
DEFAULT_N_TAGS = 50
FOLDER_SPLITS = {
    **{folder: "train" for folder in "0123456789ab"},
    "c": "valid",
    **{folder: "test" for folder in "def"},
}


def load_mtt(
    annotations: str | Path,
    audio_root: str | Path | None = None,
    n_tags: int | None = DEFAULT_N_TAGS,
    split_file: str | Path | None = None,
) -> LabelledSet:
    """Read MagnaTagATune's annotations.

    ``annotations`` is the CSV or the folder holding it; ``audio_root`` (default: the
    CSV's folder) holds the mp3 tree. ``n_tags`` None keeps every tag.
    """
    annotations = Path(annotations)
    if annotations.is_dir():
        annotations = annotations / ANNOTATIONS_NAME
    if not annotations.is_file():
        raise DataError(
            f"{annotations}: no such file (expected MagnaTagATune's {ANNOTATIONS_NAME})"
        )
    audio_root = Path(audio_root) if audio_root is not None else annotations.parent

    header, rows = _read_annotations(annotations)
    tag_columns = header[1:-1]
    counts: Counter = Counter({tag: 0 for tag in tag_columns})  # keeps column order for ties
    for row in rows:
        counts.update(tag for tag, flag in zip(tag_columns, row[1:-1], strict=True) if flag == "1")
    tags = top_tags(counts, n_tags)
    column_of = {tag: 1 + tag_columns.index(tag) for tag in tags}

    split_of = _read_split_file(Path(split_file)) if split_file else None
    clips: list[Clip] = []
    no_tags = unlisted = 0
    for row in rows:
        clip_id, mp3_path = row[0], row[-1]
        present = tuple(i for i, tag in enumerate(tags) if row[column_of[tag]] == "1")
        if not present:
            no_tags += 1
            continue
        if split_of is None:
            split = FOLDER_SPLITS.get(mp3_path.split("/", 1)[0])
            if split is None:
                raise DataError(
                    f"{annotations}: clip {clip_id} has mp3_path {mp3_path!r} outside the "
                    f"folders 0-9, a-f; give a split file"
                )
        else:
            split = split_of.get(clip_id) or split_of.get(mp3_path)
            if split is None:
                unlisted += 1
                continue
        clips.append(Clip(clip_id, audio_root / mp3_path, present, split))

    notes = {"clips without any kept tag (dropped)": no_tags}
    if split_of is not None:
        notes["clips not in the split file (dropped)"] = unlisted
    result = LabelledSet(f"magnatagatune {annotations}", tags, clips, notes)
    log.info("%s", result.summary())
    return result


def _read_annotations(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quotechar='"')
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: the file is empty") from None
        if len(header) < 3 or header[0] != ID_COLUMN or header[-1] != PATH_COLUMN:
            raise DataError(
                f'{path}: expected a tab-separated header "{ID_COLUMN}", tag columns, '
                f'"{PATH_COLUMN}"; got {header[:2]}...{header[-1:]}'
            )
        rows = []
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{line_number}: {len(row)} fields where the header has {len(header)}"
                )
            rows.append(row)
    return header, rows


def _read_split_file(path: Path) -> dict[str, str]:
    """``key<TAB or comma>split`` per line; key is a clip_id or an mp3_path."""
    if not path.is_file():
        raise DataError(f"{path}: no such split file")
    split_of: dict[str, str] = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split(",")
        if len(parts) < 2:
            raise DataError(f"{path}:{line_number}: expected `clip_id<TAB>split`, got {line!r}")
        key, split = parts[0].strip(), parts[1]
        if key in ("clip_id", "mp3_path", "path") and split.strip() == "split":
            continue  # a header line
        split_of[key] = check_split(split, f"{path}:{line_number}")
    return split_of
