"""Upstream's `--robust-f0` (RIFT-SVC c03fa59, rift_svc/utils.py): RMVPE's F0 on the mel grid
checked against WORLD's DIO + StoneMask and Praat's autocorrelation pitch (praat-parselmouth).

Level 1 (`ensemble_light`) keeps RMVPE's F0 and only fills frames RMVPE calls unvoiced where
another tracker hears pitch and the frame's RMS passes 0.05; level 2 (`ensemble`) takes the
median of the three, replaces outliers (> 96 Hz off a 41-frame running median) by that median,
and where one tracker is silent takes whichever of the other two is nearer the running median.
All three trackers run on the mel grid (512 / 44100 s steps) of the loudness-normalised 44.1 kHz
slice, 40-1100 Hz.
"""

import warnings

import numpy as np

from rtsvc.errors import UserError

F0_MIN, F0_MAX = 40.0, 1100.0  # upstream infer.py
LIGHT_RMS_THRESHOLD = 0.05
LEVELS = (0, 1, 2)


def slide_nanmedian(signal: np.ndarray, win_length: int = 3) -> np.ndarray:
    """Running median over `win_length` frames (clipped at the ends), ignoring NaN."""
    signal = np.asarray(signal, dtype=np.float64)
    out = np.empty_like(signal)
    half = win_length // 2
    for i in range(len(signal)):
        window = signal[max(0, i - half):min(len(signal), i + half + 1)]
        finite = window[~np.isnan(window)]
        out[i] = np.median(finite) if finite.size else np.nan
    return out


def f0_world(audio: np.ndarray, sample_rate: int, time_step: float) -> np.ndarray:
    """DIO + StoneMask every `time_step` s; unvoiced NaN, 3-frame NaN-median smoothed."""
    import pyworld

    x = np.asarray(audio, dtype=np.float64)
    f0, times = pyworld.dio(x, sample_rate, f0_floor=F0_MIN, f0_ceil=F0_MAX, frame_period=time_step * 1000)
    f0 = pyworld.stonemask(x, f0, times, sample_rate)
    f0[f0 == 0] = np.nan
    return slide_nanmedian(f0, 3)


def f0_praat(audio: np.ndarray, sample_rate: int, time_step: float) -> np.ndarray:
    """Praat's accurate autocorrelation pitch every `time_step` s; unvoiced NaN, smoothed as above."""
    try:
        import parselmouth
    except ImportError as err:
        raise UserError(f"--robust-f0 needs praat-parselmouth (pip install praat-parselmouth): {err}") \
            from None
    sound = parselmouth.Sound(np.asarray(audio, dtype=np.float64), sampling_frequency=sample_rate)
    pitch = sound.to_pitch_ac(
        time_step=time_step, voicing_threshold=0.6, pitch_floor=F0_MIN, pitch_ceiling=F0_MAX,
        very_accurate=True, octave_jump_cost=0.5)
    f0 = pitch.selected_array["frequency"].astype(np.float64)
    f0[f0 == 0] = np.nan
    return slide_nanmedian(f0, 3)


def _aligned(rmvpe_f0: np.ndarray, world: np.ndarray, praat: np.ndarray) -> np.ndarray:
    """[3, n]: WORLD cut to RMVPE's frames, Praat padded with NaN to as many (it frames fewer)."""
    n = len(rmvpe_f0)
    world = world[:n]
    praat = np.concatenate([praat, np.full(max(0, len(world) - len(praat)), np.nan)])[:len(world)]
    return np.stack([world, praat, np.asarray(rmvpe_f0, dtype=np.float64)[:len(world)]])


def ensemble(rmvpe_f0: np.ndarray, world: np.ndarray, praat: np.ndarray) -> np.ndarray:
    """Level 2: the outlier-filtered median of the three trackers (0 = unvoiced)."""
    stack = _aligned(rmvpe_f0, world, praat)
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, as upstream
            median = np.nanmedian(stack, axis=0)
            nans = np.isnan(stack).sum(axis=0)
            median[nans >= 2] = np.nan
            running = slide_nanmedian(median, 41)
            off = np.abs(median - running) > 96
            median[off] = running[off]
            one = nans == 1
            low, high = np.nanmin(stack[:, one], axis=0), np.nanmax(stack[:, one], axis=0)
            median[one] = np.where(np.abs(low - running[one]) < np.abs(high - running[one]), low, high)
    median = slide_nanmedian(median, 3)
    median[nans >= 2] = np.nan
    median[np.isnan(median)] = 0
    return median


def ensemble_light(rmvpe_f0: np.ndarray, world: np.ndarray, praat: np.ndarray,
                   rms: np.ndarray | None = None, rms_threshold: float = LIGHT_RMS_THRESHOLD) -> np.ndarray:
    """Level 1: RMVPE's F0, with frames it calls unvoiced filled by the median of the trackers that
    hear pitch there (only where `rms` passes `rms_threshold`, when given)."""
    stack = _aligned(rmvpe_f0, world, praat)
    world, praat, rmvpe = stack
    out = rmvpe.copy()
    fill = (rmvpe == 0) & ((~np.isnan(world) & (world > 0)) | (~np.isnan(praat) & (praat > 0)))
    if rms is not None:
        fill &= np.asarray(rms)[:len(fill)] > rms_threshold
    for i in np.flatnonzero(fill):
        values = stack[:, i][~np.isnan(stack[:, i]) & (stack[:, i] > 0)]
        if values.size:
            out[i] = np.median(values)
    out[np.isnan(out)] = 0
    return out


def robust_f0(level: int, rmvpe_f0: np.ndarray, audio_44k: np.ndarray, sample_rate: int, hop_length: int,
              rms: np.ndarray | None = None) -> np.ndarray:
    """`rmvpe_f0` (Hz on the mel grid, unshifted) checked by WORLD and Praat at `level` 1 or 2."""
    if level not in LEVELS:
        raise UserError(f"--robust-f0 takes 0, 1 or 2, got {level}")
    if level == 0:
        return np.asarray(rmvpe_f0, dtype=np.float64)
    step = hop_length / sample_rate
    world, praat = f0_world(audio_44k, sample_rate, step), f0_praat(audio_44k, sample_rate, step)
    if level == 1:
        return ensemble_light(rmvpe_f0, world, praat, rms)
    return ensemble(rmvpe_f0, world, praat)
