"""The rectified-flow sampler: upstream grid, CFG formula in one batch, Euler, frame-tied noise."""

import os

import pytest
import torch

from rtsvc.dsp.mel import normalize_mel
from rtsvc.errors import UserError
from rtsvc.models.families import sample_mel
from rtsvc.models.flow import (
    Conditioning,
    cfg_velocity,
    frame_noise,
    sample,
    time_grid,
)
from rtsvc.models.guidance import Guidance
from rtsvc.models.loading import load_dit
from tests.tiny_models import make_tiny_dit_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_dit(make_tiny_dit_checkpoint(tmp_path_factory.mktemp("flow") / "tiny.ckpt")).model


def conditioning(b=2, n=16, seed=0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(spk=torch.arange(b) % 2, f0=torch.rand(b, n, generator=g) * 300 + 100,
                        rms=torch.rand(b, n, generator=g) * 0.1, cvec=torch.randn(b, n, 768, generator=g),
                        whisper=torch.randn(b, n, 1280, generator=g))


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, **kw):
        self.batches.append(kw["x"].shape[0])
        return self.inner(**kw)


def test_time_grid_is_upstream_linspace():
    assert torch.equal(time_grid(32), torch.linspace(0, 1, 32))
    assert time_grid(2).tolist() == [0.0, 1.0]
    with pytest.raises(UserError, match="at least 2"):
        time_grid(1)


def test_cfg_matches_two_separate_forwards(model):
    cond = conditioning()
    x, t = torch.randn(2, 16, 128), torch.tensor(0.4)
    kw = dict(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, whisper=cond.whisper,
              time=t.expand(2))
    full, null = model(**kw, drop_whisper=False), model(**kw, drop_whisper=True)
    for s in (0.5, 2.0):
        expected = null + s * (full - null)
        assert torch.allclose(cfg_velocity(model, x, t, cond, s), expected, atol=1e-5)
    assert (full - null).abs().max() > 1e-3  # the test would be vacuous otherwise
    counting = CountingModel(model)
    cfg_velocity(counting, x, t, cond, 2.0)
    assert counting.batches == [4]  # one forward carrying both branches


def test_cfg_zero_runs_only_the_null_branch(model):
    cond = conditioning()
    x, t = torch.randn(2, 16, 128), torch.full((2,), 0.7)
    counting = CountingModel(model)
    v = cfg_velocity(counting, x, t, cond, 0.0)
    assert counting.batches == [2]
    null = model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, whisper=cond.whisper,
                 time=t, drop_whisper=True)
    assert torch.equal(v, null)


def test_euler_uses_left_points_of_the_grid():
    noise = torch.zeros(1, 3, 128)
    # dx/dt = t: Euler sums t_i * dt over the left points: (steps - 2) / (2 (steps - 1))
    for steps in (2, 5, 32):
        out = sample(lambda x, t: torch.ones_like(x) * t, noise, steps)
        assert torch.allclose(out, torch.full_like(out, (steps - 2) / (2 * (steps - 1))), atol=1e-6)
    # constant velocity: x(1) = x(0) + v exactly, for any number of steps
    start = torch.randn(1, 3, 128)
    assert torch.allclose(sample(lambda x, t: torch.full_like(x, 0.3), start, 7), start + 0.3, atol=1e-6)
    # a straight path to a target is followed exactly (the rectified-flow ideal)
    target = torch.randn(1, 3, 128)
    out = sample(lambda x, t: (target - x) / (1 - t), start, 9)
    assert torch.allclose(out, target, atol=1e-5)


V2_CFG2 = Guidance(cfg_strength=2.0)


def test_sample_mel_shapes_range_and_determinism(model):
    cond = conditioning(n=12)
    a = sample_mel(model, cond, steps=4, guidance=V2_CFG2, seed=3)
    assert a.shape == (2, 12, 128)
    assert torch.equal(a, sample_mel(model, cond, steps=4, guidance=V2_CFG2, seed=3))
    assert not torch.allclose(a, sample_mel(model, cond, steps=4, guidance=V2_CFG2, seed=4))
    noise = frame_noise(0, 12, seed=3).expand(2, 12, 128)
    assert torch.equal(a, sample_mel(model, cond, steps=4, guidance=V2_CFG2, noise=noise))
    # output is de-normalised log-mel: normalising it back gives the flow's own [-1, 1]-scale values
    x = sample(lambda x, t: cfg_velocity(model, x, t, cond, 2.0), noise, 4)
    assert torch.allclose(normalize_mel(a), x, atol=1e-5)


def test_frame_noise_is_tied_to_absolute_frames():
    a, b = frame_noise(100, 50, seed=7), frame_noise(90, 50, seed=7)
    assert a.shape == (50, 128) and a.dtype == torch.float32
    assert torch.equal(a[:40], b[10:])  # frames 100..139 agree across windows
    assert not torch.allclose(a[0], a[1])  # frames differ from each other
    assert not torch.allclose(frame_noise(100, 5, seed=8), a[:5])  # and across seeds
    assert torch.equal(frame_noise(-3, 6)[3:], frame_noise(0, 3))  # negative frames work
    big = frame_noise(0, 4000)
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01
    assert abs((big.abs() < 1).float().mean().item() - 0.6827) < 0.01  # Gaussian, not uniform
