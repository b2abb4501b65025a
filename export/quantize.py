"""int8 ONNX graphs for CPUs: what `rtsvc export --precision int8` writes, with its parity table.

Per graph, the scheme that measured faster on a 2-core AVX-512 VNNI CPU (docs/benchmarks.md,
"int8 bundles"):

    dit.onnx, contentvec.onnx, whisper_encoder.onnx   dynamic int8 (weights int8 per channel,
        activations quantized per call): their cost is MatMul/Gemm, which ONNX Runtime runs as
        int8 GEMMs; nothing to calibrate. Weights use 7 bits (`reduce_range`): on x86 CPUs without
        VNNI (AVX2 only) ONNX Runtime's uint8 x int8 GEMM adds pairs of products in saturating int16
        (255 * 127 * 2 > 32767), which on a tiny DiT tripled the error (rel. L2 0.106 instead of
        the exact integer result's 0.042, onnxruntime 1.31.1 and 1.32.0 alike); 7-bit weights cannot
        saturate (255 * 63 * 2 < 32767), run the same kernels, and a bundle may move between CPUs
    vocoder.onnx   static (calibrated) int8 QDQ on Conv, ConvTranspose and LeakyReLU (the activations
        between two convolutions stay int8: 11% faster for +0.003 rel. L2; the residual Adds stay fp32,
        quantizing them cost 3.5x the error): activation ranges come
        from vocoding real mel spectrograms (the calibration audio), so no per-call range scan;
        dynamic int8 made it 3.5-4x slower. If the static graph is not faster here, the fp32 graph
        is kept (`QuantizedGraph.kept_fp32`)

Every int8 graph's output is compared with its fp32 graph on the same inputs (relative L2 and the
log-spectral distance of the vocoder's audio): that is the parity table the manifest records.
"""

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DYNAMIC_OPS = ["MatMul", "Gemm"]
STATIC_OPS = ["Conv", "ConvTranspose", "LeakyRelu"]
TIMING_REPEATS = 5


@dataclass
class QuantizedGraph:
    graph: str  # file name in the bundle
    scheme: str  # "dynamic int8 (MatMul, Gemm; 7-bit weights)", "static int8 QDQ (Conv)" or "fp32"
    rel_l2: float  # ||int8 - fp32|| / ||fp32|| over the parity inputs
    fp32_ms: float  # mean time per parity input, this machine
    int8_ms: float
    kept_fp32: bool = False  # int8 was slower here, so the bundle keeps the fp32 graph

    def row(self) -> dict:
        return asdict(self)


def without_shape_hints(src: Path, dst: Path) -> Path:
    """A copy of `src` without the exporter's intermediate shapes: the tracer records some from the
    example input (e.g. a dimension of 256 where the graph computes 512), which the quantizer's
    shape inference then refuses."""
    import onnx

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    onnx.save_model(model, str(dst), save_as_external_data=src.with_name(src.name + ".data").exists(),
                    location=dst.name + ".data")
    return dst


def quantize_dynamic_graph(src: Path, dst: Path) -> None:
    """Dynamic int8 of every MatMul/Gemm weight (per channel, 7 bits: see the module docstring),
    activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    plain = without_shape_hints(src, dst.with_name(dst.name + ".plain.onnx"))
    try:
        # int8 weights: even Whisper fits in 2 GB
        quantize_dynamic(str(plain), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=True, op_types_to_quantize=DYNAMIC_OPS)
    finally:
        plain.unlink()
        plain.with_name(plain.name + ".data").unlink(missing_ok=True)


def quantize_static_graph(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    """Static int8 QDQ of `STATIC_OPS` with activation ranges from `calibration` feeds."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(src), str(dst), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=STATIC_OPS, calibrate_method=CalibrationMethod.MinMax)


def compare(fp32: Path, int8: Path, feeds: list[dict[str, np.ndarray]], threads: int | None = None):
    """(relative L2 over all feeds, fp32 ms, int8 ms per feed), the two sessions timed alternately."""
    from rtsvc.backends.onnx_backend import make_session

    a, b = make_session(fp32, threads=threads), make_session(int8, threads=threads)
    num = den = 0.0
    times = {"a": [], "b": []}
    for feed in feeds:
        ya, yb = a.run(None, feed)[0], b.run(None, feed)[0]  # warm-up and the parity numbers
        num += float(np.sum((ya.astype(np.float64) - yb) ** 2))
        den += float(np.sum(ya.astype(np.float64) ** 2))
        for _ in range(TIMING_REPEATS):
            for name, session in (("a", a), ("b", b)):
                started = time.perf_counter()
                session.run(None, feed)
                times[name].append((time.perf_counter() - started) * 1000.0)
    return float(np.sqrt(num / max(den, 1e-30))), float(np.mean(times["a"])), float(np.mean(times["b"]))


def quantize_graph(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], static: bool,
                   threads: int | None = None, keep_if_slower: bool = True) -> QuantizedGraph:
    """Quantize `src` into `dst` (dynamic, or static calibrated on `feeds`); measure it against fp32
    on `feeds`; if int8 is slower and `keep_if_slower`, `dst` gets the fp32 graph instead."""
    scratch = dst.with_name(dst.name + ".int8")
    if static:
        quantize_static_graph(src, scratch, feeds)
        scheme = f"static int8 QDQ ({', '.join(STATIC_OPS)})"
    else:
        quantize_dynamic_graph(src, scratch)
        scheme = "dynamic int8 (MatMul, Gemm; 7-bit weights)"
    rel, fp32_ms, int8_ms = compare(src, scratch, feeds, threads)
    kept = keep_if_slower and int8_ms >= fp32_ms
    if kept:
        scratch.unlink()
        if src != dst:
            shutil.copyfile(src, dst)
    else:
        scratch.replace(dst)
    return QuantizedGraph(dst.name, "fp32" if kept else scheme, rel, fp32_ms, int8_ms, kept)


# --- feeds: what each graph sees at run time ----------------------------------------------------

def vocoder_feeds(audio_44k: list[np.ndarray], frames: int = 40, seed: int = 0) -> list[dict]:
    """Vocoder inputs from real audio: its log-mel (the mel the DiT learns to produce), F0 by
    WORLD's harvest, random phases and noise, in `frames`-long windows."""
    import torch

    from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, HOP_LENGTH, SAMPLE_RATE, resample
    from rtsvc.dsp.mel import log_mel_spectrogram
    from rtsvc.features.f0 import f0_to_mel_frames, make_f0_extractor
    from rtsvc.models.vocoder import draw_source_randomness

    f0_extractor = make_f0_extractor("pyworld")
    g = torch.Generator().manual_seed(seed)
    feeds = []
    for audio in audio_44k:
        n = len(audio) // HOP_LENGTH
        mel = log_mel_spectrogram(torch.from_numpy(audio[: n * HOP_LENGTH]).float()[None])  # [1, 128, n]
        f0 = f0_to_mel_frames(f0_extractor(resample(audio, SAMPLE_RATE, ENCODER_SAMPLE_RATE)), mel.shape[-1])
        for start in range(0, mel.shape[-1] - frames + 1, frames):
            phase, noise = draw_source_randomness(1, frames * HOP_LENGTH, g)
            feeds.append({"mel": mel[..., start:start + frames].numpy().astype(np.float32),
                          "f0": f0[None, start:start + frames].astype(np.float32),
                          "phase": phase.numpy().astype(np.float32),
                          "noise": noise.numpy().astype(np.float32)})
    return feeds


def dit_feeds(session_path: Path, num_speaker: int, interface: list[str], frames: int = 100,
              count: int = 4) -> list[dict]:
    """Random but plausible DiT inputs for the graph's interface (the manifest's `dit.inputs`: V2, V3
    or a student's; export.graphs' examples), only those the graph takes."""
    import onnxruntime as ort
    import torch
    from rtsvc.export.graphs import dit_example, dit_v3_example, student_example, student_v3_example

    from rtsvc.backends.bundle import DIT_INPUTS, DIT_V3_INPUTS, STUDENT_DIT_INPUTS, STUDENT_V3_DIT_INPUTS

    examples = {DIT_INPUTS: dit_example, DIT_V3_INPUTS: dit_v3_example, STUDENT_DIT_INPUTS: student_example,
                STUDENT_V3_DIT_INPUTS: student_v3_example}
    names = tuple(interface) or DIT_INPUTS  # bundles from before V3 list no inputs: they are V2
    if names not in examples:
        raise ValueError(f"{session_path}: unknown DiT interface {list(names)}")
    inputs = {i.name: i.type for i in ort.InferenceSession(str(session_path)).get_inputs()}
    feeds = []
    for seed in range(count):
        example = examples[names](1, frames, num_speaker, torch.Generator().manual_seed(seed))
        feed = {k: v.numpy() for k, v in zip(names, example, strict=True) if k in inputs}
        if inputs.get("spk") == "tensor(int64)":  # a format-1 bundle takes an index, not weights
            feed["spk"] = feed["spk"].argmax(axis=1)
        feeds.append(feed)
    return feeds


def calibration_tones() -> list[np.ndarray]:
    """Sung tones at low, middle and high pitch (44.1 kHz): the vocoder's calibration audio."""
    from rtsvc.dsp.signals import sung_tone

    return [sung_tone(3.0, f0=f0, seed=i) for i, f0 in enumerate((110.0, 180.0, 330.0))]


def contentvec_feeds(audio_44k: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, SAMPLE_RATE, resample

    return [{"audio": resample(a[i:i + SAMPLE_RATE], SAMPLE_RATE, ENCODER_SAMPLE_RATE)[None]}
            for a in audio_44k for i in range(0, len(a) - SAMPLE_RATE + 1, SAMPLE_RATE)]


def whisper_feeds(count: int = 3, frames: int = 100) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"mel": rng.uniform(-1.0, 1.0, (1, 128, frames)).astype(np.float32),
             "position_offset": np.array(50 * i, dtype=np.int64)} for i in range(count)]


def quantize_bundle(bundle_dir: str | Path, threads: int | None = None, step=None) -> list[QuantizedGraph]:
    """Turn an fp32 bundle into the int8 one in place (see the module docstring); the manifest gets
    `export.precision: "int8"` and the parity table under `export.int8`."""
    from rtsvc.backends.bundle import DIT_FILE, VOCODER_FILE, read_bundle, write_manifest
    from rtsvc.errors import UserError

    bundle = read_bundle(bundle_dir)
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("files", "format_version")}
    if manifest.get("export", {}).get("precision") != "fp32":
        raise UserError(f"{bundle_dir}: only an fp32 bundle can be quantized (this one is "
                        f"{manifest.get('export', {}).get('precision')})")
    step = step or (lambda label: None)
    tones = calibration_tones()
    interface = manifest["dit"].get("inputs", [])
    table = manifest["dit"].get("num_speaker", max(len(bundle.speakers), 1))  # the speaker table's rows
    jobs = [(DIT_FILE, False, lambda p: dit_feeds(p, table, interface)),
            (VOCODER_FILE, True, lambda p: vocoder_feeds(tones))]
    features = manifest.get("features", {})
    if (features.get("contentvec") or {}).get("onnx"):
        jobs.append((features["contentvec"]["onnx"], False, lambda p: contentvec_feeds(tones)))
    if (features.get("whisper") or {}).get("onnx"):  # V3 manifests: whisper is null
        jobs.append((features["whisper"]["onnx"], False, lambda p: whisper_feeds()))
    rows = []
    for name, static, feeds in jobs:
        step(f"int8: {name}")
        path = bundle.file(name)
        scratch = path.with_name(path.stem + ".fp32.onnx")
        path.replace(scratch)
        data = path.with_name(path.name + ".data")  # external weights (the real Whisper encoder)
        try:
            rows.append(quantize_graph(scratch, path, feeds(scratch), static=static, threads=threads))
        except Exception:
            scratch.replace(path)  # leave the fp32 bundle as it was
            raise
        scratch.unlink()
        data.unlink(missing_ok=True)  # the int8 graph fits in one file
    manifest["export"] = {**manifest.get("export", {}), "precision": "int8", "int8": [r.row() for r in rows]}
    write_manifest(bundle_dir, manifest)
    return rows


def int8_copy(bundle_dir: str | Path, out_dir: str | Path, threads: int | None = None) -> Path:
    """An int8 copy of an fp32 bundle at OUT_DIR/NAME (reused when a finished one is there): what
    `rtsvc eval --config live:int8` runs. The copy is quantized beside and renamed when done."""
    from rtsvc.backends.bundle import is_bundle, read_bundle

    src, dst = Path(bundle_dir), Path(out_dir) / Path(bundle_dir).name
    if is_bundle(dst) and read_bundle(dst, verify_hashes=False).manifest.get("export", {}).get("precision") \
            == "int8":
        return dst
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(src, partial)
    quantize_bundle(partial, threads=threads)
    shutil.rmtree(dst, ignore_errors=True)
    partial.replace(dst)
    return dst
