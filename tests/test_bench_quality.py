"""bench/quality.py's held-out recordings set follows the catalog: a set made before a
package joined (or left) the ``heldout`` role is made again, not reused as it was; and
``--resume`` takes a run up where it stopped."""

from __future__ import annotations

import csv

import pytest
from support import load_bench
from trainer_support import synthetic_prepared

from trainer.checkpoint import load_checkpoint
from trainer.data.recordings import MANIFEST_COLUMNS, PACKAGES


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    return load_bench("quality")


def write_manifest(root, packages: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, MANIFEST_COLUMNS)
        writer.writeheader()
        for number, package in enumerate(packages):
            writer.writerow({"path": f"audio/{package}/{number:05d}.wav", "package": package})


def test_a_set_of_other_packages_is_made_again_and_the_catalogs_is_reused(
    bench, tmp_path, monkeypatch
):
    heldout = [name for name, p in PACKAGES.items() if p.role == "heldout"]
    made = []

    def write_recordings_set(root, packages, **options):
        made.append(list(packages))
        write_manifest(root, list(packages))
        return root / "manifest.csv"

    monkeypatch.setattr(bench.recordings, "write_recordings_set", write_recordings_set)
    root = tmp_path / "recordings-heldout"
    write_manifest(root, heldout[:-1])  # made before the last held-out package joined

    assert bench.recordings_set(root) == root / "manifest.csv"
    assert made == [heldout]
    assert bench.recordings_set(root) == root / "manifest.csv"
    assert made == [heldout]  # the catalog's packages: reused


def test_resume_scores_a_finished_run_again_without_training(bench, tmp_path):
    data = synthetic_prepared(tmp_path / "set", 24, seconds=3.0)
    runs = tmp_path / "runs"
    first = bench.default_recipe("samplecnn", 0.0625, data, runs, epochs=1)
    weights = load_checkpoint(first["checkpoint"])["state_dict"]

    again = bench.default_recipe("samplecnn", 0.0625, data, runs, epochs=1, resume=True)
    assert again["epochs"] == 1 and again["roc_auc"] == first["roc_auc"]
    assert again["minutes"] == first["minutes"]  # the first process's epoch, not a new one
    again_weights = load_checkpoint(again["checkpoint"])["state_dict"]
    assert all((weights[key] == again_weights[key]).all() for key in weights)
    longer = bench.default_recipe("samplecnn", 0.0625, data, runs, epochs=2, resume=True)
    assert longer["epochs"] == 2 and longer["minutes"] > first["minutes"]
