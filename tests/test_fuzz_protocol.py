"""Property-based fuzzing (hypothesis) of everything a client or a file can feed the parsers:
the protocol's text frames, `start` and `set` validation (through RuntimeSettings, as the server
does), and bundle manifests. Any input gives a valid result or a clear error (ProtocolError /
UserError), never another exception, a hang or non-finite settings. Bounded: a few seconds."""

import json
import math
from dataclasses import asdict

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rtsvc.backends.bundle import MANIFEST, read_bundle
from rtsvc.errors import UserError
from rtsvc.serve.protocol import START_FIELDS, ProtocolError, dumps, parse_set, parse_start, parse_text
from rtsvc.settings import KNOB_NAMES, Knobs, RuntimeSettings
from tests.test_bundle import make_fake_bundle

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# what json.loads can give (floats include NaN and infinity: Python reads NaN, Infinity, 1e400)
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
           | st.sampled_from(["s16le", "f32le", "nan", "5", "inf", "alice", "dsp", ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
field_names = st.sampled_from([*START_FIELDS, *KNOB_NAMES]) | st.text(max_size=8)
good_values = {"sample_rate": st.sampled_from([8000, 16000, 48000]),
               "format": st.sampled_from(["s16le", "f32le"]), "pitch_shift": st.floats(-40, 40),
               "steps": st.integers(0, 70), "seed": st.integers(-5, 2**33),
               "speaker": st.sampled_from([None, "dsp", "nobody"])}


@st.composite
def messages(draw, kind: str) -> dict:
    """Mostly plausible messages of `kind`, with some fields replaced by anything."""
    message = {"type": kind}
    for name in draw(st.lists(field_names, max_size=6)):
        plausible = good_values.get(name)
        message[name] = draw(plausible if plausible is not None and draw(st.booleans()) else json_values)
    if kind == "start" and draw(st.booleans()):
        message["sample_rate"] = draw(good_values["sample_rate"])
    return message


def check_knobs(knobs: Knobs) -> None:
    for name, value in asdict(knobs).items():
        if isinstance(value, float):
            assert math.isfinite(value), (name, value)
    json.loads(dumps(asdict(knobs)))  # standard JSON (dumps refuses NaN)


@FUZZ
@given(st.text(max_size=300) | json_values.map(json.dumps) | messages("start").map(json.dumps))
def test_parse_text_gives_a_message_or_a_protocol_error(text):
    try:
        message = parse_text(text)
    except ProtocolError as err:
        assert err.code in ("bad_json", "bad_message", "too_big") and err.fatal
        return
    assert isinstance(message, dict) and isinstance(message["type"], str)


@FUZZ
@given(messages("start"))
@example({"type": "start", "sample_rate": 16000, "format": ["s16le"]})  # found by hand: internal 1011
@example({"type": "start", "sample_rate": 16000, "seed": float("inf")})  # `"seed": 1e400`
@example({"type": "start", "sample_rate": 16000, "pitch_shift": float("nan")})
def test_start_gives_a_request_with_finite_settings_or_a_clear_error(message):
    try:
        request = parse_start(message)
        knobs = RuntimeSettings().update(**request.knobs)
    except ProtocolError as err:
        assert err.fatal and err.message and err.code.startswith("bad_")
        return
    except UserError as err:  # a range: the server answers bad_setting
        assert str(err) and "\n" not in str(err)
        return
    assert request.format in ("s16le", "f32le") and 8000 <= request.sample_rate <= 192000
    assert isinstance(request.realtime, bool) and isinstance(request.warnings, bool)
    check_knobs(knobs)


@FUZZ
@given(st.lists(messages("set"), min_size=1, max_size=4))
@example([{"type": "set", "pitch_shift": "nan"}])  # found by hand: silent output, bare NaN in JSON
@example([{"type": "set", "seed": 10**30}])
def test_set_changes_everything_or_nothing_and_stays_finite(changes):
    runtime = RuntimeSettings()
    for message in changes:
        before = runtime.snapshot()
        try:
            runtime.update(**parse_set(message))
        except ProtocolError as err:
            assert not err.fatal and err.code == "bad_setting" and err.message
            assert runtime.snapshot() == before
        except UserError as err:
            assert str(err) and runtime.snapshot() == before
        check_knobs(runtime.snapshot())


manifest_fields = st.sampled_from(["format_version", "audio", "speakers", "dit", "defaults", "features",
                                   "files", "name"])


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory):
    bundle = make_fake_bundle(tmp_path_factory.mktemp("fuzz") / "fuzz.rtsvc")
    return bundle, json.loads((bundle / MANIFEST).read_text())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(manifest_fields, json_values, max_size=4),
       file_entry=st.tuples(st.sampled_from(["dit.onnx", "vocoder.onnx", "extra/weights.bin"])
                            | st.text(max_size=10), json_values) | st.none())
@example(changes={}, file_entry=("\n", 0))  # found by this test: a newline in a file name split the error
def test_any_manifest_reads_or_gives_one_line_user_error(fuzz_bundle, changes, file_entry):
    bundle, good = fuzz_bundle
    manifest = {**json.loads(json.dumps(good)), **changes}
    if file_entry is not None and isinstance(manifest.get("files"), dict):
        manifest["files"][file_entry[0]] = file_entry[1]
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    try:
        loaded = read_bundle(bundle)
    except UserError as err:
        assert str(err).startswith(f"bundle {bundle}") and "\n" not in str(err)
        return
    assert isinstance(loaded.speakers, dict) and loaded.sample_rate > 0
    assert loaded.file("dit.onnx").is_file()
