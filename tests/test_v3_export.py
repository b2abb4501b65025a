"""`rtsvc export` of a V3 LoRA checkpoint: one graph computing every guidance pass, LoRA merged with
alpha / sqrt(rank), parity-checked; the bundle runs like the checkpoint and needs no Whisper."""


import numpy as np
import pytest
import soundfile as sf
import torch

from rtsvc.backends.bundle import read_bundle
from rtsvc.backends.onnx_backend import OnnxBackend
from rtsvc.backends.torch_backend import TorchBackend
from rtsvc.errors import UserError
from rtsvc.models.flow import Conditioning
from rtsvc.models.guidance import Guidance
from rtsvc.pretrained import LAYOUT
from tests.cli_helpers import SR, harmonic_tone, run_cli, run_cli_captured, write_wav
from tests.upstream.fixtures import make_v3_head


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_pretrained_v3):
    root = tmp_path_factory.mktemp("v3export")
    ckpt, _ = make_v3_head(root / "v3-lora.ckpt", lora_rank=4, lora_alpha=8.0)
    pretrained = tiny_pretrained_v3
    code, _, err = run_cli_captured(["export", ckpt, "--out", root / "v3.rtsvc", "--pretrained-dir",
                                     pretrained, "--cfg-skip-layers", "1", "--with-encoders"])
    assert code == 0, err
    return root / "v3.rtsvc", ckpt, pretrained


def test_v3_bundle_manifest(exported):
    bundle_path, _, _ = exported
    m = read_bundle(bundle_path).manifest
    assert m["family"] == "v3" and m["features"]["whisper"] is None
    assert m["dit"]["lora"] == {"rank": 4, "alpha": 8.0, "merged": True}
    assert m["dit"]["cfg_skip_layers"] == [1]
    assert m["export"]["parity"]["dit"]["max_rel"] < 1e-4
    assert sorted(m["files"]) == ["contentvec.onnx", "dit.onnx", "fcpe.onnx", "vocoder.onnx"]


@pytest.mark.parametrize("guidance", [
    Guidance(),  # upstream defaults: ds 0.2, spk 0.8, rescale 0.7
    Guidance(ds_cfg_strength=0.0, spk_cfg_strength=0.0, cfg_rescale=0.7),  # no guidance: p_c only
    Guidance(ds_cfg_strength=0.5, spk_cfg_strength=0.0, skip_cfg_strength=0.7, cfg_skip_layers=(1,)),
    Guidance(ds_cfg_strength=0.0, spk_cfg_strength=1.5, cfg_rescale=0.0),
])
def test_onnx_v3_velocity_matches_torch(exported, guidance):
    bundle_path, ckpt, pretrained = exported
    torch_be = TorchBackend.from_checkpoint(ckpt, pretrained / LAYOUT["vocoder"], torch.device("cpu"))
    onnx_be = OnnxBackend.open(bundle_path, device="cpu")
    g = torch.Generator().manual_seed(3)
    b, n = 2, 29
    cond = Conditioning(spk=torch.tensor([0, 1]), f0=150 + 100 * torch.rand(b, n, generator=g),
                        rms=0.1 * torch.rand(b, n, generator=g), cvec=torch.randn(b, n, 768, generator=g))
    x = torch.randn(b, n, 128, generator=g)
    want = torch_be.guided_velocity(x, torch.tensor(0.4), cond, guidance)  # LoRA unmerged, only the passes on
    got = onnx_be.guided_velocity(x, torch.tensor(0.4), cond, guidance)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_onnx_v3_refuses_skip_layers_it_was_not_exported_with(exported):
    onnx_be = OnnxBackend.open(exported[0], device="cpu")
    cond = Conditioning(spk=torch.tensor([0]), f0=torch.full((1, 8), 200.0), rms=torch.full((1, 8), 0.1),
                        cvec=torch.randn(1, 8, 768))
    with pytest.raises(UserError, match=r"exported with skip layers \[1\].*--cfg-skip-layers"):
        onnx_be.guided_velocity(torch.randn(1, 8, 128), torch.tensor(0.1), cond,
                                Guidance(skip_cfg_strength=0.5, cfg_skip_layers=(0,)))


def test_v3_bundle_converts_through_the_cli(exported, tmp_path, capsys, monkeypatch):
    bundle_path, _, pretrained = exported
    audio = harmonic_tone(0.8, 170.0)
    src = write_wav(tmp_path / "in.wav", audio)
    args = ["convert", src, tmp_path / "out.wav", "--model", bundle_path, "--pretrained-dir", pretrained,
            "--f0", "pyworld", "--steps", "3", "--stream", "--skip-cfg-strength", "0.3",
            "--cfg-skip-layers", "1"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    out, sr = sf.read(tmp_path / "out.wav", dtype="float32")
    assert sr == SR and out.shape == audio.shape and np.isfinite(out).all()
