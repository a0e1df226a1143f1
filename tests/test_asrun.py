"""The as-run log: tagd/asrun.py's store, `tagd log`, and `tagd serve` writing it for
real (a SIGKILL loses only the segments still open)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import pwd
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
import zmq
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from support import (
    EXAMPLES,
    TAGD,
    Example,
    TagdProcess,
    fcn4_card,
    free_port,
    tool,
    wait_for,
    wait_subscribed,
)

from tagd.asrun import (
    ENDED_IDLE,
    ENDED_OFF,
    ENDED_STOP,
    SCHEMA_VERSION,
    AsRunError,
    AsRunLog,
    Record,
    StreamClock,
    check_path,
    read_records,
)
from tagd.card import CARD_METADATA_KEY, IncrementalSection, ModelCard
from tagd.cli import main
from tagd.metrics import PUBLISH_SOCKET, Metrics
from tagd.publish import TAGS_TOPIC, Publisher, tags_message, topic
from tagd.sockets import CurveServer, generate_keys
from tagd.tagger import Prediction

DAY = 86_400.0
NOON = 1_765_022_400.0  # 2025-12-06T12:00:00Z


def record(stream: str, tag: str, start: float, end: float, ended: str = ENDED_OFF) -> Record:
    return Record(stream, tag, start, end, mean=0.8, peak=0.95, predictions=4, ended=ended)


def written(path: Path, records: list[Record], **options) -> Metrics:
    """Records through a started AsRunLog, closed: what the daemon does."""
    metrics = Metrics(CollectorRegistry())
    asrun = AsRunLog(path, metrics, **options)
    asrun.start()
    asrun.put(records)
    assert asrun.close(timeout=10)
    return metrics


def rows(path: Path) -> list[tuple]:
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute(
            'SELECT stream, tag, start, "end", ended FROM segments ORDER BY rowid'
        ).fetchall()


# -- the store ---------------------------------------------------------------------------------


def test_records_are_read_back_by_stream_and_time_cut_at_the_bounds(tmp_path):
    path = tmp_path / "state" / "asrun.db"  # the folder is created
    metrics = written(
        path,
        [
            record("radio1", "speech", NOON, NOON + 60),
            record("radio1", "music", NOON + 50, NOON + 300),
            record("radio2", "speech", NOON, NOON + 600),
            record("radio1", "speech", NOON + 400, NOON + 500),
        ],
    )
    assert metrics.sample("tagd_asrun_segments_written_total") == 4
    every = read_records(path, "radio1")
    assert [(r.tag, r.start, r.end) for r in every] == [
        ("speech", NOON, NOON + 60),
        ("music", NOON + 50, NOON + 300),
        ("speech", NOON + 400, NOON + 500),
    ]
    window = read_records(path, "radio1", NOON + 55, NOON + 450)
    assert [(r.tag, r.start, r.end) for r in window] == [
        ("speech", NOON + 55, NOON + 60),
        ("music", NOON + 55, NOON + 300),
        ("speech", NOON + 400, NOON + 450),
    ]
    assert read_records(path, "radio1", NOON + 600, NOON + 700) == []
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        plan = connection.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM segments WHERE stream = 'radio1' AND start < 5"
        ).fetchall()
    assert any("segments_stream_start" in step[-1] for step in plan), plan


def test_a_restart_appends_and_retention_deletes_what_ended_long_ago(tmp_path):
    path = tmp_path / "asrun.db"
    written(path, [record("radio1", "speech", NOON - 3 * DAY, NOON - 3 * DAY + 60)])
    written(path, [record("radio1", "music", NOON - DAY / 2, NOON - DAY / 2 + 60)])
    assert len(rows(path)) == 2  # appended, nothing deleted: retention is off by default
    # a daemon with a 2-day retention, started at NOON: the 3-day-old segment goes
    written(
        path, [record("radio1", "speech", NOON, NOON + 1)], retention_days=2, clock=lambda: NOON
    )
    assert [(r[1], r[2]) for r in rows(path)] == [
        ("music", NOON - DAY / 2),
        ("speech", NOON),
    ]


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path):
    metrics = Metrics(CollectorRegistry())
    asrun = AsRunLog(tmp_path / "asrun.db", metrics, queue_size=1)  # writer not started
    asrun.put([record("radio1", "speech", NOON, NOON + 1)])
    asrun.put([record("radio1", "music", NOON, NOON + 1), record("radio1", "x", NOON, NOON + 2)])
    dropped = {"reason": "queue_full"}
    assert metrics.sample("tagd_asrun_segments_dropped_total", dropped) == 2


def test_a_locked_file_is_counted_logged_once_and_written_when_released(tmp_path, caplog):
    path = tmp_path / "asrun.db"
    written(path, [])  # the file exists, with its schema
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holding the file: a backup, a tool
    metrics = Metrics(CollectorRegistry())
    asrun = AsRunLog(path, metrics)
    with caplog.at_level(logging.INFO, logger="tagd.asrun"):
        asrun.start()
        for minute in range(3):
            asrun.put([record("radio1", "speech", NOON + 60 * minute, NOON + 60 * minute + 30)])
        wait_for(lambda: metrics.sample("tagd_asrun_write_errors_total", {"reason": "locked"}))
        wait_for(lambda: metrics.sample("tagd_asrun_write_errors_total", {"reason": "locked"}) >= 2)
        assert metrics.sample("tagd_asrun_pending_segments") == 3
        holder.execute("ROLLBACK")
        holder.close()
        wait_for(lambda: metrics.sample("tagd_asrun_segments_written_total") == 3, timeout=40)
        assert asrun.close(timeout=10)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(path) in errors[0] and "locked" in errors[0], errors
    assert any("writing again" in r.getMessage() for r in caplog.records)
    assert len(rows(path)) == 3


def test_an_unwritable_path_is_counted_and_the_caller_goes_on(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be\n")
    metrics = Metrics(CollectorRegistry())
    asrun = AsRunLog(blocker / "asrun.db", metrics)
    with caplog.at_level(logging.ERROR, logger="tagd.asrun"):
        asrun.start()
        wait_for(lambda: metrics.sample("tagd_asrun_write_errors_total", {"reason": "unwritable"}))
        asrun.put([record("radio1", "speech", NOON, NOON + 1)])  # neither raises nor waits
        assert asrun.close(timeout=10)
    assert str(blocker / "asrun.db") in caplog.records[0].getMessage()
    lost = {"reason": "write_failed"}
    assert metrics.sample("tagd_asrun_segments_dropped_total", lost) == 1


def test_a_file_of_a_newer_schema_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "asrun.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    metrics = written(path, [record("radio1", "speech", NOON, NOON + 1)])
    assert metrics.sample("tagd_asrun_write_errors_total", {"reason": "not_a_database"}) >= 1
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_a_foreign_sqlite_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "music.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE playlist (title TEXT)")
    metrics = written(path, [record("radio1", "speech", NOON, NOON + 1)])
    assert metrics.sample("tagd_asrun_write_errors_total", {"reason": "not_a_database"}) >= 1
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT name FROM sqlite_master").fetchall() == [("playlist",)]


# -- the path checked before the daemon starts (tagd serve, --check-config) -------------------


def test_check_path_takes_a_folder_to_make_an_empty_file_and_a_log_and_writes_nothing(
    tmp_path,
):
    check_path(tmp_path / "state" / "tagd" / "asrun.db")
    assert list(tmp_path.iterdir()) == []  # the folder is made by the daemon, not the check
    (tmp_path / "empty.db").touch()  # SQLite takes an empty file as an empty database
    check_path(tmp_path / "empty.db")
    written(tmp_path / "asrun.db", [record("radio1", "speech", NOON, NOON + 1)])
    check_path(tmp_path / "asrun.db")


def unusable_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Paths the as-run log cannot have, with what the refusal must say."""
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "notes.txt").write_text("a text file, long enough to have a header\n" * 10)
    with closing(sqlite3.connect(tmp_path / "music.db")) as connection:
        connection.execute("CREATE TABLE playlist (title TEXT)")
    with closing(sqlite3.connect(tmp_path / "newer.db")) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    return {
        "a folder": (tmp_path, "is a folder: give a file in it"),
        "under a file": (tmp_path / "a-file" / "asrun.db", "a-file is a file"),
        "not sqlite": (tmp_path / "notes.txt", "is not an SQLite database"),
        "foreign database": (
            tmp_path / "music.db",
            "not a tagd as-run log (user_version 0, playlist)",
        ),
        "newer schema": (tmp_path / "newer.db", f"schema version {SCHEMA_VERSION + 1}"),
    }


def test_check_path_refuses_what_cannot_be_the_log_and_says_why(tmp_path):
    unusable = unusable_paths(tmp_path)
    files = {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    for path, reason in unusable.values():
        with pytest.raises(AsRunError, match=re.escape(reason)):
            check_path(path)
    assert {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == files


@pytest.fixture
def read_only_mount(tmp_path) -> Iterator[Path]:
    """A read-only tmpfs: a folder no one may write, root included (needs mount rights)."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        yield mount


def test_check_path_refuses_a_read_only_folder(read_only_mount):
    with pytest.raises(AsRunError, match="cannot write in .*read-only"):
        check_path(read_only_mount / "asrun.db")
    with pytest.raises(AsRunError, match="cannot make .*/ro/state in .*read-only"):
        check_path(read_only_mount / "state" / "asrun.db")


NOBODY = 65534  # Debian's nobody, who owns nothing here


@pytest.fixture
def as_nobody() -> Callable[..., subprocess.CompletedProcess]:
    """Run a command as nobody (setpriv, as root): a user who may not enter root's folders."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to run a command as nobody")

    def run(*command: str) -> subprocess.CompletedProcess:
        as_nobody = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        return subprocess.run([*as_nobody, *command], capture_output=True, text=True, timeout=60)

    if run(str(TAGD), "--help").returncode != 0:
        pytest.skip(f"nobody cannot run {TAGD} (a checkout under a private home)")
    return run


def test_a_user_who_may_not_reach_the_log_is_told_so(as_nobody, short_fcn4):
    outer = Path(tempfile.mkdtemp())  # pytest's tmp_path is root's alone: nobody sees none
    try:
        outer.chmod(0o755)
        model = Path(shutil.copy(short_fcn4, outer / "model.onnx"))
        state = outer / "state"
        state.mkdir(mode=0o700)  # as the systemd unit's state directory: root's
        db = state / "asrun.db"
        written(db, [record("radio1", "speech", NOON, NOON + 1)])
        nobody = pwd.getpwuid(NOBODY).pw_name
        log = as_nobody(str(TAGD), "log", "radio1", "--db", str(db))
        assert log.returncode == 1, log.stderr
        assert f"cannot read the as-run log {db} as {nobody}: no permission" in log.stderr
        serve = [str(TAGD), "serve", "--engine", str(model), "--input", "zmq+pull://127.0.0.1:5571"]
        for path, refusal in (
            (db, f"cannot reach {db} as {nobody}: permission denied"),
            (outer / "new" / "asrun.db", f"cannot make {outer / 'new'} in {outer} as {nobody}"),
        ):
            check = as_nobody(*serve, "--asrun", str(path), "--check-config")
            assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr
            # the reason on the first line: nothing before it (ONNX Runtime's telemetry,
            # which tagd turns off, warns when nobody's HOME cannot keep its device id)
            first = check.stderr.splitlines()[0]
            assert first.startswith(f"tagd serve: as-run log: {refusal}"), check.stderr
            assert "run it as the user tagd serve runs as" in check.stderr
    finally:
        shutil.rmtree(outer)


def test_check_config_and_serve_refuse_an_unusable_log_before_anything_starts(short_fcn4, tmp_path):
    runner = CliRunner()
    serve = ["serve", "--engine", str(short_fcn4), "--input", "zmq+pull://127.0.0.1:5571"]
    good = runner.invoke(
        main, [*serve, "--asrun", str(tmp_path / "new" / "asrun.db"), "--check-config"]
    )
    assert good.exit_code == 0, good.output
    assert not (tmp_path / "new").exists()
    for path, reason in unusable_paths(tmp_path).values():
        bad = runner.invoke(main, [*serve, "--asrun", str(path), "--check-config"])
        assert bad.exit_code == 2 and "tagd serve: as-run log: " in bad.output, bad.output
        assert reason in bad.output
    # the daemon itself: exit 2 with the reason, before it loads the model
    foreign = tmp_path / "music.db"
    before = foreign.read_bytes()
    metrics_port = free_port()
    started = subprocess.run(
        [str(TAGD), *serve, "--asrun", str(foreign), "--metrics", f"127.0.0.1:{metrics_port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2, started.stderr
    assert (
        f"as-run log: {foreign} is an SQLite database but not a tagd as-run log" in started.stderr
    )
    assert foreign.read_bytes() == before


@contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``mount`` with ``options``; the test is skipped where mounting
    is not allowed."""
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 256 kB tmpfs: a disk that fills up for real (needs the right to mount)."""
    with tmpfs(tmp_path / "disk", "size=256k") as mount:
        yield mount


def test_a_full_disk_is_counted_and_what_fits_is_kept(small_disk):
    metrics = Metrics(CollectorRegistry())
    asrun = AsRunLog(small_disk / "asrun.db", metrics)
    asrun.start()
    for hour in range(200):  # about 2 MB of segments: far more than the disk holds
        asrun.put([record(f"radio{hour}", f"tag{i}", NOON, NOON + 1) for i in range(100)])
        time.sleep(0.005)
    wait_for(lambda: metrics.sample("tagd_asrun_write_errors_total", {"reason": "disk_full"}))
    asrun.close(timeout=10)
    kept = len(rows(small_disk / "asrun.db"))
    assert 0 < kept == metrics.sample("tagd_asrun_segments_written_total") < 20_000


def test_a_backup_while_the_log_is_written_has_what_was_committed(tmp_path):
    sqlite3_cli = tool("sqlite3", "apt-get install sqlite3")
    path, backup = tmp_path / "asrun.db", tmp_path / "backups" / "asrun.db"
    backup.parent.mkdir()
    metrics = Metrics(CollectorRegistry())
    asrun = AsRunLog(path, metrics)
    asrun.start()
    asrun.put([record("radio1", "speech", NOON + i, NOON + i + 1) for i in range(1000)])
    wait_for(lambda: metrics.sample("tagd_asrun_segments_written_total") == 1000)
    writing = threading.Event()

    def keep_writing() -> None:
        for i in itertools.count(1000):
            if writing.is_set():
                break
            asrun.put([record("radio1", "music", NOON + i, NOON + i + 1)])
            time.sleep(0.001)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:  # the guide's command (docs/deploy.md, "Backups"), while segments keep coming
        done = subprocess.run(
            [sqlite3_cli, str(path), f".backup {backup}"], capture_output=True, text=True
        )
    finally:
        writing.set()
        writer.join()
        asrun.close(timeout=10)
    assert done.returncode == 0, done.stderr
    copied = read_records(backup, "radio1")
    assert 1000 <= len(copied) <= metrics.sample("tagd_asrun_segments_written_total")
    assert copied[:1000] == read_records(path, "radio1")[:1000]


def test_stream_seconds_are_placed_by_the_capture_time_of_their_epoch():
    clock = StreamClock()
    clock.note("radio1", epoch=1, start_s=0.0, end_s=2.0, captured_unix=NOON + 2)
    clock.note("radio1", epoch=1, start_s=0.5, end_s=2.5, captured_unix=NOON + 9)  # jitter
    # the stream was silent for 100 s, then restarted: stream time 10 s is NOON + 110
    clock.note("radio1", epoch=2, start_s=10.0, end_s=12.0, captured_unix=NOON + 112)
    assert clock.unix("radio1", 1.0) == NOON + 1
    assert clock.unix("radio1", 9.0) == NOON + 9
    assert clock.unix("radio1", 11.0) == NOON + 111


# -- tagd log ----------------------------------------------------------------------------------


@pytest.fixture
def asrun_file(tmp_path) -> Path:
    path = tmp_path / "asrun.db"
    written(
        path,
        [
            record("radio1", "speech", NOON + 10, NOON + 70.5),
            record("radio1", "music", NOON + 60, NOON + 3600 + 0.25, ENDED_STOP),
            record("radio2", "speech", NOON, NOON + 5),
        ],
    )
    return path


def tagd_log(*args: str) -> str:
    result = CliRunner().invoke(main, ["log", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_tagd_log_prints_csv_and_json_lines_in_utc(asrun_file):
    printed = tagd_log("radio1", "--db", str(asrun_file))
    assert printed.splitlines() == [
        "stream,start,end,tag,mean,peak,predictions,ended",
        "radio1,2025-12-06T12:00:10.000Z,2025-12-06T12:01:10.500Z,speech,0.8,0.95,4,off",
        "radio1,2025-12-06T12:01:00.000Z,2025-12-06T13:00:00.250Z,music,0.8,0.95,4,stop",
    ]
    # a time with its zone is honoured; the segments are cut at the bounds
    lines = tagd_log(
        "radio1",
        "--db",
        str(asrun_file),
        "--from",
        "2025-12-06T13:01:05+01:00",
        "--to",
        "2025-12-06T12:02",
        "--format",
        "jsonl",
    ).splitlines()
    first, second = (json.loads(line) for line in lines)
    assert (first["tag"], first["start"], first["end"]) == (
        "speech",
        "2025-12-06T12:01:05.000Z",
        "2025-12-06T12:01:10.500Z",
    )
    assert first["duration_s"] == 5.5
    assert (second["start"], second["end"], second["ended"]) == (
        "2025-12-06T12:01:05.000Z",
        "2025-12-06T12:02:00.000Z",
        "stop",
    )


def test_tagd_log_prints_labels_and_subtitles_from_the_start_of_the_period(asrun_file):
    common = ["radio1", "--db", str(asrun_file), "--from", "2025-12-06T12:00:00Z"]
    audacity = tagd_log(*common, "--format", "audacity").splitlines()
    assert audacity == ["10.000000\t70.500000\tspeech", "60.000000\t3600.250000\tmusic"]
    srt = tagd_log(*common, "--format", "srt")
    assert srt.startswith("1\n00:00:10,000 --> 00:01:10,500\nspeech\n\n2\n00:01:00,000 -->")
    vtt = tagd_log(*common, "--format", "vtt")
    assert vtt.startswith("WEBVTT\n\n1\n00:00:10.000 --> 00:01:10.500\nspeech\n")
    # without --from, the first segment's start is 0
    assert tagd_log("radio1", "--db", str(asrun_file), "--format", "audacity").startswith(
        "0.000000\t60.500000\tspeech"
    )


def test_tagd_log_says_what_is_wrong(asrun_file, tmp_path):
    result = CliRunner().invoke(main, ["log", "radio9", "--db", str(asrun_file)])
    assert result.exit_code == 1
    assert "no segments of stream 'radio9'; streams: radio1, radio2" in result.output
    result = CliRunner().invoke(main, ["log", "radio1", "--db", str(tmp_path / "none.db")])
    assert result.exit_code == 1 and "no as-run log at" in result.output
    result = CliRunner().invoke(
        main, ["log", "radio1", "--db", str(asrun_file), "--from", "yesterday"]
    )
    assert result.exit_code == 2 and "not an ISO 8601 time" in result.output
    config = tmp_path / "tagd.toml"
    config.write_text('[asrun]\npath = "asrun.db"\n')  # beside the config file
    assert "speech" in tagd_log("radio1", "--config", str(config))


# -- tagd serve writing it ---------------------------------------------------------------------

RATE = 16_000
CHUNK_S = 0.1


@pytest.fixture(scope="module")
def always_on_model(short_fcn4, tmp_path_factory) -> Path:
    """The tiny FCN-4 with every threshold at 0: each tag turns on after `on_after`
    predictions and stays on, so segments end only when the stream goes idle or tagd
    stops, at times the test knows."""
    model = onnx.load(str(short_fcn4))
    entry = next(p for p in model.metadata_props if p.key == CARD_METADATA_KEY)
    card = ModelCard.from_json(entry.value)
    card.thresholds = [0.0] * card.n_tags
    card.incremental = IncrementalSection()  # the graphs beside it are not copied
    entry.value = card.to_json()
    path = tmp_path_factory.mktemp("asrun") / "always-on.onnx"
    onnx.save(model, str(path))
    return path


class Producer:
    """The multi-stream protocol into a zmq+pull input, at real time, while ``playing``."""

    def __init__(self, port: int) -> None:
        import zmq

        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.push.connect(f"tcp://127.0.0.1:{port}")
        self.seq = itertools.count()
        rng = np.random.default_rng(0)
        self.chunk = (rng.normal(0, 0.1, (int(RATE * CHUNK_S), 1)) * 32767).astype("<i2").tobytes()

    def play(self, seconds: float) -> tuple[float, float]:
        """Send ``seconds`` of audio at real time; the wall-clock span it covered."""
        started = time.time()
        for index in range(round(seconds / CHUNK_S)):
            header = {"format": "s16le", "rate": RATE, "channels": 1, "seq": next(self.seq)}
            self.push.send_multipart([b"radio1", json.dumps(header).encode(), self.chunk])
            time.sleep(max(0.0, started + (index + 1) * CHUNK_S - time.time()))
        return started, time.time()

    def close(self) -> None:
        self.push.close(linger=1000)
        self.context.term()


def start_daemon(model: Path, port: int, db: Path, tmp_path: Path, tables: str = "") -> TagdProcess:
    """`tagd serve` of ``model`` at a 0.5 s hop, a zmq+pull input, an as-run log and
    ``tables`` (TOML tables) added to its config."""
    config = tmp_path / "tagd.toml"
    config.write_text(
        f'engine = "{model}"\ninputs = ["zmq+pull://127.0.0.1:{port}"]\nhop_seconds = 0.5\n'
        'incremental = false\n[publish]\naddress = "tcp://127.0.0.1:*"\n'
        "[limits]\nidle_after_s = 1.0\n" + tables
    )
    metrics_port = free_port()
    daemon = TagdProcess(
        ["--config", str(config), "--metrics", f"127.0.0.1:{metrics_port}", "--asrun", str(db)],
        metrics_port,
    )
    daemon.wait_ready()
    return daemon


def wait_published(daemon: TagdProcess, count: float) -> None:
    daemon.wait_for_metric("tagd_windows_published_total", above=count - 1, stream="radio1")


def test_serve_logs_segments_that_survive_sigkill_and_a_clean_stop(always_on_model, tmp_path):
    db = tmp_path / "asrun.db"
    port = free_port()
    producer = Producer(port)
    daemon = start_daemon(always_on_model, port, db, tmp_path)
    try:
        first = producer.play(4.0)
        # the stream goes idle after 1 s: every tag's segment ends where its audio did
        daemon.wait_for_metric("tagd_asrun_segments_written_total", above=7, timeout=20)
        while_running = read_records(db, "radio1")  # read-only, beside the writer
        assert len(while_running) == 8 and {r.ended for r in while_running} == {ENDED_IDLE}
        for r in while_running:  # the audio's wall-clock span, to within a hop and jitter
            assert abs(r.start - first[0]) < 1.0 and abs(r.end - first[1]) < 1.0, (r, first)
        # audio again: the tags turn on again (on_after 2: the second prediction of the
        # new epoch); killed while they are on and the audio flows
        published = daemon.metric("tagd_windows_published_total", stream="radio1")
        player = threading.Thread(target=producer.play, args=(5.0,))
        player.start()
        wait_published(daemon, published + 3)
        daemon.process.send_signal(signal.SIGKILL)
        player.join()
    finally:
        daemon.stop()
    survived = read_records(db, "radio1")
    assert survived == while_running  # all that was committed; only the open ones lost

    # a restart appends; SIGTERM writes the segments still open
    daemon = start_daemon(always_on_model, port, db, tmp_path)
    try:
        player = threading.Thread(target=producer.play, args=(5.0,))
        player.start()
        wait_published(daemon, 3)
        code, _ = daemon.terminate_and_time()
        player.join()
    finally:
        daemon.stop()
        producer.close()
    assert code == 0, daemon.log()
    after = read_records(db, "radio1")
    assert after[:8] == while_running
    assert len(after) == 16 and {r.ended for r in after[8:]} == {ENDED_STOP}
    assert all(r.start > while_running[0].end for r in after[8:])


# -- examples/asrun_collector.py ---------------------------------------------------------------


def collector_card() -> ModelCard:
    card = fcn4_card(["rock", "speech", "jazz"])
    card.window_samples, card.hop_samples = 2 * card.sample_rate, card.sample_rate // 2
    return card


def tags_at(card: ModelCard, stream: str, k: int, on: list[str], captured_origin: float) -> dict:
    """Prediction ``k`` of a stream with a 2 s window and a 0.5 s hop, ``on`` over its
    threshold and on, its last sample captured at ``captured_origin`` + its end."""
    start = k * card.hop_samples
    prediction = Prediction(
        stream,
        k,
        start,
        start + card.window_samples,
        1,
        np.array([0.9 if tag in on else 0.1 for tag in card.tags], dtype=np.float32),
        over=list(on),
        active=list(on),
    )
    end_s = prediction.end / card.sample_rate
    return tags_message(
        prediction,
        card,
        captured_at=captured_origin + end_s,
        published_at=time.time(),
        ingest_ms=1.0,
        queue_ms=1.0,
        inference_ms=1.0,
        total_ms=3.0,
        batch_size=1,
    )


def test_the_collector_example_keeps_the_daemons_segments_in_one_database(tagd, tmp_path):
    card = collector_card()
    db = tmp_path / "collected.db"
    collector = Example("asrun_collector.py", str(db), tagd.endpoint, "--idle-after", "1")
    try:
        tagd.wait_subscribed("tags.")
        speech = [[], [], ["speech"], ["speech"], ["speech"], ["speech"], [], []]
        for k, on in enumerate(speech):
            tagd.send(topic(TAGS_TOPIC, "radio1"), tags_at(card, "radio1", k, on, NOON))
        tagd.send(topic(TAGS_TOPIC, "radio2"), tags_at(card, "radio2", 0, ["jazz"], NOON + 60))
        # speech on from the crossing between predictions 1 and 2 (window centres 1.5 s
        # and 2 s) to the one between 5 and 6 (3.5 s, 4 s); radio2 falls silent: idle
        assert collector.lines(2) == [
            "radio1 speech 2025-12-06T12:00:01.750Z 2025-12-06T12:00:03.750Z off",
            "radio2 jazz 2025-12-06T12:01:00.000Z 2025-12-06T12:01:02.000Z idle",
        ]
        assert collector.interrupt() == 0, collector.stderr
    finally:
        collector.kill()
    assert tagd_log("radio1", "--db", str(db)).splitlines()[1:] == [
        "radio1,2025-12-06T12:00:01.750Z,2025-12-06T12:00:03.750Z,speech,0.9,0.9,4,off"
    ]


@pytest.fixture(scope="module")
def curve_keys(tmp_path_factory) -> Path:
    """Key pairs of a daemon, a collector it allows and an intruder it does not."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("tagd", "collector", "intruder"):
        generate_keys(folder, name)
    (folder / "clients").mkdir()
    shutil.copy(folder / "collector.key", folder / "clients")
    return folder


def curve_collector(keys: Path, client: str, db: Path, endpoint: str) -> Example:
    return Example(
        "asrun_collector.py",
        str(db),
        endpoint,
        "--idle-after",
        "1",
        "--server-key",
        str(keys / "tagd.key"),
        "--key",
        str(keys / f"{client}.key_secret"),
    )


def test_the_collector_reaches_a_daemon_with_curve_with_its_own_key_only(curve_keys, tmp_path):
    """tagd's own publisher with [security]'s CURVE, as `tagd serve` runs it."""
    context = zmq.Context()
    curve = CurveServer.load(curve_keys / "tagd.key_secret", curve_keys / "clients")
    authenticator = curve.start_authenticator(context)
    metrics = Metrics(CollectorRegistry())
    publisher = Publisher(context, "tcp://127.0.0.1:*", metrics, linger_ms=0, curve=curve)
    publisher.start_monitor()
    refused = {"socket": PUBLISH_SOCKET, "reason": "auth"}
    intruder = curve_collector(curve_keys, "intruder", tmp_path / "intruder.db", publisher.address)
    collector = curve_collector(curve_keys, "collector", tmp_path / "ours.db", publisher.address)
    try:
        wait_for(lambda: metrics.sample("tagd_handshake_failures_total", refused))  # intruder
        wait_subscribed(publisher, "tags.")  # the collector's, after its handshake
        message = tags_at(collector_card(), "radio1", 0, ["jazz"], NOON)
        publisher.send(topic(TAGS_TOPIC, "radio1"), message)
        assert collector.lines(1) == [
            "radio1 jazz 2025-12-06T12:00:00.000Z 2025-12-06T12:00:02.000Z idle"
        ]
        assert collector.interrupt() == 0, collector.stderr
        assert intruder.interrupt() == 0, intruder.stderr
    finally:
        collector.kill()
        intruder.kill()
        publisher.close()
        authenticator.stop()
        context.term()
    assert intruder.stdout.empty() and rows(tmp_path / "intruder.db") == []
    assert [r[:2] for r in rows(tmp_path / "ours.db")] == [("radio1", "jazz")]


def test_the_collector_says_what_is_wrong_with_its_keys(curve_keys, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        collector = [sys.executable, str(EXAMPLES / "asrun_collector.py")]
        db = str(tmp_path / "asrun.db")
        return subprocess.run(
            [*collector, db, "tcp://127.0.0.1:5560", *args], capture_output=True, text=True
        )

    half = run("--server-key", str(curve_keys / "tagd.key"))
    assert half.returncode == 2 and "CURVE needs both --server-key and --key" in half.stderr
    public = run(
        "--server-key", str(curve_keys / "tagd.key"), "--key", str(curve_keys / "collector.key")
    )
    assert public.returncode == 2 and "holds no secret key" in public.stderr
    assert not (tmp_path / "asrun.db").exists()  # nothing started


# -- the same audio through tagd serve and tagd tag --timeline ---------------------------------

PROGRAMME_HOPS = 40  # hops after the first window: the audio ends where a window does


def programme(card: ModelCard, hop: int, music) -> np.ndarray:
    """Music at changing levels with quiet gaps, a whole number of hops past one window
    (so the audio's end is a window's end on both paths), as 16-bit values."""
    rate = card.sample_rate
    length = card.window_samples + PROGRAMME_HOPS * hop
    parts = [
        music(5.0, rate, seed=1, level=0.5),
        np.zeros(3 * rate, dtype=np.float32),
        music(4.0, rate, seed=2, level=0.1),
        music(5.0, rate, seed=3, level=0.6),
        np.zeros(2 * rate, dtype=np.float32),
    ]
    audio = np.concatenate(parts)
    audio = np.resize(audio, length) if len(audio) < length else audio[:length]
    return np.round(np.clip(audio, -1, 1) * 32767).astype("<i2")


def crossing_thresholds(engine, audio: np.ndarray, hop: int) -> list[float]:
    """Per tag, a threshold that its scores over ``audio``'s windows cross several times:
    the middle of the widest gap between consecutive scores in their middle half, so the
    two paths' scores (batched differently) fall on the same side of it."""
    card = engine.card
    samples = audio.astype(np.float32) / 32768
    starts = range(0, len(samples) - card.window_samples + 1, hop)
    windows = np.stack([samples[s : s + card.window_samples] for s in starts])
    scores = np.sort(engine.run(windows), axis=0)  # (windows, tags)
    middle = scores[len(scores) // 4 : 3 * len(scores) // 4]
    widest = np.argmax(np.diff(middle, axis=0), axis=0)
    return [float((middle[i, t] + middle[i + 1, t]) / 2) for t, i in enumerate(widest)]


def test_serve_and_tag_timeline_cut_the_same_audio_into_the_same_segments(
    short_fcn4, music, tmp_path
):
    """A file tagged with --timeline, and its samples fed to a real `tagd serve` faster
    than real time: the same segments (tags, mean, peak, prediction count), every edge
    on the wall clock the file's edge plus one offset, the stream's start."""
    import soundfile
    import zmq

    from tagd.engines import load_engine

    engine = load_engine(short_fcn4, warmup=False)
    card = engine.card
    hop = card.sample_rate // 2  # the daemon's hop_seconds = 0.5
    audio = programme(card, hop, music)
    model = onnx.load(str(short_fcn4))
    entry = next(p for p in model.metadata_props if p.key == CARD_METADATA_KEY)
    card.thresholds = crossing_thresholds(engine, audio, hop)
    entry.value = card.to_json()
    onnx.save(model, str(tmp_path / "crossing.onnx"))
    wav = tmp_path / "programme.wav"
    soundfile.write(wav, audio, card.sample_rate, subtype="PCM_16")

    tagged = CliRunner().invoke(
        main,
        ["tag", str(wav), "--engine", str(tmp_path / "crossing.onnx"), "--timeline"]
        + ["--format", "jsonl", "--hop", "0.5", "--off-margin", "0"],
    )
    assert tagged.exit_code == 0, tagged.output
    by_tag = lambda s: (s["tag"], s["start"])  # noqa: E731
    expected = sorted(map(json.loads, tagged.stdout.splitlines()), key=by_tag)
    assert sum(not s["open"] for s in expected) >= 3, expected  # tags turned off, not one span

    port, db = free_port(), tmp_path / "asrun.db"
    # as `tagd tag --off-margin 0`; every window kept however fast they come
    tables = "[tagger]\noff_margin = 0.0\n[batching]\nmax_pending_per_stream = 1000\n"
    daemon = start_daemon(tmp_path / "crossing.onnx", port, db, tmp_path, tables)
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    try:
        push.connect(f"tcp://127.0.0.1:{port}")
        chunk = round(card.sample_rate * CHUNK_S)
        started = time.time()
        for seq, at in enumerate(range(0, len(audio), chunk)):  # about 10x real time
            header = {"format": "s16le", "rate": card.sample_rate, "channels": 1, "seq": seq}
            push.send_multipart([b"radio1", json.dumps(header).encode(), audio[at : at + chunk]])
            time.sleep(CHUNK_S / 10)
        # idle after 1 s: the segments still on end where the audio did
        daemon.wait_for_metric(
            "tagd_asrun_segments_written_total", above=len(expected) - 1, timeout=30
        )
    finally:
        push.close(linger=1000)
        context.term()
        daemon.stop()
    served = sorted(read_records(db, "radio1"), key=lambda r: (r.tag, r.start))
    assert [r.tag for r in served] == [s["tag"] for s in expected]
    offset = served[0].start - expected[0]["start"]
    assert started - card.window_seconds - 1.0 < offset < started + 5.0
    for record, segment in zip(served, expected, strict=True):
        assert record.start - offset == pytest.approx(segment["start"], abs=1e-3)
        assert record.end - offset == pytest.approx(segment["end"], abs=1e-3)
        assert (record.mean, record.peak) == pytest.approx(
            (segment["mean"], segment["peak"]), abs=1e-4
        )
        assert record.predictions == segment["predictions"]
        assert (record.ended == ENDED_OFF) == (not segment["open"])
