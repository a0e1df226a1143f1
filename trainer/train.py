"""The training loop: one function, ``train``, readable top to bottom.

A ``TrainConfig`` (trainer.recipes) names a recipe, by default the one the model registry
gives the model, and may override any of its values. One run writes to its folder:

    config.json   the resolved configuration
    log.csv       one row per epoch (losses, validation AUC, learning rate, speed)
    last.pt       everything to resume: weights, optimizer, scheduler and RNG state
    best.pt       the weights with the best validation ROC-AUC, with a model card
                  (validation scores and max-F1 thresholds) ready for ``tagd-train export``

Under ``torchrun`` the same function trains on every GPU with DistributedDataParallel:
each rank sees its share of the clips (DistributedSampler), rank 0 validates and writes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from trainer.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from trainer.data.dataset import DataError, PreparedData, crop, looped_crop, random_starts
from trainer.evaluate import (
    bce,
    choose_thresholds,
    predict_clips,
    resolve_device,
    summarise,
    tag_metrics,
)
from trainer.export import card_for_model
from trainer.finetune import parameter_groups, replace_head, set_frozen_batchnorm_eval
from trainer.models import TaggerModel, create_model
from trainer.models.frontend import LogMel
from trainer.models.registry import default_recipe
from trainer.recipes import (
    COVER,
    CROPS,
    FINETUNE,
    OPTIMIZERS,
    RECIPES,
    SCHEDULES,
    TrainConfig,
    model_hparams,
)

log = logging.getLogger(__name__)

LAST_NAME, BEST_NAME, LOG_NAME, CONFIG_NAME = "last.pt", "best.pt", "log.csv", "config.json"
MIN_LOSS_IMPROVEMENT = 1e-4  # a smaller drop in validation loss counts as a stall
LOG_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "valid_loss",
    "valid_roc_auc",
    "valid_pr_auc",
    "seconds",
    "examples_per_second",
)


@dataclass
class TrainResult:
    run_dir: Path
    best_path: Path
    last_path: Path
    best_epoch: int
    best_roc_auc: float
    epochs_run: int
    examples_per_epoch: int  # training windows an epoch, all ranks
    history: list[dict[str, Any]]
    model: TaggerModel  # the final weights (not the best), unwrapped


# -- data -----------------------------------------------------------------------------------------
TURN_CROSSFADE_SECONDS = 0.025  # the join of a turn window: short enough not to blur its share
TURN_STREAM = 1  # the turns' generator is (seed, epoch, TURN_STREAM): plain windows stay as before


class CropDataset(Dataset):
    """Training examples: one random window per clip per visit, label = the clip's tags.

    Crop starts are drawn per epoch from ``(seed, epoch)``, so every rank and every
    resumed run cuts the same windows, whatever the number of loader workers. With
    ``loop``, a window may start anywhere and wrap around the clip's end
    (``looped_crop``); else it lies inside the clip, zero-padded past a short one.

    With ``turns`` (a probability), that share of the windows is a turn instead: the
    clip's audio up to a random join, then another random training clip's, crossfaded
    over ``TURN_CROSSFADE_SECONDS`` centred on the join, and each tag's target the
    share-weighted mix ``f * y_a + (1 - f) * y_b`` (f: the first clip's share of the
    window, exact under the symmetric fade). A tag either clip leaves unknown is unknown
    (NaN). Whole-clip labels teach a window's score to saturate once a tag fills part of
    it; turns teach it to follow the share, which is what places a segment's edge
    (docs/timeline.md). Turns are drawn from a generator of their own, ``(seed, epoch,
    TURN_STREAM)``, so the plain windows are those of a run without turns.
    """

    def __init__(
        self,
        data: PreparedData,
        indices: list[int],
        window_samples: int,
        crops_per_clip: int,
        seed: int,
        loop: bool = False,
        turns: float = 0.0,
    ):
        check_turns(turns)
        self.data = data
        self.indices = indices
        self.window_samples = window_samples
        self.crops_per_clip = crops_per_clip
        self.seed = seed
        self.loop = loop
        self.turns = turns
        # the fade fits a quarter of the window whatever its size (SampleCNN's can be tiny)
        fade = round(TURN_CROSSFADE_SECONDS * data.sample_rate / 2)
        self.half_fade = max(1, min(fade, window_samples // 4))
        self.lengths = np.array([data.clips[i].length for i in indices])
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        lengths = np.tile(self.lengths, self.crops_per_clip)
        self.starts = self._starts(lengths, self.window_samples, rng)
        # A turn: the item's clip for `join` samples (and half the fade past them), then
        # clip `partner`'s; partner -1 is a plain window.
        rng = np.random.default_rng([self.seed, epoch, TURN_STREAM])
        n, fade = len(lengths), self.half_fade
        turned = rng.random(n) < self.turns
        self.partner = np.where(turned, rng.integers(len(self.indices), size=n), -1)
        self.join = rng.integers(fade, self.window_samples - fade, size=n, endpoint=True)
        first, second = self.join + fade, self.window_samples - self.join + fade
        self.first_starts = self._starts(lengths, first, rng)
        partner_lengths = self.lengths[np.maximum(self.partner, 0)]
        self.second_starts = self._starts(partner_lengths, second, rng)

    def _starts(self, lengths: np.ndarray, pieces, rng: np.random.Generator) -> np.ndarray:
        """Uniformly random starts of pieces of ``pieces`` samples (a number or one a clip)."""
        if self.loop:
            return np.floor(rng.random(len(lengths)) * np.maximum(lengths, pieces)).astype(np.int64)
        return random_starts(lengths, pieces, rng)

    def __len__(self) -> int:
        return len(self.indices) * self.crops_per_clip

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        clip = self.indices[item % len(self.indices)]
        if self.partner[item] >= 0:
            return self._turn(item, clip, self.indices[self.partner[item]])
        window = self._cut(clip, int(self.starts[item]), self.window_samples)
        return torch.from_numpy(window), torch.from_numpy(self.data.labels(clip))

    def _cut(self, clip: int, start: int, samples: int) -> np.ndarray:
        cut = looped_crop if self.loop else crop
        return cut(self.data.audio(clip), start, samples)

    def _turn(self, item: int, first: int, second: int) -> tuple[torch.Tensor, torch.Tensor]:
        join, fade = int(self.join[item]), self.half_fade
        head = self._cut(first, int(self.first_starts[item]), join + fade)
        tail = self._cut(second, int(self.second_starts[item]), self.window_samples - join + fade)
        rise = (np.arange(2 * fade, dtype=np.float32) + 0.5) / (2 * fade)  # sums to `fade`
        window = np.concatenate(
            [
                head[: join - fade],
                head[join - fade :] * (1 - rise) + tail[: 2 * fade] * rise,
                tail[2 * fade :],
            ]
        )  # (window_samples,)
        share = join / self.window_samples
        target = share * self.data.labels(first) + (1 - share) * self.data.labels(second)
        return torch.from_numpy(window), torch.from_numpy(target.astype(np.float32))


def crops_per_clip(
    asked: int | str,
    data: PreparedData,
    indices: list[int],
    window_samples: int,
    min_examples: int = 0,
) -> int:
    """Windows per training clip an epoch: ``asked``, or for COVER the median training
    clip's length over the window, rounded (at least 1); raised until an epoch holds at
    least ``min_examples``."""
    if asked == COVER:
        median = float(np.median([data.clips[i].length for i in indices]))
        crops = max(1, round(median / window_samples))
        log.info(
            "%d crops a clip an epoch: the median clip (%.1f windows) covered once",
            crops,
            median / window_samples,
        )
    elif not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
        raise ValueError(f"crops_per_clip must be a whole number ≥ 1 or {COVER!r}, got {asked!r}")
    else:
        crops = asked
    if isinstance(min_examples, bool) or not isinstance(min_examples, int) or min_examples < 0:
        raise ValueError(f"min_epoch_examples must be a whole number ≥ 0, got {min_examples!r}")
    if indices and crops * len(indices) < min_examples:
        crops = -(-min_examples // len(indices))
        log.info(
            "%d crops a clip an epoch: %d training clips, at least %d examples an epoch",
            crops,
            len(indices),
            min_examples,
        )
    return crops


# -- distributed and devices -----------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, ranks: Ranks) -> torch.device:
    device = resolve_device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for but torch sees no GPU; use --device cpu")
        if ranks.distributed:
            device = torch.device("cuda", ranks.local_rank)  # torchrun: one GPU per process
        torch.cuda.set_device(device)
    return device


def start_distributed(device_request: str) -> tuple[Ranks, bool]:
    """Join the torchrun process group if there is one; (ranks, whether we started it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks(), False
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return ranks, False
    use_cuda = device_request != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return ranks, True


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on GPUs (CPU autocast is slower than fp32 for these convs).

    "auto" is bf16 where the GPU has it and fp32 elsewhere, never fp16: bf16 keeps
    float32's range, fp16 needs a gradient scaler and overflows a log-mel front end.
    """
    if precision == "fp32" or device.type != "cuda":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_precision(model: nn.Module, amp_dtype: torch.dtype | None) -> None:
    # A full-scale frame's power reaches 256² = 65,536, past fp16's 65,504, and the
    # -100 dB floor (1e-10) is below its smallest number: the features become inf.
    if amp_dtype == torch.float16 and any(isinstance(m, LogMel) for m in model.modules()):
        raise ValueError(
            "fp16 autocast overflows the log-mel front end of FCN models; "
            "use --precision bf16 (or fp32 on GPUs without bf16)"
        )


# -- the loop --------------------------------------------------------------------------------------
def train(config: TrainConfig) -> TrainResult:
    """Train ``config``'s model until its epochs run out or the plateau rule stops it.

    Set up (processes, model, optimizer, resumed state, data), then each epoch: train on
    random windows, validate on whole clips, apply the schedule, write the log and the
    checkpoints. ``config`` is completed in place: its recipe, model and hparams become
    the ones the run used.
    """
    from tqdm import tqdm

    # -- setup
    # Every rank seeds alike so that the models start identical (DDP also broadcasts rank
    # 0's weights, but the data order must agree too). The global generator then serves,
    # in this order, the initial weights (or a new head), and each epoch's loader and
    # dropout; a resumed run restores it where its last epoch left it. Windows and their
    # order have generators of their own, seeded per epoch.
    ranks, started_group = start_distributed(config.device)
    device = pick_device(config.device, ranks)
    torch.manual_seed(config.seed)
    run_dir = Path(config.out)
    last_path, best_path = run_dir / LAST_NAME, run_dir / BEST_NAME
    data = PreparedData(config.data)
    model = build_model(config, data)
    recipe = config.resolved()
    check_recipe(recipe)
    train_idx, valid_idx = training_splits(data, model)
    model.to(device)
    optimizer = make_optimizer(model, recipe, config.freeze, config.lr_groups)
    amp_dtype = autocast_dtype(config.precision, device)
    check_precision(model, amp_dtype)
    # fp16 gradients underflow unless the loss is scaled up; with bf16 or fp32 it is a no-op
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = new_train_state()
    if config.resume and last_path.is_file():
        resume(last_path, model, optimizer, scaler, state, data.tags)
        log.info("resumed %s at epoch %d", run_dir, state["epoch"])
    elif config.resume:
        log.warning("nothing to resume in %s; starting fresh", run_dir)
    examples, sampler, loader = training_loader(
        data, train_idx, model.window_samples, recipe, config, ranks, device
    )
    net: nn.Module = LogitsOf(model)
    if ranks.distributed:
        net = DistributedDataParallel(net)
    tensorboard = None
    if ranks.main:
        tensorboard = open_run(run_dir, config, recipe)
        log.info(
            "training %s (%d parameters) on %s: %d train / %d valid clips, recipe %s %s",
            model.arch,
            sum(p.numel() for p in model.parameters()),
            device,
            len(train_idx),
            len(valid_idx),
            config.recipe,
            recipe,
        )

    # -- epochs
    while state["epoch"] < recipe["epochs"] and not state["stopped"]:
        epoch = state["epoch"] + 1
        started = time.monotonic()
        # Windows and order are functions of (seed, epoch), not of how many epochs came
        # before in this process, so that a resumed run sees what a straight one would.
        examples.set_epoch(epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        else:
            sampler.generator.manual_seed(config.seed * 1_000_003 + epoch)
        net.train()
        set_frozen_batchnorm_eval(model, config.freeze)  # frozen blocks keep their statistics
        total_loss, seen = 0.0, 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}",
            unit="batch",
            disable=not (config.progress and ranks.main),
            leave=False,
        )
        for step, (waves, targets) in enumerate(bar):
            if recipe["schedule"] == "cosine":  # set every step: a smooth decay, no stairs
                progress = (epoch - 1 + step / len(loader)) / recipe["epochs"]
                factor = cosine_factor(progress)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
            waves = waves.to(device, non_blocking=True)  # (B, window_samples)
            targets = targets.to(device, non_blocking=True)  # (B, n_tags), NaN: unknown
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(waves)  # (B, n_tags)
                loss = masked_bce(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item() * len(waves)
            seen += len(waves)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        train_loss = _mean_across_ranks(total_loss, seen, ranks, device)
        train_seconds = time.monotonic() - started

        # -- validation and the plateau rule
        # BatchNorm statistics are per rank; rank 0's become everyone's, so that all
        # ranks hold the same model and validation sees what the checkpoint stores.
        _sync_buffers(model, ranks)
        valid = validate(
            model, data, valid_idx, config.eval_hop, recipe["batch_size"], device, ranks
        )
        lr_now = max(group["lr"] for group in optimizer.param_groups)  # what this epoch ran at
        apply_plateau_rule(state, valid.loss, optimizer, recipe)
        row = {
            "epoch": epoch,
            "lr": lr_now,
            "train_loss": round(train_loss, 5),
            "valid_loss": round(valid.loss, 5),
            "valid_roc_auc": round(valid.roc_auc, 5),
            "valid_pr_auc": round(valid.summary["pr_auc_macro"], 5) if valid.summary else 0.0,
            "seconds": round(time.monotonic() - started, 2),
            "examples_per_second": round(seen * ranks.world_size / max(train_seconds, 1e-9), 2),
        }
        state["history"].append(row)
        state["epoch"] = epoch
        # The first epoch always counts, so best.pt exists even if AUC is undefined (NaN).
        improved = valid.roc_auc > state["best_roc_auc"] or state["best_epoch"] == 0
        if improved:
            state["best_roc_auc"], state["best_epoch"] = valid.roc_auc, epoch

        # -- log and checkpoints (rank 0 writes for all)
        if ranks.main:
            report_epoch(run_dir, row, tensorboard)
            payload = _payload(model, data, config, recipe, state, valid.summary, valid.thresholds)
            save_checkpoints(payload, best_path if improved else None, last_path, optimizer, scaler)

    if tensorboard is not None:
        tensorboard.close()
    if started_group:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(
        run_dir=run_dir,
        best_path=best_path,
        last_path=last_path,
        best_epoch=state["best_epoch"],
        best_roc_auc=state["best_roc_auc"],
        epochs_run=state["epoch"],
        examples_per_epoch=len(examples),
        history=state["history"],
        model=model,
    )


# -- setup ---------------------------------------------------------------------------------------
def build_model(config: TrainConfig, data: PreparedData) -> TaggerModel:
    """A fresh model of ``config.model``, or ``config.init_from``'s trained one with a new
    head for the data's tags; fills in ``config``'s recipe (the model's by default,
    ``finetune`` from a checkpoint), model and hparams."""
    source = load_checkpoint(config.init_from) if config.init_from else None
    arch = source["arch"] if source is not None else config.model
    config.recipe = config.recipe or (FINETUNE if source is not None else default_recipe(arch))
    if config.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {config.recipe!r}; known: {', '.join(RECIPES)}")
    if source is not None:
        model = model_from_checkpoint(source)
        replace_head(model, source["tags"], data.tags)
        config.model = model.arch
    else:
        hparams = model_hparams(config.recipe, config.hparams)
        model = create_model(config.model, data.n_tags, **hparams)
    config.hparams = model.hparams
    return model


def check_recipe(recipe: dict[str, Any]) -> None:
    for key, known in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("crop", CROPS)):
        if recipe[key] not in known:
            raise ValueError(f"{key} must be {' or '.join(known)}, got {recipe[key]!r}")
    check_turns(recipe["turns"])


def check_turns(turns: float) -> None:
    if not 0.0 <= turns <= 1.0:
        raise ValueError(f"turns is a probability from 0 to 1, got {turns!r}")


def training_splits(data: PreparedData, model: TaggerModel) -> tuple[list[int], list[int]]:
    """The train and valid clips, once the data is known to suit the model."""
    if data.sample_rate != model.sample_rate:
        raise DataError(
            f"{data.root} is prepared at {data.sample_rate} Hz but {model.arch} takes "
            f"{model.sample_rate} Hz; run `tagd-train prepare --model {model.arch}` again"
        )
    train_idx, valid_idx = data.indices("train"), data.indices("valid")
    if not train_idx or not valid_idx:
        raise DataError(
            f"{data.root} needs train and valid clips; it has {len(train_idx)} and {len(valid_idx)}"
        )
    return train_idx, valid_idx


def make_optimizer(
    model: nn.Module, recipe: dict[str, Any], freeze: list[str], lr_groups: dict[str, float]
) -> torch.optim.Optimizer:
    """The recipe's optimizer over parameter groups: frozen prefixes get no gradient,
    ``lr_groups`` their own learning rate (the thesis' per-block rates), the rest the
    recipe's."""
    groups = parameter_groups(model, recipe["lr"], freeze, lr_groups)
    if recipe["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(
            groups,
            lr=recipe["lr"],
            momentum=recipe["momentum"],
            nesterov=True,
            weight_decay=recipe["weight_decay"],
        )
    else:
        optimizer = torch.optim.Adam(groups, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # what the cosine schedule scales
    return optimizer


def new_train_state() -> dict[str, Any]:
    """What a run keeps between epochs, and a resumed run takes over from last.pt."""
    return {
        "epoch": 0,
        "lr_drops": 0,
        "stall": 0,
        "best_loss": math.inf,
        "best_roc_auc": -1.0,
        "best_epoch": 0,
        "stopped": False,  # the plateau rule ended the run
        "history": [],
    }


def resume(
    last_path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: dict[str, Any],
    tags: list[str],
) -> None:
    """Take over weights, optimizer, scaler, RNG and ``state`` from ``last.pt``."""
    last = load_checkpoint(last_path)
    if (last["arch"], last["hparams"], last["tags"]) != (model.arch, model.hparams, tags):
        raise ValueError(
            f"{last_path} holds a {last['arch']} with other hyper-parameters or tags; "
            f"resume with the options it was started with, or train into a new --out"
        )
    model.load_state_dict(last["state_dict"])
    optimizer.load_state_dict(last["optimizer"])
    scaler.load_state_dict(last["scaler"])
    torch.set_rng_state(last["torch_rng"])
    state.update(last["train_state"])


def training_loader(
    data: PreparedData,
    train_idx: list[int],
    window_samples: int,
    recipe: dict[str, Any],
    config: TrainConfig,
    ranks: Ranks,
    device: torch.device,
) -> tuple[CropDataset, RandomSampler | DistributedSampler, DataLoader]:
    """Random windows of the training clips, split across ranks by DistributedSampler."""
    crops = crops_per_clip(
        recipe["crops_per_clip"], data, train_idx, window_samples, recipe["min_epoch_examples"]
    )
    examples = CropDataset(
        data,
        train_idx,
        window_samples,
        crops,
        config.seed,
        loop=recipe["crop"] == "loop",
        turns=recipe["turns"],
    )
    if ranks.distributed:
        sampler = DistributedSampler(
            examples, ranks.world_size, ranks.rank, shuffle=True, seed=config.seed
        )
    else:
        sampler = RandomSampler(examples, generator=torch.Generator().manual_seed(config.seed))
    workers = config.workers if config.workers is not None else (0 if device.type == "cpu" else 4)
    batch_size = recipe["batch_size"]
    # A lone example in a batch breaks BatchNorm: drop the ragged end when we can afford to.
    drop_last = len(examples) // ranks.world_size >= batch_size
    loader = DataLoader(
        examples,
        batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
    )
    return examples, sampler, loader


def open_run(run_dir: Path, config: TrainConfig, recipe: dict[str, Any]):
    """The run folder with config.json (the options and the values they resolved to);
    the TensorBoard writer, or None."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_NAME).write_text(
        json.dumps({**dataclasses.asdict(config), "resolved": recipe}, indent=2) + "\n"
    )
    return _tensorboard(run_dir) if config.tensorboard else None


# -- validation, schedule, checkpoints -------------------------------------------------------------
@dataclass
class Validation:
    loss: float  # every rank has it
    roc_auc: float  # every rank has it; NaN when no tag has both classes
    summary: dict[str, Any] | None  # rank 0 only: macro and weighted AUCs
    thresholds: list[float] | None  # rank 0 only: max-F1 threshold a tag


def validate(
    model: TaggerModel,
    data: PreparedData,
    valid_idx: list[int],
    hop_samples: int | None,
    batch_size: int,
    device: torch.device,
    ranks: Ranks,
) -> Validation:
    """Score the valid clips whole, exactly as ``tagd tag`` would, on rank 0; the loss
    and ROC-AUC reach every rank, since the plateau rule runs on each."""
    if not ranks.main:
        loss, roc_auc = _broadcast_floats([0.0, 0.0], ranks, device)
        return Validation(loss, roc_auc, None, None)
    labels = data.label_matrix(valid_idx)
    scores = predict_clips(
        model, data, valid_idx, hop_samples=hop_samples, batch_size=batch_size, device=device
    )
    summary = summarise(tag_metrics(labels, scores, data.tags))
    loss, roc_auc = _broadcast_floats(
        [bce(labels, scores), summary["roc_auc_macro"]], ranks, device
    )
    return Validation(loss, roc_auc, summary, choose_thresholds(labels, scores))


def apply_plateau_rule(
    state: dict[str, Any], valid_loss: float, optimizer: torch.optim.Optimizer, recipe: dict
) -> None:
    """Lee et al.'s schedule: validation loss that has stalled ``patience`` epochs drops
    the rate by ``lr_factor``, or ends the run after ``max_lr_drops`` drops. The stall is
    counted under any schedule (it is in the log); only "plateau" acts on it."""
    if valid_loss < state["best_loss"] - MIN_LOSS_IMPROVEMENT:
        state["best_loss"], state["stall"] = valid_loss, 0
    else:
        state["stall"] += 1
    if recipe["schedule"] != "plateau" or state["stall"] < recipe["patience"]:
        return
    if state["lr_drops"] >= recipe["max_lr_drops"]:
        state["stopped"] = True
        return
    for group in optimizer.param_groups:
        group["lr"] *= recipe["lr_factor"]
    state["lr_drops"] += 1
    state["stall"] = 0
    log.info("validation loss stalled %d epochs: lr x%g", recipe["patience"], recipe["lr_factor"])


def report_epoch(run_dir: Path, row: dict[str, Any], tensorboard) -> None:
    """One epoch's row into log.csv, TensorBoard and the log."""
    _append_log(run_dir / LOG_NAME, row)
    if tensorboard is not None:
        for key, value in row.items():
            if key != "epoch":
                tensorboard.add_scalar(key, value, row["epoch"])
    log.info(
        "epoch %d: train loss %.4f, valid loss %.4f, valid ROC-AUC %.4f, PR-AUC %.4f (%.1f s)",
        row["epoch"],
        row["train_loss"],
        row["valid_loss"],
        row["valid_roc_auc"],
        row["valid_pr_auc"],
        row["seconds"],
    )


def save_checkpoints(
    payload: dict[str, Any],
    best_path: Path | None,
    last_path: Path,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> None:
    """best.pt (when given) gets the model and card; last.pt also what resuming needs."""
    if best_path is not None:
        save_checkpoint(best_path, payload)
    save_checkpoint(
        last_path,
        {
            **payload,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
    )


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the known labels; an unknown one (NaN) adds nothing.

    The mean is over known labels, so a batch of partly labelled clips weighs each known
    label as a fully labelled batch does. With every label known it is
    ``BCEWithLogitsLoss``.
    """
    known = ~torch.isnan(targets)
    losses = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.where(known, targets, torch.zeros_like(targets)), reduction="none"
    )
    return (losses * known).sum() / known.sum().clamp(min=1)


def cosine_factor(progress: float) -> float:
    """The learning rate's multiplier ``progress`` (0 → 1) through a cosine run.

    Fixed by the epochs asked for, it anneals a short run as fully as a long one without
    watching validation noise. It beat the paper's SGD plateau for a narrow SampleCNN;
    for FCN the plateau rule learnt more (docs/training.md has both).
    """
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


class LogitsOf(nn.Module):
    """The model with forward() = forward_logits(): DDP syncs gradients only through
    forward(), and the loss wants logits (BCE-with-logits is stable; sigmoid then BCE is not)."""

    def __init__(self, model: TaggerModel):
        super().__init__()
        self.model = model

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        return self.model.forward_logits(waves)


def _payload(model, data, config, recipe, state, summary, thresholds) -> dict[str, Any]:
    """A checkpoint: model, card with validation scores and thresholds, training state."""
    # default name: architecture and kind of data, e.g. "fcn4-magnatagatune"
    kind = data.source.split()[0] if data.source else Path(config.data).name
    card = card_for_model(model, name=config.name or f"{model.arch}-{kind}", tags=data.tags)
    card.thresholds = thresholds
    card.training = {
        "data": data.source,
        "prepared": str(Path(config.data).resolve()),
        "clips": {split: len(data.indices(split)) for split in ("train", "valid", "test")},
        "recipe": config.recipe,
        **{key: recipe[key] for key in ("optimizer", "lr", "batch_size")},
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "seed": config.seed,
        "init_from": config.init_from,
        "thresholds": "max F1 per tag on the valid split",
    }
    card.scores = {
        "valid": {
            key: round(summary[key], 4)
            for key in ("roc_auc_macro", "pr_auc_macro", "roc_auc_weighted")
        }
    }
    card.validate()
    return {
        "arch": model.arch,
        "hparams": model.hparams,
        "n_tags": model.n_tags,
        "tags": list(data.tags),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "card": card.to_dict(),
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "train_state": json.loads(json.dumps(state)),
    }


def _append_log(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None  # optional: the CSV log has the same numbers
    return SummaryWriter(str(run_dir / "tensorboard"))


def _mean_across_ranks(total: float, count: int, ranks: Ranks, device: torch.device) -> float:
    if ranks.distributed:
        both = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(both)
        total, count = both.tolist()
    return total / max(count, 1)


def _sync_buffers(model: nn.Module, ranks: Ranks) -> None:
    if ranks.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _broadcast_floats(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    if not ranks.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()
