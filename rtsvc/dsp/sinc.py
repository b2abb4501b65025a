"""Band-limited sinc resampling with a Hann-windowed kernel: what upstream RIFT-SVC's RMVPE hears.

Upstream resamples RMVPE's input with torchaudio's `Resample(sr, 16000, lowpass_filter_width=128)`
(torchaudio is not a dependency of rtsvc). Reproduced here from the method (Smith's bandlimited
interpolation): after reducing the rates by their gcd to `orig` -> `new`, output sample j of every
block of `new` reads input samples around j * orig / new through a sinc low-pass at
`rolloff * min(orig, new)`, windowed by cos^2 over `width` zero crossings; the input is zero-padded
at both ends, so the first and last few milliseconds are filtered against silence. The kernel is
evaluated in float64 and used in float32, as torchaudio does, so the outputs agree to float32
rounding (tests/upstream/torchaudio_resample.py holds the transcription it is tested against).

Cost: one strided convolution, `new` filters of 2 * width + orig taps (44.1 -> 16 kHz at width 128:
160 x 1155), ~18 M multiply-adds per second of audio.
"""

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

UPSTREAM_LOWPASS_WIDTH = 128  # rift_svc/rmvpe/inference.py: Resample(sr, 16000, lowpass_filter_width=128)
ROLLOFF = 0.99


@lru_cache(maxsize=8)
def sinc_kernel(src_rate: int, dst_rate: int, lowpass_width: int = UPSTREAM_LOWPASS_WIDTH,
                rolloff: float = ROLLOFF, float32: bool = False) -> tuple[torch.Tensor, int]:
    """(kernel [new, 1, 2 * width + orig] float32, width) for `src_rate` -> `dst_rate`.
    `float32`: evaluated in float32 throughout, as torchaudio's functional `resample` does for a
    float32 waveform (the V2 release's encoders' input; 1e-6 from the float64 kernel)."""
    if lowpass_width <= 0:
        raise ValueError("lowpass width must be positive")
    g = math.gcd(int(src_rate), int(dst_rate))
    orig, new = int(src_rate) // g, int(dst_rate) // g
    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_width * orig / cutoff)
    if float32:  # the same steps on float32 tensors (torch's own rounding of each step)
        taps32 = torch.arange(-width, width + orig, dtype=torch.float32)[None, None] / orig
        t32 = torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new + taps32
        t32 = (t32 * cutoff).clamp_(-lowpass_width, lowpass_width)
        window32 = torch.cos(t32 * math.pi / lowpass_width / 2) ** 2
        t32 = t32 * math.pi
        kernel32 = torch.where(t32 == 0, torch.tensor(1.0), t32.sin() / t32)
        return kernel32 * (window32 * (cutoff / orig)), width
    # time (in input periods x cutoff) from output sample j to every input tap, float64 except the
    # output offset -j / new, which torchaudio divides in float32 (an integer tensor over an int)
    taps = np.arange(-width, width + orig, dtype=np.float64) / orig
    offset = (-np.arange(new, dtype=np.float32) / np.float32(new)).astype(np.float64)
    t = (offset[:, None] + taps[None, :]) * cutoff
    t = np.clip(t, -lowpass_width, lowpass_width)
    window = np.cos(t * math.pi / lowpass_width / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel = sinc * window * (cutoff / orig)
    return torch.from_numpy(kernel.astype(np.float32))[:, None, :], width


def sinc_resample(audio: np.ndarray | torch.Tensor, src_rate: int, dst_rate: int,
                  lowpass_width: int = UPSTREAM_LOWPASS_WIDTH, float32_kernel: bool = False
                  ) -> np.ndarray | torch.Tensor:
    """Resample [t] or [b, t] audio; ceil(t * dst / src) samples out. numpy in, float32 numpy out;
    a tensor in, a tensor out on its device (float32 and float16 both work). `float32_kernel`: see
    `sinc_kernel`."""
    if src_rate == dst_rate:
        return audio
    as_numpy = not isinstance(audio, torch.Tensor)
    x = torch.from_numpy(np.asarray(audio, dtype=np.float32)) if as_numpy else audio
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    kernel, width = sinc_kernel(int(src_rate), int(dst_rate), int(lowpass_width), ROLLOFF, float32_kernel)
    g = math.gcd(int(src_rate), int(dst_rate))
    orig, new = int(src_rate) // g, int(dst_rate) // g
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    y = F.conv1d(F.pad(x, (width, width + orig))[:, None], kernel, stride=orig)  # [b, new, blocks]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, :math.ceil(new * shape[-1] / orig)]
    y = y.reshape(*shape[:-1], y.shape[-1])
    return y.numpy() if as_numpy else y
