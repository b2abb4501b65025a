"""The NSF-HiFiGAN log-mel spectrogram and per-frame RMS, exactly as RIFT-SVC computes them.

44.1 kHz, n_fft 2048, hop 512, 128 slaney mel bins from 40 Hz to 16 kHz, reflect padding of
(n_fft - hop) / 2 on both sides with `center=False`, so `n * 512` samples give exactly `n` frames.
"""

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from rtsvc.dsp.audio import FMAX, FMIN, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WIN_LENGTH

LOG_MEL_MIN = -12.0  # the model maps log-mel in [-12, 2] linearly onto [-1, 1]
LOG_MEL_MAX = 2.0
CLAMP_MIN = 1e-5
PAD = (N_FFT - HOP_LENGTH) // 2


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's default)."""
    freq = np.asarray(freq, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = freq / f_sp
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    log_region = freq >= min_log_hz
    mels[log_region] = min_log_mel + np.log(freq[log_region] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    log_region = mels >= min_log_mel
    freqs[log_region] = min_log_hz * np.exp(logstep * (mels[log_region] - min_log_mel))
    return freqs


def _hz_to_mel_htk(freq: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(mels: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mels, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(
    sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
    fmin: float = FMIN, fmax: float = FMAX, htk: bool = False,
) -> np.ndarray:
    """librosa.filters.mel(htk=htk, norm='slaney') re-derived: [n_mels, n_fft // 2 + 1].

    The vocoder's mel uses the slaney scale; RMVPE's front end uses the HTK scale (`htk=True`).
    """
    to_mel, to_hz = (_hz_to_mel_htk, _mel_to_hz_htk) if htk else (_hz_to_mel, _mel_to_hz)
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_points = to_hz(np.linspace(to_mel(np.array([fmin]))[0], to_mel(np.array([fmax]))[0], n_mels + 2))
    fdiff = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    # rounded to float32 before and after the slaney area normalisation, as librosa stores them
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    return weights


def _frames_padded(audio: torch.Tensor) -> torch.Tensor:
    """[b, t] -> [b, t + 2 * PAD] with reflect padding (falls back to replicate for tiny inputs)."""
    mode = "reflect" if audio.shape[-1] > PAD else "replicate"
    return F.pad(audio.unsqueeze(1), (PAD, PAD), mode=mode).squeeze(1)


def log_mel_spectrogram(audio: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Natural-log mel of 44.1 kHz audio: [t] or [b, t] -> [b, 128, t // 512]."""
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if audio.dim() == 1:
        audio = audio.unsqueeze(0)
    window = torch.hann_window(WIN_LENGTH, device=audio.device)
    spec = torch.stft(_frames_padded(audio), N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH,
                      window=window, center=False, return_complex=True)
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    basis = torch.from_numpy(mel_filterbank()).to(audio.device)
    return torch.log(torch.clamp(basis @ magnitude, min=CLAMP_MIN))


def rms_per_frame(audio: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Root mean square over 2048-sample frames every 512 samples: [t] or [b, t] -> [b, t // 512]."""
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if audio.dim() == 1:
        audio = audio.unsqueeze(0)
    frames = _frames_padded(audio).unfold(-1, N_FFT, HOP_LENGTH)
    return torch.sqrt(frames.pow(2).mean(dim=-1))


def normalize_mel(mel: torch.Tensor) -> torch.Tensor:
    """Log-mel -> the model's [-1, 1] range."""
    return (mel - LOG_MEL_MIN) / (LOG_MEL_MAX - LOG_MEL_MIN) * 2 - 1


def denormalize_mel(mel: torch.Tensor) -> torch.Tensor:
    return (mel + 1) / 2 * (LOG_MEL_MAX - LOG_MEL_MIN) + LOG_MEL_MIN
