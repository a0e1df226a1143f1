"""Logging that a flood cannot turn into a flood of log lines.

Bad input arrives at the rate a peer chooses. ``RateLimitedLog.warning(key, ...)`` logs
the first occurrence of each key at once and later ones at most once per ``interval_s``,
saying how many were left out in between; the metrics count every one of them.
"""

from __future__ import annotations

import logging
import threading
import time

DEFAULT_INTERVAL_S = 10.0


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = DEFAULT_INTERVAL_S):
        self._logger = logger
        self.interval_s = interval_s
        self._last: dict[object, float] = {}  # key → monotonic time it was last logged
        self._skipped: dict[object, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: object, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``key`` was logged within the interval; True if logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return False
            self._last[key] = now
            skipped = self._skipped.pop(key, 0)
        if skipped:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, skipped, now - last)
        self._logger.log(level, message, *args)
        return True

    def warning(self, key: object, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, message, *args)
