"""Loading a checkpoint never runs code from it (rtsvc.models.safe_load)."""

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rtsvc.errors import UserError
from rtsvc.models.safe_load import load_torch_file


class RunsACommand:
    """What a malicious checkpoint pickles: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": RunsACommand(marker)}, path)
    with pytest.raises(UserError) as err:
        load_torch_file(path, "model checkpoint")
    message = str(err.value)
    assert "\n" not in message
    assert "posix.system" in message or "os.system" in message
    assert not marker.exists()


def test_unknown_class_is_named(tmp_path):
    path = tmp_path / "odd.ckpt"
    torch.save({"x": Path("/tmp")}, path)  # harmless, but not something a checkpoint needs
    with pytest.raises(UserError, match=r"references pathlib\.\w*Path"):
        load_torch_file(path, "model checkpoint")


def test_omegaconf_config_becomes_plain_data(tmp_path):
    cfg = OmegaConf.create({"model": {"dim": 64, "depth": 2, "rate": 0.5, "on": True, "none": None,
                                      "layers": [1, 2]}, "spk2idx": {"alice": 0, "bob": 1}})
    path = tmp_path / "cfg.ckpt"
    weight = torch.randn(3, 4)
    torch.save({"state_dict": {"w": weight, "p": torch.nn.Parameter(weight.half())},
                "hyper_parameters": {"cfg": cfg}, "dtype": torch.bfloat16, "blob": b"\x00\xff",
                "size": torch.Size([2, 3])}, path)
    loaded = load_torch_file(path, "model checkpoint")
    cfg_back = loaded["hyper_parameters"]["cfg"]
    assert cfg_back == {"model": {"dim": 64, "depth": 2, "rate": 0.5, "on": True, "none": None,
                                  "layers": [1, 2]}, "spk2idx": {"alice": 0, "bob": 1}}
    assert type(cfg_back) is dict and type(cfg_back["model"]["layers"]) is list
    assert torch.equal(loaded["state_dict"]["w"], weight)
    assert loaded["state_dict"]["p"].dtype == torch.float16
    assert loaded["dtype"] is torch.bfloat16 and loaded["blob"] == b"\x00\xff"
    assert loaded["size"] == torch.Size([2, 3])


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        load_torch_file(path, "model checkpoint")
