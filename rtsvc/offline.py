"""Offline conversion of whole recordings: upstream `infer.py`'s long-audio path, for any `Voice`.

Slice at silences, bring each slice to -18 LUFS (the loudness the models were trained at; the DSP
voice keeps each slice's level), convert, optionally restore the slice's own loudness, and join the
slices with short crossfades into exactly the input's length.
"""

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from rtsvc.dsp.audio import read_audio_blocks
from rtsvc.dsp.denoise import denoise_clip
from rtsvc.dsp.limiter import soft_limit
from rtsvc.dsp.slicer import CROSSFADE_MS, join_with_crossfade, slice_at_silences
from rtsvc.engine import StreamConfig, StreamingConverter
from rtsvc.errors import UserError
from rtsvc.settings import Knobs, RuntimeSettings, validate_knobs
from rtsvc.voice import Voice

TARGET_LUFS = -18.0  # upstream infer.py --target-loudness (the training data's loudness)
LOUDNESS_BLOCK_S = 0.1  # upstream meter block size; shorter slices are left as they are
PEAK_LIMIT = 0.99  # upstream: scale down a normalised slice whose peak passes 1.0
SILENCE_PEAK_DB = -70.0  # a whole input below this peak is "silent": nothing to convert
PIECE_S = 30.0  # files are converted about this much at a time (cut in a silence): bounded memory

Progress = Callable[[int, int], None]  # (slices done, slices total)


def peak_dbfs(audio: np.ndarray) -> float:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def check_output_path(path: str | Path, input_path: str | Path | None = None) -> Path:
    """Refuse an output we could not write (or that is the input), before spending minutes on the
    conversion."""
    path = Path(path)
    if input_path is not None and path.exists() and Path(input_path).exists() and \
            os.path.samefile(path, input_path):
        raise UserError(f"refusing to overwrite the input {input_path} with the output: choose another "
                        "output file")
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
    bad = int(audio.size - np.count_nonzero(np.isfinite(audio)))
    if bad:
        raise UserError(f"input has {bad} non-finite samples (NaN or infinity): the file is corrupt")
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


def check_input_file(path: str | Path) -> None:
    """Read a file once, block by block (bounded memory), before any model loads: refuse it if it
    is empty, has non-finite samples or is silent (UserError, one line)."""
    peak, samples = 0.0, 0
    for raw, _, start in read_audio_blocks(path, None):
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if bad:
            raise UserError(f"input has {bad} non-finite samples (NaN or infinity) in the block at "
                            f"{start:.1f} s: the file is corrupt")
        samples += raw.size
        peak = max(peak, float(np.max(np.abs(raw), initial=0.0)))
    if samples == 0:
        raise UserError("input is empty (0 samples): nothing to convert")
    level = peak_dbfs(np.array([peak]))
    if level < SILENCE_PEAK_DB:
        raise UserError(f"input is silent (peak {level:.0f} dBFS): nothing to convert")


def _cut_point(audio: np.ndarray, sample_rate: int, target: int) -> int:
    """Where a piece of a long input should end, near `target` samples: the middle of the silence
    gap nearest to it, so neighbouring pieces meet where the output is silent anyway."""
    ranges = slice_at_silences(audio, sample_rate)
    gaps = [(end + begin) // 2 for (_, end), (begin, _) in zip(ranges, ranges[1:], strict=False)]
    gaps = [g for g in gaps if target // 2 <= g < len(audio)]
    return min(gaps, key=lambda g: abs(g - target)) if gaps else target


def convert_file(
    voice: Voice, input_path: str | Path, output_path: str | Path, knobs: Knobs,
    progress: Progress | None = None, target_lufs: float | None = TARGET_LUFS, restore_loudness: bool = False,
    piece_s: float = PIECE_S,
) -> float:
    """Convert a file of any length into `output_path` piece by piece: about `piece_s` seconds
    (cut in a silence) are in memory at a time. The output is written to a temporary file beside
    it and renamed at the end, so a failure never leaves a half-written output. Returns seconds.

    Within a piece this is `convert_offline`; pieces are independent, as its slices are."""
    check_input_file(input_path)
    sr = voice.sample_rate
    total = sf.info(str(input_path)).duration
    piece = int(piece_s * sr)
    written = 0

    def convert(audio: np.ndarray) -> np.ndarray:
        if peak_dbfs(audio) < SILENCE_PEAK_DB:
            return np.zeros_like(audio)
        return convert_offline(voice, audio, knobs, target_lufs=target_lufs,
                               restore_loudness=restore_loudness)

    with _atomic_output(output_path, sr) as out:
        for audio in _pieces((block for _, block, _ in read_audio_blocks(input_path, sr)), sr, piece):
            out.write(soft_limit(convert(audio))[0])  # bends overshoot instead of clipping
            written += len(audio)
            if progress is not None:
                progress(min(int(written / sr), int(total)), int(total))
    return written / sr


def stream_file(voice: Voice, input_path: str | Path, output_path: str | Path, knobs: Knobs | RuntimeSettings,
                config: StreamConfig | None = None, progress: Progress | None = None,
                read_s: float = 10.0) -> float:
    """`rtsvc convert --stream`: a file of any length through the streaming engine as live and
    serve would hear it, `read_s` seconds in memory at a time; the output is aligned with the input
    (the engine's latency removed) and as long, the same samples `engine.convert_stream` gives for
    the whole clip. Written atomically like `convert_file`. Returns seconds."""
    check_input_file(input_path)
    sr = voice.sample_rate
    total = sf.info(str(input_path)).duration
    settings = knobs if isinstance(knobs, RuntimeSettings) else RuntimeSettings(knobs)
    engine = StreamingConverter(voice, settings, config)
    skip, taken, written = engine.latency_samples, 0, 0  # output samples still to drop; input samples read
    with _atomic_output(output_path, sr) as out:
        def emit(audio: np.ndarray, limit: int) -> None:
            nonlocal skip, written
            cut = min(skip, len(audio))
            skip -= cut
            audio = audio[cut:][:max(0, limit - written)]
            out.write(soft_limit(audio)[0])
            written += len(audio)

        for _, block, _ in read_audio_blocks(input_path, sr, read_s):
            taken += len(block)
            emit(engine.process(block), taken)
            if progress is not None:
                progress(min(int(taken / sr), int(total)), int(total))
        emit(engine.flush(), taken)  # what the engine held back (its latency)
    return written / sr


@contextlib.contextmanager
def _atomic_output(output_path: str | Path, sample_rate: int) -> Iterator[sf.SoundFile]:
    """A mono float file written beside `output_path` and renamed onto it only when the body
    finishes: a failure never leaves a half-written output."""
    output_path = Path(output_path)
    partial = output_path.with_name(f".{output_path.stem}.partial{output_path.suffix}")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            out = sf.SoundFile(str(partial), "w", sample_rate, 1)
        except (sf.SoundFileError, OSError) as err:
            raise UserError(f"cannot write audio file {output_path}: {err}") from None
        with out:
            yield out
        os.replace(partial, output_path)
    finally:
        partial.unlink(missing_ok=True)  # (gone after the rename) a failure leaves no partial file


def _pieces(blocks: Iterable[np.ndarray], sample_rate: int, piece: int):
    """Regroup a stream of blocks into pieces of about `piece` samples, each ending in a silence."""
    buffer = np.zeros(0, np.float32)
    for block in blocks:
        buffer = np.concatenate([buffer, block])
        while len(buffer) >= 2 * piece:  # enough to choose a cut between piece/2 and 2 * piece
            cut = _cut_point(buffer[: 2 * piece], sample_rate, piece)
            yield buffer[:cut]
            buffer = buffer[cut:]
    if len(buffer):
        yield buffer


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
    if knobs.denoise != "off":  # before slicing: the slicer then sees the denoised silences
        audio = denoise_clip(audio, sr, knobs.denoise)
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
