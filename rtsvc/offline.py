"""Offline conversion of whole recordings: upstream `infer.py`'s long-audio path, for any `Voice`.

Slice at silences, bring each slice to -18 LUFS (the loudness the models were trained at; the DSP
voice keeps each slice's level), convert, optionally restore the slice's own loudness, and join the
slices with short crossfades into exactly the input's length.
"""

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from rtsvc.dsp.denoise import denoise_clip
from rtsvc.dsp.slicer import CROSSFADE_MS, join_with_crossfade, slice_at_silences
from rtsvc.errors import UserError
from rtsvc.settings import Knobs, validate_knobs
from rtsvc.voice import Voice

TARGET_LUFS = -18.0  # upstream infer.py --target-loudness (the training data's loudness)
LOUDNESS_BLOCK_S = 0.1  # upstream meter block size; shorter slices are left as they are
PEAK_LIMIT = 0.99  # upstream: scale down a normalised slice whose peak passes 1.0
SILENCE_PEAK_DB = -70.0  # a whole input below this peak is "silent": nothing to convert

Progress = Callable[[int, int], None]  # (slices done, slices total)


def peak_dbfs(audio: np.ndarray) -> float:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def check_output_path(path: str | Path, input_path: str | Path | None = None) -> Path:
    """Refuse an output we could not write (or that is the input), before spending minutes on the
    conversion."""
    path = Path(path)
    if input_path is not None and path.exists() and Path(input_path).exists() and \
            os.path.samefile(path, input_path):
        raise UserError(f"refusing to overwrite the input {input_path} with the output: choose another "
                        "output file")
    if path.suffix.lstrip(".").upper() not in sf.available_formats():
        raise UserError(f"cannot write {path}: unknown audio format {path.suffix or '(no extension)'!r}; "
                        "use .wav, .flac or .ogg")
    # the output's folder may not exist yet (save_audio creates it): check the nearest that does
    existing = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path}: {existing if not path.exists() else path} is not writable")
    return path


def check_input_audio(audio: np.ndarray) -> np.ndarray:
    """Mono float32 audio with something in it; empty or silent input is a user error."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio [t], got shape {audio.shape}")
    if audio.size == 0:
        raise UserError("input is empty (0 samples): nothing to convert")
    bad = int(audio.size - np.count_nonzero(np.isfinite(audio)))
    if bad:
        raise UserError(f"input has {bad} non-finite samples (NaN or infinity): the file is corrupt")
    peak = peak_dbfs(audio)
    if peak < SILENCE_PEAK_DB:
        raise UserError(f"input is silent (peak {peak:.0f} dBFS): nothing to convert")
    return audio


def _meter(sample_rate: int):
    import pyloudnorm

    return pyloudnorm.Meter(sample_rate, block_size=LOUDNESS_BLOCK_S)


def _loudness(meter, audio: np.ndarray, sample_rate: int) -> float | None:
    """Integrated loudness in LUFS, or None where it is undefined (too short, all gated)."""
    if len(audio) < LOUDNESS_BLOCK_S * sample_rate:
        return None
    value = float(meter.integrated_loudness(audio.astype(np.float64)))
    return value if math.isfinite(value) else None


def _to_loudness(audio: np.ndarray, loudness: float | None, target: float) -> np.ndarray:
    if loudness is None:
        return audio
    out = audio * 10 ** ((target - loudness) / 20)
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    return out * (PEAK_LIMIT / peak) if peak > 1.0 else out


def convert_offline(
    voice: Voice, audio: np.ndarray, knobs: Knobs, progress: Progress | None = None,
    target_lufs: float | None = TARGET_LUFS, restore_loudness: bool = False,
    crossfade_ms: float = CROSSFADE_MS,
) -> np.ndarray:
    """Convert a whole recording (mono float at `voice.sample_rate`); output has the same length.

    `target_lufs=None` keeps each slice's level (the DSP voice needs no loudness normalisation).
    """
    validate_knobs(knobs)
    audio = check_input_audio(audio)
    sr = voice.sample_rate
    if knobs.denoise != "off":  # before slicing: the slicer then sees the denoised silences
        audio = denoise_clip(audio, sr, knobs.denoise)
    pad = int(crossfade_ms * sr / 1000) // 2  # neighbours overlap by 2 * pad and crossfade there
    ranges = slice_at_silences(audio, sr)
    meter = _meter(sr) if target_lufs is not None else None
    pieces = []
    for i, (a, b) in enumerate(ranges):
        a, b = max(0, a - pad), min(len(audio), b + pad)
        piece = audio[a:b]
        loudness = _loudness(meter, piece, sr) if meter is not None else None
        if meter is not None:
            piece = _to_loudness(piece, loudness, target_lufs)
        voice.reset()  # every slice is a stream of its own
        out = np.asarray(voice.convert(piece, knobs, start_sample=a), dtype=np.float32)
        out = np.pad(out[: len(piece)], (0, max(0, len(piece) - len(out))))
        if restore_loudness and meter is not None and loudness is not None:
            out = _to_loudness(out, _loudness(meter, out, sr), loudness)
        pieces.append((a, out))
        if progress is not None:
            progress(i + 1, len(ranges))
    return join_with_crossfade(pieces, len(audio), 2 * pad)
