"""`rtsvc prepare DIR`: turn DIR/SPEAKER/*.wav into cached training clips with all their features.

Per source file: read (any soundfile format) as mono 44.1 kHz, loudness-normalise to -18 LUFS
(pyloudnorm, BS.1770; peaks kept under 0.99 as upstream), slice at silences
(`rtsvc.dsp.slicer.slice_at_silences`, pieces at most 25 s so Whisper's 30 s window holds them), drop
pieces shorter than `MIN_CLIP_S`, then extract log-mel, F0, RMS, ContentVec and Whisper on the mel
grid and save one `.pt` per clip:

    DIR/.rtsvc-cache/SPEAKER/<file name>-<k>.pt   {"mel": [n, 128] log-mel, "f0": [n] Hz,
                                                   "rms": [n], "cvec": [n, 768] fp16,
                                                   "whisper": [n, 1280] fp16}
    DIR/.rtsvc-cache/SPEAKER/<file name>.json     which clips a source file gave (resume record)
    (<file name>: the path inside SPEAKER/, "%" and "/" written %25 and %2F: one name per source)
    DIR/.rtsvc-cache/metadata.json                speakers, clips (frames, split), settings

A source whose record exists with the same size, mtime and settings is skipped, so an interrupted
or extended preparation only does the new work. Unreadable, silent or too short files are
reported and skipped; they never stop the run.
"""

import json
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyloudnorm
import torch
from rtsvc.training.pitch_stats import dataset_pitch_stats

from rtsvc.dsp.audio import HOP_LENGTH, N_MELS, SAMPLE_RATE, load_audio
from rtsvc.dsp.slicer import TRAINING_KEEP_RANGE_DB, TRAINING_MAX_SIL_KEPT_MS, slice_at_silences
from rtsvc.errors import UserError

CACHE_DIR = ".rtsvc-cache"
METADATA = "metadata.json"
FORMAT_VERSION = 1
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au")
TARGET_LUFS = -18.0  # upstream resample_normalize_audios.py
HEADROOM = 0.99  # peak limit after loudness normalisation (upstream)
SILENCE_LUFS = -70.0  # BS.1770's absolute gate: quieter than this counts as silence
MIN_CLIP_S = 1.0  # shorter pieces teach little and mostly hold breaths / clicks
MAX_CLIP_S = 25.0  # Whisper sees 30 s; the slicer splits longer pieces
VAL_PER_SPEAKER = 1  # held-out clips per speaker (upstream stratified split), if it has >= 3
SPLIT_SEED = 42
# Upstream RIFT-SVC's README names no minimum; common SVC fine-tuning practice (RVC's training tips
# count 10-20 minutes) is ~10 minutes of clean audio per voice, and a few minutes is too little.
FEW_MINUTES = 5.0  # below this, `rtsvc prepare` warns
ENOUGH_MINUTES = 10.0  # what the warning recommends

FeatureFn = Callable[[np.ndarray], dict[str, torch.Tensor]]


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class PrepareResult:
    root: str
    metadata_path: str
    speakers: dict[str, dict] = field(default_factory=dict)  # name -> {clips, seconds, sources}
    clips: int = 0
    frames: int = 0
    processed: int = 0  # source files worked on in this run
    reused: int = 0  # source files whose cache was already complete
    skipped: list[Skipped] = field(default_factory=list)


def too_little_audio(result: PrepareResult, minimum_min: float = FEW_MINUTES) -> list[str]:
    """One warning per speaker with less than `minimum_min` minutes of usable clips."""
    return [f"speaker {name} has only {info['seconds'] / 60:.1f} min of usable audio; fine-tuning wants "
            f"about {ENOUGH_MINUTES:g} min or more of clean recordings (upstream RIFT-SVC names no minimum)"
            for name, info in sorted(result.speakers.items()) if info["seconds"] < 60 * minimum_min]


# --- audio preparation --------------------------------------------------------------------------

def normalize_loudness(audio: np.ndarray, sample_rate: int = SAMPLE_RATE,
                       target_lufs: float = TARGET_LUFS) -> tuple[np.ndarray, float]:
    """Gain to `target_lufs` integrated loudness; returns (audio, measured LUFS before).

    Raises ValueError for non-finite samples, silence (loudness below the -70 LUFS gate) or audio
    shorter than BS.1770's 400 ms block."""
    bad = int(audio.size - np.count_nonzero(np.isfinite(audio)))
    if bad:
        raise ValueError(f"{bad} non-finite samples (NaN or infinity)")
    meter = pyloudnorm.Meter(sample_rate)
    loudness = float(meter.integrated_loudness(audio.astype(np.float64)))
    if not np.isfinite(loudness) or loudness < SILENCE_LUFS:
        raise ValueError("silent (below -70 LUFS)")
    out = audio * 10.0 ** ((target_lufs - loudness) / 20.0)
    peak = float(np.max(np.abs(out)))
    if peak > 1.0:  # as upstream: scale down to the headroom instead of clipping
        out = out * (HEADROOM / peak)
    return out.astype(np.float32), loudness


def slice_clips(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, min_s: float = MIN_CLIP_S,
                max_s: float = MAX_CLIP_S) -> list[np.ndarray]:
    """Non-silent pieces at least `min_s` long, cut to whole mel frames."""
    pieces = []
    ranges = slice_at_silences(audio, sample_rate, max_length_s=max_s, keep_range_db=TRAINING_KEEP_RANGE_DB,
                               max_sil_kept_ms=TRAINING_MAX_SIL_KEPT_MS)  # as training data was sliced before
    for start, end in ranges:
        piece = audio[start:end]
        piece = piece[: len(piece) // HOP_LENGTH * HOP_LENGTH]
        if len(piece) >= min_s * sample_rate and np.max(np.abs(piece)) > 1e-4:
            pieces.append(piece)
    return pieces


def find_sources(root: Path) -> dict[str, list[Path]]:
    """SPEAKER -> audio files (sorted); speakers are the non-hidden subfolders of `root`."""
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    speakers = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        if files:
            speakers[sub.name] = files
    if not speakers:
        loose = [p for p in root.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS]
        hint = " (audio found directly in it: move it into a folder named after the speaker)" if loose else ""
        raise UserError(f"no speaker folders with audio in {root}: expected {root}/SPEAKER/*.wav{hint}")
    return speakers


# --- the cache ----------------------------------------------------------------------------------

def cache_root(root: str | Path) -> Path:
    return Path(root) / CACHE_DIR


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + f".tmp{threading.get_ident()}")
    write(tmp)
    os.replace(tmp, path)


def _source_key(path: Path, settings: dict) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "settings": settings}


def _record_path(cache: Path, speaker: str, source: Path, root: Path) -> Path:
    """One cache name per source, never shared: the path inside the speaker folder with "%" and "/"
    percent-escaped (a reversible spelling, so `a/b.wav` and `a__b.wav` stay two recordings)."""
    rel = source.relative_to(root / speaker).as_posix()
    return cache / speaker / (rel.replace("%", "%25").replace("/", "%2F") + ".json")


def _load_record(path: Path, key: dict) -> dict | None:
    """The resume record if it matches the source and settings and all its clips exist."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key:
        return None
    if not all((path.parent / c["file"]).is_file() for c in record.get("clips", [])):
        return None
    return record


def _clip_tensors(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Storage form: mel/f0/rms float32, the two big content features float16."""
    out = {}
    for name in ("mel", "f0", "rms"):
        out[name] = features[name].detach().float().cpu().contiguous()
    for name in ("cvec", "whisper"):
        if name in features:  # V3 data has no Whisper
            out[name] = features[name].detach().to(torch.float16).cpu().contiguous()
    n = out["mel"].shape[0]
    for name, value in out.items():
        if value.shape[0] != n:
            raise RuntimeError(f"feature {name} has {value.shape[0]} frames, mel has {n}")
    return out


def process_source(source: Path, speaker: str, root: Path, extract: FeatureFn, settings: dict) -> dict:
    """Load, normalise, slice and extract one file; returns its record (raises ValueError/UserError)."""
    cache = cache_root(root)
    audio, _ = load_audio(source, SAMPLE_RATE)
    audio, loudness = normalize_loudness(audio)
    pieces = slice_clips(audio)
    if not pieces:
        raise ValueError(f"no non-silent piece of at least {MIN_CLIP_S:g} s")
    base = _record_path(cache, speaker, source, root).name[: -len(".json")]
    clips = []
    for k, piece in enumerate(pieces):
        tensors = _clip_tensors(extract(piece))
        name = f"{base}-{k:03d}.pt"
        out = cache / speaker / name
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(out, lambda p, t=tensors: torch.save(t, p))
        clips.append({"file": name, "frames": int(tensors["mel"].shape[0])})
    return {"source": str(source.relative_to(root)), "speaker": speaker, "loudness_lufs": loudness,
            "clips": clips}


def _split(clips: list[dict], seed: int = SPLIT_SEED) -> None:
    """Mark `VAL_PER_SPEAKER` clip(s) of each speaker with >= 3 clips as held out."""
    by_speaker: dict[str, list[dict]] = {}
    for clip in clips:
        clip["split"] = "train"
        by_speaker.setdefault(clip["speaker"], []).append(clip)
    rng = random.Random(seed)
    for speaker in sorted(by_speaker):
        items = sorted(by_speaker[speaker], key=lambda c: c["file"])
        if len(items) >= 3:
            for clip in rng.sample(items, VAL_PER_SPEAKER):
                clip["split"] = "val"


def write_metadata(root: Path, records: list[dict], settings: dict, skipped: list[Skipped]) -> Path:
    clips = [{"speaker": r["speaker"], "file": f"{r['speaker']}/{c['file']}", "frames": c["frames"],
              "source": r["source"]} for r in records for c in r["clips"]]
    clips.sort(key=lambda c: (c["speaker"], c["file"]))
    _split(clips)
    meta = {
        "format": FORMAT_VERSION,
        "speakers": sorted({c["speaker"] for c in clips}),
        "sample_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH, "n_mel_channels": N_MELS,
        "settings": settings,
        "clips": clips,
        "skipped": [asdict(s) for s in skipped],
    }
    meta["pitch_stats"] = dataset_pitch_stats(cache_root(root), clips)  # auto pitch's targets
    path = cache_root(root) / METADATA
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, lambda p: p.write_text(json.dumps(meta, indent=1)))
    return path


def load_metadata(root: str | Path) -> dict:
    path = cache_root(root) / METADATA
    if not path.is_file():
        raise UserError(f"{root} is not prepared (no {CACHE_DIR}/{METADATA}): run `rtsvc prepare {root}`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{path} was written by another rtsvc version: run `rtsvc prepare {root}` again")
    if not meta["clips"]:
        raise UserError(f"{root} has no prepared clips (all files were skipped): see `rtsvc prepare` output")
    return meta


# --- feature extraction -----------------------------------------------------------------------

def make_feature_fn(pretrained_dir: str | Path | None, f0: str = "rmvpe", device: str = "auto",
                    contentvec: str | None = None, whisper: str | None = None,
                    rmvpe: str | None = None, family: str = "v2") -> tuple[FeatureFn, dict]:
    """Load the encoders once; returns the per-clip function and the settings that identify it.
    `family` "v3": no Whisper; ContentVec as upstream's V3 prepare_cvec.py (`content_100fps`); each
    family's record says which."""
    from rtsvc.compute import pick_device
    from rtsvc.features.extractor import FeatureExtractor
    from rtsvc.models.families import FAMILIES
    from rtsvc.pretrained import resolve_pretrained

    if family not in FAMILIES:
        raise UserError(f"unknown --family {family!r}: use {' or '.join(FAMILIES)}")
    uses_whisper, resize = FAMILIES[family].uses_whisper, FAMILIES[family].content_resize
    need = ("contentvec",) + (("whisper",) if uses_whisper else ()) + (("rmvpe",) if f0 == "rmvpe" else ())
    paths = resolve_pretrained(pretrained_dir, contentvec=contentvec, whisper=whisper, rmvpe=rmvpe, need=need)
    extractor = FeatureExtractor.from_pretrained(paths, f0=f0, device=pick_device(device), family=family)

    def extract(audio: np.ndarray) -> dict[str, torch.Tensor]:
        feats = extractor.extract(audio)
        out = {"mel": feats.mel, "f0": feats.f0, "rms": feats.rms, "cvec": feats.cvec}
        if uses_whisper:
            out["whisper"] = feats.whisper
        if FAMILIES[family].content_100fps:
            out["cvec"] = content_100fps(extractor, audio, feats.n_frames)
        return out

    def ident(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    settings = {"family": family, "f0": f0, "resize": resize, "contentvec": ident(paths.contentvec),
                "whisper": ident(paths.whisper) if uses_whisper else None,
                "rmvpe": ident(paths.rmvpe) if f0 == "rmvpe" else None,
                "pretrained_dir": ident(str(pretrained_dir)) if pretrained_dir else None,
                "target_lufs": TARGET_LUFS, "min_clip_s": MIN_CLIP_S, "max_clip_s": MAX_CLIP_S}
    return extract, settings


def content_100fps(extractor, audio_44k: np.ndarray, n_frames: int) -> torch.Tensor:
    """ContentVec for V3 training as upstream's scripts/prepare_cvec.py: a second pass on the 16 kHz
    audio advanced by 160 samples (10 ms; tail zeroed) interleaved with the first gives 100 frames/s,
    then a linear (align_corners) resize onto the mel grid. [n_frames, 768]."""
    from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, resample
    from rtsvc.features.frames import resize_frames

    audio_16k = resample(audio_44k, SAMPLE_RATE, ENCODER_SAMPLE_RATE)
    shifted = np.concatenate((audio_16k[160:], np.zeros(160, dtype=audio_16k.dtype)))
    first, second = extractor.contentvec.hidden(audio_16k), extractor.contentvec.hidden(shifted)
    frames = min(first.shape[0], second.shape[0])
    both = torch.stack((first[:frames], second[:frames]), dim=1).flatten(0, 1)  # f0 s0 f1 s1 ...
    return resize_frames(both, n_frames, "linear").to(extractor.device)


# --- the whole dataset --------------------------------------------------------------------------

def prepare_dataset(root: str | Path, extract: FeatureFn, settings: dict, workers: int = 1,
                    on_progress: Callable[[int, int, str], None] | None = None) -> PrepareResult:
    """Prepare every DIR/SPEAKER/* file with `workers` threads; `settings` (F0 method, encoder
    identities, ...) go into the records, so changing them redoes the affected files.

    Threads, not processes: the expensive part is torch inference, which releases the GIL, and
    the encoders are loaded once instead of once per process."""
    root = Path(root)
    sources = find_sources(root)
    cache = cache_root(root)
    tasks = [(spk, src) for spk, files in sources.items() for src in files]
    result = PrepareResult(root=str(root), metadata_path=str(cache / METADATA))
    records: list[dict] = []
    todo = []
    for speaker, source in tasks:
        key = _source_key(source, settings)
        record = _load_record(_record_path(cache, speaker, source, root), key)
        if record is not None:
            records.append(record)
            result.reused += 1
        else:
            todo.append((speaker, source, key))
    if on_progress:
        on_progress(result.reused, len(tasks), "")

    def work(speaker: str, source: Path, key: dict) -> dict:
        record = process_source(source, speaker, root, extract, settings)
        record["key"] = key
        path = _record_path(cache, speaker, source, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(path, lambda p: p.write_text(json.dumps(record)))
        return record

    threads = torch.get_num_threads()
    # workers x intra-op threads beyond the core count makes torch's spinning threads fight
    torch.set_num_threads(max(1, threads // max(1, workers)))
    try:
        _run_pool(todo, work, workers, records, result, len(tasks), on_progress)
    finally:
        torch.set_num_threads(threads)
    result.metadata_path = str(write_metadata(root, records, settings, result.skipped))
    for record in records:
        info = result.speakers.setdefault(record["speaker"], {"clips": 0, "seconds": 0.0, "sources": 0})
        info["sources"] += 1
        for clip in record["clips"]:
            info["clips"] += 1
            info["seconds"] += clip["frames"] * HOP_LENGTH / SAMPLE_RATE
            result.clips += 1
            result.frames += clip["frames"]
    return result


def _run_pool(todo: list, work: Callable, workers: int, records: list[dict], result: PrepareResult,
              total: int, on_progress: Callable[[int, int, str], None] | None) -> None:
    """Run `work` over `todo` in threads; failures of one file are recorded, never raised."""
    done = result.reused
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(work, spk, src, key): src for spk, src, key in todo}
        for future in as_completed(futures):
            source = futures[future]
            try:
                records.append(future.result())
                result.processed += 1
            except (UserError, ValueError, OSError) as err:  # unreadable, silent, too short
                result.skipped.append(Skipped(str(source), _first_line(err)))
            except Exception as err:  # anything else in one file must not end a long run either
                result.skipped.append(Skipped(str(source), f"{type(err).__name__}: {_first_line(err)}"))
            done += 1
            if on_progress:
                on_progress(done, total, str(source.name))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
