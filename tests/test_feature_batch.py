"""Batched feature calls equal per-item calls, and the lockstep driver groups requests exactly.

ContentVec, Whisper (per-item position offsets) and the F0 extractors (RMVPE and FCPE batch in
one pass, WORLD loops) on segments of one length; `drive_lockstep` over feature caches in different
states (cold and warm, different lengths) equals driving each alone.
"""

import numpy as np
import pytest
import torch

from rtsvc.dsp.signals import sung_tone
from rtsvc.features.cache import FeatureCache
from rtsvc.features.extractor import FeatureExtractor
from rtsvc.features.f0 import make_f0_extractor
from rtsvc.features.requests import FeatureRequest, compute_batch, drive, drive_lockstep
from rtsvc.pretrained import resolve_pretrained

SR16 = 16000


@pytest.fixture(scope="module")
def features(tiny_pretrained):
    paths = resolve_pretrained(tiny_pretrained, need=("contentvec", "whisper", "rmvpe"))
    return FeatureExtractor.from_pretrained(paths, f0="rmvpe")


def segments(count: int, seconds: float = 0.6) -> list[np.ndarray]:
    """Sung tones of different pitches, one length, 16 kHz."""
    return [sung_tone(seconds, SR16, f0=120.0 + 70.0 * i, seed=i) for i in range(count)]


def test_contentvec_batch_equals_each_alone(features):
    audios = segments(3)
    batch = features.contentvec.hidden_batch(audios)
    for audio, row in zip(audios, batch, strict=True):
        alone = features.contentvec.hidden(audio)
        assert row.shape == alone.shape and alone.abs().max() > 1e-3
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # each row is its own


def test_whisper_batch_equals_each_alone_with_its_own_position_offset(features):
    audios, offsets = segments(3), [0, 37, 1490]  # the last is clamped so the window fits
    batch = features.whisper_encoder.hidden_batch(audios, offsets)
    for audio, offset, row in zip(audios, offsets, batch, strict=True):
        alone = features.whisper_encoder.hidden(audio, pad_to_30s=False, position_offset=offset)
        assert row.shape == alone.shape
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)
    # the offsets matter: the same audio at another offset gives other features
    moved = features.whisper_encoder.hidden_batch([audios[0]], [200])[0]
    assert (moved - batch[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one length"):
        features.whisper_encoder.hidden_batch([audios[0], audios[1][:-160]], [0, 0])


@pytest.mark.parametrize("method", ["rmvpe", "fcpe", "dio"])
def test_f0_batch_equals_each_alone(features, method):
    extractor = features.f0_extractor if method == "rmvpe" else make_f0_extractor(method)
    audios = segments(3, 0.45)
    batch = extractor.batch(audios)
    for audio, row in zip(audios, batch, strict=True):
        alone = extractor(audio)
        assert row.shape == alone.shape == (len(audio) // 160 + 1,)
        np.testing.assert_allclose(row, alone, atol=1e-3, rtol=1e-5)  # Hz
    if method != "rmvpe":  # (the tiny RMVPE is random: its F0 is noise)
        assert np.median(batch[2][batch[2] > 0]) > np.median(batch[0][batch[0] > 0]) + 50
    unequal = extractor.batch([audios[0], audios[1][:-800]])  # not one length: item by item
    np.testing.assert_allclose(unequal[1], extractor(audios[1][:-800]), atol=1e-3)


def test_compute_batch_wants_one_kind(features):
    audio = segments(1)[0]
    with pytest.raises(ValueError, match="one feature kind"):
        compute_batch(features, [FeatureRequest("f0", audio), FeatureRequest("contentvec", audio)])


def test_lockstep_caches_equal_caches_driven_alone(features):
    """Four streams: two as many blocks into their streams (at different absolute positions: their
    requests share calls), one that joins a round later, one with a shorter window; over four
    rounds every window's features equal driving it alone."""
    block, window = 6656, 21504
    sources = [sung_tone(3.0, 44100, f0=130.0 + 60.0 * i, seed=i) for i in range(4)]
    plans = [(0, 0, window), (0, 3, window), (1, 0, window), (0, 0, window - 2048)]  # (join, offset, window)
    together = [FeatureCache(features) for _ in sources]
    alone = [FeatureCache(features) for _ in sources]
    calls = []
    real_batch = features.contentvec.hidden_batch

    def counted(audios):
        calls.append(len(audios))
        return real_batch(audios)

    features.contentvec.hidden_batch = counted
    try:
        for r in range(4):
            steps, refs = [], []
            for cache, ref, source, (join, offset, size) in zip(together, alone, sources, plans, strict=True):
                if r < join:
                    continue
                k = r - join + offset
                steps.append(cache.window_steps(source[k * block: k * block + size], k * block))
                refs.append(drive(features, ref.window_steps(source[k * block: k * block + size], k * block)))
            for got, ref in zip(drive_lockstep(features, steps), refs, strict=True):
                for a, b in zip(got[:3], ref[:3], strict=True):
                    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(got[3], ref[3], atol=1e-5, rtol=1e-5)
    finally:
        del features.contentvec.hidden_batch
    # the first two streams shared every ContentVec call; the joining stream's cold window and the
    # shorter windows have other segment lengths: their own calls
    assert calls == [2, 2, 2, 2], calls


def test_lockstep_returns_a_failing_stream_s_error_in_its_place(features):
    def fails():
        yield FeatureRequest("contentvec", segments(1)[0])
        raise RuntimeError("stream 1 broke")

    def works():
        rows = yield FeatureRequest("contentvec", segments(1)[0])
        return rows.shape

    out = drive_lockstep(features, [works(), fails(), works()])
    assert out[0] == out[2] == features.contentvec.hidden(segments(1)[0]).shape
    assert isinstance(out[1], RuntimeError) and "stream 1" in str(out[1])
