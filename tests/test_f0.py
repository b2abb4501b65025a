"""F0 extractors (FCPE and WORLD for real, RMVPE's loading/front end/decoder) and mel-grid alignment."""

import sys

import numpy as np
import pytest
import torch

from rtsvc.dsp.audio import HOP_LENGTH, SAMPLE_RATE
from rtsvc.errors import UserError
from rtsvc.features.f0 import f0_to_mel_frames, interpolate_unvoiced, make_f0_extractor, shift_f0
from rtsvc.features.rmvpe import (
    CENTS_OFFSET,
    N_CLASS,
    Rmvpe,
    RmvpeConfig,
    decode_salience,
    mel_filterbank_htk,
)
from tests.tiny_encoders import TINY_RMVPE, make_tiny_rmvpe

SR16 = 16000


def harmonic_tone(freq: float, seconds: float, sr: int = SR16) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return sum(0.3 / k * np.sin(2 * np.pi * freq * k * t) for k in range(1, 6)).astype(np.float32)


def class_hz(c: float) -> float:
    return 10.0 * 2 ** ((20.0 * c + CENTS_OFFSET) / 1200)


@pytest.fixture(scope="module")
def fcpe():
    return make_f0_extractor("fcpe")


@pytest.mark.parametrize("name", ["fcpe", "pyworld", "dio"])
def test_extractor_finds_220_hz_on_the_mel_grid(name, fcpe):
    extractor = fcpe if name == "fcpe" else make_f0_extractor(name)
    f0 = extractor(harmonic_tone(220.0, 1.0))
    assert f0.shape == (SR16 // 160 + 1,)
    n = SAMPLE_RATE // HOP_LENGTH  # mel frames of the same second
    on_grid = f0_to_mel_frames(f0, n)
    assert on_grid.shape == (n,)
    voiced = on_grid[on_grid > 0]
    assert len(voiced) > 0.9 * n
    np.testing.assert_allclose(np.median(voiced), 220.0, rtol=0.01)
    assert np.all(np.abs(1200 * np.log2(voiced[5:-5] / 220.0)) < 30)  # within 30 cents everywhere inside


def test_fcpe_silence_is_unvoiced_and_torchaudio_stub_does_not_leak(fcpe):
    f0 = fcpe(np.zeros(8000, dtype=np.float32))
    assert f0.shape == (51,) and np.all(f0 == 0)
    assert "torchaudio" not in sys.modules or hasattr(sys.modules["torchaudio"], "__file__")


def test_unknown_extractor_lists_valid_names():
    with pytest.raises(UserError, match="rmvpe, fcpe, pyworld"):
        make_f0_extractor("crepe")


def test_rmvpe_without_model_says_how_to_get_it():
    with pytest.raises(UserError, match="rtsvc download"):
        make_f0_extractor("rmvpe", rmvpe_path=None)


# ---------------------------------------------------------------- RMVPE

def test_rmvpe_decoder_on_synthetic_salience():
    t = 6
    sal = torch.zeros(1, t, N_CLASS)
    idx = torch.arange(N_CLASS, dtype=torch.float32)
    centers = [100.0, 100.3, 0.0, 359.0, 200.0, 200.0]
    for i, c in enumerate(centers):
        sal[0, i] = 0.9 * torch.exp(-0.5 * ((idx - c) / 1.5) ** 2)
    sal[0, 5] *= 0.02 / 0.9  # peak 0.02 < threshold 0.03: unvoiced
    f0 = decode_salience(sal)[0]
    assert torch.allclose(f0[0], torch.tensor(class_hz(100.0)), rtol=1e-5)
    assert abs(1200 * np.log2(float(f0[1]) / class_hz(100.3))) < 1.0  # sub-bin accuracy (one bin = 20 cents)
    assert class_hz(0) <= f0[2] < class_hz(2)  # window clipped at the low edge: biased up, still valid
    assert class_hz(357) < f0[3] <= class_hz(359)
    assert f0[4] > 0 and f0[5] == 0


def test_rmvpe_front_end_filterbank_matches_librosa_htk():
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=30, fmax=8000, htk=True)
    np.testing.assert_allclose(mel_filterbank_htk(), ref, rtol=1e-5, atol=1e-7)


def test_rmvpe_full_architecture_has_the_published_key_layout():
    model = Rmvpe()
    keys = model.state_dict()
    assert len(keys) == 801 and sum(p.numel() for p in model.parameters()) == 91_996_477
    assert "unet.tf.layers.4.conv.4.running_var" in keys  # unused timbre filter, kept for strict loading
    assert keys["unet.intermediate.layers.0.conv.0.shortcut.weight"].shape == (512, 256, 1, 1)
    assert keys["fc.0.gru.weight_ih_l0"].shape == (768, 384) and keys["fc.1.weight"].shape == (360, 512)
    assert RmvpeConfig.from_state_dict(keys) == RmvpeConfig()


def test_rmvpe_loads_strictly_and_gives_one_f0_per_10ms(tmp_path):
    path = make_tiny_rmvpe(tmp_path / "rmvpe" / "model.pt")
    extractor = make_f0_extractor("rmvpe", rmvpe_path=path)
    audio = harmonic_tone(220.0, 0.37)
    f0 = extractor(audio)
    assert f0.shape == (len(audio) // 160 + 1,)
    assert np.all((f0 == 0) | ((f0 > 31) & (f0 < 2100)))  # decoded cents stay inside the 360 classes
    model = Rmvpe.load(path)
    assert RmvpeConfig.from_state_dict(model.state_dict()) == TINY_RMVPE
    # a plain state dict (no "model" wrapper) loads the same
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(path, weights_only=True)["model"], plain)
    np.testing.assert_array_equal(Rmvpe.load(plain).f0(audio), f0)


def test_rmvpe_pads_frames_to_a_multiple_of_32_without_changing_the_frames_kept():
    torch.manual_seed(0)
    model = Rmvpe(TINY_RMVPE).eval()
    mel = torch.randn(1, 128, 45)
    out = model.salience(mel)
    assert out.shape == (1, 45, N_CLASS)
    with pytest.raises(RuntimeError):  # the U-Net itself cannot take a length that is not a multiple of 32
        model(mel)


def test_rmvpe_wrong_key_is_refused(tmp_path):
    path = make_tiny_rmvpe(tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)["model"]
    state["cnn.weight_renamed"] = state.pop("cnn.weight")
    bad = tmp_path / "bad.pt"
    torch.save({"model": state}, bad)
    with pytest.raises(UserError, match="cnn.weight"):
        Rmvpe.load(bad)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a PyTorch checkpoint .reading it as a RMVPE model"):
        Rmvpe.load(tmp_path / "junk.pt")


# ---------------------------------------------------------------- mel-grid alignment

def test_unvoiced_frames_are_filled_linearly_between_voiced_ones():
    f0 = np.array([0, 0, 100, 0, 0, 0, 200, 0], dtype=np.float32)
    np.testing.assert_allclose(interpolate_unvoiced(f0), [100, 100, 100, 125, 150, 175, 200, 200])
    assert np.all(interpolate_unvoiced(np.zeros(5)) == 0)


def test_mel_grid_resampling_keeps_unvoiced_zeros_like_upstream():
    f0 = np.zeros(101, dtype=np.float32)  # 1 s at 100 fps
    f0[30:70] = np.linspace(200, 300, 40)
    n = 86
    out = f0_to_mel_frames(f0, n)
    t = np.arange(n) * HOP_LENGTH / SAMPLE_RATE
    assert out.shape == (n,) and out.dtype == np.float32
    inside = (t > 0.31) & (t < 0.68)
    outside = (t < 0.29) | (t > 0.70)
    assert np.all(out[inside] > 0) and np.all(out[outside] == 0)
    np.testing.assert_allclose(out[inside], np.interp(t[inside], np.arange(101) / 100, f0), rtol=1e-6)
    assert np.all(f0_to_mel_frames(np.zeros(50), 20) == 0)
    assert f0_to_mel_frames(np.full(3, 150.0), 10).tolist() == [150.0] * 10  # past the end: held


def test_pitch_shift_multiplies_by_semitone_ratio():
    f0 = np.array([0.0, 220.0, 110.0])
    np.testing.assert_allclose(shift_f0(f0, 12), [0.0, 440.0, 220.0])
    np.testing.assert_allclose(shift_f0(f0, -7), f0 * 2 ** (-7 / 12))
    assert shift_f0(f0, 0) is f0


def test_every_f0_list_reads_the_one_table():
    from rtsvc.features.f0_methods import BY_NAME, DSP_F0, F0_METHODS, MODEL_F0
    from rtsvc.voices.dsp import DspVoice
    from rtsvc.voices.spec import check_f0

    assert MODEL_F0 == ("rmvpe", "fcpe", "pyworld") and DSP_F0 == ("harvest", "dio")
    assert [m.name for m in F0_METHODS if m.weights] == ["rmvpe"]  # the only one with a download
    assert BY_NAME["fcpe"].package == "torchfcpe" and BY_NAME["fcpe"].weights is None
    assert [check_f0(name) for name in MODEL_F0] == list(MODEL_F0) and check_f0(None) == "rmvpe"
    with pytest.raises(UserError, match="unknown --f0 'dio': use rmvpe, fcpe or pyworld"):
        check_f0("dio")  # a DSP tracker, not a model voice's F0
    assert DspVoice("harvest").f0_method == "harvest"
    with pytest.raises(UserError, match="unknown DSP F0 method 'fcpe': use harvest or dio"):
        DspVoice("fcpe")
    made = [make_f0_extractor(name).name for name in ("pyworld", "harvest", "dio")]
    assert made == ["harvest", "harvest", "dio"]


def test_the_f0_needs_only_the_weights_its_row_names(tmp_path):
    from rtsvc.voices.spec import VoiceSpec
    from tests.tiny_models import make_tiny_dit_checkpoint

    ckpt = make_tiny_dit_checkpoint(tmp_path / "m.ckpt")
    assert "rmvpe" in VoiceSpec(model=ckpt).needed_components()
    for name in ("fcpe", "pyworld"):
        assert "rmvpe" not in VoiceSpec(model=ckpt, f0=name).needed_components()
