"""A station's own library as a CSV manifest.

::

    path,tags,split
    jingles/morning.wav,jingle;upbeat,train
    music/0001.mp3,rock;guitar;male vocal,valid

``path`` is relative to the manifest's folder (or absolute), ``tags`` joins tag names with
``;``, ``split`` (optional) is train, valid or test. An optional ``id`` column names the
clip; otherwise the path does. Without a split column, a hash of the path decides (80 %
train, 10 % valid, 10 % test), the same on every run.

Partial labels: an optional ``known`` column lists (``;``-joined) the tags a row speaks
for. A tag in ``known`` but not in ``tags`` is absent; a tag in neither is unknown for
that clip, and training and evaluation leave it out. An empty ``known`` (or no column)
means the row knows every tag, as a fully labelled set does::

    path,tags,split,known
    calls/prompt-0001.wav,speech,train,speech;instrumental
    scores/track-07.wav,instrumental,train,speech;instrumental

Other columns (a package, a version, a source) are kept out of training and may say
where a clip came from.
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
            known = [tag.strip() for tag in (row.get("known") or "").split(TAG_SEPARATOR)]
            known = {tag for tag in known if tag} | set(names) if any(known) else None
            clip_id = (row.get("id") or "").strip() or audio
            raw_split = (row.get("split") or "").strip()
            where = f"{path}:{line_number}"
            split = check_split(raw_split, where) if raw_split else hashed_split(clip_id)
            entries.append((clip_id, audio, names, split, known))

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
    for clip_id, audio, names, split, known in entries:
        present = tuple(sorted(index_of[tag] for tag in names if tag in index_of))
        unknown = (
            () if known is None else tuple(i for i, tag in enumerate(tags) if tag not in known)
        )
        if not present and known is None:
            no_tags += 1  # a fully labelled clip with none of the kept tags says nothing
            continue
        clips.append(Clip(clip_id, path.parent / audio, present, split, unknown))
    partial = sum(1 for clip in clips if clip.unknown)
    notes = {"clips without any kept tag (dropped)": no_tags}
    if partial:
        notes["clips with partial labels"] = partial
    result = LabelledSet(f"manifest {path}", tags, clips, notes)
    log.info("%s", result.summary())
    return result


def write_manifest(
    path: str | Path,
    rows: list[tuple[str, list[str], str | None]],
    *,
    known: list[list[str] | None] | None = None,
    extra: dict[str, list[str]] | None = None,
) -> None:
    """Write ``(audio path, tags, split or None)`` rows as a manifest.

    ``known``: per row, the tags it speaks for (None: all); ``extra``: more columns, a
    list of values each (where a clip came from).
    """
    path = Path(path)
    extra = extra or {}
    columns = ["path", "tags", "split"] + (["known"] if known is not None else []) + list(extra)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for n, (audio, tags, split) in enumerate(rows):
            row = [audio, TAG_SEPARATOR.join(tags), split or ""]
            if known is not None:
                row.append(TAG_SEPARATOR.join(known[n]) if known[n] is not None else "")
            writer.writerow(row + [values[n] for values in extra.values()])
