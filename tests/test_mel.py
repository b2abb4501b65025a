"""The NSF-HiFiGAN log-mel and RMS: filterbank against librosa, frame counts, values on known signals."""

import numpy as np
import pytest
import torch

from rtsvc.dsp.audio import HOP_LENGTH, N_MELS, SAMPLE_RATE
from rtsvc.dsp.mel import (
    denormalize_mel,
    log_mel_spectrogram,
    mel_filterbank,
    normalize_mel,
    rms_per_frame,
)


def test_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=44100, n_fft=2048, n_mels=128, fmin=40, fmax=16000)
    ours = mel_filterbank()
    assert ours.shape == ref.shape == (128, 1025)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("extra", [0, 1, 511])
def test_log_mel_has_one_frame_per_hop(extra):
    n = 37
    audio = np.random.default_rng(0).standard_normal(n * HOP_LENGTH + extra).astype(np.float32) * 0.1
    mel = log_mel_spectrogram(audio)
    assert mel.shape == (1, N_MELS, n)
    assert rms_per_frame(audio).shape == (1, n)


def test_log_mel_of_a_sine_peaks_at_its_frequency_and_is_clamped_in_silence():
    t = np.arange(40 * HOP_LENGTH) / SAMPLE_RATE
    mel = log_mel_spectrogram(0.5 * np.sin(2 * np.pi * 1000 * t))[0]
    centers = mel_filterbank().argmax(axis=1) * SAMPLE_RATE / 2048  # the bin each band peaks at
    peak_band = int(mel[:, 20].argmax())
    assert abs(centers[peak_band] - 1000) < 60
    silent = log_mel_spectrogram(np.zeros(10 * HOP_LENGTH, dtype=np.float32))
    assert torch.allclose(silent, torch.full_like(silent, np.log(1e-5)), atol=1e-3)


def test_rms_of_a_sine_is_amplitude_over_sqrt2():
    t = np.arange(50 * HOP_LENGTH) / SAMPLE_RATE
    rms = rms_per_frame(0.6 * np.sin(2 * np.pi * 441 * t))[0]
    np.testing.assert_allclose(rms[5:-5].numpy(), 0.6 / np.sqrt(2), rtol=2e-3)


def test_model_normalisation_maps_range_onto_unit_interval():
    mel = torch.tensor([-12.0, 2.0, -5.0])
    assert torch.allclose(normalize_mel(mel), torch.tensor([-1.0, 1.0, 0.0]))
    assert torch.allclose(denormalize_mel(normalize_mel(mel)), mel)
