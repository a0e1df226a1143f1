"""Every model in the zoo: shapes, ranges, rebuild from hparams, the papers' sizes."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.models import TaggerModel, create_model, list_models

N_TAGS = 6
TINY_WIDTH = 0.125  # forward passes in milliseconds; full sizes are checked without running


def tiny(arch: str, **hparams) -> TaggerModel:
    torch.manual_seed(0)
    return create_model(arch, N_TAGS, **{"width": TINY_WIDTH, **hparams})


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list_models())
def test_scores_for_a_batch_of_two(arch):
    model = tiny(arch).eval()
    wave = torch.randn(2, model.window_samples) * 0.1
    with torch.no_grad():
        logits = model.forward_logits(wave)
        scores = model(wave)
    assert logits.shape == scores.shape == (2, N_TAGS)
    assert torch.isfinite(logits).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    torch.testing.assert_close(scores, torch.sigmoid(logits))
    # the two windows are scored independently (no batch mixing in eval)
    with torch.no_grad():
        torch.testing.assert_close(model(wave[1:]), scores[1:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list_models())
def test_hparams_rebuild_the_same_network(arch):
    model = tiny(arch)
    assert model.arch == arch and model.n_tags == N_TAGS
    hparams = json.loads(json.dumps(model.hparams))  # as a card or checkpoint stores them
    rebuilt = create_model(arch, N_TAGS, **hparams)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
    assert rebuilt.hparams == model.hparams
    rebuilt.load_state_dict(model.state_dict())  # a checkpoint loads into it


@pytest.mark.parametrize("arch", list_models())
def test_audio_contract(arch):
    model = create_model(arch)
    if arch.startswith("fcn"):
        assert (model.sample_rate, model.window_samples) == (12_000, 349_440)
        assert model.clip_seconds == pytest.approx(29.12)
        assert 0 < model.default_hop_samples < model.window_samples
    else:
        assert (model.sample_rate, model.window_samples) == (22_050, 59_049)
        assert model.default_hop_samples == model.window_samples
        assert model.clip_seconds == pytest.approx(29.1)


@pytest.mark.parametrize("arch", list_models())
def test_each_family_declares_its_incremental_graphs_at_its_default_hop(arch):
    model = tiny(arch).eval()
    hop = model.default_hop_samples
    graphs = model.incremental_graphs(hop)
    if not arch.startswith("fcn"):  # SampleCNN's segments do not overlap: nothing to reuse
        assert graphs is None
        return
    assert hop % graphs.time_strides[graphs.reused_levels - 1] == 0
    assert 0 < graphs.step_macs < graphs.full_macs
    wave = torch.randn(1, model.window_samples + hop) * 0.1
    first, second = wave[:, : model.window_samples], wave[:, hop:]
    with torch.no_grad():
        scores, *states = graphs.prime(first)
        assert [tuple(s.shape[1:]) for s in states] == list(graphs.state_shapes)
        assert 4 * sum(s.numel() for s in states) == graphs.state_bytes
        stepped, *_ = graphs.step(second, *states)
        torch.testing.assert_close(scores, model(first), atol=1e-5, rtol=0)
        torch.testing.assert_close(stepped, model(second), atol=1e-5, rtol=0)


def test_fcn4_maps_shrink_to_one_by_one_as_the_papers_readme_says():
    model = tiny("fcn4").eval()
    with torch.no_grad():
        maps = model.feature_maps(torch.randn(1, model.window_samples) * 0.1)
    assert [tuple(m.shape[2:]) for m in maps] == [(48, 341), (12, 68), (4, 8), (1, 1)]


@pytest.mark.parametrize("arch", ["fcn3", "fcn5"])
def test_other_fcns_end_in_one_by_one(arch):
    model = tiny(arch).eval()
    with torch.no_grad():
        maps = model.feature_maps(torch.randn(1, model.window_samples) * 0.1)
    assert tuple(maps[-1].shape[2:]) == (1, 1)


def test_full_size_parameter_counts():
    # SampleCNN 3^9 at 50 tags: "≈1.9 M parameters" (Lee et al. 2017, Table 1)
    assert 1.8e6 < n_params(create_model("samplecnn")) < 2.0e6
    # FCN-4: conv weights 3·3·(1·128 + 128·384 + 384·768 + 768·2048) ≈ 17.2 M, + BN + dense
    fcn4 = create_model("fcn4")
    assert 17.2e6 < n_params(fcn4) < 17.5e6
    # FCN-6/7 add one/two 1 × 1 × 1024 convs over FCN-5
    fcn5, fcn6, fcn7 = (n_params(create_model(a)) for a in ("fcn5", "fcn6", "fcn7"))
    assert fcn5 < fcn6 < fcn7
    assert fcn7 - fcn6 == pytest.approx(1024 * 1024, rel=0.01)
    # the front end adds no parameters
    assert n_params(fcn4.frontend) == 0


def test_width_scales_channels():
    narrow = create_model("fcn5", width=0.125)
    assert [b.conv.out_channels for b in narrow.blocks] == [16, 32, 64, 128, 256]
    assert n_params(narrow) < n_params(create_model("fcn5")) / 30


def test_samplecnn_m_and_n_set_the_window():
    model = create_model("samplecnn", m=2, n=12, width=0.125).eval()
    assert model.window_samples == 2**13
    with torch.no_grad():
        assert model(torch.zeros(1, 2**13)).shape == (1, 50)


def test_samplecnn_block_kinds():
    def has(model, name):
        return any(type(m).__name__ == name for m in model.modules())

    assert not has(create_model("samplecnn"), "SqueezeExcite")
    assert has(create_model("samplecnn-se"), "SqueezeExcite")
    assert has(create_model("samplecnn-res"), "ResBlock")
    rese = create_model("samplecnn-rese-ml")
    assert has(rese, "ResBlock") and has(rese, "SqueezeExcite") and rese.config.multi_level


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError) as error:
        create_model("fcn9")
    for name in list_models():
        assert name in str(error.value)


def test_unknown_or_contradicting_hparams_are_refused():
    with pytest.raises(ValueError, match="unknown hyper-parameters widht"):
        create_model("fcn4", widht=0.5)
    with pytest.raises(ValueError, match="block"):
        create_model("samplecnn", block="se")
    with pytest.raises(ValueError, match="n_tags"):
        create_model("fcn4", n_tags=0)
