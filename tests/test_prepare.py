"""`rtsvc prepare`: -18 LUFS, slicing, feature cache layout, resume, bad files skipped.

Two synthetic voices (numpy harmonic signals: a low dark one and a high bright one, written at
22.05 kHz so resampling is exercised). The real encoders run once, in tests/test_train.py's
prepared dataset (the tiny Whisper still pads every clip to 30 s: ~1.7 s per clip here); these
tests use a cheap stand-in extractor (real mel and RMS, constant F0, random content features).
"""

import json

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import torch
from rtsvc.training.prepare import (
    MIN_CLIP_S,
    cache_root,
    load_metadata,
    normalize_loudness,
    prepare_dataset,
    slice_clips,
)

from rtsvc.dsp.mel import log_mel_spectrogram, rms_per_frame
from tests.cli_helpers import run_cli

SR_IN = 22050
VOICES = {"low": (120.0, 0.9), "high": (300.0, 0.4)}  # name: (mean F0 Hz, harmonic falloff)
FILES_PER_VOICE = 3
SECONDS = 2.0


def voice(f0: float, falloff: float, seconds: float, seed: int, sr: int = SR_IN,
          amp: float = 0.2) -> np.ndarray:
    """A sung-vowel-like tone: 12 harmonics with amplitude falloff**k, slow vibrato, a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    freq = f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t + seed))
    phase = 2 * np.pi * np.cumsum(freq) / sr
    x = sum(falloff ** k * np.sin((k + 1) * phase) for k in range(12))
    x = x / np.max(np.abs(x)) + 0.003 * rng.standard_normal(len(t))
    return (amp * x).astype(np.float32)


def make_voices(root, broken: bool = True) -> None:
    """root/low, root/high with FILES_PER_VOICE files each (+ a corrupt and a silent file)."""
    for i, (name, (f0, falloff)) in enumerate(VOICES.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(FILES_PER_VOICE):
            sf.write(root / name / f"take{k}.wav", voice(f0, falloff, SECONDS, seed=10 * i + k), SR_IN)
    if broken:
        (root / "low" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
        sf.write(root / "high" / "quiet.wav", np.zeros(SR_IN * 2, dtype=np.float32), SR_IN)


def cheap_extract(audio: np.ndarray) -> dict[str, torch.Tensor]:
    """Stand-in for the encoders: the real mel and RMS, F0 200 Hz, seeded random content features."""
    n = len(audio) // 512
    g = torch.Generator().manual_seed(n)
    return {"mel": log_mel_spectrogram(audio)[0].T, "f0": torch.full((n,), 200.0),
            "rms": rms_per_frame(audio)[0], "cvec": torch.randn(n, 768, generator=g),
            "whisper": torch.randn(n, 1280, generator=g)}


SETTINGS = {"f0": "test"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_voices(root)
    return root, prepare_dataset(root, cheap_extract, SETTINGS, workers=2)


def test_prepare_caches_every_clip_and_skips_bad_files(prepared):
    root, result = prepared
    assert result.processed == 2 * FILES_PER_VOICE and result.clips == 2 * FILES_PER_VOICE
    meta = load_metadata(root)
    assert meta["speakers"] == ["high", "low"]
    assert meta["settings"] == SETTINGS
    skipped = {s["path"].split("/")[-1]: s["reason"] for s in meta["skipped"]}
    assert set(skipped) == {"broken.wav", "quiet.wav"}
    assert "silent" in skipped["quiet.wav"]
    assert "cannot read" in skipped["broken.wav"]
    # one held-out clip per speaker (each has 3)
    assert sorted(c["speaker"] for c in meta["clips"] if c["split"] == "val") == ["high", "low"]
    expected_frames = int(SECONDS * 44100) // 512  # resampled from 22.05 kHz to 44.1 kHz
    for clip in meta["clips"]:
        assert abs(clip["frames"] - expected_frames) <= 2
        data = torch.load(cache_root(root) / clip["file"], weights_only=True)
        n = clip["frames"]
        assert data["mel"].shape == (n, 128) and data["cvec"].shape == (n, 768)
        assert data["whisper"].shape == (n, 1280) and data["f0"].shape == (n,) and data["rms"].shape == (n,)
        assert data["cvec"].dtype == torch.float16 and data["mel"].dtype == torch.float32


def test_prepare_output_is_loudness_normalised(prepared):
    """RMS of a -18 LUFS tone: the cached RMS frames match the normalised level, not the input's."""
    root, _ = prepared
    meta = load_metadata(root)
    clip = next(c for c in meta["clips"] if c["speaker"] == "low")
    rms = torch.load(cache_root(root) / clip["file"], weights_only=True)["rms"]
    audio = voice(*VOICES["low"], SECONDS, seed=0)
    normalised, _ = normalize_loudness(audio.astype(np.float32), SR_IN)
    level = float(np.sqrt(np.mean(normalised ** 2)))
    assert abs(float(rms[10:-10].mean()) / level - 1) < 0.1
    assert abs(level / float(np.sqrt(np.mean(audio ** 2))) - 1) > 0.3  # normalisation changed it


def test_normalize_loudness_hits_target_and_keeps_headroom():
    meter = pyloudnorm.Meter(44100)
    quiet = voice(200.0, 0.5, 3.0, seed=1, sr=44100, amp=0.01)
    out, before = normalize_loudness(quiet)
    assert before < -35
    assert abs(meter.integrated_loudness(out.astype(np.float64)) + 18.0) < 0.1
    spiky = quiet.copy()
    spiky[1000] = 0.5  # a click: reaching -18 LUFS would push it past full scale
    out, _ = normalize_loudness(spiky)
    assert np.max(np.abs(out)) <= 0.99 + 1e-6
    with pytest.raises(ValueError, match="silent"):
        normalize_loudness(np.zeros(44100, dtype=np.float32))


def test_slice_clips_cuts_at_silence_and_drops_short_pieces():
    sr = 44100
    tone = voice(150.0, 0.6, 3.5, seed=2, sr=sr)
    gap = np.zeros(sr, dtype=np.float32)
    blip = voice(150.0, 0.6, 0.4, seed=3, sr=sr)
    pieces = slice_clips(np.concatenate([tone, gap, tone, gap, blip]), sr)
    assert len(pieces) == 2 and MIN_CLIP_S > 0.4  # the 0.4 s blip is dropped
    for piece in pieces:
        assert len(piece) % 512 == 0
        assert 3.3 * sr < len(piece) < 4.0 * sr


def test_prepare_resumes_and_redoes_only_changed_work(tmp_path):
    make_voices(tmp_path, broken=False)
    settings = SETTINGS
    calls = []

    def counting(audio):
        calls.append(len(audio))
        return cheap_extract(audio)

    first = prepare_dataset(tmp_path, counting, settings, workers=2)
    assert first.processed == 6 and first.reused == 0 and len(calls) == 6
    second = prepare_dataset(tmp_path, counting, settings, workers=2)
    assert second.processed == 0 and second.reused == 6 and len(calls) == 6  # nothing recomputed
    # a new file and a changed setting: only what they affect is redone
    sf.write(tmp_path / "low" / "take9.wav", voice(120.0, 0.9, SECONDS, seed=99), SR_IN)
    third = prepare_dataset(tmp_path, counting, settings, workers=1)
    assert third.processed == 1 and third.reused == 6
    fourth = prepare_dataset(tmp_path, counting, {**settings, "f0": "other"}, workers=1)
    assert fourth.processed == 7
    meta = json.loads((cache_root(tmp_path) / "metadata.json").read_text())
    assert len(meta["clips"]) == 7 and meta["settings"]["f0"] == "other"


def test_prepare_rejects_a_folder_without_speakers(tmp_path, capsys, monkeypatch):
    sf.write(tmp_path / "loose.wav", voice(150.0, 0.5, 1.0, seed=0), SR_IN)
    code, _, err = run_cli(["prepare", tmp_path, "--f0", "pyworld"], capsys, monkeypatch)
    assert code == 2
    assert "folder named after the speaker" in " ".join(err.split())


def test_a_crash_in_one_file_is_reported_not_fatal(tmp_path):
    make_voices(tmp_path, broken=False)
    seen = []

    def flaky(audio):
        seen.append(1)
        if len(seen) == 2:
            raise KeyError("encoder exploded")
        return cheap_extract(audio)

    result = prepare_dataset(tmp_path, flaky, SETTINGS, workers=1)
    assert result.processed == 5 and len(result.skipped) == 1
    assert result.skipped[0].reason.startswith("KeyError")
    assert len(load_metadata(tmp_path)["clips"]) == 5


def test_too_little_audio_is_warned_per_speaker(prepared):
    from rtsvc.training.prepare import too_little_audio

    _, result = prepared  # 3 x 2 s per speaker: far too little to fine-tune on
    warnings = too_little_audio(result)
    assert len(warnings) == 2
    assert warnings[0].startswith("speaker high has only 0.1 min of usable audio")
    assert "about 10 min or more" in warnings[0]
    assert too_little_audio(result, minimum_min=0.05) == []  # 6 s each is above 3 s
