"""Training: a tiny SampleCNN learns the synthetic tags; checkpoints, resume, schedule, fine-tuning."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from trainer_support import N_TAGS, TINY, one_torch_thread, synthetic_prepared

from tagd.engines.torch import TorchEngine
from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.data import synthetic
from trainer.data.dataset import DataError, PreparedData
from trainer.data.manifest import load_manifest
from trainer.data.prepare import prepare
from trainer.evaluate import evaluate_checkpoint
from trainer.finetune import block_names, parameter_groups, replace_head
from trainer.models import create_model
from trainer.train import (
    COVER,
    RECIPES,
    TrainConfig,
    autocast_dtype,
    check_precision,
    crops_per_clip,
    train,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
assert one_torch_thread  # imported for pytest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedData:
    return synthetic_prepared(tmp_path_factory.mktemp("synthetic"), 240)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """The tiny model trained once for this module (~10 s)."""
    config = TrainConfig(
        data=str(prepared.root),
        out=str(tmp_path_factory.mktemp("run")),
        model="samplecnn",
        hparams=TINY,
        optimizer="adam",  # converges in far fewer steps than the paper's SGD on this toy set
        lr=3e-3,
        epochs=16,
        crops_per_clip=2,
        progress=False,
    )
    return train(config)


def tiny_config(prepared, out, **overrides) -> TrainConfig:
    values = dict(
        data=str(prepared.root),
        out=str(out),
        model="samplecnn",
        hparams=TINY,
        epochs=2,
        progress=False,
        batch_size=16,
        crops_per_clip=1,  # the recipe's "cover" is 4 of the tiny model's windows a clip
    )
    return TrainConfig(**{**values, **overrides})


def test_tiny_model_learns_the_synthetic_tags(trained, prepared):
    evaluation, _, card = evaluate_checkpoint(trained.best_path, prepared.root, progress=False)
    print(
        f"held-out macro ROC-AUC {evaluation.summary['roc_auc_macro']:.4f} (validation {trained.best_roc_auc:.4f})"
    )
    assert evaluation.summary["clips"] >= 40
    assert evaluation.summary["roc_auc_macro"] >= 0.9
    assert card.scores["test"]["roc_auc_macro"] >= 0.9
    assert card.scores["valid"]["roc_auc_macro"] == pytest.approx(trained.best_roc_auc, abs=1e-4)


def test_checkpoint_loads_weights_only_and_rebuilds_the_model(trained, prepared):
    raw = torch.load(trained.best_path, map_location="cpu", weights_only=True)
    assert {"card", "arch", "hparams", "n_tags", "state_dict", "tags"} <= set(raw)
    assert raw["tags"] == prepared.tags and raw["card"]["tags"] == prepared.tags
    card = raw["card"]
    assert card["sample_rate"] == 22_050 and card["window_samples"] == 3**9
    assert card["training"]["best_epoch"] == trained.best_epoch
    assert len(card["thresholds"]) == N_TAGS and card["thresholds"] != [0.5] * N_TAGS
    rebuilt = create_model(raw["arch"], raw["n_tags"], **raw["hparams"])
    rebuilt.load_state_dict(raw["state_dict"])
    engine = TorchEngine.load(trained.best_path)  # the daemon's torch backend takes it as is
    assert engine.card.tags == prepared.tags
    assert engine.run(np.zeros((2, 3**9), dtype=np.float32)).shape == (2, N_TAGS)

    with (trained.run_dir / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == trained.epochs_run
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (
        json.loads((trained.run_dir / "config.json").read_text())["resolved"]["optimizer"] == "adam"
    )


def test_resumed_run_ends_with_the_same_weights(prepared, tmp_path):
    # An interrupted run is simulated by a shorter one, so the schedule must not depend on
    # the epochs asked for: plateau here. (Cosine's rate is a function of epoch, step and
    # epochs alone; it carries no state.)
    straight = train(tiny_config(prepared, tmp_path / "straight", epochs=2, schedule="plateau"))
    train(tiny_config(prepared, tmp_path / "split", epochs=1, schedule="plateau"))
    resumed = train(
        tiny_config(prepared, tmp_path / "split", epochs=2, resume=True, schedule="plateau")
    )
    assert resumed.epochs_run == 2 and len(resumed.history) == 2
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(ValueError, match="resume with the options it was started with"):
        train(
            tiny_config(
                prepared, tmp_path / "split", epochs=3, resume=True, hparams={**TINY, "width": 0.25}
            )
        )


def test_plateau_schedule_drops_the_rate_then_stops(prepared, tmp_path):
    # lr 0: nothing learns, validation loss stalls every epoch
    result = train(
        tiny_config(
            prepared, tmp_path, epochs=10, lr=0.0, patience=1, max_lr_drops=1, schedule="plateau"
        )
    )
    assert result.epochs_run == 3  # 1 sets the best loss, 2 stalls → drop, 3 stalls → stop
    assert load_checkpoint(result.last_path)["train_state"]["lr_drops"] == 1


def test_named_recipes_follow_the_papers():
    sample_level = RECIPES["lee2017"]
    assert (sample_level.optimizer, sample_level.lr, sample_level.batch_size) == ("sgd", 0.01, 23)
    assert (sample_level.lr_factor, sample_level.patience, sample_level.max_lr_drops) == (0.2, 3, 4)
    choi = RECIPES["choi2016"]
    assert choi.optimizer == "adam" and dict(choi.model_hparams)["dropout"] == 0.5
    assert choi.turns == sample_level.turns == 0.0  # the papers trained on whole clips


def test_lee2017_recipe_uses_nesterov_sgd(prepared, tmp_path):
    result = train(tiny_config(prepared, tmp_path, epochs=1, batch_size=None, recipe="lee2017"))
    last = load_checkpoint(result.last_path)
    group = last["optimizer"]["param_groups"][0]
    assert group["nesterov"] is True and group["momentum"] == 0.9 and group["lr"] == 0.01


def test_choi2016_recipe_puts_dropout_after_every_pool_unless_overridden():
    from trainer.models.fcn import FCNConfig
    from trainer.train import model_hparams

    assert (FCNConfig().dropout, FCNConfig().head_dropout) == (0.0, 0.5)  # the default recipe's
    papers = create_model("fcn5", 3, **model_hparams("choi2016", {"width": 0.125}))
    assert papers.config.dropout == 0.5 and papers.config.head_dropout == 0.0
    assert model_hparams("choi2016", {"dropout": 0.2})["dropout"] == 0.2
    assert model_hparams("fcn", {"width": 0.5}) == {"width": 0.5}


def test_cosine_schedule_decays_from_one_to_zero():
    from trainer.train import cosine_factor

    assert cosine_factor(0.0) == pytest.approx(1.0) and cosine_factor(0.5) == pytest.approx(0.5)
    assert cosine_factor(1.0) == pytest.approx(0.0, abs=1e-12)
    values = [cosine_factor(p / 100) for p in range(101)]
    assert values == sorted(values, reverse=True)


def test_default_recipe_decays_the_rate_over_the_epochs_asked_for(prepared, tmp_path):
    result = train(tiny_config(prepared, tmp_path, epochs=2))
    assert result.examples_per_epoch == len(prepared.indices("train"))  # one crop, no floor
    rates = [row["lr"] for row in result.history]
    assert RECIPES["samplecnn"].schedule == "cosine"
    assert rates[0] > rates[1] > 0  # the log shows the rate at each epoch's end
    assert load_checkpoint(result.last_path)["config"]["recipe"] == "samplecnn"


def test_samplecnn_covers_each_clip_once_an_epoch(prepared):
    assert RECIPES["samplecnn"].crops_per_clip == COVER and RECIPES["fcn"].crops_per_clip == 1
    window = create_model("samplecnn", N_TAGS, **TINY).window_samples  # 3^9 = 19,683
    train_idx = prepared.indices("train")
    median = np.median([prepared.clips[i].length for i in train_idx])
    assert crops_per_clip(COVER, prepared, train_idx, window) == round(median / window) == 4
    assert crops_per_clip(2, prepared, train_idx, window) == 2
    for bad in (0, -1, "all", 1.5):
        with pytest.raises(ValueError, match="crops_per_clip must be"):
            crops_per_clip(bad, prepared, train_idx, window)


def test_a_small_training_set_shows_each_clip_more_than_once_an_epoch(prepared):
    assert RECIPES["fcn"].min_epoch_examples == 512 and RECIPES["samplecnn"].min_epoch_examples == 0
    window = create_model("samplecnn", N_TAGS, **TINY).window_samples
    train_idx = prepared.indices("train")
    n = len(train_idx)
    assert crops_per_clip(1, prepared, train_idx, window, min_examples=3 * n) == 3
    assert crops_per_clip(1, prepared, train_idx, window, min_examples=3 * n - 1) == 3  # rounded up
    assert crops_per_clip(1, prepared, train_idx, window, min_examples=3 * n + 1) == 4
    assert crops_per_clip(5, prepared, train_idx, window, min_examples=3 * n) == 5  # a floor only
    assert crops_per_clip(COVER, prepared, train_idx, window, min_examples=n) == 4
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="min_epoch_examples must be"):
            crops_per_clip(1, prepared, train_idx, window, min_examples=bad)


def test_a_run_with_turns_trains_on_them_and_records_them(prepared, tmp_path):
    result = train(tiny_config(prepared, tmp_path / "turns", turns=0.5))
    config = json.loads((tmp_path / "turns" / "config.json").read_text())
    assert config["turns"] == 0.5 and config["resolved"]["turns"] == 0.5
    assert load_checkpoint(result.best_path)["config"]["turns"] == 0.5
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    plain = train(tiny_config(prepared, tmp_path / "plain"))
    # the same seed, windows and order: only the turns differ, and so does what it learnt
    assert [row["train_loss"] for row in result.history] != [
        row["train_loss"] for row in plain.history
    ]
    with pytest.raises(ValueError, match="turns is a probability"):
        train(tiny_config(prepared, tmp_path / "bad", turns=2.0))


def test_mixed_precision_only_where_it_is_safe():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("bf16", cpu) is None
    assert autocast_dtype("fp16", gpu) == torch.float16 and autocast_dtype("fp32", gpu) is None
    with pytest.raises(ValueError, match="use --precision bf16"):
        check_precision(create_model("fcn4", 3, width=0.0625), torch.float16)
    check_precision(create_model("samplecnn", 3, **TINY), torch.float16)
    check_precision(create_model("fcn4", 3, width=0.0625), torch.bfloat16)


def test_training_refuses_data_at_another_rate(prepared, tmp_path):
    with pytest.raises(DataError, match="12000 Hz"):
        train(tiny_config(prepared, tmp_path, model="fcn3", hparams={"width": 0.0625}))


def test_replace_head_keeps_rows_of_shared_tags():
    model = create_model("samplecnn", 3, **TINY)
    old_weight = model.head.weight.detach().clone()
    replace_head(model, ["rock", "pop", "jazz"], ["jazz", "jingle"])
    assert model.n_tags == 2 and model.head.out_features == 2
    assert torch.equal(model.head.weight[0], old_weight[2])
    rebuilt = create_model(model.arch, model.n_tags, **model.hparams)
    rebuilt.load_state_dict(model.state_dict())


def test_parameter_groups_freeze_and_set_rates():
    model = create_model("samplecnn", 3, **TINY)
    groups = parameter_groups(model, 1e-3, ["stem", "blocks.0"], {"blocks.1": 1e-5, "blocks": 1e-4})
    rate_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        if name.startswith(("stem.", "blocks.0.")):
            assert not parameter.requires_grad and id(parameter) not in rate_of
        elif name.startswith("blocks.1."):
            assert rate_of[id(parameter)] == 1e-5  # the longer prefix wins
        elif name.startswith("blocks."):
            assert rate_of[id(parameter)] == 1e-4
        else:
            assert rate_of[id(parameter)] == 1e-3
    with pytest.raises(ValueError, match="its blocks are: stem, blocks.0"):
        parameter_groups(model, 1e-3, ["block.0"], {})
    assert "head" in block_names(model)


def test_finetune_to_station_tags_keeps_frozen_blocks(trained, tmp_path):
    station_tags = ["bass", "melody", "harmony", "kick"]  # "bass" is shared with the source
    manifest = synthetic.write_manifest_dataset(
        tmp_path / "station", 60, seed=9, seconds=2.0, tags=station_tags
    )
    prepare(load_manifest(manifest), tmp_path / "prepared", 22_050, workers=1, progress=False)
    source = model_from_checkpoint(load_checkpoint(trained.best_path))
    config = TrainConfig(
        data=str(tmp_path / "prepared"),
        out=str(tmp_path / "run"),
        init_from=str(trained.best_path),
        freeze=["stem", "blocks.0", "blocks.1"],
        lr_groups={"blocks.2": 1e-5},
        epochs=2,
        progress=False,
    )
    result = train(config)
    tuned = result.model
    assert config.recipe == "finetune" and tuned.n_tags == 4
    before, after = source.state_dict(), tuned.state_dict()
    for key in before:
        if key.startswith(("stem.", "blocks.0.", "blocks.1.")):
            assert torch.equal(before[key], after[key]), key  # weights and BN statistics
    assert not torch.equal(before["blocks.3.conv.conv.weight"], after["blocks.3.conv.conv.weight"])
    card = load_checkpoint(result.best_path)["card"]
    assert card["tags"] == PreparedData(tmp_path / "prepared").tags
    assert card["training"]["init_from"] == str(trained.best_path)
    assert np.isfinite(result.best_roc_auc)


def test_every_recipe_override_reaches_the_resolved_run():
    overrides = dict(
        optimizer="sgd",
        epochs=3,
        batch_size=5,
        lr=0.5,
        patience=7,
        max_lr_drops=9,
        schedule="plateau",
        crop="loop",
        crops_per_clip=3,
        min_epoch_examples=0,
        turns=0.5,
    )
    resolved = TrainConfig(data="d", out="o", recipe="fcn", **overrides).resolved()
    assert {key: resolved[key] for key in overrides} == overrides
    assert TrainConfig(data="d", out="o", recipe="samplecnn").resolved()["schedule"] == "cosine"
    assert TrainConfig(data="d", out="o", recipe="fcn").resolved()["schedule"] == "plateau"
