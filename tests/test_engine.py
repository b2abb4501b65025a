"""The streaming engine: latency, sample accounting, SOLA joins, gate, knobs, rate adapter."""

import numpy as np
import pytest

from rtsvc.engine import (
    RateAdapter,
    StreamConfig,
    StreamingConverter,
    StreamLayout,
    convert_stream,
    parse_block_ms,
)
from rtsvc.errors import UserError
from rtsvc.settings import Knobs, RuntimeSettings
from rtsvc.voices.defaults import DSP_BLOCK_MS, DSP_STREAM, MODEL_BLOCK_MS, MODEL_STREAM

SR = 44100


class IdentityVoice:
    """Returns its input: the engine's own delay is then the only delay."""

    sample_rate = SR
    speakers = ["identity"]
    stream_defaults = MODEL_STREAM  # what `auto` gives any voice but the DSP voice

    def __init__(self):
        self.calls, self.resets = [], 0

    def convert(self, audio, knobs, start_sample=0, tail=None):
        self.calls.append((start_sample, audio.shape[0], tail, knobs))
        return audio[-tail:].copy() if tail else audio.copy()

    def reset(self):
        self.resets += 1


class PhaseJumpVoice:
    """A tone at the window's absolute time plus a random phase per call: every block is out of
    phase with the previous one unless SOLA realigns it."""

    sample_rate = SR
    speakers = ["tone"]
    stream_defaults = MODEL_STREAM  # what `auto` gives any voice but the DSP voice

    def __init__(self, freq=441.0, seed=0):
        self.freq, self.rng = freq, np.random.default_rng(seed)

    def convert(self, audio, knobs, start_sample=0, tail=None):
        n = audio.shape[0]
        t = (start_sample + np.arange(n - tail, n)) / SR
        return 0.5 * np.sin(2 * np.pi * self.freq * t + self.rng.uniform(0, 2 * np.pi)).astype(np.float32)

    def reset(self):
        pass


def stream(engine, audio, seed=0, max_chunk=3000):
    """Feed random-length chunks; every call must return as many samples as it got."""
    rng, parts, i = np.random.default_rng(seed), [], 0
    while i < audio.shape[0]:
        chunk = audio[i: i + int(rng.integers(1, max_chunk))]
        out = engine.process(chunk)
        assert out.shape == chunk.shape
        parts.append(out)
        i += chunk.shape[0]
    return np.concatenate(parts)


CONFIGS = [StreamConfig(), StreamConfig(block_ms=37, context_ms=101, crossfade_ms=7.3, sola_search_ms=3.1),
           StreamConfig(block_ms=250, context_ms=0, crossfade_ms=0, sola_search_ms=0)]


@pytest.mark.parametrize("config", CONFIGS)
def test_latency_reported_equals_latency_measured_on_impulses(config):
    engine = StreamingConverter(IdentityVoice(), RuntimeSettings(Knobs(gate_db=-120)), config)
    x = np.zeros(SR, dtype=np.float32)
    clicks = [1234, 20001, 33333]
    x[clicks] = [0.85, -0.7, 0.4]  # under the output limiter's knee (-1 dBFS)
    y = np.concatenate((stream(engine, x), engine.flush()))
    assert y.shape[0] == x.shape[0] + engine.latency_samples
    found = np.flatnonzero(np.abs(y) > 1e-3)
    np.testing.assert_array_equal(found, np.array(clicks) + engine.latency_samples)
    np.testing.assert_allclose(y[found], x[clicks], atol=1e-5)
    lay = engine.layout
    assert engine.latency_samples == lay.block + lay.crossfade + lay.search - lay.search // 2
    assert engine.latency_ms == pytest.approx(engine.latency_samples / 44.1)


@pytest.mark.parametrize("chunk", [1, 7, 441, 4097, 10007])
def test_samples_out_equal_samples_in_for_odd_sizes(chunk):
    engine = StreamingConverter(IdentityVoice(), RuntimeSettings(Knobs(gate_db=-120)),
                                StreamConfig(block_ms=23.3, context_ms=50, crossfade_ms=5, sola_search_ms=2))
    x = np.random.default_rng(chunk).standard_normal(12345).astype(np.float32) * 0.1
    total = 0
    for i in range(0, x.shape[0], chunk):
        total += engine.process(x[i: i + chunk]).shape[0]
    assert total == x.shape[0]
    assert engine.process(np.zeros(0, np.float32)).shape == (0,)
    held = engine.flush()
    assert held.shape == (engine.latency_samples,)
    assert engine.stats()["samples_in"] == 0  # flush starts a fresh stream


def test_identity_stream_reproduces_input_and_windows_are_frame_aligned():
    voice = IdentityVoice()
    x = np.random.default_rng(3).standard_normal(3 * SR // 2).astype(np.float32) * 0.2
    y = convert_stream(voice, x, Knobs(gate_db=-120), StreamConfig(block_ms=80))
    np.testing.assert_allclose(y, x, atol=1e-5)
    starts = [c[0] for c in voice.calls]
    assert starts[0] == 0 and all(s % 512 == 0 for s in starts) and len(set(np.diff(starts))) == 1


def joins_and_slope(engine, seconds=1.5):
    y = convert_stream(engine.voice, np.full(int(seconds * SR), 0.3, np.float32), Knobs(gate_db=-120),
                       engine.config)
    jumps = np.abs(np.diff(y))
    return y, jumps, 0.5 * 2 * np.pi * 441.0 / SR  # the largest slope a 0.5-amplitude 441 Hz tone has


def test_sola_joins_out_of_phase_blocks_without_clicks_or_dips():
    config = StreamConfig(block_ms=60, context_ms=50, crossfade_ms=10, sola_search_ms=10)
    engine = StreamingConverter(PhaseJumpVoice(), config=config)
    y, jumps, slope = joins_and_slope(engine)
    body = slice(engine.layout.block * 3, -engine.latency_samples)
    assert jumps[body].max() < 1.15 * slope  # no sample-to-sample jump bigger than the tone's own
    frame = 441
    rms = np.sqrt(np.mean(y[body][: y[body].shape[0] // frame * frame].reshape(-1, frame) ** 2, axis=1))
    assert rms.min() > 0.9 * 0.5 / np.sqrt(2)  # in-phase crossfades: no cancellation dips


def test_without_sola_search_the_same_blocks_dip():
    # control for the test above: the voice really does jump in phase between blocks
    config = StreamConfig(block_ms=60, context_ms=50, crossfade_ms=10, sola_search_ms=0)
    engine = StreamingConverter(PhaseJumpVoice(), config=config)
    y, _, _ = joins_and_slope(engine)
    frame = 441
    body = y[engine.layout.block * 3: -engine.latency_samples]
    rms = np.sqrt(np.mean(body[: body.shape[0] // frame * frame].reshape(-1, frame) ** 2, axis=1))
    assert rms.min() < 0.8 * 0.5 / np.sqrt(2)


def test_gate_outputs_silence_and_skips_the_voice():
    voice = IdentityVoice()
    settings = RuntimeSettings(Knobs(gate_db=-40))
    engine = StreamingConverter(voice, settings, StreamConfig(block_ms=50, context_ms=50))
    quiet = np.full(SR // 2, 10 ** (-60 / 20), np.float32)  # -60 dBFS: below the gate
    loud = 0.3 * np.sin(2 * np.pi * 200 * np.arange(SR // 2) / SR).astype(np.float32)
    y = np.concatenate((engine.process(quiet), engine.process(loud), engine.flush()))
    stats_blocks = len(voice.calls)
    assert not np.any(y[: quiet.shape[0]])  # gated: digital silence
    lat = engine.latency_samples
    np.testing.assert_allclose(y[quiet.shape[0] + lat + 3000: -lat], loud[3000: -lat], atol=1e-5)
    assert 0 < stats_blocks < (quiet.shape[0] + loud.shape[0] + lat) // engine.layout.block


def test_knob_changes_take_effect_at_the_next_block():
    voice = IdentityVoice()
    settings = RuntimeSettings(Knobs(gate_db=-120))
    engine = StreamingConverter(voice, settings, StreamConfig(block_ms=50, context_ms=0, crossfade_ms=5,
                                                              sola_search_ms=0))
    x = 0.1 * np.ones(SR, np.float32)
    first = engine.process(x[: SR // 2])
    settings.update(output_gain_db=14.0, pitch_shift=3)
    second = engine.process(x[SR // 2:])
    assert voice.calls[-1][3].pitch_shift == 3 and voice.calls[0][3].pitch_shift == 0
    assert first[-1000:] == pytest.approx(0.1, abs=1e-5)
    assert second[-1000:] == pytest.approx(0.1 * 10 ** 0.7, abs=1e-4)  # +14 dB (under the limiter's knee)
    assert np.abs(np.diff(second)).max() < 0.01  # the gain change ramps, no step


def test_stats_count_blocks_and_compute_time():
    engine = StreamingConverter(IdentityVoice(), RuntimeSettings(Knobs(gate_db=-120)),
                                StreamConfig(block_ms=50))
    engine.process(np.full(engine.layout.block * 5 + 10, 0.1, np.float32))
    st = engine.stats()
    assert st["blocks"] == 5 and st["gated_blocks"] == 0
    assert 0 < st["compute_ms_p50"] <= st["compute_ms_p99"] and st["latency_ms"] == engine.latency_ms
    assert st["samples_in"] == st["samples_out"] == engine.layout.block * 5 + 10


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="block"):
        StreamingConverter(IdentityVoice(), config=StreamConfig(block_ms=1))
    with pytest.raises(UserError, match="crossfade"):
        StreamingConverter(IdentityVoice(), config=StreamConfig(block_ms=50, crossfade_ms=60))


@pytest.mark.parametrize("rate", [48000, 16000])
def test_rate_adapter_exact_accounting_and_delay(rate):
    engine = StreamingConverter(IdentityVoice(), RuntimeSettings(Knobs(gate_db=-120)),
                                StreamConfig(block_ms=40, context_ms=40))
    adapter = RateAdapter(engine, rate)
    n = rate + 777
    rng = np.random.default_rng(rate)
    x = np.zeros(n, np.float32)
    burst_at = rate // 4
    x[burst_at: burst_at + rate // 10] = rng.standard_normal(rate // 10) * 0.3
    parts, i = [], 0
    while i < n:
        step = int(rng.integers(1, 2000))
        parts.append(adapter.process(x[i: i + step]))
        i += step
    out = np.concatenate(parts + [adapter.flush()])
    assert out.shape[0] == n  # total out == total in, exactly
    delay = engine.latency_samples * rate / SR
    lag = np.argmax(np.correlate(out[burst_at: burst_at + rate // 2], x[burst_at: burst_at + rate // 10]))
    assert abs(lag - delay) <= 2


def test_auto_block_is_the_dsp_block_for_the_dsp_voice_and_the_model_block_otherwise():
    from rtsvc.voices.dsp import DspVoice

    assert StreamConfig().block_ms is None  # auto
    assert StreamingConverter(DspVoice(), config=StreamConfig()).layout.block == 2 * 512  # 23.2 ms
    assert StreamingConverter(IdentityVoice(), config=StreamConfig()).layout.block == 13 * 512  # 150.9 ms
    assert StreamConfig(block_ms=70).for_voice(DspVoice()).block_ms == 70  # explicit wins
    assert (DSP_BLOCK_MS, MODEL_BLOCK_MS) == (23.2, 150.0)
    # crossfade and SOLA search: the voice's own unless given
    assert (DSP_STREAM.crossfade_ms, DSP_STREAM.sola_search_ms) == (12.0, 8.0)
    assert (MODEL_STREAM.crossfade_ms, MODEL_STREAM.sola_search_ms) == (25.0, 10.0)
    dsp, model = StreamConfig().for_voice(DspVoice()), StreamConfig().for_voice(IdentityVoice())
    assert (dsp.crossfade_ms, dsp.sola_search_ms) == (12, 8)
    assert (model.crossfade_ms, model.sola_search_ms) == (25, 10)
    assert StreamConfig(crossfade_ms=12, sola_search_ms=0).for_voice(DspVoice()).crossfade_ms == 12
    assert StreamConfig(block_ms=70).validate().crossfade_ms is None  # resolved only with the voice
    with pytest.raises(UserError, match="crossfade"):  # an auto block is checked once it is known
        StreamConfig(crossfade_ms=100).validate().for_voice(DspVoice())
    assert StreamConfig(crossfade_ms=100).for_voice(IdentityVoice()).crossfade_ms == 100
    with pytest.raises(ValueError, match="for_voice"):
        StreamLayout.from_config(StreamConfig(), SR)
    assert parse_block_ms("auto") is None and parse_block_ms(" AUTO ") is None
    assert parse_block_ms("80") == 80.0
    with pytest.raises(UserError, match="--block-ms must be a number of ms or auto, got 'fast'"):
        parse_block_ms("fast")
