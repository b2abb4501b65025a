"""Runtime knobs that a user can change while audio is flowing, and the one table that describes them.

`KNOB_TABLE` has one row (`Knob`) per knob: name, type, default, range, unit, help, CLI flags and the
page's control. From it come the `Knobs` dataclass, `validate_knobs`, the protocol's type checks
(`Knob.coerce`, rtsvc.serve.protocol), the CLI options (rtsvc.cli_options.knob_options) and the page's
controls (`knob_spec`, served in GET /v1/info). A new knob is a new row.

`RuntimeSettings` is shared between a front end (CLI keys, websocket `set` messages) and the
engine's worker thread. Writers call `update(...)`; the engine takes one `snapshot()` per block,
so a block never sees half of an update.
"""

import functools
import math
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, make_dataclass, replace

from rtsvc.errors import UserError

MAX_PITCH_SHIFT = 36.0  # semitones either way
MAX_STEPS = 64
DENOISE_CHOICES = ("off", "deepfilternet", "rnnoise")  # input noise suppression (rtsvc.dsp.denoise)
MAX_DEPTH = 64  # DiT blocks a skip-layer index may name
SCHEDULES = ("uniform", "sway", "epss")  # sampling time grids (rtsvc.models.schedules)
MAX_SEED = 2**32 - 1  # the sampler hashes the seed as an unsigned 32/64-bit key
VAD_CHOICES = ("off", "on")  # the voice-activity gate (rtsvc.dsp.vad)
PITCH_MODES = ("fixed", "auto", "auto-continuous")  # auto pitch (rtsvc.voices.auto_pitch)
VOICE_KINDS = ("all", "dsp", "model", "v2", "v3")  # which voices a knob applies to ("model": any family)


class KnobError(UserError):
    """A knob value no voice can use. `str()` names the knob's field (the protocol's word);
    `for_flag()` names its CLI flag instead, for the command line."""

    def __init__(self, knob: "Knob", problem: str):
        super().__init__(f"{knob.name} {problem}")
        self.knob, self.problem = knob, problem

    def for_flag(self) -> str:
        return f"{self.knob.flags[0] if self.knob.flags else self.knob.name} {self.problem}"


def _num(value: float) -> str:
    """A number as people write it: 2, 0.5, 4294967295 (not 4.29497e+09)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _describe(value: object) -> str:
    return repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"


@dataclass(frozen=True)
class Knob:
    """One runtime knob: everything the validator, the protocol, the CLI and the page need."""

    name: str  # the `Knobs` field and the protocol's field
    kind: type  # float, int or str
    default: object
    label: str  # the page's short name
    help: str  # one line: what it does (the page's explanation, the CLI help's first words)
    flags: tuple[str, ...] = ()  # CLI option names, the first is named in errors; () = no option
    minimum: float | None = None  # numbers: the inclusive range
    maximum: float | None = None
    unit: str = ""  # after numbers: "semitones", "dB", "dBFS"
    choices: tuple[str, ...] = ()  # strings: the allowed values
    nullable: bool = False  # None is a value (speaker: the model's default)
    step: float = 1.0  # the page slider's step
    control: str = "slider"  # on the page: "slider", "select", "speaker" (its own picker) or "" (none)
    basic: bool = False  # on the page's Basic panel; others fold under Advanced
    voices: str = "all"  # which voices honour it: one of VOICE_KINDS
    default_text: str = ""  # the CLI's "Default: ..." when the number alone says too little; {default}
    words: tuple[tuple[str, str, object], ...] = ()  # CLI words for a number: (word, knob set, its value)

    def range_text(self) -> str:
        """The range as CLI help says it: "±36 semitones", "0-10", "-120 to 0 dBFS"."""
        if self.choices:
            return ", ".join(self.choices)
        if self.minimum is None:
            return ""
        unit = f" {self.unit}" if self.unit else ""
        if self.minimum == -self.maximum:
            return f"±{_num(self.maximum)}{unit}"
        sep = " to " if self.minimum < 0 else "-"
        return f"{_num(self.minimum)}{sep}{_num(self.maximum)}{unit}"

    def cli_help(self, default: object = None) -> str:
        shown = self.default if default is None else default
        words = self.default_text.format(default=shown) if self.default_text else (
            f"{shown:g}" if isinstance(shown, float) else str(shown))  # 0.2, -50, 4
        ranged = f" ({self.range_text()})" if self.range_text() else ""
        return f"{self.help}{ranged}. Default: {words}."

    def coerce(self, value: object, text: bool = False) -> object:
        """`value` as this knob's type, or KnobError: numbers must be numbers (not booleans; strings
        only with `text`, as typed into a field; the wire sends JSON numbers) and finite, integers
        whole; strings strings; None only where `nullable`."""
        if value is None and self.nullable:
            return None
        if text and isinstance(value, str) and self.kind is not str:
            try:
                value = self.kind(value)
            except ValueError:
                pass  # refused below, with the wanted type
        if self.kind is str:
            ok, wanted = isinstance(value, str), "a string or null" if self.nullable else "a string"
        elif self.kind is int:
            ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            wanted = "a finite number"
        if not ok:
            raise KnobError(self, f"must be {wanted}, got {_describe(value)}")
        return self.kind(value)

    def check(self, value: object) -> object:
        """`coerce`, then the range or the choices."""
        value = self.coerce(value)
        if value is None:
            return value
        if self.choices and value not in self.choices:
            raise KnobError(self, f"must be one of {', '.join(self.choices)}, got {value!r}")
        if self.minimum is not None and not self.minimum <= value <= self.maximum:
            unit = f" {self.unit}" if self.unit else ""
            rule = (f"within ±{_num(self.maximum)}{unit}" if self.minimum == -self.maximum
                    else f"between {_num(self.minimum)} and {_num(self.maximum)}{unit}")
            raise KnobError(self, f"must be {rule}, got {value:g}")
        return value

    def spec(self) -> dict:
        """The page's description of this knob's control (JSON)."""
        return {"name": self.name, "label": self.label, "help": self.help, "kind": self.kind.__name__,
                "control": self.control, "basic": self.basic, "minimum": self.minimum,
                "maximum": self.maximum, "step": self.step, "unit": self.unit, "choices": list(self.choices),
                "default": self.default, "voices": self.voices}


GUIDANCE = {"minimum": 0.0, "maximum": 10.0, "step": 0.05}
KNOB_TABLE: tuple[Knob, ...] = (
    Knob("speaker", str, None, "speaker", "Target speaker name", ("--speaker",), nullable=True,
         control="speaker", basic=True, default_text="the model's default (first) speaker; a voice you "
         "fine-tuned is its model's default"),
    Knob("pitch_shift", float, 0.0, "pitch", "Pitch shift (--pitch auto: auto pitch, see --pitch-mode)",
         ("--pitch",), -MAX_PITCH_SHIFT, MAX_PITCH_SHIFT, "semitones", basic=True,
         words=(("auto", "pitch_mode", "auto"),)),
    Knob("pitch_mode", str, "fixed", "pitch mode", "Model voices: auto follows your median pitch and shifts "
         "towards the target speaker's median in whole semitones (auto-continuous: not rounded); the "
         "pitch shift adds to it", ("--pitch-mode",), choices=PITCH_MODES, control="select", basic=True,
         voices="model"),
    Knob("formant_shift", float, 1.0, "formant", "Formant (timbre) shift factor, above 1 brighter, below "
         "1 darker; pitch unchanged", ("--formant",), 0.5, 2.0, step=0.01, basic=True),
    Knob("cfg_strength", float, 2.0, "guidance", "V2 models: classifier-free guidance strength on "
         "Whisper, 0 = off", ("--cfg-strength",), **{**GUIDANCE, "step": 0.1}, voices="v2"),
    Knob("ds_cfg_strength", float, 0.2, "content guidance", "V3 models: content-degradation guidance "
         "strength, 0 = off (its pass is skipped)", ("--ds-cfg-strength",), **GUIDANCE, voices="v3"),
    Knob("spk_cfg_strength", float, 0.8, "speaker guidance", "V3 models: speaker guidance strength, "
         "against the null speaker, 0 = off", ("--spk-cfg-strength",), **GUIDANCE, voices="v3"),
    Knob("skip_cfg_strength", float, 0.0, "skip-layer guidance", "V3 models: skip-layer guidance "
         "strength, 0 = off", ("--skip-cfg-strength",), **GUIDANCE, voices="v3"),
    Knob("cfg_skip_layers", int, -1, "skipped block", "V3 models: the DiT block (0-based) the "
         "skip-layer pass bypasses; upstream suggests depth/2; -1 = none", ("--cfg-skip-layers",), -1,
         MAX_DEPTH - 1, voices="v3"),
    Knob("cfg_rescale", float, 0.7, "guidance rescale", "V3 models: guidance rescale towards the "
         "unguided velocity's std, 0 = off", ("--cfg-rescale",), 0.0, 1.0, step=0.05, voices="v3"),
    Knob("steps", int, 4, "sampling steps", "Rectified-flow sampling steps (grid points): more is "
         "smoother and costs more compute per block", ("--steps",), 2, MAX_STEPS, voices="model",
         default_text="{default}; a distilled student: its own count (1 evaluation = 2 points)"),
    Knob("schedule", str, "uniform", "schedule", "Where the sampling grid points fall for a teacher "
         "model (docs/training.md; a distilled student uses its own grid)", ("--schedule",),
         choices=SCHEDULES, control="select", voices="model"),
    Knob("gate_db", float, -50.0, "noise gate", "Noise gate: input quieter than this gives silence and "
         "skips the voice", ("--gate",), -120.0, 0.0, "dBFS", basic=True),
    Knob("vad", str, "off", "voice gate", "Voice-activity gate (Silero VAD): blocks without speech give "
         "silence, so breath and keyboard noise make no phantom voice", ("--vad",), choices=VAD_CHOICES,
         control="select", basic=True),
    Knob("vad_threshold", float, 0.5, "voice gate threshold", "Speech probability at which the "
         "voice-activity gate opens, higher rejects more noise and more quiet speech", ("--vad-threshold",),
         0.0, 1.0, step=0.05),
    Knob("input_gain_db", float, 0.0, "input gain", "Input gain before conversion", ("--input-gain",),
         -40.0, 40.0, "dB", basic=True),
    Knob("output_gain_db", float, 0.0, "output gain", "Output gain after conversion", ("--output-gain",),
         -40.0, 40.0, "dB", basic=True),
    Knob("seed", int, 0, "seed", "Random seed of the sampler noise", ("--seed",), 0, MAX_SEED,
         control="", voices="model"),
    Knob("denoise", str, "off", "denoise", "Noise suppression on the input: deepfilternet "
         "(DeepFilterNet3, +52 ms latency) or rnnoise (RNNoise, cheaper, +42 ms)", ("--denoise",),
         choices=DENOISE_CHOICES, control="select", basic=True),
)


@functools.cache
def knobs_class(table: tuple[Knob, ...]) -> type:
    """The frozen dataclass with one field per row (its default the row's); one class per table, so
    `knobs_class(KNOB_TABLE) is Knobs`."""
    cls = make_dataclass("Knobs", [(k.name, k.kind | None if k.nullable else k.kind,
                                    field(default=k.default)) for k in table], frozen=True)
    cls.__module__ = __name__  # pickled by name (Ray replicas receive Knobs)
    return cls


Knobs = knobs_class(KNOB_TABLE)
Knobs.__doc__ = "The runtime knobs' values: one field per row of KNOB_TABLE (rtsvc.settings)."
KNOB_NAMES = tuple(k.name for k in KNOB_TABLE)
KNOB_ROWS = {k.name: k for k in KNOB_TABLE}


def validate_knobs(knobs, table: Iterable[Knob] = KNOB_TABLE):
    """`knobs` when every row's value is of its type and in its range, else KnobError (a UserError)
    naming the field; NaN and infinity are refused too."""
    for knob in table:
        knob.check(getattr(knobs, knob.name))
    return knobs


def knob_controls(voice_kind: str, table: Iterable[Knob] = KNOB_TABLE) -> list[Knob]:
    """The rows with a page control that apply to a "dsp" voice or a model of family "v2" / "v3"."""
    kinds = ("all", voice_kind) if voice_kind == "dsp" else ("all", "model", voice_kind)
    return [k for k in table if k.control and k.voices in kinds]


def knob_spec(voice_kind: str, honoured: Collection[str] | None = None,
              table: Iterable[Knob] = KNOB_TABLE) -> list[dict]:
    """The page's controls for a "dsp" voice or a model of family "v2" / "v3" (GET /v1/info):
    the rows with a control that apply to it, and of those only the `honoured` names when the voice
    says which it honours (e.g. a bundle exported without the skip-layer pass)."""
    return [k.spec() for k in knob_controls(voice_kind, table) if honoured is None or k.name in honoured]


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
        coerced = {name: KNOB_ROWS[name].coerce(value, text=True) for name, value in changes.items()}
        with self._lock:
            self._knobs = validate_knobs(replace(self._knobs, **coerced))
            return self._knobs
