"""The as-run log: every tag segment that ended, kept on disk by `tagd serve`.

With ``[asrun] path`` set, `tagd serve` keeps one SQLite database (WAL mode) of records:
a stream, a tag, when it was on (unix seconds, UTC), its mean and peak score, and why it
ended (``off``: hysteresis turned it off; ``idle``: the stream went silent; ``stop``:
the daemon stopped with it on). `tagd log` reads it back (``read_records``), also while
the daemon writes.

What it guarantees:

- The inference worker never waits on it: ``AsRunLog.put`` hands records to a bounded
  queue and returns; a full queue drops them and counts
  ``tagd_asrun_segments_dropped_total{reason="queue_full"}``.
- One writer thread commits each batch as soon as it arrives, so a record is in the
  database (its write-ahead log) within milliseconds of its segment ending: a daemon
  killed with SIGKILL loses the segments still open and those queued at that instant,
  nothing committed. ``synchronous=NORMAL``: a power cut may also lose the last commits,
  never the file.
- A write that fails (disk full, the file locked by another process past the busy
  timeout, a path that cannot be written, a file that is no database) is counted in
  ``tagd_asrun_write_errors_total{reason}`` and logged once per episode with the path; the
  records are held (up to ``MAX_HELD``, older ones dropped and counted beyond that) and
  retried with backoff, and the daemon goes on. The recovery is logged with the count.
- Retention: records that ended more than ``retention_days`` ago are deleted when the
  log opens and every ``RETENTION_EVERY_S`` by the writer thread, in chunks.
- Restarts append to the same file; the schema carries its version (``user_version``),
  and a file written by a newer tagd, or another application's database, is refused
  rather than changed. ``check_path`` says so before the daemon starts (and for
  ``--check-config``), as it does for a folder that cannot be made or written.

Stream time becomes wall-clock time through ``StreamClock``: a window's capture time
(``ReadyWindow.captured``, the arrival of the message carrying its last sample,
tagd/arrivals.py) against its position in the stream.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import pwd
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

from tagd.metrics import (
    ASRUN_DROP_QUEUE_FULL,
    ASRUN_DROP_WRITE_FAILED,
    ASRUN_ERROR_DISK_FULL,
    ASRUN_ERROR_LOCKED,
    ASRUN_ERROR_NOT_A_DATABASE,
    ASRUN_ERROR_OTHER,
    ASRUN_ERROR_UNWRITABLE,
    Metrics,
)
from tagd.timeline import FORMATS, SCORE_DECIMALS, Segment, write_timeline

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
QUEUE_SIZE = 10_000  # records waiting for the writer thread
MAX_HELD = 100_000  # records held through a failing episode (about 10 MB)
BUSY_TIMEOUT_S = 2.0  # how long a write waits for another process's lock
RETRY_S = (0.5, 30.0)  # backoff between attempts while writes fail: first, longest
RETENTION_EVERY_S = 3600.0
DELETE_CHUNK = 10_000  # rows per retention delete: short transactions, readers go on
WRITER_TICK_S = 0.5  # the writer wakes at least this often to retry, expire, stop
SECONDS_PER_DAY = 86_400.0
EFFECTIVE_IDS = os.access in os.supports_effective_ids  # the daemon's own user decides

# Why a record ended (the ``ended`` column).
ENDED_OFF = "off"  # hysteresis turned the tag off
ENDED_IDLE = "idle"  # the stream went without audio for limits.idle_after_s
ENDED_STOP = "stop"  # the daemon stopped while the tag was on

SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    stream TEXT NOT NULL,
    tag TEXT NOT NULL,
    start REAL NOT NULL,  -- unix seconds, UTC
    "end" REAL NOT NULL,
    mean REAL NOT NULL,
    peak REAL NOT NULL,
    predictions INTEGER NOT NULL,  -- how many the mean is over
    ended TEXT NOT NULL  -- off, idle or stop
);
CREATE INDEX IF NOT EXISTS segments_stream_start ON segments (stream, start);
CREATE INDEX IF NOT EXISTS segments_end ON segments ("end");
"""
COLUMNS = 'stream, tag, start, "end", mean, peak, predictions, ended'
INSERT = f"INSERT INTO segments ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)"


@dataclass(frozen=True)
class Record:
    """A tag segment on the wall clock: what the as-run log keeps."""

    stream: str
    tag: str
    start: float  # unix seconds, UTC
    end: float
    mean: float
    peak: float
    predictions: int  # how many the mean is over
    ended: str  # ENDED_OFF, ENDED_IDLE or ENDED_STOP

    @classmethod
    def placed(cls, segment: Segment, clock: StreamClock, ended: str) -> Record:
        """``segment`` (stream seconds) on the wall clock."""
        return cls(
            segment.stream,
            segment.tag,
            clock.unix(segment.stream, segment.start),
            clock.unix(segment.stream, segment.end),
            segment.mean,
            segment.peak,
            segment.predictions,
            ended,
        )


class AsRunError(RuntimeError):
    """The as-run log cannot be read; the message says which file and why."""


# -- the wall clock of a stream ----------------------------------------------------------

MAX_ANCHORS = 64  # epochs remembered per stream: an open segment spans at most a few


class StreamClock:
    """Stream seconds to unix time, per stream.

    Within an epoch the audio is continuous, so one offset places it: the capture time
    of a window's last sample minus its stream position. A new epoch (a restart after a
    silence or a long gap) gets a new anchor at the start of its first window. Fed by the
    inference worker, read by whoever closes segments: ``note`` and ``unix`` are cheap and
    take no lock beyond the GIL's atomic deque append.
    """

    def __init__(self) -> None:
        # per stream: (epoch, anchors as (stream seconds, unix - stream seconds))
        self._streams: dict[str, tuple[int, deque[tuple[float, float]]]] = {}

    def note(
        self, stream: str, epoch: int, start_s: float, end_s: float, captured_unix: float
    ) -> None:
        """A window of ``stream`` covering ``start_s..end_s`` whose last sample arrived at
        ``captured_unix``."""
        known = self._streams.get(stream)
        if known is not None and known[0] == epoch:
            return
        anchors = known[1] if known is not None else deque(maxlen=MAX_ANCHORS)
        anchors.append((start_s, captured_unix - end_s))
        self._streams[stream] = (epoch, anchors)

    def unix(self, stream: str, stream_s: float) -> float:
        """When ``stream_s`` of ``stream`` was on air; the stream must have been noted."""
        anchors = self._streams[stream][1]
        for anchor_s, offset in reversed(anchors):
            if anchor_s <= stream_s:
                return stream_s + offset
        return stream_s + anchors[0][1]

    def knows(self, stream: str) -> bool:
        return stream in self._streams

    def forget(self, stream: str) -> None:
        self._streams.pop(stream, None)


# -- the writer --------------------------------------------------------------------------

_STOP = object()


def error_reason(exc: Exception) -> str:
    """The ``reason`` label of a failed open or write."""
    if isinstance(exc, OSError):
        return ASRUN_ERROR_UNWRITABLE  # the folder cannot be made
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith("SQLITE_FULL"):
        return ASRUN_ERROR_DISK_FULL
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return ASRUN_ERROR_LOCKED
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return ASRUN_ERROR_UNWRITABLE
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or isinstance(exc, AsRunError):
        return ASRUN_ERROR_NOT_A_DATABASE
    return ASRUN_ERROR_OTHER


def check_schema(connection: sqlite3.Connection, path: Path) -> int:
    """The as-run schema version of the open database at ``path`` (0: an empty database,
    which becomes one). Raises AsRunError for a file written by a newer tagd and for an
    SQLite database that is something else: neither is changed."""
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise AsRunError(
            f"{path} has as-run schema version {version}; this tagd writes version "
            f"{SCHEMA_VERSION}: upgrade tagd or give [asrun] path another file"
        )
    tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
    if (version == 0 and tables) or (version > 0 and "segments" not in tables):
        held = ", ".join(sorted(tables)) or "no tables"
        raise AsRunError(
            f"{path} is an SQLite database but not a tagd as-run log (user_version "
            f"{version}, {held}): give [asrun] path another file"
        )
    return version


def check_path(path: str | Path) -> None:
    """Raise AsRunError unless the as-run log can live at ``path``: its folder exists and
    is writable (SQLite puts the write-ahead log beside the file), or the nearest folder
    above it that exists is, so that it can be made; a file already there is an as-run
    log of a version this tagd writes (or empty). Writable by this process's user: run it
    as the daemon's. Writes nothing: `tagd serve` calls it before it starts anything, and
    so does ``--check-config``."""
    path = Path(path)
    try:
        _check_path(path)
    except PermissionError as exc:  # a folder above it that this user may not look into
        raise AsRunError(f"cannot reach {exc.filename} {_as_whom()}") from None


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise AsRunError(f"{path} is a folder: give a file in it, such as {path / 'asrun.db'}")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AsRunError(f"cannot make the folder {path.parent}: {existing} is a file")
    made = "write in" if existing == path.parent else f"make {path.parent} in"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise AsRunError(f"cannot {made} {existing}: a read-only mount")
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=EFFECTIVE_IDS):
        raise AsRunError(f"cannot {made} {existing} {_as_whom()}")
    if not path.exists():
        return
    if not os.access(path, os.R_OK | os.W_OK, effective_ids=EFFECTIVE_IDS):
        raise AsRunError(f"cannot write {path} {_as_whom()}")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)) as db:
            check_schema(db, path)
    except sqlite3.DatabaseError as exc:
        raise AsRunError(
            f"{path} is not an SQLite database ({exc}): give [asrun] path another file"
        ) from None


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a user systemd made for the service, or a container's bare uid
        return f"uid {os.geteuid()}"


def _as_whom() -> str:
    """Whose permission was missing and what to do, for a message."""
    return (
        f"as {_user()}: permission denied (--check-config: run it as the user tagd serve "
        f"runs as; as root for deploy/systemd's unit)"
    )


def open_database(path: Path) -> sqlite3.Connection:
    """Open (or create) the as-run database for writing: WAL mode, the schema in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    try:
        check_schema(connection, path)
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            log.warning("as-run log %s: WAL mode refused (%s); readers may wait", path, mode)
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(SCHEMA)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        connection.close()
        raise
    return connection


class AsRunLog:
    """The daemon's side: ``start()``, ``put(records)`` from any thread, ``close()``."""

    def __init__(
        self,
        path: str | Path,
        metrics: Metrics,
        *,
        retention_days: float = 0.0,
        queue_size: int = QUEUE_SIZE,
        max_held: int = MAX_HELD,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.retention_days = retention_days
        self.max_held = max_held
        self._clock = clock
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._connection: sqlite3.Connection | None = None
        self._held: deque[Record] = deque()
        self._failing: str | None = None  # the reason of the episode under way
        self._episode_errors = 0
        self._next_try = 0.0  # monotonic
        self._backoff = RETRY_S[0]
        self._next_expiry = 0.0  # monotonic
        self._stop_requested = False

    # -- any thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tagd-asrun", daemon=True)
        self._thread.start()

    def put(self, records: Sequence[Record]) -> None:
        """Queue records for the writer; never waits. A full queue drops and counts."""
        if not records:
            return
        try:
            self._queue.put_nowait(records)
        except queue.Full:
            self.metrics.asrun_dropped.labels(ASRUN_DROP_QUEUE_FULL).inc(len(records))

    def close(self, timeout: float = 1.0) -> bool:
        """Write what is queued and stop the writer; True when it finished in time."""
        if self._thread is None:
            return True
        self._stop_requested = True  # seen within WRITER_TICK_S if the queue is full
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)  # wakes the writer at once
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("as-run log %s: still writing at exit; what is queued is lost", self.path)
            return False
        return True

    # -- the writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._database()  # a path that cannot be written is said at start, not later
        except (sqlite3.Error, OSError, AsRunError) as exc:
            self._failed(exc)
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=WRITER_TICK_S)
            except queue.Empty:
                item = None
            while item is not None:
                if item is _STOP:
                    stopping = True
                else:
                    self._hold(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            stopping = stopping or self._stop_requested
            now = time.monotonic()
            if self._held and (now >= self._next_try or stopping):
                self._write()
            if self._failing is None and now >= self._next_expiry:
                self._expire()
            self.metrics.asrun_pending.set(len(self._held) + self._queue.qsize())
        if self._held:
            log.error(
                "as-run log %s: %d segments could not be written before exit",
                self.path,
                len(self._held),
            )
            self.metrics.asrun_dropped.labels(ASRUN_DROP_WRITE_FAILED).inc(len(self._held))
            self._held.clear()
        if self._connection is not None:
            self._connection.close()  # the last connection checkpoints the WAL into the file

    def _hold(self, records: Iterable[Record]) -> None:
        self._held.extend(records)
        excess = len(self._held) - self.max_held
        if excess > 0:
            for _ in range(excess):
                self._held.popleft()
            self.metrics.asrun_dropped.labels(ASRUN_DROP_WRITE_FAILED).inc(excess)

    def _database(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = open_database(self.path)
        return self._connection

    def _write(self) -> None:
        records = list(self._held)
        try:
            connection = self._database()
            with connection:
                connection.executemany(INSERT, [astuple(record) for record in records])
        except (sqlite3.Error, OSError, AsRunError) as exc:
            self._failed(exc)
            return
        self._held.clear()
        self.metrics.asrun_written.inc(len(records))
        if self._failing is not None:
            log.info(
                "as-run log %s: writing again after %d failed attempts (%s); %d segments "
                "held meanwhile are written",
                self.path,
                self._episode_errors,
                self._failing,
                len(records),
            )
        self._failing, self._episode_errors, self._backoff = None, 0, RETRY_S[0]

    def _failed(self, exc: Exception) -> None:
        reason = error_reason(exc)
        self.metrics.asrun_errors.labels(reason).inc()
        self._episode_errors += 1
        if self._failing is None:
            log.error(
                "as-run log %s: cannot write (%s: %s); segments are held (up to %d) and "
                "retried, tagging goes on",
                self.path,
                reason,
                exc,
                self.max_held,
            )
        self._failing = reason
        if self._connection is not None:
            self._connection.close()  # opened afresh next time: the file may be replaced
            self._connection = None
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, RETRY_S[1])

    def _expire(self) -> None:
        self._next_expiry = time.monotonic() + RETENTION_EVERY_S
        if self.retention_days <= 0:
            return
        cutoff = self._clock() - self.retention_days * SECONDS_PER_DAY
        removed = 0
        try:
            connection = self._database()
            while True:
                with connection:
                    deleted = connection.execute(
                        "DELETE FROM segments WHERE rowid IN (SELECT rowid FROM segments "
                        'WHERE "end" < ? LIMIT ?)',
                        (cutoff, DELETE_CHUNK),
                    ).rowcount
                removed += deleted
                if deleted < DELETE_CHUNK:
                    break
        except (sqlite3.Error, OSError, AsRunError) as exc:
            self._failed(exc)
            self._next_expiry = time.monotonic()  # again once writes work
            return
        if removed:
            log.info(
                "as-run log %s: %d segments older than %g days deleted",
                self.path,
                removed,
                self.retention_days,
            )


# -- reading -----------------------------------------------------------------------------


def _read_only(path: Path) -> sqlite3.Connection:
    try:
        found = path.is_file()
    except PermissionError:
        raise AsRunError(
            f"cannot read the as-run log {path} as {_user()}: no permission (the systemd "
            f"unit's state directory is root's: run tagd log as root)"
        ) from None
    if not found:
        raise AsRunError(f"no as-run log at {path}")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
        version = connection.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise AsRunError(f"cannot read the as-run log {path}: {exc}") from None
    if version != SCHEMA_VERSION:
        connection.close()
        raise AsRunError(
            f"{path} is not an as-run log this tagd reads (schema version {version}, "
            f"expected {SCHEMA_VERSION})"
        )
    return connection


def read_records(
    path: str | Path, stream: str, start: float | None = None, end: float | None = None
) -> list[Record]:
    """The records of ``stream`` that overlap ``start..end`` (unix seconds; None: open),
    cut at those bounds, in order of start. Read-only: works while the daemon writes."""
    path = Path(path)
    connection = _read_only(path)
    low = -float("inf") if start is None else start
    high = float("inf") if end is None else end
    try:
        rows = connection.execute(
            f'SELECT {COLUMNS} FROM segments WHERE stream = ? AND start < ? AND "end" > ? '
            "ORDER BY start, tag",
            (stream, high, low),
        ).fetchall()
        if not rows:
            streams = [r[0] for r in connection.execute("SELECT DISTINCT stream FROM segments")]
        else:
            streams = []
    except sqlite3.Error as exc:
        raise AsRunError(f"cannot read the as-run log {path}: {exc}") from None
    finally:
        connection.close()
    if not rows and stream not in streams:
        known = ", ".join(sorted(streams)) or "none yet"
        raise AsRunError(f"{path} has no segments of stream {stream!r}; streams: {known}")
    return [
        Record(s, tag, max(b, low), min(e, high), mean, peak, n, ended)
        for s, tag, b, e, mean, peak, n, ended in rows
    ]


# -- printing ----------------------------------------------------------------------------

LOG_FORMATS = tuple(FORMATS)  # csv, jsonl: wall-clock times; the others: from an origin
WALL_CLOCK_FORMATS = ("csv", "jsonl")
CSV_HEADER = ("stream", "start", "end", "tag", "mean", "peak", "predictions", "ended")


def iso_utc(unix: float) -> str:
    """ISO 8601 in UTC to the millisecond: ``2026-12-06T14:00:00.000Z``."""
    moment = datetime.fromtimestamp(unix, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_log(records: Iterable[Record], out: TextIO, fmt: str, origin: float) -> int:
    """Write ``records`` in ``fmt``; return how many. csv and jsonl carry ISO 8601 UTC
    times and why each ended; audacity, vtt and srt (tagd.timeline's writers) carry
    seconds from ``origin`` (unix), as a recording that starts there would."""
    if fmt not in WALL_CLOCK_FORMATS:
        segments = (
            Segment(
                r.stream,
                r.tag,
                r.start - origin,
                r.end - origin,
                r.mean,
                r.peak,
                r.predictions,
                open=r.ended != ENDED_OFF,
            )
            for r in records
        )
        return write_timeline(segments, out, fmt)
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_HEADER)
    for r in records:
        count += 1
        start, end = iso_utc(r.start), iso_utc(r.end)
        mean, peak = round(r.mean, SCORE_DECIMALS), round(r.peak, SCORE_DECIMALS)
        if fmt == "csv":
            writer.writerow((r.stream, start, end, r.tag, mean, peak, r.predictions, r.ended))
            continue
        line = {
            "stream": r.stream,
            "tag": r.tag,
            "start": start,
            "end": end,
            "duration_s": round(r.end - r.start, 3),
            "mean": mean,
            "peak": peak,
            "predictions": r.predictions,
            "ended": r.ended,
        }
        out.write(json.dumps(line) + "\n")
    return count
