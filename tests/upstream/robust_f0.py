"""rift_svc/utils.py at c03fa59: `get_f0_pw`, `get_f0_pm`, `slide_nanmedian` (numba there, plain
Python here), `f0_ensemble`, `f0_ensemble_light`: infer.py's --robust-f0 1 and 2."""
# ruff: noqa: E501 - upstream's lines

import numpy as np
import parselmouth as pm
import pyworld as pw


def get_f0_pw(audio, sr, time_step, f0_min, f0_max):
    pw_pre_f0, times = pw.dio(audio.astype(np.double), sr, f0_floor=f0_min, f0_ceil=f0_max, frame_period=time_step * 1000)
    pw_post_f0 = pw.stonemask(audio.astype(np.double), pw_pre_f0, times, sr)
    pw_post_f0[pw_post_f0 == 0] = np.nan
    return slide_nanmedian(pw_post_f0, 3)


def get_f0_pm(audio, sr, time_step, f0_min, f0_max):
    pmac_pitch = pm.Sound(audio, sampling_frequency=sr).to_pitch_ac(
        time_step=time_step, voicing_threshold=0.6, pitch_floor=f0_min, pitch_ceiling=f0_max,
        very_accurate=True, octave_jump_cost=0.5)
    pmac_f0 = pmac_pitch.selected_array['frequency']
    pmac_f0[pmac_f0 == 0] = np.nan
    return slide_nanmedian(pmac_f0, 3)


def slide_nanmedian(signals=np.array([]), win_length=3):
    filtered = np.empty_like(signals)
    for i in range(signals.shape[0]):
        start = max(0, i - win_length // 2)
        end = min(signals.shape[0], i + win_length // 2 + 1)
        filtered[i] = np.nanmedian(signals[start:end])
    return filtered


def f0_ensemble(rmvpe_f0, pw_f0, pmac_f0):
    trunc_len = len(rmvpe_f0)
    pw_f0 = pw_f0[:trunc_len]
    pmac_f0 = np.concatenate([pmac_f0, np.full(len(pw_f0) - len(pmac_f0), np.nan, dtype=pmac_f0.dtype)])
    stack_f0 = np.stack([pw_f0, pmac_f0, rmvpe_f0], axis=0)
    meadian_f0 = np.nanmedian(stack_f0, axis=0)
    nan_nums = np.sum(np.isnan(stack_f0), axis=0)
    meadian_f0[nan_nums >= 2] = np.nan
    slide_meadian_f0 = slide_nanmedian(meadian_f0, 41)
    f0_dev = np.abs(meadian_f0 - slide_meadian_f0)
    meadian_f0[f0_dev > 96] = slide_meadian_f0[f0_dev > 96]
    nan1_f0_min = np.nanmin(stack_f0[:, nan_nums == 1], axis=0)
    nan1_f0_max = np.nanmax(stack_f0[:, nan_nums == 1], axis=0)
    nan1_f0 = np.where(
        np.abs(nan1_f0_min - slide_meadian_f0[nan_nums == 1]) < np.abs(nan1_f0_max - slide_meadian_f0[nan_nums == 1]),
        nan1_f0_min, nan1_f0_max)
    meadian_f0[nan_nums == 1] = nan1_f0
    meadian_f0 = slide_nanmedian(meadian_f0, 3)
    meadian_f0[nan_nums >= 2] = np.nan
    meadian_f0[np.isnan(meadian_f0)] = 0
    return meadian_f0


def f0_ensemble_light(rmvpe_f0, pw_f0, pmac_f0, rms=None, rms_threshold=0.05):
    trunc_len = len(rmvpe_f0)
    pw_f0 = pw_f0[:trunc_len]
    pmac_f0 = np.concatenate([pmac_f0, np.full(max(0, len(pw_f0) - len(pmac_f0)), np.nan, dtype=pmac_f0.dtype)])
    corrected_f0 = rmvpe_f0.copy()
    stack_f0 = np.stack([pw_f0, pmac_f0, rmvpe_f0], axis=0)
    zero_rmvpe_mask = (rmvpe_f0 == 0)
    other_methods_valid = ((~np.isnan(pw_f0) & (pw_f0 > 0)) | (~np.isnan(pmac_f0) & (pmac_f0 > 0)))
    correction_mask = zero_rmvpe_mask & other_methods_valid
    if rms is not None:
        correction_mask = correction_mask & (rms > rms_threshold)
    if np.any(correction_mask):
        for i in np.where(correction_mask)[0]:
            valid_values = stack_f0[:, i][~np.isnan(stack_f0[:, i]) & (stack_f0[:, i] > 0)]
            if len(valid_values) > 0:
                corrected_f0[i] = np.median(valid_values)
    corrected_f0[np.isnan(corrected_f0)] = 0
    return corrected_f0
