"""ContentVec and Whisper through the real loaders: layouts, strict weights, upstream frame arithmetic."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rtsvc.errors import UserError
from rtsvc.features.contentvec import ContentVec
from rtsvc.features.frames import resize_frames
from rtsvc.features.whisper import WhisperEncoder
from tests.tiny_encoders import make_tiny_contentvec, make_tiny_whisper


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {
        "cvec": make_tiny_contentvec(root / "content-vec-best"),
        "cvec_st": make_tiny_contentvec(root / "cvec-safetensors", legacy_bin=False),
        "whisper": make_tiny_whisper(root / "whisper-large-v3"),
    }


@pytest.fixture(scope="module")
def whisper(dirs):
    return WhisperEncoder.load(dirs["whisper"])


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


# ---------------------------------------------------------------- ContentVec

def test_contentvec_published_layout_loads_every_weight(dirs):
    """pytorch_model.bin with weight_g / weight_v (as published) == save_pretrained layout."""
    legacy, modern = ContentVec.load(dirs["cvec"]), ContentVec.load(dirs["cvec_st"])
    audio = noise(1.0)
    a, b = legacy.hidden(audio), modern.hidden(audio)
    assert a.shape == (49, 768)  # (16000 - 400) // 320 + 1 frames at 50/s
    assert torch.equal(a, b)
    assert legacy.model.final_proj.weight.shape == (256, 768)


def test_contentvec_features_are_stretched_to_mel_frames_with_nearest(dirs):
    cv = ContentVec.load(dirs["cvec"])
    audio = noise(1.0, seed=1)
    raw, out = cv.hidden(audio), cv.encode(audio, 86)
    assert out.shape == (86, 768)
    idx = (torch.arange(86) * raw.shape[0] / 86).floor().long()  # F.interpolate "nearest" index rule
    assert torch.equal(out, raw[idx])


def test_contentvec_missing_weight_is_refused(dirs, tmp_path):
    bad = tmp_path / "cvec"
    bad.mkdir()
    (bad / "config.json").write_text((dirs["cvec"] / "config.json").read_text())
    state = torch.load(dirs["cvec"] / "pytorch_model.bin", weights_only=True)
    del state["masked_spec_embed"]  # training-only (SpecAugment): its absence is fine
    torch.save(state, bad / "pytorch_model.bin")
    assert ContentVec.load(bad).dim == 768
    del state["encoder.layers.0.attention.q_proj.weight"]
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(UserError, match="q_proj"):
        ContentVec.load(bad)
    with pytest.raises(UserError, match="--contentvec"):
        ContentVec.load(tmp_path / "nowhere")


# ---------------------------------------------------------------- Whisper

def test_whisper_second_to_last_hidden_state_matches_transformers(dirs, whisper):
    from transformers import WhisperForConditionalGeneration

    full = WhisperForConditionalGeneration.from_pretrained(str(dirs["whisper"])).eval()
    mel = whisper.log_mel(noise(1.0))
    assert mel.shape == (1, 128, 3000)
    with torch.no_grad():
        ref = full.model.encoder(mel, output_hidden_states=True).hidden_states
    ours = whisper.hidden_from_mel(mel)
    assert len(ref) == 3 and ours.shape == (1, 1500, 1280)
    torch.testing.assert_close(ours, ref[-2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, ref[-1])


def test_whisper_truncates_to_50_frames_per_second_then_stretches(whisper):
    audio = noise(1.37)
    raw = whisper.hidden(audio)
    assert raw.shape == (math.floor(1.37 * 50), 1280)
    out = whisper.encode(audio, 118)
    assert out.shape == (118, 1280)
    torch.testing.assert_close(out, resize_frames(raw, 118))


def test_whisper_pad_to_30s_true_and_false_give_the_same_grid_but_different_numbers(whisper):
    audio = noise(0.5, seed=2)
    padded, short = whisper.encode(audio, 43, pad_to_30s=True), whisper.encode(audio, 43, pad_to_30s=False)
    assert padded.shape == short.shape == (43, 1280)
    assert whisper.log_mel(audio, pad_to_30s=False).shape == (1, 128, 50)
    # attention sees 30 s of padding in one case only (how much that matters: docs/features.md)
    assert not torch.allclose(padded, short, atol=1e-3)


def test_whisper_longer_than_30s_is_encoded_in_30s_pieces(whisper):
    audio = noise(30.5, seed=3)
    feats = whisper.hidden(audio)
    assert feats.shape == (1525, 1280)
    head = whisper.hidden(audio[: 30 * 16000])
    torch.testing.assert_close(feats[:1500], head)


def test_whisper_missing_tensor_is_refused(dirs, tmp_path):
    bad = tmp_path / "whisper"
    bad.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (bad / name).write_text((dirs["whisper"] / name).read_text())
    state = load_file(str(dirs["whisper"] / "model.safetensors"))
    del state["model.encoder.layers.0.fc1.weight"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(UserError, match="layers.0.fc1.weight"):
        WhisperEncoder.load(bad)
    with pytest.raises(UserError, match="--whisper"):
        WhisperEncoder.load(tmp_path / "nowhere")


def test_whisper_short_window_position_offset_is_clamped_to_the_table(whisper):
    audio = noise(0.4, seed=4)
    mel = whisper.log_mel(audio, pad_to_30s=False)  # 40 mel frames -> 20 positions
    base = whisper.hidden_from_mel(mel)
    moved = whisper.hidden_from_mel(mel, position_offset=300)
    assert not torch.allclose(base, moved)
    torch.testing.assert_close(whisper.hidden_from_mel(mel, position_offset=10**6),
                               whisper.hidden_from_mel(mel, position_offset=1500 - 20))
    torch.testing.assert_close(whisper.hidden(audio, pad_to_30s=False, position_offset=300), moved[0])


def test_hub_ids_not_in_the_cache_fail_with_one_line_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load, option in ((WhisperEncoder.load, "--whisper"), (ContentVec.load, "--contentvec")):
        with pytest.raises(UserError, match=option) as err:
            load("rtsvc-tests/not-a-cached-model")
        assert "\n" not in str(err.value)
