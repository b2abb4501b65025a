"""The openvpi NSF-HiFiGAN: strict loading with weight norm, lengths, seeded randomness, the
harmonic source's pitch."""

import json
import math
import os

import numpy as np
import pytest
import torch

from rtsvc.errors import UserError
from rtsvc.models.loading import load_vocoder
from rtsvc.models.vocoder import HARMONIC_NUM, SINE_AMP, NsfHifiGan, fold_weight_norm, sine_source
from tests.tiny_models import make_tiny_dit_checkpoint, make_tiny_vocoder, tiny_vocoder_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
SR = 44100


@pytest.fixture(scope="module")
def vocoder_path(tmp_path_factory):
    return make_tiny_vocoder(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def vocoder(vocoder_path):
    return load_vocoder(vocoder_path)


def mel_f0(b=1, n=10, hz=220.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 128, n, generator=g) - 5.0, torch.full((b, n), hz)


def peak_hz(signal: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / SR)[np.argmax(spectrum)])


def test_checkpoint_layout_and_config(vocoder_path, vocoder):
    ckpt = torch.load(vocoder_path, weights_only=True)
    keys = set(ckpt["generator"])
    assert {"conv_pre.weight_g", "conv_pre.weight_v", "ups.0.weight_g", "resblocks.0.convs1.0.weight_v",
            "conv_post.weight_g", "m_source.l_linear.weight", "noise_convs.0.weight"} <= keys
    assert not any(k.endswith(".weight") and k.split(".")[0] in ("conv_pre", "ups", "resblocks", "conv_post")
                   for k in keys)  # every HiFi-GAN conv carries weight norm
    config = json.loads((vocoder_path.parent / "config.json").read_text())
    assert math.prod(config["upsample_rates"]) == 512 and config["num_mels"] == 128
    assert vocoder.upp == 512 and vocoder.config.upsample_initial_channel == 32
    assert not vocoder.training


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_weight_norm_fold_matches_torch(vocoder_path):
    """Folding weight_g / weight_v gives what torch's weight_norm computes (Conv1d and ConvTranspose1d)."""
    for layer in (torch.nn.Conv1d(4, 6, 3), torch.nn.ConvTranspose1d(6, 3, 4, 2)):
        wn = torch.nn.utils.weight_norm(layer)
        with torch.no_grad():
            wn.weight_g.mul_(torch.rand_like(wn.weight_g) + 0.5)
        folded = fold_weight_norm({"l.weight_g": wn.weight_g, "l.weight_v": wn.weight_v})
        wn(torch.randn(1, layer.in_channels, 8))  # refresh .weight from g and v
        assert torch.allclose(folded["l.weight"], wn.weight, atol=1e-6)
    # the loaded model's weights equal the folded checkpoint's
    ckpt = torch.load(vocoder_path, weights_only=True)["generator"]
    model = load_vocoder(vocoder_path)
    assert torch.allclose(model.ups[1].weight, fold_weight_norm(ckpt)["ups.1.weight"])


def test_output_length_is_frames_times_hop(vocoder):
    for b, n in ((1, 1), (1, 10), (2, 17)):
        mel, f0 = mel_f0(b, n)
        audio = vocoder(mel, f0, generator=torch.Generator().manual_seed(0))
        assert audio.shape == (b, n * 512)
        assert torch.isfinite(audio).all() and audio.abs().max() <= 1.0
        assert audio.std() > 1e-4  # not silent


def test_randomness_is_injectable_and_seeded(vocoder):
    mel, f0 = mel_f0(2, 8)
    a = vocoder(mel, f0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, vocoder(mel, f0, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a, vocoder(mel, f0, generator=torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(1)
    phase = torch.rand(1, HARMONIC_NUM + 1, generator=g)
    phase[:, 0] = 0
    noise = torch.randn(2, 8 * 512, HARMONIC_NUM + 1, generator=g)
    assert torch.equal(a, vocoder(mel, f0, phase=phase, noise=noise))  # same draws, same audio
    # global-RNG draws happen in upstream's order: rand(1, 1, 9) for phases, then randn_like(sines)
    torch.manual_seed(5)
    b = vocoder(mel, f0)
    torch.manual_seed(5)
    up_phase = torch.rand(1, 1, HARMONIC_NUM + 1)
    up_phase[..., 0] = 0
    up_noise = torch.randn(2, 8 * 512, HARMONIC_NUM + 1)
    assert torch.equal(b, vocoder(mel, f0, phase=up_phase.reshape(1, -1), noise=up_noise))


def test_sine_source_pitch_and_phase_continuity():
    n, upp = 40, 512
    f0 = torch.full((1, n), 220.0)
    zeros = torch.zeros(1, HARMONIC_NUM + 1)
    sines = sine_source(f0, upp, SR, zeros, torch.zeros(1, n * upp, HARMONIC_NUM + 1))
    assert sines.shape == (1, n * upp, HARMONIC_NUM + 1)
    assert abs(peak_hz(sines[0, :, 0].numpy()) - 220) < 3
    assert abs(peak_hz(sines[0, :, 2].numpy()) - 660) < 3  # channel k is harmonic k+1
    # the phase runs on across frame boundaries: equal to one continuous sine
    t = torch.arange(1, n * upp + 1, dtype=torch.float64) / SR
    expected = SINE_AMP * torch.sin(2 * math.pi * 220 * t)
    assert torch.allclose(sines[0, :, 0].double(), expected, atol=2e-4)


def test_sine_source_follows_f0_and_unvoiced_is_noise():
    n, upp = 40, 512
    f0 = torch.cat([torch.full((1, n // 2), 220.0), torch.full((1, n // 2), 440.0)], dim=1)
    sines = sine_source(f0, upp, SR, torch.zeros(1, 9), torch.zeros(1, n * upp, 9))[0, :, 0].numpy()
    half = n // 2 * upp
    assert abs(peak_hz(sines[:half]) - 220) < 3 and abs(peak_hz(sines[half:]) - 440) < 3
    f0[:, 10:20] = 0.0  # unvoiced frames: only the noise, scaled to SINE_AMP / 3
    noise = torch.ones(1, n * upp, 9)
    out = sine_source(f0, upp, SR, torch.zeros(1, 9), noise)
    assert torch.allclose(out[0, 10 * upp:20 * upp], torch.full((10 * upp, 9), SINE_AMP / 3))
    clean = sine_source(f0, upp, SR, torch.zeros(1, 9), torch.zeros(1, n * upp, 9))
    assert torch.allclose(out[0, :upp] - clean[0, :upp], torch.full((upp, 9), 0.003), atol=1e-6)  # voiced


def test_vocoder_output_depends_on_f0(vocoder):
    """F0 reaches the output through the harmonic source (same mel and noise, other F0)."""
    mel, f0 = mel_f0(1, 20)
    g = torch.Generator().manual_seed(0)
    a = vocoder(mel, f0, generator=g)
    g = torch.Generator().manual_seed(0)
    b = vocoder(mel, f0 * 2, generator=g)
    assert (a - b).abs().max() > 1e-4


def test_loader_errors(tmp_path, vocoder_path):
    assert isinstance(load_vocoder(vocoder_path.parent), NsfHifiGan)  # the folder works too
    with pytest.raises(UserError, match="vocoder checkpoint not found"):
        load_vocoder(tmp_path / "none" / "model.ckpt")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "model.ckpt").write_bytes(vocoder_path.read_bytes())
    with pytest.raises(UserError, match="config.json must sit beside"):
        load_vocoder(lonely / "model.ckpt")
    dit_dir = tmp_path / "dit"
    make_tiny_dit_checkpoint(dit_dir / "model.ckpt")
    tiny_vocoder_config().to_json(dit_dir / "config.json")
    with pytest.raises(UserError, match="not an NSF-HiFiGAN checkpoint.*RIFT-SVC model"):
        load_vocoder(dit_dir)
    bad_cfg = tmp_path / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "model.ckpt").write_bytes(vocoder_path.read_bytes())
    (bad_cfg / "config.json").write_text('{"sampling_rate": 44100}')
    with pytest.raises(UserError, match="not an NSF-HiFiGAN config.json"):
        load_vocoder(bad_cfg)


def test_loader_is_strict(tmp_path, vocoder_path):
    for name, edit in (("extra", lambda g: g.__setitem__("foo.weight", torch.zeros(1))),
                       ("missing", lambda g: g.pop("m_source.l_linear.bias")),
                       ("half_pair", lambda g: g.pop("conv_post.weight_v"))):
        d = tmp_path / name
        make_tiny_vocoder(d)
        ckpt = torch.load(d / "model.ckpt", weights_only=True)
        edit(ckpt["generator"])
        torch.save(ckpt, d / "model.ckpt")
        with pytest.raises(UserError, match="does not match the NSF-HiFiGAN"):
            load_vocoder(d)
    # a checkpoint made for another channel width is refused, not silently reshaped
    d = tmp_path / "wide"
    make_tiny_vocoder(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["upsample_initial_channel"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not match"):
        load_vocoder(d)
