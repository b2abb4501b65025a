"""F0 extractors (RMVPE, FCPE, WORLD) and their alignment to the mel frame grid.

Every extractor takes 16 kHz mono float audio and returns F0 in Hz at 100 frames/s (frame i
centred at i * 10 ms, `len // 160 + 1` frames), 0 where unvoiced. `f0_to_mel_frames` then does
what RIFT-SVC's `post_process_f0` does: fill unvoiced frames by linear interpolation between voiced
ones, resample onto the mel frame times (i * 512 / 44100 s), and put 0 back on frames that are
mostly unvoiced (so the DiT sees the same zeros it was trained with).
"""

import contextlib
import importlib
import io
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, HOP_LENGTH, SAMPLE_RATE
from rtsvc.errors import UserError
from rtsvc.features.f0_methods import f0_method

F0_FRAME_RATE = 100  # frames per second of every extractor's output
F0_HOP = ENCODER_SAMPLE_RATE // F0_FRAME_RATE  # 160 samples at 16 kHz
F0_MIN, F0_MAX = 50.0, 1100.0  # WORLD search range (Hz)
FCPE_THRESHOLD = 0.006  # torchfcpe's default voicing threshold


class F0Extractor:
    """`extractor(audio_16k) -> f0 Hz [len // 160 + 1]` (100 frames/s, 0 = unvoiced).

    `batch(audios)` does the same for many segments: networks with a `batch_fn` (RMVPE, FCPE: the
    segments of one length stacked into one forward pass) run them together; DSP trackers (WORLD's
    dio and harvest) have no batched form and run item by item.
    """

    sample_rate = ENCODER_SAMPLE_RATE
    frame_rate = F0_FRAME_RATE

    def __init__(self, name: str, fn: Callable[[np.ndarray], np.ndarray],
                 batch_fn: Callable[[np.ndarray], np.ndarray] | None = None, network: object | None = None):
        self.name = name
        self.network = network  # the network it runs when not its own torch module (OnnxFcpeNet)
        self._fn = fn
        self._batch_fn = batch_fn  # [b, samples] -> [b, frames]

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if len(audio) == 0:
            return np.zeros(1, dtype=np.float32)
        return _on_grid(self._fn(audio), len(audio))

    def batch(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        """`self(a)` for every segment; segments of one length share a batched call where there is one."""
        audios = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
        length = len(audios[0]) if audios else 0
        if self._batch_fn is None or len(audios) < 2 or length == 0 or any(len(a) != length for a in audios):
            return [self(a) for a in audios]
        f0 = np.asarray(self._batch_fn(np.stack(audios)), dtype=np.float32)
        return [_on_grid(row, length) for row in f0]

    def __repr__(self) -> str:
        return f"F0Extractor({self.name!r})"


def _on_grid(f0: np.ndarray, samples: int) -> np.ndarray:
    """Pin an extractor's output to `samples // 160 + 1` frames (WORLD rounds its frame count
    differently), unvoiced NaN as 0."""
    n = samples // F0_HOP + 1
    f0 = np.asarray(f0, dtype=np.float32).reshape(-1)
    if len(f0) < n:
        f0 = np.pad(f0, (0, n - len(f0)))
    return np.nan_to_num(f0[:n], nan=0.0)


# ---------------------------------------------------------------- RMVPE

def _rmvpe(path: str | Path | None, device: str | torch.device):
    """RMVPE's (single, batched) F0 functions."""
    from rtsvc.features.rmvpe import Rmvpe

    if path is None:
        raise UserError("--f0 rmvpe needs the RMVPE model (rmvpe/model.pt): pass --pretrained-dir FOLDER "
                        "(where `rtsvc download` put it), --rmvpe PATH, or use --f0 fcpe / pyworld")
    model = Rmvpe.load(path, device)
    return model.f0, model.f0_batch


# ---------------------------------------------------------------- FCPE

class _NoResample(torch.nn.Module):
    """Stand-in for torchaudio.transforms.Resample: we always feed FCPE its own 16 kHz rate."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchfcpe tried to resample; rtsvc feeds it 16 kHz audio so this must not happen")


def _import_torchfcpe():
    """Import torchfcpe without torchaudio (its mel module only imports `Resample` at import time)."""
    if "torchfcpe" in sys.modules or "torchaudio" in sys.modules:  # already importable as is
        return importlib.import_module("torchfcpe")
    stub, transforms = types.ModuleType("torchaudio"), types.ModuleType("torchaudio.transforms")
    transforms.Resample = _NoResample
    stub.transforms = transforms
    sys.modules.update({"torchaudio": stub, "torchaudio.transforms": transforms})
    try:
        return importlib.import_module("torchfcpe")
    except ImportError as err:
        raise UserError(f"--f0 fcpe needs torchfcpe (pip install --no-deps torchfcpe): {err}") from None
    finally:  # the stub must not leak: other libraries probe `import torchaudio`
        sys.modules.pop("torchaudio", None)
        sys.modules.pop("torchaudio.transforms", None)


def load_fcpe(device: str | torch.device = "cpu") -> torch.nn.Module:
    """torchfcpe's bundled model (`InferCFNaiveMelPE`: `.wav2mel`, the network `.model`, its decoder)."""
    torchfcpe = _import_torchfcpe()
    with contextlib.redirect_stdout(io.StringIO()):  # torchfcpe prints [INFO]/[WARN] lines while loading
        return torchfcpe.spawn_bundled_infer_model(device=str(device))


FcpeNet = Callable[[torch.Tensor], torch.Tensor]  # FCPE's network: mel [b, t, 128] -> latent [b, t, 360]


def _fcpe(device: str | torch.device, net: FcpeNet | None = None):
    """FCPE's (single, batched) F0 functions. `net` replaces the torch network (the mel front end and
    the decoder stay torchfcpe's): an exported bundle's `fcpe.onnx` on ONNX Runtime, ~1.9x faster
    on a CPU core."""
    model = load_fcpe(device)
    f0_min = float(model.get_model_f0_range()["f0_min"])
    network = net or model.model

    @torch.inference_mode()
    def run_batch(audio: np.ndarray) -> np.ndarray:  # [b, samples] -> [b, frames]
        wav = torch.from_numpy(np.clip(audio, -1.0, 1.0)).reshape(audio.shape[0], -1, 1)
        # torchfcpe's own forward, with the network swappable: wav2mel, network, local-argmax decoding
        latent = network(model.wav2mel(wav.to(model.tensor_device_marker.device), ENCODER_SAMPLE_RATE))
        cents = model.model.latent2cents_local_decoder(latent, threshold=FCPE_THRESHOLD)
        f0 = model.model.cent_to_f0(cents)
        f0 = f0.reshape(audio.shape[0], -1).float().cpu().numpy()
        return np.where(f0 < f0_min, 0.0, f0)

    return lambda audio: run_batch(audio[None])[0], run_batch


# ---------------------------------------------------------------- WORLD

def _world(method: str) -> Callable[[np.ndarray], np.ndarray]:
    import pyworld

    frame_period = 1000.0 / F0_FRAME_RATE

    def run(audio: np.ndarray) -> np.ndarray:
        x = audio.astype(np.float64)
        if method == "dio":
            f0, t = pyworld.dio(x, ENCODER_SAMPLE_RATE, f0_floor=F0_MIN, f0_ceil=F0_MAX,
                                frame_period=frame_period)
            return pyworld.stonemask(x, f0, t, ENCODER_SAMPLE_RATE)
        f0, _ = pyworld.harvest(x, ENCODER_SAMPLE_RATE, f0_floor=F0_MIN, f0_ceil=F0_MAX,
                                frame_period=frame_period)
        return f0

    return run


def make_f0_extractor(name: str = "rmvpe", rmvpe_path: str | Path | None = None,
                      device: str | torch.device = "cpu", fcpe_net: FcpeNet | None = None) -> F0Extractor:
    """Any `rtsvc.features.f0_methods.F0_METHODS` row: rmvpe (needs `rmvpe/model.pt`), fcpe
    (torchfcpe's bundled model; `fcpe_net` runs its network instead), pyworld/harvest, dio (no weights)."""
    key = f0_method(name, option="F0 extractor").name
    if key == "rmvpe":
        return F0Extractor("rmvpe", *_rmvpe(rmvpe_path, device))
    if key == "fcpe":
        return F0Extractor("fcpe", *_fcpe(device, fcpe_net), network=fcpe_net)
    method = "dio" if key == "dio" else "harvest"  # pyworld is harvest
    return F0Extractor(method, _world(method))


def f0_to_mel_frames(f0: np.ndarray, n_frames: int, frame_rate: float = F0_FRAME_RATE,
                     sample_rate: int = SAMPLE_RATE, hop_length: int = HOP_LENGTH,
                     f0_start: int = 0, mel_start: int = 0, dtype: type = np.float32) -> np.ndarray:
    """Upstream `post_process_f0`: fill unvoiced gaps, resample to mel frame times, re-zero unvoiced.

    `f0_start` / `mel_start` are the stream indices of the first F0 frame and the first mel frame
    wanted (a streaming window's F0 slice and mel frames sit on the stream's clock; 0 for a clip).
    A clip with no voiced frame stays all zeros. Returns [n_frames] in `dtype` (float64: shift before
    rounding, as upstream does).
    """
    f0 = np.asarray(f0, dtype=np.float64).reshape(-1).copy()
    if n_frames <= 0:
        return np.zeros(0, dtype=np.float32)
    if f0.size == 0:
        return np.zeros(n_frames, dtype=np.float32)
    uv = f0 <= 0
    if uv.all():
        return np.zeros(n_frames, dtype=np.float32)
    f0 = interpolate_unvoiced(f0).astype(np.float64)
    src_t = (f0_start + np.arange(len(f0))) / frame_rate
    dst_t = (mel_start + np.arange(n_frames)) * hop_length / sample_rate
    out = np.interp(dst_t, src_t, f0)
    out[np.interp(dst_t, src_t, uv.astype(np.float64)) > 0.5] = 0.0
    return out.astype(dtype)


def interpolate_unvoiced(f0: np.ndarray) -> np.ndarray:
    """Linear interpolation over unvoiced (0) frames, edges held; all-unvoiced stays 0."""
    f0 = np.asarray(f0, dtype=np.float64).reshape(-1).copy()
    uv = f0 <= 0
    if uv.all() or not uv.any():
        return f0.astype(np.float32)
    f0[uv] = np.interp(np.flatnonzero(uv), np.flatnonzero(~uv), f0[~uv])
    return f0.astype(np.float32)


def shift_f0(f0: np.ndarray | torch.Tensor, semitones: float):
    """Pitch shift: multiply by 2^(semitones / 12) (unvoiced zeros stay zero)."""
    return f0 * (2.0 ** (semitones / 12.0)) if semitones else f0
