"""tagd.logs: the log formats, held start-up logs, and the import direction of the CLI."""

import json
import logging
import subprocess
import sys

import pytest

from tagd.logs import held_logs, setup_logging


@pytest.fixture(autouse=True)
def root_logger_restored():
    """setup_logging changes the root logger for the whole process: put it back, or every
    later test logs through a handler on a closed capture stream, at INFO."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_are_one_object_a_line(capsys):
    setup_logging("info", "json")
    logging.getLogger("tagd.test").info("stream %s opened", "radio1")
    entry = json.loads(capsys.readouterr().err.strip())
    assert entry["level"] == "info" and entry["logger"] == "tagd.test"
    assert entry["message"] == "stream radio1 opened"


def test_held_logs_come_after_what_is_written_first(capsys):
    setup_logging("info", "text")
    with held_logs() as held:
        logging.getLogger("tagd.test").info("loading the engine")
        sys.stderr.write("tagd serve: the reason\n")
        held.flush()
    err = capsys.readouterr().err
    assert err.index("the reason") < err.index("loading the engine")


def test_tag_command_loads_neither_zmq_nor_the_server():
    probe = (
        "import sys; from click.testing import CliRunner; from tagd.cli import main; "
        "CliRunner().invoke(main, ['tag', '--help']); "
        "print(sorted(m for m in ('zmq', 'tagd.server', 'tagd.sources', 'tagd.batcher') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_the_server_is_a_library_that_does_not_import_the_cli():
    probe = "import sys, tagd.server; print('tagd.cli' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
