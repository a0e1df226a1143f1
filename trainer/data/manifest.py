"""A station's own library as a CSV manifest.

::

    path,tags,split
    jingles/morning.wav,jingle;upbeat,train
    music/0001.mp3,rock;guitar;male vocal,valid

``path`` is relative to the manifest's folder (or absolute), ``tags`` joins tag names with
``;``, ``split`` (optional) is train, valid or test. An optional ``id`` column names the
clip; otherwise the path does. Without a split column, a hash of the path decides (80 %
train, 10 % valid, 10 % test), the same on every run.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

from trainer.data.dataset import (
    Clip,
    DataError,
    LabelledSet,
    check_split,
    hashed_split,
    top_tags,
)

log = logging.getLogger(__name__)

TAG_SEPARATOR = ";"


def load_manifest(path: str | Path, n_tags: int | None = None) -> LabelledSet:
    """Read a manifest; keep the ``n_tags`` most frequent tags (all when None)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = columns
        missing = {"path", "tags"} - set(columns)
        if missing:
            raise DataError(
                f"{path}: a manifest needs a header with path and tags columns "
                f"(optional: split, id); missing {', '.join(sorted(missing))}"
            )
        entries = []
        for line_number, row in enumerate(reader, start=2):
            audio = (row.get("path") or "").strip()
            if not audio:
                raise DataError(f"{path}:{line_number}: empty path")
            names = [tag.strip() for tag in (row.get("tags") or "").split(TAG_SEPARATOR)]
            names = list(dict.fromkeys(tag for tag in names if tag))
            clip_id = (row.get("id") or "").strip() or audio
            raw_split = (row.get("split") or "").strip()
            where = f"{path}:{line_number}"
            split = check_split(raw_split, where) if raw_split else hashed_split(clip_id)
            entries.append((clip_id, audio, names, split))

    if not entries:
        raise DataError(f"{path}: the manifest lists no clips")
    duplicates = [key for key, n in Counter(e[0] for e in entries).items() if n > 1]
    if duplicates:
        raise DataError(f"{path}: clip ids appear more than once, e.g. {duplicates[0]!r}")

    tags = top_tags(Counter(tag for entry in entries for tag in entry[2]), n_tags)
    if not tags:
        raise DataError(f"{path}: no clip has any tag")
    index_of = {tag: i for i, tag in enumerate(tags)}
    clips, no_tags = [], 0
    for clip_id, audio, names, split in entries:
        present = tuple(sorted(index_of[tag] for tag in names if tag in index_of))
        if not present:
            no_tags += 1
            continue
        clips.append(Clip(clip_id, path.parent / audio, present, split))
    result = LabelledSet(
        f"manifest {path}", tags, clips, {"clips without any kept tag (dropped)": no_tags}
    )
    log.info("%s", result.summary())
    return result


def write_manifest(path: str | Path, rows: list[tuple[str, list[str], str | None]]) -> None:
    """Write ``(audio path, tags, split or None)`` rows as a manifest."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "tags", "split"])
        for audio, tags, split in rows:
            writer.writerow([audio, TAG_SEPARATOR.join(tags), split or ""])
