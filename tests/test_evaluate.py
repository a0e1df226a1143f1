"""Evaluation: clip scores over windows, macro / weighted AUC, max-F1 thresholds, report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.data.dataset import (
    INDEX_NAME,
    PREPARED_FORMAT,
    PREPARED_VERSION,
    DataError,
    PreparedData,
)
from trainer.evaluate import (
    choose_thresholds,
    evaluate_checkpoint,
    evaluate_model,
    f1_at,
    predict_clips,
    summarise,
    tag_metrics,
    write_outputs,
)
from trainer.export import card_for_model
from trainer.models import create_model


def make_prepared(root, clips, rate=22_050, tags=("x", "y")):
    """A prepared folder by hand: clips are (int16 samples, tag indices, split)."""
    (root / "shards").mkdir(parents=True)
    data = np.concatenate([samples for samples, _, _ in clips]).astype(np.int16)
    np.save(root / "shards" / "s.npy", data)
    entries, offset = [], 0
    for i, (samples, present, split) in enumerate(clips):
        entries.append(
            {
                "id": str(i),
                "split": split,
                "tags": list(present),
                "shard": "s.npy",
                "offset": offset,
                "length": len(samples),
            }
        )
        offset += len(samples)
    index = {
        "format": PREPARED_FORMAT,
        "version": PREPARED_VERSION,
        "sample_rate": rate,
        "tags": list(tags),
        "clips": entries,
    }
    (root / INDEX_NAME).write_text(json.dumps(index))
    return PreparedData(root)


class WindowMean(nn.Module):
    """Score = the window's mean sample: lets a test know what every window scores."""

    window_samples = 4
    default_hop_samples = 3
    n_tags = 1

    def forward(self, x):
        return x.mean(dim=1, keepdim=True)  # (B, 1)


def test_clip_score_is_the_mean_over_the_windows_on_the_hop_grid(tmp_path):
    ramp = (np.arange(11) * 1000).astype(np.int16)  # windows at 0, 3, 6; 9-10 not scored
    short = np.full(2, 16384, dtype=np.int16)  # one window, zero-padded
    data = make_prepared(tmp_path, [(ramp, (0,), "test"), (short, (0,), "test")], tags=("x",))
    scores = predict_clips(WindowMean(), data, [0, 1], batch_size=2)
    starts = [0, 3, 6]
    expected = np.mean([(ramp[s : s + 4] / 32768.0).mean() for s in starts])
    assert scores[0, 0] == pytest.approx(expected, rel=1e-6)
    assert scores[1, 0] == pytest.approx(0.5 * 2 / 4, rel=1e-6)
    # batching across clips does not change a clip's score
    assert np.allclose(predict_clips(WindowMean(), data, [0, 1], batch_size=1), scores)
    # another hop, as `tagd tag --hop` would use
    by_two = predict_clips(WindowMean(), data, [0], hop_samples=2)
    assert by_two[0, 0] == pytest.approx(
        np.mean([(ramp[s : s + 4] / 32768.0).mean() for s in (0, 2, 4, 6)]), rel=1e-6
    )


def test_a_clip_too_short_to_score_is_a_clear_error(tmp_path):
    data = make_prepared(tmp_path, [(np.ones(3, dtype=np.int16), (0,), "test")], tags=("x",))
    model = WindowMean()
    model.window_samples, model.arch, model.sample_rate = 40, "tiny", 10
    with pytest.raises(
        DataError, match="clip 0 .* is too short for tiny: 0.30 s, the least it scores is 1.00 s"
    ):
        predict_clips(model, data, [0])


def test_macro_and_frequency_weighted_auc():
    labels = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]])
    scores = np.array(
        [[0.9, 0.2, 0.1], [0.8, 0.3, 0.2], [0.1, 0.4, 0.3], [0.2, 0.1, 0.4], [0.7, 0.5, 0.5]]
    )
    results = tag_metrics(labels, scores, ["a", "b", "c"])
    auc_a = roc_auc_score(labels[:, 0], scores[:, 0])
    auc_b = roc_auc_score(labels[:, 1], scores[:, 1])
    summary = summarise(results)
    assert np.isnan(results[2].roc_auc)  # "c" has no positive clip: no AUC
    assert summary["tags_without_auc"] == ["c"] and summary["tags_scored"] == 2
    assert summary["roc_auc_macro"] == pytest.approx((auc_a + auc_b) / 2)
    assert summary["roc_auc_weighted"] == pytest.approx((3 * auc_a + 2 * auc_b) / 5)
    assert auc_a == 1.0 and summary["roc_auc_weighted"] > summary["roc_auc_macro"]


def test_thresholds_maximise_f1():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 3)) < 0.3).astype(float)
    scores = np.clip(labels * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    thresholds = choose_thresholds(labels, scores)
    best = f1_at(labels, scores, thresholds)
    for cut in np.linspace(0, 1, 101):
        assert np.all(f1_at(labels, scores, [cut] * 3) <= best + 1e-9)
    assert choose_thresholds(np.zeros((5, 1)), rng.random((5, 1))) == [0.5]


@pytest.fixture
def tiny_data(tmp_path):
    """Clips whose level says their tag: loud → "x", quiet → "y"; 22,050 Hz."""
    rng = np.random.default_rng(1)
    clips = []
    for i in range(24):
        loud = i % 2 == 0
        samples = (rng.standard_normal(300) * (8000 if loud else 500)).astype(np.int16)
        clips.append((samples, (0,) if loud else (1,), ["train", "valid", "test"][i % 3]))
    return make_prepared(tmp_path / "data", clips)


def test_report_files_and_card_update(tiny_data, tmp_path):
    torch.manual_seed(0)
    model = create_model("samplecnn", 2, width=0.125, n=3)  # 81-sample windows
    card = card_for_model(model, name="tiny", tags=tiny_data.tags)
    checkpoint = tmp_path / "run" / "best.pt"
    save_checkpoint(
        checkpoint,
        {
            "arch": model.arch,
            "hparams": model.hparams,
            "n_tags": 2,
            "tags": tiny_data.tags,
            "state_dict": model.state_dict(),
            "card": card.to_dict(),
        },
    )
    (tmp_path / "run" / "log.csv").write_text(
        "epoch,lr,train_loss,valid_loss,valid_roc_auc,valid_pr_auc,seconds,examples_per_second\n"
        "1,0.01,0.7,0.69,0.6,0.5,1.0,10\n2,0.01,0.6,0.65,0.7,0.6,1.0,10\n"
    )
    evaluation, files, new_card = evaluate_checkpoint(checkpoint, tiny_data.root, progress=False)

    assert evaluation.summary["clips"] == 8
    for key in ("metrics", "per_tag", "tag_auc_plot", "roc_plot", "curves_plot", "report", "card"):
        assert files[key].is_file() and files[key].stat().st_size > 0, key
    assert files["tag_auc_plot"].read_bytes()[:4] == b"\x89PNG"
    report = files["report"].read_text()
    assert "macro ROC-AUC" in report and "| x |" in report and "training_curves.png" in report

    # thresholds come from valid, scores from test; both land in the checkpoint's card
    valid = tiny_data.indices("valid")
    valid_scores = predict_clips(model.eval(), tiny_data, valid)
    assert new_card.thresholds == pytest.approx(
        choose_thresholds(tiny_data.label_matrix(valid), valid_scores)
    )
    stored = load_checkpoint(checkpoint)["card"]
    assert stored["thresholds"] == new_card.thresholds
    assert stored["scores"]["test"]["roc_auc_macro"] == pytest.approx(
        evaluation.summary["roc_auc_macro"], abs=1e-4
    )
    assert set(stored["scores"]["test"]["roc_auc_per_tag"]) == {"x", "y"}


def test_evaluate_refuses_a_model_with_other_tags(tiny_data):
    model = create_model("samplecnn", 3, width=0.125, n=3)
    with pytest.raises(ValueError, match="outputs 3 tags, not the 2"):
        evaluate_model(model, tiny_data)
    with pytest.raises(ValueError, match="none of the model's tags"):
        evaluate_model(model, tiny_data, tags=["p", "q", "r"])


def test_write_outputs_with_chosen_roc_tags(tiny_data, tmp_path):
    model = create_model("samplecnn", 2, width=0.125, n=3)
    evaluation = evaluate_model(model, tiny_data)
    files = write_outputs(evaluation, tmp_path / "out", title="t", roc_tags=["y"])
    assert files["roc_plot"].is_file() and "curves_plot" not in files
    with pytest.raises(ValueError, match="unknown tags"):
        write_outputs(evaluation, tmp_path / "out2", title="t", roc_tags=["nope"])


def test_evaluation_scores_each_clip_as_tagd_tag_prints_it(tmp_path, music):
    """One windowing rule: a clip shorter than a window, one window long, and several."""
    import soundfile

    from tagd.engines import load_engine
    from tagd.tagfile import tag_file
    from trainer.data.manifest import load_manifest, write_manifest
    from trainer.data.prepare import prepare
    from trainer.export import export_onnx

    torch.manual_seed(0)
    model = create_model("samplecnn", 2, width=0.25, n=8)  # 19,683-sample windows
    rate, window = model.sample_rate, model.window_samples
    rows = []
    for i, length in enumerate((window // 2, window, 3 * window + 1234)):
        path = tmp_path / f"clip{i}.wav"
        soundfile.write(path, music(length / rate, rate, seed=i)[:length], rate, subtype="PCM_16")
        rows.append((path.name, ["x"] if i % 2 else ["y"], "test"))
    write_manifest(tmp_path / "manifest.csv", rows)
    prepare(
        load_manifest(tmp_path / "manifest.csv"),
        tmp_path / "prepared",
        rate,
        workers=1,
        progress=False,
    )
    data = PreparedData(tmp_path / "prepared")
    indices = data.indices("test")
    scores = predict_clips(model, data, indices)

    onnx = tmp_path / "model.onnx"
    export_onnx(model, onnx, tags=data.tags)
    engine = load_engine(onnx)
    for row, i in enumerate(indices):
        printed = tag_file(engine, tmp_path / Path(data.clips[i].clip_id).name)
        np.testing.assert_allclose(printed.scores, scores[row], atol=1e-4)
    windows = [tag_file(engine, tmp_path / f"clip{n}.wav").windows for n in range(3)]
    assert windows == [1, 1, 3]


class Constant(nn.Module):
    """Scores 0.9 for both tags of every window."""

    window_samples = 4
    default_hop_samples = 4
    n_tags = 2

    def forward(self, x):
        return torch.full((x.shape[0], 2), 0.9)


def test_the_shares_a_tag_is_on_for_count_the_cards_exclusions(tiny_data):
    def shares(excludes):
        evaluation = evaluate_model(
            Constant(),
            tiny_data,
            threshold_split="none",
            fallback_thresholds=[0.5, 0.5],
            excludes=excludes,
        )
        return [(r.tag, r.on_positives, r.on_negatives) for r in evaluation.per_tag]

    assert shares(None) == [("x", 1.0, 1.0), ("y", 1.0, 1.0)]
    # "y" is off while "x" is on, as tagd publishes it: never on here
    assert shares({"y": ["x"]}) == [("x", 1.0, 1.0), ("y", 0.0, 0.0)]


def test_evaluate_gives_a_card_written_before_exclusions_its_exclusions(tmp_path):
    rng = np.random.default_rng(2)
    clips = [
        ((rng.standard_normal(300) * 4000).astype(np.int16), (i % 2,), ["valid", "test"][i % 2])
        for i in range(12)
    ]
    data = make_prepared(tmp_path / "data", clips, tags=("speech", "instrumental"))
    model = create_model("samplecnn", 2, width=0.125, n=3)
    card = card_for_model(model, name="older", tags=data.tags)
    card.excludes = {}  # as cards were written before exclusions
    checkpoint = tmp_path / "best.pt"
    entries = {"arch": model.arch, "hparams": model.hparams, "n_tags": 2, "tags": data.tags}
    save_checkpoint(
        checkpoint, {**entries, "state_dict": model.state_dict(), "card": card.to_dict()}
    )
    _, _, new_card = evaluate_checkpoint(checkpoint, data.root, progress=False)
    assert new_card.excludes == {"instrumental": ["speech"]}
    assert load_checkpoint(checkpoint)["card"]["excludes"] == {"instrumental": ["speech"]}
