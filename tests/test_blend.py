"""Blended voices (rtsvc/voices/blend.py, rtsvc/models/speakers.py): `--speaker alice:0.7,bob:0.3`.

The DiT takes weights over its speaker table; 0/1 weights reproduce a single speaker exactly, and a
blend's output lies between the two speakers' outputs: its log-mel distance to each endpoint is below
the endpoints' distance to each other, and it is nearer the heavier speaker. V2 and V3 on torch; V2
as a bundle (format 2 takes weights; a format-1 bundle still runs single speakers, refuses blends).
"""

import json

import numpy as np
import pytest
import torch

from rtsvc.dsp.mel import log_mel_spectrogram
from rtsvc.dsp.signals import sung_tone
from rtsvc.errors import UserError
from rtsvc.settings import Knobs
from rtsvc.voices.batch import run_jobs
from rtsvc.voices.blend import check_speaker, parse_blend
from rtsvc.voices.spec import VoiceSpec, open_voice
from tests.tiny_encoders import make_tiny_pretrained_dir
from tests.tiny_models import make_tiny_dit_checkpoint

SPEAKERS = {"alice": 0, "bob": 1}
AUDIO = sung_tone(0.8, f0=170.0, seed=3)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute log-mel difference of two outputs."""
    return float((log_mel_spectrogram(a) - log_mel_spectrogram(b)).abs().mean())


@pytest.mark.parametrize("text, wanted", [
    ("alice:0.7,bob:0.3", {"alice": 0.7, "bob": 0.3}),
    ("alice:7, bob:3", {"alice": 0.7, "bob": 0.3}),
    ("alice:1,bob", {"alice": 0.5, "bob": 0.5}),  # a bare name weighs 1
])
def test_blends_parse_and_normalise(text, wanted):
    assert parse_blend(text, SPEAKERS) == pytest.approx(wanted)


@pytest.mark.parametrize("text, message", [
    ("alice:0.5,carol:0.5",
     "unknown speaker 'carol' in blend 'alice:0.5,carol:0.5'; this model has: alice, bob"),
    ("alice:0.5,alice:0.5", "names 'alice' twice"),
    ("alice:-1,bob:2", "weight of 'alice' must be a finite number >= 0, got -1"),
    ("alice:nan,bob:1", "weight of 'alice' must be a finite number >= 0, got nan"),
    ("alice:x,bob:1", "weight 'x' of 'alice' is not a number"),
    ("alice:0,bob:0", "the weights must not all be 0"),
    (":0.5,bob:1", "each part is NAME:WEIGHT"),
])
def test_bad_blends_are_one_line_errors(text, message):
    with pytest.raises(UserError) as err:
        check_speaker(text, SPEAKERS)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    return root, make_tiny_dit_checkpoint(root / "tiny.ckpt"), make_tiny_pretrained_dir(root / "pre")


def outputs(voice, speakers) -> dict[str, np.ndarray]:
    return {s: voice.fork().convert(AUDIO, Knobs(speaker=s, steps=3)) for s in speakers}


def assert_between(out: dict[str, np.ndarray]) -> None:
    a, b = out["alice"], out["bob"]
    ends = distance(a, b)
    assert ends > 0.01, ends  # the speakers sound different
    np.testing.assert_array_equal(out["alice:1,bob:0"], a)  # 0/1 weights: exactly one speaker
    np.testing.assert_array_equal(out["alice:0,bob:1"], b)
    half = out["alice:0.5,bob:0.5"]
    assert distance(half, a) < ends and distance(half, b) < ends, (distance(half, a), distance(half, b), ends)
    heavy = out["alice:0.8,bob:0.2"]
    assert distance(heavy, a) < distance(heavy, b)  # nearer the heavier speaker
    assert distance(heavy, a) < distance(half, a)


BLENDS = ("alice", "bob", "alice:1,bob:0", "alice:0,bob:1", "alice:0.5,bob:0.5", "alice:0.8,bob:0.2")


def test_v2_blend_lies_between_its_speakers(files):
    root, ckpt, pre = files
    voice = open_voice(VoiceSpec(model=ckpt, pretrained_dir=pre, f0="pyworld", backend="torch", device="cpu"))
    assert_between(outputs(voice, BLENDS))
    # a blend and a single speaker in one DiT batch: each as alone
    jobs = [voice.fork().prepare(AUDIO, Knobs(speaker=s, steps=3)) for s in ("alice:0.5,bob:0.5", "bob")]
    batched = run_jobs(voice.backend, jobs)
    alone = outputs(voice, ["alice:0.5,bob:0.5", "bob"])
    np.testing.assert_allclose(batched[0], alone["alice:0.5,bob:0.5"], atol=1e-5)
    np.testing.assert_allclose(batched[1], alone["bob"], atol=1e-5)
    with pytest.raises(UserError, match="unknown speaker 'carol' in blend"):
        open_voice(VoiceSpec(model=ckpt, pretrained_dir=pre, f0="pyworld", backend="torch", device="cpu",
                             speaker="alice:1,carol:1"))


def test_v3_blend_lies_between_its_speakers(files, tmp_path):
    from tests.upstream.fixtures import make_v3_head

    ckpt, _ = make_v3_head(tmp_path / "v3.ckpt")
    voice = open_voice(VoiceSpec(model=ckpt, pretrained_dir=files[2], f0="pyworld", backend="torch",
                                 device="cpu"))
    assert voice.backend.family == "v3"
    assert_between(outputs(voice, BLENDS))


def test_bundle_takes_blend_weights_and_format_1_still_loads(files, monkeypatch):
    import rtsvc.export.graphs
    from rtsvc.export.onnx_export import export_bundle

    root, ckpt, pre = files
    export_bundle(ckpt, root / "v2.rtsvc", pretrained_dir=pre, lengths=(17,))
    manifest = json.loads((root / "v2.rtsvc" / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    spec = VoiceSpec(pretrained_dir=pre, f0="pyworld", device="cpu")
    bundle = open_voice(spec.with_(model=root / "v2.rtsvc"))
    out = outputs(bundle, BLENDS)
    assert_between(out)
    torch_out = outputs(open_voice(spec.with_(model=ckpt, backend="torch")), ["alice:0.5,bob:0.5"])
    np.testing.assert_allclose(out["alice:0.5,bob:0.5"], torch_out["alice:0.5,bob:0.5"], atol=2e-3)

    # a bundle written before blends: its DiT takes an index [b] int64 and its manifest says format 1
    index = lambda batch, rows, g=None: torch.randint(0, rows, (batch,), generator=g)  # noqa: E731
    monkeypatch.setattr(rtsvc.export.graphs, "speaker_example", index)
    export_bundle(ckpt, root / "v1.rtsvc", pretrained_dir=pre, lengths=(17,))
    path = root / "v1.rtsvc" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 1}))
    old = open_voice(spec.with_(model=root / "v1.rtsvc"))
    assert not old.backend.takes_speaker_weights
    np.testing.assert_allclose(outputs(old, ["bob"])["bob"], out["bob"], atol=1e-4)
    with pytest.raises(UserError, match="export it again"):
        old.fork().convert(AUDIO, Knobs(speaker="alice:0.5,bob:0.5", steps=3))
    with pytest.raises(UserError, match="export it again"):
        open_voice(spec.with_(model=root / "v1.rtsvc", speaker="alice:0.5,bob:0.5"))


def test_v3_bundle_takes_blend_weights(files, tmp_path):
    from rtsvc.export.onnx_export import export_bundle

    from tests.upstream.fixtures import make_v3_head

    ckpt, _ = make_v3_head(tmp_path / "v3.ckpt")
    export_bundle(ckpt, tmp_path / "v3.rtsvc", pretrained_dir=files[2], lengths=(17,))
    spec = VoiceSpec(pretrained_dir=files[2], f0="pyworld", device="cpu")
    bundle = open_voice(spec.with_(model=tmp_path / "v3.rtsvc"))
    assert bundle.backend.family == "v3" and bundle.backend.takes_speaker_weights
    out = outputs(bundle, BLENDS)
    assert_between(out)
    torch_out = outputs(open_voice(spec.with_(model=ckpt, backend="torch")), ["alice:0.5,bob:0.5"])
    np.testing.assert_allclose(out["alice:0.5,bob:0.5"], torch_out["alice:0.5,bob:0.5"], atol=2e-3)
