"""Decode a labelled set once, at the model's rate, into int16 shards with a JSON index.

Layout of a prepared folder::

    index.json            tags, sample rate, every clip: id, split, tag indices, shard, offset, length
                          (and the tags it leaves unknown, if any)
    skipped.csv           clip_id, path, reason for each file that could not be used
    shards/shard-00000.npy    int16 samples of up to ``clips_per_shard`` clips, back to back
    shards/shard-00000.json   what that shard holds (and skipped), written after the .npy

Shards are decoded in a process pool. A shard whose ``.json`` exists and lists the same
clips at the same rate is kept as it is, so an interrupted run picks up where it stopped.
Files that are corrupt, empty, silent or shorter than ``min_seconds`` are skipped and
reported, never fatal: MagnaTagATune has a few empty mp3s.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tagd.audio import AudioError, decode_file
from trainer.data.dataset import (
    INDEX_NAME,
    PREPARED_FORMAT,
    PREPARED_VERSION,
    DataError,
    LabelledSet,
    to_int16,
)

log = logging.getLogger(__name__)

SHARD_FOLDER = "shards"
SKIPPED_NAME = "skipped.csv"
DEFAULT_CLIPS_PER_SHARD = 64  # 64 MTT clips at 22,050 Hz are ~80 MB of int16: fits any worker
DEFAULT_MIN_SECONDS = 1.0


@dataclass
class PrepareReport:
    out_dir: Path
    sample_rate: int
    clips: int  # clips in the index
    skipped: list[dict] = field(default_factory=list)  # {"id", "path", "reason"}
    shards_written: int = 0
    shards_reused: int = 0  # found complete from an earlier run
    audio_hours: float = 0.0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"prepared {self.clips} clips ({self.audio_hours:.2f} h at {self.sample_rate} Hz) "
            f"in {self.out_dir}; skipped {len(self.skipped)}; shards written "
            f"{self.shards_written}, reused {self.shards_reused}; {self.seconds:.1f} s"
        )


def prepare(
    labelled: LabelledSet,
    out_dir: str | Path,
    sample_rate: int,
    *,
    workers: int | None = None,
    clips_per_shard: int = DEFAULT_CLIPS_PER_SHARD,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    progress: bool = True,
) -> PrepareReport:
    from tqdm import tqdm

    started = time.monotonic()
    out_dir = Path(out_dir)
    (out_dir / SHARD_FOLDER).mkdir(parents=True, exist_ok=True)
    min_samples = max(1, int(round(min_seconds * sample_rate)))

    jobs = []
    for number, first in enumerate(range(0, len(labelled.clips), clips_per_shard)):
        members = labelled.clips[first : first + clips_per_shard]
        jobs.append((f"shard-{number:05d}", [(c.clip_id, str(c.path)) for c in members]))

    todo = [job for job in jobs if not _shard_done(out_dir, job[0], job[1], sample_rate)]
    reused = len(jobs) - len(todo)
    if reused:
        log.info("%d of %d shards already prepared in %s; resuming", reused, len(jobs), out_dir)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))

    bar = tqdm(
        total=sum(len(job[1]) for job in jobs),
        initial=sum(len(job[1]) for job in jobs) - sum(len(job[1]) for job in todo),
        unit="clip",
        desc="prepare",
        disable=not progress,
    )
    args = [(str(out_dir), name, members, sample_rate, min_samples) for name, members in todo]
    if workers == 1:
        for arg in args:
            _prepare_shard(*arg)
            bar.update(len(arg[2]))
    else:
        # spawn, not fork: the parent may hold torch's thread pools, which fork copies badly.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(_prepare_shard, *arg): len(arg[2]) for arg in args}
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update(futures[future])
    bar.close()

    report = _write_index(labelled, out_dir, sample_rate, [name for name, _ in jobs])
    if labelled.clips and not report.clips:
        raise DataError(_nothing_prepared(labelled, report.skipped))
    report.shards_written = len(todo)
    report.shards_reused = reused
    report.seconds = time.monotonic() - started
    log.info("%s", report.summary())
    return report


def _nothing_prepared(labelled: LabelledSet, skipped: list[dict]) -> str:
    """Why a prepare that kept no clip is an error, and where it looked."""
    reasons = Counter(item["reason"].split(":")[0] for item in skipped)
    folders = sorted({str(Path(clip.path).parent.parent) for clip in labelled.clips})
    where = folders[0] if len(folders) == 1 else f"{folders[0]} and {len(folders) - 1} more"
    return (
        f"prepared no clips: all {len(labelled.clips)} were skipped ("
        + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        + f"); the first was looked for at {labelled.clips[0].path}, under {where}. "
        "If the audio lives elsewhere, give its folder with --audio-dir (MagnaTagATune) "
        "or fix the paths in the list; skipped.csv in the output folder has every reason"
    )


def _shard_done(out_dir: Path, name: str, members: list, sample_rate: int) -> bool:
    meta_path = out_dir / SHARD_FOLDER / f"{name}.json"
    if not meta_path.is_file() or not (out_dir / SHARD_FOLDER / f"{name}.npy").is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    # The same clips from the same files: a new --audio-dir prepares the shard again.
    return (
        meta.get("sample_rate") == sample_rate
        and meta.get("ids") == [m[0] for m in members]
        and meta.get("paths", [m[1] for m in members]) == [m[1] for m in members]
    )


def _prepare_shard(
    out_dir: str, name: str, members: list[tuple[str, str]], sample_rate: int, min_samples: int
) -> None:
    """Decode one shard's clips and write it; runs in a worker process."""
    shard_dir = Path(out_dir) / SHARD_FOLDER
    pieces, entries, skipped = [], [], []
    offset = 0
    for clip_id, path in members:
        reason, samples = _decode(path, sample_rate, min_samples)
        if reason:
            skipped.append({"id": clip_id, "path": path, "reason": reason})
            continue
        pieces.append(samples)
        entries.append({"id": clip_id, "offset": offset, "length": len(samples)})
        offset += len(samples)
    data = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
    # Write under temporary names and rename: a shard is either complete or absent.
    tmp_npy = shard_dir / f"{name}.tmp.npy"
    np.save(tmp_npy, data, allow_pickle=False)
    os.replace(tmp_npy, shard_dir / f"{name}.npy")
    meta = {
        "sample_rate": sample_rate,
        "ids": [clip_id for clip_id, _ in members],
        "paths": [path for _, path in members],
        "clips": entries,
        "skipped": skipped,
    }
    tmp_json = shard_dir / f"{name}.tmp.json"
    tmp_json.write_text(json.dumps(meta))
    os.replace(tmp_json, shard_dir / f"{name}.json")


def _decode(path: str, sample_rate: int, min_samples: int) -> tuple[str, np.ndarray | None]:
    """("", int16 samples) or (why the clip is unusable, None)."""
    try:
        samples = decode_file(path, sample_rate)
    except (AudioError, OSError, ValueError, RuntimeError) as exc:
        message = str(exc).removeprefix(f"{path}: ")  # the report has a path column
        return f"unreadable: {message}", None
    if not np.all(np.isfinite(samples)):
        return "unreadable: decoded samples are not finite", None
    if len(samples) < min_samples:
        return f"too short: {len(samples) / sample_rate:.2f} s", None
    samples = to_int16(samples)
    if not samples.any():
        return "silent: every sample is zero", None
    return "", samples


def _write_index(
    labelled: LabelledSet, out_dir: Path, sample_rate: int, shard_names: list[str]
) -> PrepareReport:
    by_id = {clip.clip_id: clip for clip in labelled.clips}
    clips, skipped = [], []
    total_samples = 0
    for name in shard_names:
        meta = json.loads((out_dir / SHARD_FOLDER / f"{name}.json").read_text())
        skipped.extend(meta["skipped"])
        for entry in meta["clips"]:
            clip = by_id[entry["id"]]
            clips.append(
                {
                    "id": clip.clip_id,
                    "split": clip.split,
                    "tags": list(clip.tags),
                    "shard": f"{name}.npy",
                    "offset": entry["offset"],
                    "length": entry["length"],
                    **({"unknown": list(clip.unknown)} if clip.unknown else {}),
                }
            )
            total_samples += entry["length"]
    index = {
        "format": PREPARED_FORMAT,
        "version": PREPARED_VERSION,
        "source": labelled.source,
        "sample_rate": sample_rate,
        "tags": labelled.tags,
        "notes": labelled.notes,
        "clips": clips,
        "skipped": skipped,
    }
    tmp = out_dir / f"{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out_dir / INDEX_NAME)
    with (out_dir / SKIPPED_NAME).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clip_id", "path", "reason"])
        writer.writerows([item["id"], item["path"], item["reason"]] for item in skipped)
    for item in skipped:
        log.warning("skipped %s (%s): %s", item["id"], item["path"], item["reason"])
    return PrepareReport(
        out_dir=out_dir,
        sample_rate=sample_rate,
        clips=len(clips),
        skipped=skipped,
        audio_hours=total_samples / sample_rate / 3600,
    )
