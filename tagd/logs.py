"""Logging for every `tagd` command: text or JSON Lines on stderr, one handler on the root.

``setup_logging`` installs the handler; ``held_logs`` holds start-up records so that a
failed start's reason can be the first line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import sys
from collections.abc import Iterator

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Log records at ``level`` and above to stderr, as text or (``fmt="json"``) JSON Lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@contextlib.contextmanager
def held_logs() -> Iterator[logging.handlers.MemoryHandler]:
    """Hold log records, so a failure's reason can be the first line on stderr.

    Yields the holding handler: ``flush()`` writes what it holds. On leaving, whatever is
    still held is written and the root logger's handlers are put back.
    """
    root = logging.getLogger()
    handlers = root.handlers[:]
    target = handlers[0] if handlers else logging.StreamHandler(sys.stderr)
    held = logging.handlers.MemoryHandler(
        capacity=100_000, flushLevel=logging.CRITICAL + 1, target=target, flushOnClose=True
    )
    root.handlers[:] = [held]
    try:
        yield held
    finally:
        root.handlers[:] = handlers
        held.close()  # flushes
