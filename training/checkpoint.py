"""Training checkpoints in RIFT-SVC's PyTorch-Lightning layout, written atomically.

What upstream (`train.py` + `RIFTSVCLightningModule`) writes and reads, and so what our
`rtsvc.models.load_dit`, `rtsvc export` and the upstream code accept:

    state_dict:        {"model.transformer.<DiT key>": tensor}  (the flow wrapper holds the DiT
                       as `transformer`, the Lightning module holds the wrapper as `model`)
    hyper_parameters:  {"cfg": {"model": {"name", "cfg": {dim, depth, head_dim, ff_mult}, ...},
                                "dataset": {sample_rate, hop_length, n_mel_channels, max_frame_len},
                                "training": {...}, "spk2idx": {name: index}, "seed": int}}
    epoch, global_step, pytorch-lightning_version, optimizer_states, lr_schedulers

We add `rtsvc` (format version, RNG state) for exact resumption. Everything is plain tensors,
numbers, strings, lists and dicts; `load_checkpoint` reads ours and upstream's (OmegaConf configs
become plain dicts) through `rtsvc.models.safe_load`, which never runs code from the file.
The weights saved are schedule-free's evaluation weights (`optimizer.eval()` before saving), the
ones that should be used for inference.
"""

import os
from pathlib import Path

import torch

from rtsvc.errors import UserError
from rtsvc.models.safe_load import load_torch_file

STATE_PREFIX = "model.transformer."
LIGHTNING_VERSION = "2.4.0"  # what upstream's checkpoints carry; nothing checks it strictly
FORMAT_VERSION = 1


def build_checkpoint(dit_state: dict[str, torch.Tensor], cfg: dict, global_step: int, epoch: int,
                     optimizer_state: dict | None = None, extra: dict | None = None) -> dict:
    """Assemble the Lightning-layout dict; `cfg` is the hyper_parameters cfg (with spk2idx)."""
    return {
        "epoch": int(epoch),
        "global_step": int(global_step),
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": {STATE_PREFIX + k: v.detach().cpu().clone() for k, v in dit_state.items()},
        "hyper_parameters": {"cfg": cfg},
        "hparams_name": "kwargs",
        "optimizer_states": [optimizer_state] if optimizer_state is not None else [],
        "lr_schedulers": [],
        "rtsvc": {"format": FORMAT_VERSION, **(extra or {})},
    }


def save_checkpoint(path: str | Path, checkpoint: dict) -> Path:
    """Write via a temporary file and `os.replace`, so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a Lightning checkpoint (ours or upstream's); clear errors for wrong files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    ckpt = load_torch_file(path, "training checkpoint")  # allow-listed: never runs code from the file
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a RIFT-SVC training checkpoint (no state_dict)")
    cfg = ckpt.get("hyper_parameters", {}).get("cfg")
    if not isinstance(cfg, dict) or "spk2idx" not in cfg:
        raise UserError(f"{path} has no hyper_parameters.cfg.spk2idx: not a RIFT-SVC checkpoint")
    return ckpt
