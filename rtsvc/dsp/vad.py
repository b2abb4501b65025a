"""Voice-activity detection for the engine's gate (the `vad` knob): Silero VAD on ONNX Runtime.

The model is the one the `silero-vad` wheel ships (silero_vad/data/silero_vad.onnx, MIT); it is run
here on onnxruntime with numpy, so the package's own Python code (and torch) is never imported.
It scores 32 ms frames (512 samples at 16 kHz, with the previous 64 samples as context and a
recurrent state) with a speech probability. Measured against webrtcvad in docs/benchmarks.md
("Voice-activity gate").

`StreamVad` follows a stream at the engine's rate and answers "was there speech in the last N
samples?". It never delays the audio: a decision uses the frames complete so far, so the last
(up to) 32 ms of a block are judged with the next block; the `HANGOVER_MS` before the asked region
count too, so word ends and short pauses are not cut.
"""

import importlib.util
from collections import deque
from pathlib import Path

import numpy as np

from rtsvc.dsp.audio import StreamResampler
from rtsvc.errors import UserError

VAD_RATE = 16000
FRAME = 512  # samples per scored frame at 16 kHz (32 ms): the model's only frame size at this rate
CONTEXT = 64  # samples of the previous frame the model sees before each frame
HANGOVER_MS = 200.0  # speech this recent keeps the gate open (word ends, short pauses)
HISTORY_FRAMES = 256  # scored frames kept (8 s): more than any block + hangover


def silero_model_path() -> Path:
    """The ONNX model inside the installed `silero-vad` wheel (found without importing the package,
    which would import torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--vad on needs the silero-vad package (pip install silero-vad)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise UserError(f"the silero-vad package has no model at {path}; reinstall it "
                        "(pip install silero-vad)")
    return path


class SileroVad:
    """Speech probability per 32 ms frame of a 16 kHz stream (stateful, one stream)."""

    def __init__(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1  # a tiny model: one core is plenty
        self._session = ort.InferenceSession(str(silero_model_path()), sess_options=options,
                                             providers=["CPUExecutionProvider"])
        self._rate = np.array(VAD_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, CONTEXT), dtype=np.float32)

    def frame(self, samples: np.ndarray) -> float:
        """The speech probability (0-1) of the next FRAME samples."""
        x = np.concatenate((self._context, samples.reshape(1, FRAME).astype(np.float32)), axis=1)
        prob, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._rate})
        self._context = x[:, -CONTEXT:]
        return float(prob.reshape(-1)[0])


class StreamVad:
    """Silero VAD over a stream at `sample_rate`; `feed` each block, then ask `speech_prob`."""

    def __init__(self, sample_rate: int, hangover_ms: float = HANGOVER_MS):
        self.sample_rate = int(sample_rate)
        self.hangover = int(round(hangover_ms * self.sample_rate / 1000))
        self._model = SileroVad()
        self.reset()

    def reset(self) -> None:
        self._model.reset()
        self._resampler = StreamResampler(self.sample_rate, VAD_RATE)
        self._pending = np.zeros(0, dtype=np.float32)
        self._frames_done = 0  # 16 kHz frames scored since the stream began
        self._fed = 0  # samples at `sample_rate` fed since the stream began
        self._probs: deque[tuple[int, float]] = deque(maxlen=HISTORY_FRAMES)  # (end sample, probability)

    def feed(self, samples: np.ndarray) -> None:
        """Score every frame that `samples` completes."""
        self._fed += samples.shape[0]
        resampled = self._resampler.process(samples)
        self._pending = np.concatenate((self._pending, resampled)) if self._pending.size else resampled
        while self._pending.shape[0] >= FRAME:
            prob = self._model.frame(self._pending[:FRAME])
            self._pending = self._pending[FRAME:]
            self._frames_done += 1
            end = self._frames_done * FRAME * self.sample_rate // VAD_RATE  # in the stream's samples
            self._probs.append((end, prob))

    def speech_prob(self, last: int) -> float:
        """The highest speech probability of the frames that overlap the last `last` samples fed or
        the hangover before them (0 when none is scored yet)."""
        start = self._fed - last - self.hangover
        frame_len = FRAME * self.sample_rate // VAD_RATE
        return max((p for end, p in self._probs if end > start and end - frame_len < self._fed), default=0.0)


def speech_mask(audio: np.ndarray, sample_rate: int, threshold: float, hangover_ms: float = HANGOVER_MS,
                ramp_ms: float = 10.0) -> np.ndarray:
    """A whole clip's gain mask (offline `convert`): 1 where a frame scored at least `threshold` or
    lies within `hangover_ms` of one (both sides: offline, a word's onset need not be cut), 0
    elsewhere, with `ramp_ms` fades so the cuts do not click."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    resampled = StreamResampler(sample_rate, VAD_RATE).process(audio, last=True)
    model, scale = SileroVad(), sample_rate / VAD_RATE
    mask = np.zeros(audio.shape[0], dtype=np.float32)
    pad = int(round(hangover_ms * sample_rate / 1000))
    for begin in range(0, resampled.shape[0], FRAME):
        frame = resampled[begin: begin + FRAME]
        if model.frame(np.pad(frame, (0, FRAME - frame.shape[0]))) >= threshold:
            mask[max(0, int(begin * scale) - pad): int((begin + FRAME) * scale) + pad] = 1.0
    ramp = max(1, int(ramp_ms * sample_rate / 1000))
    return np.convolve(mask, np.ones(ramp, np.float32) / ramp, mode="same").astype(np.float32)
