"""A stateless soft limiter: output stays under full scale without a hard clip.

WORLD resynthesis (the DSP voice) and a vocoder can overshoot their input's peak: a 0.99-peak input
at pitch 0 came out with full-scale samples, which a file writer or a device then hard-clips.
Samples under the knee (-1 dBFS) pass untouched; above it a tanh curve bends them
towards CEILING. Being stateless (one sample in, one out), it gives the same samples whichever
block boundaries a stream has, so streaming and offline output still agree.
"""

import numpy as np

KNEE = 10 ** (-1.0 / 20)  # -1 dBFS: everything quieter is left exactly as it is
CEILING = 0.999  # never reached: also stays below full scale after 16-bit rounding


def soft_limit(audio: np.ndarray) -> tuple[np.ndarray, int]:
    """(limited audio as float32, how many samples were above the knee and bent)."""
    audio = np.asarray(audio, dtype=np.float32)
    over = np.abs(audio) > KNEE
    count = int(np.count_nonzero(over))
    if not count:
        return audio, 0
    out = audio.copy()
    x = np.abs(audio[over]).astype(np.float64)
    room = CEILING - KNEE
    out[over] = (np.sign(audio[over]) * (KNEE + room * np.tanh((x - KNEE) / room))).astype(np.float32)
    return out, count
