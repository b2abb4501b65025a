"""Test signals and metrics for the denoiser: espeak-ng speech, synthetic room noise, SNR, delay.

The noise is built to look like what a voice-changer microphone picks up: broadband hiss (white),
a fan (50 Hz hum with harmonics plus low rumble, slowly wobbling) and keyboard clicks (short
decaying high-passed bursts at random times). Everything is seeded, so runs are comparable.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from scipy import signal

TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "Real time voice conversion needs clean input, so we suppress the background noise first. "
    "Please keep typing while I talk."
)


def speech(sample_rate: int, text: str = TEXT, lead_s: float = 0.5) -> np.ndarray:
    """espeak-ng speech at `sample_rate`, with `lead_s` of silence first (noise-only start)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng not found: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.wav"
        subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True)
        audio, sr = sf.read(str(path), dtype="float32")
    audio = soxr.resample(audio, sr, sample_rate, quality="HQ").astype(np.float32)
    audio = 0.5 * audio / (np.max(np.abs(audio)) + 1e-9)
    lead = np.zeros(int(lead_s * sample_rate), np.float32)
    return np.concatenate([lead, audio, lead]).astype(np.float32)


def noise(n: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """White hiss + fan hum/rumble + keyboard clicks, unit RMS overall."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sample_rate

    white = rng.standard_normal(n)

    wobble = 1.0 + 0.2 * np.sin(2 * np.pi * 0.3 * t)
    hum = sum(np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 7))
    sos = signal.butter(2, 300, "low", fs=sample_rate, output="sos")
    rumble = signal.sosfilt(sos, rng.standard_normal(n))
    fan = wobble * (hum / np.std(hum) + 1.5 * rumble / np.std(rumble))

    clicks = np.zeros(n)
    sos_hp = signal.butter(2, 1500, "high", fs=sample_rate, output="sos")
    click_len = int(0.008 * sample_rate)
    env = np.exp(-np.arange(click_len) / (0.0015 * sample_rate))
    for start in np.sort(rng.integers(0, max(1, n - click_len), size=max(1, int(6 * n / sample_rate)))):
        burst = signal.sosfilt(sos_hp, rng.standard_normal(click_len)) * env * rng.uniform(0.5, 1.5)
        clicks[start:start + click_len] += burst

    def unit(x: np.ndarray) -> np.ndarray:
        return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)

    mix = 0.35 * unit(white) + 0.45 * unit(fan) + 0.45 * unit(clicks)
    return unit(mix).astype(np.float32)


def mix_at_snr(clean: np.ndarray, noise_: np.ndarray, snr_db: float) -> np.ndarray:
    """clean + noise scaled so that 10*log10(P_clean / P_noise) == snr_db."""
    p_clean = np.mean(clean.astype(np.float64) ** 2)
    p_noise = np.mean(noise_.astype(np.float64) ** 2)
    gain = np.sqrt(p_clean / (p_noise * 10 ** (snr_db / 10)))
    return (clean + gain * noise_).astype(np.float32)


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Plain SNR of `estimate` against `reference` (same length, already aligned)."""
    ref = reference.astype(np.float64)
    err = ref - estimate.astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / max(np.sum(err ** 2), 1e-20)))


def estimate_delay(reference: np.ndarray, delayed: np.ndarray, max_lag: int) -> int:
    """Lag (samples, 0..max_lag) at which `delayed` best matches `reference`, by cross-correlation."""
    n = min(len(reference), len(delayed))
    size = 1 << int(np.ceil(np.log2(2 * n)))
    xc = np.fft.irfft(np.fft.rfft(delayed[:n], size) * np.conj(np.fft.rfft(reference[:n], size)), size)
    return int(np.argmax(xc[:max_lag + 1]))


def aligned_snr(clean: np.ndarray, output: np.ndarray, delay: int, skip: int = 0) -> float:
    """SNR of output[delay:] against clean[:-delay], ignoring the first `skip` samples (warm-up)."""
    n = len(output) - delay
    return snr_db(clean[skip:n], output[delay + skip:delay + n])


def stream(process, audio: np.ndarray, block: int) -> np.ndarray:
    """Feed `audio` through `process` in blocks of `block` samples (the last block may be short)."""
    return np.concatenate([process(audio[i:i + block]) for i in range(0, len(audio), block)])
