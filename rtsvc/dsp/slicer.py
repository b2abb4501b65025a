"""Long-audio slicing at silences, and joining converted pieces back.

`slice_at_silences` is upstream RIFT-SVC's `slicer.py` (c03fa59, itself from audio-slicer) with
upstream infer.py's settings: frame RMS every 10 ms, runs of frames below -30 dBFS that last at
least 100 ms split the audio once the current clip is 3 s long; at most 200 ms of silence is kept
next to a clip, the rest is dropped (and comes back as silence when joining). Two options of ours,
off by default: `max_length_s` splits clips longer than that at their quietest frame (the Whisper
encoder only sees 30 s; training uses it), and `keep_range_db` lets the threshold follow quiet
recordings down (never above that many dB under the loudest frame: upstream's absolute -30 dBFS
drops whole phrases of a recording made at a low level).

`join_with_fades` is upstream infer.py's join: pieces placed at their start, a half-Hann fade-in
and a linear fade-out of 20 ms at every inner boundary, no overlap. `join_with_crossfade` is ours
(an option): pieces extended into their neighbours and crossfaded with complementary ramps.
"""

import numpy as np

from rtsvc.dsp.audio import SAMPLE_RATE

THRESHOLD_DB = -30.0  # upstream infer.py defaults
MIN_LENGTH_MS = 3000
MIN_INTERVAL_MS = 100
HOP_MS = 10
MAX_SIL_KEPT_MS = 200
FADE_MS = 20.0  # upstream infer.py --fade-duration
CROSSFADE_MS = 20.0  # ours (join="crossfade"): neighbours overlap by this much
TRAINING_KEEP_RANGE_DB = 30.0  # ours, for training: sound within this of the loudest frame is kept
TRAINING_MAX_SIL_KEPT_MS = 300


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
        elif i - silence_start <= max_kept * 2:
            # medium silence: cut around its quietest middle frame, keeping up to max_kept each side
            pos = int(rms[i - max_kept:silence_start + max_kept + 1].argmin()) + i - max_kept
            left = int(rms[silence_start:silence_start + max_kept + 1].argmin()) + silence_start
            right = int(rms[i - max_kept:i + 1].argmin()) + i - max_kept
            if silence_start == 0:
                tags.append((0, right))
                clip_start = right
            else:
                tags.append((min(left, pos), max(right, pos)))
                clip_start = max(right, pos)
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
    hop_ms: float = HOP_MS, max_sil_kept_ms: float = MAX_SIL_KEPT_MS, max_length_s: float | None = None,
    keep_range_db: float | None = None,
) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of the non-silent pieces, in order, not overlapping: upstream's
    `Slicer(threshold, min_length, min_interval, hop_size, max_sil_kept).slice` positions.

    Audio with no silence gives one piece covering all of it (the caller decides whether that is
    silence); dropped silence is simply not covered by any range.
    """
    n = len(audio)
    if n == 0:
        return []
    hop = max(1, round(sample_rate * hop_ms / 1000))
    win = min(round(sample_rate * min_interval_ms / 1000), 4 * hop)
    to_frames = lambda ms: round(sample_rate * ms / 1000 / hop)  # noqa: E731
    # upstream compares the length in *samples* with min_length in frames: in effect it always slices
    if n <= to_frames(min_length_ms):
        return [(0, n)]
    rms = frame_rms(audio, hop, win)
    threshold = threshold_db
    if keep_range_db is not None:
        loudest_db = 20 * np.log10(max(float(rms.max(initial=0.0)), 1e-10))
        threshold = min(threshold_db, loudest_db - keep_range_db)
    tags = _silences(rms, 10 ** (threshold / 20), to_frames(min_length_ms), to_frames(min_interval_ms),
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
    if max_length_s is None:
        return [(a, b) for a, b in bounds if b > a]
    max_len = max(hop, int(max_length_s * sample_rate))
    return [piece for a, b in bounds if b > a for piece in _split_long(a, b, rms, hop, max_len)]


def join_with_fades(pieces: list[tuple[int, np.ndarray]], length: int, fade: int) -> np.ndarray:
    """Upstream infer.py's join: each piece in order at its start sample, into `length` samples of
    silence; every piece but the first fades in over `fade` samples with the first half of a Hann
    window (numpy's, 2 * fade long) and fades out what is already there; every piece but the last
    fades out linearly over its last `fade` samples. Pieces do not overlap, so each inner boundary
    dips through silence (20 + 20 ms at upstream's default)."""
    out = np.zeros(length + fade, dtype=np.float64)
    fade_in = np.hanning(fade * 2)[:fade]
    fade_out = np.linspace(1, 0, fade)
    for idx, (start, piece) in enumerate(pieces):
        piece = np.array(piece, dtype=np.float64)
        k = min(fade, len(piece))  # a piece shorter than the fade (upstream would fail) fades over itself
        if idx > 0:
            piece[:k] *= fade_in[:k]
            out[start:start + fade] *= fade_out[: len(out[start:start + fade])]
        if idx < len(pieces) - 1:
            piece[len(piece) - k:] *= fade_out[fade - k:]
        out[start:start + len(piece)] += piece
    return out[:length].astype(np.float32)


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
