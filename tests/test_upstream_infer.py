"""`rtsvc convert` against a transcription of upstream's offline path (tests/upstream/v3_infer.py,
c03fa59's infer.py), on the same checkpoint, encoders, input and noise: slicing, loudness, frame grid,
RMVPE's resampler, features, sampler, vocoder and joins together. Then each listed difference alone."""

import numpy as np
import pytest
import soundfile as sf
import torch

from rtsvc.models.flow import frame_noise
from rtsvc.pretrained import LAYOUT
from rtsvc.voices.model import vocoder_source
from tests.cli_helpers import SR, harmonic_tone, run_cli, write_wav
from tests.tiny_encoders import make_tiny_pretrained_dir
from tests.upstream.fixtures import make_v3_head

SEED, STEPS, KEY = 3, 6, 2


def multi_slice_input() -> np.ndarray:
    """~12 s of voice-like phrases at different levels and pitches between silences: a leading
    silence, long gaps (dropped), a 0.3 s gap (upstream's medium-silence case) and a short one; no slice
    is a whole number of 512-sample frames."""
    rng = np.random.default_rng(7)
    parts = [np.zeros(int(0.37 * SR)), harmonic_tone(3.31, 140.0, 0.25, vibrato=0.03),
             np.zeros(int(0.9 * SR)),
             harmonic_tone(3.17, 210.0, 0.08, vibrato=0.02), np.zeros(int(0.3 * SR)),
             harmonic_tone(3.05, 175.0, 0.4, vibrato=0.04), np.zeros(int(0.15 * SR)),
             harmonic_tone(1.2, 120.0, 0.2), np.zeros(int(0.61 * SR))]
    audio = np.concatenate(parts).astype(np.float32)
    return audio + (1e-4 * rng.standard_normal(len(audio))).astype(np.float32)  # not digital silence


@pytest.fixture(scope="module")
def v3_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream_infer")
    ckpt, _ = make_v3_head(root / "v3.ckpt")
    return ckpt, make_tiny_pretrained_dir(root / "pretrained")


def upstream_output(audio, ckpt, pretrained, **options):
    from rtsvc.features.rmvpe import Rmvpe
    from rtsvc.models.loading import load_vocoder
    from tests.upstream.v3_infer import infer, load_models

    svc, vocoder, rmvpe, hubert, rms, spk2idx = load_models(
        ckpt, Rmvpe.load(pretrained / LAYOUT["rmvpe"]), load_vocoder(pretrained / LAYOUT["vocoder"]),
        pretrained / LAYOUT["contentvec"])
    return infer(audio, svc, vocoder, rmvpe, hubert, rms, spk2idx["bob"],
                 noise_for=lambda start, n: frame_noise(start // 512, n, SEED)[None],
                 source_for=lambda start, f0: vocoder_source(f0, 0, start, SEED), key_shift=KEY,
                 infer_steps=STEPS, **options)


def rtsvc_convert(src, out, ckpt, pretrained, capsys, monkeypatch, *extra):
    args = ["convert", src, out, "--model", ckpt, "--pretrained-dir", pretrained, "--f0", "rmvpe",
            "--steps", STEPS, "--speaker", "bob", "--device", "cpu", "--seed", SEED, "--pitch", KEY, *extra]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    got, sr = sf.read(out, dtype="float64")
    assert sr == SR
    return got


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_v3_convert_equals_upstream_infer_on_the_same_noise(v3_setup, tmp_path, capsys, monkeypatch):
    ckpt, pretrained = v3_setup
    src = write_wav(tmp_path / "in.wav", multi_slice_input())
    audio, _ = sf.read(src, dtype="float32")  # what both read (torchaudio.load gives the same floats)
    with torch.no_grad():
        want, segments = upstream_output(audio, ckpt, pretrained)
    assert len(segments) >= 3  # several slices, joined with fades
    assert any(n % 512 for _, n in segments)
    got = rtsvc_convert(src, tmp_path / "out.wav", ckpt, pretrained, capsys, monkeypatch)
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.01  # sound, not silence
    # the output file is 16-bit PCM: 1.5e-5 of quantisation is in this bound
    assert np.abs(got - want).max() < 1e-4
