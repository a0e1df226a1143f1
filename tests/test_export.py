"""ONNX export: parity with PyTorch, the card inside, a dynamic batch axis."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tagd.card import CARD_METADATA_KEY, CardError, ModelCard, read_card
from trainer.export import INPUT_NAME, OUTPUT_NAME, card_for_model, export_onnx, run_onnxruntime
from trainer.models import create_model


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
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
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
