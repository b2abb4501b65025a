"""Every conditioning feature of a clip, on the mel frame grid (n = len(audio_44k) // 512 frames).

As upstream infer.py: mel and RMS from the 44.1 kHz audio; ContentVec and Whisper from the audio
resampled to 16 kHz as the family's infer.py does (V3: soxr, as librosa.resample; the V2 release:
torchaudio's default sinc, width 6), F0 from the sinc resampler upstream's RMVPE uses (width 128);
each encoder's frames resized onto the n mel frames; F0 through `f0_to_mel_frames` (fill, resample,
re-zero unvoiced). The per-feature methods take any window, so the streaming engine can compute them
on bounded windows.
"""

from dataclasses import dataclass, fields

import numpy as np
import torch

from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, HOP_LENGTH, SAMPLE_RATE, resample
from rtsvc.dsp.mel import log_mel_spectrogram, rms_per_frame
from rtsvc.dsp.sinc import sinc_resample
from rtsvc.features.f0 import F0Extractor, f0_to_mel_frames, make_f0_extractor, shift_f0
from rtsvc.features.frames import mel_frame_count
from rtsvc.features.robust_f0 import robust_f0
from rtsvc.models.families import family_named
from rtsvc.pretrained import PretrainedPaths


@dataclass
class Features:
    """All conditioning of one clip, n mel frames each, float32 tensors."""

    f0: torch.Tensor  # [n] Hz, 0 = unvoiced (pitch shift already applied)
    rms: torch.Tensor  # [n]
    cvec: torch.Tensor  # [n, 768]
    whisper: torch.Tensor | None  # [n, 1280]; None for V3 models (no Whisper)
    mel: torch.Tensor | None = None  # [n, 128] natural-log mel of the source

    @property
    def n_frames(self) -> int:
        return int(self.f0.shape[0])

    def to(self, device: str | torch.device) -> "Features":
        return Features(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                           for f in fields(self)})


class FeatureExtractor:
    """The loaded encoders + F0 extractor. `extract(audio_44k) -> Features`.

    Per model family (its record's `uses_whisper` and `content_resize`): V2 wants ContentVec and
    Whisper resized with "nearest" onto the mel grid; V3 wants ContentVec only, resized "linear"
    (align_corners); `whisper=None` then, and no Whisper is loaded or computed.
    """

    def __init__(self, contentvec, whisper, f0: F0Extractor, device: str | torch.device = "cpu",
                 content_resize: str = "nearest", encoder_sinc_width: int | None = None):
        self.contentvec = contentvec  # rtsvc.features.contentvec.ContentVec
        self.whisper_encoder = whisper  # rtsvc.features.whisper.WhisperEncoder, or None (V3)
        self.f0_extractor = f0
        self.device = torch.device(device)
        self.content_resize = content_resize  # how ContentVec frames go onto the mel grid
        self.robust_f0 = 0  # upstream's --robust-f0 level for whole clips (offline): 0, 1 or 2
        self.encoder_sinc_width = encoder_sinc_width  # the family's record: None = soxr

    @classmethod
    def from_pretrained(cls, paths: PretrainedPaths, f0: str = "rmvpe",
                        device: str | torch.device = "cpu", family: str = "v2") -> "FeatureExtractor":
        from rtsvc.features.contentvec import ContentVec

        record = family_named(family)
        uses_whisper, content_resize = record.uses_whisper, record.content_resize
        if paths.contentvec is None or (uses_whisper and paths.whisper is None):
            raise ValueError("resolve_pretrained(need=...) must include what the family needs")
        whisper = None
        if uses_whisper:
            from rtsvc.features.whisper import WhisperEncoder

            whisper = WhisperEncoder.load(paths.whisper, device)
        return cls(
            ContentVec.load(paths.contentvec, device),
            whisper,
            make_f0_extractor(f0, rmvpe_path=paths.rmvpe, device=device),
            device,
            content_resize,
            record.encoder_sinc_width,
        )

    # ------------------------------------------------------------ per feature, any window

    def encoder_16k(self, audio_44k: np.ndarray) -> np.ndarray:
        """What the encoders hear of a whole clip offline: 16 kHz by the family's resampler."""
        if self.encoder_sinc_width is None:
            return resample(audio_44k, SAMPLE_RATE, ENCODER_SAMPLE_RATE)
        # (torchaudio.functional.resample: the kernel in the float32 waveform's dtype)
        return sinc_resample(audio_44k, SAMPLE_RATE, ENCODER_SAMPLE_RATE, self.encoder_sinc_width,
                             float32_kernel=True)

    def f0(self, audio_16k: np.ndarray, n_frames: int, semitones: float = 0.0) -> torch.Tensor:
        hz = f0_to_mel_frames(self.f0_extractor(audio_16k), n_frames, dtype=np.float64)
        hz = shift_f0(hz, semitones).astype(np.float32)  # shifted, then rounded, as upstream
        return torch.from_numpy(hz).to(self.device)

    def f0_clip(self, audio_44k: np.ndarray, f0_16k: np.ndarray, n_frames: int,
                semitones: float = 0.0) -> torch.Tensor:
        """Offline F0 of a whole clip (`f0` of its F0 audio `f0_16k`), checked by WORLD and Praat as
        upstream's `--robust-f0` when `robust_f0` is 1 or 2 (then `audio_44k` is what they hear)."""
        if not self.robust_f0:
            return self.f0(f0_16k, n_frames, semitones)
        hz = f0_to_mel_frames(self.f0_extractor(f0_16k), n_frames, dtype=np.float64)
        rms = self.rms(audio_44k).cpu().numpy() if self.robust_f0 == 1 else None
        hz = robust_f0(self.robust_f0, hz, np.asarray(audio_44k), SAMPLE_RATE, HOP_LENGTH, rms)
        return torch.from_numpy(shift_f0(hz, semitones).astype(np.float32)).to(self.device)

    def content(self, audio_16k: np.ndarray, n_frames: int) -> torch.Tensor:
        return self.contentvec.encode(audio_16k, n_frames, self.content_resize)

    def whisper(self, audio_16k: np.ndarray, n_frames: int, pad_to_30s: bool = True,
                position_offset: int = 0) -> torch.Tensor:
        """`position_offset` (Whisper frames, 50/s; short windows only): where the window sat in its clip."""
        return self.whisper_encoder.encode(audio_16k, n_frames, pad_to_30s=pad_to_30s,
                                           position_offset=position_offset)

    def rms(self, audio_44k: np.ndarray) -> torch.Tensor:
        return rms_per_frame(audio_44k)[0].to(self.device)

    def mel(self, audio_44k: np.ndarray) -> torch.Tensor:
        return log_mel_spectrogram(audio_44k)[0].transpose(0, 1).to(self.device)

    # ------------------------------------------------------------ whole clip

    def extract(self, audio_44k: np.ndarray, semitones: float = 0.0, with_mel: bool = True) -> Features:
        """Features of a 44.1 kHz mono clip on its len // 512 mel frames."""
        audio_44k = np.asarray(audio_44k, dtype=np.float32).reshape(-1)
        n = mel_frame_count(len(audio_44k))
        if n == 0:
            raise ValueError(f"audio shorter than one mel frame ({HOP_LENGTH} samples)")
        audio_16k = self.encoder_16k(audio_44k)
        f0_16k = sinc_resample(audio_44k, SAMPLE_RATE, ENCODER_SAMPLE_RATE)  # what upstream's RMVPE hears
        return Features(
            f0=self.f0(f0_16k, n, semitones),
            rms=self.rms(audio_44k),
            cvec=self.content(audio_16k, n),
            whisper=self.whisper(audio_16k, n) if self.whisper_encoder is not None else None,
            mel=self.mel(audio_44k) if with_mel else None,
        )

