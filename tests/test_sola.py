"""SOLA offset search and crossfades."""

import numpy as np
import pytest

from rtsvc.dsp.sola import crossfade, fade_curves, find_sola_offset, normalised_xcorr


def test_finds_known_offset_in_noise():
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(4000).astype(np.float32)
    tail_len, search = 400, 300
    for true_offset in (0, 17, 150, 299, 300):
        prev_tail = signal[1000:1000 + tail_len]
        head = signal[1000 - true_offset: 1000 - true_offset + tail_len + search]
        assert find_sola_offset(head, prev_tail) == true_offset


def test_periodic_ties_resolve_towards_centre():
    # a pure tone matches every period equally well: the offset nearest the centre must win
    period = 50
    t = np.arange(2000)
    tone = np.sin(2 * np.pi * t / period).astype(np.float32)
    prev_tail = tone[:200]
    head = tone[:200 + 300]  # matches at 0, 50, 100, ..., 300
    assert find_sola_offset(head, prev_tail) == 150
    assert find_sola_offset(head, prev_tail, centre=110) == 100


def test_ncc_is_scale_invariant():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(64)
    head = np.concatenate((rng.standard_normal(10), 5.0 * ref, rng.standard_normal(10)))
    ncc = normalised_xcorr(head, ref)
    assert ncc.shape == (head.shape[0] - 64 + 1,)
    assert np.argmax(ncc) == 10 and ncc[10] == pytest.approx(1.0, abs=1e-6)


def test_fade_curves():
    out, inn = fade_curves(256, "cosine")
    np.testing.assert_allclose(out + inn, 1.0, atol=1e-6)
    assert inn[0] < 0.001 and inn[-1] > 0.999 and np.all(np.diff(inn) > 0)
    out, inn = fade_curves(256, "equal_power")
    np.testing.assert_allclose(out**2 + inn**2, 1.0, atol=1e-6)
    with pytest.raises(ValueError):
        fade_curves(8, "linear-ish")


def test_crossfade_of_identical_signals_is_identity():
    x = np.sin(np.linspace(0, 20, 500)).astype(np.float32)
    np.testing.assert_allclose(crossfade(x, x), x, atol=1e-6)
    with pytest.raises(ValueError):
        crossfade(x, x[:-1])


def test_numpy_correlation_equals_scipy_direct_and_fft():
    from scipy.signal import correlate

    import rtsvc.dsp.sola as sola

    rng = np.random.default_rng(3)
    for n, m in ((1544, 1103), (40, 40), (9000, 4000)):  # the defaults' size, no search, the FFT path
        head, ref = rng.standard_normal(n), rng.standard_normal(m)
        expected = correlate(head, ref, mode="valid")
        for direct_max in (sola.DIRECT_MAX, 0):  # as chosen, and forced onto the FFT
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(sola, "DIRECT_MAX", direct_max)
                got = sola.correlate_valid(head, ref)
            assert got.shape == expected.shape
            assert np.max(np.abs(got - expected)) < 1e-9 * np.max(np.abs(expected))
