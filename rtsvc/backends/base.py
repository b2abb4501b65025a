"""What every backend offers: the model behind one small interface, so `ModelVoice` runs the same
on torch and ONNX Runtime.

A backend holds the DiT and the vocoder and offers exactly the two calls the sampler and the
voice need: the guided velocity and vocoding. Arrays are torch tensors on `backend.device` both
ways; the ONNX backend converts at its edges.
"""

from typing import Protocol

import torch

from rtsvc.models.flow import Conditioning

BACKENDS = ("auto", "torch", "onnx")


class Backend(Protocol):
    speakers: dict[str, int]  # name -> speaker index
    device: torch.device

    def velocity_cfg(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                     cfg_strength: float) -> torch.Tensor:
        """Guided velocity [b, n, 128] at time t ([b] or scalar) for the normalised noisy mel x:
        `v_null + s * (v_full - v_null)` with both branches in one batch (s ~ 0: null branch only),
        as `rtsvc.models.flow.cfg_velocity`."""
        ...

    def vocode(self, log_mel: torch.Tensor, f0: torch.Tensor, phase: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
        """log-mel [b, 128, n], F0 [b, n] Hz, the harmonic source's initial phase [b or 1, 9]
        (cycles) and noise [b, n * 512, 9] -> audio [b, n * 512] (a pure function of its inputs)."""
        ...
