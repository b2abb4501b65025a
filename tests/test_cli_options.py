"""The CLI's shared options: defaults and help from the library's dataclasses, --providers and the
pretrained components reaching open_model from every command, user mistakes in live/serve/bench."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import typer

import rtsvc.autoblock
import rtsvc.bench.blocks
import rtsvc.bench.loopback
import rtsvc.live
import rtsvc.live.devices
import rtsvc.voices.spec
from rtsvc.autoblock import AutoBlock
from rtsvc.bench.blocks import streaming_gap
from rtsvc.commands import cli
from rtsvc.engine import StreamConfig
from rtsvc.settings import Knobs
from rtsvc.voices.defaults import DIT_CONTEXT_MS, DSP_BLOCK_MS, DSP_STREAM, MODEL_BLOCK_MS, MODEL_STREAM
from rtsvc.voices.dsp import DspVoice
from rtsvc.voices.model import ModelVoice
from tests.cli_helpers import harmonic_tone, run_cli, write_wav
from tests.test_cli_errors import fails

ORDER = ["live", "serve", "convert", "devices", "prepare", "train", "distill", "export", "bench", "eval",
         "download", "doctor"]
DEVICES = [{"index": 0, "name": "Fake Mic", "hostapi": "ALSA", "inputs": 1, "outputs": 0,
            "default_rate": 48000, "default_input": True, "default_output": False},
           {"index": 1, "name": "Fake Speaker", "hostapi": "ALSA", "inputs": 0, "outputs": 2,
            "default_rate": 48000, "default_input": False, "default_output": True}]

# what run_live reports beside the engine's counters (its summary line names them)
LIVE_EXTRAS = {"block_ms": 100.0, "trims": 0, "trimmed_ms": 0.0, "e2e_ms_mean": 150.0,
               "algorithmic_ms": 110.0, "buffer_ms_mean": 20.0, "device_latency_ms": 20.0,
               "limited_samples": 0, "block_changes": 0}


def _commands() -> dict:
    return typer.main.get_command(cli.app).commands


def test_commands_are_listed_in_order_of_use():
    assert list(_commands()) == ORDER


def test_every_option_states_its_default_and_knob_defaults_follow_the_dataclasses():
    knobs, stream = Knobs(), StreamConfig()
    from_dataclass = {"block_ms": stream.block_ms, "context_ms": stream.context_ms,
                      "crossfade_ms": stream.crossfade_ms, "sola_search_ms": stream.sola_search_ms}
    from_table = {"pitch_shift": knobs.pitch_shift, "formant_shift": knobs.formant_shift,
                  "gate_db": knobs.gate_db, "input_gain_db": knobs.input_gain_db,
                  "output_gain_db": knobs.output_gain_db, "cfg_strength": knobs.cfg_strength}
    for name, command in _commands().items():
        for param in command.params:
            if param.param_type_name != "option" or param.name == "help":
                continue
            text = param.help or ""
            assert "Default:" in text or "Required." in text, (name, param.name, text)
            if name in ("live", "serve", "convert") and param.name in from_table:
                # None: not typed; the knob's default (the table's) is filled in and stated in --help
                assert param.default is None, (name, param.name)
                assert f"Default: {from_table[param.name]:g}." in text, (name, param.name, text)
            expected = from_dataclass.get(param.name)
            if name == "distill":
                expected = from_table.get(param.name)
            if expected is not None and not (name == "bench" and param.name == "block_ms"):
                # distill: None = the teacher family's default guidance (V2's is the knob's, stated in --help)
                assert param.default == (None if name == "distill" else expected), (name, param.name)
                assert f"Default: {expected:g}." in text, (name, param.name, text)
    steps = {n: next(p for p in c.params if p.name == "steps") for n, c in _commands().items()
             if n in ("live", "serve")}
    # None: the knob's default, or a distilled student's own count (rtsvc.voices.spec.sampling_steps)
    assert all(p.default is None and f"Default: {knobs.steps};" in p.help for p in steps.values())
    for name in ("live", "serve", "convert", "bench"):
        params = {p.name: p for p in _commands()[name].params}
        assert params["dit_context_ms"].default == DIT_CONTEXT_MS == 250.0, name
        assert f"Default: {DIT_CONTEXT_MS:g}." in params["dit_context_ms"].help, name
        block = params["block_ms"]  # auto: both values with their units, in every command
        assert "auto = measured at start on this machine" in block.help, name
        assert "from 23.2 ms for the DSP voice, 150 ms (150.9 ms) with --model" in block.help, name
        for option, lengths in (("crossfade_ms", "12 for the DSP voice, 25 with --model"),
                                ("sola_search_ms", "8 for the DSP voice, 10 with --model")):
            if option in params:  # None: the voice's own, both stated with their voice
                assert params[option].default is None and f"Default: {lengths}." in params[option].help, name
        assert block.default == ("auto" if name != "bench" else "50,100,150,250"), name


@pytest.mark.parametrize("command", ORDER)
def test_help_says_each_default_once_with_real_argument_names(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli([command, "--help"], capsys, monkeypatch)
    assert code == 0
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert usage.strip().startswith(f"Usage: rtsvc {command}") and "{" not in usage, usage
    assert "[default:" not in out  # typer's own copy of the default, next to ours
    for param in _commands()[command].params:
        assert (param.help or "").count("Default:") <= 1, (command, param.name)
    if command != "serve":
        assert "new clients" not in out and "serve:" not in out  # serve's wording stays in serve


@pytest.fixture
def fake_devices(monkeypatch):
    monkeypatch.setattr(rtsvc.live.devices, "list_devices", lambda: DEVICES)


@pytest.mark.parametrize("args,words", [
    (["--block-ms", "5"], ("block must be between 10 and 2000 ms",)),
    (["--crossfade-ms", "500"], ("crossfade must be between 0 and the block length",)),
    (["--providers", "cuda,gpu"], ("unknown ONNX Runtime provider 'gpu'",)),
    (["--input-rate", "0"], ("--input-rate must be between",)),
    (["--jitter-ms", "-1"], ("--jitter-ms must be between 0 and",)),
    (["--jitter-ms", "soon"], ("--jitter-ms must be a number of milliseconds or auto, got 'soon'",)),
    (["--duration", "0"], ("--duration must be positive",)),
    (["--f0", "crepe"], ("unknown --f0 'crepe'",)),
    (["--speaker", "carol"], ("unknown speaker 'carol'", "dsp")),
    (["--input", "no-such-mic"], ("no input device matches 'no-such-mic'",)),
    (["--input", "1"], ("device 1 (Fake Speaker) has no input channels",)),
    (["--block-ms", "fast"], ("--block-ms must be a number of ms or auto, got 'fast'",)),
    (["--dit-context-ms", "-1"], ("--dit-context-ms must be at least 0 ms, got -1",)),
    # a wrong --model is said first, then a wrong device, both before any model loads
    (["--output", "HDMI", "--model", "missing.ckpt"], ("model not found: missing.ckpt",)),
    (["--output", "HDMI"], ("no output device matches 'HDMI'",)),
])
def test_live_mistakes_are_one_line_and_exit_2(args, words, fake_devices, capsys, monkeypatch):
    fails(["live", *args], capsys, monkeypatch, *words)


@pytest.mark.parametrize("args,words", [
    (["--block-ms", "5"], ("block must be between",)),
    (["--block-ms", "100,abc"], ("--block-ms must be a comma-separated list of numbers",)),
    (["--block-ms", ","], ("--block-ms needs at least one value",)),
    (["--block-ms", "auto,fast"], ("--block-ms must be a comma-separated list of numbers",)),
    (["--dit-context-ms", "-5"], ("--dit-context-ms must be at least 0 ms",)),
    (["--crossfades", "x", "--gap"], ("--crossfades must be a comma-separated list",)),
    (["--steps", "1"], ("steps must be between 2 and 64",)),
    (["--providers", "gpu"], ("unknown ONNX Runtime provider 'gpu'",)),
    (["--device", "gpu"], ("unknown --device 'gpu'",)),
    (["--seconds", "0"], ("--seconds must be positive",)),
])
def test_bench_mistakes_are_one_line_and_exit_2(args, words, capsys, monkeypatch):
    fails(["bench", *args], capsys, monkeypatch, *words)


@pytest.mark.parametrize("args,words", [
    (["--block-ms", "5000"], ("block must be between",)),
    (["--providers", "gpu"], ("unknown ONNX Runtime provider 'gpu'",)),
    (["--f0", "crepe"], ("unknown --f0 'crepe'",)),
])
def test_serve_mistakes_are_one_line_and_exit_2(args, words, capsys, monkeypatch):
    fails(["serve", *args], capsys, monkeypatch, *words)


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A bundle folder carrying its vocoder, a pretrained dir without one, and open_model recorded
    (returning the DSP voice, so the commands run end to end in a fraction of a second)."""
    bundle = tmp_path / "voice.rtsvc"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"features": {}}))
    pretrained = tmp_path / "pretrained"
    for folder in ("content-vec-best", "whisper-large-v3"):
        (pretrained / folder).mkdir(parents=True)
        (pretrained / folder / "config.json").write_text("{}")
    (pretrained / "rmvpe").mkdir()
    (pretrained / "rmvpe" / "model.pt").write_bytes(b"x")
    calls = []

    def open_model(spec, pretrained):
        calls.append(dict(vars(spec), path=spec.model, pretrained=pretrained))
        return DspVoice()

    monkeypatch.setattr(rtsvc.voices.spec, "open_model", open_model)
    monkeypatch.setattr(rtsvc.voices.spec, "model_family", lambda model: "v2")  # the manifest is a stub
    return bundle, pretrained, calls


def test_live_passes_providers_and_asks_no_vocoder_of_a_bundle(fake_model, fake_devices, capsys, monkeypatch):
    bundle, pretrained, calls = fake_model
    seen = {}

    def run_live(voice, settings, config, **kwargs):
        seen.update(kwargs, config=config, knobs=settings.snapshot())
        return {"seconds": 1.0, "blocks": 3, "gated_blocks": 1, "compute_ms_mean": 2.0, "compute_ms_p99": 3.0,
                "underruns": 0, "overruns": 0, **LIVE_EXTRAS}

    monkeypatch.setattr(rtsvc.live, "run_live", run_live)
    code, _, err = run_cli(["live", "--model", bundle, "--pretrained-dir", pretrained, "--providers", "cpu",
                            "--pitch", "3", "--block-ms", "100", "--input", "mic", "--dit-context-ms", "100"],
                           capsys, monkeypatch)
    assert code == 0, err
    assert "stopped after 1.0 s: 3 blocks (1 gated)" in err
    (call,) = calls
    assert call["providers"] == "cpu" and call["streaming"] is True and call["f0"] == "rmvpe"
    assert call["dit_context_ms"] == 100.0
    assert call["pretrained"].vocoder is None and call["pretrained"].rmvpe.endswith("model.pt")
    assert seen["input_device"]["index"] == 0 and seen["output_device"]["index"] == 1
    assert seen["monitor_device"] is None
    assert seen["knobs"].pitch_shift == 3.0 and seen["config"].block_ms == 100.0


def test_live_block_is_auto_per_voice_and_explicit_values_win(fake_model, fake_devices, capsys, monkeypatch):
    bundle, pretrained, _ = fake_model
    model = ModelVoice(SimpleNamespace(speakers={"alice": 0}), features=None)  # never converts here
    monkeypatch.setattr(rtsvc.voices.spec, "open_model", lambda *args, **kwargs: model)
    seen = []
    result = {"seconds": 1.0, "blocks": 1, "gated_blocks": 0, "compute_ms_mean": 2.0, "compute_ms_p99": 3.0,
              "underruns": 0, "overruns": 0, **LIVE_EXTRAS}
    jitters = []
    monkeypatch.setattr(rtsvc.live, "run_live", lambda voice, settings, config, **kw: seen.append(config)
                        or jitters.append(kw["jitter_ms"]) or result)
    measured = []  # auto is measured on this machine (tests/test_cpu_cost.py); here: the voice's own
    # block, computed in 1 ms (DSP) or 90 ms (model) on average
    def pick_block(voice, config, knobs=None):
        measured.append(voice)
        mean = 90.0 if voice.speakers == ["alice"] else 1.0
        block = voice.stream_defaults.block_ms
        return AutoBlock(block, [(block, 95.0, mean)])

    monkeypatch.setattr(rtsvc.autoblock, "pick_block", pick_block)
    for args in ([], ["--model", bundle, "--pretrained-dir", pretrained], ["--block-ms", "auto"],
                 ["--model", bundle, "--pretrained-dir", pretrained, "--block-ms", "70"],
                 ["--model", bundle, "--pretrained-dir", pretrained, "--jitter-ms", "25"]):
        code, out, err = run_cli(["live", *args], capsys, monkeypatch)
        assert code == 0, err
    assert [c.block_ms for c in seen] == [DSP_BLOCK_MS, MODEL_BLOCK_MS, DSP_BLOCK_MS, 70.0, MODEL_BLOCK_MS]
    assert [type(v).__name__ for v in measured] == ["DspVoice", "ModelVoice", "DspVoice", "ModelVoice"]
    # auto jitter: the measured block's headroom (23.2 - 1, 150 - 90 ms), at least the voice's floor
    # (20 DSP, 40 model); a given block was not measured (the floor), a given --jitter-ms wins
    assert jitters == [23.0, 60.0, 23.0, MODEL_STREAM.jitter_ms, 25.0]
    assert (DSP_STREAM.jitter_ms, MODEL_STREAM.jitter_ms) == (20.0, 40.0)
    low = AutoBlock(50.0, [(50.0, 30.0, 25.0)])
    assert rtsvc.live.auto_jitter_ms(low, 40.0) == 40.0  # 25 ms of headroom: the 40 ms floor
    assert rtsvc.live.auto_jitter_ms(low, 20.0) == 25.0
    assert (DSP_BLOCK_MS, MODEL_BLOCK_MS) == (23.2, 150.0)


def test_bench_loopback_measures_every_block_and_the_table_has_the_real_time_margin(capsys, monkeypatch):
    measured = []
    monkeypatch.setattr(rtsvc.bench.loopback, "loopback_report",
                        lambda config, args, seconds: measured.append(config) or ("row",) * 11)
    monkeypatch.setattr(rtsvc.autoblock, "pick_block", lambda voice, config, knobs=None: AutoBlock(
        voice.stream_defaults.block_ms, [(voice.stream_defaults.block_ms, 1.0, 1.0)]))  # a quiet machine
    code, out, err = run_cli(["bench", "--block-ms", "auto,100,50", "--seconds", "0.3", "--loopback"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert [c.block_ms for c in measured] == [23.2, 100.0, 50.0]  # auto is 23.2 for the DSP voice
    assert [(c.crossfade_ms, c.sola_search_ms) for c in measured] == [(12.0, 8.0)] * 3  # the DSP voice's
    assert "p99/block" in out
    row = next(line for line in out.splitlines() if "│ dsp" in line and " 104.5 " in line)  # 100 ms: 9 frames
    p99_ms, margin = (float(cell) for cell in row.split("│")[8:12:3])
    assert margin == pytest.approx(p99_ms / 104.5, abs=0.006)


def test_a_checkpoint_still_needs_the_pretrained_vocoder(fake_model, fake_devices, tmp_path, capsys,
                                                         monkeypatch):
    _, pretrained, calls = fake_model
    from tests.tiny_models import make_tiny_dit_checkpoint

    ckpt = make_tiny_dit_checkpoint(tmp_path / "voice.ckpt")  # its family decides what it needs
    fails(["live", "--model", ckpt, "--pretrained-dir", pretrained], capsys, monkeypatch,
          "NSF-HiFiGAN vocoder", "--vocoder")
    fails(["bench", "--model", ckpt, "--pretrained-dir", pretrained], capsys, monkeypatch,
          "NSF-HiFiGAN vocoder")
    assert calls == []


def test_bench_passes_providers_and_gap_uses_the_offline_model(fake_model, capsys, monkeypatch):
    bundle, pretrained, calls = fake_model
    args = ["bench", "--model", bundle, "--pretrained-dir", pretrained, "--providers", "cpu", "--f0",
            "pyworld", "--device", "cpu", "--block-ms", "100", "--steps", "2,4", "--seconds", "0.3", "--gap",
            "--dit-context-ms", "80",
            "--crossfades", "25", "--sola-searches", "10"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert [(c["providers"], c["streaming"], c["f0"], c["device"]) for c in calls] == \
        [("cpu", True, "pyworld", "cpu"), ("cpu", False, "pyworld", "cpu")]
    assert all(c["pretrained"].vocoder is None and c["dit_context_ms"] == 80.0 for c in calls)
    assert out.count("voice.rtsvc auto") == 2  # steps 2 and 4
    assert "voice.rtsvc: streaming vs offline" in out and "dsp: streaming vs offline" in out


class RecordingVoice(DspVoice):
    """A DSP voice that notes which variant converted what: offline reference or streamed blocks."""

    def __init__(self, streaming: bool, log: list):
        super().__init__()
        self.streaming, self.log = streaming, log

    def for_streaming(self) -> "RecordingVoice":
        return RecordingVoice(True, self.log)

    def convert(self, audio, knobs, start_sample=0, tail=None):
        self.log.append((self.streaming, audio.shape[0]))
        return super().convert(audio, knobs, start_sample, tail)


def test_streaming_gap_references_the_offline_voice_and_streams_its_streaming_variant():
    log = []
    config = StreamConfig(block_ms=100.0, context_ms=100.0).validate()
    (row,) = streaming_gap(RecordingVoice(False, log), [config], seconds=1.0)
    offline = [n for streaming, n in log if not streaming]
    assert offline == [44100]  # one offline conversion of the whole signal
    assert len(log) > 5 and all(streaming for streaming, _ in log[1:])  # then block by block
    assert np.isfinite(row["lsd_db"]) and row["block_ms"] == 100.0
    with pytest.raises(ValueError, match="offline voice"):
        streaming_gap(RecordingVoice(True, log), [config], seconds=1.0)


def test_encoder_and_vocoder_context_options_reach_the_voice(fake_model, fake_devices, capsys, monkeypatch):
    bundle, pretrained, calls = fake_model
    monkeypatch.setattr(rtsvc.live, "run_live", lambda voice, settings, config, **kwargs: {
        "seconds": 1.0, "blocks": 3, "gated_blocks": 0, "compute_ms_mean": 2.0, "compute_ms_p99": 3.0,
        "underruns": 0, "overruns": 0, **LIVE_EXTRAS})
    code, _, err = run_cli(["live", "--model", bundle, "--pretrained-dir", pretrained, "--block-ms", "100",
                            "--input", "mic", "--encoder-context-ms", "300", "--vocoder-context", "4"],
                           capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["live", "--model", bundle, "--pretrained-dir", pretrained, "--block-ms", "100",
                            "--input", "mic"], capsys, monkeypatch)
    assert code == 0, err
    assert [(c["encoder_context_ms"], c["vocoder_context"]) for c in calls] == [(300.0, 4), (1000.0, 8)]
    for name in ("live", "serve", "convert", "bench"):  # None: not typed; VoiceSpec's default, in --help
        params = {p.name: p for p in _commands()[name].params}
        assert params["encoder_context_ms"].default is None and "Default: 1000." in params[
            "encoder_context_ms"].help, name
        assert params["vocoder_context"].default is None and "Default: 8." in params["vocoder_context"].help


@pytest.mark.parametrize(("args", "message"), [
    (["live", "--encoder-context-ms", "50"], "--encoder-context-ms must be a number of ms from 100 on"),
    (["live", "--encoder-context-ms", "nan"], "--encoder-context-ms must be"),
    (["live", "--vocoder-context", "-1"], "--vocoder-context must be 0 to 64 mel frames, got -1"),
    (["bench", "--vocoder-context", "65"], "--vocoder-context must be 0 to 64 mel frames, got 65"),
    (["convert", "in.wav", "out.wav", "--stream", "--encoder-context-ms", "0"], "--encoder-context-ms must"),
])
def test_bad_encoder_or_vocoder_context_is_one_line(args, message, fake_model, fake_devices, capsys,
                                                    monkeypatch, tmp_path):
    bundle, pretrained, calls = fake_model
    if args[0] == "convert":
        write_wav(tmp_path / "in.wav", harmonic_tone(0.5))
        args = ["convert", str(tmp_path / "in.wav"), str(tmp_path / "out.wav"), *args[3:]]
    code, _, err = run_cli([*args, "--model", bundle, "--pretrained-dir", pretrained], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert calls == []  # refused before any model opens
