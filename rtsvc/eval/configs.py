"""`--config` strings of `rtsvc eval`: `MODE[:key=value,...,flag]`, e.g. `offline:steps=32`,
`live:block=104.5,int8`, `live:block=150.9,f0=fcpe,denoise=rnnoise`.

MODE is `offline` (whole clip, sliced at silences, as `rtsvc convert`) or `live` (block by block
through the streaming engine, as `rtsvc live` and `serve` hear it). Keys not given take the
command's own options (--model, --f0, ...) or the library defaults.
"""

from dataclasses import dataclass, replace
from pathlib import Path

from rtsvc.engine import StreamConfig
from rtsvc.errors import UserError
from rtsvc.features.f0_methods import MODEL_F0 as F0_CHOICES
from rtsvc.settings import DENOISE_CHOICES, MAX_PITCH_SHIFT, MAX_STEPS, SCHEDULES
from rtsvc.voices.defaults import MAX_VOCODER_CONTEXT_FRAMES, MIN_ENCODER_CONTEXT_MS

MODES = ("offline", "live")
REFERENCE = "offline:steps=32"  # the upstream offline conversion: what the others are compared with
KEYS = {  # key: what it sets (shown by --help and in errors)
    "steps": "sampling steps (grid points) of a teacher",
    "block": "engine block in ms (live)",
    "context": "engine left context in ms (live)",
    "crossfade": "SOLA crossfade in ms (live)",
    "dit_context": "left context the DiT samples in ms (live)",
    "encoder_context": "left context ContentVec/Whisper see in ms (live)",
    "vocoder_context": "mel frames vocoded before each block's output (live)",
    "f0": f"F0 extractor of the model ({', '.join(F0_CHOICES)})",
    "denoise": f"input noise suppression ({', '.join(DENOISE_CHOICES)})",
    "schedule": f"time grid of a teacher ({', '.join(SCHEDULES)})",
    "model": "another checkpoint or bundle (e.g. a distilled student)",
    "backend": "torch or onnx",
    "pitch": "this configuration's own pitch shift (F0 error is measured against --pitch)",
    "name": "the label shown in the table and picture",
}
FLAGS = {"int8": "an int8 copy of the bundle (rtsvc export --int8)"}
LIVE_ONLY = ("block", "context", "crossfade", "dit_context", "encoder_context", "vocoder_context")


@dataclass(frozen=True)
class EvalConfig:
    """One configuration a clip is converted with; None = the command's option or the default."""

    text: str  # as given on the command line
    mode: str = "offline"
    steps: int | None = None
    block_ms: float | None = None
    context_ms: float | None = None
    crossfade_ms: float | None = None
    dit_context_ms: float | None = None
    encoder_context_ms: float | None = None
    vocoder_context: int | None = None
    f0: str | None = None
    denoise: str | None = None
    schedule: str | None = None
    model: Path | None = None
    backend: str | None = None
    pitch: float | None = None
    int8: bool = False
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.text

    @property
    def live(self) -> bool:
        return self.mode == "live"

    def stream_config(self, defaults: StreamConfig) -> StreamConfig:
        """The engine settings of a live configuration (the command's where a key is not given)."""
        pick = lambda own, default: default if own is None else own  # noqa: E731
        return StreamConfig(block_ms=pick(self.block_ms, defaults.block_ms),
                            context_ms=pick(self.context_ms, defaults.context_ms),
                            crossfade_ms=pick(self.crossfade_ms, defaults.crossfade_ms),
                            sola_search_ms=defaults.sola_search_ms).validate()  # None: the voice's


def _number(key: str, value: str, text: str, kind: type = float):
    try:
        number = kind(value)
    except ValueError:
        raise UserError(f"--config {text!r}: {key} must be a{'n integer' if kind is int else ' number'}, "
                        f"got {value!r}") from None
    if kind is float and not abs(number) < float("inf"):  # NaN and infinity
        raise UserError(f"--config {text!r}: {key} must be a finite number, got {value!r}")
    return number


def _choice(key: str, value: str, text: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"--config {text!r}: unknown {key} {value!r}: use {', '.join(choices)}")
    return value


def parse_config(text: str) -> EvalConfig:
    """`offline:steps=32` -> EvalConfig; any mistake is a one-line UserError naming the string."""
    mode, _, rest = text.strip().partition(":")
    mode = mode.strip().lower()
    if mode not in MODES:
        raise UserError(f"--config {text!r}: starts with the mode, offline or live (e.g. offline:steps=32, "
                        f"live:block=150.9), got {mode!r}")
    values: dict = {}
    for part in (p.strip() for p in rest.split(",")):
        if not part:
            continue
        key, eq, value = (s.strip() for s in part.partition("="))
        key = key.lower()
        if not eq:
            if key not in FLAGS:
                raise UserError(f"--config {text!r}: {part!r} is not key=value nor a flag "
                                f"({', '.join(FLAGS)})")
            values[key] = True
            continue
        if key not in KEYS:
            raise UserError(f"--config {text!r}: unknown key {key!r}; keys: {', '.join(KEYS)}; "
                            f"flags: {', '.join(FLAGS)}")
        if key in values:
            raise UserError(f"--config {text!r}: {key} is given twice")
        values[key] = value
    if mode == "offline" and (live := [k for k in LIVE_ONLY if k in values]):
        raise UserError(f"--config {text!r}: {', '.join(live)} only apply to live configurations")
    config = EvalConfig(text=text.strip(), mode=mode, int8=bool(values.pop("int8", False)))
    changes: dict = {}
    for key, value in values.items():
        if key == "steps":
            steps = _number(key, value, text, int)
            if not 2 <= steps <= MAX_STEPS:
                raise UserError(f"--config {text!r}: steps must be between 2 and {MAX_STEPS}, got {steps}")
            changes["steps"] = steps
        elif key in ("block", "context", "crossfade", "dit_context"):
            ms = _number(key, value, text)
            if ms < 0 or (key == "block" and ms == 0):
                bound = "positive" if key == "block" else ">= 0"
                raise UserError(f"--config {text!r}: {key} must be {bound} ms, got {value}")
            changes[f"{key}_ms"] = ms
        elif key == "encoder_context":
            ms = _number(key, value, text)
            if ms < MIN_ENCODER_CONTEXT_MS:
                raise UserError(f"--config {text!r}: encoder_context must be at least "
                                f"{MIN_ENCODER_CONTEXT_MS:g} ms, got {value}")
            changes["encoder_context_ms"] = ms
        elif key == "vocoder_context":
            frames = _number(key, value, text, int)
            if not 0 <= frames <= MAX_VOCODER_CONTEXT_FRAMES:
                raise UserError(f"--config {text!r}: vocoder_context must be 0 to "
                                f"{MAX_VOCODER_CONTEXT_FRAMES} mel frames, got {frames}")
            changes["vocoder_context"] = frames
        elif key == "pitch":
            pitch = _number(key, value, text)
            if abs(pitch) > MAX_PITCH_SHIFT:
                raise UserError(f"--config {text!r}: pitch must be within ±{MAX_PITCH_SHIFT:g} semitones")
            changes["pitch"] = pitch
        elif key == "f0":
            changes["f0"] = _choice(key, value, text, F0_CHOICES)
        elif key == "denoise":
            changes["denoise"] = _choice(key, value, text, DENOISE_CHOICES)
        elif key == "schedule":
            changes["schedule"] = _choice(key, value, text, SCHEDULES)
        elif key == "backend":
            changes["backend"] = _choice(key, value, text, ("torch", "onnx"))
        elif key == "model":
            if not value:
                raise UserError(f"--config {text!r}: model= needs a path")
            changes["model"] = Path(value)
        elif key == "name":
            changes["name"] = value or None
    return replace(config, **changes)


def parse_configs(texts: list[str], reference: str | None = None) -> tuple[list[EvalConfig], EvalConfig]:
    """All --config strings (duplicates refused) and the reference: `reference` names one of them by
    its label or text, else the first plain offline one (32 steps or unset: offline's default), else
    REFERENCE is added first."""
    configs = [parse_config(t) for t in texts]
    labels = [c.label for c in configs]
    if dupes := sorted({x for x in labels if labels.count(x) > 1}):
        raise UserError(f"--config {dupes[0]!r} is given twice (name= tells two apart)")
    if reference is not None:
        found = [c for c in configs if reference.strip() in (c.label, c.text)]
        if not found:
            raise UserError(f"--reference {reference!r} is none of the --config values: {', '.join(labels)}")
        return configs, found[0]
    found = [c for c in configs if c == EvalConfig(c.text, "offline", steps=c.steps, name=c.name)
             and c.steps in (None, 32)]  # plain offline: the command's model at 32 steps
    if found:
        return configs, found[0]
    ref = parse_config(REFERENCE)
    return [ref, *configs], ref


def help_text() -> str:
    keys = "; ".join(f"{k}= {v}" for k, v in KEYS.items())
    flags = "; ".join(f"{k}: {v}" for k, v in FLAGS.items())
    return f"MODE is offline or live. Keys: {keys}. Flags: {flags}."
