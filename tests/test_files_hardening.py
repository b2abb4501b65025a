"""File inputs under attack (issue 15): the input is never destroyed, corrupt samples and
malformed manifests are named in one line (exit 2)."""

import json
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import soxr
from rtsvc.training.prepare import normalize_loudness

from rtsvc.backends.bundle import MANIFEST
from rtsvc.settings import Knobs
from tests.cli_helpers import harmonic_tone, run_cli, write_wav
from tests.test_bundle import make_fake_bundle


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


class EchoVoice:
    """Returns its input: the file path's own memory is measured, not a model's."""

    sample_rate = 44100

    def convert(self, audio, knobs, start_sample=0, tail=None):
        return audio.copy()

    def reset(self):
        pass


def phrases_wav(path, minutes: float, rate: int = 16000):
    """Stereo float phrases (2.5 s of tone, 0.5 s of silence), written block by block."""
    phrase = np.concatenate([harmonic_tone(2.5)[: int(2.5 * 44100)], np.zeros(int(0.5 * 44100))])
    phrase = soxr.resample(phrase.astype(np.float32), 44100, rate).astype(np.float32)
    with sf.SoundFile(str(path), "w", rate, 2, subtype="FLOAT") as f:
        for _ in range(int(minutes * 20)):
            f.write(np.stack([phrase, 0.5 * phrase], axis=1))
    return path


def peak_traced_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_long_files_convert_piece_by_piece_in_bounded_memory(tmp_path):
    from rtsvc.offline import convert_file

    short, long = phrases_wav(tmp_path / "short.wav", 1.5), phrases_wav(tmp_path / "long.wav", 6.0)
    peaks = {}
    for name, path in (("short", short), ("long", long)):
        out = tmp_path / f"{name}.out.wav"
        peaks[name] = peak_traced_mb(lambda p=path, o=out: convert_file(EchoVoice(), p, o, Knobs(),
                                                                         target_lufs=None))
        info = sf.info(str(out))
        assert info.samplerate == 44100 and abs(info.duration - sf.info(str(path)).duration) < 0.01
    print(f"peak traced memory: 1.5 min {peaks['short']:.1f} MiB, 6 min {peaks['long']:.1f} MiB")
    # whole-file conversion holds several copies of the input (6 min at 44.1 kHz: 61 MiB each)
    assert peaks["long"] < 1.3 * peaks["short"] and peaks["long"] < 100
    # the echo comes back where it went in: the pieces are joined without gaps or shifts
    x, _ = sf.read(str(long), dtype="float32")
    y, _ = sf.read(str(tmp_path / "long.out.wav"), dtype="float32")
    reference = soxr.resample(x.mean(axis=1), 16000, 44100)[: len(y)]
    voiced = np.abs(reference) > 0.05
    assert np.corrcoef(reference[voiced], y[voiced])[0, 1] > 0.99
