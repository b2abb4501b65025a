"""Offline conversion: the DSP voice and a tiny model through `rtsvc convert`, slicing, loudness."""

import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from rtsvc.errors import UserError
from rtsvc.offline import convert_offline
from rtsvc.pretrained import resolve_pretrained
from rtsvc.settings import Knobs
from rtsvc.voices.defaults import MODEL_STREAM
from rtsvc.voices.spec import VoiceSpec, open_model
from tests.cli_helpers import SR, harmonic_tone, run_cli, write_wav
from tests.tiny_models import make_tiny_dit_checkpoint

with warnings.catch_warnings():  # pyworld imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import pyworld


def median_f0(audio: np.ndarray) -> float:
    f0, _ = pyworld.harvest(audio.astype(np.float64), SR, f0_floor=60, f0_ceil=800, frame_period=10)
    voiced = f0[f0 > 0]
    assert voiced.size > 0.5 * f0.size, "output should be mostly voiced"
    return float(np.median(voiced))


def centroid(audio: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    freqs = np.fft.rfftfreq(len(audio), 1 / SR)
    return float((spec * freqs).sum() / spec.sum())


# --- the DSP voice through the CLI --------------------------------------------------------------

@pytest.fixture(scope="module")
def tone_wav(tmp_path_factory):
    return write_wav(tmp_path_factory.mktemp("in") / "tone.wav", harmonic_tone(1.5, 150.0, vibrato=0.01))


def test_dsp_pitch_12_doubles_f0(tone_wav, tmp_path, capsys, monkeypatch):
    out = tmp_path / "up.flac"
    code, _, err = run_cli(["convert", tone_wav, out, "--pitch", "12"], capsys, monkeypatch)
    assert code == 0, err
    audio, sr = sf.read(out, dtype="float32")
    assert sr == SR and len(audio) == int(1.5 * SR)
    core = slice(int(0.2 * SR), int(1.3 * SR))  # away from the start/end fades
    ratio = median_f0(audio[core]) / median_f0(harmonic_tone(1.5, 150.0, vibrato=0.01)[core])
    assert abs(ratio - 2.0) < 0.06, ratio


def test_dsp_formant_moves_envelope_not_f0(tone_wav, tmp_path, capsys, monkeypatch):
    outs = {}
    for formant in ("1.0", "1.4"):
        outs[formant] = tmp_path / f"f{formant}.wav"
        args = ["convert", tone_wav, outs[formant], "--formant", formant]
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, err
    core = slice(int(0.2 * SR), int(1.3 * SR))
    plain, shifted = (sf.read(outs[k], dtype="float32")[0][core] for k in ("1.0", "1.4"))
    assert centroid(shifted) > 1.15 * centroid(plain)
    assert abs(median_f0(shifted) / median_f0(plain) - 1.0) < 0.03


def test_dsp_stream_mode_keeps_length_and_shifts_pitch(tone_wav, tmp_path, capsys, monkeypatch):
    out = tmp_path / "stream.wav"
    code, _, err = run_cli(["convert", tone_wav, out, "--stream", "--pitch", "12", "--block-ms", "100"],
                           capsys, monkeypatch)
    assert code == 0, err
    audio, _ = sf.read(out, dtype="float32")
    assert len(audio) == int(1.5 * SR)
    core = slice(int(0.4 * SR), int(1.3 * SR))
    assert abs(median_f0(audio[core]) / 150.0 - 2.0) < 0.1


def test_stream_file_reads_block_by_block_and_equals_streaming_the_whole_clip(tmp_path):
    """`convert --stream` on a file: any read size gives the samples `convert_stream` gives for the
    whole clip in memory, aligned with the input and as long (a model-like stateful voice: the DSP one)."""
    from rtsvc.engine import StreamConfig, convert_stream
    from rtsvc.offline import stream_file
    from rtsvc.voices.spec import open_voice

    audio = harmonic_tone(3.3, 180.0) * np.hanning(int(3.3 * SR)).astype(np.float32) ** 0.2
    wav = tmp_path / "in.wav"
    sf.write(wav, audio, SR, subtype="FLOAT")
    voice = open_voice(VoiceSpec(model=None))
    config = StreamConfig(block_ms=100).validate()
    knobs = Knobs(pitch_shift=5.0)
    whole = convert_stream(voice, audio, knobs, config)
    for read_s in (0.37, 1.0, 10.0):
        out = tmp_path / f"out-{read_s}.wav"
        seconds = stream_file(voice, wav, out, knobs, config, read_s=read_s)
        got, sr = sf.read(out, dtype="float32")
        assert sr == SR and len(got) == len(audio) and seconds == pytest.approx(len(audio) / SR)
        np.testing.assert_allclose(got, np.clip(whole, -1, 1), atol=2.0 ** -15)  # a 16-bit wav, as before
        assert np.abs(got).max() > 0.05
    assert not list(tmp_path.glob(".*partial*"))  # renamed into place


# --- offline slicing and loudness with a voice that records what it is given --------------------

class EchoVoice:
    """Returns its input (times `gain`) and records every call."""

    sample_rate = SR
    speakers = ["echo"]
    stream_defaults = MODEL_STREAM  # what `auto` gives any voice but the DSP voice

    def __init__(self, gain: float = 1.0):
        self.gain, self.calls, self.resets = gain, [], 0

    def reset(self):
        self.resets += 1

    def convert(self, audio, knobs, start_sample=0, tail=None):
        self.calls.append((start_sample, len(audio), float(np.sqrt(np.mean(audio**2)))))
        return audio * self.gain


def _speech_like(seconds_pattern):
    parts = []
    for kind, seconds in seconds_pattern:
        n = int(seconds * SR)
        parts.append(harmonic_tone(seconds, 140.0, 0.2) if kind == "v" else np.zeros(n, np.float32))
    return np.concatenate(parts)


def test_long_input_is_sliced_at_silences_and_joined_to_the_same_length():
    audio = _speech_like([("s", 0.5), ("v", 6), ("s", 1.5), ("v", 7), ("s", 0.2), ("v", 4), ("s", 1),
                          ("v", 4.8)])
    assert abs(len(audio) / SR - 25.0) < 0.01
    voice, done = EchoVoice(), []
    out = convert_offline(voice, audio, Knobs(), progress=lambda i, n: done.append((i, n)), target_lufs=None)
    assert out.shape == audio.shape and np.isfinite(out).all()
    assert len(voice.calls) == 4 and voice.resets == 4 and done[-1] == (4, 4)
    starts = [s for s, _, _ in voice.calls]
    # slices begin in the silences (within max_sil_kept + crossfade pad), in order, offsets absolute
    for start, sound_at in zip(starts[1:], [8.0, 15.2, 20.2], strict=True):
        assert sound_at * SR - 0.32 * SR <= start <= sound_at * SR
    inner = np.zeros(len(audio), bool)
    for s, n, _ in voice.calls:
        inner[s + 2000:s + n - 2000] = True
    np.testing.assert_allclose(out[inner], audio[inner], atol=1e-6)  # echo voice: identity away from fades
    assert np.max(np.abs(out[int(7 * SR):int(7.6 * SR)])) == 0.0  # dropped silence stays silent


def test_slices_are_brought_to_minus_18_lufs_and_restored_by_default():
    import pyloudnorm

    audio = _speech_like([("v", 4), ("s", 1), ("v", 4)])
    audio[int(5 * SR):] *= 0.4  # second phrase 8 dB quieter (still above the slicer's -30 dBFS)
    meter = pyloudnorm.Meter(SR, block_size=0.1)
    voice = EchoVoice()
    out = convert_offline(voice, audio, Knobs(), restore_loudness=False)
    first, second = out[:int(4 * SR)], out[int(5 * SR):]
    assert abs(meter.integrated_loudness(first.astype(np.float64)) + 18.0) < 0.5
    assert abs(meter.integrated_loudness(second.astype(np.float64)) + 18.0) < 0.5
    out = convert_offline(EchoVoice(gain=3.0), audio, Knobs())
    core = slice(int(0.5 * SR), int(3.5 * SR))
    np.testing.assert_allclose(out[core], audio[core], atol=2e-3)


# --- a tiny RIFT-SVC model end to end -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_pretrained):
    root = tmp_path_factory.mktemp("model")
    return make_tiny_dit_checkpoint(root / "tiny.ckpt"), tiny_pretrained


def test_tiny_model_through_the_cli(tiny_model, tmp_path, capsys, monkeypatch):
    ckpt, pretrained = tiny_model
    audio = _speech_like([("s", 0.1), ("v", 1.5)])
    src = write_wav(tmp_path / "in.wav", audio)
    args = ["convert", src, tmp_path / "out.wav", "--model", ckpt, "--pretrained-dir", pretrained,
            "--f0", "pyworld", "--steps", "4", "--speaker", "bob", "--device", "cpu"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    out, sr = sf.read(tmp_path / "out.wav", dtype="float32")
    assert sr == SR and out.shape == audio.shape and np.isfinite(out).all()
    assert np.sqrt(np.mean(out[int(0.3 * SR):] ** 2)) > 1e-3  # the tiny vocoder makes sound


@pytest.fixture(scope="module")
def tiny_voice(tiny_model):
    ckpt, pretrained = tiny_model
    paths = resolve_pretrained(pretrained, need=("contentvec", "whisper", "vocoder"))
    voice = open_model(VoiceSpec(model=ckpt, backend="torch", device="cpu", f0="dio", streaming=False), paths)
    voice.whisper_pad_30s = False  # short clips: keeps the tiny Whisper cheap
    return voice


def test_model_voice_is_seeded_and_tail_matches_full(tiny_voice):
    audio = harmonic_tone(0.6, 180.0)
    a = tiny_voice.convert(audio, Knobs(steps=3, seed=1))
    b = tiny_voice.convert(audio, Knobs(steps=3, seed=1))
    c = tiny_voice.convert(audio, Knobs(steps=3, seed=2))
    assert a.shape == audio.shape and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(a - c)) > 1e-3
    # streaming asks for a tail only: same samples as the end of the whole window (vocoder context)
    tail = tiny_voice.convert(audio, Knobs(steps=3, seed=1), start_sample=0, tail=9000)
    assert tail.shape == (9000,)
    assert np.max(np.abs(tail - a[-9000:])) < 0.01 * np.max(np.abs(a))


def test_model_voice_start_noise_depends_on_absolute_position(tiny_voice):
    audio = harmonic_tone(0.6, 180.0)
    knobs = Knobs(steps=2, seed=0, cfg_strength=0.0)
    at_zero = tiny_voice.convert(audio, knobs, start_sample=0)
    later = tiny_voice.convert(audio, knobs, start_sample=20 * 512)  # same audio, other frames' noise
    assert at_zero.shape == later.shape == audio.shape
    assert np.max(np.abs(at_zero - later)) > 1e-3


def test_model_voice_unknown_speaker_lists_valid_ones(tiny_voice):
    with pytest.raises(UserError, match="unknown speaker 'carol'; this model has: alice, bob"):
        tiny_voice.convert(harmonic_tone(0.2), Knobs(speaker="carol"))


def test_model_voice_equals_the_pipeline_composed_by_hand(tiny_voice):
    """features (shifted F0) -> flow.sample_mel with frame noise -> vocoder with the same F0."""
    from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, resample
    from rtsvc.dsp.sinc import sinc_resample
    from rtsvc.models.families import sample_mel
    from rtsvc.models.flow import Conditioning, counter_normal
    from rtsvc.models.guidance import Guidance
    from rtsvc.voices.model import HARMONICS, NOISE_SEED_SALT, base_phase

    audio = harmonic_tone(0.5, 160.0)[: 40 * 512]
    knobs = Knobs(steps=3, seed=5, pitch_shift=12.0, cfg_strength=1.5, speaker="bob")
    got = tiny_voice.convert(audio, knobs)

    feats, backend = tiny_voice.features, tiny_voice.backend
    audio_16k = resample(audio, SR, ENCODER_SAMPLE_RATE)
    f0_16k = sinc_resample(audio, SR, ENCODER_SAMPLE_RATE)  # F0 hears upstream RMVPE's resampler
    f0 = feats.f0(f0_16k, 40, 12.0)[None]
    plain = feats.f0(f0_16k, 40, 0.0)[None]
    voiced = plain > 0
    torch.testing.assert_close(f0[voiced], 2 * plain[voiced])  # an octave up, for the DiT and vocoder
    cond = Conditioning(spk=torch.tensor([1]), f0=f0, rms=feats.rms(audio)[None],
                        cvec=feats.content(audio_16k, 40)[None],
                        whisper=feats.whisper(audio_16k, 40, pad_to_30s=False)[None])
    mel = sample_mel(backend.model, cond, steps=3, guidance=Guidance(cfg_strength=1.5), seed=5,
                     start_frame=0)
    noise = counter_normal(0, 40 * 512, HARMONICS, 5 ^ NOISE_SEED_SALT)[None]
    want = backend.vocoder(mel.transpose(1, 2), f0, phase=base_phase(5).float(), noise=noise)[0]
    np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-5)
