"""Train a small NSF-HiFiGAN generator from wav clips, written in openvpi's format (model.ckpt + config.json).

For when the official vocoder cannot be had (no network): the result drops into a pretrained dir as
`nsf_hifigan_44.1k_hop512_128bin_2024.02/` and loads through `rtsvc.models.load_vocoder` like the real
one. Inputs are what the DiT produces at inference: rtsvc's own log-mel (`rtsvc.dsp.mel`) and F0 per mel
frame (FCPE by default: its weights ship in the torchfcpe wheel). Losses: mel L1 + multi-resolution
STFT (spectral convergence + log magnitude), no discriminator: a GAN needs far more steps than a short
CPU run has, and these two alone give an intelligible, if buzzier and duller, vocoder.

`train_vocoder(VocoderTraining(...))` writes OUT/model.ckpt, OUT/config.json and OUT/metrics.jsonl
(one line per logged step: step, loss, mel_l1, seconds).
"""

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, HOP_LENGTH, SAMPLE_RATE, load_audio, resample
from rtsvc.dsp.mel import log_mel_spectrogram
from rtsvc.errors import UserError
from rtsvc.features.f0 import f0_to_mel_frames, make_f0_extractor
from rtsvc.models.vocoder import NsfHifiGan, VocoderConfig, unfold_weight_norm, weight_norm_layers

STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop) of the multi-resolution loss
# openvpi's config.json carries training fields the generator ignores; written so the file looks like theirs
OPENVPI_EXTRA = {"num_gpus": 1, "learning_rate": 0.0002, "seed": 1234, "num_freq": 1025,
                 "fmax_for_loss": None, "discriminator_periods": [3, 5, 7]}


class ActiveClock:
    """Seconds this process was able to run: wall time minus gaps of more than `gap_s` between the beats
    of a background thread (a SIGSTOP freeze, e.g. another job's quiet-machine measurement). A busy
    machine still counts (fewer steps in the same minutes); only being stopped does not."""

    def __init__(self, beat_s: float = 0.5, gap_s: float = 10.0):
        self.beat_s, self.gap_s = beat_s, gap_s
        self.started = self._last = time.perf_counter()
        self.stopped_s = 0.0
        self._done = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self) -> None:
        while not self._done.wait(self.beat_s):
            now = time.perf_counter()
            if now - self._last > self.gap_s:
                self.stopped_s += now - self._last - self.beat_s
            self._last = now

    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.stopped_s

    def close(self) -> None:
        self._done.set()


@dataclass
class VocoderTraining:
    clips: Path  # folder searched recursively for *.wav
    out: Path
    minutes: float | None = None  # time budget (ActiveClock: stopped time not counted); None: max_steps
    max_steps: int = 2000
    channels: int = 128  # upsample_initial_channel (official: 512)
    segment_frames: int = 32  # mel frames per training segment (32 * 512 = 16384 samples, openvpi's)
    batch_size: int = 4
    learning_rate: float = 1e-3
    f0: str = "fcpe"
    seed: int = 0
    log_every: int = 25
    device: str = "cpu"
    resolutions: tuple[tuple[int, int], ...] = field(default=STFT_RESOLUTIONS)


@dataclass
class Clip:
    audio: torch.Tensor  # [n * 512]
    mel: torch.Tensor  # [128, n] natural-log mel
    f0: torch.Tensor  # [n] Hz, 0 = unvoiced


def load_clips(folder: Path, f0: str = "fcpe", device: str = "cpu", min_frames: int = 1) -> list[Clip]:
    """Every *.wav under `folder` at 44.1 kHz, cut to whole mel frames, with its mel and F0 per frame."""
    paths = sorted(Path(folder).rglob("*.wav"))
    if not paths:
        raise UserError(f"no .wav files under {folder}")
    extractor = make_f0_extractor(f0, device=device)
    clips = []
    for path in paths:
        audio, _ = load_audio(path, SAMPLE_RATE)
        n = len(audio) // HOP_LENGTH
        if n < min_frames:
            continue
        audio = np.asarray(audio[: n * HOP_LENGTH], dtype=np.float32)
        f0_100 = extractor(resample(audio, SAMPLE_RATE, ENCODER_SAMPLE_RATE))
        clips.append(Clip(torch.from_numpy(audio), log_mel_spectrogram(audio)[0],
                          torch.from_numpy(f0_to_mel_frames(f0_100, n))))
    if not clips:
        raise UserError(f"every clip under {folder} is shorter than {min_frames} mel frames")
    return clips


def cached_clips(cfg: "VocoderTraining") -> list[Clip]:
    """`load_clips`, kept in OUT/clips.pt (F0 of a few hundred clips takes minutes on a busy CPU) and
    reused while the clip names, F0 method and segment length are the same."""
    key = {"files": sorted(str(p.relative_to(cfg.clips)) for p in Path(cfg.clips).rglob("*.wav")),
           "f0": cfg.f0, "min_frames": cfg.segment_frames}
    path = cfg.out / "clips.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["key"] == key:
            return [Clip(*row) for row in saved["clips"]]
    clips = load_clips(cfg.clips, cfg.f0, cfg.device, min_frames=cfg.segment_frames)
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "clips": [(c.audio, c.mel, c.f0) for c in clips]}, path)
    return clips


def random_batch(clips: list[Clip], frames: int, batch: int, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mel [b, 128, frames], f0 [b, frames], audio [b, frames * 512]) from random clips and offsets."""
    mels, f0s, audios = [], [], []
    for _ in range(batch):
        clip = clips[int(rng.integers(len(clips)))]
        start = int(rng.integers(clip.mel.shape[1] - frames + 1))
        mels.append(clip.mel[:, start:start + frames])
        f0s.append(clip.f0[start:start + frames])
        audios.append(clip.audio[start * HOP_LENGTH:(start + frames) * HOP_LENGTH])
    return torch.stack(mels), torch.stack(f0s), torch.stack(audios)


def stft_loss(output: torch.Tensor, target: torch.Tensor,
              resolutions: tuple[tuple[int, int], ...] = STFT_RESOLUTIONS) -> torch.Tensor:
    """Multi-resolution STFT loss (Parallel WaveGAN): spectral convergence + L1 of log magnitudes."""
    total = output.new_zeros(())
    for n_fft, hop in resolutions:
        window = torch.hann_window(n_fft, device=output.device)
        mags = [torch.stft(x, n_fft, hop, window=window, return_complex=True).abs().clamp_min(1e-7)
                for x in (output, target)]
        convergence = torch.linalg.norm(mags[1] - mags[0]) / torch.linalg.norm(mags[1]).clamp_min(1e-7)
        total = total + convergence + F.l1_loss(mags[0].log(), mags[1].log())
    return total / len(resolutions)


def vocoder_losses(model: NsfHifiGan, mel: torch.Tensor, f0: torch.Tensor, audio: torch.Tensor,
                   resolutions: tuple[tuple[int, int], ...] = STFT_RESOLUTIONS,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, mel L1) of the generator on one batch."""
    out = model(mel, f0, generator=generator)
    mel_l1 = F.l1_loss(log_mel_spectrogram(out), log_mel_spectrogram(audio))
    return mel_l1 + stft_loss(out, audio, resolutions), mel_l1


def save_vocoder(model: NsfHifiGan, out: Path, extra: dict | None = None) -> Path:
    """Write OUT/model.ckpt ({"generator": weights as weight_g / weight_v}) + OUT/config.json (openvpi's)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"generator": unfold_weight_norm(state, weight_norm_layers(model))}, out / "model.ckpt")
    config = {**model.config.__dict__, **OPENVPI_EXTRA, "segment_size": 0, **(extra or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / "model.ckpt"


def train_vocoder(cfg: VocoderTraining, on_log: Callable[[dict], None] | None = None) -> dict:
    """Train and save; returns the last logged metrics (+ steps, seconds, clips)."""
    if cfg.minutes is None and cfg.max_steps < 1:
        raise UserError("the vocoder needs at least one training step")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    clips = cached_clips(cfg)
    config = VocoderConfig(upsample_initial_channel=cfg.channels)
    model = NsfHifiGan(config).to(cfg.device).train()
    opt = torch.optim.AdamW(model.parameters(), cfg.learning_rate, betas=(0.8, 0.99))
    cfg.out.mkdir(parents=True, exist_ok=True)
    log_path = cfg.out / "metrics.jsonl"
    log_path.write_text("")
    clock = ActiveClock()
    budget_s = math.inf if cfg.minutes is None else 60 * cfg.minutes
    max_steps = cfg.max_steps if cfg.minutes is None else 10 ** 9
    step, last, window = 0, {}, []
    while step < max_steps and clock.seconds() < budget_s:
        batch = random_batch(clips, cfg.segment_frames, cfg.batch_size, rng)
        mel, f0, audio = (t.to(cfg.device) for t in batch)
        loss, mel_l1 = vocoder_losses(model, mel, f0, audio, cfg.resolutions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        step += 1
        window.append((loss.item(), mel_l1.item()))
        if step % cfg.log_every == 0 or step == 1:
            seconds = clock.seconds()
            last = {"step": step, "loss": float(np.mean([w[0] for w in window])),
                    "mel_l1": float(np.mean([w[1] for w in window])), "seconds": round(seconds, 1),
                    "stopped_s": round(clock.stopped_s, 1), "steps_per_s": round(step / seconds, 3)}
            window = []
            with log_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            if on_log is not None:
                on_log(last)
    seconds, stopped = clock.seconds(), clock.stopped_s
    clock.close()
    (cfg.out / "clips.pt").unlink(missing_ok=True)  # a finished vocoder folder holds the vocoder only
    save_vocoder(model.eval(), cfg.out, {"rtsvc_training": {"steps": step, "seconds": round(seconds, 1),
                                                            "stopped_s": round(stopped, 1),
                                                            "clips": len(clips), "f0": cfg.f0,
                                                            "losses": "mel L1 + multi-resolution STFT"}})
    return {**last, "steps": step, "seconds": round(seconds, 1), "stopped_s": round(stopped, 1),
            "clips": len(clips)}
