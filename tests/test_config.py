"""`tagd serve` configuration: URLs, TOML, overrides, and what --check-config says."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from tagd.cli import main
from tagd.config import (
    AsRunConfig,
    ConfigError,
    ServeConfig,
    apply_overrides,
    load_config,
    parse_input,
)

RAW = "zmq+raw://127.0.0.1:5555?format=s16le&rate=44100&channels=2&stream=radio1"


def problems_of(call) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        call()
    return caught.value.problems


def test_input_urls_carry_their_settings_in_the_query():
    raw = parse_input(RAW)
    assert (raw.scheme, raw.address, raw.stream, raw.format, raw.rate, raw.channels) == (
        "zmq+raw",
        "tcp://127.0.0.1:5555",
        "radio1",
        "s16le",
        44100,
        2,
    )
    card = parse_input("soundcard://default?rate=48000&channels=2&stream=studio")
    assert (card.device, card.rate, card.stream) == ("default", 48000, "studio")
    assert parse_input("soundcard://3?stream=s").device == 3
    multi = parse_input("zmq+sub://127.0.0.1:5570?streams=a,b")
    assert multi.is_multi_stream and multi.streams == ["a", "b"]
    file = parse_input("file:///tmp/My%20Song.mp3?realtime=0&loop=true")
    assert (file.address, file.realtime, file.loop, file.stream_name()) == (
        "/tmp/My Song.mp3",
        False,
        True,
        "My_Song",
    )


def test_bad_query_values_are_reported_with_path_and_reason():
    found = problems_of(lambda: parse_input(RAW.replace("44100", "fast") + "&colour=red"))
    assert found[0] == "--input.rate: expected an integer, got 'fast'"
    assert found[1].startswith("--input.colour: unknown key (known: url, stream, format, rate")


@pytest.mark.parametrize(
    "url, expected",
    [
        ("zmq+raw://127.0.0.1?format=s16le&rate=44100&channels=2&stream=a", "needs host:port"),
        (RAW.replace("s16le", "mp3"), "--input[0].format: 'mp3' is not one of s16le, s32le"),
        (RAW.replace("44100", "12"), "--input[0].rate: must lie in 1000..768000, got 12"),
        (RAW.replace("channels=2", "channels=0"), "--input[0].channels: must lie in 1..64, got 0"),
        (RAW.replace("radio1", "radio.1"), "--input[0].stream: 'radio.1' is not a valid stream"),
        ("zmq+pull://127.0.0.1:5?streams=a,b.c", "--input[0].streams[1]: 'b.c' is not a valid"),
        (RAW.replace("&stream=radio1", ""), "inputs[0].stream: zmq+raw inputs need a stream name"),
        ("zmq+pull://127.0.0.1:5?stream=a", "carries stream names in each message"),
        ("zmq+pull://127.0.0.1:5?rate=44100", "inputs[0].rate: not used by zmq+pull"),
        ("http://127.0.0.1:5", "unknown scheme 'http'"),
    ],
)
def test_invalid_inputs_are_refused_with_the_reason(url, expected):
    # what a URL alone shows wrong is said of its flag; what depends on the scheme, later
    found = problems_of(
        lambda: apply_overrides(ServeConfig(engine="m.onnx"), inputs=[url]).validate()
    )
    assert any(expected in problem for problem in found), found


def test_two_inputs_may_not_share_a_stream_name():
    config = apply_overrides(
        ServeConfig(engine="m.onnx"), inputs=[RAW, RAW.replace("5555", "5556")]
    )
    assert problems_of(config.validate) == [
        "inputs[1].stream: 'radio1' is already the name of inputs[0]"
    ]


def test_toml_file_gives_the_same_and_more(tmp_path):
    path = tmp_path / "tagd.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            engine = "models/fcn4.onnx"
            hop_seconds = 1.5

            [[inputs]]
            url = "{RAW}"

            [[inputs]]
            url = "zmq+pull://127.0.0.1:5571"
            streams = ["a", "b"]

            [batching]
            max_batch = 4
            max_wait_ms = 5

            [tagger]
            on_after = 3
            """
        )
    )
    config = load_config(path)
    assert config.engine == str(tmp_path / "models/fcn4.onnx")  # relative to the file
    assert config.hop_seconds == 1.5
    assert [spec.scheme for spec in config.inputs] == ["zmq+raw", "zmq+pull"]
    assert config.inputs[1].streams == ["a", "b"]
    assert (config.batching.max_batch, config.batching.max_wait_ms) == (4, 5.0)
    assert config.tagger.on_after == 3
    assert config.publish.address == "tcp://127.0.0.1:5560"  # defaults bind to loopback
    assert config.metrics.address == "127.0.0.1:9108"


def test_unknown_keys_are_rejected_with_their_path(tmp_path):
    path = tmp_path / "tagd.toml"
    path.write_text(
        'engine = "m.onnx"\n[batching]\nmax_wiat_ms = 5\n[[inputs]]\nurl = "file:///x"\nrat = 1\n'
    )
    found = problems_of(lambda: load_config(path))
    assert len(found) == 2
    assert any(
        p.startswith("batching.max_wiat_ms: unknown key (known: max_batch, max_wait_ms")
        for p in found
    )
    assert any(p.startswith("inputs[0].rat: unknown key") for p in found)


def test_wrong_types_and_values_are_rejected_with_the_reason(tmp_path):
    path = tmp_path / "tagd.toml"
    path.write_text(
        'engine = "m.onnx"\ninputs = ["file:///x.wav"]\n'
        '[batching]\nmax_batch = "eight"\n[limits]\nidle_after_s = true\n'
    )
    assert problems_of(lambda: load_config(path)) == [
        "batching.max_batch: expected an integer, got str 'eight'",
        "limits.idle_after_s: expected a number, got boolean True",
    ]
    path.write_text(
        'engine = "m.onnx"\ninputs = ["file:///x.wav"]\n[batching]\nmax_batch = -1\ninstances = 0\n'
    )
    assert problems_of(lambda: load_config(path)) == [
        "batching.max_batch: must be 0 (automatic) or more, got -1",
        "batching.instances: must lie in 1..64, got 0",
    ]
    path.write_text(
        'engine = "m.onnx"\ninputs = ["file:///x.wav"]\n'
        '[onnxruntime]\nthreads = -1\nspinning = "sometimes"\n'
    )
    assert problems_of(lambda: load_config(path)) == [
        "onnxruntime.threads: must lie in 0..256, got -1",
        "onnxruntime.spinning: 'sometimes' is not one of while_running, never, always",
    ]


def test_a_value_given_in_both_url_and_table_is_ambiguous(tmp_path):
    path = tmp_path / "tagd.toml"
    path.write_text(f'engine = "m.onnx"\n[[inputs]]\nurl = "{RAW}"\nrate = 48000\n')
    assert problems_of(lambda: load_config(path)) == [
        "inputs[0].rate: given both in the URL and as a key; keep one"
    ]


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "tagd.toml"
    path.write_text(f'engine = "a.onnx"\ninputs = ["{RAW}"]\nhop_seconds = 3.0\n')
    config = apply_overrides(
        load_config(path),
        engine="b.onnx",
        hop_seconds=0.5,
        publish="tcp://127.0.0.1:7000",
        inputs=["zmq+pull://127.0.0.1:7001"],
    )
    assert config.engine == "b.onnx" and config.hop_seconds == 0.5
    assert config.publish.address == "tcp://127.0.0.1:7000"
    assert [spec.url for spec in config.inputs] == ["zmq+pull://127.0.0.1:7001"]
    # a flag's value is checked as the file's would be, under the key it sets
    bad = apply_overrides(load_config(path), max_batch=-1, max_wait_ms=float("inf"))
    assert problems_of(bad.validate) == [
        "batching.max_batch: must be 0 (automatic) or more, got -1",
        "batching.max_wait_ms: must be a finite number, got inf",
    ]


def test_inputs_are_urls_or_tables(tmp_path):
    path = tmp_path / "tagd.toml"
    path.write_text(f'engine = "m.onnx"\ninputs = ["{RAW}", 3]\n')
    assert problems_of(lambda: load_config(path)) == [
        "inputs[1]: expected a URL or a table, got int 3"
    ]
    path.write_text('engine = "m.onnx"\n[[inputs]]\nstream = "a"\n')
    assert problems_of(lambda: load_config(path)) == ["inputs[0].url: required"]


@pytest.fixture(scope="module")
def model(short_fcn4) -> str:
    """--check-config reads the model's card: a real one."""
    return str(short_fcn4)


def test_a_file_may_leave_to_the_flags_what_they_give(tmp_path, model):
    path = tmp_path / "tagd.toml"
    path.write_text("[batching]\nspread_phases = false\n")
    result = CliRunner().invoke(
        main,
        ["serve", "--config", str(path), "--engine", model, "--input", RAW, "--check-config"],
    )
    assert result.exit_code == 0, result.output
    missing = CliRunner().invoke(main, ["serve", "--config", str(path), "--check-config"])
    assert missing.exit_code == 2 and "engine: no model file given" in missing.output


def test_check_config_validates_and_exits(tmp_path, model):
    runner = CliRunner()
    good = runner.invoke(main, ["serve", "--engine", model, "--input", RAW, "--check-config"])
    assert good.exit_code == 0, good.output
    assert "config OK" in good.output and "radio1" in good.output

    path = tmp_path / "tagd.toml"
    path.write_text('engine = "m.onnx"\n[publish]\nsndhwm = -1\nadress = "x"\n')
    bad = runner.invoke(main, ["serve", "--config", str(path), "--check-config"])
    assert bad.exit_code == 2
    assert "publish.adress: unknown key" in bad.output


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_invalid_toml_says_where(tmp_path):
    path = tmp_path / "tagd.toml"
    path.write_text("engine = \n")
    (problem,) = problems_of(lambda: load_config(path))
    assert "not valid TOML" in problem and "line 1" in problem


def test_the_example_configuration_in_the_docs_is_valid(tmp_path):
    # docs/serve.md shows every table with its defaults; it must stay loadable.
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "serve.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "tagd.toml"
    path.write_text(example)
    config = load_config(path)
    assert config.onnxruntime.engine_options() == {
        "intra_op_threads": 0,
        "spinning": "while_running",
        "memory_arena": True,
    }
    assert config.batching.spread_phases and config.batching.instances == 1
    assert [i.name for i in config.inputs][:1] == ["radio1"]
    assert Path(config.asrun.path) == tmp_path / "asrun.db"  # beside the file
    assert config.asrun.retention_days == AsRunConfig().retention_days


def test_instances_share_the_cores_unless_threads_are_set(monkeypatch):
    from tagd.config import OnnxRuntimeConfig

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert OnnxRuntimeConfig().engine_options(1)["intra_op_threads"] == 0  # one per core
    assert OnnxRuntimeConfig().engine_options(4)["intra_op_threads"] == 4
    assert OnnxRuntimeConfig().engine_options(32)["intra_op_threads"] == 1
    assert OnnxRuntimeConfig(threads=3).engine_options(4)["intra_op_threads"] == 3


def test_each_source_declares_its_schemes_and_the_fields_it_reads():
    from tagd.config import InputConfig
    from tagd.sources import source_classes

    classes = source_classes()
    assert list(classes) == ["zmq+raw", "zmq+sub", "zmq+pull", "soundcard", "file"]
    fields = set(InputConfig.model_fields)
    for cls in classes.values():
        assert set(cls.options) | set(cls.required) <= fields
    # what a source does not read, or must have, is said with its scheme named
    assert parse_input("file:///a.wav?rate=8000").problems("inputs[0]") == [
        "inputs[0].rate: not used by file (it is carried by the source)"
    ]
    assert parse_input("soundcard://default?curve=true&stream=s").problems("inputs[0]") == [
        "inputs[0].curve: not used by soundcard (only ZeroMQ inputs)"
    ]
    assert "inputs[0].format: zmq+raw needs format= (what ffmpeg was told to send)" in parse_input(
        "zmq+raw://127.0.0.1:5555?rate=44100&channels=2&stream=radio1"
    ).problems("inputs[0]")


def test_the_key_reference_in_the_docs_is_the_schema_s():
    from pathlib import Path

    from tagd.config import reference_markdown
    from tagd.schema import REFERENCE_END, reference_in

    doc = (Path(__file__).parents[1] / "docs" / "serve.md").read_text()
    assert doc.count(REFERENCE_END) == 1
    assert reference_in(doc) == reference_markdown(), (
        "docs/serve.md: run `python -m tagd.config --reference docs/serve.md`"
    )
    reference = reference_markdown()
    assert "| `rate` | integer | unset | 1000..768000 |" in reference
    assert '| `spinning` | string | `"while_running"` | `"while_running"`, `"never"`' in reference
    assert "**`[[inputs]]`**" in reference and "**`[log]`**" in reference
    printed = subprocess.run(
        [sys.executable, "-m", "tagd.config", "--reference"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert printed.stdout == reference
