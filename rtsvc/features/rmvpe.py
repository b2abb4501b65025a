"""RMVPE (Wei et al. 2023): a deep U-Net over a log-mel, a BiGRU and a 360-class pitch salience head.

Module and parameter names follow the published checkpoint (`rmvpe/model.pt`, the yxlllc/RMVPE
release that RIFT-SVC ships), so it loads with strict keys. That checkpoint also holds a
"timbre filter" (`unet.tf`) that the E2E0 forward pass never calls: it is built here only so the
keys match.

Front end: 16 kHz audio, n_fft = window = 1024, hop 160 (100 frames/s), centred reflect-padded
STFT, 128 HTK-spaced mel bins (slaney area norm) from 30 Hz to 8 kHz, natural log of
max(mel, 1e-5). Output: F0 in Hz per 10 ms frame, 0 where the peak salience is under the threshold.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE
from rtsvc.dsp.mel import mel_filterbank
from rtsvc.errors import UserError
from rtsvc.models.safe_load import load_torch_file

HOP_LENGTH = 160  # 10 ms: 100 frames per second
N_FFT = 1024
N_MELS = 128
MEL_FMIN = 30.0
MEL_FMAX = 8000.0
N_CLASS = 360  # 20-cent bins
CENTS_OFFSET = 1997.3794084376191  # cents (re 10 Hz) of class 0
THRESHOLD = 0.03  # voicing: peak salience below this is unvoiced
FRAME_MULTIPLE = 32  # the U-Net halves time 5 times: pad frames to a multiple of 2**5
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class RmvpeConfig:
    """E2E0(n_blocks=4, n_gru=1, kernel_size=(2, 2)) as published."""

    n_blocks: int = 4
    n_gru: int = 1
    en_de_layers: int = 5
    inter_layers: int = 4
    en_out_channels: int = 16
    gru_hidden: int = 256

    @classmethod
    def from_state_dict(cls, state: dict) -> "RmvpeConfig":
        """Read the sizes back from the weights (the official file gives the defaults above)."""
        def count(prefix: str) -> int:
            return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
        try:
            cfg = cls(
                n_blocks=count("unet.encoder.layers.0.conv."),
                n_gru=sum(1 for k in state if k.startswith("fc.0.gru.weight_hh_l") and "reverse" not in k),
                en_de_layers=count("unet.encoder.layers."),
                inter_layers=count("unet.intermediate.layers."),
                en_out_channels=int(state["unet.encoder.layers.0.conv.0.conv.0.weight"].shape[0]),
                gru_hidden=int(state["fc.0.gru.weight_hh_l0"].shape[1]),
            )
        except (KeyError, IndexError, AttributeError, TypeError, ValueError):
            return cls()  # not an RMVPE state dict: the strict key check reports it
        return cfg if min(cfg.__dict__.values()) > 0 else cls()


# ---------------------------------------------------------------- front end

def mel_filterbank_htk() -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=30, fmax=8000, htk=True): [128, 513]."""
    return mel_filterbank(ENCODER_SAMPLE_RATE, N_FFT, N_MELS, MEL_FMIN, MEL_FMAX, htk=True)


def rmvpe_log_mel(audio: torch.Tensor) -> torch.Tensor:
    """16 kHz audio [b, t] -> log-mel [b, 128, t // 160 + 1] (centred frames)."""
    window = torch.hann_window(N_FFT, device=audio.device)
    spec = torch.stft(audio, N_FFT, hop_length=HOP_LENGTH, win_length=N_FFT, window=window,
                      center=True, pad_mode="reflect", return_complex=True)
    basis = torch.from_numpy(mel_filterbank_htk()).to(audio.device)
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2))  # as upstream (abs() rounds differently)
    return torch.log(torch.clamp(basis @ magnitude, min=1e-5))


# ---------------------------------------------------------------- decoding

def decode_salience(salience: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """[..., t, 360] salience -> F0 Hz [..., t]: salience-weighted mean of the 9 bins around the peak."""
    idx = torch.arange(N_CLASS, device=salience.device)
    center = salience.argmax(dim=-1, keepdim=True)
    window = (idx >= center - 4) & (idx < center + 5)  # clipping at the ends falls out of the mask
    weights = salience * window
    weight_sum = weights.sum(dim=-1)
    cents = (weights * (idx * 20.0 + CENTS_OFFSET)).sum(dim=-1) / (weight_sum + (weight_sum == 0))
    f0 = 10.0 * 2.0 ** (cents / 1200.0)
    return f0 * (salience.amax(dim=-1) >= threshold)


# ---------------------------------------------------------------- network

class ConvBlockRes(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, momentum=BN_MOMENTUM),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, momentum=BN_MOMENTUM),
            nn.ReLU(),
        )
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + (x if self.shortcut is None else self.shortcut(x))


class ResEncoderBlock(nn.Module):
    """n_blocks residual conv blocks; with pooling it also returns the pooled map (the skip is the first)."""

    def __init__(self, cin: int, cout: int, n_blocks: int, pool: bool):
        super().__init__()
        self.conv = nn.ModuleList([ConvBlockRes(cin if i == 0 else cout, cout) for i in range(n_blocks)])
        self.pool = nn.AvgPool2d(2) if pool else None

    def forward(self, x: torch.Tensor):
        for block in self.conv:
            x = block(x)
        return x if self.pool is None else (x, self.pool(x))


class ResDecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n_blocks: int):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm2d(cout, momentum=BN_MOMENTUM), nn.ReLU(),
        )
        self.conv2 = nn.ModuleList(
            [ConvBlockRes(cout * 2 if i == 0 else cout, cout) for i in range(n_blocks)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.conv1(x), skip), dim=1)
        for block in self.conv2:
            x = block(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: RmvpeConfig):
        super().__init__()
        self.bn = nn.BatchNorm2d(1, momentum=BN_MOMENTUM)
        chans = [1] + [cfg.en_out_channels * 2**i for i in range(cfg.en_de_layers)]
        self.layers = nn.ModuleList(
            [ResEncoderBlock(chans[i], chans[i + 1], cfg.n_blocks, pool=True)
             for i in range(cfg.en_de_layers)])
        self.skip_channels = chans[1:]

    def forward(self, x: torch.Tensor):
        x = self.bn(x)
        skips = []
        for layer in self.layers:
            skip, x = layer(x)
            skips.append(skip)
        return x, skips


class Intermediate(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: RmvpeConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            [ResEncoderBlock(cin if i == 0 else cout, cout, cfg.n_blocks, pool=False)
             for i in range(cfg.inter_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TimbreFilter(nn.Module):
    """In the checkpoint but unused by E2E0's forward (kept for strict key matching)."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.layers = nn.ModuleList([ConvBlockRes(c, c) for c in channels])


class Decoder(nn.Module):
    def __init__(self, cin: int, cfg: RmvpeConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            [ResDecoderBlock(cin // 2**i, cin // 2 ** (i + 1), cfg.n_blocks)
             for i in range(cfg.en_de_layers)])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for layer, skip in zip(self.layers, reversed(skips), strict=True):
            x = layer(x, skip)
        return x


class DeepUnet(nn.Module):
    def __init__(self, cfg: RmvpeConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        deepest = cfg.en_out_channels * 2 ** (cfg.en_de_layers - 1)
        self.intermediate = Intermediate(deepest, deepest * 2, cfg)
        self.tf = TimbreFilter(self.encoder.skip_channels)
        self.decoder = Decoder(deepest * 2, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.encoder(x)
        return self.decoder(self.intermediate(x), skips)


class BiGRU(nn.Module):
    def __init__(self, n_in: int, hidden: int, layers: int):
        super().__init__()
        self.gru = nn.GRU(n_in, hidden, num_layers=layers, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


class Rmvpe(nn.Module):
    """log-mel [b, 128, t] -> salience [b, t, 360]; `.f0(audio_16k)` does the whole job."""

    def __init__(self, cfg: RmvpeConfig | None = None):
        super().__init__()
        cfg = cfg or RmvpeConfig()
        self.unet = DeepUnet(cfg)
        self.cnn = nn.Conv2d(cfg.en_out_channels, 3, 3, padding=1)
        self.fc = nn.Sequential(
            BiGRU(3 * N_MELS, cfg.gru_hidden, cfg.n_gru),
            nn.Linear(2 * cfg.gru_hidden, N_CLASS),
            nn.Dropout(0.25),
            nn.Sigmoid(),
        )

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.cnn(self.unet(mel.transpose(-1, -2).unsqueeze(1)))  # [b, 3, t, 128]
        return self.fc(x.transpose(1, 2).flatten(-2))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Rmvpe":
        """Load `rmvpe/model.pt` (a state dict, or a training checkpoint holding it under "model")."""
        path = Path(path)
        ckpt = load_torch_file(path, "RMVPE model")
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"{path} is not an RMVPE checkpoint (expected a state dict)")
        model = cls(RmvpeConfig.from_state_dict(state))
        missing, unexpected = _key_diff(model, state)
        if missing or unexpected:
            raise UserError(f"{path} is not an RMVPE checkpoint: missing keys {missing[:3]}, "
                            f"unexpected keys {unexpected[:3]}")
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    @torch.inference_mode()
    def salience(self, mel: torch.Tensor) -> torch.Tensor:
        """Pad time to a multiple of 32 (as upstream), run, cut back: [b, 128, t] -> [b, t, 360]."""
        n = mel.shape[-1]
        padded = FRAME_MULTIPLE * ((n - 1) // FRAME_MULTIPLE + 1)
        return self(F.pad(mel, (0, padded - n)))[:, :n]

    @torch.inference_mode()
    def f0(self, audio: np.ndarray | torch.Tensor, threshold: float = THRESHOLD) -> np.ndarray:
        """16 kHz mono audio -> F0 Hz at 100 frames/s (len // 160 + 1 frames), 0 = unvoiced."""
        return self.f0_batch(np.asarray(audio, dtype=np.float32).reshape(1, -1), threshold)[0]

    @torch.inference_mode()
    def f0_batch(self, audio: np.ndarray | torch.Tensor, threshold: float = THRESHOLD) -> np.ndarray:
        """`f0` of segments of one length [b, samples] -> [b, frames] in one pass (the U-Net, the
        BiGRU and the STFT are per item)."""
        device = next(self.parameters()).device
        audio = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=device)
        audio = audio.reshape(audio.shape[0] if audio.ndim > 1 else 1, -1)
        n_frames = audio.shape[-1] // HOP_LENGTH + 1
        if audio.shape[-1] <= N_FFT // 2:  # reflect padding needs more samples than half a window
            audio = F.pad(audio, (0, N_FFT // 2 + 1 - audio.shape[-1]))
        hidden = self.salience(rmvpe_log_mel(audio))
        return decode_salience(hidden, threshold)[:, :n_frames].float().cpu().numpy()


def _key_diff(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)
