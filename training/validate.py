"""Validation during training: held-out flow loss, sampled mels, audio and plots.

Every `--eval-every` steps (rank 0 only, schedule-free evaluation weights, dropout off):
- `val_loss`: the training objective on the held-out clips with fixed noise and times (seeded),
  so values are comparable between steps;
- `val_mel_mse`: MSE between sampled and true log-mel (clipped to [-12, 2] like upstream) for a
  few clips, sampled with the runtime sampler (`rtsvc.models.flow.sample_mel`, CFG on Whisper);
- RUN/val/step-N/: per clip the reconstruction (own speaker) and a conversion to another speaker
  as WAV (vocoder from the pretrained dir, when found) and a PNG of true / sampled / difference mel.
Global RNG state is left untouched so validation never changes the training trajectory.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rtsvc.training.dataset import ClipDataset, collate, lengths_to_mask
from rtsvc.training.loss import flow_loss

from rtsvc.dsp.audio import SAMPLE_RATE, save_audio
from rtsvc.dsp.mel import LOG_MEL_MAX, LOG_MEL_MIN
from rtsvc.models.families import sample_mel
from rtsvc.models.flow import Conditioning
from rtsvc.models.guidance import Guidance

VAL_SEED = 1234
MAX_VAL_FRAMES = 1024  # longer held-out clips are cut (about 12 s) to bound memory and time
VAL_BATCH = 8


@dataclass
class ValSettings:
    samples: int = 2  # clips sampled, vocoded and plotted
    steps: int = 32  # sampler grid points (upstream eval_sample_steps)
    cfg_strength: float = 2.0  # V2: upstream eval_cfg_strength; V3 samples with upstream's infer defaults

    def guidance(self) -> Guidance:
        return Guidance(cfg_strength=self.cfg_strength)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model: torch.nn.Module, dataset: ClipDataset, device: torch.device) -> float:
    """Mean flow loss over all held-out clips (no Whisper dropout, fixed seed)."""
    generator = torch.Generator(device=device).manual_seed(VAL_SEED)
    total, count = 0.0, 0
    for first in range(0, len(dataset), VAL_BATCH):
        items = [dataset[i] for i in range(first, min(len(dataset), first + VAL_BATCH))]
        batch = _to(collate(items), device)
        loss = flow_loss(model, batch, generator, whisper_drop=0.0, family=model.family, spk_drop=0.0)
        total += float(loss) * len(items)
        count += len(items)
    return total / max(count, 1)


def plot_mels(path: Path, true_mel: np.ndarray, gen_mel: np.ndarray, title: str) -> None:
    """Three panels (true, sampled, difference), log-mel [n, 128] each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    panels = [("ground truth", true_mel, LOG_MEL_MIN, LOG_MEL_MAX, "magma"),
              ("sampled", gen_mel, LOG_MEL_MIN, LOG_MEL_MAX, "magma"),
              ("sampled - truth", gen_mel - true_mel, -4, 4, "coolwarm")]
    for ax, (name, data, lo, hi, cmap) in zip(axes, panels, strict=True):
        image = ax.imshow(data.T, origin="lower", aspect="auto", vmin=lo, vmax=hi, cmap=cmap,
                          interpolation="none")
        ax.set_title(name)
        fig.colorbar(image, ax=ax)
    axes[-1].set_xlabel("frame")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def render_samples(model: torch.nn.Module, dataset: ClipDataset, out_dir: Path, device: torch.device,
                   settings: ValSettings, speakers: list[str], vocoder: torch.nn.Module | None) -> float:
    """Sample, vocode and plot the first `settings.samples` clips; returns their mean mel MSE."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mses = []
    for i in range(min(settings.samples, len(dataset))):
        item = dataset[i]
        n = item["frame_len"]  # the dataset already cut it to MAX_VAL_FRAMES
        batch = _to(collate([item]), device)
        own = int(batch["spk_id"][0])
        targets = [own] + ([(own + 1) % len(speakers)] if len(speakers) > 1 else [])
        name = Path(dataset.clips[i]["file"]).stem
        true_mel = batch["mel"][0].float().cpu().numpy()
        for target in targets:
            cond = Conditioning(spk=torch.tensor([target], device=device), f0=batch["f0"], rms=batch["rms"],
                                cvec=batch["cvec"], whisper=batch.get("whisper"),
                                mask=lengths_to_mask(batch["frame_len"], n))
            mel = sample_mel(model, cond, steps=settings.steps, guidance=settings.guidance(),
                             seed=VAL_SEED).float()
            label = "recon" if target == own else f"to-{speakers[target]}"
            gen = mel[0].cpu().numpy()
            if target == own:
                clipped = np.clip(gen, LOG_MEL_MIN, LOG_MEL_MAX)
                mses.append(float(np.mean((clipped - np.clip(true_mel, LOG_MEL_MIN, LOG_MEL_MAX)) ** 2)))
                plot_mels(out_dir / f"{name}-{label}.png", true_mel, gen, f"{name} ({speakers[own]}) {label}")
            if vocoder is not None:
                generator = torch.Generator(device=device).manual_seed(VAL_SEED)
                wav = vocoder(mel.transpose(1, 2), batch["f0"], generator=generator)
                audio = wav.reshape(-1).float().cpu().numpy()
                save_audio(out_dir / f"{name}-{label}.wav", audio, SAMPLE_RATE)
    return float(np.mean(mses)) if mses else float("nan")


def validate(model: torch.nn.Module, dataset: ClipDataset, out_dir: Path, device: torch.device,
             settings: ValSettings, speakers: list[str], vocoder: torch.nn.Module | None) -> dict:
    """All validation metrics for one step; the caller switches model/optimizer to eval first."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        metrics = {"val_loss": validation_loss(model, dataset, device)}
        if settings.samples > 0:
            metrics["val_mel_mse"] = render_samples(model, dataset, out_dir, device, settings, speakers,
                                                    vocoder)
    return metrics
