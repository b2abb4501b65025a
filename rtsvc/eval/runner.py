"""Convert every clip with every configuration and score it (`rtsvc eval`'s library half).

Clips are read at 44.1 kHz, mixed to mono and brought to -18 LUFS (the level the models were
trained at) before any configuration sees them, so offline and live start from the same audio.
Every clip is checked before any model loads: a bad clip is a one-line error naming it.
"""

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rtsvc.engine import StreamConfig, StreamingConverter, convert_stream
from rtsvc.errors import UserError
from rtsvc.eval.configs import EvalConfig, parse_configs
from rtsvc.eval.metrics import (
    Dnsmos,
    SpeakerEncoder,
    cosine,
    f0_accuracy,
    level_matched,
    log_spectral_distance,
    mel_l1,
    track_f0,
)
from rtsvc.offline import TARGET_LUFS, check_input_audio, convert_offline
from rtsvc.settings import Knobs, RuntimeSettings, validate_knobs
from rtsvc.voice import Voice
from rtsvc.voices.spec import VoiceSpec, open_voice

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au")
OFFLINE_STEPS = 32  # offline conversion's default, as `rtsvc convert` (upstream infer.py)
WARMUP_S = 1.0  # each voice converts this much once before it is timed (lazy initialisation)
METRICS = ("similarity", "cents", "gross", "voicing", "dnsmos", "dnsmos_sig", "dnsmos_bak", "lsd_db",
           "mel_l1")
Progress = Callable[[str, int, int], None]  # (what, done, total)
Int8Bundle = Callable[[Path], Path]  # an fp32 bundle -> its int8 copy (export.quantize; cli passes it)


@dataclass
class EvalPlan:
    """What `run_eval` does. `spec` is the command's voice (model, pretrained dir, f0, ...); each
    configuration changes a copy of it."""

    clips: Path
    configs: list[EvalConfig]
    reference: EvalConfig
    spec: VoiceSpec = field(default_factory=VoiceSpec)
    stream: StreamConfig = field(default_factory=StreamConfig)
    speaker: str | None = None
    speaker_clips: Path | None = None
    pitch: float = 0.0
    seed: int = 0
    eval_f0: str = "pyworld"
    max_seconds: float | None = None  # clips cut to this length (quick looks at long clips)
    speaker_metric: bool = True
    quality_metric: bool = True
    out: Path | None = None  # converted audio is written under OUT/audio when given
    int8_bundle: Int8Bundle | None = None


def eval_plan(clips: Path, configs: list[str] | None, reference: str | None, spec: VoiceSpec,
              speaker: str | None, speaker_clips: Path | None, pitch: float, seed: int, eval_f0: str,
              max_seconds: float | None, speaker_metric: bool, quality_metric: bool, out: Path,
              int8_bundle: "Int8Bundle | None" = None) -> EvalPlan:
    """`rtsvc eval`'s options as a plan; a bad option is a UserError (one line)."""
    if eval_f0 not in ("rmvpe", "fcpe", "pyworld"):
        raise UserError(f"unknown --f0-tracker {eval_f0!r}: use rmvpe, fcpe or pyworld")
    if max_seconds is not None and not max_seconds > 0:
        raise UserError(f"--max-seconds must be positive, got {max_seconds:g}")
    parsed, ref = parse_configs(configs or ["offline:steps=32", "live"], reference)
    return EvalPlan(clips=clips, configs=parsed, reference=ref, spec=spec, speaker=speaker,
                    speaker_clips=speaker_clips, pitch=pitch, seed=seed, eval_f0=eval_f0,
                    max_seconds=max_seconds, speaker_metric=speaker_metric, quality_metric=quality_metric,
                    out=out, int8_bundle=int8_bundle)


@dataclass
class EvalResult:
    plan: EvalPlan
    clips: list[str]
    clip_seconds: list[float]
    per_clip: dict[str, list[dict]]  # config label -> one dict of metrics per clip
    summary: dict[str, dict]  # config label -> {metric: {"mean", "std"}, "rtf", "latency_ms", ...}
    outputs: dict[str, list[np.ndarray]]  # config label -> converted clips (for the picture)
    inputs: list[np.ndarray]
    target_clips: int = 0  # reference clips the speaker embedding came from (0: not measured)
    notes: list[str] = field(default_factory=list)


def find_clips(folder: Path, what: str = "--clips") -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} {folder} is not a folder of audio clips")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not found:
        raise UserError(f"{what} {folder} has no audio clips ({', '.join(AUDIO_EXTENSIONS)})")
    return found


def read_clip(path: Path, max_seconds: float | None = None) -> np.ndarray:
    """A clip at 44.1 kHz, mono, -18 LUFS; anything wrong with it is a UserError naming it."""
    from rtsvc.dsp.audio import load_audio
    from rtsvc.offline import _loudness, _meter, _to_loudness

    try:
        audio, sr = load_audio(path)
        if max_seconds is not None:
            audio = audio[: int(max_seconds * sr)]
        audio = check_input_audio(audio)
    except UserError as err:  # load_audio's messages name the file already
        raise UserError(str(err) if str(path) in str(err) else f"clip {path}: {err}") from None
    if len(audio) < sr // 2:
        raise UserError(f"clip {path}: {len(audio) / sr:.2f} s is too short to score (at least 0.5 s)")
    return _to_loudness(audio, _loudness(_meter(sr), audio, sr), TARGET_LUFS).astype(np.float32)


def speaker_reference_folder(plan: EvalPlan, voice: Voice) -> Path | None:
    """--speaker-clips, else the training clips the checkpoint recorded (DATA/SPEAKER of `rtsvc
    train --data DATA`) when that folder is still here."""
    if plan.speaker_clips is not None:
        return Path(plan.speaker_clips)
    loaded = getattr(getattr(voice, "backend", None), "loaded", None)  # torch: the checkpoint's settings
    dataset = getattr(loaded, "dataset", None) or {}
    data_dir = dataset.get("data_dir") if isinstance(dataset, dict) else None
    speaker = plan.speaker or (voice.speakers[0] if voice.speakers else None)
    if data_dir and speaker and (Path(data_dir) / speaker).is_dir():
        return Path(data_dir) / speaker
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")[:60] or "config"


class _Voices:
    """Voices opened once per distinct spec (configurations often share one)."""

    def __init__(self, plan: EvalPlan):
        self.plan = plan
        self.opened: dict[VoiceSpec, Voice] = {}
        self.int8: dict[Path, Path] = {}

    def spec_for(self, config: EvalConfig) -> VoiceSpec:
        base = self.plan.spec
        model = config.model if config.model is not None else base.model
        if config.int8:
            model = self._int8(model, config)
        pick = lambda own, default: default if own is None else own  # noqa: E731
        return base.with_(model=model, f0=config.f0 or base.f0, backend=config.backend or base.backend,
                          streaming=config.live,
                          dit_context_ms=pick(config.dit_context_ms, base.dit_context_ms),
                          encoder_context_ms=pick(config.encoder_context_ms, base.encoder_context_ms),
                          vocoder_context=pick(config.vocoder_context, base.vocoder_context))

    def _int8(self, model: Path | None, config: EvalConfig) -> Path:
        from rtsvc.backends.bundle import is_bundle, read_bundle

        if model is None or not is_bundle(model):
            raise UserError(f"--config {config.text!r}: int8 needs a .rtsvc bundle as the model (rtsvc "
                            f"export MODEL --out NAME.rtsvc), got {model or 'the DSP voice'}")
        if read_bundle(model, verify_hashes=False).manifest.get("export", {}).get("precision") == "int8":
            return Path(model)
        if self.plan.int8_bundle is None:
            raise UserError(f"--config {config.text!r}: {model} is fp32; quantize a copy with rtsvc export "
                            "--int8 and pass it as model=")
        if Path(model) not in self.int8:
            self.int8[Path(model)] = self.plan.int8_bundle(Path(model))
        return self.int8[Path(model)]

    def open(self, spec: VoiceSpec) -> Voice:
        if spec not in self.opened:
            self.opened[spec] = open_voice(spec)
        return self.opened[spec]


def knobs_for(config: EvalConfig, voice: Voice, plan: EvalPlan) -> Knobs:
    """A configuration's knobs: its steps, else a student's own, else offline 32 / live's default."""
    own = getattr(voice, "default_steps", None)
    steps = config.steps or own or (OFFLINE_STEPS if not config.live else Knobs().steps)
    return validate_knobs(Knobs(speaker=plan.speaker, steps=steps, seed=plan.seed,
                                pitch_shift=plan.pitch if config.pitch is None else config.pitch,
                                schedule=config.schedule or Knobs().schedule,
                                denoise=config.denoise or "off"))


def convert_clip(voice: Voice, audio: np.ndarray, knobs: Knobs, config: EvalConfig,
                 stream: StreamConfig, model: bool) -> np.ndarray:
    if config.live:
        return convert_stream(voice, audio, knobs, config.stream_config(stream))
    return convert_offline(voice, audio, knobs, target_lufs=TARGET_LUFS if model else None)


def _mean_std(values: list[float]) -> dict[str, float | None]:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept)), "n": len(kept)}


@dataclass
class Prepared:
    """What is checked before any model loads: the clips (read, -18 LUFS), their names, the
    configurations in run order (reference first) and each one's voice spec."""

    inputs: list[np.ndarray]
    names: list[str]
    configs: list[EvalConfig]
    specs: dict[str, VoiceSpec]
    voices: "_Voices"


def prepare_eval(plan: EvalPlan) -> Prepared:
    """Every mistake that needs no model: bad clips, options, configurations (one-line UserErrors)."""
    paths = find_clips(plan.clips)
    inputs = [read_clip(p, plan.max_seconds) for p in paths]
    names = [str(p.relative_to(plan.clips)) for p in paths]
    if plan.speaker_clips is not None:
        find_clips(plan.speaker_clips, "--speaker-clips")
    validate_knobs(Knobs(pitch_shift=plan.pitch, seed=plan.seed))
    configs = [plan.reference] + [c for c in plan.configs if c is not plan.reference]
    voices = _Voices(plan)
    specs = {c.label: voices.spec_for(c).validate() for c in configs}
    return Prepared(inputs, names, configs, specs, voices)


def run_eval(plan: EvalPlan, progress: Progress | None = None,
             prepared: Prepared | None = None) -> EvalResult:
    """Convert every clip with every configuration (the reference first), then score them."""
    progress = progress or (lambda what, done, total: None)
    prepared = prepared or prepare_eval(plan)
    inputs, names, configs, specs, voices = (prepared.inputs, prepared.names, prepared.configs,
                                             prepared.specs, prepared.voices)
    seconds = [len(a) / 44100 for a in inputs]

    outputs: dict[str, list[np.ndarray]] = {}
    timing: dict[str, dict] = {}
    total, done = len(configs) * len(inputs), 0
    for config in configs:
        voice = voices.open(specs[config.label])
        knobs = knobs_for(config, voice, plan)
        is_model = specs[config.label].model is not None
        progress(f"{config.label}: warming up", done, total)
        convert_clip(voice, inputs[0][: int(WARMUP_S * 44100)], knobs, config, plan.stream, is_model)
        outs, spent = [], 0.0
        for name, audio in zip(names, inputs, strict=True):
            progress(f"{config.label}: {name}", done, total)
            started = time.perf_counter()
            out = convert_clip(voice, audio, knobs, config, plan.stream, is_model)
            outs.append(np.asarray(out, np.float32))
            spent += time.perf_counter() - started
            done += 1
        outputs[config.label] = outs
        latency = None  # offline: the whole clip
        if config.live:
            engine = StreamingConverter(voice, RuntimeSettings(knobs), config.stream_config(plan.stream))
            latency = engine.latency_ms
        timing[config.label] = {"rtf": spent / sum(seconds), "latency_ms": latency, "steps": knobs.steps,
                                "model": None if specs[config.label].model is None
                                else str(specs[config.label].model),
                                "f0": specs[config.label].f0 if is_model else "pyworld",
                                "denoise": knobs.denoise,
                                "block_ms": config.stream_config(plan.stream).for_voice(voice).block_ms
                                if config.live else None}
        if plan.out is not None:
            _write_outputs(plan.out, configs.index(config), config, names, outs)
    progress("scoring", total, total)
    result = EvalResult(plan, names, seconds, {}, {}, outputs, inputs)
    _score(result, configs, voices, specs, timing, progress)
    return result


def _write_outputs(out: Path, index: int, config: EvalConfig, names: list[str],
                   outs: list[np.ndarray]) -> None:
    from rtsvc.dsp.audio import save_audio

    folder = Path(out) / "audio" / f"{index:02d}-{_slug(config.label)}"
    for name, audio in zip(names, outs, strict=True):
        path = folder / Path(name).with_suffix(".wav")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_audio(path, np.clip(audio, -1.0, 1.0))


def _score(result: EvalResult, configs: list[EvalConfig], voices: _Voices, specs: dict, timing: dict,
           progress: Progress) -> None:
    from rtsvc.features.f0 import make_f0_extractor

    plan = result.plan
    tracker = make_f0_extractor(plan.eval_f0, rmvpe_path=plan.spec.pretrained_paths().rmvpe
                                if plan.eval_f0 == "rmvpe" else None)
    encoder = target = None
    if plan.speaker_metric:
        first = voices.open(specs[configs[0].label])
        folder = speaker_reference_folder(plan, first)
        if folder is None:
            result.notes.append("speaker similarity not measured: no --speaker-clips, and the checkpoint "
                                "records no training clips that are still here")
        else:
            progress("speaker embeddings", 0, 1)
            encoder = SpeakerEncoder()
            refs = [read_clip(p) for p in find_clips(folder, "--speaker-clips")]
            target = encoder.target(refs)
            result.target_clips = len(refs)
    quality = Dnsmos() if plan.quality_metric else None
    source_f0 = [track_f0(a, tracker) for a in result.inputs]
    reference = result.outputs[plan.reference.label]
    scored = 0
    total = len(configs) * len(result.inputs)
    # the unconverted input: what "no conversion" scores (similarity, quality)
    result.per_clip["input"] = [
        {"similarity": cosine(encoder.embed(a), target) if encoder is not None else None,
         **_quality(quality, a)} for a in result.inputs]
    for config in configs:
        rows = []
        for i, out in enumerate(result.outputs[config.label]):
            progress(f"scoring {config.label}", scored, total)
            shift = plan.pitch
            acc = f0_accuracy(source_f0[i], track_f0(out, tracker), shift)
            matched = level_matched(out, reference[i])
            rows.append({"cents": acc.cents, "gross": acc.gross, "voicing": acc.voicing,
                         "lsd_db": log_spectral_distance(matched, reference[i]),
                         "mel_l1": mel_l1(matched, reference[i]),
                         "similarity": cosine(encoder.embed(out), target) if encoder is not None else None,
                         **_quality(quality, out)})
            scored += 1
        result.per_clip[config.label] = rows
    for label, rows in result.per_clip.items():
        result.summary[label] = {m: _mean_std([r.get(m) for r in rows]) for m in METRICS}
        result.summary[label].update(timing.get(label, {}))


def _quality(quality: Dnsmos | None, audio: np.ndarray) -> dict:
    if quality is None:
        return {}
    scores = quality(audio)
    return {"dnsmos": scores["ovrl"], "dnsmos_sig": scores["sig"], "dnsmos_bak": scores["bak"]}


def machine() -> dict:
    """Where the costs were measured (a shared machine's RTF is only indicative)."""
    import platform

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_1m": load[0] if load else None, "python": platform.python_version()}


__all__ = ["EvalPlan", "EvalResult", "run_eval", "find_clips", "read_clip", "knobs_for", "machine"]
