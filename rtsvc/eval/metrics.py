"""The scores of `rtsvc eval`, each a plain function of audio (44.1 kHz mono float unless said).

- `f0_accuracy`: cents error of the output's F0 against the input's F0 + shift, over frames voiced
  in both (the median of |error|: a tracker's octave slips on a few frames would swamp a mean;
  those show in `gross`, the share of frames off by more than 50 cents), and the share of frames
  whose voicing agrees (rtsvc's own F0 extractors).
- `SpeakerEncoder` / `cosine`: Resemblyzer's d-vector (GE2E, weights in its wheel), cosine
  similarity to the mean embedding of the target's reference clips. Trained on read speech
  (LibriSpeech, VoxCeleb): weaker on singing, whispering and very high or low pitch.
- `Dnsmos`: Microsoft's DNSMOS P.835 (speechmos' ONNX models, in its wheel): a non-intrusive
  1-5 estimate of overall quality (OVRL), speech signal (SIG) and background (BAK). Trained on noisy
  and enhanced speech, not on singing nor on converted voices: a guide, not a listening test.
- `log_spectral_distance` (rtsvc.bench.blocks) and `mel_l1`: distance to the reference
  configuration's output of the same clip, after matching its level (RMS).
"""

from dataclasses import dataclass

import numpy as np

from rtsvc.bench.blocks import log_spectral_distance
from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, SAMPLE_RATE, resample

__all__ = ["log_spectral_distance", "mel_l1", "f0_accuracy", "F0Accuracy", "SpeakerEncoder", "cosine",
           "Dnsmos", "level_matched"]


def level_matched(audio: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`audio` scaled to the RMS of `reference` (levels differ by design: offline slices are brought
    to -18 LUFS, a live stream is not; distances should measure the sound, not the gain)."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    ref = float(np.sqrt(np.mean(np.square(reference, dtype=np.float64))))
    return audio * (ref / rms) if rms > 0 else audio


def mel_l1(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of the two natural-log mel spectrograms (the models' own 128-band
    mel at 44.1 kHz), over the frames both have."""
    from rtsvc.dsp.mel import log_mel_spectrogram

    ma, mb = log_mel_spectrogram(a)[0].numpy(), log_mel_spectrogram(b)[0].numpy()
    n = min(ma.shape[-1], mb.shape[-1])
    return float(np.mean(np.abs(ma[:, :n] - mb[:, :n])))


@dataclass(frozen=True)
class F0Accuracy:
    cents: float  # median |cents| over frames voiced in both (NaN when there are none)
    gross: float  # share of those frames more than 50 cents off (a wrong note)
    voicing: float  # share of all frames where input and output agree on voiced / unvoiced
    frames: int  # frames voiced in both


def f0_accuracy(source_f0: np.ndarray, output_f0: np.ndarray, shift: float = 0.0) -> F0Accuracy:
    """Compare two F0 tracks on the same frame grid (0 = unvoiced); `shift` in semitones."""
    n = min(len(source_f0), len(output_f0))
    src, out = np.asarray(source_f0[:n], np.float64), np.asarray(output_f0[:n], np.float64)
    vs, vo = src > 0, out > 0
    both = vs & vo
    voicing = float(np.mean(vs == vo)) if n else float("nan")
    if not both.any():
        return F0Accuracy(float("nan"), float("nan"), voicing, 0)
    cents = np.abs(1200.0 * np.log2(out[both] / (src[both] * 2.0 ** (shift / 12.0))))
    return F0Accuracy(float(np.median(cents)), float(np.mean(cents > 50.0)), voicing, int(both.sum()))


def track_f0(audio: np.ndarray, extractor) -> np.ndarray:
    """F0 (Hz, 0 = unvoiced, 100 frames/s) of 44.1 kHz audio with an rtsvc `F0Extractor`."""
    return extractor(resample(audio, SAMPLE_RATE, ENCODER_SAMPLE_RATE))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class SpeakerEncoder:
    """Resemblyzer's VoiceEncoder (weights in the wheel; no download). `embed(audio_44k)` -> a unit
    256-d vector; `target(clips)` -> the unit mean of their embeddings."""

    def __init__(self):
        from rtsvc.errors import UserError

        try:
            from resemblyzer import VoiceEncoder
        except ImportError as err:
            raise UserError(f"speaker similarity needs Resemblyzer ({err}): pip install resemblyzer"
                            ) from None
        self._encoder = VoiceEncoder("cpu", verbose=False)

    def embed(self, audio: np.ndarray) -> np.ndarray:
        from resemblyzer import preprocess_wav
        from resemblyzer.hparams import sampling_rate

        wav = preprocess_wav(resample(np.asarray(audio, np.float32), SAMPLE_RATE, sampling_rate))
        if len(wav) == 0:  # the VAD found no speech at all
            return np.zeros(256, np.float32)
        return self._encoder.embed_utterance(wav)

    def target(self, clips: list[np.ndarray]) -> np.ndarray:
        mean = np.mean([self.embed(c) for c in clips], axis=0)
        return mean / (np.linalg.norm(mean) + 1e-12)


class Dnsmos:
    """DNSMOS P.835 from speechmos (its ONNX models ship in its wheel; nothing is fetched).
    `__call__(audio_44k)` -> {"ovrl", "sig", "bak"} (1-5, higher is better). Clips under 9 s are
    repeated to 9 s, as speechmos does."""

    def __init__(self):
        from rtsvc.errors import UserError

        try:
            from speechmos import dnsmos
        except ImportError as err:
            raise UserError(f"the quality score needs speechmos ({err}): pip install speechmos") from None
        import os

        models = os.path.join(os.path.dirname(os.path.abspath(dnsmos.__file__)), "dnsmos_models")
        self._model = dnsmos.DNSMOS(os.path.join(models, "sig_bak_ovr.onnx"),
                                    os.path.join(models, "model_v8.onnx"))

    def __call__(self, audio: np.ndarray) -> dict[str, float]:
        wav = np.clip(resample(np.asarray(audio, np.float32), SAMPLE_RATE, ENCODER_SAMPLE_RATE), -1.0, 1.0)
        if not np.any(wav):
            return {"ovrl": float("nan"), "sig": float("nan"), "bak": float("nan")}
        scores = self._model(wav, ENCODER_SAMPLE_RATE, False)
        return {"ovrl": float(scores["ovrl_mos"]), "sig": float(scores["sig_mos"]),
                "bak": float(scores["bak_mos"])}
