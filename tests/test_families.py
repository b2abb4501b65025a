"""A model family is one record plus its network: a family that exists only in this file (a tiny
network, registered here) loads, converts offline and streams through the library's real code
paths, which know it only through its `rtsvc.models.families.Family` record."""

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rtsvc.errors import UserError
from rtsvc.models.families import FAMILIES, V2, V3, Family, family_named, register, unregister
from rtsvc.models.flow import Conditioning
from rtsvc.models.guidance import Guidance
from rtsvc.pretrained import LAYOUT
from rtsvc.settings import Knobs
from tests.cli_helpers import harmonic_tone
from tests.tiny_encoders import make_tiny_pretrained_dir

TOY = "toy"


@dataclass
class ToyConfig:
    dim: int
    num_speaker: int = 1
    cvec_dim: int = 768
    n_mel: int = 128


class ToyNet(nn.Module):
    """A velocity network unlike either DiT: one hidden layer over [x, F0, RMS, content] per frame."""

    family = TOY

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.toy_speaker = nn.Embedding(config.num_speaker, config.dim)
        self.toy_time = nn.Linear(1, config.dim)
        self.toy_in = nn.Linear(config.n_mel + 2 + config.cvec_dim, config.dim)
        self.toy_out = nn.Linear(config.dim, config.n_mel)

    def forward(self, x, spk, f0, rms, cvec, time, drop=None, mask=None):
        frames = torch.cat((x, torch.log1p(f0)[..., None] / 6.0, rms[..., None], cvec), dim=-1)
        time = time.reshape(-1, 1).expand(x.shape[0], 1)
        cond = self.toy_time(time)[:, None] + self.toy_speaker(spk)[:, None]
        return self.toy_out(torch.tanh(self.toy_in(frames) + cond))


CALLS = {"velocity": 0, "prepare": 0}  # what the library asked of the record


def toy_velocity(model, x, t, cond, guidance):
    assert cond.whisper is None  # the record says no Whisper: none was computed
    CALLS["velocity"] += 1
    return model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, time=t)


def toy_prepare(cond: Conditioning, guidance: Guidance) -> Conditioning:
    CALLS["prepare"] += 1
    return cond


def toy_config(hparams: dict, state: dict, n_speakers: int, path: Path) -> ToyConfig:
    return ToyConfig(dim=int(hparams["model"]["dim"]), num_speaker=n_speakers,
                     cvec_dim=state["toy_in.weight"].shape[1] - 130)


def toy_forward(model, x, time, cond, drop):
    return model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, time=time)


TOY_FAMILY = Family(
    name=TOY, network=ToyNet, config=ToyConfig, markers=("toy_speaker.weight", "toy_time.weight"),
    read_config=toy_config, describe=lambda c: f"toy network ({c.dim})",
    uses_whisper=False, content_resize="nearest",  # unlike V3 (no Whisper, linear) and V2 (Whisper)
    guidance=(), guided_velocity=toy_velocity, student_velocity=None, forward=toy_forward,
    training_drop="speaker", model_hparams=lambda c, name: {"dim": c.dim}, prepare_condition=toy_prepare,
)


def write_toy_checkpoint(path: Path, cvec_dim: int, speakers=("ann", "ben"), dim: int = 24) -> Path:
    """The family's checkpoint in RIFT-SVC's Lightning layout (`model.transformer.*` + hparams)."""
    torch.manual_seed(3)
    net = ToyNet(ToyConfig(dim=dim, num_speaker=len(speakers), cvec_dim=cvec_dim))
    torch.save({"state_dict": {f"model.transformer.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"cfg": {"spk2idx": {s: i for i, s in enumerate(speakers)},
                                             "model": {"dim": dim},
                                             "dataset": {"sample_rate": 44100, "hop_length": 512}}}}, path)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    register(TOY_FAMILY)
    try:
        root = tmp_path_factory.mktemp("toy")
        pretrained = make_tiny_pretrained_dir(root / "pretrained")
        shutil.rmtree(pretrained / LAYOUT["whisper"])  # the toy family needs no Whisper
        from transformers import AutoConfig

        cvec_dim = AutoConfig.from_pretrained(pretrained / LAYOUT["contentvec"]).hidden_size  # its feature
        yield write_toy_checkpoint(root / "toy.ckpt", cvec_dim), pretrained
    finally:
        unregister(TOY)


def test_the_records_of_v2_and_v3_say_how_they_differ():
    assert (V2.uses_whisper, V2.content_resize, V2.training_drop) == (True, "nearest", "whisper")
    assert (V3.uses_whisper, V3.content_resize, V3.training_drop) == (False, "linear", "speaker")
    assert V3.batch_wide(Guidance()) and not V3.batch_wide(Guidance(cfg_rescale=0.0))
    assert not V2.batch_wide(Guidance())  # V2's CFG never mixes a batch's items
    assert V2.settings({"cfg_strength": 1, "ds_cfg_strength": 0.0}) == Guidance(cfg_strength=1.0)
    assert V3.settings({"cfg_skip_layers": [2], "cfg_strength": 9.0}) == Guidance(cfg_skip_layers=(2,))
    assert family_named("v3") is V3
    with pytest.raises(UserError, match="unknown model family 'v9'"):
        family_named("v9")


def test_a_family_needs_its_own_name_and_markers():
    with pytest.raises(ValueError, match="registered already"):
        register(replace(V2, markers=("only_mine.weight",)))
    with pytest.raises(ValueError, match="markers no other family has"):
        register(replace(V2, name="v2-copy"))
    assert set(FAMILIES) >= {"v2", "v3"} and "v2-copy" not in FAMILIES


def test_a_test_only_family_loads_by_its_keys(toy):
    from rtsvc.models.loading import load_dit
    from rtsvc.voices.spec import VoiceSpec, model_family

    ckpt, pretrained = toy
    loaded = load_dit(ckpt)
    assert loaded.family == TOY and isinstance(loaded.model, ToyNet)
    assert loaded.speakers == {"ann": 0, "ben": 1}
    assert model_family(ckpt) == TOY
    assert VoiceSpec(model=ckpt, pretrained_dir=pretrained, f0="pyworld").needed_components() == \
        ("contentvec", "vocoder")  # no Whisper, no RMVPE (pyworld)


def test_a_test_only_family_converts_offline_and_streams(toy):
    from rtsvc.engine import StreamConfig, convert_stream
    from rtsvc.offline import convert_offline
    from rtsvc.voices.spec import VoiceSpec, open_voice

    ckpt, pretrained = toy
    spec = VoiceSpec(model=ckpt, pretrained_dir=pretrained, f0="pyworld", backend="torch", device="cpu")
    offline = open_voice(spec.with_(streaming=False))
    assert offline.backend.family == TOY and offline.features.whisper_encoder is None
    assert offline.features.content_resize == "nearest"  # from the record, not from "no Whisper"
    audio = harmonic_tone(1.2, 170.0)
    knobs = Knobs(steps=4, seed=2, speaker="ben")
    CALLS.update(velocity=0, prepare=0)
    out = convert_offline(offline, audio, knobs)
    assert out.shape == audio.shape and np.isfinite(out).all() and np.abs(out).max() > 1e-3
    assert CALLS["velocity"] >= 3 and CALLS["prepare"] >= 1  # the sampler ran the record's functions
    other = convert_offline(offline, audio, Knobs(steps=4, seed=2, speaker="ann"))
    assert np.abs(other - out).max() > 1e-4  # the speaker reaches the network

    streaming = open_voice(spec)  # the engine's variant: feature cache, DiT context
    CALLS.update(velocity=0, prepare=0)
    streamed = convert_stream(streaming, audio, knobs, StreamConfig(block_ms=150.0, context_ms=300.0))
    assert streamed.shape == audio.shape and np.isfinite(streamed).all() and np.abs(streamed).max() > 1e-3
    assert CALLS["prepare"] >= 6 and CALLS["velocity"] == 3 * CALLS["prepare"]  # a block: 4 points, 3 steps


def test_a_test_only_family_batches_as_its_record_says(toy):
    from rtsvc.voices.batch import Block, run_blocks
    from rtsvc.voices.spec import VoiceSpec, open_voice

    ckpt, pretrained = toy
    voice = open_voice(VoiceSpec(model=ckpt, pretrained_dir=pretrained, f0="pyworld", backend="torch",
                                 device="cpu"))
    a, b = voice.fork(), voice.fork()
    window = harmonic_tone(0.5, 150.0)
    knobs = Knobs(steps=3, seed=1)
    alone = [voice.fork().convert(window, knobs, 0, 4096), voice.fork().convert(window * 0.5, knobs, 0, 4096)]
    CALLS.update(velocity=0, prepare=0)
    together = run_blocks([Block(a, window, knobs, 0, 4096), Block(b, window * 0.5, knobs, 0, 4096)])
    assert CALLS["velocity"] == 2  # one stacked call per step: the record's batch_wide is False
    for x, y in zip(alone, together, strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5)
