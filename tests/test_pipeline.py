"""rtsvc/pipeline.py: a model voice's features and its DiT + vocoder on two threads give the
unpipelined engine's output sample for sample, at the device rates `live` uses."""

import threading

import numpy as np
import pytest

from rtsvc.dsp.signals import sung_tone
from rtsvc.engine import RateAdapter, StreamConfig, StreamingConverter
from rtsvc.errors import UserError
from rtsvc.pipeline import PipelinedAdapter
from rtsvc.pretrained import resolve_pretrained
from rtsvc.settings import Knobs, RuntimeSettings
from rtsvc.voices.dsp import DspVoice
from rtsvc.voices.spec import VoiceSpec, open_model
from tests.tiny_encoders import make_tiny_pretrained_dir
from tests.tiny_models import make_tiny_dit_checkpoint

CONFIG = StreamConfig(block_ms=100.0, context_ms=300.0, crossfade_ms=25.0, sola_search_ms=10.0)
KNOBS = Knobs(steps=3, seed=3, pitch_shift=2.0, gate_db=-50.0, speaker="bob")


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    paths = resolve_pretrained(make_tiny_pretrained_dir(root / "pretrained"),
                               need=("contentvec", "whisper", "vocoder"))
    return open_model(VoiceSpec(model=make_tiny_dit_checkpoint(root / "tiny.ckpt"), backend="torch",
                                device="cpu", f0="dio", streaming=True), paths)


def feed(adapter, audio: np.ndarray, chunk: int) -> list:
    return [adapter.process(audio[i:i + chunk]) for i in range(0, audio.shape[0], chunk)]


@pytest.mark.parametrize("threaded", [True, False])
def test_pipelined_output_equals_the_unpipelined_engine(voice, threaded):
    rate = 48000
    audio = sung_tone(2.0, rate)
    audio[int(0.8 * rate):int(1.1 * rate)] = 0.0  # a gated stretch in the middle
    plain = RateAdapter(StreamingConverter(voice.fork(), RuntimeSettings(KNOBS), CONFIG), rate)
    expected = np.concatenate(feed(plain, audio, 480))
    got, threads = [], set()

    def emit(samples):
        got.append(samples)
        threads.add(threading.current_thread().name)

    engine = StreamingConverter(voice.fork(), RuntimeSettings(KNOBS), CONFIG)
    piped = PipelinedAdapter(engine, rate, emit, threaded=threaded)
    feed(piped, audio, 480)
    piped.close()
    out = np.concatenate(got)
    n = min(out.shape[0], expected.shape[0])
    assert n >= expected.shape[0] - 2 * engine.layout.block * rate // engine.sample_rate
    assert np.abs(expected[:n]).max() > 0.01  # sound came out
    np.testing.assert_array_equal(out[:n], expected[:n])
    assert threads == ({"pipeline-stage2"} if threaded else {threading.current_thread().name})
    stages = piped.stage_stats()
    assert stages["prepare_ms_mean"] > 0 and stages["run_ms_mean"] > 0
    assert engine.stats()["gated_blocks"] >= 1 and engine.stats()["blocks"] >= 15
    assert piped.held == piped.samples_in - piped.samples_out


def test_only_a_model_voice_pipelines():
    engine = StreamingConverter(DspVoice(), RuntimeSettings(), CONFIG)
    with pytest.raises(UserError, match="--pipeline needs a model voice"):
        PipelinedAdapter(engine, 44100, lambda s: None)


def test_auto_block_with_pipeline_measures_the_slower_stage(voice, monkeypatch):
    """`--block-ms auto --pipeline`: each candidate is judged by its slower stage, timed apart."""
    import rtsvc.autoblock as autoblock

    p99, mean = autoblock.measure_pipelined(voice.fork(), CONFIG, KNOBS, blocks=2)
    assert p99 >= mean > 0
    seen = []
    def half_of_the_block(v, config, knobs, blocks):
        seen.append(config.block_ms)
        return 0.5 * config.block_ms, 0.4 * config.block_ms

    monkeypatch.setattr(autoblock, "measure_pipelined", half_of_the_block)
    choice = autoblock.pick_block(voice.fork(), StreamConfig(context_ms=300.0), KNOBS, pipelined=True)
    assert seen and choice.pipelined and choice.block_ms == min(seen)  # 0.5 of any block fits 0.7
    assert "p99 of the slower pipeline stage" in choice.summary()


def test_live_conversion_runs_the_pipeline_into_its_fifo(voice):
    """`rtsvc live --pipeline`: the worker's Conversion feeds stage 1, stage 2 pushes into the FIFO
    (the first push happens while the conversion is still being built)."""
    from rtsvc.live.chain import Conversion
    from rtsvc.live.fifo import OutputFifo

    fifo = OutputFifo(prime=480, max_level=10 ** 7, tolerance=10 ** 7)
    conv = Conversion(voice.fork(), RuntimeSettings(KNOBS), CONFIG, 48000, 48000, [fifo], pipeline=True)
    audio = sung_tone(1.0, 48000)
    for i in range(0, audio.shape[0], 480):
        conv.process(audio[i:i + 480])
    conv.close()
    assert fifo.started and fifo.level > 0.5 * 48000  # most of the second came through
    assert conv.bottleneck_ms() > 0
