"""Runtime knobs that a user can change while audio is flowing.

`RuntimeSettings` is shared between a front end (CLI keys, websocket `set` messages) and the
engine's worker thread. Writers call `update(...)`; the engine takes one `snapshot()` per block,
so a block never sees half of an update.
"""

import math
import threading
from dataclasses import dataclass, fields, replace

from rtsvc.errors import UserError

MAX_PITCH_SHIFT = 36.0  # semitones either way
MAX_STEPS = 64
DENOISE_CHOICES = ("off", "deepfilternet", "rnnoise")  # input noise suppression (rtsvc.dsp.denoise)
MAX_DEPTH = 64  # DiT blocks a skip-layer index may name
SCHEDULES = ("uniform", "sway", "epss")  # sampling time grids (rtsvc.models.schedules)
MAX_SEED = 2**32 - 1  # the sampler hashes the seed as an unsigned 32/64-bit key


@dataclass(frozen=True)
class Knobs:
    speaker: str | None = None  # None: the model's first speaker
    pitch_shift: float = 0.0  # semitones
    formant_shift: float = 1.0  # DSP voice only: spectral envelope stretch factor
    cfg_strength: float = 2.0  # V2: classifier-free guidance on the Whisper branch (0 = off)
    ds_cfg_strength: float = 0.2  # V3: content-degradation guidance (0 = off)
    spk_cfg_strength: float = 0.8  # V3: speaker guidance through the null speaker (0 = off)
    skip_cfg_strength: float = 0.0  # V3: skip-layer guidance (0 = off)
    cfg_skip_layers: int = -1  # V3: the block the skip-layer pass bypasses (0-based; -1 = none)
    cfg_rescale: float = 0.7  # V3: guidance rescale towards the unguided std (0 = off)
    steps: int = 4  # rectified-flow sampling steps (grid points) while streaming
    schedule: str = "uniform"  # where the grid points fall (a distilled student uses its own grid)
    gate_db: float = -50.0  # input below this level (dBFS) outputs silence and skips the model
    input_gain_db: float = 0.0
    output_gain_db: float = 0.0
    seed: int = 0
    denoise: str = "off"  # input noise suppression: off, deepfilternet or rnnoise (adds its delay)


def validate_knobs(knobs: Knobs) -> Knobs:
    """Raise UserError for values no voice can use (NaN and infinity included: they compare False)."""
    for f in fields(knobs):
        value = getattr(knobs, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{f.name} must be a finite number, got {value}")
    if knobs.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {knobs.schedule!r}: use {', '.join(SCHEDULES)}")
    if abs(knobs.pitch_shift) > MAX_PITCH_SHIFT:
        raise UserError(f"pitch_shift must be within ±{MAX_PITCH_SHIFT:g} semitones, got {knobs.pitch_shift}")
    if not 0.5 <= knobs.formant_shift <= 2.0:
        raise UserError(f"formant_shift must be between 0.5 and 2.0, got {knobs.formant_shift}")
    for name in ("cfg_strength", "ds_cfg_strength", "spk_cfg_strength", "skip_cfg_strength"):
        if not 0.0 <= getattr(knobs, name) <= 10.0:  # `not <=` also refuses NaN
            raise UserError(f"{name} must be between 0 and 10, got {getattr(knobs, name)}")
    if not 0.0 <= knobs.cfg_rescale <= 1.0:
        raise UserError(f"cfg_rescale must be between 0 and 1, got {knobs.cfg_rescale}")
    if not -1 <= knobs.cfg_skip_layers < MAX_DEPTH:
        raise UserError(f"cfg_skip_layers must be a block index 0..{MAX_DEPTH - 1} or -1 (none), "
                        f"got {knobs.cfg_skip_layers}")
    if not 2 <= knobs.steps <= MAX_STEPS:
        raise UserError(f"steps must be between 2 and {MAX_STEPS}, got {knobs.steps}")
    if not -120.0 <= knobs.gate_db <= 0.0:
        raise UserError(f"gate_db must be between -120 and 0 dBFS, got {knobs.gate_db}")
    for name in ("input_gain_db", "output_gain_db"):
        if abs(getattr(knobs, name)) > 40.0:
            raise UserError(f"{name} must be within ±40 dB, got {getattr(knobs, name)}")
    if knobs.denoise not in DENOISE_CHOICES:
        raise UserError(f"denoise must be one of {', '.join(DENOISE_CHOICES)}, got {knobs.denoise!r}")
    if not 0 <= knobs.seed <= MAX_SEED:
        raise UserError(f"seed must be between 0 and {MAX_SEED}, got {knobs.seed}")
    return knobs


KNOB_NAMES = tuple(f.name for f in fields(Knobs))


@dataclass(frozen=True)
class KnobControl:
    """How a control panel (the page `rtsvc serve` serves) shows a knob: a slider over
    [minimum, maximum] in `step`s, or a choice of `choices`. `voices`: "all", "dsp", "model" (any
    model family) or one family ("v2", "v3")."""

    name: str
    label: str
    minimum: float = 0.0
    maximum: float = 0.0
    step: float = 1.0
    unit: str = ""
    voices: str = "all"
    choices: tuple[str, ...] = ()


# The page builds its controls from this list (GET /v1/info): a new knob gets a control by a line here.
KNOB_CONTROLS = (
    KnobControl("pitch_shift", "pitch", -24, 24, 1, "semitones"),
    KnobControl("formant_shift", "formant", 0.5, 2.0, 0.01, "x", voices="dsp"),
    KnobControl("cfg_strength", "guidance (cfg)", 0, 10, 0.1, voices="v2"),
    KnobControl("ds_cfg_strength", "content guidance", 0, 10, 0.05, voices="v3"),
    KnobControl("spk_cfg_strength", "speaker guidance", 0, 10, 0.05, voices="v3"),
    KnobControl("skip_cfg_strength", "skip-layer guidance", 0, 10, 0.05, voices="v3"),
    KnobControl("cfg_skip_layers", "skipped block (-1 none)", -1, MAX_DEPTH - 1, 1, voices="v3"),
    KnobControl("cfg_rescale", "guidance rescale", 0, 1, 0.05, voices="v3"),
    KnobControl("steps", "sampling steps", 2, 32, 1, voices="model"),
    KnobControl("gate_db", "noise gate", -120, 0, 1, "dBFS"),
    KnobControl("denoise", "noise suppression", choices=DENOISE_CHOICES),
    KnobControl("input_gain_db", "input gain", -40, 40, 1, "dB"),
    KnobControl("output_gain_db", "output gain", -40, 40, 1, "dB"),
)


def knob_controls(voice_kind: str) -> list[KnobControl]:
    """The controls that apply to a "dsp" voice or a model voice of family "v2" / "v3"."""
    kinds = ("all", voice_kind) if voice_kind == "dsp" else ("all", "model", voice_kind)
    return [c for c in KNOB_CONTROLS if c.voices in kinds]


class RuntimeSettings:
    """Thread-safe holder of the current `Knobs`."""

    def __init__(self, knobs: Knobs | None = None):
        self._lock = threading.Lock()
        self._knobs = validate_knobs(knobs or Knobs())

    def snapshot(self) -> Knobs:
        with self._lock:
            return self._knobs

    def update(self, **changes: object) -> Knobs:
        """Change some knobs at once; unknown names or bad values raise UserError, changing nothing."""
        unknown = sorted(set(changes) - set(KNOB_NAMES))
        if unknown:
            raise UserError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(KNOB_NAMES)}")
        coerced = {}
        for name, value in changes.items():
            kind = type(getattr(Knobs(), name)) if name != "speaker" else str
            try:
                coerced[name] = None if value is None and name == "speaker" else kind(value)
            except (TypeError, ValueError, OverflowError):
                raise UserError(f"setting {name} needs a {kind.__name__}, got {value!r}") from None
        with self._lock:
            self._knobs = validate_knobs(replace(self._knobs, **coerced))
            return self._knobs
