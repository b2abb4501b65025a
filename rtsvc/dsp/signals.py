"""Test signals for benchmarks and the auto-block measurement."""

import numpy as np

from rtsvc.dsp.audio import SAMPLE_RATE


def sung_tone(seconds: float, sample_rate: int = SAMPLE_RATE, f0: float = 180.0, seed: int = 0) -> np.ndarray:
    """A voice-like test signal: harmonics with vibrato, and a breathy noise gap every second."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / sample_rate
    x = sum(0.15 / k * np.sin(k * phase) for k in range(1, 15))
    noise = 0.02 * np.random.default_rng(seed).standard_normal(t.shape[0])
    gap = (t % 1.0) > 0.85
    return np.where(gap, noise, x).astype(np.float32)
