"""Long-audio slicing at silences, and joining converted pieces back with crossfades.

The idea follows RIFT-SVC's `slicer.py` (itself from audio-slicer): frame RMS every `hop_ms`,
runs of frames below `threshold_db` that last at least `min_interval_ms` split the audio once
the current clip is `min_length_ms` long; at most `max_sil_kept_ms` of silence is kept next to a
clip, the rest is dropped (and comes back as silence when joining). We add one thing upstream
lacks: clips longer than `max_length_s` are split again at their quietest frame, because the
Whisper encoder only sees 30 s and long windows cost quadratic attention; and the threshold
follows quiet recordings down (never above `KEEP_RANGE_DB` under the loudest frame), since
upstream's absolute -30 dBFS drops whole phrases of a recording made at a low level.
"""

import numpy as np

from rtsvc.dsp.audio import SAMPLE_RATE

THRESHOLD_DB = -30.0  # upstream infer.py defaults
MIN_LENGTH_MS = 3000
MIN_INTERVAL_MS = 100
HOP_MS = 10
MAX_SIL_KEPT_MS = 300
MAX_LENGTH_S = 25.0  # ours: keeps every piece inside Whisper's 30 s window
KEEP_RANGE_DB = 30.0  # ours: sound within this of the loudest frame is never silence
CROSSFADE_MS = 20.0  # upstream infer.py fade_duration


RMS_CHUNK_FRAMES = 1024  # frames whose RMS is computed at once: bounds frame_rms's scratch memory


def frame_rms(audio: np.ndarray, hop: int, win: int) -> np.ndarray:
    """RMS of `win`-sample frames centred every `hop` samples (zero padding), one per hop."""
    padded = np.pad(audio.astype(np.float64), (win // 2, win // 2))
    n_frames = (len(padded) - win) // hop + 1
    if n_frames <= 0:
        return np.zeros(0)
    frames = np.lib.stride_tricks.sliding_window_view(padded, win)[::hop][:n_frames]
    # sum of squares per frame without materialising frames**2 (win / hop times the audio's size)
    rms = np.empty(n_frames)
    for i in range(0, n_frames, RMS_CHUNK_FRAMES):
        chunk = frames[i:i + RMS_CHUNK_FRAMES]
        rms[i:i + RMS_CHUNK_FRAMES] = np.einsum("ij,ij->i", chunk, chunk) / win
    return np.sqrt(rms)


def _silences(rms: np.ndarray, threshold: float, min_length: int, min_interval: int,
              max_kept: int) -> list[tuple[int, int]]:
    """Frame ranges [a, b) of silence to drop (a == b: cut there, drop nothing)."""
    tags: list[tuple[int, int]] = []
    silence_start = None
    clip_start = 0
    for i, value in enumerate(rms):
        if value < threshold:
            if silence_start is None:
                silence_start = i
            continue
        if silence_start is None:
            continue
        leading = silence_start == 0 and i > max_kept
        long_enough = i - silence_start >= min_interval and i - clip_start >= min_length
        if not leading and not long_enough:
            silence_start = None
            continue
        if i - silence_start <= max_kept:
            # short silence: cut at its quietest frame, drop nothing (or drop all of a leading one)
            pos = int(rms[silence_start:i + 1].argmin()) + silence_start
            tags.append((0, pos) if silence_start == 0 else (pos, pos))
            clip_start = pos
        else:
            # long silence: keep up to max_kept frames on each side, cut at the quietest frames
            left = int(rms[silence_start:silence_start + max_kept + 1].argmin()) + silence_start
            right = int(rms[i - max_kept:i + 1].argmin()) + i - max_kept
            tags.append((0, right) if silence_start == 0 else (left, right))
            clip_start = right
        silence_start = None
    total = len(rms)
    if silence_start is not None and total - silence_start >= min_interval:
        end = min(total, silence_start + max_kept)
        pos = int(rms[silence_start:end + 1].argmin()) + silence_start
        tags.append((pos, total))
    return tags


def _split_long(start: int, end: int, rms: np.ndarray, hop: int, max_len: int) -> list[tuple[int, int]]:
    """Split [start, end) (samples) at the quietest frame of its middle until pieces fit `max_len`."""
    if end - start <= max_len:
        return [(start, end)]
    lo = (start + (end - start) // 4) // hop  # search the middle half so both sides shrink
    hi = max(lo + 1, (end - (end - start) // 4) // hop)
    cut = (int(rms[lo:hi].argmin()) + lo) * hop
    return _split_long(start, cut, rms, hop, max_len) + _split_long(cut, end, rms, hop, max_len)


def slice_at_silences(
    audio: np.ndarray, sample_rate: int = SAMPLE_RATE, threshold_db: float = THRESHOLD_DB,
    min_length_ms: float = MIN_LENGTH_MS, min_interval_ms: float = MIN_INTERVAL_MS,
    hop_ms: float = HOP_MS, max_sil_kept_ms: float = MAX_SIL_KEPT_MS, max_length_s: float = MAX_LENGTH_S,
) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of the non-silent pieces, in order, not overlapping.

    Audio quieter than `threshold_db` everywhere gives one piece covering all of it (the caller
    decides whether that is silence); dropped silence is simply not covered by any range.
    """
    n = len(audio)
    if n == 0:
        return []
    hop = max(1, round(sample_rate * hop_ms / 1000))
    win = min(round(sample_rate * min_interval_ms / 1000), 4 * hop)
    rms = frame_rms(audio, hop, win)
    loudest_db = 20 * np.log10(max(float(rms.max(initial=0.0)), 1e-10))
    threshold = 10 ** (min(threshold_db, loudest_db - KEEP_RANGE_DB) / 20)
    to_frames = lambda ms: round(sample_rate * ms / 1000 / hop)  # noqa: E731
    tags = []
    if len(rms) > to_frames(min_length_ms):
        tags = _silences(rms, threshold, to_frames(min_length_ms), to_frames(min_interval_ms),
                         to_frames(max_sil_kept_ms))
    bounds, pos = [], 0
    for a, b in tags:
        if a * hop > pos:
            bounds.append((pos, min(n, a * hop)))
        pos = min(n, b * hop)
    if pos < n:
        bounds.append((pos, n))
    if not bounds:  # all silence: hand the whole thing back
        bounds = [(0, n)]
    max_len = max(hop, int(max_length_s * sample_rate))
    return [piece for a, b in bounds if b > a for piece in _split_long(a, b, rms, hop, max_len)]


def _ramp(length: int) -> np.ndarray:
    """Raised-cosine fade-in of `length` samples; `1 - ramp` is the matching fade-out."""
    return 0.5 - 0.5 * np.cos(np.pi * (np.arange(length) + 0.5) / length)


def join_with_crossfade(pieces: list[tuple[int, np.ndarray]], length: int,
                        crossfade: int) -> np.ndarray:
    """Place converted pieces at their start samples into `length` samples of silence.

    Each piece fades in and out over `crossfade` samples (except at the very start and end of
    the output), so pieces that overlap by `crossfade` samples crossfade with complementary
    raised-cosine ramps, and a piece next to dropped silence fades instead of clicking.
    """
    out = np.zeros(length, dtype=np.float64)
    weight = np.zeros(length, dtype=np.float64)
    for start, piece in pieces:
        piece = np.asarray(piece, dtype=np.float64)[: max(0, length - start)]
        w = np.ones(len(piece))
        fade = min(crossfade, len(piece) // 2)
        if fade > 0 and start > 0:
            w[:fade] *= _ramp(fade)
        if fade > 0 and start + len(piece) < length:
            w[len(piece) - fade:] *= 1 - _ramp(fade)
        out[start:start + len(piece)] += piece * w
        weight[start:start + len(piece)] += w
    # where overlapping ramps are not exactly complementary, renormalise; never boost a lone fade
    return (out / np.maximum(weight, 1.0)).astype(np.float32)
