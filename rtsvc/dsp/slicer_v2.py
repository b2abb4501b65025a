"""The V2 release's slicer (RIFT-SVC ec67126 `slicer.py`, with its infer.py's settings): what
`rtsvc convert` slices a V2 model's input with, so it reproduces that release's infer.py.

The silence search is the one in `rtsvc.dsp.slicer` (frame RMS every 10 ms, -30 dBFS, 100 ms
intervals, 3 s minimum clip) with 300 ms of silence kept. Around it the release adds:
- input of at most 3 s (in 10 ms frames, rounded up) is one slice, not searched for silences;
- every cut moves to a zero crossing: a clip's first frame is the one before or at the first
  sample louder than a tenth of the threshold (within 20 ms of the start, backed up 32 samples);
  every other cut frame is where the first sign change within one hop after the frame's start
  minus one hop falls; then the slice's first sample is the first sign change within 4 hops after
  its first frame, its end the last within 4 hops before its end frame;
- the slice is placed at its first *frame* (frame x 441 samples), not at its first sample: the
  converted slice lands up to 4 hops (usually a few samples) earlier than the audio it came from.
A "sign change" is upstream's test, x[i] * x[i + 1] <= 0 in the audio's own dtype, taking the
sample of the two nearer to zero (the later one on a tie, so digital silence cuts one sample in).
"""

import numpy as np

from rtsvc.dsp.slicer import MIN_INTERVAL_MS, MIN_LENGTH_MS, THRESHOLD_DB, _silences, frame_rms

RELEASE_MAX_SIL_KEPT_MS = 300  # ec67126 infer.py: Slicer(..., max_sil_kept=300)
LOOK_AHEAD_FRAMES = 4  # Slicer(look_ahead_frames=4)
START_BACKUP = 32  # samples kept before the first sample over the start's noise floor


def _zero_crossing(x: np.ndarray, start: int, end: int, forward: bool) -> int:
    """Upstream's `_find_zero_crossing` over [start, end) (clamped to the audio)."""
    start, end = max(0, start), min(len(x), end)
    seg = x[start:end]
    hits = np.flatnonzero(seg[:-1] * seg[1:] <= 0) if len(seg) > 1 else np.zeros(0, dtype=int)
    if not len(hits):
        return start if forward else end - 1
    i = start + int(hits[0] if forward else hits[-1])
    return i if abs(x[i]) < abs(x[i + 1]) else i + 1


def _cut_frame(x: np.ndarray, frame: int, hop: int, threshold: float, is_start: bool = False) -> int:
    """Upstream's `_find_best_cut_point`: the frame a cut near `frame` moves to."""
    sample = frame * hop
    if is_start:
        loud = np.flatnonzero(np.abs(x[sample:min(len(x), sample + 2 * hop)]) > threshold * 0.1)
        return max(0, sample + int(loud[0]) - START_BACKUP) // hop if len(loud) else frame
    return _zero_crossing(x, sample - hop, sample + hop, forward=True) // hop


def _piece(x: np.ndarray, begin: int, end: int, hop: int) -> tuple[int, int, int]:
    """(where it is placed, first sample, end sample) of the clip between frames begin and end."""
    first = _zero_crossing(x, begin * hop, (begin + LOOK_AHEAD_FRAMES) * hop, forward=True)
    last = _zero_crossing(x, (end - LOOK_AHEAD_FRAMES) * hop, end * hop, forward=False)
    return begin * hop, first, last


def slice_release_v2(audio: np.ndarray, sample_rate: int, threshold_db: float = THRESHOLD_DB,
                     max_sil_kept_ms: float = RELEASE_MAX_SIL_KEPT_MS) -> list[tuple[int, int, int]]:
    """(place, first, end) per slice, in order: the slice is audio[first:end] and its output goes
    to `place` onwards (upstream's (start_pos, chunk) pairs). See the module docstring."""
    x = np.asarray(audio)
    n = len(x)
    hop = round(sample_rate * 10 / 1000)
    win = min(round(sample_rate * MIN_INTERVAL_MS / 1000), 4 * hop)
    threshold = 10 ** (threshold_db / 20)
    to_frames = lambda ms: round(sample_rate * ms / 1000 / hop)  # noqa: E731
    whole = lambda: [(p := _cut_frame(x, 0, hop, threshold, True) * hop, p, n)]  # noqa: E731
    if (n + hop - 1) // hop <= to_frames(MIN_LENGTH_MS):
        return whole()
    rms = frame_rms(x, hop, win)
    tags = _silences(rms, threshold, to_frames(MIN_LENGTH_MS), to_frames(MIN_INTERVAL_MS),
                     to_frames(max_sil_kept_ms))
    total = len(rms)
    if tags and tags[-1][1] == total:  # a trailing silence: upstream tags it (pos, total + 1)
        tags[-1] = (tags[-1][0], total + 1)
    if not tags:
        return whole()
    cut = lambda frame, is_start=False: _cut_frame(x, frame, hop, threshold, is_start)  # noqa: E731
    pieces = []
    if tags[0][0] > 0:
        pieces.append(_piece(x, cut(0, True), cut(tags[0][0]), hop))
    for (_, a), (b, _) in zip(tags, tags[1:], strict=False):
        pieces.append(_piece(x, cut(a), cut(b), hop))
    if tags[-1][1] < total:
        pieces.append(_piece(x, cut(tags[-1][1]), total, hop))
    return pieces
