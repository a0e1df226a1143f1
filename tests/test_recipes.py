"""Recipes: the model registry names each model's, and TrainConfig's options resolve them."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from trainer.models import list_models, registry
from trainer.recipes import RECIPES, TrainConfig
from trainer.train import build_model


def test_every_model_trains_with_a_recipe_its_registry_entry_names():
    for name in list_models():
        assert registry.default_recipe(name) in RECIPES, name
    assert registry.default_recipe("fcn4") == "fcn"
    assert registry.default_recipe("samplecnn-rese-ml") == "samplecnn"
    with pytest.raises(ValueError, match="unknown model 'fcn99'; known models: fcn3"):
        registry.default_recipe("fcn99")


def test_a_new_family_brings_its_recipe_by_registry_not_by_name(monkeypatch):
    # named like an FCN, registered as a SampleCNN that trains with the papers' SGD
    entry = dataclasses.replace(registry._ZOO["samplecnn"], recipe="lee2017")
    monkeypatch.setitem(registry._ZOO, "fcn-like", entry)
    config = TrainConfig(data="d", out="o", model="fcn-like", hparams={"width": 0.125, "n": 3})
    model = build_model(config, SimpleNamespace(n_tags=3, tags=["a", "b", "c"]))
    assert model.arch == "fcn-like" and config.recipe == "lee2017"
    assert config.resolved()["optimizer"] == "sgd"
    asked = TrainConfig(data="d", out="o", model="fcn-like", recipe="fcn", hparams=config.hparams)
    build_model(asked, SimpleNamespace(n_tags=3, tags=["a", "b", "c"]))
    assert asked.recipe == "fcn"  # --recipe wins over the registry's


def test_unknown_recipe_is_refused_with_the_known_ones():
    config = TrainConfig(data="d", out="o", model="fcn4", recipe="adamw")
    with pytest.raises(ValueError, match="unknown recipe 'adamw'; known: fcn, samplecnn"):
        build_model(config, SimpleNamespace(n_tags=3, tags=["a", "b", "c"]))


def test_a_resolved_config_is_plain_json():
    # checkpoints store the config and torch.load(weights_only=True) reads only plain values
    config = TrainConfig(data="d", out="o", recipe="choi2016", lr_groups={"blocks.0": 1e-5})
    assert json.loads(json.dumps(dataclasses.asdict(config)))["lr_groups"] == {"blocks.0": 1e-5}
    resolved = json.loads(json.dumps(config.resolved()))
    assert resolved["model_hparams"] == [["dropout", 0.5], ["head_dropout", 0.0]]
