"""The voice-activity gate (`vad` knob, rtsvc.dsp.vad): breath and typing loud enough to open the level
gate give silence instead of phantom voice, espeak-ng speech passes, gated blocks are counted, no delay
is added, and the knob reaches every front end from its row."""

import numpy as np
import pytest

from benchmarks.vad_cost import FRAME, IdentityVoice, breath, frame_table, run, scene, typing
from rtsvc.engine import StreamConfig, StreamingConverter
from rtsvc.errors import UserError
from rtsvc.serve.protocol import ProtocolError, parse_set
from rtsvc.settings import Knobs, RuntimeSettings, knob_spec
from tests.cli_helpers import run_cli

BLOCK_MS = 100.0


@pytest.fixture(scope="module")
def espeak_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return scene()


@pytest.fixture(scope="module")
def noise_only() -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.concatenate([typing(1.5, rng), breath(0.7, rng), typing(1.5, rng), breath(0.7, rng)])


def stream(audio: np.ndarray, settings: RuntimeSettings) -> tuple[np.ndarray, StreamingConverter]:
    engine = StreamingConverter(IdentityVoice(), settings, StreamConfig(block_ms=BLOCK_MS))
    block = engine.layout.block
    out = np.concatenate([engine.process(audio[i:i + block]) for i in range(0, audio.size, block)])
    return out, engine


def test_noise_only_blocks_give_silence_and_are_counted(noise_only):
    phantom, engine = stream(noise_only, RuntimeSettings(Knobs()))  # the level gate alone lets it through
    level = engine.stats()
    assert np.sqrt(np.mean(phantom ** 2)) > 0.01 and level["gated_blocks"] < level["blocks"] / 2
    out, engine = stream(noise_only, RuntimeSettings(Knobs(vad="on")))
    stats = engine.stats()
    assert not out.any()  # every block gated: exact silence
    assert stats["blocks"] == noise_only.size // engine.layout.block
    assert stats["vad_gated_blocks"] == stats["gated_blocks"] == stats["blocks"]
    assert stats["speech_prob"] < 0.5


def test_espeak_speech_passes_and_noise_between_sentences_is_gated(espeak_scene):
    audio, speech_mask, noise_mask = espeak_scene
    out, stats, _ = run(audio, Knobs(vad="on"), BLOCK_MS)
    truth, noise, passed = frame_table(audio, speech_mask, noise_mask, out)
    false_rejects, false_accepts = (~passed[truth]).mean(), passed[noise].mean()
    print(f"\nVAD on espeak + breath/typing: false rejects {false_rejects:.1%}, "
          f"false accepts {false_accepts:.1%}")
    assert false_rejects < 0.05 and false_accepts < 0.25
    level_only, _, _ = run(audio, Knobs(), BLOCK_MS)
    assert frame_table(audio, speech_mask, noise_mask, level_only)[2][noise].mean() > 2 * false_accepts
    kept = np.flatnonzero(truth & passed)  # what passes is the voice's output (here the input itself)
    spoken = np.concatenate([np.arange(f * FRAME, (f + 1) * FRAME) for f in kept])
    assert np.corrcoef(out[spoken], audio[spoken])[0, 1] > 0.99
    assert stats["vad_gated_blocks"] > 0 and stats["gated_blocks"] >= stats["vad_gated_blocks"]


def test_the_threshold_trades_false_accepts_and_switching_on_mid_stream_works(espeak_scene, noise_only):
    audio, speech_mask, noise_mask = espeak_scene
    accepts = []
    for threshold in (0.05, 0.9):
        out = run(audio, Knobs(vad="on", vad_threshold=threshold), BLOCK_MS)[0]
        _, noise, passed = frame_table(audio, speech_mask, noise_mask, out)
        accepts.append(passed[noise].mean())
    assert accepts[0] > accepts[1]  # a low threshold lets more noise through
    settings = RuntimeSettings(Knobs())
    engine = StreamingConverter(IdentityVoice(), settings, StreamConfig(block_ms=BLOCK_MS))
    block = engine.layout.block
    before = np.concatenate([engine.process(noise_only[i:i + block]) for i in range(0, 10 * block, block)])
    assert before.any() and engine.stats()["vad_gated_blocks"] == 0
    settings.update(vad="on", vad_threshold="0.5")  # as the page or a live key sends it
    after = np.concatenate([engine.process(noise_only[i:i + block])
                            for i in range(10 * block, noise_only.size - block, block)])
    assert not after[engine.latency_samples:].any() and engine.stats()["vad_gated_blocks"] > 0


def test_the_gate_adds_no_delay():
    config = StreamConfig(block_ms=BLOCK_MS)
    on = StreamingConverter(IdentityVoice(), RuntimeSettings(Knobs(vad="on")), config)
    off = StreamingConverter(IdentityVoice(), RuntimeSettings(Knobs()), config)
    assert on.latency_samples == off.latency_samples


def test_the_knobs_reach_the_protocol_the_page_and_the_cli(capsys, monkeypatch):
    changes = {"vad": "on", "vad_threshold": 0.7}
    assert parse_set({"type": "set", **changes}) == changes
    with pytest.raises(ProtocolError, match="vad must be a string"):
        parse_set({"type": "set", "vad": True})
    with pytest.raises(UserError, match="vad must be one of off, on, got 'maybe'"):
        RuntimeSettings().update(vad="maybe")  # what a `set` is applied through
    controls = {c["name"]: c for c in knob_spec("v3")}
    assert controls["vad"]["choices"] == ["off", "on"] and controls["vad"]["control"] == "select"
    assert (controls["vad_threshold"]["minimum"], controls["vad_threshold"]["maximum"]) == (0.0, 1.0)
    assert {"vad", "vad_threshold"} <= {c["name"] for c in knob_spec("dsp")}
    code, _, err = run_cli(["serve", "--vad-threshold", "2"], capsys, monkeypatch)
    assert code == 2 and err.strip() == "error: --vad-threshold must be between 0 and 1, got 2"
    code, out, _ = run_cli(["convert", "--help"], capsys, monkeypatch)
    assert code == 0 and "--vad" in out and "--vad-threshold" in out


def test_offline_convert_gates_noise_and_keeps_whole_sentences(espeak_scene, tmp_path):
    import soundfile as sf

    from rtsvc.offline import convert_file

    audio, speech_mask, noise_mask = espeak_scene
    sf.write(tmp_path / "in.wav", audio, 44100)
    for vad, path in (("off", tmp_path / "off.wav"), ("on", tmp_path / "on.wav")):
        convert_file(IdentityVoice(), tmp_path / "in.wav", path, Knobs(vad=vad), target_lufs=None)
    off, on = (sf.read(tmp_path / name, dtype="float32")[0] for name in ("off.wav", "on.wav"))
    truth, noise, passed_off = frame_table(audio, speech_mask, noise_mask, off)
    passed_on = frame_table(audio, speech_mask, noise_mask, on)[2]
    print(f"\noffline: noise frames passed {passed_off[noise].mean():.1%} -> {passed_on[noise].mean():.1%}, "
          f"speech frames gated {(~passed_on[truth]).mean():.1%}")
    assert passed_off[noise].mean() > 0.5 and passed_on[noise].mean() < 0.2
    assert (~passed_on[truth]).mean() < 0.02  # offline the hangover reaches back: onsets are kept
