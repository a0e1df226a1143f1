import json

import pytest

from tagd.card import CARD_SCHEMA_VERSION, CardError, ModelCard, read_card, sidecar_path


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
