"""Every user mistake in convert/download/doctor: exit code 2, one line naming the problem, no traceback."""

import os

import numpy as np
import pytest
import torch

from tests.cli_helpers import SR, harmonic_tone, run_cli, write_wav
from tests.tiny_models import make_tiny_dit_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_pretrained):
    root = tmp_path_factory.mktemp("errors")
    pretrained = tiny_pretrained
    return {
        "root": root,
        "tone": write_wav(root / "tone.wav", harmonic_tone(0.5)),
        "silent": write_wav(root / "silent.wav", np.zeros(SR // 2, np.float32)),
        "empty": write_wav(root / "empty.wav", np.zeros(0, np.float32)),
        "garbage": _write(root / "garbage.wav", b"this is not audio at all"),
        "ckpt": make_tiny_dit_checkpoint(root / "tiny.ckpt"),
        "pretrained": pretrained,
        "vocoder_ckpt": pretrained / "nsf_hifigan_44.1k_hop512_128bin_2024.02" / "model.ckpt",
        "text_model": _write(root / "notes.ckpt", b"hello"),
    }


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def fails(args, capsys, monkeypatch, *words):
    code, out, err = run_cli(args, capsys, monkeypatch)
    text = (out + err).strip()
    assert code == 2, text
    assert "Traceback" not in text
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _model_args(files, *extra):
    return ["--model", files["ckpt"], "--pretrained-dir", files["pretrained"], "--device", "cpu", *extra]


def test_missing_and_unreadable_input(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.wav"
    fails(["convert", files["root"] / "nope.wav", out], capsys, monkeypatch, "not found", "nope.wav")
    fails(["convert", files["garbage"], out], capsys, monkeypatch, "cannot read audio", "garbage.wav")


def test_empty_and_silent_input(files, tmp_path, capsys, monkeypatch):
    fails(["convert", files["empty"], tmp_path / "o.wav"], capsys, monkeypatch, "empty")
    line = fails(["convert", files["silent"], tmp_path / "o.wav"], capsys, monkeypatch, "input is silent")
    assert "-inf dBFS" in line and "nothing to convert" in line


def test_output_not_writable(files, tmp_path, capsys, monkeypatch):
    blocker = _write(tmp_path / "file", b"x")
    fails(["convert", files["tone"], blocker / "o.wav"], capsys, monkeypatch, "cannot write",
          "not a directory")
    fails(["convert", files["tone"], tmp_path / "o.xyz"], capsys, monkeypatch, "unknown audio format", ".xyz")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        fails(["convert", files["tone"], locked / "o.wav"], capsys, monkeypatch, "not writable")


def test_checkpoint_of_the_wrong_kind(files, tmp_path, capsys, monkeypatch):
    base = ["convert", files["tone"], tmp_path / "o.wav", "--pretrained-dir", files["pretrained"]]
    fails([*base, "--model", files["vocoder_ckpt"]], capsys, monkeypatch,
          "not a RIFT-SVC model checkpoint", "NSF-HiFiGAN")
    fails([*base, "--model", files["text_model"]], capsys, monkeypatch, "not a PyTorch checkpoint")
    fails([*base, "--model", files["root"] / "missing.ckpt"], capsys, monkeypatch, "model not found")
    fails([*base, "--model", files["ckpt"], "--backend", "onnx"], capsys, monkeypatch, ".rtsvc bundle")


def test_unknown_speaker_lists_the_valid_ones(files, tmp_path, capsys, monkeypatch):
    fails(["convert", files["tone"], tmp_path / "o.wav", *_model_args(files, "--speaker", "carol")],
          capsys, monkeypatch, "unknown speaker 'carol'", "alice, bob")


def test_missing_pretrained_component_says_which_and_how_to_get_it(files, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty_pretrained"
    empty.mkdir()
    base = ["convert", files["tone"], tmp_path / "o.wav", "--model", files["ckpt"]]
    fails([*base, "--pretrained-dir", empty], capsys, monkeypatch, "ContentVec", "rtsvc download",
          "--contentvec")
    fails([*base, "--pretrained-dir", files["pretrained"], "--whisper", tmp_path / "no-whisper"],
          capsys, monkeypatch, "Whisper", "no-whisper", "--whisper")
    fails([*base, "--pretrained-dir", files["pretrained"], "--rmvpe", tmp_path / "r.pt"],
          capsys, monkeypatch, "RMVPE", "--rmvpe", "or use --f0 fcpe (no download)")


@pytest.mark.parametrize("option,value,words", [
    ("--steps", "1", ("--steps must be between 2 and 64",)),
    ("--steps", "100", ("--steps must be between 2 and 64",)),
    ("--cfg-strength", "11", ("--cfg-strength must be between 0 and 10",)),
    ("--cfg-strength", "-1", ("--cfg-strength must be between 0 and 10",)),
    ("--pitch", "48", ("--pitch must be within ±36 semitones, got 48",)),
    ("--pitch", "100", ("--pitch must be within ±36 semitones, got 100",)),
    ("--formant", "3", ("--formant must be between 0.5 and 2, got 3",)),
    ("--schedule", "cosine", ("--schedule must be one of uniform, sway, epss, got 'cosine'",)),
    ("--f0", "crepe", ("unknown --f0", "rmvpe, fcpe or pyworld")),
])
def test_out_of_range_options(files, tmp_path, capsys, monkeypatch, option, value, words):
    fails(["convert", files["tone"], tmp_path / "o.wav", option, value], capsys, monkeypatch, *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(files, tmp_path, capsys, monkeypatch):
    args = ["convert", files["tone"], tmp_path / "o.wav", "--model", files["ckpt"], "--pretrained-dir",
            files["pretrained"], "--device", "cuda"]
    fails(args, capsys, monkeypatch, "no CUDA GPU")


def test_download_offline_is_one_clear_line_naming_what_is_needed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(["download", "--to", tmp_path / "pre", "--voice", "pretrain-v3-768-12"],
                             capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert "[1/5] ContentVec: Pur1zumu/RIFT-SVC-modules (content-vec-best/*)" in err  # progress steps
    line = err.strip().splitlines()[-1]
    for needed in ("download of ContentVec from the Hugging Face hub failed", "Pur1zumu/RIFT-SVC-modules",
                   "nsf_hifigan_44.1k_hop512_128bin_2024.02/*", "rmvpe/*", "openai/whisper-large-v3",
                   "model.safetensors", "Pur1zumu/RIFT-SVC-pretrained (pretrain-v3_dit-768-12.ckpt)"):
        assert needed in line, needed
    fails(["download", "--voice", "pretrain-v9"], capsys, monkeypatch, "unknown --voice 'pretrain-v9'")


@pytest.mark.parametrize("inputs, outputs, kind", [(0, 2, "input"), (2, 0, "output")])
def test_live_without_an_audio_device_says_rtsvc_is_installed(inputs, outputs, kind, capsys, monkeypatch):
    """The install line ends in `rtsvc live`; on a machine without a sound card it fails (exit 2) with
    a line that says the install worked and names the command that lists devices."""
    import rtsvc.live.devices

    only = {"index": 0, "name": "null", "hostapi": "ALSA", "inputs": inputs, "outputs": outputs,
            "default_rate": 48000, "default_input": True, "default_output": True, "pulse": None}
    monkeypatch.setattr(rtsvc.live.devices, "list_devices", lambda: [only])
    fails(["live", "--pitch", "5"], capsys, monkeypatch, "rtsvc is installed",
          f"only an audio {kind} device is missing", "`rtsvc devices`")


def test_doctor_reports_and_exits_zero(files, capsys, monkeypatch):
    code, out, err = run_cli(["doctor", "--pretrained-dir", files["pretrained"]], capsys, monkeypatch)
    assert code == 0, err
    for word in ("python", "torch", "onnxruntime", "cpu", "contentvec", "whisper", "vocoder", "rmvpe",
                 "audio"):
        assert word in out, word
    assert "missing" not in out  # the tiny pretrained dir is complete
    code, out, _ = run_cli(["doctor", "--pretrained-dir", files["root"] / "none"], capsys, monkeypatch)
    assert code == 0 and "missing" in out and "rtsvc download" in out


@pytest.mark.parametrize("command", ["live", "serve", "convert", "bench", "export"])
def test_a_wrong_model_path_is_reported_before_missing_components(command, files, tmp_path, capsys,
                                                                     monkeypatch):
    """With no pretrained components at all, the first thing said is still that --model is wrong."""
    missing, empty = files["root"] / "no-such-voice.ckpt", tmp_path / "empty-pretrained"
    empty.mkdir()
    args = {"live": ["live", "--model", missing, "--input", "no-such-mic"],
            "serve": ["serve", "--model", missing, "--port", "0"],
            "convert": ["convert", files["tone"], tmp_path / "o.wav", "--model", missing],
            "bench": ["bench", "--model", missing, "--seconds", "0.5"],
            "export": ["export", missing, "--out", tmp_path / "o.rtsvc"]}[command]
    line = fails([*args, "--pretrained-dir", empty], capsys, monkeypatch, "no-such-voice.ckpt")
    assert "not found" in line and "ContentVec" not in line and "vocoder" not in line.lower()


def test_distill_mistakes_are_one_line(files, tmp_path, capsys, monkeypatch):
    base = ["distill", "--teacher", files["ckpt"], "--data", tmp_path, "--out", tmp_path / "run",
            "--device", "cpu"]
    fails([*base, "--nfe", "3"], capsys, monkeypatch, "--nfe must be 1 or 2")
    fails([*base, "--cfg-strength", "11"], capsys, monkeypatch, "--cfg-strength must be between 0 and 10")
    fails([*base, "--spk-cfg-strength", "-1"], capsys, monkeypatch, "--spk-cfg-strength must be between 0")
    fails(base, capsys, monkeypatch, "is not prepared", "rtsvc prepare")
    fails(["convert", files["tone"], tmp_path / "o.wav", *_model_args(files, "--schedule", "cosine")], capsys,
          monkeypatch, "--schedule must be one of uniform, sway, epss")
