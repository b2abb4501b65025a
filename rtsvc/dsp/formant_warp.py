"""Formant (timbre) shift of a model voice: a frequency warp of the generated log-mel before the vocoder.

The NSF vocoder takes F0 separately (its harmonic source), so stretching the mel along frequency moves
the spectral envelope (formants, brightness) while the pitch stays where F0 puts it. Output mel bin b
(centre frequency f_b) takes the input log-mel at f_b / factor, interpolated linearly in log-mel
between the neighbouring bins' centres; past the ends it reuses the end bins (as the DSP voice's
`shift_envelope`). One [128, 128] matrix per factor (cached): a warp is one small matmul per block.
"""

from functools import lru_cache

import numpy as np
import torch

from rtsvc.dsp.audio import FMAX, FMIN, N_MELS
from rtsvc.dsp.mel import _hz_to_mel, _mel_to_hz

NEUTRAL = 1e-6  # |factor - 1| below this: no warp at all (the mel passes untouched)


def mel_centres(n_mels: int = N_MELS, fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """Centre frequency (Hz) of each slaney mel bin of the vocoder's mel [n_mels]."""
    edges = np.linspace(_hz_to_mel(np.array([fmin]))[0], _hz_to_mel(np.array([fmax]))[0], n_mels + 2)
    return _mel_to_hz(edges)[1:-1]


@lru_cache(maxsize=32)
def warp_matrix(factor: float, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, n_mels] W with warped = W @ log_mel: row b interpolates the input at f_b / factor."""
    centres = mel_centres(n_mels)
    source = np.interp(centres / factor, centres, np.arange(n_mels, dtype=np.float64))  # clamps at ends
    lo = np.floor(source).astype(np.int64)
    hi = np.minimum(lo + 1, n_mels - 1)
    frac = source - lo
    matrix = np.zeros((n_mels, n_mels))
    rows = np.arange(n_mels)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix.astype(np.float32)


def warp_formants(log_mel: torch.Tensor, factor: float) -> torch.Tensor:
    """log-mel [b, 128, frames] with its envelope stretched by `factor` (> 1 brighter, < 1 darker);
    factor 1 returns the input itself."""
    if abs(factor - 1.0) < NEUTRAL:
        return log_mel
    matrix = torch.from_numpy(warp_matrix(float(factor), log_mel.shape[-2])).to(log_mel.device, log_mel.dtype)
    return torch.einsum("ij,bjn->bin", matrix, log_mel)
