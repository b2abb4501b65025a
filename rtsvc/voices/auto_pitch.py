"""Auto pitch: shift the user's voice towards the target speaker's typical pitch.

A speaker's pitch statistics (`pitch_stats`) are the median and spread of log-F0 over voiced frames;
`rtsvc prepare` / `train` record them per speaker in the checkpoint (hyper_parameters.cfg.pitch_stats)
and `rtsvc export` copies them into the bundle's manifest. Models without them (upstream checkpoints)
take them from `--pitch-reference CLIPS_DIR` (recordings of the target voice).

`PitchFollower` follows the user's running median F0 (the last FOLLOW_S of voiced frames) and keeps a
shift of 12 * log2(target median / user median) semitones, whole semitones by default. Hysteresis: the
shift changes only when the wanted shift is more than HYSTERESIS_ST beyond the current step's edge
(whole: |wanted - current| > 0.5 + HYSTERESIS_ST), so vibrato or a median near a step boundary does not
make it wobble; continuous mode moves only when the wanted shift is CONTINUOUS_DEADBAND_ST away. Until
MIN_VOICED_S of voice has been heard the shift stays where it is (0 at the start).
"""

import math
from collections import deque
from pathlib import Path

import numpy as np

from rtsvc.errors import UserError
from rtsvc.settings import PITCH_MODES  # noqa: F401 - the pitch_mode knob's choices

FRAME_RATE = 44100 / 512  # mel frames per second (F0 is on the mel grid)
FOLLOW_S = 4.0  # the user's running median covers this much voiced audio
MIN_VOICED_S = 0.3  # voiced audio heard before the first shift is chosen
HYSTERESIS_ST = 0.3  # whole semitones: beyond the rounding edge by this much before a step changes
CONTINUOUS_DEADBAND_ST = 0.25  # continuous: the shift moves only when the wanted one is this far off
MAX_AUTO_SHIFT = 36.0


def pitch_stats(f0_arrays) -> dict | None:
    """Median and spread of log-F0 over the voiced frames (F0 > 0) of some F0 tracks (Hz), or None
    when there are none: {"median_hz", "log_f0_median", "log_f0_spread" (half the interquartile
    range of ln F0), "voiced_frames"}."""
    voiced = [np.asarray(f, dtype=np.float64).reshape(-1) for f in f0_arrays]
    logs = np.log(np.concatenate([f[f > 0] for f in voiced])) if voiced else np.zeros(0)
    if logs.size == 0:
        return None
    q1, median, q3 = np.percentile(logs, [25, 50, 75])
    return {"median_hz": float(np.exp(median)), "log_f0_median": float(median),
            "log_f0_spread": float((q3 - q1) / 2), "voiced_frames": int(logs.size)}


def target_median_hz(stats: dict, speaker: str | None, blend: dict[str, float] | None = None,
                     reference: dict | None = None) -> float:
    """The target's median F0: `reference` (from --pitch-reference) when given, else the speaker's
    recorded statistics (a blend: the weighted mean of its speakers' log medians). A missing one is a
    UserError saying what to do."""
    if reference is not None:
        return float(reference["median_hz"])
    names = blend or {speaker: 1.0}
    missing = [n for n in names if n not in stats]
    if missing:
        raise UserError(f"--pitch auto: this model has no pitch statistics for "
                        f"{', '.join(map(repr, missing))} (trained before rtsvc recorded them): pass "
                        "--pitch-reference CLIPS_DIR with recordings of the target voice, or set --pitch in "
                        "semitones")
    return float(math.exp(sum(w * stats[n]["log_f0_median"] for n, w in names.items())))


class PitchFollower:
    """One stream's auto-pitch state: feed it each block's new F0 frames, read `shift` (semitones)."""

    def __init__(self, follow_s: float = FOLLOW_S):
        self.voiced: deque = deque(maxlen=int(follow_s * FRAME_RATE))
        self.shift = 0.0  # the chosen shift, semitones
        self.user_median_hz: float | None = None

    def reset(self) -> None:
        self.voiced.clear()
        self.shift, self.user_median_hz = 0.0, None

    def update(self, f0_new: np.ndarray, target_hz: float, continuous: bool = False) -> float:
        """The shift after hearing `f0_new` (Hz per frame, 0 = unvoiced)."""
        f0_new = np.asarray(f0_new, dtype=np.float64).reshape(-1)
        self.voiced.extend(np.log(f0_new[f0_new > 0]))
        if len(self.voiced) < MIN_VOICED_S * FRAME_RATE:
            return self.shift
        median = float(np.median(np.fromiter(self.voiced, dtype=np.float64)))
        self.user_median_hz = math.exp(median)
        wanted = float(np.clip(12.0 * (math.log(target_hz) - median) / math.log(2.0),
                               -MAX_AUTO_SHIFT, MAX_AUTO_SHIFT))
        if continuous:
            if abs(wanted - self.shift) > CONTINUOUS_DEADBAND_ST:
                self.shift = wanted
        elif abs(wanted - self.shift) > 0.5 + HYSTERESIS_ST:
            self.shift = float(round(wanted))
        return self.shift


def reference_stats(clips_dir: str | Path, f0_of) -> dict:
    """Pitch statistics of the recordings in `clips_dir` (wav, flac, ogg, mp3; searched recursively),
    with `f0_of(audio_44k) -> F0 Hz per frame`; a UserError when there is no voiced audio."""
    from rtsvc.dsp.audio import SAMPLE_RATE, load_audio

    root = Path(clips_dir)
    if not root.is_dir():
        raise UserError(f"--pitch-reference {root}: not a folder (give a folder of recordings of the "
                        "target voice)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"))
    if not files:
        raise UserError(f"--pitch-reference {root}: no .wav/.flac/.ogg/.mp3 recordings in it")
    stats = pitch_stats(f0_of(load_audio(p, SAMPLE_RATE)[0]) for p in files)
    if stats is None:
        raise UserError(f"--pitch-reference {root}: no voiced frames found in its recordings")
    return stats
