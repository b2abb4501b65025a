"""A RIFT-SVC checkpoint and an NSF-HiFiGAN in PyTorch (the `Backend` of `.ckpt` models)."""

from contextlib import nullcontext
from pathlib import Path

import torch

from rtsvc.dsp.audio import HOP_LENGTH, SAMPLE_RATE
from rtsvc.errors import UserError
from rtsvc.models.families import guided_velocity, student_velocity
from rtsvc.models.flow import Conditioning
from rtsvc.models.guidance import Guidance
from rtsvc.models.loading import load_dit, load_vocoder

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend:
    """A RIFT-SVC checkpoint and an NSF-HiFiGAN in PyTorch: fp32 on CPU, optional fp16/bf16
    autocast on CUDA (weights stay fp32; matmuls and convolutions run in the lower precision)."""

    def __init__(self, dit, vocoder: torch.nn.Module, device: torch.device, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
        if precision != "fp32" and device.type != "cuda":
            raise UserError(f"--precision {precision} needs a CUDA device; on CPU use fp32")
        self.loaded = dit  # rtsvc.models.LoadedDiT
        self.model = dit.model
        self.vocoder = vocoder
        self.device = device
        self.speakers = dict(dit.speakers)
        self.family = dit.family
        self.dtype = PRECISIONS[precision]
        self.student = dit.student
        self.pitch_stats = dict(dit.pitch_stats or {})  # speaker -> log-F0 statistics (auto pitch)
        self._student_velocity = student_velocity(dit) if dit.student is not None else None

    @classmethod
    def from_checkpoint(cls, model_path: str | Path, vocoder_path: str | Path, device: torch.device,
                        precision: str = "fp32") -> "TorchBackend":
        dit = load_dit(model_path, device)
        rate = int(dit.dataset.get("sample_rate", SAMPLE_RATE))
        hop = int(dit.dataset.get("hop_length", HOP_LENGTH))
        if (rate, hop) != (SAMPLE_RATE, HOP_LENGTH):
            raise UserError(f"{model_path} was trained at {rate} Hz / hop {hop}; rtsvc runs the "
                            f"{SAMPLE_RATE} Hz / hop {HOP_LENGTH} models only")
        return cls(dit, load_vocoder(vocoder_path, device), device, precision)

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                        guidance: Guidance) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        with self._autocast():
            return guided_velocity(self.model, x, t, cond, guidance).float()

    @torch.inference_mode()
    def step_velocity(self, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, cond: Conditioning,
                      guidance: Guidance) -> torch.Tensor:
        if self._student_velocity is None:
            return self.guided_velocity(x, t, cond, guidance)
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        dt = torch.as_tensor(dt, dtype=torch.float32, device=x.device)
        with self._autocast():
            return self._student_velocity(x, t, dt, cond).float()

    @torch.inference_mode()
    def vocode(self, log_mel: torch.Tensor, f0: torch.Tensor, phase: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.vocoder(log_mel, f0, phase=phase, noise=noise).float()
