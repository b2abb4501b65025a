"""The rectified-flow training objective (upstream `RF.forward`: V2 with Whisper dropout, V3 with
speaker dropout).

    x1 = normalised mel, x0 ~ N(0, I), t ~ lognorm (or uniform)
    x_t = (1 - t) x0 + t x1,  target velocity x1 - x0
    loss = mean over valid frames' elements of (DiT(x_t, t, cond) - (x1 - x0))^2

Each item's Whisper sequence is replaced by the learnt null embedding with probability
`whisper_drop` (0.2), which teaches the null branch that classifier-free guidance needs.
All randomness comes from the `generator` passed in, so a step's draw depends only on its seed.
"""

import math

import torch
from rtsvc.training.config import WHISPER_DROP
from rtsvc.training.dataset import lengths_to_mask

from rtsvc.dsp.mel import normalize_mel
from rtsvc.models.families import family_named
from rtsvc.models.flow import Conditioning

SPEAKER_DROP_SCRATCH, SPEAKER_DROP_FINETUNE = 0.2, 0.0  # V3: upstream pretrain.yaml / finetune.yaml


def sample_time(batch: int, generator: torch.Generator, device: torch.device,
                lognorm: bool = True) -> torch.Tensor:
    """t in [0, 1] per item. lognorm: stratified uniforms (one per 1/b slice, so a batch always
    spans the range) -> standard normal via sqrt(2) erfinv(2u - 1) -> sigmoid."""
    u = torch.rand(batch, generator=generator, device=device)
    if not lognorm:
        return u
    u = (torch.arange(batch, device=device) + u) / batch
    return torch.sigmoid(math.sqrt(2.0) * torch.erfinv(2 * u - 1))


def speaker_drop(batch: int, prob: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """V3 (upstream lightning_module): exactly int(batch * prob) random items use the null speaker."""
    order = torch.randperm(batch, generator=generator, device=device)
    return torch.zeros(batch, dtype=torch.bool, device=device).index_fill(0, order[: int(batch * prob)], True)


def flow_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator,
              whisper_drop: float = WHISPER_DROP, lognorm: bool = True, family: str = "v2",
              spk_drop: float = SPEAKER_DROP_FINETUNE) -> torch.Tensor:
    """Masked MSE between predicted and true velocity; `batch` tensors already on the device.
    The family's `training_drop` says what is dropped for its guidance: Whisper per item with
    probability `whisper_drop` (V2), or the speaker of exactly int(b * spk_drop) items (V3)."""
    mel = batch["mel"]
    b, n, _ = mel.shape
    device = mel.device
    mask = lengths_to_mask(batch["frame_len"], n)
    x1 = normalize_mel(mel)
    x0 = torch.randn(x1.shape, generator=generator, device=device)
    t = sample_time(b, generator, device, lognorm)
    tt = t[:, None, None]
    x_t = (1 - tt) * x0 + tt * x1
    record = family_named(family)
    if record.training_drop == "speaker":
        drop = speaker_drop(b, spk_drop, generator, device)
    else:  # "whisper"
        drop = torch.rand(b, generator=generator, device=device) < whisper_drop
    cond = Conditioning(spk=batch["spk_id"], f0=batch["f0"], rms=batch["rms"], cvec=batch["cvec"],
                        whisper=batch["whisper"] if record.uses_whisper else None, mask=mask)
    pred = record.forward(model, x_t, t, cond, drop)
    err = (pred.float() - (x1 - x0)) ** 2
    return err[mask].mean()
