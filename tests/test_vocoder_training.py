"""The stand-in vocoder trainer (rtsvc.training.vocoder): it learns, and what it writes is an openvpi
NSF-HiFiGAN that rtsvc's own loader reads and that sounds like what it was trained on."""

import json
import time

import numpy as np
import pytest
import torch
from rtsvc.training.vocoder import ActiveClock, VocoderTraining, load_clips, stft_loss, train_vocoder

from rtsvc.dsp.audio import HOP_LENGTH, SAMPLE_RATE, save_audio
from rtsvc.dsp.mel import log_mel_spectrogram
from rtsvc.errors import UserError
from rtsvc.models.loading import load_vocoder
from rtsvc.models.vocoder import draw_source_randomness

pytestmark = pytest.mark.usefixtures("one_thread")


def _voice_like(f0: float, seconds: float = 1.0) -> np.ndarray:
    """A harmonic tone with vibrato and a falling spectrum (WORLD tracks it), 44.1 kHz."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / SAMPLE_RATE
    audio = sum(np.sin(k * phase) / k for k in range(1, 12))
    return (0.3 * audio / np.abs(audio).max()).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocoder-clips")
    (folder / "spk").mkdir()
    for i, f0 in enumerate((140.0, 220.0)):
        save_audio(folder / "spk" / f"{i}.wav", _voice_like(f0))
    return folder


def test_stft_loss_is_zero_for_identical_audio_and_grows_with_difference():
    audio = torch.from_numpy(_voice_like(200.0, 0.3))[None]
    assert stft_loss(audio, audio).item() == pytest.approx(0.0, abs=1e-5)
    slightly = stft_loss(audio * 0.9, audio).item()
    assert 0 < slightly < stft_loss(torch.roll(audio, 4000, -1) * 0.3, audio).item()


def test_clips_get_mel_and_f0_per_frame(clips):
    loaded = load_clips(clips, f0="pyworld")
    assert len(loaded) == 2
    for clip, f0 in zip(loaded, (140.0, 220.0), strict=True):
        n = clip.mel.shape[1]
        assert clip.audio.shape == (n * HOP_LENGTH,) and clip.f0.shape == (n,)
        voiced = clip.f0[clip.f0 > 0]
        assert len(voiced) > 0.8 * n
        assert float(voiced.median()) == pytest.approx(f0, rel=0.05)


def test_training_lowers_the_loss_and_the_saved_vocoder_loads_and_reproduces_the_model(clips, tmp_path):
    out = tmp_path / "vocoder"
    cfg = VocoderTraining(clips=clips, out=out, max_steps=60, channels=32, segment_frames=8, batch_size=2,
                          f0="pyworld", log_every=5)
    result = train_vocoder(cfg)
    assert result["steps"] == 60
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged][:3] == [1, 5, 10] and logged[-1]["step"] == 60
    first, last = logged[0], logged[-1]
    assert last["loss"] < 0.8 * first["loss"], logged
    assert last["mel_l1"] < 0.85 * first["mel_l1"], logged

    # the official layout: weight-norm pairs in "generator", config.json beside it; the normal loader
    raw = torch.load(out / "model.ckpt", weights_only=True)
    assert "conv_pre.weight_g" in raw["generator"] and "conv_pre.weight" not in raw["generator"]
    config = json.loads((out / "config.json").read_text())
    assert config["upsample_initial_channel"] == 32 and config["rtsvc_training"]["steps"] == 60
    vocoder = load_vocoder(out)

    # it sounds like its training clip: the mel of its output is much closer to the clip's than at step 1
    clip = load_clips(clips, f0="pyworld")[1]
    phase, noise = draw_source_randomness(1, clip.audio.numel(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        audio = vocoder(clip.mel[None], clip.f0[None], phase, noise)
    assert audio.shape == (1, clip.audio.numel())
    error = (log_mel_spectrogram(audio)[0] - clip.mel).abs().mean().item()
    print(f"logged {logged}; full-clip mel L1 {error:.3f}")
    assert error < first["mel_l1"] * 0.85


def test_no_clips_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no .wav files"):
        train_vocoder(VocoderTraining(clips=tmp_path, out=tmp_path / "v", max_steps=1, f0="pyworld"))


def test_active_clock_does_not_count_a_freeze(monkeypatch):
    """A SIGSTOP freeze looks like a jump of the wall clock between two beats: it is subtracted; ordinary
    time (beats on schedule) counts in full."""
    real, jump = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real() + jump[0])
    clock = ActiveClock(beat_s=0.02, gap_s=1.0)
    time.sleep(0.3)
    assert clock.stopped_s == 0.0 and 0.25 < clock.seconds() < 1.0
    jump[0] = 60.0  # the process "was stopped" for a minute
    time.sleep(0.3)
    clock.close()
    assert 59.0 < clock.stopped_s < 60.1
    assert 0.5 < clock.seconds() < 1.5
