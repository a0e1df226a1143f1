import json

import numpy as np
import pytest

from tagd.card import (
    CARD_SCHEMA_VERSION,
    GRAPH_NAMES,
    CardError,
    HopGraphs,
    ModelCard,
    StateTensor,
    read_card,
    sidecar_path,
)

# The incremental section of an FCN-4 (width 0.125) card as `tagd-train export` wrote it
# before the section was typed: cards on disk carry it so, and must load and write back
# unchanged. The second hop was exported without the parity check (no max_abs_diff).
WRITTEN_INCREMENTAL = {
    "time_strides": [256, 1024, 5120, 40960, 327680],
    "graphs": [
        {
            "hop_samples": 40960,
            "prime": "fcn4.40960.prime.onnx",
            "step": "fcn4.40960.step.onnx",
            "state": [
                {"name": "block2", "shape": [48, 12, 67]},
                {"name": "block3", "shape": [96, 4, 7]},
            ],
            "state_bytes": 165120,
            "reused_levels": 4,
            "step_macs": 88754208,
            "full_macs": 563778368,
            "max_abs_diff": 2.086162567138672e-07,
        },
        {
            "hop_samples": 5120,
            "prime": "fcn4.5120.prime.onnx",
            "step": "fcn4.5120.step.onnx",
            "state": [{"name": "block2", "shape": [48, 12, 67]}],
            "state_bytes": 154368,
            "reused_levels": 3,
            "step_macs": 58796960,
            "full_macs": 563778368,
        },
    ],
}


def make_card(**overrides) -> ModelCard:
    fields = dict(
        name="fcn4-test",
        architecture="fcn4",
        sample_rate=12000,
        window_samples=349_440,
        hop_samples=12000 * 5,
        tags=["rock", "piano", "vocal"],
    )
    fields.update(overrides)
    return ModelCard(**fields)


def test_defaults_and_derived_values():
    card = make_card()
    assert card.thresholds == [0.5, 0.5, 0.5]
    assert card.window_seconds == pytest.approx(29.12)
    assert card.clip_seconds == pytest.approx(29.12)
    assert card.windows_per_clip == 1
    assert card.schema_version == CARD_SCHEMA_VERSION


def test_sample_level_clip_averages_the_segments_of_29_1_seconds():
    card = make_card(
        architecture="samplecnn",
        sample_rate=22050,
        window_samples=59049,
        hop_samples=59049,
        clip_seconds=29.1,
    )
    # 29.1 s at 22,050 Hz holds ten whole 59,049-sample segments, as in Lee et al. 2017.
    assert card.windows_per_clip == 10


def test_json_round_trip_is_lossless():
    card = make_card(thresholds=[0.1, 0.2, 0.3], scores={"roc_auc": 0.9})
    again = ModelCard.from_json(card.to_json())
    assert again == card


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tags": []}, "at least one tag"),
        ({"tags": ["a", "a", "b"]}, "unique"),
        ({"thresholds": [0.5]}, "thresholds has 1 values for 3 tags"),
        ({"thresholds": [0.5, 2.0, 0.1]}, "[0, 1]"),
        ({"sample_rate": 0}, "sample_rate must be a positive integer"),
        ({"window_samples": 1.5}, "window_samples must be a positive integer"),
        ({"schema_version": CARD_SCHEMA_VERSION + 1}, "upgrade tagd"),
    ],
)
def test_invalid_cards_are_refused_with_the_reason(overrides, message):
    with pytest.raises(CardError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_card(**overrides)


def test_unknown_and_missing_keys_are_named():
    data = make_card().to_dict()
    data["colour"] = "blue"
    with pytest.raises(CardError, match="unknown model card keys: colour"):
        ModelCard.from_dict(data)
    del data["colour"], data["tags"]
    with pytest.raises(CardError, match="lacks: tags"):
        ModelCard.from_dict(data)
    with pytest.raises(CardError, match="not valid JSON"):
        ModelCard.from_json("{nope")


def test_check_io_names_both_sides_of_a_disagreement():
    card = make_card()
    card.check_io(["batch", 349_440], ["batch", 3], source="m.onnx")
    with pytest.raises(CardError, match="takes 1000 samples.*window_samples=349440"):
        card.check_io(["batch", 1000], ["batch", 3], source="m.onnx")
    with pytest.raises(CardError, match="outputs 50 scores but the card names 3 tags"):
        card.check_io([None, 349_440], [None, 50], source="m.onnx")


def test_sidecar_card_beside_a_plan(tmp_path):
    plan = tmp_path / "fcn4.plan"
    plan.write_bytes(b"\0")
    with pytest.raises(CardError, match="fcn4.plan.json"):
        read_card(plan)
    make_card().save(sidecar_path(plan))
    assert sidecar_path(plan).name == "fcn4.plan.json"
    assert read_card(plan).tags == ["rock", "piano", "vocal"]
    assert json.loads(sidecar_path(plan).read_text())["architecture"] == "fcn4"


def test_an_incremental_section_as_export_wrote_it_loads_typed_and_writes_back_unchanged():
    data = make_card().to_dict()
    assert data["incremental"] == {}  # a family without incremental graphs
    data["incremental"] = WRITTEN_INCREMENTAL
    card = ModelCard.from_dict(json.loads(json.dumps(data)))
    assert card.to_dict() == data
    assert card.to_json() == json.dumps(data, indent=2)
    graph = card.incremental_graph(40_960)
    assert graph == HopGraphs(
        hop_samples=40_960,
        prime="fcn4.40960.prime.onnx",
        step="fcn4.40960.step.onnx",
        state=(StateTensor("block2", (48, 12, 67)), StateTensor("block3", (96, 4, 7))),
        state_bytes=165_120,
        reused_levels=4,
        step_macs=88_754_208,
        full_macs=563_778_368,
        max_abs_diff=2.086162567138672e-07,
    )
    assert card.incremental_graph(5_120).max_abs_diff is None
    assert card.incremental_graph(20_480) is None
    assert card.incremental.hops == [40_960, 5_120]
    assert card.reusable_levels(40_960) == 4 and card.reusable_levels(5_120) == 3
    assert card.hop_from_seconds(3.413) == 40_960


def test_the_graphs_tensor_names_come_from_the_card_module():
    (graph, _) = ModelCard.from_dict(
        {**make_card().to_dict(), "incremental": WRITTEN_INCREMENTAL}
    ).incremental.graphs
    # the names every exported graph has; files on disk carry them, so they never change
    assert (GRAPH_NAMES.waveform, GRAPH_NAMES.scores) == ("waveform", "scores")
    assert graph.prime_inputs == ["waveform"]
    assert graph.step_inputs == ["waveform", "state.block2", "state.block3"]
    assert graph.outputs == ["scores", "next_state.block2", "next_state.block3"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["graphs"][1].pop("step"), r"incremental.graphs\[1\] lacks: step"),
        (
            lambda s: s["graphs"][0]["state"][1].update(colour="blue"),
            r"unknown incremental.graphs\[0\].state\[1\] keys: colour",
        ),
        (lambda s: s.update(graphs={}), "incremental.graphs is a list, got dict"),
        (lambda s: s.update(extra=1), "unknown incremental keys: extra"),
    ],
)
def test_a_malformed_incremental_section_is_refused_where_it_is_wrong(change, message):
    section = json.loads(json.dumps(WRITTEN_INCREMENTAL))
    change(section)
    with pytest.raises(CardError, match=message):
        ModelCard.from_dict({**make_card().to_dict(), "incremental": section})


def test_excludes_turn_a_tag_off_beside_another_and_are_written_only_when_set():
    from tagd.card import ModelCard

    settings = {
        "name": "m",
        "architecture": "fcn4",
        "sample_rate": 12000,
        "window_samples": 1000,
        "hop_samples": 500,
        "tags": ["instrumental", "speech", "choir"],
        "thresholds": [0.5, 0.5, 0.5],
    }
    plain = ModelCard(**settings)
    assert "excludes" not in plain.to_dict()  # cards without them read as before
    voiced = ModelCard(**settings, excludes={"instrumental": ["speech", "choir"]})
    assert ModelCard.from_json(voiced.to_json()) == voiced
    scores = np.float32([[0.9, 0.1, 0.1], [0.9, 0.7, 0.1], [0.9, 0.1, 0.6], [0.2, 0.9, 0.9]])
    np.testing.assert_array_equal(
        voiced.over(scores),
        [[True, False, False], [False, True, False], [False, False, True], [False, True, True]],
    )
    np.testing.assert_array_equal(plain.over(scores[1]), [True, True, False])
    for excludes, problem in [
        ({"instrumental": ["vocal"]}, "not tags: vocal"),
        ({"instrumental": ["instrumental"]}, "must name other tags"),
        ({"instrumental": []}, "must name other tags"),
    ]:
        with pytest.raises(CardError, match=problem):
            ModelCard(**settings, excludes=excludes)


def test_precision_is_written_only_when_not_float32_and_an_unknown_one_is_refused():
    old = make_card().to_dict()  # a card as written before precisions
    assert "precision" not in old
    card = ModelCard.from_dict(json.loads(json.dumps(old)))
    assert card.precision == "float32" and card.to_json() == json.dumps(old, indent=2)
    int8 = ModelCard.from_dict({**old, "precision": "int8"})
    assert int8.to_dict()["precision"] == "int8" and ModelCard.from_json(int8.to_json()) == int8
    with pytest.raises(CardError, match="precision must be one of float32, int8, got 'fp4'"):
        ModelCard.from_dict({**old, "precision": "fp4"})
