"""The openvpi NSF-HiFiGAN generator (44.1 kHz, hop 512, 128 mel bins).

Parameter names match the `generator` state dict of openvpi's `model.ckpt`, whose convolutions
carry weight norm (`weight_g`, `weight_v`); `rtsvc.models.load_vocoder` folds those into plain
weights (what `remove_weight_norm` does) and loads strictly.

Call signature (the contract other modules and the ONNX export rely on):

    vocoder(mel, f0, phase=None, noise=None, generator=None) -> audio [b, n * 512]

    mel   [b, 128, n]   natural-log mel (not the model's [-1, 1] normalisation)
    f0    [b, n]        Hz per mel frame, 0 = unvoiced
    phase [b or 1, 9]   initial phase of each harmonic in cycles [0, 1); upstream draws it
                        uniformly with the fundamental's fixed at 0
    noise [b, n*512, 9] standard-normal noise of the harmonic source, one channel per harmonic
    generator           torch.Generator used to draw whichever of phase / noise is not given

With both `phase` and `noise` given the output is a pure function of the inputs (what the ONNX
export feeds as inputs); with neither, the draws match upstream's `torch.rand` / `randn_like`.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtsvc.errors import UserError

LRELU_SLOPE = 0.1
HARMONIC_NUM = 8  # fundamental + 8 overtones = 9 sine channels
SINE_AMP = 0.1
NOISE_STD = 0.003  # noise added to voiced samples; unvoiced ones get SINE_AMP / 3
VOICED_THRESHOLD = 0.0


@dataclass
class VocoderConfig:
    """The fields of openvpi's config.json that shape the generator (others are ignored)."""
    sampling_rate: int = 44100
    num_mels: int = 128
    hop_size: int = 512
    upsample_rates: list[int] = field(default_factory=lambda: [8, 8, 2, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 16, 4, 4, 4])
    upsample_initial_channel: int = 512
    resblock: str = "1"
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 3)
    n_fft: int = 2048
    win_size: int = 2048
    fmin: float = 40
    fmax: float = 16000

    @classmethod
    def from_json(cls, path: str | Path) -> "VocoderConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read vocoder config {path}: {err}") from None
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        missing = [k for k in ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                               "resblock_kernel_sizes", "resblock_dilation_sizes", "num_mels")
                   if k not in raw]
        if missing:
            raise UserError(f"{path} is not an NSF-HiFiGAN config.json (missing {', '.join(missing)})")
        config = cls(**known)
        config.resblock = str(config.resblock)
        return config

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @property
    def upsample_factor(self) -> int:
        return math.prod(self.upsample_rates)


def padding_for(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


# --- harmonic-plus-noise source ---------------------------------------------------------------

def draw_source_randomness(batch: int, n_samples: int, generator: torch.Generator | None = None,
                           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(phase [1, 9], noise [batch, n_samples, 9]) drawn like upstream (on the generator's device
    when one is given, then moved to `device`)."""
    dim = HARMONIC_NUM + 1
    draw_device = generator.device if generator is not None else device
    phase = torch.rand(1, dim, generator=generator, device=draw_device)
    phase[:, 0] = 0.0
    noise = torch.randn(batch, n_samples, dim, generator=generator, device=draw_device)
    return phase.to(device), noise.to(device)


def sine_source(f0: torch.Tensor, upp: int, sampling_rate: int, phase: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """Harmonic source [b, n*upp, 9] of f0 [b, n] Hz (openvpi SineGen).

    F0 is held constant within each frame; phase accumulates sample by sample, wrapped per frame
    (the fmod keeps float32 phase exact over long audio). Unvoiced frames are noise only.
    """
    b, n = f0.shape
    f0 = f0.float()[..., None]  # [b, n, 1]
    rad = f0 / sampling_rate * torch.arange(1, upp + 1, device=f0.device)  # [b, n, upp] cycles
    frame_end = torch.fmod(rad[..., -1:] + 0.5, 1.0) - 0.5
    offset = frame_end.cumsum(dim=1).fmod(1.0)
    rad = rad + F.pad(offset, (0, 0, 1, -1))  # each frame starts where the previous one ended
    harmonics = torch.arange(1, HARMONIC_NUM + 2, device=f0.device, dtype=rad.dtype)
    rad = rad.reshape(b, n * upp, 1) * harmonics + phase.reshape(-1, 1, HARMONIC_NUM + 1)
    sines = torch.sin(2 * math.pi * rad) * SINE_AMP
    uv = (f0 > VOICED_THRESHOLD).float().repeat_interleave(upp, dim=1)  # [b, n*upp, 1]
    noise_amp = uv * NOISE_STD + (1 - uv) * SINE_AMP / 3
    return sines * uv + noise_amp * noise


class SourceModuleHnNSF(nn.Module):
    """Merges the 9 harmonics into one excitation channel: tanh(Linear(9 -> 1))."""

    def __init__(self):
        super().__init__()
        self.l_linear = nn.Linear(HARMONIC_NUM + 1, 1)

    def forward(self, sines: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.l_linear(sines))


# --- HiFi-GAN generator -----------------------------------------------------------------------

def _conv(channels: int, kernel: int, dilation: int) -> nn.Conv1d:
    """Length-preserving dilated conv of a residual block."""
    return nn.Conv1d(channels, channels, kernel, dilation=dilation, padding=padding_for(kernel, dilation))


class ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            _conv(channels, kernel, d) for d in dilation)
        self.convs2 = nn.ModuleList(
            _conv(channels, kernel, 1) for _ in dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: list[int]):
        super().__init__()
        self.convs = nn.ModuleList(
            _conv(channels, kernel, d) for d in dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = x + c(F.leaky_relu(x, LRELU_SLOPE))
        return x


class NsfHifiGan(nn.Module):
    def __init__(self, config: VocoderConfig):
        super().__init__()
        h = self.config = config
        self.upp = h.upsample_factor
        self.num_kernels = len(h.resblock_kernel_sizes)
        self.m_source = SourceModuleHnNSF()
        self.conv_pre = nn.Conv1d(h.num_mels, h.upsample_initial_channel, 7, padding=3)
        resblock = ResBlock1 if h.resblock == "1" else ResBlock2
        self.ups = nn.ModuleList()
        self.noise_convs = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = h.upsample_initial_channel
        for i, (u, k) in enumerate(zip(h.upsample_rates, h.upsample_kernel_sizes, strict=True)):
            self.ups.append(nn.ConvTranspose1d(ch, ch // 2, k, u, padding=(k - u) // 2))
            ch //= 2
            stride = math.prod(h.upsample_rates[i + 1:])  # source rate -> this stage's rate
            if stride > 1:
                self.noise_convs.append(nn.Conv1d(1, ch, stride * 2, stride=stride, padding=stride // 2))
            else:
                self.noise_convs.append(nn.Conv1d(1, ch, 1))
            for k_res, d in zip(h.resblock_kernel_sizes, h.resblock_dilation_sizes, strict=True):
                self.resblocks.append(resblock(ch, k_res, d))
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3)
        for m in [*self.ups, *self.resblocks.modules(), self.conv_post]:
            if isinstance(m, nn.Conv1d | nn.ConvTranspose1d):
                nn.init.normal_(m.weight, 0.0, 0.01)  # openvpi init_weights

    def forward(self, mel: torch.Tensor, f0: torch.Tensor, phase: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """mel [b, 128, n] log-mel, f0 [b, n] Hz -> audio [b, n * 512]; see the module docstring."""
        b, n = f0.shape
        if phase is None or noise is None:
            drawn_phase, drawn_noise = draw_source_randomness(b, n * self.upp, generator, f0.device)
            phase = drawn_phase if phase is None else phase
            noise = drawn_noise if noise is None else noise
        sines = sine_source(f0, self.upp, self.config.sampling_rate, phase.to(f0.device), noise.to(f0.device))
        source = self.m_source(sines.to(mel.dtype)).transpose(1, 2)  # [b, 1, n*upp]

        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE)) + self.noise_convs[i](source)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as upstream
        return torch.tanh(x).squeeze(1)


def weight_norm_layers(model: NsfHifiGan) -> list[str]:
    """Names of the layers that carry weight norm in openvpi checkpoints (noise_convs do not)."""
    names = ["conv_pre", "conv_post"] + [f"ups.{i}" for i in range(len(model.ups))]
    for name, module in model.resblocks.named_modules():
        if isinstance(module, nn.Conv1d):
            names.append(f"resblocks.{name}")
    return names


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every `X.weight_g` / `X.weight_v` pair by `X.weight = g * v / ||v||` (norm over all
    dims but the first, as torch's weight_norm with dim=0). Unpaired keys are left for the strict
    load to report."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".weight_g")]:
        prefix = key[: -len(".weight_g")]
        if prefix + ".weight_v" not in state:
            continue
        g, v = out.pop(key), out.pop(prefix + ".weight_v")
        norm = v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
        out[prefix + ".weight"] = g * v / norm
    return out


def unfold_weight_norm(state: dict[str, torch.Tensor], layers: list[str]) -> dict[str, torch.Tensor]:
    """The inverse, for writing checkpoints in openvpi's layout: weight -> (weight_g, weight_v)."""
    out = dict(state)
    for prefix in layers:
        w = out.pop(prefix + ".weight")
        out[prefix + ".weight_g"] = w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
        out[prefix + ".weight_v"] = w
    return out
