"""ONNX export: parity with PyTorch, the card inside, a dynamic batch axis."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tagd.card import CARD_METADATA_KEY, CardError, ModelCard, read_card
from tagd.engines import load_engine
from trainer.export import card_for_model, export_onnx, run_onnxruntime
from trainer.models import create_model
from trainer.models.base import IncrementalGraphs, TaggerModel


def tiny(arch: str, n_tags: int = 5):
    torch.manual_seed(1)
    width = 0.125 if arch.startswith("fcn") else 0.25
    return create_model(arch, n_tags, width=width)


@pytest.mark.parametrize("arch", ["fcn4", "samplecnn", "samplecnn-rese-ml"])
def test_export_matches_pytorch_and_carries_card(arch, tmp_path, music):
    model = tiny(arch)
    tags = ["rock", "piano", "female", "beat", "quiet"]
    result = export_onnx(model, tmp_path / "m.onnx", tags=tags, name="tiny")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4

    card = read_card(result.path)
    assert card.tags == tags and card.name == "tiny" and card.architecture == arch
    assert card.window_samples == model.window_samples
    assert card.sample_rate == model.sample_rate
    assert card.hop_samples == model.default_hop_samples
    assert card.hyperparameters == {**model.hparams, "n_tags": 5}
    assert card.export["opset"] == 17 and card.export["torch_version"] == torch.__version__

    # the card alone rebuilds the network
    hparams = dict(card.hyperparameters)
    rebuilt = create_model(card.architecture, hparams.pop("n_tags"), **hparams)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()

    # real audio, three windows: a batch size the export never saw
    audio = music(3 * model.window_samples / model.sample_rate, model.sample_rate)
    batch = audio[: 3 * model.window_samples].reshape(3, -1)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(batch)).numpy()
    actual = run_onnxruntime(result.path, batch)
    assert actual.shape == (3, 5)
    np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_graph_io_names_and_dynamic_batch(tmp_path):
    model = tiny("samplecnn")
    path = export_onnx(model, tmp_path / "m.onnx", check=False).path
    proto = onnx.load(str(path))
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("waveform", "scores")  # tagd.card.GRAPH_NAMES
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", model.window_samples]
    assert out_dims == ["batch", 5]
    assert {p.key for p in proto.metadata_props} == {CARD_METADATA_KEY}
    assert proto.opset_import[0].version == 17
    ops = {node.op_type for node in proto.graph.node}
    assert not ops & {"STFT", "DFT", "Loop", "If"}, ops


def test_given_card_is_kept_and_checked(tmp_path):
    model = tiny("fcn4", n_tags=3)
    card = card_for_model(model, name="fcn4-mtt", tags=["a", "b", "c"])
    card.thresholds = [0.3, 0.4, 0.5]
    card.scores = {"roc_auc": 0.9}
    result = export_onnx(model, tmp_path / "m.onnx", card=card, check=False)
    read = read_card(result.path)
    assert read.thresholds == [0.3, 0.4, 0.5] and read.scores == {"roc_auc": 0.9}
    assert card.export == {}  # the caller's card is not mutated

    wrong = ModelCard.from_dict({**card.to_dict(), "window_samples": 1000})
    with pytest.raises(CardError, match="window_samples"):
        export_onnx(model, tmp_path / "bad.onnx", card=wrong, check=False)


def test_wrong_number_of_tags_is_refused(tmp_path):
    with pytest.raises(CardError, match="3 tags"):
        export_onnx(tiny("samplecnn"), tmp_path / "m.onnx", tags=["a", "b", "c"])


def test_export_restores_training_mode(tmp_path):
    model = tiny("samplecnn").train()
    export_onnx(model, tmp_path / "m.onnx", check=False)
    assert model.training


def test_conftest_fixture_exports_once(export_model):
    first = export_model("fcn4")
    assert export_model("fcn4") == first
    assert read_card(first).n_tags == 8
    assert export_model("samplecnn", n_tags=4) != export_model("samplecnn")


# -- a model family of its own, with incremental graphs ----------------------------------
BLOCK = 1_000  # samples per block, the toy family's hop
BLOCKS = 4  # per window


@dataclass
class BlockEnergyConfig:
    n_tags: int = 3
    sample_rate: int = 8_000
    window_samples: int = BLOCKS * BLOCK


class BlockEnergy(TaggerModel):
    """Scores from the energy of each block of the window: a window one block after the
    last shares all its blocks but one, so a step computes only the newest."""

    def __init__(self, config: BlockEnergyConfig):
        super().__init__(config, "block-energy", hop_samples=BLOCK, clip_seconds=0.5)
        self.head = nn.Linear(BLOCKS, config.n_tags)

    def forward_logits(self, wave: torch.Tensor) -> torch.Tensor:
        energies = wave.reshape(-1, BLOCKS, BLOCK).square().mean(-1)  # (B, BLOCKS)
        return self.head(energies)

    def incremental_graphs(
        self, hop_samples: int, embedding: bool = False
    ) -> IncrementalGraphs | None:
        if hop_samples != BLOCK or embedding:
            return None
        return IncrementalGraphs(
            prime=_BlockPrime(self),
            step=_BlockStep(self),
            state_names=("blocks",),
            state_shapes=((BLOCKS - 1,),),
            time_strides=(BLOCK,),
            reused_levels=1,
            state_bytes=4 * (BLOCKS - 1),
            step_macs=BLOCK + BLOCKS * self.n_tags,
            full_macs=BLOCKS * BLOCK + BLOCKS * self.n_tags,
        )


class _BlockPrime(nn.Module):
    def __init__(self, model: BlockEnergy):
        super().__init__()
        self.model = model

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        energies = wave.reshape(-1, BLOCKS, BLOCK).square().mean(-1)
        return torch.sigmoid(self.model.head(energies)), energies[:, 1:]


class _BlockStep(_BlockPrime):
    def forward(self, wave: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        newest = wave[:, -BLOCK:].square().mean(-1, keepdim=True)  # (B, 1)
        energies = torch.cat((blocks, newest), dim=-1)  # (B, BLOCKS)
        return torch.sigmoid(self.model.head(energies)), energies[:, 1:]


def test_a_new_family_declares_its_incremental_graphs_and_export_writes_them(tmp_path, music):
    torch.manual_seed(0)
    model = BlockEnergy(BlockEnergyConfig())
    result = export_onnx(model, tmp_path / "energy.onnx", incremental_hops=(1_500,))
    (graph,) = result.card.incremental.graphs  # 1,500 samples: no graphs, not an error
    assert (graph.hop_samples, graph.prime, graph.step) == (
        BLOCK,
        "energy.1000.prime.onnx",
        "energy.1000.step.onnx",
    )
    assert graph.state_names == ["blocks"] and graph.max_abs_diff <= 1e-6
    assert read_card(result.path).incremental == result.card.incremental

    engine = load_engine(result.path)
    incremental = engine.incremental(BLOCK)
    assert incremental.state_shapes == [(BLOCKS - 1,)]
    audio = music(1.5, model.sample_rate)
    starts = range(0, len(audio) - model.window_samples + 1, BLOCK)
    windows = [audio[None, at : at + model.window_samples] for at in starts]
    scores, states = incremental.prime(windows[0])
    for window in windows[1:]:
        scores, states = incremental.step(window, states)
        np.testing.assert_allclose(scores, engine.run(window), atol=1e-6)


def test_a_card_lets_voice_tags_turn_off_the_no_voice_tags():
    from trainer.models import create_model

    model = create_model("fcn4", 4, width=0.125)
    rendered = card_for_model(model, tags=["piano", "speech", "choir", "instrumental"])
    assert rendered.excludes == {"instrumental": ["speech"]}  # choir is a timbre there
    mtt = card_for_model(model, tags=["rock", "no vocals", "male vocal", "vocal"])
    assert mtt.excludes == {"no vocals": ["male vocal", "vocal"]}
    assert card_for_model(model, tags=["rock", "instrumental", "jazz", "piano"]).excludes == {}
