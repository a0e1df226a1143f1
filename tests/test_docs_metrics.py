"""docs/metrics.md against the registry: every metric tagd exports is documented with its
type and label names, and every documented metric and label still exists."""

from __future__ import annotations

import re

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from support import REPO

from tagd.metrics import Metrics

METRICS_MD = REPO / "docs" / "metrics.md"

# The suffix a query adds to a family's name: counters end in _total, Info in _info.
QUERY_SUFFIX = {"counter": "_total", "info": "_info"}
BUILT_IN_LABELS = {"le"}  # histogram buckets'


def exported_metrics() -> dict[str, tuple[str, set[str]]]:
    """Each metric's name (as a query spells it) → (type, label names), from a registry
    where every labelled metric has one series, so that its samples carry its labels."""
    metrics = Metrics(CollectorRegistry())
    metrics.describe_engine(
        model="m",
        architecture="fcn4",
        backend="onnxruntime",
        card_version=1,
        sample_rate=16000,
        window_samples=16000,
        hop_samples=8000,
        n_tags=1,
    )
    metrics.last_predictions.update("s", ["tag"], np.zeros(1, np.float32), [])
    for metric in vars(metrics).values():
        # prometheus_client keeps a metric's label names only in _labelnames.
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*metric._labelnames)
    exported = {}
    for family in metrics.registry.collect():
        labels = {name for sample in family.samples for name in sample.labels}
        name = family.name + QUERY_SUFFIX.get(family.type, "")
        exported[name] = (family.type, labels - BUILT_IN_LABELS)
    return exported


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """The rows of docs/metrics.md's tables: ``| `name` | type | `label`, … | meaning |``;
    a label cell's parentheses (its values) are not label names."""
    row = re.compile(r"^\| `(tagd_\w+)` \| (\w+) \|([^|]*)\|", re.MULTILINE)
    documented = {}
    for name, kind, label_cell in row.findall(METRICS_MD.read_text()):
        assert name not in documented, f"{name} has two rows in docs/metrics.md"
        labels = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", label_cell)))
        documented[name] = (kind, labels)
    return documented


def test_every_exported_metric_is_documented_with_its_type_and_labels():
    documented = documented_metrics()
    for name, (kind, labels) in exported_metrics().items():
        assert name in documented, f"{name} is missing from docs/metrics.md"
        documented_kind, documented_labels = documented[name]
        assert documented_kind == kind, f"docs/metrics.md says {name} is a {documented_kind}"
        assert documented_labels == labels, (
            f"{name}'s labels: docs/metrics.md lacks {sorted(labels - documented_labels)}, "
            f"documents gone ones {sorted(documented_labels - labels)}"
        )


def test_every_documented_metric_is_exported():
    gone = documented_metrics().keys() - exported_metrics().keys()
    assert not gone, f"docs/metrics.md documents metrics the registry no longer has: {gone}"
