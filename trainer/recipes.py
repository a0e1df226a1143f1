"""What a training run is asked to do: recipes, and the options that override them.

A ``Recipe`` is a set of training hyper-parameters (optimizer, learning rate, schedule,
windows an epoch); ``RECIPES`` names them, and the model registry names the one each model
trains with by default (``trainer.models.registry.default_recipe``), so a new family
brings its recipe here and its name there, and the training loop does not change.

A ``TrainConfig`` is one run: the recipe it starts from, the values that override the
recipe's, and how it runs (seed, device, resume). Each option lives once, as a field of
it: its name, type, default and help text. The fields made with ``option()`` are also
``tagd-train train`` and ``finetune`` options, which ``trainer.cli`` builds from them.

This module imports no torch, so that the command line starts fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("plateau", "cosine")
CROPS = ("plain", "loop")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COVER = "cover"  # crops_per_clip: as many windows as the median clip holds


@dataclass(frozen=True)
class Recipe:
    optimizer: str  # "adam" or "sgd" (Nesterov momentum)
    lr: float
    batch_size: int
    epochs: int  # at most
    # The plateau rule: when validation loss has not improved for `patience` epochs,
    # multiply the learning rate by `lr_factor`; after `max_lr_drops` drops, stop instead.
    patience: int
    lr_factor: float
    max_lr_drops: int
    momentum: float = 0.9
    weight_decay: float = 0.0
    # "plateau": the rule above. "cosine": a cosine decay to zero at the last epoch,
    # every step; no early stop.
    schedule: str = "plateau"
    crop: str = "plain"  # training windows: "plain" inside the clip, "loop" wrapping around
    # Random windows per clip an epoch; COVER: as many as the clips hold (median clip over
    # window, rounded), so that an epoch shows about all of the audio once.
    crops_per_clip: int | str = 1
    # At least this many examples an epoch: a smaller training set shows each clip more
    # than once an epoch (at a new random window each time), so that 25 epochs of a few
    # hundred clips are enough optimiser steps. 0: no minimum.
    min_epoch_examples: int = 0
    # The share of training windows that are turns: two clips joined at a random point,
    # each tag's target the share of the window its clip holds (trainer.train.CropDataset),
    # so that a window's score follows how much of it a tag fills. 0: whole-clip windows.
    turns: float = 0.0
    # Values for the model's hyper-parameters that the recipe is measured with; what the
    # user passes with --hparam wins.
    model_hparams: tuple[tuple[str, Any], ...] = ()


# The defaults ("fcn", "samplecnn") are chosen by measurement on rendered music with the
# narrow networks a CPU user trains (docs/training.md has the table, bench/quality.py
# reproduces it). The papers' settings stay as named recipes for reproducing them on MTT.
RECIPES: dict[str, Recipe] = {
    # Choi et al.'s optimiser and plateau rule with the model's own dropout: only before
    # the output layer (FCNConfig). Dropout 0.5 after every pool, the paper's, leaves a
    # narrow FCN on a few hundred clips at chance on timbre tags. A cosine decay over 25
    # epochs learnt less than the plateau rule's constant rate (docs/training.md). At
    # least 512 examples an epoch (32 batches): 280 clips shown once an epoch are 17 steps,
    # and 25 such epochs left the network still learning. Half the windows are turns: the
    # speech score then follows the share of the window speech fills, and a timeline's
    # edges land nearer the truth, at the same held-out scores (docs/timeline.md).
    "fcn": Recipe(
        "adam",
        lr=1e-3,
        batch_size=16,
        epochs=100,
        patience=5,
        lr_factor=0.2,
        max_lr_drops=2,
        min_epoch_examples=512,
        turns=0.5,
    ),
    # Adam with a cosine decay: the paper's SGD at lr 0.01 barely moves a narrow SampleCNN
    # in 25 epochs of a few hundred clips. Each epoch covers the clips (about 11 windows of
    # 2.68 s a 29.1 s clip), as Lee et al. trained on every segment: one random window a
    # clip shows a tenth of the audio an epoch.
    "samplecnn": Recipe(
        "adam",
        lr=3e-3,
        batch_size=23,
        epochs=100,
        patience=3,
        lr_factor=0.2,
        max_lr_drops=4,
        schedule="cosine",
        crops_per_clip=COVER,
    ),
    # Choi et al. 2016: Adam, binary cross-entropy, dropout 0.5 after every pool. The
    # paper gives no schedule; we stop once validation loss has stalled 5 epochs after
    # two drops.
    "choi2016": Recipe(
        "adam",
        lr=1e-3,
        batch_size=16,
        epochs=100,
        patience=5,
        lr_factor=0.2,
        max_lr_drops=2,
        model_hparams=(("dropout", 0.5), ("head_dropout", 0.0)),
    ),
    # Lee et al. 2017: SGD, Nesterov momentum 0.9, lr 0.01, x0.2 when validation loss
    # stalls 3 epochs, four times in all, batch 23.
    "lee2017": Recipe(
        "sgd", lr=0.01, batch_size=23, epochs=100, patience=3, lr_factor=0.2, max_lr_drops=4
    ),
    # Sankaran 2017, target task: Adam from trained weights, small learning rates (1e-4 for
    # the top, 1e-5 for early blocks via lr_groups), dropped x0.1 on plateaus.
    "finetune": Recipe(
        "adam", lr=1e-4, batch_size=16, epochs=50, patience=3, lr_factor=0.1, max_lr_drops=2
    ),
}
FINETUNE = "finetune"  # the recipe of a run that starts from a trained checkpoint


def model_hparams(recipe: str, given: dict[str, Any]) -> dict[str, Any]:
    """The recipe's model settings (choi2016's dropout, say), overridden by the user's."""
    return {**dict(RECIPES[recipe].model_hparams), **given}


def option(
    help: str,
    *,
    default: Any = MISSING,
    factory: Any = MISSING,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    minimum: int | None = None,
) -> Any:
    """A TrainConfig field that is also a command-line option.

    ``help`` is its help text; the option is ``--`` and the field's name with dashes
    unless ``flag`` spells it otherwise; ``choices``, ``metavar`` and ``minimum`` are
    passed on to the option. A field without a default is a required option.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "metavar": metavar,
        "minimum": minimum,
    }
    return field(default=default, default_factory=factory, metadata=metadata)


@dataclass
class TrainConfig:
    """One training run; ``tagd-train train --help`` lists the options it is made of.

    A field named as a ``Recipe`` field overrides the recipe's value unless it is None
    (``resolved()``). A checkpoint stores ``dataclasses.asdict`` of it, so every value is
    a plain string, number, list or dict.
    """

    data: str  # a prepared folder (tagd-train prepare): the command's DATA_DIR
    out: str = option("Run folder.", metavar="PATH")
    model: str = "fcn4"  # registry name (--model); ignored when init_from gives the architecture
    hparams: dict[str, Any] = field(default_factory=dict)  # --hparam, e.g. {"width": 0.5}
    name: str | None = option(
        "Model card name (default: <arch>-<kind of data>, e.g. fcn4-magnatagatune).",
        default=None,
    )
    recipe: str | None = option(
        "Default: the model's (fcn or samplecnn by family, `tagd-train models`); choi2016 "
        "and lee2017 are the papers' settings; finetune when starting from a checkpoint "
        "(docs/training.md).",
        default=None,
        choices=tuple(RECIPES),
    )
    # The recipe's values, overridden where not None.
    optimizer: str | None = option("Override the recipe's.", default=None, choices=OPTIMIZERS)
    epochs: int | None = option(
        "At most this many epochs (the plateau rule may stop earlier); override the recipe's.",
        default=None,
    )
    batch_size: int | None = option(
        "Examples a step, a GPU's under torchrun; override the recipe's.", default=None
    )
    lr: float | None = option("Learning rate; override the recipe's.", default=None)
    patience: int | None = option(
        "Epochs of stalled validation loss before a lr drop.", default=None
    )
    max_lr_drops: int | None = option("Stop at the next stall after this many drops.", default=None)
    schedule: str | None = option(
        "Learning-rate schedule; override the recipe's.", default=None, choices=SCHEDULES
    )
    crops_per_clip: int | str | None = option(
        "Random windows per training clip an epoch, or 'cover' (median clip over the "
        "window: all the audio about once an epoch); default: the recipe's (samplecnn "
        "covers, the rest take 1).",
        default=None,
    )
    min_epoch_examples: int | None = option(
        "At least N examples an epoch: a smaller training set shows each clip more than "
        "once an epoch; 0 for none; default: the recipe's (fcn 512, the rest 0).",
        default=None,
        metavar="N",
        minimum=0,
    )
    crop: str | None = option(
        "Training windows: plain (inside the clip) or loop (anywhere, wrapping around its "
        "end); override the recipe's.",
        default=None,
        choices=CROPS,
    )
    turns: float | None = option(
        "Probability that a training window is a turn: two clips joined at a random point, "
        "each tag's target its clip's share of the window (so that scores follow how much "
        "of a window a tag fills, for timelines); default: the recipe's.",
        default=None,
        metavar="P",
    )
    # How the run goes.
    seed: int = option(
        "Seeds the weights, the windows and their order: the same seed and data repeat a "
        "run on CPU.",
        default=0,
    )
    precision: str = option(
        "auto: bf16 autocast on GPUs that have it, else fp32; fp16 is refused for FCN; "
        "CPU always runs fp32.",
        default="auto",
        choices=PRECISIONS,
    )
    device: str = option("auto, cpu, cuda or cuda:N.", default="auto")
    workers: int | None = option("Data loader workers (default: 0 on CPU, 4 on GPU).", default=None)
    eval_hop: int | None = None  # validation window hop in samples; None: the model's
    resume: bool = option("Continue from OUT/last.pt.", default=False)
    # transfer learning (Sankaran 2017): start from a trained checkpoint (--from-checkpoint)
    init_from: str | None = None
    freeze: list[str] = option("Keep these blocks fixed (repeat).", factory=list, metavar="PREFIX")
    lr_groups: dict[str, float] = option(
        "Learning rate per block (repeat).", factory=dict, flag="--lr-group", metavar="PREFIX=LR"
    )
    progress: bool = option("No progress bars.", default=True, flag="--no-progress")
    tensorboard: bool = True  # when the tensorboard package is installed

    def resolved(self) -> dict[str, Any]:
        """The recipe's values with this config's overrides: what the run actually uses."""
        values = dataclasses.asdict(RECIPES[self.recipe])
        for key in values:
            override = getattr(self, key, None)
            if override is not None:
                values[key] = override
        return values
