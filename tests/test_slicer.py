"""Long-audio slicing at silences and the crossfade join."""

import numpy as np

from rtsvc.dsp.slicer import join_with_crossfade, slice_at_silences

SR = 44100


def _tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


def test_slices_at_long_silences_and_drops_most_of_them():
    audio = np.concatenate([_silence(0.5), _tone(4), _silence(1.0), _tone(5), _silence(1.0)])
    pieces = slice_at_silences(audio, SR)
    assert len(pieces) == 2
    (a0, b0), (a1, b1) = pieces
    # the cuts sit in the silences, at most max_sil_kept (200 ms) away from the sound
    assert 0.5 * SR - 0.31 * SR <= a0 <= 0.5 * SR
    assert 4.5 * SR <= b0 <= 4.81 * SR
    assert 5.5 * SR - 0.31 * SR <= a1 <= 5.5 * SR
    assert 10.5 * SR <= b1 <= 10.81 * SR
    assert b0 < a1  # the middle of the long silence is dropped


def test_short_gap_cuts_without_dropping_and_short_clip_is_not_cut():
    audio = np.concatenate([_tone(4), _silence(0.2), _tone(4)])
    pieces = slice_at_silences(audio, SR)
    assert len(pieces) == 2 and pieces[0][1] == pieces[1][0]
    assert 4.0 * SR <= pieces[0][1] <= 4.2 * SR
    # a silence before the clip reached min_length (3 s) does not split it
    audio = np.concatenate([_tone(1), _silence(0.2), _tone(1)])
    assert slice_at_silences(audio, SR) == [(0, len(audio))]


def test_long_clip_without_silence_is_split_below_max_length():
    audio = _tone(40) * np.linspace(1.0, 0.5, 40 * SR, dtype=np.float32)
    pieces = slice_at_silences(audio, SR, max_length_s=15)
    assert len(pieces) >= 3
    assert pieces[0][0] == 0 and pieces[-1][1] == len(audio)
    assert all(b - a <= 15 * SR for a, b in pieces)
    assert all(pieces[i][1] == pieces[i + 1][0] for i in range(len(pieces) - 1))


def test_threshold_follows_quiet_recordings_on_request():
    # a phrase 20 dB under the first is below upstream's -30 dBFS but not silence (keep_range_db, ours)
    audio = np.concatenate([_tone(4), _silence(1.0), 0.1 * _tone(4)])
    pieces = slice_at_silences(audio, SR, keep_range_db=30.0)
    assert len(pieces) == 2 and pieces[1][1] == len(audio) and pieces[1][0] < 5 * SR
    # the same recording 30 dB lower slices the same way
    assert slice_at_silences(audio * 10 ** (-30 / 20), SR, keep_range_db=30.0) == pieces
    # upstream's default: the absolute threshold drops the quiet phrase as silence
    assert len(slice_at_silences(audio, SR)) == 1


def test_all_quiet_audio_is_one_piece():
    audio = np.full(SR, 1e-4, dtype=np.float32)
    assert slice_at_silences(audio, SR) == [(0, SR)]
    assert slice_at_silences(np.zeros(0, dtype=np.float32), SR) == []


def test_join_preserves_length_and_reconstructs_identity_pieces():
    rng = np.random.default_rng(0)
    audio = np.concatenate([_tone(4), _silence(1.0), _tone(5), _silence(0.2), _tone(4)])
    audio = audio + 1e-3 * rng.standard_normal(len(audio)).astype(np.float32)
    pad = 441  # pieces overlap by 2 * pad and crossfade over it
    pieces = []
    for a, b in slice_at_silences(audio, SR):
        a, b = max(0, a - pad), min(len(audio), b + pad)
        pieces.append((a, audio[a:b]))
    out = join_with_crossfade(pieces, len(audio), 2 * pad)
    assert out.shape == audio.shape and out.dtype == np.float32
    covered = np.zeros(len(audio), bool)
    for a, p in pieces:
        covered[a + 2 * pad:a + len(p) - 2 * pad] = True
    # away from the fades, identity pieces give back the input exactly (crossfades included)
    np.testing.assert_allclose(out[covered], audio[covered], atol=1e-6)
    assert np.all(np.abs(out[~covered]) <= np.abs(audio[~covered]) + 1e-6)


def test_join_crossfades_adjacent_pieces_without_a_dip():
    n, cut, fade = 10000, 5000, 400
    a = np.ones(cut + fade // 2, dtype=np.float32)
    b = np.ones(n - cut + fade // 2, dtype=np.float32)
    out = join_with_crossfade([(0, a), (cut - fade // 2, b)], n, fade)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)
    # a lone piece next to dropped silence fades out instead of clicking
    out = join_with_crossfade([(0, a)], n, fade)
    assert out[len(a) - 1] < 0.01 and out[len(a) - fade - 1] > 0.99 and np.all(out[len(a):] == 0)
