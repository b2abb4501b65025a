"""The pretrained dir (layout, overrides, errors, download offline) and all features on the mel grid."""

import numpy as np
import pytest
import torch

from benchmarks.feature_windows import window_fidelity
from rtsvc.dsp.audio import HOP_LENGTH, SAMPLE_RATE
from rtsvc.errors import UserError
from rtsvc.features.extractor import FeatureExtractor, Features
from rtsvc.features.f0 import make_f0_extractor
from rtsvc.features.frames import resize_frames
from rtsvc.pretrained import LAYOUT, PretrainedPaths, download_pretrained, resolve_pretrained


@pytest.fixture(scope="module")
def pretrained(tiny_pretrained):
    return tiny_pretrained


@pytest.fixture(scope="module")
def extractor(pretrained):
    return FeatureExtractor.from_pretrained(resolve_pretrained(pretrained), f0="pyworld")


def tone(freq: float, samples: int) -> np.ndarray:
    t = np.arange(samples) / SAMPLE_RATE
    return sum(0.2 / k * np.sin(2 * np.pi * freq * k * t) for k in range(1, 5)).astype(np.float32)


def test_resolve_finds_the_upstream_layout(pretrained):
    paths = resolve_pretrained(pretrained)
    assert paths == PretrainedPaths(**{k: str(pretrained / v) for k, v in LAYOUT.items()})


def test_missing_component_names_it_and_how_to_get_it(pretrained, tmp_path):
    with pytest.raises(UserError) as err:
        resolve_pretrained(tmp_path)
    msg = str(err.value)
    assert "ContentVec" in msg and "rtsvc download --to" in msg and "--contentvec" in msg and "\n" not in msg
    with pytest.raises(UserError, match="RMVPE.*--rmvpe"):
        resolve_pretrained(pretrained, rmvpe=tmp_path / "missing.pt")
    only_vocoder = resolve_pretrained(tmp_path, vocoder=pretrained / LAYOUT["vocoder"], need=("vocoder",))
    assert only_vocoder.vocoder.endswith("model.ckpt") and only_vocoder.contentvec is None


def test_each_component_can_be_overridden(pretrained, tmp_path):
    paths = resolve_pretrained(tmp_path, contentvec=pretrained / LAYOUT["contentvec"],
                               whisper="openai/whisper-large-v3",  # a hub id passes through to transformers
                               vocoder=(pretrained / LAYOUT["vocoder"]).parent,  # folder: its model.ckpt
                               rmvpe=pretrained / LAYOUT["rmvpe"])
    assert paths.whisper == "openai/whisper-large-v3"
    assert paths.vocoder == str(pretrained / LAYOUT["vocoder"])
    assert paths.contentvec == str(pretrained / LAYOUT["contentvec"])


def test_download_offline_fails_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        download_pretrained(tmp_path / "pretrained")
    assert "hub" in str(err.value) and "\n" not in str(err.value)


def test_every_feature_is_on_the_mel_grid(extractor):
    samples = SAMPLE_RATE + 300  # not a multiple of 512: n = len // 512
    feats = extractor.extract(tone(220.0, samples))
    n = samples // HOP_LENGTH
    assert isinstance(feats, Features) and feats.n_frames == n == 86
    assert feats.f0.shape == feats.rms.shape == (n,)
    assert feats.cvec.shape == (n, 768) and feats.whisper.shape == (n, 1280) and feats.mel.shape == (n, 128)
    assert all(t.dtype == torch.float32 for t in (feats.f0, feats.rms, feats.cvec, feats.whisper, feats.mel))
    voiced = feats.f0[feats.f0 > 0].numpy()
    assert len(voiced) > 0.9 * n
    np.testing.assert_allclose(np.median(voiced), 220.0, rtol=0.01)
    np.testing.assert_allclose(feats.rms[3:-3].numpy(), feats.rms[3:-3].mean().item(), rtol=0.02)


def test_pitch_shift_is_applied_to_the_f0_feature(extractor):
    audio = tone(220.0, SAMPLE_RATE // 2)
    up = extractor.extract(audio, semitones=12, with_mel=False)
    assert up.mel is None
    np.testing.assert_allclose(np.median(up.f0[up.f0 > 0].numpy()), 440.0, rtol=0.01)


def test_window_methods_take_any_window(extractor):
    audio16 = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    assert extractor.content(audio16, 43).shape == (43, 768)
    assert extractor.whisper(audio16, 43, pad_to_30s=False).shape == (43, 1280)
    assert extractor.f0(audio16, 43).shape == (43,)


def test_rmvpe_extractor_through_the_pretrained_dir(pretrained, extractor):
    rmvpe = make_f0_extractor("rmvpe", rmvpe_path=resolve_pretrained(pretrained).rmvpe)
    fe = FeatureExtractor(extractor.contentvec, extractor.whisper_encoder, rmvpe)
    feats = fe.extract(tone(220.0, 40 * HOP_LENGTH), with_mel=False)
    assert feats.f0.shape == (40,) and fe.f0_extractor.name == "rmvpe"


def test_resize_frames_nearest_and_linear():
    x = torch.arange(4, dtype=torch.float32)[:, None]  # 4 frames, 1 dim
    assert resize_frames(x, 8)[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    lin = resize_frames(x, 7, mode="linear")[:, 0]
    torch.testing.assert_close(lin, torch.linspace(0, 3, 7))  # align_corners=True keeps both ends
    assert resize_frames(x, 0).shape == (0, 1)


def test_window_fidelity_compares_frames_at_the_same_times():
    audio = np.arange(16000 * 3, dtype=np.float32) + 1.0  # each sample's value is its own time stamp

    def frames(a: np.ndarray) -> torch.Tensor:  # 50 frames/s, a 2-dim feature that encodes the time
        x = torch.from_numpy(a[::320].copy())
        return torch.stack([x, torch.ones_like(x) * 1000.0], dim=-1)

    full = frames(audio)
    same = window_fidelity(full, frames, audio, 0.5, (1.0, 2.5))
    assert same["cos_min"] > 0.999999 and same["rel_mean"] < 1e-6
    shifted = window_fidelity(full, lambda a: frames(a + 16000.0), audio, 0.5, (1.0, 2.5))
    assert shifted["rel_mean"] > 0.5  # a window read one second off is caught
