"""Formant shift of model voices (rtsvc/dsp/formant_warp.py): the generated mel is warped along
frequency before the vocoder, so the spectral envelope moves by the factor while F0 stays put.

The sound test needs a vocoder whose output follows its mel: random tiny weights do not. So the
backend here samples a known mel (two formant peaks) and vocodes it as a harmonic series of the F0 it
is given, each harmonic as loud as the mel at its frequency. The voice (features, sampling, the warp
hook, the vocoder's F0) is the real ModelVoice; output F0 is measured with pyworld and the envelope as
the spectral centroid of the output.
"""

import numpy as np
import pytest
import pyworld
import torch

from rtsvc.dsp.audio import HOP_LENGTH, N_MELS, SAMPLE_RATE
from rtsvc.dsp.formant_warp import mel_centres, warp_formants, warp_matrix
from rtsvc.dsp.mel import normalize_mel
from rtsvc.dsp.signals import sung_tone
from rtsvc.pretrained import resolve_pretrained
from rtsvc.settings import KNOB_ROWS, Knobs, knob_spec
from rtsvc.voices.batch import run_jobs
from rtsvc.voices.model import ModelVoice
from rtsvc.voices.spec import VoiceSpec, open_model
from tests.tiny_encoders import make_tiny_pretrained_dir
from tests.tiny_models import make_tiny_dit_checkpoint

FORMANTS_HZ = (600.0, 2200.0)


def envelope_mel() -> torch.Tensor:
    """A log-mel column [128] with two formant peaks over a low floor."""
    centres = mel_centres()
    log_mel = np.full(N_MELS, -5.0)
    for f in FORMANTS_HZ:
        log_mel += 3.0 * np.exp(-0.5 * (np.log(centres / f) / 0.2) ** 2)
    return torch.tensor(log_mel, dtype=torch.float32)


class EnvelopeBackend:
    """Samples the known mel in every frame; vocodes harmonics of f0 shaped by the (warped) mel."""

    family, student, device = "v2", None, torch.device("cpu")

    def __init__(self, speakers):
        self.speakers = speakers

    def step_velocity(self, x, t, dt, cond, guidance):
        target = normalize_mel(envelope_mel())[None, None, :].expand_as(x)
        return (target - x) / (1.0 - t).clamp_min(1e-6)  # Euler lands on the target at t = 1

    def vocode(self, log_mel, f0, phase, noise):
        centres = mel_centres()
        out = []
        for mel, hz in zip(log_mel, f0, strict=True):
            hz_s = np.repeat(hz.numpy().astype(np.float64), HOP_LENGTH)
            frame = np.minimum(np.arange(len(hz_s)) // HOP_LENGTH, mel.shape[1] - 1)
            cycles = np.cumsum(hz_s) / SAMPLE_RATE
            audio = np.zeros(len(hz_s))
            for k in range(1, 40):
                freq = k * hz_s
                column = mel.numpy()[:, frame]  # [128, samples]
                idx = np.interp(freq, centres, np.arange(N_MELS))
                lo = np.floor(idx).astype(int)
                hi = np.minimum(lo + 1, N_MELS - 1)
                at = np.arange(len(freq))
                level = column[lo, at] * (1 - (idx - lo)) + column[hi, at] * (idx - lo)
                audio += np.where(freq < 16000, np.exp(level), 0.0) * np.sin(2 * np.pi * k * cycles)
            out.append(torch.tensor(0.1 * audio / np.abs(audio).max(), dtype=torch.float32))
        return torch.stack(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("formant")
    ckpt, pretrained = make_tiny_dit_checkpoint(root / "tiny.ckpt"), make_tiny_pretrained_dir(root / "pre")
    paths = resolve_pretrained(pretrained, need=("contentvec", "whisper", "vocoder"))
    return open_model(VoiceSpec(model=ckpt, backend="torch", device="cpu", f0="dio", streaming=False), paths)


def measure(audio: np.ndarray) -> tuple[float, list[float]]:
    """(median F0 Hz of voiced frames, [F1, F2] Hz: the centres of mass of the voiced frames' mean
    spectral envelope (WORLD's F0-adaptive cheaptrick) over its floor, below and above 1300 Hz)."""
    x = audio.astype(np.float64)
    f0, times = pyworld.harvest(x, SAMPLE_RATE, f0_floor=60, f0_ceil=800, frame_period=10.0)
    voiced = f0 > 0
    envelope = pyworld.cheaptrick(x, f0, times, SAMPLE_RATE, fft_size=4096)[voiced].mean(axis=0)
    freqs = np.fft.rfftfreq(4096, 1 / SAMPLE_RATE)
    peaks = []
    for lo, hi in ((300, 1300), (1300, 3500)):
        band = (freqs > lo) & (freqs < hi)
        weight = envelope[band] - envelope[band].min()  # the peak's mass over the band's floor
        peaks.append(float((weight * freqs[band]).sum() / weight.sum()))
    return float(np.median(f0[voiced])), peaks


@pytest.mark.parametrize("factor", [0.8, 1.25])
def test_model_formant_shift_moves_the_envelope_not_f0(tiny, factor):
    voice = ModelVoice(EnvelopeBackend(tiny.backend.speakers), tiny.features, whisper_pad_30s=False)
    audio = sung_tone(1.5, f0=120.0, seed=1)  # low: harmonics sample the envelope finely
    plain = voice.convert(audio, Knobs(steps=3))
    shifted = voice.convert(audio, Knobs(steps=3, formant_shift=factor))
    f0_plain, formants_plain = measure(plain)
    f0_shift, formants_shift = measure(shifted)
    cents = 1200 * abs(np.log2(f0_shift / f0_plain))
    assert cents < 10, (f0_plain, f0_shift)
    for before, after, wanted in zip(formants_plain, formants_shift, FORMANTS_HZ, strict=True):
        assert abs(before / wanted - 1) < 0.12, (before, wanted)  # the measure finds the formants
        assert abs(after / before / factor - 1) < 0.06, (before, after, factor)


def test_warp_moves_a_peak_by_the_factor_and_one_is_identity():
    mel = envelope_mel()[None, :, None]
    assert warp_formants(mel, 1.0) is mel
    centres = mel_centres()
    for factor in (0.7, 1.4):
        warped = warp_formants(mel, factor)[0, :, 0].numpy()
        low = centres < 1200  # the first formant's peak
        peak = centres[low][np.argmax(warped[low])]
        assert abs(peak / (FORMANTS_HZ[0] * factor) - 1) < 0.06, (factor, peak)
    assert np.allclose(warp_matrix(1.3).sum(axis=1), 1.0)  # interpolation: rows sum to 1


def test_formant_knob_applies_to_models_and_batches_equal_alone(tiny):
    assert KNOB_ROWS["formant_shift"].voices == "all"
    assert "formant_shift" in [k["name"] for k in knob_spec("v2")]
    audio = sung_tone(0.6, f0=180.0)
    knobs = Knobs(steps=2, formant_shift=1.3)
    alone = tiny.convert(audio, knobs)
    assert not np.allclose(alone, tiny.convert(audio, Knobs(steps=2)))  # the knob changes the sound
    jobs = [tiny.prepare(audio, knobs), tiny.prepare(audio, Knobs(steps=2, formant_shift=0.8))]
    batched = run_jobs(tiny.backend, jobs)
    np.testing.assert_allclose(batched[0], alone, atol=1e-5)
    np.testing.assert_allclose(batched[1], tiny.convert(audio, jobs[1].knobs), atol=1e-5)
