"""File inputs under attack (issue 15): the input is never destroyed, corrupt samples and
malformed manifests are named in one line (exit 2)."""

import json

import numpy as np
import pytest
import soundfile as sf

from rtsvc.backends.bundle import MANIFEST
from tests.cli_helpers import harmonic_tone, run_cli, write_wav
from tests.test_bundle import make_fake_bundle
from tests.tiny_encoders import make_tiny_pretrained_dir
from training.prepare import normalize_loudness


def one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys, monkeypatch):
    wav = write_wav(tmp_path / "same.wav", harmonic_tone(0.5))
    before = wav.read_bytes()
    for output in (wav, tmp_path / "." / "same.wav"):
        code, _, err = run_cli(["convert", wav, output], capsys, monkeypatch)
        assert "refusing to overwrite the input" in one_line_error(code, err)
    assert wav.read_bytes() == before


def test_nan_samples_are_called_non_finite_not_silent(tmp_path, capsys, monkeypatch):
    audio = harmonic_tone(0.5).astype(np.float32)
    audio[1000:1010] = np.nan
    wav = tmp_path / "nan.wav"
    sf.write(wav, audio, 44100, subtype="FLOAT")
    code, _, err = run_cli(["convert", wav, tmp_path / "out.wav"], capsys, monkeypatch)
    line = one_line_error(code, err)
    assert "non-finite samples" in line and "silent" not in line
    assert not (tmp_path / "out.wav").exists()
    with pytest.raises(ValueError, match="10 non-finite samples"):  # prepare's reason for skipping it
        normalize_loudness(audio)


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    return make_tiny_pretrained_dir(tmp_path_factory.mktemp("pretrained"))


@pytest.mark.parametrize("change, field", [({"files": "x"}, '"files" must be an object'),
                                           ({"speakers": 5}, '"speakers" must be an object'),
                                           ({"audio": None}, '"audio" must be an object'),
                                           ({"audio": {"sample_rate": "44100", "hop_length": 512}},
                                            '"audio.sample_rate" must be a positive integer'),
                                           ({"speakers": {"alice": "0"}}, '"speakers" must map')])
def test_malformed_manifest_is_one_line_exit_2(tmp_path, tiny_pretrained, capsys, monkeypatch, change,
                                                field):
    bundle = make_fake_bundle(tmp_path / "voice.rtsvc")
    manifest = json.loads((bundle / MANIFEST).read_text())
    (bundle / MANIFEST).write_text(json.dumps({**manifest, **change}))
    wav = write_wav(tmp_path / "in.wav", harmonic_tone(0.3))
    code, _, err = run_cli(["convert", wav, tmp_path / "out.wav", "--model", bundle, "--pretrained-dir",
                            tiny_pretrained, "--f0", "pyworld"], capsys, monkeypatch)
    line = one_line_error(code, err)
    assert "manifest.json is malformed" in line and field in line, line
