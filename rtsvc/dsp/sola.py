"""SOLA (synchronised overlap-add), as RVC's real-time GUI does it.

Each block, the voice's new output is searched for the position whose head best continues the
previous block's tail (normalised cross-correlation over a short search window); the output is
then cut at that offset and its head crossfaded with the old tail. This keeps waveforms in phase
across block joins, so neighbouring blocks do not click or comb-filter.
"""

import numpy as np

CENTRE_BIAS = 0.02  # score penalty per search width away from the centre (breaks periodic ties)
EPS = 1e-8
DIRECT_MAX = 1 << 22  # multiply-adds up to which direct correlation beats the FFT


def correlate_valid(head: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """sum_j head[k + j] * reference[j] for k in [0, len(head) - len(reference)] (scipy's
    `correlate(..., mode="valid")`, in numpy: scipy.signal costs 0.5 s to import for every command)."""
    n, m = head.shape[0], reference.shape[0]
    if m * (n - m + 1) <= DIRECT_MAX:
        return np.correlate(head, reference, mode="valid")
    size = 1 << (n + m - 1).bit_length()  # no circular wrap-around into the lags we keep
    spectrum = np.fft.rfft(head, size) * np.conj(np.fft.rfft(reference, size))
    return np.fft.irfft(spectrum, size)[: n - m + 1]


def normalised_xcorr(head: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """NCC of `reference` (length L) against every window head[k:k+L]; returns len(head) - L + 1 values."""
    head = np.asarray(head, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    length = reference.shape[0]
    numerator = correlate_valid(head, reference)
    energy = np.concatenate(([0.0], np.cumsum(head * head)))
    window_energy = np.maximum(energy[length:] - energy[:-length], 0.0)
    return numerator / (np.sqrt(window_energy * float(np.dot(reference, reference))) + EPS)


def find_sola_offset(head: np.ndarray, prev_tail: np.ndarray, centre: int | None = None,
                     bias: float = CENTRE_BIAS) -> int:
    """Offset k in [0, len(head) - len(prev_tail)] where head[k:] best continues `prev_tail`.

    `centre` (default: middle of the search range) is the offset that keeps the nominal timeline;
    equal correlations (a periodic signal) are resolved towards it, so timing stays steady.
    """
    search = head.shape[0] - prev_tail.shape[0]
    if search < 0:
        raise ValueError(f"head ({head.shape[0]}) is shorter than the tail ({prev_tail.shape[0]})")
    centre = search // 2 if centre is None else centre
    if search == 0 or prev_tail.shape[0] == 0:
        return 0
    score = normalised_xcorr(head, prev_tail)
    score -= bias * np.abs(np.arange(search + 1) - centre) / search
    return int(np.argmax(score))


def fade_curves(length: int, kind: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(fade_out, fade_in) of `length` samples.

    cosine: raised cosine, sums to 1 (right for in-phase signals, i.e. after SOLA);
    equal_power: sin/cos, squares sum to 1 (right for uncorrelated signals such as noise).
    """
    phase = (np.arange(length, dtype=np.float64) + 0.5) / max(length, 1) * (np.pi / 2)
    if kind == "cosine":
        fade_in = np.sin(phase) ** 2
        return (1.0 - fade_in).astype(np.float32), fade_in.astype(np.float32)
    if kind == "equal_power":
        return np.cos(phase).astype(np.float32), np.sin(phase).astype(np.float32)
    raise ValueError(f"unknown crossfade kind {kind!r}")


def crossfade(prev_tail: np.ndarray, head: np.ndarray, kind: str = "cosine") -> np.ndarray:
    """Blend `prev_tail` out and `head` in over their common length."""
    if prev_tail.shape != head.shape:
        raise ValueError(f"crossfade needs equal lengths, got {prev_tail.shape} and {head.shape}")
    fade_out, fade_in = fade_curves(head.shape[0], kind)
    return (prev_tail * fade_out + head * fade_in).astype(np.float32)
