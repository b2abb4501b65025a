"""The one place a voice is opened: `VoiceSpec` describes it, `open_voice(spec)` opens it.

Every front end (`rtsvc live`, `serve`, `convert`, `bench`) builds a `VoiceSpec` from its options
and passes that object around; a new voice option is a field here, a CLI option, and the code
that uses it. Torch-free at import (the command line shows these defaults in --help); the voices
and backends, which need torch, load when a voice is opened.

Without a model the built-in DSP voice opens. A `.ckpt` or `.safetensors` voice runs on torch, a
`.rtsvc` bundle on ONNX Runtime. Options are checked before anything slow loads, the model path first.
"""

from dataclasses import dataclass, replace
from pathlib import Path

from rtsvc.errors import UserError
from rtsvc.features.f0_methods import DEFAULT_F0, MODEL_F0, f0_method
from rtsvc.pretrained import DEFAULT_PRETRAINED_DIR, PretrainedPaths, resolve_pretrained
from rtsvc.settings import Knobs
from rtsvc.voice import Voice
from rtsvc.voices.defaults import (
    DIT_CONTEXT_MS,
    ENCODER_CONTEXT_MS,
    MAX_VOCODER_CONTEXT_FRAMES,
    MIN_ENCODER_CONTEXT_MS,
    VOCODER_CONTEXT_FRAMES,
)

STREAMING_TORCH_THREADS = 1  # torch on 2 busy cores: 2 threads made FCPE 10x slower per block
# one stream's F0 beside its encoders (live, convert --stream, bench); `serve` keeps it off (its
# streams already fill the cores); measured in docs/benchmarks.md
CONCURRENT_F0 = True
# ONNX encoder sessions' threads while a torch F0 runs beside them (on the other core); a bundle's
# FCPE graph (~10 ms a block) takes this instead and the encoders keep ONNX Runtime's default
ENCODER_THREADS_BESIDE_F0 = 1


@dataclass(frozen=True)
class VoiceSpec:
    """What voice to open and how. `model=None` is the DSP voice; component paths default to the
    pretrained dir's upstream layout; `streaming=False` gives the offline variant (convert, the
    reference of `rtsvc.bench.blocks.streaming_gap`)."""

    model: Path | None = None  # .ckpt, .safetensors voice or .rtsvc bundle
    pretrained_dir: Path = Path(DEFAULT_PRETRAINED_DIR)
    contentvec: str | None = None  # folder or hub id
    whisper: str | None = None  # folder or hub id
    vocoder: Path | None = None  # NSF-HiFiGAN model.ckpt
    rmvpe: Path | None = None  # RMVPE model.pt
    backend: str = "auto"  # auto, torch, onnx
    device: str = "auto"  # torch device: auto, cpu, cuda
    f0: str | None = None  # a `rtsvc.features.f0_methods.MODEL_F0` name; None: rmvpe
    precision: str = "fp32"  # torch autocast on CUDA: fp32, fp16, bf16
    speaker: str | None = None  # checked as soon as the model is read
    providers: str | None = None  # ONNX Runtime providers, e.g. "cuda,cpu"
    streaming: bool = True
    dit_context_ms: float = DIT_CONTEXT_MS  # streaming: left context the DiT samples
    encoder_context_ms: float = ENCODER_CONTEXT_MS  # streaming: left context ContentVec/Whisper see
    vocoder_context: int = VOCODER_CONTEXT_FRAMES  # streaming: mel frames vocoded before the output
    threads: int | None = None  # CPU threads: torch's (process-wide) and each ONNX Runtime session's;
    # None: ONNX Runtime's own default, and torch at STREAMING_TORCH_THREADS when streaming on a CPU
    concurrent_f0: bool = False  # streaming: F0 beside the encoders on a side thread (same results)
    pitch_reference: Path | None = None  # --pitch auto: recordings of the target (rtsvc.voices.auto_pitch)

    def with_(self, **changes) -> "VoiceSpec":
        """A copy with some fields changed (bench opens one spec per backend and device)."""
        return replace(self, **changes)

    def validate(self) -> "VoiceSpec":
        """User mistakes that need nothing loaded; returns self with `f0` resolved."""
        f0 = check_f0(self.f0)
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if not self.dit_context_ms >= 0:  # `not >=` also refuses NaN
            raise UserError(f"--dit-context-ms must be at least 0 ms, got {self.dit_context_ms:g}")
        if not MIN_ENCODER_CONTEXT_MS <= self.encoder_context_ms < float("inf"):  # NaN fails too
            raise UserError(f"--encoder-context-ms must be a number of ms from {MIN_ENCODER_CONTEXT_MS:g} on "
                            f"(the encoders' edge frames), got {self.encoder_context_ms:g}")
        if not 0 <= self.vocoder_context <= MAX_VOCODER_CONTEXT_FRAMES:
            raise UserError(f"--vocoder-context must be 0 to {MAX_VOCODER_CONTEXT_FRAMES} mel frames, "
                            f"got {self.vocoder_context}")
        if self.providers is not None:  # a typo fails here, even where no bundle would use them
            from rtsvc.backends.providers import parse_providers  # onnxruntime-free until a probe

            parse_providers(self.providers)
        if self.model is not None and not Path(self.model).exists():
            raise UserError(f"model not found: {self.model}")
        return replace(self, f0=f0)

    def needed_components(self) -> tuple[str, ...]:
        """What the model needs from the pretrained dir: a .rtsvc bundle carries its vocoder (and the
        encoders when exported --with-encoders), so those are not asked of the pretrained dir."""
        f0 = check_f0(self.f0)
        whisper = ["whisper"] if self.model is None or _uses_whisper(self.model) else []  # V3: none
        weights = f0_method(f0).weights  # RMVPE's model.pt; FCPE and WORLD need none
        need = ["contentvec", *whisper, "vocoder"] + ([weights] if weights else [])
        if self.model is not None and Path(self.model).is_dir():
            from rtsvc.backends.bundle import bundle_components

            need = [n for n in need if n not in bundle_components(self.model)]
        return tuple(need)

    def pretrained_paths(self) -> PretrainedPaths:
        return resolve_pretrained(Path(self.pretrained_dir), contentvec=self.contentvec,
                                  whisper=self.whisper, vocoder=self.vocoder, rmvpe=self.rmvpe,
                                  need=self.needed_components())


def sampling_steps(knobs: Knobs, voice: Voice, requested: int | None) -> Knobs:
    """`knobs` with the steps a command runs: `requested` (--steps) when given, else a distilled
    student's own count (its evaluations + 1), else the command's default already in `knobs`."""
    own = getattr(voice, "default_steps", None)
    return knobs if requested is not None or own is None else replace(knobs, steps=own)


def describe_voice(voice: Voice, model: Path | None, speaker: str | None = None) -> str:
    """The line live, convert and serve print: which model and which speaker are active."""
    if model is None:
        return "voice: built-in DSP voice (no model)"
    active = speaker if speaker is not None else voice.speakers[0]
    others = [name for name in voice.speakers if name != active]
    listed = ", ".join(others[:8]) + (", ..." if len(others) > 8 else "")
    rest = f" (also: {listed}; --speaker)" if others else ""
    backend = getattr(voice, "backend", None)
    runs = getattr(backend, "providers", None)  # ONNX Runtime: where it runs, and any fallback
    if runs:
        from rtsvc.backends.providers import short_name

        rest += f"; ONNX Runtime on {', '.join(map(short_name, runs))}"
        rest += f" ({backend.fallback})" if getattr(backend, "fallback", None) else ""
    return f"voice: {model}, speaker {active}{rest}"


def model_family(model: str | Path) -> str:
    """The family name ("v2", "v3", ...) of a .ckpt (from its keys, weights not read) or a .rtsvc
    bundle (its manifest)."""
    from rtsvc.backends.bundle import bundle_family, is_bundle

    if is_bundle(model):
        return bundle_family(model)
    from rtsvc.models.loading import checkpoint_family  # torch

    return checkpoint_family(model)


def _uses_whisper(model: str | Path) -> bool:
    from rtsvc.models.families import family_named  # torch

    return family_named(model_family(model)).uses_whisper


def check_f0(f0: str | None) -> str:
    """--f0 as given (None: the default, rmvpe); a name --f0 does not offer is a UserError."""
    return DEFAULT_F0 if f0 is None else f0_method(f0, MODEL_F0).name


def open_voice(spec: VoiceSpec) -> Voice:
    """The voice of every command: the DSP voice without a model, else a `ModelVoice` on torch
    (.ckpt) or ONNX Runtime (.rtsvc bundle)."""
    spec = spec.validate()
    if spec.model is None:
        from rtsvc.voices.dsp import DspVoice  # pyworld

        voice = DspVoice()
        if spec.speaker is not None and spec.speaker not in voice.speakers:  # no blends: one voice
            raise UserError(f"unknown speaker {spec.speaker!r}; the voice has: {', '.join(voice.speakers)}")
        return voice
    return open_model(spec, spec.pretrained_paths())


def open_model(spec: VoiceSpec, pretrained: PretrainedPaths) -> Voice:
    """A ready `ModelVoice` for `spec.model` with components from `pretrained`."""
    from rtsvc.backends.base import BACKENDS
    from rtsvc.backends.bundle import is_bundle
    from rtsvc.compute import pick_device
    from rtsvc.features.extractor import FeatureExtractor
    from rtsvc.voices.model import ModelVoice

    if spec.backend not in BACKENDS:
        raise UserError(f"unknown backend {spec.backend!r}: use auto, torch or onnx")
    path = Path(spec.model)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    bundle = is_bundle(path)
    torch_device = pick_device(spec.device)
    if bundle and spec.backend == "torch":
        raise UserError(f"{path} is an exported .rtsvc bundle, which runs on --backend onnx; "
                        "for torch pass the .ckpt it was exported from")
    if not bundle and spec.backend == "onnx":
        raise UserError(f"--backend onnx needs an exported .rtsvc bundle (rtsvc export), got {path}")
    torch_threads = spec.threads or (STREAMING_TORCH_THREADS if spec.streaming and torch_device.type == "cpu"
                                     else None)
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    if bundle:
        model = _open_onnx(path, spec.device, pretrained, spec.providers, spec.threads)
    else:
        from rtsvc.backends.torch_backend import TorchBackend

        if pretrained.vocoder is None:
            raise UserError("NSF-HiFiGAN vocoder not found: pass --pretrained-dir FOLDER (where `rtsvc "
                            "download` put it), run `rtsvc download`, or point --vocoder at it")
        model = TorchBackend.from_checkpoint(path, pretrained.vocoder, torch_device, spec.precision)
    from rtsvc.voices.blend import check_speaker

    check_speaker(spec.speaker, model.speakers)  # a name or a blend of names (rtsvc.voices.blend)
    f0 = spec.f0 or DEFAULT_F0  # library callers may pass any rtsvc.features.f0_methods name
    own = getattr(model, "feature_extractor", None)  # a bundle exported --with-encoders runs its own
    # F0 beside the encoders on a CPU: each takes one core (measured fastest)
    beside = spec.concurrent_f0 and spec.streaming and spec.threads is None and torch_device.type == "cpu"
    encoder_threads = ENCODER_THREADS_BESIDE_F0 if beside else None
    features = (own(pretrained, f0, torch_device, encoder_threads) if own else None) or \
        FeatureExtractor.from_pretrained(pretrained, f0=f0, device=torch_device, family=model.family)
    voice = ModelVoice(model, features, streaming=spec.streaming, dit_context_ms=spec.dit_context_ms,
                       concurrent_f0=spec.concurrent_f0, encoder_context_s=spec.encoder_context_ms / 1000.0,
                       vocoder_context=spec.vocoder_context)
    voice.speaker_index(spec.speaker)  # a blend on a bundle that takes an index only fails here
    if spec.pitch_reference is not None:  # --pitch auto's target from recordings (one F0 pass at start)
        from rtsvc.voices.auto_pitch import reference_stats

        voice.pitch_reference = reference_stats(spec.pitch_reference, voice.f0_of_audio)
    return voice


def _open_onnx(path: Path, device: str, pretrained: PretrainedPaths, providers: str | None = None,
               threads: int | None = None):
    """The ONNX Runtime backend of a `.rtsvc` bundle (onnxruntime: heavy, and optional)."""
    try:
        from rtsvc.backends.onnx_backend import OnnxBackend
    except ImportError as err:
        raise UserError(f"the onnx backend is not available here ({err}); use a .ckpt with "
                        "--backend torch") from None
    return OnnxBackend.open(path, device=device, pretrained=pretrained, providers=providers, threads=threads)
