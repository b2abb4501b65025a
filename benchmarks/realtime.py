"""Per-stage cost of a model voice block at real model sizes (random weights): the per-stage tables
of docs/benchmarks.md.

    python -m benchmarks.realtime                      # CPU, ONNX Runtime: the students, 1 and 2 threads
    python -m benchmarks.realtime --voices v2-512      # + the full V2 voice (Whisper large-v3 size, torch)
    python -m benchmarks.realtime --quality            # + the quality cost of each cut (LSD, rel. L2)
    python -m benchmarks.realtime --device cuda        # GPU: torch fp16 and ORT CUDA/TensorRT (see --help)

Every network has its real size and random weights (nothing is downloaded): DiT dit-512-8 /
dit-768-12; ContentVec = HuBERT-base (transformers' HubertConfig defaults + final_proj); RMVPE at
its real architecture (rtsvc.features.rmvpe); FCPE = torchfcpe's bundled (real) weights; the
official-size NSF-HiFiGAN (openvpi config: upsample 8,8,2,2,2, 512 channels, resblock 1).

Voices:
    v3s-512, v3s-768   a real V3 one-evaluation student (rtsvc.models.dit_v3 + student.make_student,
        benchmarks/real_size_student.py) exported by `rtsvc export --with-encoders` (+ `--int8`) and
        opened as `rtsvc live --model` opens it (`open_voice`): the bundle's DiT, vocoder and
        ContentVec graphs, F0 from the pretrained folder (random real-size RMVPE, or FCPE)
    student-512, student-768   a V2 one-evaluation student of that size (`make_student`, exported by
        export.graphs.StudentVelocity, random weights) evaluated once per block (2 grid points = 1
        update): one branch, no guidance. The feature cache gets a zero Whisper (no encoder).
    v2-512, v2-768             the full V2 voice: Whisper large-v3 size (32 layers, torch, random),
        3 Euler updates x 2 guidance branches (cfg 2).

Rows run ONNX Runtime on the CPU (`fp32`, and `int8` = export/quantize.py's bundle: dynamic int8
DiT and ContentVec, static int8 vocoder where faster), `--threads` for torch and each session, the
configurations interleaved round by round so machine load hits them alike. Prints markdown tables;
"CPU" columns are this process's CPU time per block: on a busy shared machine, with one thread,
that is close to what the block would take on the same core unshared (wall time is load-inflated).
"""

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rtsvc.export.quantize import QuantizedGraph

from rtsvc.bench.blocks import BenchCase, StageTimes, log_spectral_distance
from rtsvc.dsp.audio import ENCODER_SAMPLE_RATE, HOP_LENGTH, SAMPLE_RATE, resample
from rtsvc.dsp.signals import sung_tone
from rtsvc.engine import StreamConfig, StreamingConverter, convert_stream
from rtsvc.settings import Knobs, RuntimeSettings
from rtsvc.voices.spec import STREAMING_TORCH_THREADS

CACHE = Path(os.environ.get("RTSVC_BENCH_CACHE", Path.home() / ".cache" / "rtsvc" / "realtime-bench"))
BLOCKS_MS = (104.5, 150.9, 301.9)
STUDENT_STEPS = 2  # grid points: one Euler update = one evaluation
V2_STEPS = 4  # the streaming default: 3 updates x 2 branches
WHISPER_DIM = 1280
CV1 = -1  # --threads cv1: the default threads but ContentVec's session on one thread (v3s voices)
CV2 = -2  # --threads cv2: the default threads but ContentVec's session at ONNX Runtime's default (v3s voices)
ENCODER_VARIANTS = {CV1: 1, CV2: None}  # ContentVec session threads of those variants
SPEECH = ("The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore, "
          "and the shells she sells are surely sea shells.")


# --- networks at real size, random weights ----------------------------------------------------------

def random_dit(dim: int, depth: int):
    from rtsvc.export.bench_onnx import _random_dit

    return _random_dit(dim, depth)


def random_student(dim: int, depth: int):
    """A V2 one-evaluation student of that size (`make_student`: the teacher plus its interval input)."""
    from rtsvc.models.student import make_student

    return make_student(random_dit(dim, depth))


STUDENT_MARKER = {"nfe": 1, "grid": [0.0, 1.0]}  # what `rtsvc distill` records: one evaluation, 0 -> 1


class NullWhisper:
    """No Whisper (the student / V3 stand-in): zero features, no encoder run."""

    dim = WHISPER_DIM

    def hidden(self, audio_16k, pad_to_30s: bool = True, position_offset: int = 0) -> torch.Tensor:
        return torch.zeros(max(len(audio_16k) // 320, 1), WHISPER_DIM)

    def encode(self, audio_16k, n_frames: int, pad_to_30s: bool = True, position_offset: int = 0):
        return torch.zeros(n_frames, WHISPER_DIM)


def random_whisper_large(device: str = "cpu"):
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    from rtsvc.features.whisper import WhisperEncoder

    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        num_mel_bins=128)
    encoder = HFWhisperEncoder(cfg).eval()
    if device != "cpu":
        encoder = encoder.half()  # GPU rows: Whisper in fp16, as `--precision fp16` runs it
    return WhisperEncoder(encoder, WhisperFeatureExtractor(feature_size=128), torch.device(device))


def f0_extractor(name: str, device: str = "cpu"):
    from rtsvc.features.f0 import F0Extractor, make_f0_extractor

    if name != "rmvpe":
        return make_f0_extractor(name, device=device)
    from rtsvc.features.rmvpe import Rmvpe

    torch.manual_seed(0)
    model = Rmvpe().eval().to(device)  # real architecture, random weights
    return F0Extractor("rmvpe", model.f0)


# --- the cached ONNX graphs -------------------------------------------------------------------------

def calibration_audio() -> list[np.ndarray]:
    """espeak-ng speech and the sung tone at 44.1 kHz (what calibration and quality runs hear)."""
    return [speech_audio(), sung_tone(6.0)]


def speech_audio() -> np.ndarray:
    from rtsvc.dsp.audio import load_audio

    path = CACHE / "speech.wav"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["espeak-ng", "-w", str(path), SPEECH], check=True)
    audio = load_audio(path)[0]
    return (0.5 * audio / max(float(np.abs(audio).max()), 1e-6)).astype(np.float32)


def graphs(dims: list[tuple[int, int]], int8: bool, log=print) -> dict[str, Path]:
    """fp32 (and int8) ONNX files in CACHE, built once: vocoder, contentvec, dit-D-L-student, dit-D-L-v2."""
    from rtsvc.export.graphs import ContentVecGraph
    from rtsvc.export.onnx_export import _export, export_dit, export_vocoder
    from rtsvc.export.quantize import quantize_graph, vocoder_feeds

    from rtsvc.features.contentvec import HubertModelWithFinalProj
    from rtsvc.models.vocoder import NsfHifiGan, VocoderConfig

    CACHE.mkdir(parents=True, exist_ok=True)
    out = {}

    def build(name: str, make) -> None:
        path = CACHE / f"{name}.onnx"
        if not path.exists():
            log(f"exporting {name} (random weights, real size)")
            started = time.perf_counter()
            make(path)
            log(f"  {time.perf_counter() - started:.0f} s")
        out[name] = path

    torch.manual_seed(0)
    build("vocoder", lambda p: export_vocoder(NsfHifiGan(VocoderConfig()).eval(), p))
    from transformers import HubertConfig

    build("contentvec", lambda p: _export(
        ContentVecGraph(HubertModelWithFinalProj(HubertConfig()).eval()), (torch.randn(1, 16000) * 0.1,), p,
        ("audio",), "features", {"audio": {0: "b", 1: "samples"}, "features": {0: "b", 1: "frames"}}, 17))
    for dim, depth in dims:
        build(f"dit-{dim}-{depth}-student", lambda p, d=dim, L=depth: export_dit(random_student(d, L), p,
                                                                                student=True))
        build(f"dit-{dim}-{depth}-v2", lambda p, d=dim, L=depth: export_dit(random_dit(d, L), p))
    if int8:
        audio = calibration_audio()
        for name in list(out):
            dst = CACHE / f"{name}-int8.onnx"
            if not dst.exists():
                log(f"quantizing {name}")
                static = name == "vocoder"
                feeds = vocoder_feeds(audio) if static else graph_feeds(name, out[name], audio)
                row = quantize_graph(out[name], dst, feeds, static=static, threads=1)
                (CACHE / f"{name}-int8.parity.json").write_text(json.dumps(row.row()))
            out[f"{name}-int8"] = dst
    return out


def graph_feeds(name: str, path: Path, audio: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Parity/timing inputs for a DiT or ContentVec graph: 1 s windows of the calibration audio
    (ContentVec), or random mel noise on realistic conditioning shapes (DiT, 100 frames)."""
    import onnxruntime as ort

    if name == "contentvec":
        return [{"audio": resample(a[i:i + SAMPLE_RATE], SAMPLE_RATE, ENCODER_SAMPLE_RATE)[None]}
                for a in audio for i in range(0, len(a) - SAMPLE_RATE, 2 * SAMPLE_RATE)]
    from rtsvc.export.graphs import dit_example, student_example

    from rtsvc.backends.bundle import DIT_INPUTS, STUDENT_DIT_INPUTS

    inputs = {i.name for i in ort.InferenceSession(str(path)).get_inputs()}
    names, make = (STUDENT_DIT_INPUTS, student_example) if "dt" in inputs else (DIT_INPUTS, dit_example)
    feeds = []
    for seed in range(4):
        example = make(1, 100, 2, torch.Generator().manual_seed(seed))
        feeds.append({k: v.numpy() for k, v in zip(names, example, strict=True) if k in inputs})
    return feeds


def parity_table(rows) -> str:
    lines = ["| graph | scheme | rel. L2 vs fp32 | fp32 ms | int8 ms | speed-up |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.graph} | {r.scheme} | {r.rel_l2:.4f} | {r.fp32_ms:.1f} | {r.int8_ms:.1f} | "
              f"{r.fp32_ms / r.int8_ms:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


# --- voices ---------------------------------------------------------------------------------------

BACKENDS = ("onnx-cpu", "onnx-cuda", "onnx-tensorrt", "torch-fp32", "torch-fp16")


def make_voice(kind: str, files: dict[str, Path], f0: str, precision: str, threads: int | None,
               whisper_large=None, dit_context_ms: float | None = None, backend: str = "onnx-cpu",
               concurrent_f0: bool = False):
    """A streaming ModelVoice: on an ONNX bundle assembled from the cached graphs (`onnx-*`), or on
    the torch DiT and vocoder (`torch-*`, same seeds as the graphs; students run at cfg 0, one branch);
    `v3s-*`: the exported V3 student bundle, opened by `open_voice`. `threads=None`: the product
    default (torch at STREAMING_TORCH_THREADS, ONNX Runtime sessions at their own default)."""
    if kind.startswith("v3s"):
        return open_student_bundle(kind, f0, precision, threads, concurrent_f0, backend)
    if threads in ENCODER_VARIANTS:
        raise SystemExit("--threads cv1 / cv2 apply to the v3s voices only")
    from rtsvc.backends.bundle import read_bundle, write_manifest
    from rtsvc.backends.onnx_backend import CPU, PROVIDER_NAMES, OnnxBackend, OnnxContentVec, make_session
    from rtsvc.features.extractor import FeatureExtractor
    from rtsvc.voices.defaults import DIT_CONTEXT_MS
    from rtsvc.voices.model import ModelVoice

    family, size = kind.split("-")
    dim, depth = {"512": (512, 8), "768": (768, 12)}[size]
    runtime, flavour = backend.split("-")
    device = torch.device("cpu" if flavour == "cpu" or (runtime == "torch" and not torch.cuda.is_available())
                          else "cuda")
    q = "-int8" if precision == "int8" else ""
    if runtime == "onnx":
        providers = [CPU] if flavour == "cpu" else [PROVIDER_NAMES[flavour], CPU]
        bundle = Path(tempfile.mkdtemp(prefix="rtsvc-bench-"))
        graph = f"dit-{dim}-{depth}" + ("-v2" if family == "v2" else "-student") + q
        os.link(files[graph], bundle / "dit.onnx")
        os.link(files["vocoder" + q], bundle / "vocoder.onnx")
        student = {} if family == "v2" else {"student": STUDENT_MARKER}
        write_manifest(bundle, {"audio": {"sample_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH},
                                "speakers": {"a": 0, "b": 1}, "dit": {}, "defaults": {}, "features": {},
                                **student})
        model = OnnxBackend(read_bundle(bundle, verify_hashes=False), providers, device, threads)
        contentvec = OnnxContentVec(make_session(files["contentvec" + q], providers, threads), device)
    else:
        from transformers import HubertConfig

        from rtsvc.backends.torch_backend import TorchBackend
        from rtsvc.features.contentvec import ContentVec, HubertModelWithFinalProj
        from rtsvc.models.loading import LoadedDiT
        from rtsvc.models.student import StudentInfo
        from rtsvc.models.vocoder import NsfHifiGan, VocoderConfig

        student = None if family == "v2" else StudentInfo.from_dict(STUDENT_MARKER)
        dit = (random_dit(dim, depth) if student is None else random_student(dim, depth)).to(device)
        loaded = LoadedDiT(model=dit, speakers={"a": 0, "b": 1}, config=dit.config, path=Path(kind),
                           dataset={}, student=student)
        torch.manual_seed(0)
        model = TorchBackend(loaded, NsfHifiGan(VocoderConfig()).eval().to(device), device, flavour)
        contentvec = ContentVec(HubertModelWithFinalProj(HubertConfig()), device)
    whisper = whisper_large if family == "v2" else NullWhisper()
    features = FeatureExtractor(contentvec, whisper, f0_extractor(f0, str(device)), device)
    return ModelVoice(model, features, streaming=True,
                      dit_context_ms=DIT_CONTEXT_MS if dit_context_ms is None else dit_context_ms,
                      concurrent_f0=concurrent_f0)


def student_bundle(dim: int, depth: int, precision: str, log=print) -> tuple[Path, Path]:
    """(bundle, pretrained dir) of the real V3 student dim-depth in CACHE, made once: the checkpoint
    and components by benchmarks/real_size_student.py, the bundle by the project's exporter
    (`rtsvc export --with-encoders`, then `--int8`'s quantize_bundle for `int8`)."""
    import shutil

    from rtsvc.export.onnx_export import export_bundle
    from rtsvc.export.quantize import quantize_bundle

    from benchmarks.real_size_student import write_pretrained, write_student

    pretrained = write_pretrained(CACHE / "pretrained")
    ckpt = CACHE / f"student-v3-{dim}-{depth}.ckpt"
    if not ckpt.exists():
        write_student(ckpt, dim, depth)
    fp32 = CACHE / f"student-v3-{dim}-{depth}.rtsvc"
    int8 = CACHE / f"student-v3-{dim}-{depth}-int8.rtsvc"
    want = fp32 if precision == "fp32" else int8
    if want.exists():
        return want, pretrained
    if not fp32.exists():
        log(f"exporting {fp32.name} (rtsvc export --with-encoders)")
        result = export_bundle(ckpt, fp32, pretrained, with_encoders=True)
        if not result.ok:
            raise RuntimeError(f"export of {ckpt} failed its parity check")
    if precision == "int8":
        log(f"quantizing {int8.name} (rtsvc export --int8)")
        shutil.copytree(fp32, int8)
        quantize_bundle(int8, threads=1)
    return want, pretrained


def open_student_bundle(kind: str, f0: str, precision: str, threads: int | None, concurrent_f0: bool,
                        backend: str = "onnx-cpu"):
    """The real V3 student as the product opens it: its bundle on ONNX Runtime (`onnx-cpu`, `-cuda`,
    `-tensorrt`), or its checkpoint on torch (`torch-fp32` on the GPU if there is one, `torch-fp16`)."""
    from rtsvc.voices.spec import VoiceSpec, open_voice

    dim, depth = {"512": (512, 8), "768": (768, 12)}[kind.split("-")[1]]
    bundle, pretrained = student_bundle(dim, depth, precision)
    runtime, flavour = backend.split("-")
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    if runtime == "torch":
        where = {"model": bundle.parent / f"student-v3-{dim}-{depth}.ckpt", "backend": "torch", "device": gpu,
                 "precision": "fp16" if flavour == "fp16" else "fp32"}
    else:
        where = {"model": bundle, "backend": "onnx", "device": "cpu" if flavour == "cpu" else "cuda",
                 "providers": "cpu" if flavour == "cpu" else f"{flavour},cpu"}
    spec = VoiceSpec(pretrained_dir=pretrained, f0=f0,
                     threads=None if threads in ENCODER_VARIANTS else threads,
                     concurrent_f0=concurrent_f0, **where)
    voice = open_voice(spec)
    if threads in ENCODER_VARIANTS:  # ContentVec's threads set apart, DiT and vocoder as default
        from rtsvc.backends.onnx_backend import make_session

        cv = voice.features.contentvec
        cv.session = make_session(bundle / "contentvec.onnx", cv.session.get_providers(),
                                  ENCODER_VARIANTS[threads])
    return voice


def knobs_for(kind: str) -> Knobs:
    """Students: one evaluation, unguided (cfg 0); V2: the streaming default steps, cfg 2."""
    if kind.startswith("v2"):
        return Knobs(gate_db=-120.0, steps=V2_STEPS, pitch_shift=0)
    return Knobs(gate_db=-120.0, steps=STUDENT_STEPS, cfg_strength=0.0, pitch_shift=0)


# --- timing -----------------------------------------------------------------------------------------

class BlockTimer:
    """One configuration streaming the sung tone block by block (`step`), every block's wall and CPU
    time and stages kept: `run_table` steps all configurations in turn, one block each, so machine
    load (other processes) hits them alike."""

    def __init__(self, case: BenchCase, seconds: float, threads: int | None):
        from rtsvc.bench.blocks import WARMUP_BLOCKS

        self.threads = threads if threads and threads > 0 else STREAMING_TORCH_THREADS
        torch.set_num_threads(self.threads)
        self.voice = StageTimes(case.voice)
        self.engine = StreamingConverter(self.voice, RuntimeSettings(knobs_for(case.label)), case.config)
        self.block = self.engine.layout.block
        self.audio = sung_tone(seconds + (WARMUP_BLOCKS + 1) * self.block / SAMPLE_RATE)
        self.engine.process(self.audio[: WARMUP_BLOCKS * self.block])
        self.voice.rows.clear()
        self.next, self.end = WARMUP_BLOCKS, len(self.audio) // self.block
        self.times: list[float] = []
        self.cpu: list[float] = []

    @property
    def done(self) -> bool:
        return self.next >= self.end

    def step(self) -> None:
        torch.set_num_threads(self.threads)  # process-wide: each configuration's own
        chunk = self.audio[self.next * self.block:(self.next + 1) * self.block]
        started, cpu_started = time.perf_counter(), time.process_time()
        self.engine.process(chunk)
        self.times.append((time.perf_counter() - started) * 1000.0)
        self.cpu.append((time.process_time() - cpu_started) * 1000.0)
        self.next += 1

    def result(self) -> dict:
        return {"times": self.times, "cpu": self.cpu, "stages": self.voice.rows,
                "block_ms": self.block * 1000.0 / SAMPLE_RATE}


def merge(parts: list[dict]) -> dict:
    times = [t for p in parts for t in p["times"]]
    cpu = [t for p in parts for t in p["cpu"]]
    rows = [r for p in parts for r in p["stages"]]
    mean = lambda key: float(np.mean([r.get(key, 0.0) for r in rows]))  # noqa: E731
    block = parts[0]["block_ms"]
    st = {k: mean(k) for k in ("f0", "contentvec", "whisper", "dit", "vocoder")}
    st["other"] = float(np.mean(times)) - sum(st.values())  # resample, RMS, SOLA, copies
    return {"block_ms": block, "blocks": len(times), "mean": float(np.mean(times)),
            "cpu": float(np.mean(cpu)), "cpu_p99": float(np.percentile(cpu, 99)),
            "p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)),
            "rtf": float(np.mean(times)) / block, "p99_block": float(np.percentile(times, 99)) / block, **st}


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_table(args, files: dict[str, Path], whisper_large) -> None:
    configs = []
    for backend in args.backends:
        for kind in args.voices:
            for f0 in args.f0:
                for precision in args.precision:
                    if precision == "int8" and (kind.startswith("v2") or backend != "onnx-cpu"):
                        continue  # int8 graphs are for CPUs; guided V2 amplifies int8 error
                    for threads in args.threads:
                        for concurrent in args.concurrent:
                            configs.append((backend, kind, f0, precision, threads, concurrent))
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} CPUs, {load()} at start; "
          f"{args.seconds:g} s per row in {args.rounds} interleaved rounds; ms per block\n")
    print("| backend | voice | F0 | precision | threads | F0 beside encoders | block ms | mean | p50 | p99 | "
          "RTF | p99/block | CPU mean | CPU p99 | F0 | ContentVec | Whisper | DiT | vocoder | other |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    voices = {}
    for config in configs:  # open every voice first, so the rounds below interleave all of them
        backend, kind, f0, precision, threads, concurrent = config
        voices[config] = make_voice(kind, files, f0, precision, threads, whisper_large, backend=backend,
                                    concurrent_f0=concurrent)
    parts: dict[tuple, list[dict]] = {(c, b): [] for c in configs for b in args.blocks}
    for _ in range(args.rounds):
        for block in args.blocks:
            timers = {}
            for config, voice in voices.items():
                voice.reset()
                case = BenchCase(config[1], config[0], voice, StreamConfig(block_ms=block).for_voice(voice))
                timers[config] = BlockTimer(case, args.seconds / args.rounds, config[4])
            while not all(t.done for t in timers.values()):  # one block of each configuration in turn
                for timer in timers.values():
                    if not timer.done:
                        timer.step()
            for config, timer in timers.items():
                parts[config, block].append(timer.result())
    for config in configs:
        backend, kind, f0, precision, threads, concurrent = config
        for block in args.blocks:
            r = merge(parts[config, block])
            names = {None: "default", CV1: "default, ContentVec 1", CV2: "default, ContentVec ORT default"}
            label = names.get(threads, threads)
            print(f"| {backend} | {kind} | {f0} | {precision} | {label} | "
                  f"{'on' if concurrent else 'off'} | {r['block_ms']:.1f} | "
                  f"{r['mean']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['rtf']:.2f} | "
                  f"{r['p99_block']:.2f} | {r['cpu']:.0f} | {r['cpu_p99']:.0f} | {r['f0']:.0f} | "
                  f"{r['contentvec']:.0f} | {r['whisper']:.0f} | {r['dit']:.0f} | {r['vocoder']:.0f} | "
                  f"{r['other']:.0f} |", flush=True)
    print(f"\n{load()} at end")


# --- quality cost of each cut ---------------------------------------------------------------------

def vocode_from(voice, mel: torch.Tensor, f0: torch.Tensor, first: int, start: int) -> np.ndarray:
    """Audio of window frames first ... n-1 (`mel` holds those frames) as the voice's vocoder stage
    makes it (`rtsvc.voices.model.vocode_group` with one job, seed 0)."""
    from rtsvc.voices.model import BlockJob, vocode_group

    need = (f0.shape[1] - first) * HOP_LENGTH
    job = BlockJob(None, f0, first, first, start, Knobs(seed=0), 0, need)
    return vocode_group(voice.backend, [job], [mel])[0]


def vocoder_context_error(voice, audio: np.ndarray, contexts=(0, 1, 2, 4, 8, 12, 16), tail_frames: int = 17,
                          window_frames: int = 60) -> list[tuple[int, float, float]]:
    """(context frames, LSD dB, rel. L2) of vocoding only the kept tail plus `context` frames
    vs vocoding the whole window, over consecutive windows of `audio`'s real mel."""
    from rtsvc.dsp.mel import log_mel_spectrogram
    from rtsvc.features.f0 import f0_to_mel_frames, make_f0_extractor

    mel = log_mel_spectrogram(audio)
    f0 = torch.from_numpy(f0_to_mel_frames(make_f0_extractor("pyworld")(
        resample(audio, SAMPLE_RATE, ENCODER_SAMPLE_RATE)), mel.shape[-1])).float()[None]
    rows = []
    for c in contexts:
        full_parts, cut_parts = [], []
        for end in range(window_frames, mel.shape[-1], tail_frames):
            m, f = mel[..., end - window_frames:end], f0[:, end - window_frames:end]
            start = (end - window_frames) * HOP_LENGTH
            full = vocode_from(voice, m, f, 0, start)[-tail_frames * HOP_LENGTH:]
            first = window_frames - tail_frames - c
            cut = vocode_from(voice, m[..., first:], f, first, start)[-tail_frames * HOP_LENGTH:]
            full_parts.append(full)
            cut_parts.append(cut)
        a, b = np.concatenate(full_parts), np.concatenate(cut_parts)
        rows.append((c, log_spectral_distance(b, a), float(np.linalg.norm(a - b) / np.linalg.norm(a))))
    return rows


def run_quality(args, files: dict[str, Path]) -> None:
    """LSD of each approximation against the exact pipeline, on espeak speech and the sung tone."""
    inputs = {"speech": speech_audio()[: 4 * SAMPLE_RATE], "sung": sung_tone(4.0)}
    kind = args.voices[0] if not args.voices[0].startswith("v2") else "student-512"
    knobs = knobs_for(kind)
    threads = max(t if t and t > 0 else STREAMING_TORCH_THREADS for t in args.threads)
    torch.set_num_threads(threads)
    ref = make_voice(kind, files, "fcpe", "fp32", threads)
    if args.vocoder_context:
        run_vocoder_context(ref, inputs)
    run_cuts(args, files, kind, ref, inputs, knobs, threads)


def run_vocoder_context(ref, inputs: dict[str, np.ndarray]) -> None:
    print(f"\n### Vocoder context ({load()}): kept tail 17 frames, official-size NSF-HiFiGAN, random "
          "weights, real mel\n")
    print("| input | context frames | LSD dB vs whole window | rel. L2 |\n|---|---|---|---|")
    for name, audio in inputs.items():
        for c, lsd, rel in vocoder_context_error(ref, audio):
            print(f"| {name} | {c} | {lsd:.3f} | {rel:.2e} |", flush=True)


def run_cuts(args, files: dict[str, Path], kind: str, ref, inputs: dict[str, np.ndarray],
             knobs: Knobs, threads: int) -> None:
    config = StreamConfig(block_ms=150.9)
    print(f"\n### {kind} at 150.9 ms, FCPE: each cut vs the exact pipeline ({load()}; random weights)\n")
    print("| comparison | input | LSD dB |\n|---|---|---|")
    exact_enc = ref.for_streaming(encoder_context_s=None, dit_context_ms=None)  # both on the whole window
    for name, audio in inputs.items():
        exact = convert_stream(exact_enc, audio, knobs, config)
        offline = make_voice(kind, files, "fcpe", "fp32", threads)
        offline.streaming, offline.cache = False, None
        off = offline.convert(audio, knobs)
        streamed = convert_stream(ref, audio, knobs, config)
        beside = make_voice(kind, files, "fcpe", "fp32", threads, concurrent_f0=True)
        rows = [("streaming (defaults) vs offline", streamed, off),
                ("F0 beside the encoders vs one after the other",
                 convert_stream(beside, audio, knobs, config), streamed)]
        for ctx in args.encoder_contexts:  # the default window is ~0.49 s: longer contexts = whole window
            rows.append((f"encoder context {ctx:g} s vs whole window",
                         convert_stream(ref.for_streaming(encoder_context_s=ctx), audio, knobs, config),
                         exact))
        for ms in args.dit_contexts:
            rows.append((f"DiT context {ms:g} ms vs whole window",
                         convert_stream(ref.for_streaming(encoder_context_s=None, dit_context_ms=ms), audio,
                                        knobs, config), exact))
        if "int8" in args.precision and not args.skip_int8_quality:
            q = make_voice(kind, files, "fcpe", "int8", threads)
            rows.append(("int8 vs fp32 (streaming defaults)", convert_stream(q, audio, knobs, config),
                         streamed))
        for label, a, b in rows:
            print(f"| {label} | {name} | {log_spectral_distance(a, b):.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voices", default="student-512,student-768", help="comma list of v3s-512, v3s-768 "
                    "(real V3 students), student-512, student-768 (V2 stand-ins), v2-512, v2-768 (default "
                    "student-512,student-768)")
    ap.add_argument("--f0", default="fcpe,rmvpe", help="comma list of fcpe, rmvpe, pyworld "
                    "(default fcpe,rmvpe)")
    ap.add_argument("--precision", default="fp32,int8", help="comma list of fp32, int8 (default both)")
    ap.add_argument("--threads", default="1,2", help="comma list of CPU thread counts for torch and every "
                    "ONNX Runtime session, or `default` (torch 1, ONNX Runtime its own default, as `rtsvc "
                    "live` runs; default 1,2)")
    ap.add_argument("--concurrent", default="off", help="comma list of off, on: F0 beside the encoders "
                    "on a side thread (default off)")
    ap.add_argument("--blocks", default=",".join(f"{b:g}" for b in BLOCKS_MS),
                    help="comma list of block lengths in ms (default 104.5,150.9,301.9)")
    ap.add_argument("--seconds", type=float, default=6.0, help="audio per row in seconds (default 6)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per row (default 2)")
    ap.add_argument("--backends", default="onnx-cpu", help=f"comma list of {', '.join(BACKENDS)} "
                    "(default onnx-cpu; GPU: torch-fp16,onnx-cuda,onnx-tensorrt)")
    ap.add_argument("--quality", action="store_true", help="also the quality cost of each cut")
    ap.add_argument("--vocoder-context", action="store_true", help="with --quality: also the vocoder "
                    "context sweep (slow)")
    ap.add_argument("--encoder-contexts", default="0.1,0.25,1", help="with --quality: encoder left "
                    "contexts in s to compare (default 0.1,0.25,1)")
    ap.add_argument("--dit-contexts", default="50,100,250", help="with --quality: DiT left contexts in ms "
                    "(default 50,100,250)")
    ap.add_argument("--skip-int8-quality", action="store_true", help="with --quality: leave out int8")
    ap.add_argument("--no-table", action="store_true", help="skip the timing table")
    args = ap.parse_args()
    args.voices = args.voices.split(",")
    args.f0 = args.f0.split(",")
    args.precision = args.precision.split(",")
    named = {"default": None, "cv1": CV1, "cv2": CV2}
    args.threads = [named[t] if t in named else int(t) for t in args.threads.split(",")]
    args.concurrent = [c == "on" for c in args.concurrent.split(",")]
    args.blocks = [float(b) for b in args.blocks.split(",")]
    args.backends = args.backends.split(",")
    args.encoder_contexts = [float(c) for c in args.encoder_contexts.split(",")]
    args.dit_contexts = [float(c) for c in args.dit_contexts.split(",")]
    dims = sorted({(512, 8) if v.endswith("512") else (768, 12)
                   for v in args.voices if not v.startswith("v3s")})
    files = graphs(dims, "int8" in args.precision)
    parity = [QuantizedGraph(**json.loads(p.read_text())) for p in sorted(CACHE.glob("*.parity.json"))]
    if parity:
        print("\nint8 parity (export/quantize.py; random weights, real sizes; 1 thread; measured when "
              "the graph was quantized):\n")
        print(parity_table(parity))
    on_gpu = torch.cuda.is_available() and args.backends != ["onnx-cpu"]
    whisper_large = random_whisper_large("cuda" if on_gpu else "cpu") \
        if any(v.startswith("v2") for v in args.voices) else None
    if not args.no_table:
        run_table(args, files, whisper_large)
    if args.quality:
        run_quality(args, files)


if __name__ == "__main__":
    main()
