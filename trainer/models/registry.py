"""The model zoo by name: ``create_model("fcn4")``, ``list_models()``.

Each name is a model class, its config class, a preset of config values and the recipe
it trains with by default (a ``trainer.recipes.RECIPES`` name). A preset's
*identity* keys (which block a SampleCNN uses, whether its head is multi-level) are what
the name means, so hparams may repeat them but not change them; every other config field
is a hyper-parameter and may be overridden.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trainer.models.base import TaggerModel
from trainer.models.fcn import FCN, FCN_PRESETS, FCNConfig
from trainer.models.samplecnn import SAMPLECNN_PRESETS, SampleCNN, SampleCNNConfig


@dataclass(frozen=True)
class ZooEntry:
    model_class: type[TaggerModel]
    config_class: type
    preset: dict[str, Any]
    recipe: str  # what `tagd-train train` trains it with unless --recipe says otherwise
    identity: frozenset[str] = field(default_factory=frozenset)


_ZOO: dict[str, ZooEntry] = {
    **{name: ZooEntry(FCN, FCNConfig, preset, "fcn") for name, preset in FCN_PRESETS.items()},
    **{
        name: ZooEntry(
            SampleCNN, SampleCNNConfig, preset, "samplecnn", frozenset(("block", "multi_level"))
        )
        for name, preset in SAMPLECNN_PRESETS.items()
    },
}


def list_models() -> list[str]:
    return sorted(_ZOO)


def default_recipe(name: str) -> str:
    """The recipe that trains model ``name`` unless one is asked for."""
    return _entry(name).recipe


def _entry(name: str) -> ZooEntry:
    try:
        return _ZOO[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def create_model(name: str, n_tags: int = 50, **hparams: Any) -> TaggerModel:
    """Build a fresh (untrained) model by registry name.

    ``hparams`` override the preset's config fields, e.g. ``width=0.25``;
    ``create_model(m.arch, m.n_tags, **m.hparams)`` rebuilds ``m``'s network.
    """
    entry = _entry(name)
    if not isinstance(n_tags, int) or n_tags < 1:
        raise ValueError(f"n_tags must be a positive integer, got {n_tags!r}")
    known = {f.name for f in dataclasses.fields(entry.config_class)} - {"n_tags"}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ValueError(
            f"{name}: unknown hyper-parameters {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    for key in entry.identity & set(hparams):
        if hparams[key] != entry.preset[key]:
            raise ValueError(
                f"{name} means {key}={entry.preset[key]!r}; pick the model name for "
                f"{key}={hparams[key]!r} instead (see list_models())"
            )
    config = entry.config_class(**{**entry.preset, **hparams, "n_tags": n_tags})
    return entry.model_class(config, arch=name)
