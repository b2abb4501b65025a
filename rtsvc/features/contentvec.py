"""ContentVec: a HuBERT-base encoder in the `content-vec-best` layout, last hidden state as feature.

The published folder is a transformers HuBERT checkpoint with one extra layer, `final_proj`
(hidden -> classifier_proj_size), used only in ContentVec's training loss. We declare it so every
weight in the file has a home (no unexpected-key warnings) and never call it.
Input: 16 kHz mono. Output: 768-dim frames at 50 frames/s (20 ms hop, 25 ms receptive window).
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import HubertConfig, HubertModel

from rtsvc.features.frames import resize_frames
from rtsvc.features.hf import load_transformers_model

FRAME_RATE = 50  # HuBERT conv stack: stride 320 samples at 16 kHz
MIN_SAMPLES = 400  # receptive field of the conv stack: shorter input gives no frame
# used only for SpecAugment-style masking in training; a converted checkpoint may lack it


class HubertModelWithFinalProj(HubertModel):
    """HuBERT + the unused `final_proj` of the content-vec-best checkpoint."""

    def __init__(self, config: HubertConfig):
        super().__init__(config)
        self.final_proj = nn.Linear(config.hidden_size, config.classifier_proj_size)


# the published pytorch_model.bin names weight-norm pairs as the old torch API did
PUBLISHED_WEIGHT_NORM = {"parametrizations.weight.original0": "weight_g",
                         "parametrizations.weight.original1": "weight_v"}


def save_published_layout(model: HubertModelWithFinalProj, directory: str | Path) -> Path:
    """Write `model` as the published content-vec-best folder: config.json + pytorch_model.bin with
    weight_g / weight_v names (what `ContentVec.load` reads; used to build stand-ins and test files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(directory))
    state = {}
    for key, value in model.state_dict().items():
        for new, old in PUBLISHED_WEIGHT_NORM.items():
            key = key.replace(new, old)
        state[key] = value.clone()
    torch.save(state, directory / "pytorch_model.bin")
    return directory


class ContentVec:
    """`ContentVec.load(dir_or_hub_id).encode(audio_16k, n_frames) -> [n_frames, 768]`."""

    def __init__(self, model: HubertModelWithFinalProj, device: torch.device):
        self.model = model.eval().to(device)
        self.device = device
        self.dim = model.config.hidden_size

    @classmethod
    def load(cls, name_or_path: str | Path, device: str | torch.device = "cpu") -> "ContentVec":
        model, _ = load_transformers_model(HubertModelWithFinalProj, name_or_path, "ContentVec",
                                           "--contentvec")
        return cls(model, torch.device(device))

    @torch.inference_mode()
    def hidden(self, audio_16k: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw features [frames, 768] at 50 frames/s (upstream feeds the waveform as is, no normalisation)."""
        audio = torch.as_tensor(np.asarray(audio_16k, dtype=np.float32)).reshape(1, -1)
        if audio.shape[-1] < MIN_SAMPLES:
            audio = torch.nn.functional.pad(audio, (0, MIN_SAMPLES - audio.shape[-1]))
        dtype = next(self.model.parameters()).dtype
        out = self.model(audio.to(self.device, dtype))
        return out.last_hidden_state[0].float()

    @torch.inference_mode()
    def hidden_batch(self, audios: list[np.ndarray]) -> list[torch.Tensor]:
        """`hidden` of segments of one length in one forward pass (HuBERT's group norm, attention
        and convolutions are per item, so each row equals its own `hidden` to float tolerance)."""
        batch = np.stack([np.asarray(a, dtype=np.float32).reshape(-1) for a in audios])
        audio = torch.from_numpy(batch)
        if audio.shape[-1] < MIN_SAMPLES:
            audio = torch.nn.functional.pad(audio, (0, MIN_SAMPLES - audio.shape[-1]))
        dtype = next(self.model.parameters()).dtype
        out = self.model(audio.to(self.device, dtype)).last_hidden_state.float()
        return list(out.unbind(0))

    def encode(self, audio_16k: np.ndarray | torch.Tensor, n_frames: int,
               mode: str | None = None) -> torch.Tensor:
        """Features resized onto `n_frames` mel frames as upstream does: [n_frames, 768] float32."""
        return resize_frames(self.hidden(audio_16k), n_frames, mode)
