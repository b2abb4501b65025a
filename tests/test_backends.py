"""The torch backend: batched CFG velocity, vocoding, precision and model dispatch errors."""

import pytest
import torch

from rtsvc.backends.torch_backend import TorchBackend
from rtsvc.errors import UserError
from rtsvc.models.flow import Conditioning
from rtsvc.models.guidance import Guidance
from rtsvc.models.loading import load_dit, load_vocoder
from rtsvc.pretrained import PretrainedPaths
from rtsvc.voices.spec import VoiceSpec, open_model
from tests.tiny_models import make_tiny_dit_checkpoint, make_tiny_vocoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    ckpt = make_tiny_dit_checkpoint(root / "tiny.ckpt")
    vocoder = make_tiny_vocoder(root / "vocoder")
    return ckpt, vocoder


@pytest.fixture(scope="module")
def backend(tiny):
    ckpt, vocoder = tiny
    return TorchBackend.from_checkpoint(ckpt, vocoder, torch.device("cpu"))


def _cond(b: int, n: int, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(spk=torch.tensor([1] * b), f0=200 + 50 * torch.rand(b, n, generator=g),
                        rms=0.1 * torch.rand(b, n, generator=g), cvec=torch.randn(b, n, 768, generator=g),
                        whisper=torch.randn(b, n, 1280, generator=g))


def test_v2_guided_velocity_batches_both_branches_like_two_calls(backend):
    b, n = 2, 20
    cond = _cond(b, n)
    x = torch.randn(b, n, 128, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.3)
    kw = dict(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, whisper=cond.whisper,
              time=t.expand(b))
    with torch.no_grad():
        full = backend.model(**kw, drop_whisper=False)
        null = backend.model(**kw, drop_whisper=True)
    assert (full - null).abs().max() > 1e-4  # whisper matters, so the test can tell branches apart
    got = backend.guided_velocity(x, t, cond, Guidance(cfg_strength=2.0))
    assert got.shape == (b, n, 128)
    torch.testing.assert_close(got, null + 2.0 * (full - null), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(backend.guided_velocity(x, t, cond, Guidance(cfg_strength=0.0)),
                               null, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(backend.guided_velocity(x, t, cond, Guidance(cfg_strength=1.0)),
                               full, atol=1e-5, rtol=1e-4)


def test_vocode_gives_512_samples_per_frame_and_is_a_function_of_its_inputs(backend):
    n = 12
    mel = torch.full((1, 128, n), -5.0)
    f0 = torch.full((1, n), 220.0)
    phase = torch.zeros(1, 9)
    noise = torch.randn(1, n * 512, 9, generator=torch.Generator().manual_seed(3))
    a = backend.vocode(mel, f0, phase, noise)
    b = backend.vocode(mel, f0, phase, noise.clone())
    c = backend.vocode(mel, f0, phase + 0.25, noise)
    assert a.shape == (1, n * 512) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_speakers_and_precision_checks(backend, tiny):
    assert backend.speakers == {"alice": 0, "bob": 1}
    ckpt, vocoder = tiny
    with pytest.raises(UserError, match="needs a CUDA device"):
        TorchBackend(load_dit(ckpt), load_vocoder(vocoder), torch.device("cpu"), precision="fp16")
    with pytest.raises(UserError, match="unknown precision"):
        TorchBackend(load_dit(ckpt), load_vocoder(vocoder), torch.device("cpu"), precision="fp8")


def test_open_model_dispatch_errors(tmp_path, tiny):
    ckpt, vocoder = tiny
    paths = PretrainedPaths(vocoder=str(vocoder))
    with pytest.raises(UserError, match="model not found"):
        open_model(VoiceSpec(model=tmp_path / "nope.ckpt"), paths)
    with pytest.raises(UserError, match="needs an exported .rtsvc bundle"):
        open_model(VoiceSpec(model=ckpt, backend="onnx"), paths)
    with pytest.raises(UserError, match="unknown backend"):
        open_model(VoiceSpec(model=ckpt, backend="tensorflow"), paths)
    bundle = tmp_path / "voice.rtsvc"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="runs on --backend onnx"):
        open_model(VoiceSpec(model=bundle, backend="torch"), paths)
    with pytest.raises(UserError, match="vocoder not found"):
        open_model(VoiceSpec(model=ckpt, backend="torch"), PretrainedPaths())
