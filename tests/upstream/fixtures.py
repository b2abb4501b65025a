"""Tiny checkpoints made by the upstream transcriptions, saved as upstream's train.py saves them:
a Lightning ModelCheckpoint (weights only) whose hyper_parameters hold an OmegaConf DictConfig."""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from tests.upstream import v2_release, v3_head

SPEAKERS = ("alice", "bob")


def _randomise(model, scale=0.05):
    """The upstream init zeroes the output layers; perturb every parameter so outputs depend on all."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def _save(path, model, cfg):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "2.5.0.post0",
        "state_dict": {f"model.transformer.{k}": v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 1000}}},
        "hparams_name": "kwargs",
        "hyper_parameters": {"cfg": OmegaConf.create(cfg), "lr_scheduler": None},
    }
    torch.save(ckpt, path)
    return path


def make_v2_release(path, dim=64, depth=2, seed=0):
    """(path, upstream model) of a V2 checkpoint as the release code (ec67126) makes it."""
    torch.manual_seed(seed)
    model = v2_release.DiT(dim=dim, depth=depth, head_dim=32, ff_mult=2, num_speaker=len(SPEAKERS)).eval()
    _randomise(model)
    cfg = {"seed": 2025,
           "model": {"name": f"dit-{dim}-{depth}",
                     "cfg": {"dim": dim, "depth": depth, "head_dim": 32, "ff_mult": 2}},
           "dataset": {"data_dir": "data/finetune", "meta_info_path": "data/finetune/meta_info.json",
                       "max_frame_len": 256},
           "training": {"learning_rate": 5e-5, "max_steps": 30000, "whisper_drop_prob": 0.2},
           "spk2idx": {name: i for i, name in enumerate(SPEAKERS)}}
    return _save(path, model, cfg), model


def make_v3_head(path, dim=64, depth=2, seed=0, lora_rank=None, lora_alpha=None, kernel_size=31):
    """(path, upstream model) of a V3 checkpoint as c03fa59 makes it; with `lora_rank`, a LoRA
    fine-tune (apply_lora, then A and B perturbed as if trained)."""
    torch.manual_seed(seed)
    model = v3_head.DiT(dim=dim, depth=depth, head_dim=32, ff_mult=2, num_speaker=len(SPEAKERS),
                        kernel_size=kernel_size).eval()
    _randomise(model)
    training = {"learning_rate": 1e-4, "max_steps": 10000, "drop_spk_prob": 0.0}
    if lora_rank is not None:
        model.apply_lora(lora_rank, lora_alpha)
        _randomise(model)  # B starts at zero upstream; a trained adapter is not
        training.update(lora_training=True, lora_rank=lora_rank, lora_alpha=lora_alpha)
    cfg = {"seed": 2025,
           "model": {"dim": dim, "depth": depth, "n_mel_channels": 128, "head_dim": 32, "ff_mult": 2,
                     "kernel_size": kernel_size},
           "dataset": {"data_dir": "data/finetune", "meta_info_path": "data/finetune/meta_info.json",
                       "max_frame_len": 256},
           "training": training,
           "spk2idx": {name: i for i, name in enumerate(SPEAKERS)}}
    return _save(path, model, cfg), model
