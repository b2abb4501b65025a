"""`rtsvc eval`: the metrics on cases whose answer is known, the --config grammar, one-line errors,
and the whole command on tiny checkpoints and bundles (V2, V3, students) writing eval.json and eval.png."""

import json
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import soundfile as sf
import torch

from rtsvc.eval.configs import REFERENCE, parse_config, parse_configs
from rtsvc.eval.metrics import (
    Dnsmos,
    SpeakerEncoder,
    cosine,
    f0_accuracy,
    level_matched,
    log_spectral_distance,
    mel_l1,
)
from rtsvc.eval.runner import EvalPlan, run_eval
from tests.cli_helpers import SR, harmonic_tone, run_cli, run_cli_captured, write_wav
from tests.tiny_encoders import make_tiny_pretrained_dir
from tests.tiny_models import make_tiny_dit_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TEXT = "The quick brown fox jumps over the lazy dog. Real time voice conversion needs clean input."


def espeak(text: str = TEXT, voice: str = "en") -> np.ndarray:
    """espeak-ng speech at 44.1 kHz, peak 0.5."""
    import soxr

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng not found: apt-get install espeak-ng (the speech metrics need speech)")
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", voice, "-w", f.name, text], check=True, capture_output=True)
        audio, sr = sf.read(f.name, dtype="float32")
    audio = soxr.resample(audio, sr, SR).astype(np.float32)
    return 0.5 * audio / np.max(np.abs(audio))


@pytest.fixture(scope="module")
def speech_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    write_wav(root / "fox.wav", espeak()[: 3 * SR])
    write_wav(root / "typing.wav", espeak("Please keep typing while I talk, it is fine.")[: 3 * SR])
    return root


# --- metrics whose answer is known -------------------------------------------------------------------

def test_identical_audio_has_zero_distance_and_a_change_has_some():
    a = harmonic_tone(1.0, 180.0, vibrato=0.02)
    assert log_spectral_distance(a, a.copy()) == 0.0 and mel_l1(a, a.copy()) == 0.0
    # level matching: a quieter copy is the same sound
    assert log_spectral_distance(level_matched(0.25 * a, a), a) < 1e-3
    b = harmonic_tone(1.0, 190.0, vibrato=0.02)
    assert log_spectral_distance(b, a) > 1.0 and mel_l1(b, a) > 0.1


def test_one_semitone_is_100_cents_and_voicing_agreement_counts_frames():
    src = np.array([0, 100.0, 200.0, 300.0, 0, 0])
    up = src * 2 ** (1 / 12)
    acc = f0_accuracy(src, up)
    assert acc.cents == pytest.approx(100.0) and acc.gross == 1.0 and acc.voicing == 1.0 and acc.frames == 3
    assert f0_accuracy(src, up, shift=1.0).cents == pytest.approx(0.0, abs=1e-9)
    assert f0_accuracy(src, src * 2 ** (-3 / 12)).cents == pytest.approx(300.0)
    half = f0_accuracy(src, np.array([0, 100.0, 0, 0, 0, 150.0]))  # frames 0, 1, 4 agree on voicing
    assert half.voicing == pytest.approx(3 / 6) and half.frames == 1 and half.cents == pytest.approx(0.0)
    assert np.isnan(f0_accuracy(src, np.zeros(6)).cents)


def test_a_clips_speaker_similarity_to_itself_is_one_and_another_voice_is_lower():
    encoder = SpeakerEncoder()
    clip = espeak()
    own = cosine(encoder.embed(clip), encoder.target([clip]))
    assert own == pytest.approx(1.0, abs=1e-5)
    other = cosine(encoder.embed(espeak(voice="en+f3")), encoder.target([clip]))
    assert other < 0.9, other


def test_noise_lowers_dnsmos():
    dnsmos = Dnsmos()
    clean = espeak()
    noise = np.random.default_rng(0).standard_normal(len(clean)).astype(np.float32)
    noisy = clean + noise * np.sqrt(np.mean(clean ** 2))  # 0 dB SNR
    noisy = noisy / np.max(np.abs(noisy))
    a, b = dnsmos(clean), dnsmos(noisy)
    assert 1.0 <= b["ovrl"] and a["ovrl"] <= 5.0
    assert a["ovrl"] - b["ovrl"] > 0.5 and a["bak"] - b["bak"] > 1.0, (a, b)


# --- the whole run, DSP voice (no model) ------------------------------------------------------------

def _plan(clips, texts, **changes) -> EvalPlan:
    configs, ref = parse_configs(texts, changes.pop("reference", None))
    return EvalPlan(clips=clips, configs=configs, reference=ref, speaker_metric=False, quality_metric=False,
                    **changes)


def test_identical_configurations_give_zero_distance_and_a_semitone_gives_100_cents(speech_clips):
    result = run_eval(_plan(speech_clips, ["offline", "offline:name=again", "offline:pitch=1,name=up",
                                           "live:block=92.9"]))
    s = result.summary
    assert list(s) == ["input", "offline", "again", "up", "live:block=92.9"]
    for label in ("offline", "again"):  # the reference and its twin
        assert s[label]["lsd_db"]["mean"] == 0.0 and s[label]["mel_l1"]["mean"] == 0.0
        assert s[label]["cents"]["mean"] < 25.0  # WORLD resynthesis jitters by ~15 cents either way
    assert s["up"]["cents"]["mean"] == pytest.approx(100.0, abs=10.0)  # WORLD on speech: within 10 cents
    assert s["up"]["gross"]["mean"] > 0.5 and s["up"]["lsd_db"]["mean"] > 0.5
    live = s["live:block=92.9"]
    assert live["lsd_db"]["mean"] > 0.1 and live["latency_ms"] > 92.9 and s["offline"]["latency_ms"] is None
    assert all(v["rtf"] > 0 for k, v in s.items() if k != "input")
    assert len(result.per_clip["up"]) == 2 and result.clips == ["fox.wav", "typing.wav"]


# --- the --config grammar and one-line errors ---------------------------------------------------------

def test_config_strings():
    c = parse_config("live:block=104.5,int8,f0=fcpe,denoise=rnnoise,dit_context=500")
    assert (c.mode, c.block_ms, c.int8, c.f0, c.denoise, c.dit_context_ms) == ("live", 104.5, True, "fcpe",
                                                                               "rnnoise", 500.0)
    assert parse_config("offline:steps=8,model=s.ckpt,name=student").label == "student"
    configs, ref = parse_configs(["live:block=150.9"])
    assert ref.text == REFERENCE and configs[0] is ref  # the offline 32-step teacher is added first
    configs, ref = parse_configs(["live", "offline"])
    assert ref.text == "offline" and len(configs) == 2  # plain offline is that reference already
    assert parse_configs(["live", "offline:steps=8"], reference="live")[1].text == "live"


def test_encoder_and_vocoder_context_keys_reach_the_voice_spec():
    from types import SimpleNamespace

    from rtsvc.eval.runner import _Voices
    from rtsvc.voices.spec import VoiceSpec

    c = parse_config("live:encoder_context=300,vocoder_context=4,dit_context=100")
    assert (c.encoder_context_ms, c.vocoder_context, c.dit_context_ms) == (300.0, 4, 100.0)
    voices = _Voices(SimpleNamespace(spec=VoiceSpec(vocoder_context=12), int8_bundle=None))
    spec = voices.spec_for(c)
    assert (spec.encoder_context_ms, spec.vocoder_context, spec.dit_context_ms, spec.streaming) == \
        (300.0, 4, 100.0, True)
    plain = voices.spec_for(parse_config("live:block=150.9"))  # not given: the command's spec
    assert (plain.encoder_context_ms, plain.vocoder_context) == (1000.0, 12)


@pytest.mark.parametrize("text, message", [
    ("live:encoder_context=0.5", "encoder_context must be at least 100 ms, got 0.5"),
    ("live:encoder_context=inf", "encoder_context must be a finite number"),
    ("live:vocoder_context=4.5", "vocoder_context must be an integer"),
    ("live:vocoder_context=65", "vocoder_context must be 0 to 64 mel frames, got 65"),
    ("offline:encoder_context=300", "encoder_context only apply to live configurations"),
    ("online:steps=3", "starts with the mode, offline or live"),
    ("offline:steps=1", "steps must be between 2 and"),
    ("offline:steps=four", "steps must be an integer"),
    ("live:block=-5", "block must be positive ms"),
    ("live:block=nan", "block must be a finite number"),
    ("offline:block=100", "block only apply to live configurations"),
    ("live:f0=crepe", "unknown f0 'crepe': use rmvpe, fcpe, pyworld"),
    ("live:speed=2", "unknown key 'speed'"),
    ("live:fast", "'fast' is not key=value nor a flag"),
    ("live:steps=4,steps=8", "steps is given twice"),
])
def test_bad_config_is_one_line(text, message, tmp_path, capsys, monkeypatch):
    write_wav(tmp_path / "a.wav", harmonic_tone(1.0))
    code, _, err = run_cli(["eval", "--clips", tmp_path, "--config", text, "--out", tmp_path / "o"], capsys,
                           monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --config"), err
    assert message in lines[0], err


def test_bad_clip_is_one_line_naming_it_before_any_model_loads(tmp_path, capsys, monkeypatch):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_wav(clips / "good.wav", harmonic_tone(1.0))
    write_wav(clips / "silent.wav", np.zeros(SR, np.float32))
    code, _, err = run_cli(["eval", "--clips", clips, "--model", tmp_path / "missing.ckpt", "--out",
                            tmp_path / "o"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "model not found" in err  # the model path is said first
    code, _, err = run_cli(["eval", "--clips", clips, "--out", tmp_path / "o"], capsys, monkeypatch)
    assert code == 2 and "clip" in err and "silent.wav" in err and "silent" in err.split("silent.wav")[1], err
    (clips / "silent.wav").write_bytes(b"RIFF\x00\x00junk")
    code, _, err = run_cli(["eval", "--clips", clips, "--out", tmp_path / "o"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "silent.wav" in err and "cannot read" in err, err
    (clips / "silent.wav").unlink()
    code, _, err = run_cli(["eval", "--clips", tmp_path / "nothing", "--out", tmp_path / "o"], capsys,
                           monkeypatch)
    assert code == 2 and "is not a folder of audio clips" in err
    code, _, err = run_cli(["eval", "--clips", clips, "--config", "live:int8", "--out", tmp_path / "o"],
                           capsys, monkeypatch)
    assert code == 2 and "int8 needs a .rtsvc bundle" in err, err


# --- the command on tiny models -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny pretrained folder, V2 and V3 teachers, their students and a V2 bundle; one clip."""
    from tests.upstream.fixtures import make_v3_head

    root = tmp_path_factory.mktemp("tiny-eval")
    pretrained = make_tiny_pretrained_dir(root / "pretrained")
    models = {"v2": make_tiny_dit_checkpoint(root / "v2.ckpt"),
              "v2-student": make_tiny_dit_checkpoint(root / "v2s.ckpt", student_nfe=1),
              "v3": make_v3_head(root / "v3.ckpt")[0]}
    models["v3-student"] = _v3_student(models["v3"], root)
    code, _, err = run_cli_captured(["export", models["v2"], "--out", root / "v2.rtsvc", "--pretrained-dir",
                                     pretrained])
    assert code == 0, err
    models["v2-bundle"] = root / "v2.rtsvc"
    clips = root / "clips"
    clips.mkdir()
    write_wav(clips / "tone.wav", harmonic_tone(1.5, 180.0, vibrato=0.03))
    return root, pretrained, models, clips


def _v3_student(teacher, root):
    """A V3 student made the way `rtsvc distill` makes one (two steps on cheap features)."""
    from rtsvc.training.distill import DistillConfig, distill
    from rtsvc.training.prepare import prepare_dataset

    from tests.test_prepare import cheap_extract, make_voices

    data = root / "data3"
    make_voices(data, broken=False)

    def extract(audio):
        feats = cheap_extract(audio)
        del feats["whisper"]
        return feats

    prepare_dataset(data, extract, {"f0": "test", "family": "v3", "resize": "linear"}, workers=1)
    ckpt = torch.load(teacher, weights_only=False)
    ckpt["hyper_parameters"]["cfg"]["spk2idx"] = {"high": 0, "low": 1}
    torch.save(ckpt, root / "v3-teacher.ckpt")
    distill(DistillConfig(teacher=str(root / "v3-teacher.ckpt"), data=str(data), out=str(root / "s3"),
                          max_steps=2, save_every=2, batch_size=1, pairs=1, num_workers=0, device="cpu",
                          progress=False, max_frame_len=32))
    return root / "s3" / "last.ckpt"


@pytest.mark.parametrize("kind", ["v2", "v2-student", "v3", "v3-student", "v2-bundle"])
def test_eval_command_on_tiny_models(tiny, kind, tmp_path, capsys, monkeypatch):
    root, pretrained, models, clips = tiny
    configs = ["offline", "live:block=150.9,steps=3", "live:block=104.5,f0=fcpe,name=fast"]
    if kind == "v2-bundle":
        configs.append("live:block=150.9,int8,name=int8")
    extra = ["--speaker-clips", clips] if kind == "v2" else ["--no-similarity", "--no-dnsmos"]
    args = ["eval", "--model", models[kind], "--clips", clips, "--pretrained-dir", pretrained, "--f0",
            "pyworld", "--device", "cpu", "--out", tmp_path / "out", *extra]
    for text in configs:
        args += ["--config", text]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert "rtsvc eval: 1 clip(s), reference 'offline'" in out and "fast" in out
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    s = report["summary"]
    assert report["reference"] == "offline"
    assert list(s) == ["input", *[parse_config(t).label for t in configs]]
    assert s["offline"]["lsd_db"]["mean"] == 0.0 and s["offline"]["latency_ms"] is None
    assert s["live:block=150.9,steps=3"]["steps"] == 3
    assert s["live:block=150.9,steps=3"]["lsd_db"]["mean"] > 0 and s["fast"]["f0"] == "fcpe"
    assert s["fast"]["latency_ms"] < s["live:block=150.9,steps=3"]["latency_ms"]
    if "student" in kind:
        assert s["offline"]["steps"] == 2 and s["fast"]["steps"] == 2  # a student's own count
    else:
        assert s["offline"]["steps"] == 32 and s["fast"]["steps"] == 4
    if kind == "v2":
        assert report["speaker_reference_clips"] == 1
        assert s["input"]["similarity"]["mean"] == pytest.approx(1.0, abs=1e-5)  # the clip is the target
        assert 1.0 <= s["offline"]["dnsmos"]["mean"] <= 5.0
    else:
        assert s["offline"]["similarity"]["mean"] is None
    if kind == "v2-bundle":
        int8 = json.loads((tmp_path / "out" / "int8" / "v2.rtsvc" / "manifest.json").read_text())
        assert int8["export"]["precision"] == "int8" and s["int8"]["model"].endswith("int8/v2.rtsvc")
        assert s["int8"]["lsd_db"]["mean"] > 0
    png = (tmp_path / "out" / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert sorted(p.parent.name for p in (tmp_path / "out" / "audio").rglob("*.wav"))[0] == "00-offline"
