"""Transfer learning (Sankaran 2017): new tags on a trained network, per-block learning rates.

Starting from a checkpoint trained on a large source set (MagnaTagATune's 50 tags, say),
``replace_head`` swaps the output layer for one with the target tag set; rows of tags the
two sets share keep their trained weights. ``parameter_groups`` then freezes chosen blocks
(learning rate 0 in the thesis' terms) and gives others their own learning rate: the
thesis found early blocks best at a tenth of the rate of the later ones.

Blocks are named by parameter-name prefix, e.g. ``frontend``, ``blocks.0``, ``head``;
``block_names(model)`` lists them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from trainer.models import TaggerModel

log = logging.getLogger(__name__)


def block_names(model: nn.Module) -> list[str]:
    """Prefixes one can freeze or give a learning rate: top modules, list items one level down."""
    names = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > 1:
            names += [f"{name}.{index}" for index in range(len(child))]
        elif any(True for _ in child.parameters()):
            names.append(name)
    return names


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _check_prefixes(model: nn.Module, prefixes: list[str], what: str) -> None:
    names = [name for name, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(_matches(name, p) for name in names)]
    if unknown:
        raise ValueError(
            f"{what} {', '.join(unknown)} names no parameter of {getattr(model, 'arch', 'the model')}; "
            f"its blocks are: {', '.join(block_names(model))}"
        )


def replace_head(model: TaggerModel, old_tags: list[str], new_tags: list[str]) -> None:
    """Give ``model`` an output layer for ``new_tags``, keeping the rows of shared tags."""
    if list(old_tags) == list(new_tags):
        return
    old = model.head
    if not isinstance(old, nn.Linear):
        raise TypeError(
            f"{model.arch}: expected a Linear output layer `head`, found {type(old).__name__}"
        )
    new = nn.Linear(old.in_features, len(new_tags), bias=old.bias is not None)
    kept = [(new_tags.index(tag), old_tags.index(tag)) for tag in new_tags if tag in old_tags]
    with torch.no_grad():
        for new_row, old_row in kept:
            new.weight[new_row] = old.weight[old_row]
            if old.bias is not None:
                new.bias[new_row] = old.bias[old_row]
    model.head = new.to(old.weight.device)
    model.n_tags = len(new_tags)
    model.config.n_tags = len(new_tags)  # create_model(arch, n_tags, **hparams) rebuilds it
    log.info("new output layer: %d tags, %d kept from the source model", len(new_tags), len(kept))


def parameter_groups(
    model: nn.Module, base_lr: float, freeze: list[str], lr_groups: dict[str, float]
) -> list[dict]:
    """Optimizer groups: frozen prefixes excluded, the longest matching lr prefix wins."""
    _check_prefixes(model, list(freeze), "--freeze")
    _check_prefixes(model, list(lr_groups), "--lr-group")
    by_lr: dict[float, list[nn.Parameter]] = {}
    frozen = 0
    for name, parameter in model.named_parameters():
        if any(_matches(name, prefix) for prefix in freeze):
            parameter.requires_grad_(False)
            frozen += parameter.numel()
            continue
        parameter.requires_grad_(True)
        matching = [prefix for prefix in lr_groups if _matches(name, prefix)]
        lr = lr_groups[max(matching, key=len)] if matching else base_lr
        by_lr.setdefault(lr, []).append(parameter)
    if not by_lr:
        raise ValueError("every parameter is frozen: nothing to train")
    if frozen:
        log.info("frozen: %s (%d parameters)", ", ".join(freeze), frozen)
    return [{"params": params, "lr": lr} for lr, params in by_lr.items()]


def set_frozen_batchnorm_eval(model: nn.Module, freeze: list[str]) -> None:
    """Frozen blocks keep their BatchNorm statistics too: put those layers in eval mode."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
            _matches(name, p) for p in freeze
        ):
            module.eval()
