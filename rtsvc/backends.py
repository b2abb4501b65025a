"""The model behind one small interface, so `ModelVoice` runs the same on torch and ONNX Runtime.

A backend holds the DiT and the vocoder and offers exactly the two calls the sampler and the
voice need: the CFG velocity (null and full Whisper branches in one batch) and vocoding. Arrays
are torch tensors on `backend.device` both ways; the ONNX backend converts at its edges.

`open_model` turns a user's `--model` into a ready `ModelVoice`: a `.ckpt` runs on torch, a
`.rtsvc` bundle on ONNX Runtime (`rtsvc/onnx_backend.py`, imported only when needed).
"""

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from rtsvc.audio import HOP_LENGTH, SAMPLE_RATE
from rtsvc.compute import pick_device
from rtsvc.engine import DIT_CONTEXT_MS
from rtsvc.errors import UserError
from rtsvc.flow import Conditioning, cfg_velocity

if TYPE_CHECKING:
    from rtsvc.model_voice import ModelVoice
    from rtsvc.pretrained import PretrainedPaths

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Backend(Protocol):
    speakers: dict[str, int]  # name -> speaker index
    device: torch.device

    def velocity_cfg(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                     cfg_strength: float) -> torch.Tensor:
        """Guided velocity [b, n, 128] at time t ([b] or scalar) for the normalised noisy mel x:
        `v_null + s * (v_full - v_null)` with both branches in one batch (s ~ 0: null branch only),
        as `rtsvc.flow.cfg_velocity`."""
        ...

    def vocode(self, log_mel: torch.Tensor, f0: torch.Tensor, phase: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
        """log-mel [b, 128, n], F0 [b, n] Hz, the harmonic source's initial phase [b or 1, 9]
        (cycles) and noise [b, n * 512, 9] -> audio [b, n * 512] (a pure function of its inputs)."""
        ...


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
        self.dtype = PRECISIONS[precision]

    @classmethod
    def from_checkpoint(cls, model_path: str | Path, vocoder_path: str | Path, device: torch.device,
                        precision: str = "fp32") -> "TorchBackend":
        from rtsvc.models import load_dit, load_vocoder

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
    def velocity_cfg(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                     cfg_strength: float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        with self._autocast():
            return cfg_velocity(self.model, x, t, cond, cfg_strength).float()

    @torch.inference_mode()
    def vocode(self, log_mel: torch.Tensor, f0: torch.Tensor, phase: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.vocoder(log_mel, f0, phase=phase, noise=noise).float()


def _open_onnx(path: Path, device: str, pretrained: "PretrainedPaths", providers: str | None = None):
    """The ONNX Runtime backend of a `.rtsvc` bundle, imported lazily (heavy, and optional)."""
    try:
        from rtsvc.onnx_backend import OnnxBackend
    except ImportError as err:
        raise UserError(f"the onnx backend is not available here ({err}); use a .ckpt with "
                        "--backend torch") from None
    return OnnxBackend.open(path, device=device, pretrained=pretrained, providers=providers)


def open_model(model_path: str | Path, pretrained: "PretrainedPaths", backend: str = "auto",
               device: str = "auto", f0: str = "rmvpe", precision: str = "fp32",
               speaker: str | None = None, providers: str | None = None,
               streaming: bool = False, dit_context_ms: float | None = None) -> "ModelVoice":
    """A ready `ModelVoice` for a checkpoint (torch) or `.rtsvc` bundle (onnx).

    `streaming=True` gives the variant for the streaming engine (incremental features, see
    `rtsvc.feature_cache`); the default keeps the upstream offline behaviour. `dit_context_ms`:
    the DiT's left context while streaming (default `engine.DIT_CONTEXT_MS`; kept by an offline
    voice for its `for_streaming()` variant).

    `speaker`, when given, is checked as soon as the model is read, before the (slow) encoders load.
    """
    from rtsvc.bundle import is_bundle

    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: use auto, torch or onnx")
    path = Path(model_path)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    bundle = is_bundle(path)
    torch_device = pick_device(device)
    if bundle and backend == "torch":
        raise UserError(f"{path} is an exported .rtsvc bundle, which runs on --backend onnx; "
                        "for torch pass the .ckpt it was exported from")
    if not bundle and backend == "onnx":
        raise UserError(f"--backend onnx needs an exported .rtsvc bundle (rtsvc export), got {path}")
    if bundle:
        model = _open_onnx(path, device, pretrained, providers)
    else:
        if pretrained.vocoder is None:
            raise UserError("NSF-HiFiGAN vocoder not found: run `rtsvc download` or point --vocoder at it")
        model = TorchBackend.from_checkpoint(path, pretrained.vocoder, torch_device, precision)
    if speaker is not None and speaker not in model.speakers:
        raise UserError(f"unknown speaker {speaker!r}; this model has: {', '.join(model.speakers)}")
    from rtsvc.features import FeatureExtractor
    from rtsvc.model_voice import ModelVoice

    own = getattr(model, "feature_extractor", None)  # a bundle exported --with-encoders runs its own
    features = (own(pretrained, f0, torch_device) if own else None) or \
        FeatureExtractor.from_pretrained(pretrained, f0=f0, device=torch_device)
    return ModelVoice(model, features, streaming=streaming,
                      dit_context_ms=DIT_CONTEXT_MS if dit_context_ms is None else dit_context_ms)
