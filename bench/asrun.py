"""What the as-run log costs: the inference worker's side, the commit, the disk, a query.

    python bench/asrun.py

Prints, for tagd/asrun.py's AsRunLog on this machine's disk (a temporary folder):
``put()`` as the inference worker pays it (median and p99 of 20,000 calls); how long a
segment takes from ``put()`` to committed, one at a time as segments end (median and p99
of 200); the bytes a segment takes on disk (100,000 of them over 20 streams and 50 tags,
indexes included, after VACUUM); and `tagd log`'s query for one stream's hour among them.
Not a test: the figures belong to the machine and the disk it ran on.
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from machine import cpu  # bench/machine.py
from prometheus_client import CollectorRegistry

from tagd.asrun import AsRunLog, Record, read_records
from tagd.metrics import Metrics

T0 = 1.7e9


def quantiles(values: list[float], scale: float) -> str:
    ordered = sorted(values)
    return f"median {statistics.median(ordered) * scale:.2f}, p99 {ordered[int(len(ordered) * 0.99)] * scale:.2f}"


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="tagd-asrun-bench-"))
    metrics = Metrics(CollectorRegistry())
    one = [Record("radio1", "speech", T0, T0 + 30, 0.8, 0.95, 12, "off")]
    print(f"CPU: {cpu()}; SQLite {sqlite3.sqlite_version}")

    asrun = AsRunLog(folder / "put.db", metrics)
    asrun.start()
    costs = []
    for _ in range(20_000):
        started = time.perf_counter()
        asrun.put(one)
        costs.append(time.perf_counter() - started)
    asrun.close(timeout=60)
    print(f"put() in the inference worker: {quantiles(costs, 1e6)} µs")

    asrun = AsRunLog(folder / "commit.db", metrics)
    asrun.start()
    delays = []
    for _ in range(200):
        before = metrics.sample("tagd_asrun_segments_written_total")
        started = time.perf_counter()
        asrun.put(one)
        while metrics.sample("tagd_asrun_segments_written_total") == before:
            time.sleep(0.0002)
        delays.append(time.perf_counter() - started)
    asrun.close(timeout=60)
    print(f"put() to committed, one segment at a time: {quantiles(delays, 1e3)} ms")

    path = folder / "size.db"
    asrun = AsRunLog(path, metrics)
    asrun.start()
    for batch in range(100):
        asrun.put(
            [
                Record(
                    f"radio{batch % 20}",
                    f"tag{i % 50}",
                    T0 + batch * 100 + i,
                    T0 + batch * 100 + i + 30,
                    0.8,
                    0.95,
                    12,
                    "off",
                )
                for i in range(1000)
            ]
        )
    asrun.close(timeout=120)
    connection = sqlite3.connect(path)
    connection.execute("VACUUM")
    connection.close()
    size = path.stat().st_size
    print(f"100,000 segments: {size / 1e6:.1f} MB on disk, {size / 1e5:.0f} bytes a segment")

    started = time.perf_counter()
    records = read_records(path, "radio3", T0 + 3000, T0 + 6600)
    query_s = time.perf_counter() - started
    shutil.rmtree(folder)
    print(f"tagd log's query, one stream's hour: {len(records)} segments in {query_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
