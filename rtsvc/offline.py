"""Offline conversion of whole recordings: upstream `infer.py`'s long-audio path, for any `Voice`.

As upstream's infer.py (c03fa59) by default: slice at silences (upstream's slicer and settings),
bring each slice to -18 LUFS (the loudness the models were trained at; peaks over 1.0 scaled to
0.99; the DSP voice keeps each slice's level), convert, give each converted slice back its input
loudness (`restore_loudness`, on by default as upstream V3), and join the slices with upstream's
fades (half-Hann in, linear out, no overlap) into exactly the input's length. `join="crossfade"` is
ours instead: slices extended by half the crossfade into their neighbours and crossfaded.
"""

import contextlib
import dataclasses
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from rtsvc.dsp.audio import HOP_LENGTH as HOP
from rtsvc.dsp.audio import read_audio_blocks
from rtsvc.dsp.denoise import denoise_clip
from rtsvc.dsp.limiter import soft_limit
from rtsvc.dsp.slicer import CROSSFADE_MS, FADE_MS, join_with_crossfade, join_with_fades, slice_at_silences
from rtsvc.dsp.slicer_v2 import slice_release_v2
from rtsvc.dsp.vad import speech_mask
from rtsvc.engine import StreamConfig, StreamingConverter
from rtsvc.errors import UserError
from rtsvc.settings import Knobs, RuntimeSettings, validate_knobs
from rtsvc.voice import Voice

TARGET_LUFS = -18.0  # upstream infer.py --target-loudness (the training data's loudness)
LOUDNESS_BLOCK_S = 0.1  # upstream meter block size; shorter slices are left as they are
PEAK_LIMIT = 0.99  # upstream: scale down a normalised slice whose peak passes 1.0
SILENCE_PEAK_DB = -70.0  # a whole input below this peak is "silent": nothing to convert
V2_RELEASE_CFG = 0.0  # ec67126 infer.py --cfg-strength default: the null (Whisper-dropped) velocity alone
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
    """Integrated loudness in LUFS, or None where it is undefined (too short, all gated: upstream
    fails or gives NaN there; we leave such a slice's level as it is). Measured on the samples as
    they are (float32 as upstream; pyloudnorm filters in the input's dtype)."""
    if len(audio) < LOUDNESS_BLOCK_S * sample_rate:
        return None
    value = float(meter.integrated_loudness(audio))
    return value if math.isfinite(value) else None


def _to_loudness(audio: np.ndarray, loudness: float | None, target: float) -> np.ndarray:
    """pyloudnorm.normalize.loudness (float64 gain times the samples), then upstream's peak rule:
    a result whose peak passes 1.0 is scaled to a 0.99 peak."""
    if loudness is None:
        return audio
    out = np.power(10.0, (target - loudness) / 20.0) * np.asarray(audio, dtype=np.float64)
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



UPSTREAM_SWITCH = {"true": True, "1": True, "yes": True, "on": True,
                   "false": False, "0": False, "no": False, "off": False}  # as upstream's click options


@dataclasses.dataclass(frozen=True)
class UpstreamOptions:
    """Upstream infer.py's options as `rtsvc convert` took them (None: not given)."""
    restore_loudness: bool | None = None  # None: the model family's infer.py default (`release_rules`)
    cvec_downsample_rate: int = 2
    batch_size: int = 1
    robust_f0: int = 0
    cfg_given: bool = False  # --cfg-strength was typed


def check_upstream_options(restore_loudness: str | None, cvec_downsample_rate: int, batch_size: int,
                           robust_f0: int, model_offline: bool, cfg_given: bool = False) -> UpstreamOptions:
    """Upstream infer.py's options as `convert` takes them, checked."""
    if restore_loudness is None:
        restore = None
    elif (restore := UPSTREAM_SWITCH.get(restore_loudness.strip().lower())) is None:
        raise UserError(f"--restore-loudness takes true or false, got {restore_loudness!r}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if batch_size != 1 and not model_offline:
        raise UserError("--batch-size applies to models converting offline (not the DSP voice or --stream)")
    if cvec_downsample_rate < 1:
        raise UserError(f"--cvec-downsample-rate must be at least 1, got {cvec_downsample_rate}")
    if cvec_downsample_rate != 2 and not model_offline:
        raise UserError("--cvec-downsample-rate applies to V3 models converting offline (not the DSP voice "
                        "or --stream)")
    if robust_f0 not in (0, 1, 2):
        raise UserError(f"--robust-f0 takes 0, 1 or 2, got {robust_f0}")
    if robust_f0 and not model_offline:
        raise UserError("--robust-f0 applies to models converting offline (not the DSP voice or --stream)")
    return UpstreamOptions(restore, cvec_downsample_rate, batch_size, robust_f0, cfg_given)


def release_rules(voice: Voice, knobs: Knobs, restore_loudness: bool | None,
                  cfg_given: bool) -> tuple[Knobs, bool, str]:
    """(knobs, restore_loudness, release) of the infer.py a model's family goes with, for what the
    user left unset: a V2 model follows the V2 release's ("v2", ec67126: its slicer, --restore-loudness
    off, --cfg-strength 0, i.e. Whisper dropped), everything else c03fa59's ("v3": restore on)."""
    if getattr(getattr(voice, "backend", None), "family", None) == "v2":
        knobs = knobs if cfg_given else dataclasses.replace(knobs, cfg_strength=V2_RELEASE_CFG)
        return knobs, bool(restore_loudness), "v2"
    return knobs, restore_loudness is not False, "v3"


def convert_file(
    voice: Voice, input_path: str | Path, output_path: str | Path, knobs: Knobs,
    progress: Progress | None = None, target_lufs: float | None = TARGET_LUFS, restore_loudness: bool = True,
    piece_s: float = PIECE_S, join: str = "fades", fade_ms: float = FADE_MS, limit: bool = True,
    release: str = "v3", upstream: UpstreamOptions | None = None,
) -> float:
    """Convert a file of any length into `output_path` piece by piece: about `piece_s` seconds
    (cut in a silence) are in memory at a time. The output is written to a temporary file beside
    it and renamed at the end, so a failure never leaves a half-written output. Returns seconds.
    `limit`: bend overshoot with the soft limiter (the DSP voice); off, the samples are written as
    upstream's infer.py writes them (a model voice's default: parity with upstream).

    `upstream` (what `rtsvc convert` took): `release_rules` decide restore_loudness, release and
    the V2 guidance from it instead of the arguments.

    Within a piece this is `convert_offline`; pieces are independent, as its slices are."""
    check_input_file(input_path)
    if upstream is not None:
        if upstream.robust_f0:
            voice.features.robust_f0 = upstream.robust_f0
        if upstream.cvec_downsample_rate != 2:
            if voice.backend.family != "v3":
                raise UserError("--cvec-downsample-rate applies to V3 models (the V2 release has no "
                                "content-degradation guidance)")
            voice.cvec_downsample_rate = upstream.cvec_downsample_rate
        knobs, restore_loudness, release = release_rules(voice, knobs, upstream.restore_loudness,
                                                        upstream.cfg_given)
    sr = voice.sample_rate
    total = sf.info(str(input_path)).duration
    piece = int(piece_s * sr)
    written = 0

    def convert(audio: np.ndarray) -> np.ndarray:
        if peak_dbfs(audio) < SILENCE_PEAK_DB:
            return np.zeros_like(audio)
        out = convert_offline(voice, audio, knobs, target_lufs=target_lufs,
                              restore_loudness=restore_loudness, join=join, fade_ms=fade_ms,
                              crossfade_ms=fade_ms, release=release,
                              batch_size=1 if upstream is None else upstream.batch_size)
        # the voice-activity gate: non-speech gives silence (phantom voice from breath, typing)
        return out * speech_mask(audio, sr, knobs.vad_threshold) if knobs.vad == "on" else out

    with _atomic_output(output_path, sr) as out:
        for audio in _pieces((block for _, block, _ in read_audio_blocks(input_path, sr)), sr, piece):
            converted = convert(audio)
            out.write(soft_limit(converted)[0] if limit else converted)  # limit: bend overshoot, not clip
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
    finishes: a failure (or SIGTERM, like Ctrl-C) never leaves a half-written output. The
    temporary name is new (created exclusively, random), so it is never an input nor a link to one."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f"{output_path.stem}.", suffix=f".partial{output_path.suffix}",
                                    dir=output_path.parent)
    except OSError as err:
        raise UserError(f"cannot write audio file {output_path}: {err}") from None
    os.close(fd)
    partial = Path(name)
    previous = _terminate_as_interrupt()
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
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt (as Ctrl-C does) so the partial file is removed; returns the
    handler to restore, or None off the main thread (where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


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


def _convert_group(voice: Voice, items: list[tuple[int, np.ndarray]], knobs: Knobs) -> list[np.ndarray]:
    """Each (place, slice) converted as a stream of its own; several at once as one padded batch."""
    if len(items) == 1:
        voice.reset()  # every slice is a stream of its own
        place, piece = items[0]
        return [np.asarray(voice.convert(piece, knobs, start_sample=place), dtype=np.float32)]
    from rtsvc.backends.torch_backend import TorchBackend
    from rtsvc.voices.batch import run_padded

    backend = getattr(voice, "backend", None)
    if getattr(voice, "streaming", True) or not isinstance(backend, TorchBackend) or backend.student:
        raise UserError("--batch-size above 1 needs a model checkpoint on the torch backend (not a bundle, "
                        "a distilled student, the DSP voice or --stream)")
    jobs = []
    for place, piece in items:
        voice.reset()
        jobs.append(voice.prepare(piece, knobs, start_sample=place))
    live = [k for k, job in enumerate(jobs) if job is not None]  # (None: shorter than one frame)
    outs = [np.zeros(len(piece), dtype=np.float32) for _, piece in items]
    for k, out in zip(live, run_padded(backend, [jobs[k] for k in live]) if live else [], strict=True):
        outs[k] = np.asarray(out, dtype=np.float32)
    return outs


JOINS = ("fades", "crossfade")
RELEASES = ("v3", "v2")  # whose infer.py convert_offline follows: c03fa59 (V3) or the V2 release (ec67126)


def slice_pieces(audio: np.ndarray, sample_rate: int, release: str = "v3") -> list[tuple[int, int, int]]:
    """(place, first, end) per slice: audio[first:end] is converted and its output goes to `place`
    (the V2 release places a slice at its first 10 ms frame, up to 40 ms before its first sample).
    Input with no slice (all below the threshold, or only zero-length cuts) is one piece, on purpose."""
    if release == "v2":
        pieces = [(p, a, b) for p, a, b in slice_release_v2(audio, sample_rate) if b > a]
    elif release == "v3":
        pieces = [(a, a, b) for a, b in slice_at_silences(audio, sample_rate)]
    else:
        raise ValueError(f"unknown release {release!r}: use {' or '.join(RELEASES)}")
    return pieces or [(0, 0, len(audio))]


def convert_offline(
    voice: Voice, audio: np.ndarray, knobs: Knobs, progress: Progress | None = None,
    target_lufs: float | None = TARGET_LUFS, restore_loudness: bool = True,
    crossfade_ms: float = CROSSFADE_MS, join: str = "fades", fade_ms: float = FADE_MS, release: str = "v3",
    batch_size: int = 1,
) -> np.ndarray:
    """Convert a whole recording (mono float at `voice.sample_rate`); output has the same length.

    `target_lufs=None` keeps each slice's level (the DSP voice needs no loudness normalisation).
    `join`: "fades" (upstream's: half-Hann fade-in, linear fade-out over `fade_ms`, no overlap) or
    "crossfade" (ours: slices overlap by `crossfade_ms` and crossfade). `release`: whose infer.py,
    "v3" (c03fa59's) or "v2" (the V2 release's: its slicer, `rtsvc.dsp.slicer_v2`, and the restored
    loudness measured on the vocoder's whole frames, before the slice's last L mod 512 silent samples).
    `batch_size` > 1 (upstream's --batch-size; a model voice on torch): that many slices of similar
    length per padded DiT batch (`rtsvc.voices.batch.run_padded`), each as it would be alone.
    """
    if join not in JOINS:
        raise UserError(f"unknown join {join!r}: use {' or '.join(JOINS)}")
    if fade_ms < 0 or crossfade_ms < 0:
        raise UserError("fade and crossfade durations must be at least 0 ms")
    validate_knobs(knobs)
    audio = check_input_audio(audio)
    sr = voice.sample_rate
    if knobs.denoise != "off":  # before slicing: the slicer then sees the denoised silences
        audio = denoise_clip(audio, sr, knobs.denoise)
    pad = int(crossfade_ms * sr / 1000) // 2 if join == "crossfade" else 0  # neighbours overlap by 2 * pad
    ranges = slice_pieces(audio, sr, release)
    meter = _meter(sr) if target_lufs is not None else None
    inputs = []  # (place, slice at the model's loudness, its own loudness)
    for place, a, b in ranges:
        if pad:  # ours: extended into the neighbours, placed where the audio came from
            place, a, b = max(0, a - pad), max(0, a - pad), min(len(audio), b + pad)
        piece = audio[a:b]
        loudness = _loudness(meter, piece, sr) if meter is not None else None
        if meter is not None:
            piece = _to_loudness(piece, loudness, target_lufs)
        inputs.append((place, np.asarray(piece, dtype=np.float32), loudness))
    outs: list = [None] * len(inputs)
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][1]))  # as upstream: similar lengths
    groups = [[i] for i in range(len(inputs))] if batch_size <= 1 else \
        [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    for group in groups:
        converted = _convert_group(voice, [inputs[i][:2] for i in group], knobs)
        for i, out in zip(group, converted, strict=True):
            place, piece, loudness = inputs[i]
            out = np.pad(out[: len(piece)], (0, max(0, len(piece) - len(out))))
            if restore_loudness and meter is not None and loudness is not None:
                heard = out[: len(out) // HOP * HOP] if release == "v2" else out  # V2: before the zero pad
                out = _to_loudness(out, _loudness(meter, heard, sr), loudness)
            outs[i] = (place, out)
        if progress is not None:
            progress(sum(o is not None for o in outs), len(inputs))
    pieces = outs
    if join == "crossfade":
        return join_with_crossfade(pieces, len(audio), 2 * pad)
    return join_with_fades(pieces, len(audio), int(fade_ms * sr / 1000))
