"""A `Voice` backed by a RIFT-SVC model, and offline conversion of whole files.

`ModelVoice.convert` runs one window: features (F0, RMS, ContentVec, Whisper on the mel grid)
-> rectified-flow sampling of the mel with the backend's DiT -> the backend's vocoder. The
streaming engine calls it on overlapping windows; the start noise of every mel frame is drawn
from its absolute frame index (`start_sample // 512`), so overlapping windows start from the
same noise and agree where they overlap.

Offline (the default) every call computes every feature over its window as upstream does (Whisper
padded to 30 s). `ModelVoice(..., streaming=True)` (or `voice.for_streaming()`) is the variant the
engine wants: a per-stream `rtsvc.feature_cache.FeatureCache` computes F0 and RMS for the new samples
only, runs ContentVec and Whisper (unpadded) on a bounded window and reuses older frames; `fork()`
gives a session its own cache over the same backend and encoders; `reset()` clears it. The streaming
DiT samples only the frames that get vocoded plus `dit_context_ms` of left context (the DiT's cost
grows with its input; features are still computed on the encoders' window).
`last_ms` holds the last call's time per part (resample, f0, rms, contentvec, whisper, dit, vocoder).

`convert_offline` is upstream `infer.py`'s long-audio path: slice at silences, bring each slice
to -18 LUFS (the loudness the models were trained at), convert, optionally restore the slice's
own loudness, and join the slices with short crossfades into exactly the input's length.
"""

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch

from rtsvc.audio import ENCODER_SAMPLE_RATE, HOP_LENGTH, SAMPLE_RATE, resample
from rtsvc.engine import DIT_CONTEXT_MS  # streaming: DiT left context (a CLI default: defined torch-free)
from rtsvc.errors import UserError
from rtsvc.f0 import shift_f0
from rtsvc.feature_cache import ENCODER_CONTEXT_S, FeatureCache
from rtsvc.flow import Conditioning, counter_normal, frame_noise, sample
from rtsvc.mel import denormalize_mel
from rtsvc.settings import Knobs, validate_knobs
from rtsvc.slicer import CROSSFADE_MS, join_with_crossfade, slice_at_silences
from rtsvc.voice import Voice

if TYPE_CHECKING:
    from rtsvc.backends import Backend
    from rtsvc.features import FeatureExtractor

TARGET_LUFS = -18.0  # upstream infer.py --target-loudness (the training data's loudness)
LOUDNESS_BLOCK_S = 0.1  # upstream meter block size; shorter slices are left as they are
PEAK_LIMIT = 0.99  # upstream: scale down a normalised slice whose peak passes 1.0
SILENCE_PEAK_DB = -70.0  # a whole input below this peak is "silent": nothing to convert
VOCODER_CONTEXT_FRAMES = 8  # left frames vocoded before a tail: measured -50 dB off at 8, exact at 12
HARMONICS = 9  # NSF source channels (fundamental + 8 overtones)
NOISE_SEED_SALT = 0x5EED  # keeps the vocoder's per-sample noise independent of the flow noise

Progress = Callable[[int, int], None]  # (slices done, slices total)


# --- the model voice -------------------------------------------------------------------------

class ModelVoice:
    """A `Voice` on a RIFT-SVC model: `backend` (DiT + vocoder) and `features` (F0, RMS, ContentVec,
    Whisper extraction on the mel grid).

    `streaming=True`: features come from a per-stream `FeatureCache` (incremental, Whisper unpadded);
    `encoder_context_s` is the left context the encoders see (None: the whole window, nothing reused);
    `dit_context_ms` is the left context the DiT samples before the frames that get vocoded (None: the
    whole window). Offline, the DiT always runs on the whole window.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, backend: "Backend", features: "FeatureExtractor", whisper_pad_30s: bool = True,
                 streaming: bool = False, encoder_context_s: float | None = ENCODER_CONTEXT_S,
                 dit_context_ms: float | None = DIT_CONTEXT_MS):
        if dit_context_ms is not None and dit_context_ms < 0:
            raise UserError(f"DiT context must be at least 0 ms, got {dit_context_ms:g}")
        self.backend = backend
        self.features = features
        self.whisper_pad_30s = whisper_pad_30s  # upstream pads every clip to 30 s (offline path only)
        self.speakers = list(backend.speakers)
        self.streaming = streaming
        self.encoder_context_s = encoder_context_s  # streaming: None = encoders on the whole window
        self.dit_context_ms = dit_context_ms  # streaming only
        self.cache = FeatureCache(features, encoder_context_s) if streaming else None
        self.last_ms: dict[str, float] = {}

    def for_streaming(self, encoder_context_s: float | None = ENCODER_CONTEXT_S,
                      dit_context_ms: float | None | EllipsisType = ...) -> "ModelVoice":
        """The streaming variant over the same backend and encoders, with a fresh feature cache;
        `dit_context_ms` defaults to this voice's (from `open_model(..., dit_context_ms=)`, else
        DIT_CONTEXT_MS)."""
        if dit_context_ms is ...:
            dit_context_ms = self.dit_context_ms
        return ModelVoice(self.backend, self.features, self.whisper_pad_30s, True, encoder_context_s,
                          dit_context_ms)

    def fork(self) -> "ModelVoice":
        """Same weights, own per-stream state (what the server gives each session)."""
        return ModelVoice(self.backend, self.features, self.whisper_pad_30s, self.streaming,
                          self.encoder_context_s, self.dit_context_ms)

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()
        reset = getattr(self.features, "reset", None)
        if reset is not None:
            reset()

    def speaker_index(self, name: str | None) -> int:
        if name is None:
            return self.backend.speakers[self.speakers[0]]
        if name not in self.backend.speakers:
            raise UserError(f"unknown speaker {name!r}; this model has: {', '.join(self.speakers)}")
        return self.backend.speakers[name]

    @torch.inference_mode()
    def convert(self, audio: np.ndarray, knobs: Knobs, start_sample: int = 0,
                tail: int | None = None) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        length = len(audio)
        need = length if tail is None else int(tail)
        if not 0 <= need <= length:
            raise ValueError(f"tail {tail} must be between 0 and the window length {length}")
        spk = self.speaker_index(knobs.speaker)  # before any work: a bad name fails fast
        if need == 0:
            return np.zeros(0, dtype=np.float32)
        n = -(-length // HOP_LENGTH)  # whole mel frames; the last one is zero-padded
        if self.cache is not None:
            cond, f0 = self._stream_conditioning(audio, start_sample, spk, knobs.pitch_shift)
        else:
            padded = np.pad(audio, (0, n * HOP_LENGTH - length))
            self.last_ms = {}
            cond, f0 = self._conditioning(padded, n, spk, knobs.pitch_shift)
        # vocode only the frames under the requested tail, plus the vocoder's left context
        first = max(0, (length - need) // HOP_LENGTH - VOCODER_CONTEXT_FRAMES)
        dit_first = self._dit_first(first)
        started = time.perf_counter()
        # [1, 128, n - dit_first] log-mel; noise by absolute frame, so any crop draws the same noise
        mel = self._sample(crop(cond, dit_first), knobs, start_sample // HOP_LENGTH + dit_first)
        self.last_ms["dit"] = (time.perf_counter() - started) * 1000.0
        started = time.perf_counter()
        out = self._vocode(mel[..., first - dit_first:], f0, first, start_sample, knobs.seed)
        begin = length - need - first * HOP_LENGTH
        self.last_ms["vocoder"] = (time.perf_counter() - started) * 1000.0
        return out[begin:begin + need]

    def _dit_first(self, first: int) -> int:
        """First window frame the DiT samples: `dit_context_ms` before the vocoded frames (streaming)."""
        if self.cache is None or self.dit_context_ms is None:
            return 0
        return max(0, first - int(round(self.dit_context_ms * SAMPLE_RATE / 1000.0 / HOP_LENGTH)))

    def _stream_conditioning(self, audio: np.ndarray, start_sample: int, spk: int, semitones: float):
        f0, rms, cvec, whisper = self.cache.window(audio, start_sample)
        self.last_ms = dict(self.cache.last_ms)
        device = self.backend.device
        f0 = shift_f0(f0, semitones).to(device)[None]  # shifted F0 feeds both the DiT and the vocoder
        cond = Conditioning(spk=torch.tensor([spk], device=device), f0=f0, rms=rms.to(device)[None],
                            cvec=cvec.to(device)[None], whisper=whisper.to(device)[None])
        return cond, f0

    def _conditioning(self, padded: np.ndarray, n: int, spk: int, semitones: float):
        """Every feature over the whole window, as upstream (the offline path)."""
        feats, device = self.features, self.backend.device
        row = lambda a: torch.as_tensor(a, dtype=torch.float32).to(device)[None]  # noqa: E731 - [1, n, ...]
        audio_16k = self._timed("resample", resample, padded, SAMPLE_RATE, ENCODER_SAMPLE_RATE)
        f0 = row(self._timed("f0", feats.f0, audio_16k, n, semitones))  # shifted: for DiT and vocoder
        cond = Conditioning(spk=torch.tensor([spk], device=device), f0=f0,
                            rms=row(self._timed("rms", feats.rms, padded)),
                            cvec=row(self._timed("contentvec", feats.content, audio_16k, n)),
                            whisper=row(self._timed("whisper", feats.whisper, audio_16k, n,
                                                    pad_to_30s=self.whisper_pad_30s)))
        return cond, f0

    def _timed(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        self.last_ms[name] = (time.perf_counter() - started) * 1000.0
        return out

    def _sample(self, cond: Conditioning, knobs: Knobs, start_frame: int) -> torch.Tensor:
        n = cond.f0.shape[1]
        noise = frame_noise(start_frame, n, knobs.seed)[None].to(self.backend.device)
        velocity = lambda x, t: self.backend.velocity_cfg(x, t, cond, knobs.cfg_strength)  # noqa: E731
        x = sample(velocity, noise, knobs.steps)
        return denormalize_mel(x).transpose(1, 2)

    def _vocode(self, mel: torch.Tensor, f0: torch.Tensor, first: int, start_sample: int,
                seed: int) -> np.ndarray:
        """Audio of frames first ... n-1. The harmonic phases start where vocoding the whole window
        would have them at frame `first`, and the noise is tied to absolute samples, so vocoding a
        tail gives the same samples as vocoding everything (up to the receptive field)."""
        device = self.backend.device
        f0_tail = f0[:, first:]
        cycles = (f0[:, :first].double() * HOP_LENGTH / SAMPLE_RATE).sum(dim=1, keepdim=True)
        harmonic = torch.arange(1, HARMONICS + 1, dtype=torch.float64, device=device)
        phase = ((cycles * harmonic) % 1.0 + base_phase(seed).to(device)) % 1.0
        n_samples = f0_tail.shape[1] * HOP_LENGTH
        noise = counter_normal(start_sample + first * HOP_LENGTH, n_samples, HARMONICS,
                               seed ^ NOISE_SEED_SALT)[None].to(device)
        audio = self.backend.vocode(mel, f0_tail, phase.float(), noise)
        return audio[0].float().cpu().numpy()


def crop(cond: Conditioning, first: int) -> Conditioning:
    """The conditioning from frame `first` on (the DiT's positions are relative: rotary + conv)."""
    if first == 0:
        return cond
    cut = lambda t: None if t is None else t[:, first:]  # noqa: E731
    return Conditioning(cond.spk, cut(cond.f0), cut(cond.rms), cut(cond.cvec), cut(cond.whisper),
                        cut(cond.mask))


def base_phase(seed: int) -> torch.Tensor:
    """Initial harmonic phases in cycles [1, 9], uniform as upstream (fundamental at 0), seeded."""
    phase = torch.rand(1, HARMONICS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    phase[:, 0] = 0.0
    return phase


# --- offline conversion --------------------------------------------------------------------

def peak_dbfs(audio: np.ndarray) -> float:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def check_output_path(path: str | Path) -> Path:
    """Refuse an output we could not write, before spending minutes on the conversion."""
    path = Path(path)
    if path.suffix.lstrip(".").upper() not in sf.available_formats():
        raise UserError(f"cannot write {path}: unknown audio format {path.suffix or '(no extension)'!r}; "
                        "use .wav, .flac or .ogg")
    # the output's folder may not exist yet (save_audio creates it): check the nearest that does
    existing = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path}: {existing if not path.exists() else path} is not writable")
    return path


def check_input_audio(audio: np.ndarray) -> np.ndarray:
    """Mono float32 audio with something in it; empty or silent input is a user error."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio [t], got shape {audio.shape}")
    if audio.size == 0:
        raise UserError("input is empty (0 samples): nothing to convert")
    peak = peak_dbfs(audio)
    if peak < SILENCE_PEAK_DB:
        raise UserError(f"input is silent (peak {peak:.0f} dBFS): nothing to convert")
    return audio


def _meter(sample_rate: int):
    import pyloudnorm

    return pyloudnorm.Meter(sample_rate, block_size=LOUDNESS_BLOCK_S)


def _loudness(meter, audio: np.ndarray, sample_rate: int) -> float | None:
    """Integrated loudness in LUFS, or None where it is undefined (too short, all gated)."""
    if len(audio) < LOUDNESS_BLOCK_S * sample_rate:
        return None
    value = float(meter.integrated_loudness(audio.astype(np.float64)))
    return value if math.isfinite(value) else None


def _to_loudness(audio: np.ndarray, loudness: float | None, target: float) -> np.ndarray:
    if loudness is None:
        return audio
    out = audio * 10 ** ((target - loudness) / 20)
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    return out * (PEAK_LIMIT / peak) if peak > 1.0 else out


def convert_offline(
    voice: Voice, audio: np.ndarray, knobs: Knobs, progress: Progress | None = None,
    target_lufs: float | None = TARGET_LUFS, restore_loudness: bool = False,
    crossfade_ms: float = CROSSFADE_MS,
) -> np.ndarray:
    """Convert a whole recording (mono float at `voice.sample_rate`); output has the same length.

    `target_lufs=None` keeps each slice's level (the DSP voice needs no loudness normalisation).
    """
    validate_knobs(knobs)
    audio = check_input_audio(audio)
    sr = voice.sample_rate
    pad = int(crossfade_ms * sr / 1000) // 2  # neighbours overlap by 2 * pad and crossfade there
    ranges = slice_at_silences(audio, sr)
    meter = _meter(sr) if target_lufs is not None else None
    pieces = []
    for i, (a, b) in enumerate(ranges):
        a, b = max(0, a - pad), min(len(audio), b + pad)
        piece = audio[a:b]
        loudness = _loudness(meter, piece, sr) if meter is not None else None
        if meter is not None:
            piece = _to_loudness(piece, loudness, target_lufs)
        voice.reset()  # every slice is a stream of its own
        out = np.asarray(voice.convert(piece, knobs, start_sample=a), dtype=np.float32)
        out = np.pad(out[: len(piece)], (0, max(0, len(piece) - len(out))))
        if restore_loudness and meter is not None and loudness is not None:
            out = _to_loudness(out, _loudness(meter, out, sr), loudness)
        pieces.append((a, out))
        if progress is not None:
            progress(i + 1, len(ranges))
    return join_with_crossfade(pieces, len(audio), 2 * pad)
