"""What every backend offers: the model behind one small interface, so `ModelVoice` runs the same
on torch and ONNX Runtime.

A backend holds the DiT and the vocoder and offers exactly the two calls the sampler and the
voice need: the guided velocity and vocoding. Arrays are torch tensors on `backend.device` both
ways; the ONNX backend converts at its edges.
"""

from typing import Protocol

import torch

from rtsvc.models.flow import Conditioning
from rtsvc.models.guidance import Guidance
from rtsvc.models.student import StudentInfo

BACKENDS = ("auto", "torch", "onnx")


class Backend(Protocol):
    speakers: dict[str, int]  # name -> speaker index
    device: torch.device
    family: str  # its `rtsvc.models.families` record's name ("v2", "v3"): conditioning and guidance
    student: StudentInfo | None  # a distilled student (`rtsvc distill`): no guidance branches

    def step_velocity(self, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, cond: Conditioning,
                      guidance: Guidance) -> torch.Tensor:
        """The velocity of one Euler update from t to t + dt: a teacher's `guided_velocity` (dt
        unused), or a student's average velocity over [t, t + dt] in one single-branch evaluation
        (its guidance is baked in: `guidance` unused)."""
        ...

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                        guidance: Guidance) -> torch.Tensor:
        """Guided velocity [b, n, 128] at time t ([b] or scalar) for the normalised noisy mel x, as
        `rtsvc.models.families.guided_velocity`: V2 reads `guidance.cfg_strength` (Whisper CFG), V3
        its ds / spk / skip strengths, skip layers and rescale."""
        ...

    def vocode(self, log_mel: torch.Tensor, f0: torch.Tensor, phase: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
        """log-mel [b, 128, n], F0 [b, n] Hz, the harmonic source's initial phase [b or 1, 9]
        (cycles) and noise [b, n * 512, 9] -> audio [b, n * 512] (a pure function of its inputs)."""
        ...
