"""Audio I/O, resampling and the framing constants shared by the mel, the vocoder and the DiT."""

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from rtsvc.errors import UserError

SAMPLE_RATE = 44100  # the model's audio rate
HOP_LENGTH = 512  # samples per mel frame (86.13 frames/s)
N_FFT = 2048
WIN_LENGTH = 2048
N_MELS = 128
FMIN = 40.0
FMAX = 16000.0
ENCODER_SAMPLE_RATE = 16000  # ContentVec, Whisper and RMVPE take 16 kHz


MIN_FILE_RATE, MAX_FILE_RATE = 4000, 384000  # audio files outside this are refused (corrupt headers)
_NATIVE_STDERR = threading.Lock()


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Discard what C libraries print on file descriptor 2 meanwhile: libsndfile's MP3 decoder
    (mpg123) prints "Note: Illegal Audio-MPEG-Header ..." for files that are not audio, before our
    one-line message. One thread at a time, so the real stderr is always the one put back."""
    with _NATIVE_STDERR:
        saved = os.dup(2)
        try:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def open_audio(path: str | Path) -> sf.SoundFile:
    """Open an audio file for reading (soundfile), or UserError in one line: missing, not a regular
    file (a FIFO or device is never read), not readable audio, or a sample rate outside
    MIN_FILE_RATE..MAX_FILE_RATE (a header claiming 1 Hz would make a 44.1 kHz output 44,100 times
    longer than the file's samples; one claiming 1 GHz, an empty one)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"audio file not found: {path}")
    if not path.is_file():
        raise UserError(f"cannot read audio file {path}: not a regular file (a folder, pipe or device)")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read audio file {path}: permission denied")
    try:
        with _native_stderr_silenced():
            f = sf.SoundFile(str(path))
    except Exception:  # noqa: BLE001 - soundfile raises several types, and its text blames the path
        raise UserError(f"cannot read audio file {path}: not readable audio (unknown, corrupt or mislabelled "
                        "format; wav, flac, ogg and mp3 are read)") from None
    if not MIN_FILE_RATE <= f.samplerate <= MAX_FILE_RATE:
        f.close()
        raise UserError(f"cannot read audio file {path}: its header claims a sample rate of {f.samplerate} "
                        f"Hz, outside {MIN_FILE_RATE // 1000}-{MAX_FILE_RATE // 1000} kHz (a corrupt or "
                        "forged file)")
    return f


def load_audio(path: str | Path, sample_rate: int | None = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """Read any soundfile-supported file as mono float32, resampled to `sample_rate` if given."""
    with open_audio(path) as f:
        try:
            audio, sr = f.read(dtype="float32", always_2d=True), f.samplerate
        except Exception as err:  # noqa: BLE001 - soundfile raises several types for bad files
            raise UserError(f"cannot read audio file {path}: {err}") from None
    audio = audio.mean(axis=1)
    if audio.size == 0:
        raise UserError(f"audio file is empty: {path}")
    if sample_rate is not None and sr != sample_rate:
        audio = resample(audio, sr, sample_rate)
        sr = sample_rate
    return np.ascontiguousarray(audio, dtype=np.float32), sr


def read_audio_blocks(path: str | Path, sample_rate: int | None = SAMPLE_RATE,
                      block_s: float = 10.0) -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
    """A file as mono float32 blocks of about `block_s` seconds, resampled on the way (memory
    bounded by the block, whatever the file's length). Yields (block as read, block resampled to
    `sample_rate`, start in seconds): callers can check the file's own samples."""
    path = Path(path)
    with open_audio(path) as f:
        resampler = StreamResampler(f.samplerate, sample_rate or f.samplerate)
        block, start = max(1, int(f.samplerate * block_s)), 0
        while True:
            try:
                data = f.read(block, dtype="float32", always_2d=True)
            except Exception as err:
                raise UserError(f"cannot read audio file {path}: {err}") from None
            last = data.shape[0] < block
            raw = data.mean(axis=1)
            yield raw, resampler.process(raw, last=last), start / f.samplerate
            start += data.shape[0]
            if last:
                return


def save_audio(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float audio; the format follows the file extension (wav, flac, ogg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sf.write(str(path), np.clip(audio, -1.0, 1.0).astype(np.float32), sample_rate)
    except Exception as err:
        raise UserError(f"cannot write audio file {path}: {err}") from None


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Whole-signal resampling (soxr high quality)."""
    if src_rate == dst_rate:
        return audio.astype(np.float32, copy=False)
    return soxr.resample(audio.astype(np.float32), src_rate, dst_rate, quality="HQ").astype(np.float32)


class StreamResampler:
    """Block-by-block resampling with state, for live audio and websocket clients.

    soxr keeps its filter history between calls, so consecutive blocks join without clicks.
    Output length per call varies by a sample or so; the total follows the rate ratio.
    """

    def __init__(self, src_rate: int, dst_rate: int):
        self.src_rate = src_rate
        self.dst_rate = dst_rate
        self._stream = None if src_rate == dst_rate else soxr.ResampleStream(
            src_rate, dst_rate, 1, dtype="float32", quality="HQ"
        )

    def process(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        block = np.asarray(block, dtype=np.float32)
        if self._stream is None:
            return block
        return self._stream.resample_chunk(block, last=last)

    def reset(self) -> None:
        self.__init__(self.src_rate, self.dst_rate)


def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def rms_db(block: np.ndarray) -> float:
    """Level of a block in dBFS (-inf for digital silence is clamped to -120)."""
    power = float(np.mean(np.square(block, dtype=np.float64))) if block.size else 0.0
    return 10.0 * np.log10(max(power, 1e-12))
