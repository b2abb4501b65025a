"""Auto pitch (rtsvc/voices/auto_pitch.py): the follower, its hysteresis, the voice through the
streaming engine (output F0 measured), where the target comes from (checkpoint, bundle manifest,
--pitch-reference, or a one-line error) and `--pitch auto` on the command line."""

import json

import numpy as np
import pytest
import pyworld
import torch
from rtsvc.commands.cli_options import with_words

from rtsvc.dsp.audio import SAMPLE_RATE
from rtsvc.engine import StreamConfig, StreamingConverter
from rtsvc.errors import UserError
from rtsvc.pretrained import resolve_pretrained
from rtsvc.settings import KNOB_TABLE, KnobError, Knobs, RuntimeSettings
from rtsvc.voices.auto_pitch import FRAME_RATE, PitchFollower, pitch_stats, target_median_hz
from rtsvc.voices.model import ModelVoice
from rtsvc.voices.spec import VoiceSpec, open_model, open_voice
from tests.cli_helpers import harmonic_tone, write_wav
from tests.test_formant_warp import EnvelopeBackend
from tests.tiny_encoders import make_tiny_pretrained_dir
from tests.tiny_models import make_tiny_dit_checkpoint


def vibrato_f0(seconds: float, hz: float, depth: float = 0.04, rate: float = 5.5) -> np.ndarray:
    t = np.arange(int(seconds * FRAME_RATE)) / FRAME_RATE
    return hz * (1 + depth * np.sin(2 * np.pi * rate * t))


def follow(f0: np.ndarray, target: float, continuous: bool = False, block: int = 13) -> list[float]:
    """The shift after each block of `block` frames (150 ms)."""
    follower = PitchFollower()
    return [follower.update(f0[i:i + block], target, continuous) for i in range(0, len(f0), block)]


def test_150_hz_towards_300_hz_is_12_semitones_and_stays_under_vibrato():
    shifts = follow(vibrato_f0(8.0, 150.0), 300.0)
    assert shifts[0] == 0.0  # too little voice heard yet
    settled = shifts[3:]
    assert set(settled) == {12.0}, sorted(set(settled))


def test_hysteresis_holds_a_step_near_its_edge():
    # the user's median wanders so the wanted shift swings 11.3 ... 11.7 semitones: rounding alone would
    # flip between 11 and 12; the follower keeps the step it took
    t = np.arange(int(20 * FRAME_RATE)) / FRAME_RATE
    cents = 20 * np.sin(2 * np.pi * t / 6.0)  # slow drift of the user's pitch, +-20 cents
    f0 = 300.0 / 2 ** (11.5 / 12) * 2 ** (cents / 1200)
    shifts = follow(f0, 300.0, block=13)
    changes = sum(1 for a, b in zip(shifts, shifts[1:], strict=False) if a != b)
    assert changes == 1 and shifts[-1] in (11.0, 12.0), (changes, sorted(set(shifts)))
    # continuous: follows the median itself, within its dead band
    wanted = 12 * np.log2(300.0 / 155.0)  # 11.43
    assert abs(follow(vibrato_f0(6.0, 155.0), 300.0, continuous=True)[-1] - wanted) < 0.25
    assert follow(vibrato_f0(6.0, 155.0), 300.0)[-1] == 11.0  # whole semitones by default


def test_target_comes_from_stats_blend_or_reference_else_one_line_error():
    stats = {"alice": pitch_stats([np.full(50, 300.0)]), "bob": pitch_stats([np.full(50, 150.0)])}
    assert target_median_hz(stats, "alice") == pytest.approx(300.0)
    assert target_median_hz(stats, None, {"alice": 0.5, "bob": 0.5}) == pytest.approx(np.sqrt(300 * 150))
    assert target_median_hz({}, "alice", reference={"median_hz": 220.0}) == 220.0
    with pytest.raises(UserError) as err:
        target_median_hz({}, "alice")
    assert "--pitch-reference CLIPS_DIR" in str(err.value) and "\n" not in str(err.value)
    assert pitch_stats([np.zeros(10)]) is None  # no voiced frame: no statistics


def measured_f0(audio: np.ndarray) -> float:
    x = audio.astype(np.float64)
    f0, _ = pyworld.harvest(x, SAMPLE_RATE, f0_floor=60, f0_ceil=900, frame_period=10.0)
    return float(np.median(f0[f0 > 0]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto_pitch")
    stats = {"alice": pitch_stats([np.full(100, 300.0)])}
    ckpt = make_tiny_dit_checkpoint(root / "tiny.ckpt")
    raw = torch.load(ckpt, weights_only=False)
    raw["hyper_parameters"]["cfg"]["pitch_stats"] = stats  # as `rtsvc train` writes them
    torch.save(raw, ckpt)
    pre = make_tiny_pretrained_dir(root / "pre")
    return root, ckpt, pre, stats


def test_streaming_voice_sings_150_hz_input_at_300_hz(tiny):
    root, ckpt, pre, stats = tiny
    paths = resolve_pretrained(pre, need=("contentvec", "whisper", "vocoder"))
    opened = open_model(VoiceSpec(model=ckpt, backend="torch", device="cpu", f0="dio"), paths)
    assert opened.backend.pitch_stats == stats  # the checkpoint carries them
    backend = EnvelopeBackend(opened.backend.speakers)  # vocodes harmonics of the F0 it is given
    backend.pitch_stats = stats
    voice = ModelVoice(backend, opened.features, streaming=True)
    engine = StreamingConverter(voice, RuntimeSettings(Knobs(pitch_mode="auto", steps=2)),
                                StreamConfig(block_ms=150.0, context_ms=300.0))
    audio = harmonic_tone(4.0, f0=150.0, vibrato=0.03)
    shifts, out = [], []
    for i in range(0, len(audio), 6615):
        out.append(engine.process(audio[i:i + 6615]))
        shifts.append(engine.stats()["auto_pitch"])
    out = np.concatenate(out)
    assert shifts[-1] == 12.0 and set(shifts[len(shifts) // 3:]) == {12.0}, shifts
    cents = 1200 * np.log2(measured_f0(out[-2 * SAMPLE_RATE:]) / 300.0)
    assert abs(cents) < 25, cents


def test_models_without_statistics_take_them_from_recordings_or_say_what_to_do(tiny, tmp_path):
    root, _, pre, _ = tiny
    plain = make_tiny_dit_checkpoint(tmp_path / "upstream.ckpt")  # no pitch_stats, like upstream
    spec = VoiceSpec(model=plain, pretrained_dir=pre, backend="torch", device="cpu", f0="pyworld")
    voice = open_voice(spec)
    with pytest.raises(UserError, match="no pitch statistics for 'alice'.*--pitch-reference"):
        voice.convert(harmonic_tone(0.5), Knobs(pitch_mode="auto", steps=2))
    clips = tmp_path / "clips"
    clips.mkdir()
    write_wav(clips / "a.wav", harmonic_tone(1.0, f0=240.0))
    write_wav(clips / "b.wav", harmonic_tone(1.0, f0=250.0))
    voice = open_voice(spec.with_(pitch_reference=clips))
    assert voice.pitch_reference["median_hz"] == pytest.approx(245.0, rel=0.03)
    assert voice.fork().pitch_reference is voice.pitch_reference
    with pytest.raises(UserError, match="not a folder"):
        open_voice(spec.with_(pitch_reference=tmp_path / "missing"))


def test_bundle_manifest_carries_the_statistics(tiny):
    from rtsvc.export.onnx_export import build_manifest

    from rtsvc.models.loading import load_dit, load_vocoder

    root, ckpt, pre, stats = tiny
    loaded = load_dit(ckpt, "cpu")
    vocoder = load_vocoder(resolve_pretrained(pre, need=("vocoder",)).vocoder)
    options = {"name": "tiny", "opset": 17, "fp16": False, "exporters": {}, "parity": [], "source": {}}
    manifest = build_manifest(loaded, vocoder, options, {})
    assert json.loads(json.dumps(manifest))["pitch_stats"] == stats


def test_pitch_auto_on_the_command_line():
    assert with_words({"pitch_shift": "auto"}, KNOB_TABLE) == {"pitch_mode": "auto"}
    assert with_words({"pitch_shift": "-3.5"}, KNOB_TABLE) == {"pitch_shift": -3.5}
    with pytest.raises(KnobError) as err:
        with_words({"pitch_shift": "high"}, KNOB_TABLE)
    assert err.value.for_flag() == "--pitch must be a finite number or 'auto', got 'high'"


def test_prepare_and_train_record_each_speakers_statistics(tmp_path):
    from rtsvc.training.pitch_stats import checkpoint_pitch_stats, dataset_pitch_stats

    for speaker, hz in (("alice", 300.0), ("bob", 120.0)):
        (tmp_path / speaker).mkdir()
        f0 = torch.tensor(vibrato_f0(2.0, hz))
        f0[:20] = 0.0  # unvoiced frames do not count
        torch.save({"f0": f0}, tmp_path / speaker / "c.pt")
    clips = [{"speaker": s, "file": f"{s}/c.pt"} for s in ("alice", "bob")]
    stats = dataset_pitch_stats(tmp_path, clips)
    assert stats["alice"]["median_hz"] == pytest.approx(300.0, rel=0.01)
    assert stats["bob"]["median_hz"] == pytest.approx(120.0, rel=0.01)
    assert 0.01 < stats["alice"]["log_f0_spread"] < 0.05  # the vibrato's spread
    base = {"carol": {"median_hz": 200.0}, "bob": {"median_hz": 1.0}}
    merged = checkpoint_pitch_stats({"pitch_stats": stats}, base, {"alice": 0, "bob": 1, "carol": 2})
    assert merged["bob"] == stats["bob"] and merged["carol"] == base["carol"]  # new data wins


def test_the_dsp_voice_refuses_auto_pitch_in_one_line():
    from rtsvc.voices.dsp import DspVoice

    with pytest.raises(UserError, match="--pitch auto needs a model voice"):
        DspVoice().convert(harmonic_tone(0.2), Knobs(pitch_mode="auto"))

