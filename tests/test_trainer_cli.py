"""The `tagd-train` CLI end to end: MagnaTagATune layout and a manifest, export, errors."""

from __future__ import annotations

import csv as csv_module
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from trainer_support import TINY, one_torch_thread

from tagd.card import read_card
from trainer.cli import main
from trainer.data import synthetic
from trainer.data.dataset import PreparedData

pytestmark = pytest.mark.usefixtures("one_torch_thread")
assert one_torch_thread  # imported for pytest

TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--hparam", f"{key}={value}")]
QUICK_TRAINING = ["--optimizer", "adam", "--lr", "0.003", "--epochs", "2", "--no-progress"]


def tagd_train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real command line, in a child process, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"tagd-train {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}"
        )
    return result


def invoke(*args: str, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (
        f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    )
    return result


@pytest.fixture(scope="module")
def mtt_run(tmp_path_factory):
    """synthetic → prepare → train → evaluate → export, each a `python -m trainer.cli` process."""
    root = tmp_path_factory.mktemp("cli-mtt")
    tagd_train("synthetic", root / "mtt", "--clips", "90", "--seconds", "2")
    prepared = tagd_train(
        "prepare",
        "--mtt",
        root / "mtt",
        "--n-tags",
        "7",
        "--model",
        "samplecnn",
        "--out",
        root / "prepared",
        "--no-progress",
    )
    tagd_train(
        "train",
        root / "prepared",
        "--model",
        "samplecnn",
        *TINY_ARGS,
        *QUICK_TRAINING,
        "--out",
        root / "run",
    )
    evaluated = tagd_train("evaluate", root / "run" / "best.pt", root / "prepared", "--no-progress")
    tagd_train("export", root / "run" / "best.pt", "--out", root / "model.onnx")
    return root, prepared, evaluated


def test_mtt_layout_end_to_end(mtt_run):
    root, prepared, evaluated = mtt_run
    assert (
        "skipped 1" in prepared.stdout and (root / "prepared" / "skipped.csv").is_file()
    )  # the empty mp3
    assert "macro ROC-AUC" in evaluated.stdout
    for name in (
        "report.md",
        "metrics.json",
        "per_tag.csv",
        "tag_roc_auc.png",
        "roc_curves.png",
        "training_curves.png",
    ):
        assert (root / "run" / "eval-test" / name).is_file(), name

    card = read_card(root / "model.onnx")
    assert card.architecture == "samplecnn" and card.sample_rate == 22_050 and card.n_tags == 7
    assert {"valid", "test"} <= set(card.scores)
    assert 0.0 <= card.scores["test"]["roc_auc_macro"] <= 1.0
    assert card.thresholds != [0.5] * 7
    assert card.training["thresholds"] == "max F1 per tag on the valid split"


def test_manifest_end_to_end_and_finetune(mtt_run, tmp_path):
    mtt_root = mtt_run[0]
    invoke(
        "synthetic", tmp_path / "station", "--layout", "manifest", "--clips", "40", "--seconds", "2"
    )
    invoke(
        "prepare",
        "--manifest",
        tmp_path / "station" / "manifest.csv",
        "--sample-rate",
        "22050",
        "--out",
        tmp_path / "prepared",
        "--workers",
        "1",
        "--no-progress",
    )
    invoke(
        "train",
        tmp_path / "prepared",
        "--model",
        "samplecnn",
        *TINY_ARGS,
        *QUICK_TRAINING,
        "--out",
        tmp_path / "run",
    )
    invoke("evaluate", tmp_path / "run" / "best.pt", tmp_path / "prepared", "--no-progress")
    invoke(
        "finetune",
        mtt_root / "run" / "best.pt",
        tmp_path / "prepared",
        "--freeze",
        "stem",
        "--lr-group",
        "blocks.0=1e-5",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        tmp_path / "tuned",
    )
    result = invoke(
        "export",
        tmp_path / "run" / "best.pt",
        "--out",
        tmp_path / "station.onnx",
        "--name",
        "station-v1",
    )
    assert "scores: test, valid" in result.output

    card = read_card(tmp_path / "station.onnx")
    assert card.name == "station-v1" and card.n_tags == 8  # every synthetic tag, "rare" too
    assert "test" in card.scores and len(card.thresholds) == 8
    assert (tmp_path / "tuned" / "best.pt").is_file()


def test_prepare_msd_lists(tmp_path):
    audio_lines, tag_lines = [], []
    for clip in synthetic.generate(6, seed=2, seconds=1.5):
        soundfile.write(tmp_path / f"{clip.number}.wav", clip.audio, 16_000)
        audio_lines.append(f"TR{clip.number}\t{clip.number}.wav")
        tag_lines += [f"TR{clip.number}\t{tag}" for tag in clip.tags]
    (tmp_path / "audio.tsv").write_text("\n".join(audio_lines) + "\n")
    (tmp_path / "tags.tsv").write_text("\n".join(tag_lines) + "\n")
    (tmp_path / "train.txt").write_text("TR0\nTR1\nTR2\nTR3\n")
    (tmp_path / "valid.txt").write_text("TR4\n")
    (tmp_path / "test.txt").write_text("TR5\n")
    splits = [
        arg
        for split in ("train", "valid", "test")
        for arg in ("--msd-split", f"{split}={tmp_path / split}.txt")
    ]
    invoke(
        "prepare",
        "--msd-audio",
        tmp_path / "audio.tsv",
        "--msd-tags",
        tmp_path / "tags.tsv",
        *splits,
        "--sample-rate",
        "8000",
        "--workers",
        "1",
        "--out",
        tmp_path / "prepared",
        "--no-progress",
    )
    data = PreparedData(tmp_path / "prepared")
    assert data.sample_rate == 8000 and len(data.clips) == 6
    assert {clip.clip_id: clip.split for clip in data.clips}["TR4"] == "valid"
    assert (
        "expected SPLIT=FILE"
        in invoke(
            "prepare",
            "--msd-audio",
            "a",
            "--msd-tags",
            "b",
            "--msd-split",
            "x",
            "--sample-rate",
            "8000",
            "--out",
            tmp_path / "o",
            code=2,
        ).output
    )


@pytest.mark.slow
def test_export_untrained_model_by_name(tmp_path):
    result = invoke("export", "--model", "fcn4", "--out", tmp_path / "fcn4.onnx")
    assert "50 tags" in result.output
    card = read_card(tmp_path / "fcn4.onnx")
    assert (card.architecture, card.n_tags, card.sample_rate, card.window_samples) == (
        "fcn4",
        50,
        12_000,
        349_440,
    )
    assert card.scores == {}


def test_models_lists_the_registry():
    output = invoke("models").output
    assert "fcn4" in output and "samplecnn-rese" in output and "12000 Hz" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prepare", "--mtt", "missing-folder", "--model", "fcn4", "--out", "x"], "no such file"),
        (["train", ".", "--out", "run"], "run `tagd-train prepare` first"),
        (["evaluate", "missing.pt", "."], "no such checkpoint"),
        (["export", "--model", "fcn99", "--out", "x.onnx"], "unknown model 'fcn99'"),
        (
            ["export", "--model", "fcn4", "--hparam", "depth=3", "--out", "x.onnx"],
            "unknown hyper-parameters depth",
        ),
    ],
)
def test_bad_input_gives_one_line_and_a_failing_exit_code(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], result.output


def test_usage_errors_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    both = invoke(
        "prepare", "--mtt", "a", "--manifest", "b", "--model", "fcn4", "--out", tmp_path, code=2
    )
    assert "exactly one of --mtt" in both.output
    assert (
        "expected key=value"
        in invoke("export", "--model", "fcn4", "--hparam", "width", "--out", "x", code=2).output
    )
    assert "CHECKPOINT or --model" in invoke("export", "--out", "x.onnx", code=2).output


def test_compile_without_tensorrt_says_how_to_get_it(tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    invoke(
        "export",
        "--model",
        "samplecnn",
        "--hparam",
        "width=0.125",
        "--n-tags",
        "3",
        "--out",
        tmp_path / "m.onnx",
    )
    result = tagd_train("compile", tmp_path / "m.onnx", "--out", tmp_path / "m.plan", check=False)
    assert result.returncode == 1
    assert "tensorrt is not installed" in result.stderr and "Traceback" not in result.stderr


def test_preparing_no_clip_fails_and_says_where_it_looked(tmp_path):
    synthetic.write_mtt(tmp_path / "mtt", 6, seconds=1.5)
    (tmp_path / "csv-only").mkdir()
    csv = tmp_path / "csv-only" / "annotations_final.csv"
    csv.write_bytes((tmp_path / "mtt" / "annotations_final.csv").read_bytes())
    result = invoke(
        "prepare",
        "--mtt",
        csv,
        "--sample-rate",
        "16000",
        "--out",
        tmp_path / "p",
        "--no-progress",
        code=1,
    )
    assert "prepared no clips: all 7 were skipped (7 unreadable)" in result.output
    assert f"under {tmp_path / 'csv-only'}" in result.output and "--audio-dir" in result.output
    invoke(
        "prepare",
        "--mtt",
        csv,
        "--audio-dir",
        tmp_path / "mtt",
        "--sample-rate",
        "16000",
        "--out",
        tmp_path / "p",
        "--no-progress",
    )


def test_synthetic_rendered_clips_are_tagged_music_and_speech(tmp_path):
    pytest.importorskip("trainer.data.rendered").check_tools()
    invoke(
        "synthetic",
        tmp_path / "r",
        "--kind",
        "rendered",
        "--clips",
        "6",
        "--seconds",
        "3",
        "--format",
        "wav",
        "--jobs",
        "2",
        "--no-progress",
        "--layout",
        "mtt",
        "--recordings",
        "none",
    )
    rows = list(
        csv_module.reader((tmp_path / "r" / "annotations_final.csv").open(), delimiter="\t")
    )
    header, clips = rows[0], rows[1:]
    assert header[0] == "clip_id" and header[-1] == "mp3_path" and "piano" in header
    assert len(clips) == 6 and all(any(v == "1" for v in row[1:-1]) for row in clips)
    audio, rate = soundfile.read(tmp_path / "r" / clips[0][-1])
    assert rate == 16_000 and len(audio) == 3 * 16_000 and np.abs(audio).max() > 0.01
    # the same seed renders the same clips with any number of jobs
    invoke(
        "synthetic",
        tmp_path / "again",
        "--kind",
        "rendered",
        "--clips",
        "6",
        "--seconds",
        "3",
        "--format",
        "wav",
        "--jobs",
        "1",
        "--no-progress",
        "--layout",
        "mtt",
        "--recordings",
        "none",
    )
    again = (tmp_path / "again" / "annotations_final.csv").read_text()
    assert again == (tmp_path / "r" / "annotations_final.csv").read_text()
    for row in clips:
        a, _ = soundfile.read(tmp_path / "r" / row[-1])
        b, _ = soundfile.read(tmp_path / "again" / row[-1])
        np.testing.assert_array_equal(a, b)


def _rendering_with_recordings():
    """The rendered and recordings modules, or a skip saying which tool is missing."""
    rendered = pytest.importorskip("trainer.data.rendered")
    recordings = pytest.importorskip("trainer.data.recordings")
    try:
        rendered.check_tools()
    except rendered.DataError as exc:
        pytest.skip(str(exc))
    if shutil.which("apt-get") is None:
        pytest.skip("real recordings come from Debian packages through apt-get")
    return rendered, recordings


def test_synthetic_rendered_with_real_recordings_writes_partial_labels_and_origins(tmp_path):
    rendered, recordings = _rendering_with_recordings()
    packages = f"{recordings.SMALL_TRAIN_SPEECH},{recordings.SMALL_TRAIN_MUSIC}"
    result = invoke(
        "synthetic",
        tmp_path / "r",
        "--kind",
        "rendered",
        "--clips",
        "24",
        "--seconds",
        "3",
        "--format",
        "wav",
        "--no-progress",
        "--soundfonts",
        "fluidr3",
        "--recordings",
        packages,
    )
    assert "real speech from " + recordings.SMALL_TRAIN_SPEECH in result.output
    rows = list(csv_module.DictReader((tmp_path / "r" / "manifest.csv").open()))
    assert len(rows) == 24
    real_music = [r for r in rows if recordings.SMALL_TRAIN_MUSIC in r["recordings"]]
    real_voice = [r for r in rows if recordings.SMALL_TRAIN_SPEECH in r["recordings"]]
    assert real_music and real_voice  # seed 0 draws both in 24 clips
    for r in real_music:  # nobody named the instruments of a recording
        assert set(r["known"].split(";")) <= {"speech", "instrumental", "loud", "quiet"}
        assert r["soundfont"] == "" and "=" in r["recordings"]  # package=version:path
    assert all(r["known"] == "" for r in rows if r not in real_music)
    assert all("speech" in r["tags"].split(";") for r in real_voice)
    assert {r["soundfont"] for r in rows} <= {"", "fluidr3"} and all(r["chain"] for r in rows)
    invoke(
        "prepare",
        "--manifest",
        tmp_path / "r" / "manifest.csv",
        "--sample-rate",
        "16000",
        "--out",
        tmp_path / "p",
        "--no-progress",
    )
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert sum(1 for clip in index["clips"] if clip.get("unknown")) == len(real_music)


def test_mtt_layout_refuses_partial_labels(tmp_path):
    rendered, recordings = _rendering_with_recordings()
    result = invoke(
        "synthetic",
        tmp_path / "r",
        "--kind",
        "rendered",
        "--clips",
        "2",
        "--layout",
        "mtt",
        "--recordings",
        recordings.SMALL_TRAIN_MUSIC,
        "--no-progress",
        code=1,
    )
    assert "only the manifest layout holds" in result.output


def test_recordings_writes_a_held_out_set_that_evaluate_matches_by_tag_name(mtt_run, tmp_path):
    recordings = pytest.importorskip("trainer.data.recordings")
    if shutil.which("apt-get") is None:
        pytest.skip("real recordings come from Debian packages through apt-get")
    assert "| asterisk-prompt-es-co | speech | heldout |" in invoke("recordings", "--list").output
    result = invoke(
        "recordings",
        tmp_path / "real",
        "--packages",
        recordings.SMALL_HELDOUT_SPEECH,
        "--seconds",
        "5",
        "--max-clips-per-package",
        "3",
        "--no-progress",
    )
    assert "wrote 3 clips of 1 packages" in result.output
    rows = list(csv_module.DictReader((tmp_path / "real" / "manifest.csv").open()))
    assert [r["split"] for r in rows] == ["test"] * 3
    assert all(r["tags"] == "speech" and r["known"] == "speech;instrumental" for r in rows)
    assert all(r["package"] == recordings.SMALL_HELDOUT_SPEECH and r["version"] for r in rows)
    invoke(
        "prepare",
        "--manifest",
        tmp_path / "real" / "manifest.csv",
        "--model",
        "samplecnn",
        "--out",
        tmp_path / "p",
        "--no-progress",
    )
    root, _, _ = mtt_run  # tones: bass, lead, … and no speech
    result = invoke("evaluate", root / "run" / "best.pt", tmp_path / "p", "--no-progress", code=1)
    assert "has none of the model's tags" in result.output
    assert "give the folder to write the set to" in invoke("recordings", code=2).output


def test_every_training_option_reaches_the_config_by_its_flag(tmp_path, monkeypatch):
    import trainer.train
    from trainer.recipes import TrainConfig

    runs: list[TrainConfig] = []
    finished = SimpleNamespace(
        best_roc_auc=0.5, best_epoch=1, epochs_run=1, best_path="b", last_path="l"
    )
    monkeypatch.setattr(trainer.train, "train", lambda config: runs.append(config) or finished)
    invoke("train", tmp_path, "--out", tmp_path / "run")
    assert runs.pop() == TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"))
    flags = {
        "--name": ("name", "x", "x"),
        "--recipe": ("recipe", "lee2017", "lee2017"),
        "--optimizer": ("optimizer", "sgd", "sgd"),
        "--epochs": ("epochs", "3", 3),
        "--batch-size": ("batch_size", "5", 5),
        "--lr": ("lr", "0.5", 0.5),
        "--patience": ("patience", "7", 7),
        "--max-lr-drops": ("max_lr_drops", "9", 9),
        "--schedule": ("schedule", "cosine", "cosine"),
        "--crops-per-clip": ("crops_per_clip", "cover", "cover"),
        "--min-epoch-examples": ("min_epoch_examples", "0", 0),
        "--crop": ("crop", "loop", "loop"),
        "--turns": ("turns", "0.5", 0.5),
        "--seed": ("seed", "4", 4),
        "--precision": ("precision", "bf16", "bf16"),
        "--device": ("device", "cpu", "cpu"),
        "--workers": ("workers", "2", 2),
        "--freeze": ("freeze", "stem", ["stem"]),
        "--lr-group": ("lr_groups", "blocks.0=1e-5", {"blocks.0": 1e-5}),
    }
    args = [arg for flag, (_, text, _) in flags.items() for arg in (flag, text)]
    invoke(
        "train",
        tmp_path,
        "--model",
        "samplecnn",
        "--hparam",
        "width=0.25",
        "--from-checkpoint",
        tmp_path / "a.pt",
        *args,
        "--resume",
        "--no-progress",
        "--out",
        tmp_path / "run",
    )
    config = runs.pop()
    assert {field: getattr(config, field) for field, _, _ in flags.values()} == {
        field: value for field, _, value in flags.values()
    }
    assert (config.model, config.hparams, config.init_from) == (
        "samplecnn",
        {"width": 0.25},
        str(tmp_path / "a.pt"),
    )
    assert config.resume is True and config.progress is False
    invoke("finetune", tmp_path / "a.pt", tmp_path, "--crops-per-clip", "2", "--out", tmp_path)
    assert runs.pop().init_from == str(tmp_path / "a.pt")
    assert (
        "expected a whole number ≥ 1 or 'cover'"
        in invoke("train", tmp_path, "--crops-per-clip", "0", "--out", tmp_path, code=2).output
    )
    help_text = invoke("train", "--help").output
    assert all(flag in help_text for flag in (*flags, "--resume", "--no-progress", "--out"))


def test_evaluate_hop_is_in_seconds_as_tagd_tag(mtt_run, tmp_path, monkeypatch):
    import trainer.evaluate
    from trainer.checkpoint import card_from_checkpoint, load_checkpoint

    root, _, _ = mtt_run
    hops = []
    evaluate_model = trainer.evaluate.evaluate_model

    def spy(*args, **kwargs):
        hops.append(kwargs["hop_samples"])
        return evaluate_model(*args, **kwargs)

    monkeypatch.setattr(trainer.evaluate, "evaluate_model", spy)
    best, prepared = root / "run" / "best.pt", root / "prepared"
    invoke("evaluate", best, prepared, "--hop", "0.5", "--no-update", "--out", tmp_path)
    card = card_from_checkpoint(load_checkpoint(best))
    assert hops == [card.hop_from_seconds(0.5)] == [11_025]  # 0.5 s at 22,050 Hz
    for bad in ("0", "-1", "ten"):
        result = invoke("evaluate", best, prepared, "--hop", bad, code=2)
        assert "Invalid value for '--hop'" in result.output
