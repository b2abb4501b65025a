"""Tiny random models written in the official file formats, for tests.

`make_tiny_dit_checkpoint` writes a Lightning checkpoint laid out like an official RIFT-SVC V2
file; `make_tiny_vocoder` writes an openvpi NSF-HiFiGAN folder (model.ckpt + config.json) with
weight-norm parameters. Both go through the real loaders in `rtsvc.models.loading`.
"""

import json
from pathlib import Path

import torch

from rtsvc.models.dit import DiT, DiTConfig
from rtsvc.models.student import STUDENT_KEY, StudentInfo, make_student
from rtsvc.models.vocoder import NsfHifiGan, VocoderConfig, unfold_weight_norm, weight_norm_layers

TINY_VOCODER_CHANNELS = 32  # real: 512; upsample rates stay the real ones (product 512)


def tiny_dit_config(num_speaker: int = 2, dim: int = 64, depth: int = 2) -> DiTConfig:
    return DiTConfig(dim=dim, depth=depth, head_dim=32, ff_mult=2, num_speaker=num_speaker)


def _randomise(model: torch.nn.Module, scale: float = 0.05) -> None:
    """The upstream init zeroes the output layers (the model would predict 0); add small noise
    to every parameter so outputs depend on every input."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def make_tiny_dit_checkpoint(path: str | Path, speakers=("alice", "bob"), dim: int = 64, depth: int = 2,
                             seed: int = 0, student_nfe: int | None = None) -> Path:
    """Write a tiny V2 DiT as an official-looking Lightning checkpoint and return its path.

    `student_nfe`: a distilled student of that many evaluations instead (random second time input
    and the marker `rtsvc distill` writes), without running the distillation."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_dit_config(len(speakers), dim, depth)
    model = DiT(config)
    if student_nfe is not None:
        make_student(model)
    _randomise(model)
    size = {"dim": dim, "depth": depth, "head_dim": config.head_dim, "ff_mult": config.ff_mult}
    cfg = {
        "seed": 2025,
        "model": {"name": f"dit-{dim}-{depth}", "cfg": size, "whisper_drop_prob": 0.2, "lognorm": True},
        "dataset": {"data_dir": "data/finetune", "meta_info_path": "data/finetune/meta_info.json",
                    "sample_rate": 44100, "n_mel_channels": 128, "hop_length": 512, "max_frame_len": 256},
        "training": {"learning_rate": 5e-5, "betas": "(0.9, 0.95)", "weight_decay": 0.01,
                     "batch_size_per_gpu": 64, "max_steps": 30000, "warmup_ratio": 0.05,
                     "eval_sample_steps": 32, "eval_cfg_strength": 2.0, "log_media_per_steps": 1000,
                     "save_weights_only": True},
        "spk2idx": {name: i for i, name in enumerate(speakers)},
    }
    if student_nfe is not None:
        cfg[STUDENT_KEY] = StudentInfo(student_nfe, [k / student_nfe for k in range(student_nfe + 1)],
                                       guidance={"cfg_strength": 2.0}).as_dict()
    ckpt = {
        "epoch": 0,
        "global_step": 10,
        "pytorch-lightning_version": "2.5.0.post0",
        "state_dict": {f"model.transformer.{k}": v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 0}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {"best_model_path": ""}},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"cfg": cfg},
    }
    torch.save(ckpt, path)
    return path


def tiny_vocoder_config() -> VocoderConfig:
    return VocoderConfig(upsample_initial_channel=TINY_VOCODER_CHANNELS)


def make_tiny_vocoder(directory: str | Path, seed: int = 0) -> Path:
    """Write `model.ckpt` (with weight_g / weight_v) + `config.json`; returns the model.ckpt path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_vocoder_config()
    model = NsfHifiGan(config)
    _randomise(model, scale=0.1)  # the 0.01 init is nearly silent; make the output audible
    state = unfold_weight_norm(model.state_dict(), weight_norm_layers(model))
    raw = {**config.__dict__, "num_gpus": 4, "batch_size": 10, "learning_rate": 0.0002, "seed": 1234,
           "segment_size": 16384, "num_freq": 1025, "fmax_for_loss": None, "discriminator_periods": [3, 5, 7]}

    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    torch.save({"generator": state}, directory / "model.ckpt")
    return directory / "model.ckpt"
