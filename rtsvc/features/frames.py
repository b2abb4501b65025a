"""Encoder frames (50/s) onto the mel frame grid (86.13/s)."""

import torch
import torch.nn.functional as F

from rtsvc.dsp.audio import HOP_LENGTH

# How encoder frames (50/s) are stretched onto mel frames (86.13/s). RIFT-SVC V2's
# `interpolate_tensor` is F.interpolate(mode="nearest") on [1, 1, frames, dim]; V3 switched to
# `linear_interpolate_tensor` (mode="linear", align_corners=True). We follow V2, the model we load.
RESIZE_MODE = "nearest"


def mel_frame_count(samples: int) -> int:
    """Mel frames of `samples` audio samples: floor(samples / 512), upstream's grid (its mel pads 768
    samples each side, reflecting, and frames 2048 every 512). The last `samples % 512` samples get no
    frame: converted, they come out silent, as upstream's infer.py zero-pads them."""
    return int(samples) // HOP_LENGTH


def resize_frames(x: torch.Tensor, n_frames: int, mode: str | None = None) -> torch.Tensor:
    """[frames, dim] -> [n_frames, dim] along time: "nearest" (V2) or "linear" (align_corners=True, V3)."""
    mode = mode or RESIZE_MODE
    if n_frames <= 0:
        return x.new_zeros(0, x.shape[-1])
    if x.shape[0] == n_frames:
        return x
    if x.shape[0] == 0:
        raise ValueError("cannot resize an empty feature sequence")
    seq = x.transpose(0, 1).unsqueeze(0)  # [1, dim, frames]
    if mode == "nearest":
        out = F.interpolate(seq, size=n_frames, mode="nearest")
    elif mode == "linear":
        out = F.interpolate(seq, size=n_frames, mode="linear", align_corners=True)
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    return out[0].transpose(0, 1)
