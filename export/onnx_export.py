"""torch -> ONNX for the DiT (its CFG velocity), the vocoder and optionally the feature encoders.

Graphs (names fixed in `rtsvc.backends.bundle`, described in docs/bundle.md):
  dit.onnx      x [b, n, 128], t [b], spk [b, S] speaker weights, f0 [b, n], rms [b, n], cvec [b, n, 768],
                whisper [b, n, 1280], cfg_strength [] -> velocity [b, n, 128]
                The null-whisper and full branches run as one batch of 2b inside the graph;
                v = v_null + cfg_strength * (v_full - v_null).
  vocoder.onnx  mel [b, 128, n] log-mel, f0 [b, n] Hz, phase [b or 1, 9], noise [b, n*512, 9]
                -> audio [b, n*512]; the harmonic source's randomness is an input, so a run is a
                pure function of its inputs and ORT matches torch exactly given the same draws.
Batch and frame count are dynamic axes.

Exporter: the TorchScript exporter (`dynamo=False`) is used first: it exports these models with
dynamic axes in well under a second and ORT runs the result at the same speed as the dynamo
export; the dynamo exporter (onnxscript) is the fallback if TorchScript export fails.
"""

import copy
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rtsvc.export.graphs import (
    PER_FRAME_INPUTS,
    PER_ITEM_INPUTS,
    ContentVecGraph,
    VocoderGraph,
    WhisperGraph,
    graphs_for,
    vocoder_example,
)
from rtsvc.export.parity import (
    ParityRow,
    check_contentvec,
    check_dit,
    check_fcpe,
    check_vocoder,
    check_whisper,
    default_tolerance,
)
from torch import nn

from rtsvc import __version__
from rtsvc.backends.bundle import (
    DIT_FILE,
    DIT_OUTPUT,
    VOCODER_FILE,
    VOCODER_INPUTS,
    VOCODER_OUTPUT,
    replaceable_bundle_problem,
    sha256_file,
    write_manifest,
)
from rtsvc.dsp.audio import (
    ENCODER_SAMPLE_RATE,
    FMAX,
    FMIN,
    HOP_LENGTH,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
    WIN_LENGTH,
)
from rtsvc.dsp.mel import CLAMP_MIN, LOG_MEL_MAX, LOG_MEL_MIN
from rtsvc.errors import UserError
from rtsvc.features.f0_methods import DEFAULT_F0, MODEL_F0
from rtsvc.models.families import family_named, family_of
from rtsvc.models.loading import LoadedDiT, load_dit, load_vocoder
from rtsvc.models.vocoder import HARMONIC_NUM, NsfHifiGan
from rtsvc.pretrained import DEFAULT_PRETRAINED_DIR, LAYOUT, resolve_pretrained

DEFAULT_OPSET = 17
TRACE_FRAMES = 40  # frames of the example input used to trace (any length works afterwards)
TRACE_BATCH = 2  # >1 so the batch axis is not specialised to 1 while tracing
ProgressFn = Callable[[str], None]  # called with a label before each step
MAX_OPSET = 21  # newest opset ONNX Runtime 1.18+ runs everywhere
DEFAULT_STEPS = 32  # upstream offline default; streaming overrides it with its own knob


def _export(module: nn.Module, example: tuple, path: Path, input_names: tuple[str, ...], output: str,
            dynamic_axes: dict, opset: int) -> str:
    """Export to `path`; returns the exporter used. A graph over protobuf's 2 GB limit (the Whisper
    encoder of large-v3) gets its weights in one `NAME.onnx.data` file beside it."""
    scratch = path.parent / f".{path.name}.export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        exporter = _export_raw(module, example, scratch / path.name, input_names, output, dynamic_axes, opset)
        if len(list(scratch.iterdir())) == 1:
            (scratch / path.name).replace(path)
        else:  # the exporter wrote one file per external tensor: gather them into one
            import onnx

            model = onnx.load(str(scratch / path.name))
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return exporter


def _export_raw(module: nn.Module, example: tuple, path: Path, input_names: tuple[str, ...], output: str,
                dynamic_axes: dict, opset: int) -> str:
    """Export with the TorchScript exporter, falling back to dynamo; returns which one was used."""
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation + tracer warnings about shape arithmetic
            torch.onnx.export(module, example, str(path), input_names=list(input_names),
                              output_names=[output], dynamic_axes=dynamic_axes, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
        return "torchscript"
    except Exception as first:  # exporter internals raise many types; try the other exporter
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, example, str(path), input_names=list(input_names),
                                  output_names=[output], dynamic_axes=dynamic_axes,
                                  opset_version=max(opset, 18), dynamo=True)
            return "dynamo"
        except Exception as second:
            raise RuntimeError(f"ONNX export failed with both exporters: {first!r}; {second!r}") from second


def export_dit(dit: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET, fp16: bool = False,
               skip_layers: tuple[int, ...] | None = None, student: bool = False) -> str:
    """Write dit.onnx (dynamic batch and frames) with the graph its family lists in
    `export.graphs.DIT_GRAPHS`; returns the exporter used. A teacher: its guided velocity (V2: Whisper
    CFG; V3: every guidance pass, with `skip_layers` fixed in the graph, None: no skip pass). A
    distilled student (`student`): its single-branch average velocity, `dt` instead of strengths.
    Adapters (V3 LoRA) are exported merged (W + alpha / sqrt(rank) B A^T)."""
    family = family_of(dit)
    graphs = graphs_for(family.name)
    graph = graphs.student if student else graphs.teacher
    dit = copy.deepcopy(dit).to("cpu").eval()
    family.merge_adapters(dit)
    module = graph.module(dit.half() if fp16 else dit, skip_layers, fp16)
    generator = torch.Generator().manual_seed(0)
    example = graph.example(TRACE_BATCH, TRACE_FRAMES, dit.config.num_speaker, generator)
    per_frame, per_item = {0: "batch", 1: "frames"}, {0: "batch"}
    axes = {name: per_frame if name in PER_FRAME_INPUTS else per_item for name in graph.inputs
            if name in PER_FRAME_INPUTS + PER_ITEM_INPUTS}
    axes[DIT_OUTPUT] = per_frame
    return _export(module, example, Path(path), graph.inputs, DIT_OUTPUT, axes, opset)


def export_vocoder(vocoder: NsfHifiGan, path: str | Path, opset: int = DEFAULT_OPSET,
                   fp16: bool = False) -> str:
    """Write vocoder.onnx (dynamic batch and frames, randomness as inputs); returns the exporter used."""
    vocoder = vocoder.to("cpu").eval()
    module = VocoderGraph(copy.deepcopy(vocoder).half() if fp16 else vocoder, half=fp16)
    example = vocoder_example(TRACE_BATCH, TRACE_FRAMES, vocoder.upp, torch.Generator().manual_seed(0))
    axes = {"mel": {0: "batch", 2: "frames"}, "f0": {0: "batch", 1: "frames"}, "phase": {0: "phase_batch"},
            "noise": {0: "batch", 1: "samples"}, VOCODER_OUTPUT: {0: "batch", 1: "samples"}}
    return _export(module, example, Path(path), VOCODER_INPUTS, VOCODER_OUTPUT, axes, opset)


# --- feature encoders (optional: --with-encoders) ---------------------------------------------

CONTENTVEC_FILE = "contentvec.onnx"
WHISPER_FILE = "whisper_encoder.onnx"
FCPE_FILE = "fcpe.onnx"  # FCPE's network (mel -> latent); its mel front end and decoder stay torchfcpe's
WHISPER_PREPROCESSOR_DIR = "whisper_preprocessor"
ENCODER_TRACE_SAMPLES = 16000  # 1 s of 16 kHz audio


def export_encoders(paths, work: Path, opset: int, tolerance: float, step: ProgressFn,
                    with_whisper: bool = True):
    """ContentVec and (V2) Whisper encoder graphs + their parity rows; returns (rows, files, exporters)."""
    from rtsvc.features.contentvec import ContentVec
    from rtsvc.features.whisper import WhisperEncoder

    rows, files, exporters = export_fcpe(work, opset, tolerance, step)
    step("exporting contentvec.onnx")
    cvec = ContentVec.load(paths.contentvec, "cpu")
    g = torch.Generator().manual_seed(0)
    exporters["contentvec"] = _export(
        ContentVecGraph(cvec.model), (torch.randn(1, ENCODER_TRACE_SAMPLES, generator=g) * 0.1,),
        work / CONTENTVEC_FILE, ("audio",), "features",
        {"audio": {0: "batch", 1: "samples"}, "features": {0: "batch", 1: "frames"}}, opset)
    step("parity: contentvec")
    rows += check_contentvec(work / CONTENTVEC_FILE, ContentVecGraph(cvec.model), tolerance)
    files["contentvec"] = CONTENTVEC_FILE
    if not with_whisper:  # V3 models take no Whisper
        return rows, files, exporters
    step("exporting whisper_encoder.onnx")
    whisper = WhisperEncoder.load(paths.whisper, "cpu")
    n_mels = whisper.encoder.config.num_mel_bins
    exporters["whisper"] = _export(
        WhisperGraph(whisper), (torch.randn(1, n_mels, 200, generator=g), torch.tensor(7)),
        work / WHISPER_FILE, ("mel", "position_offset"), "features",
        {"mel": {0: "batch", 2: "frames"}, "features": {0: "batch", 1: "positions"}}, opset)
    step("parity: whisper encoder")
    # the reference is the runtime's own torch encoder, not the graph module
    reference = lambda mel, offset: whisper.hidden_from_mel(mel, position_offset=int(offset))  # noqa: E731
    rows += check_whisper(work / WHISPER_FILE, reference, n_mels, tolerance)
    whisper.feature_extractor.save_pretrained(str(work / WHISPER_PREPROCESSOR_DIR))  # its log-mel settings
    files.update({"whisper": WHISPER_FILE,
                  "whisper_preprocessor": f"{WHISPER_PREPROCESSOR_DIR}/preprocessor_config.json"})
    return rows, files, exporters


def export_fcpe(work: Path, opset: int, tolerance: float, step: ProgressFn):
    """FCPE's network from torchfcpe's bundled weights (MIT; no download) + its parity rows: on ONNX
    Runtime it is ~1.9x faster than torch on one CPU core, so `--f0 fcpe` runs it there."""
    from rtsvc.features.f0 import load_fcpe

    step("exporting fcpe.onnx")
    try:
        model = load_fcpe("cpu")
    except UserError as err:  # say why an export needs it
        raise UserError(f"--with-encoders also exports FCPE: {err}") from None
    g = torch.Generator().manual_seed(0)
    exporters = {"fcpe": _export(model.model, (torch.randn(TRACE_BATCH, 64, model.model.input_channels,
                                                           generator=g),),
                                 work / FCPE_FILE, ("mel",), "latent",
                                 {"mel": {0: "batch", 1: "frames"}, "latent": {0: "batch", 1: "frames"}},
                                 opset)}
    step("parity: fcpe")
    return check_fcpe(work / FCPE_FILE, model, tolerance), {"fcpe": FCPE_FILE}, exporters


# --- the bundle -------------------------------------------------------------------------------


@dataclass
class ExportResult:
    path: Path  # the bundle (only written when `ok`)
    rows: list[ParityRow]
    exporters: dict[str, str]  # graph -> exporter used
    ok: bool

    def failures(self) -> "list[ParityRow]":
        return [r for r in self.rows if not r.ok]


def export_steps(with_encoders: bool) -> int:
    """How many progress steps `export_bundle` reports (for a progress bar's total)."""
    return 6 + (6 if with_encoders else 0)


def _check_out(out: Path) -> None:
    """`out` may be new, an empty folder, or a bundle to replace: only a folder that provably is an
    rtsvc bundle is ever deleted (see `replaceable_bundle_problem`)."""
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link; name the bundle folder itself")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; a bundle is a directory (e.g. my-voice.rtsvc)")
    if out.is_dir() and any(out.iterdir()):
        problem = replaceable_bundle_problem(out)
        if problem is not None:
            raise UserError(f"--out {out} is a non-empty folder that export will not replace: {problem}; "
                            "choose another --out")


def _source_info(ckpt: Path) -> dict:
    return {"checkpoint": ckpt.name, "checkpoint_sha256": sha256_file(ckpt), "rtsvc_version": __version__,
            "torch_version": torch.__version__}


def build_manifest(loaded: LoadedDiT, vocoder: NsfHifiGan, options: dict, encoders: dict[str, str]) -> dict:
    """Everything a runtime needs besides the graphs; `files` and `format_version` are added by
    `rtsvc.backends.bundle.write_manifest`."""
    c = loaded.config
    family = family_named(loaded.family)
    graphs = graphs_for(family.name)
    graph = graphs.teacher if loaded.student is None else graphs.student  # student: its guidance is baked in
    dit = {"dim": c.dim, "depth": c.depth, "head_dim": c.head_dim, "ff_mult": c.ff_mult,
           "num_speaker": c.num_speaker, "n_mel": c.n_mel, "cvec_dim": c.cvec_dim,
           **graphs.manifest(c, options.get("skip_layers")),
           "inputs": list(graph.inputs), "output": DIT_OUTPUT}
    strengths = {k: v for k, v in family.default_guidance().items() if k != "cfg_skip_layers"}
    defaults = {"steps": DEFAULT_STEPS, **strengths}
    if loaded.student is not None:  # one evaluation per grid update; its guidance is in the weights
        baked = {k: v for k, v in loaded.student.guidance.items() if k in defaults}  # for the record
        defaults = {**defaults, **baked, "steps": loaded.student.nfe + 1}
    whisper = None if not family.uses_whisper else {
        "sample_rate": ENCODER_SAMPLE_RATE, "dim": c.whisper_dim, "frame_rate": 50,
        "output": "hidden_states[-2]", "onnx": encoders.get("whisper"),
        "preprocessor": encoders.get("whisper_preprocessor")}
    manifest = {
        "name": options["name"],
        "family": loaded.family,
        "audio": {"sample_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH, "n_fft": N_FFT,
                  "win_length": WIN_LENGTH, "n_mels": N_MELS, "fmin": FMIN, "fmax": FMAX,
                  "mel_scale": "slaney", "log": "natural",
                  "clamp_min": CLAMP_MIN, "model_mel_range": [LOG_MEL_MIN, LOG_MEL_MAX]},
        "speakers": dict(loaded.speakers),
        "pitch_stats": dict(loaded.pitch_stats or {}),  # speaker -> log-F0 statistics (auto pitch)
        "dit": dit,
        "vocoder": {**asdict(vocoder.config), "harmonics": HARMONIC_NUM + 1, "inputs": list(VOCODER_INPUTS),
                    "output": VOCODER_OUTPUT},
        "defaults": {**defaults, "speaker": next(iter(loaded.speakers))},  # the checkpoint's default (first)
        "features": {
            "pretrained_layout": {k: LAYOUT[k] for k in ("contentvec", "whisper", "rmvpe")
                                  if k != "whisper" or family.uses_whisper},
            "contentvec": {"sample_rate": ENCODER_SAMPLE_RATE, "dim": c.cvec_dim, "frame_rate": 50,
                           "output": "last_hidden_state", "resize": family.content_resize,
                           "onnx": encoders.get("contentvec")},
            "whisper": whisper,
            "f0": {"extractors": list(MODEL_F0), "default": DEFAULT_F0,
                   "unvoiced": "linear interpolation", "units": "Hz"},
            "fcpe": {"sample_rate": ENCODER_SAMPLE_RATE, "frame_rate": 100, "input": "torchfcpe wav2mel",
                     "output": "latent (local-argmax decoded by torchfcpe)", "onnx": encoders.get("fcpe")},
            "rms": {"frame_length": N_FFT, "hop_length": HOP_LENGTH},
        },
        "export": {"opset": options["opset"], "precision": "fp16" if options["fp16"] else "fp32",
                   "exporters": options["exporters"], "parity": options["parity"]},
        "source": options["source"],
    }
    if loaded.student is not None:
        manifest["student"] = loaded.student.as_dict()  # nfe, grid, guidance: read by the ONNX backend
    return manifest


def _parity_summary(rows: list[ParityRow]) -> dict:
    out: dict[str, dict] = {}
    for r in rows:
        entry = out.setdefault(r.graph, {"max_abs": 0.0, "max_rel": 0.0, "frames": []})
        entry["max_abs"] = max(entry["max_abs"], r.max_abs)
        entry["max_rel"] = max(entry["max_rel"], r.rel)
        entry["frames"].append(r.frames)
    return out


def export_bundle(
    ckpt: str | Path, out: str | Path, pretrained_dir: str | Path | None = DEFAULT_PRETRAINED_DIR,
    vocoder: str | Path | None = None, opset: int = DEFAULT_OPSET, fp16: bool = False,
    with_encoders: bool = False, tolerance: float | None = None, lengths: tuple[int, ...] = (17, 64, 203),
    progress: ProgressFn | None = None, skip_layers: tuple[int, ...] | None = None,
) -> ExportResult:
    """Export a checkpoint (+ vocoder, + optional encoders) to a verified bundle at `out`.

    Work happens in a hidden sibling directory; only a bundle whose every graph passes the parity
    check replaces `out`, so a failed export never leaves a half bundle behind. The first graph
    that fails its check ends the export (its rows are in the result).
    """

    step = progress or (lambda label: None)
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.exists():  # the model path first, before any missing component
        raise UserError(f"model not found: {ckpt}")
    _check_out(out)
    if not 7 <= opset <= MAX_OPSET:
        raise UserError(f"--opset must be between 7 and {MAX_OPSET}, got {opset}")
    tolerance = default_tolerance(fp16) if tolerance is None else tolerance
    step("loading the checkpoint and vocoder")
    loaded = load_dit(ckpt, "cpu")
    if skip_layers is not None and loaded.student is not None:
        raise UserError("--cfg-skip-layers does not apply to a distilled student: its guidance is in its "
                        "weights")
    family = family_named(loaded.family)
    if skip_layers is not None and "cfg_skip_layers" not in family.guidance:
        raise UserError(f"--cfg-skip-layers applies to V3 models only; this checkpoint is {family.label}")
    if skip_layers is not None and not all(0 <= i < loaded.config.depth for i in skip_layers):
        raise UserError(f"--cfg-skip-layers must name blocks 0..{loaded.config.depth - 1}, "
                        f"got {list(skip_layers)}")
    encoders_needed = ("contentvec", "whisper") if family.uses_whisper else ("contentvec",)
    need = ("vocoder", *encoders_needed) if with_encoders else ("vocoder",)
    paths = resolve_pretrained(pretrained_dir, vocoder=vocoder, need=need)
    voc = load_vocoder(paths.vocoder, "cpu")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))  # a new name
    try:
        exporters, encoders = {}, {}
        step("exporting dit.onnx")
        student = loaded.student is not None
        exporters["dit"] = export_dit(loaded.model, work / DIT_FILE, opset, fp16, skip_layers, student)
        step("parity: dit")  # against the torch DiT as loaded (LoRA unmerged)
        rows = check_dit(work / DIT_FILE, loaded.model, lengths, tolerance, skip_layers=skip_layers,
                         student=student)
        if not all(r.ok for r in rows):  # stop early: the other graphs can take minutes
            return ExportResult(out, rows, exporters, ok=False)
        step("exporting vocoder.onnx")
        exporters["vocoder"] = export_vocoder(voc, work / VOCODER_FILE, opset, fp16)
        step("parity: vocoder")
        rows += check_vocoder(work / VOCODER_FILE, voc, lengths, tolerance)
        if with_encoders and all(r.ok for r in rows):
            enc_rows, encoders, enc_exporters = export_encoders(paths, work, opset, tolerance, step,
                                                                with_whisper=family.uses_whisper)
            rows += enc_rows
            exporters.update(enc_exporters)
        if not all(r.ok for r in rows):
            return ExportResult(out, rows, exporters, ok=False)
        step("writing manifest.json")
        options = {"name": out.stem, "opset": opset, "fp16": fp16, "exporters": exporters,
                   "parity": _parity_summary(rows), "source": _source_info(ckpt), "skip_layers": skip_layers}
        write_manifest(work, build_manifest(loaded, voc, options, encoders))
        if out.exists():
            _check_out(out)  # still a bundle (or empty) after the minutes the export took
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(out, rows, exporters, ok=True)
