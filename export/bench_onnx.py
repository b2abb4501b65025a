"""Per-block DiT compute: torch vs ONNX Runtime, on random weights (no downloads needed).

    python -m rtsvc.export.bench_onnx                                  # dit-512-8, 1 s window, CPU
    python -m rtsvc.export.bench_onnx --dims 512-8,768-12 --devices cpu,cuda --providers cuda,tensorrt

One "block" is what the streaming engine pays per window: `steps - 1` Euler updates, each one
CFG velocity (null and full Whisper branch batched, cfg 2.0) over the window's mel frames, plus
(with --vocoder) vocoding the window. Both backends go through the same `Backend` interface the
runtime uses (`TorchBackend`, `OnnxBackend`), so ORT timings include IO binding on CUDA.
Prints a table; nothing is asserted.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rtsvc.export.onnx_export import export_dit, export_vocoder

from rtsvc.backends.bundle import read_bundle, write_manifest
from rtsvc.backends.onnx_backend import OnnxBackend, choose_providers, short_name
from rtsvc.backends.torch_backend import TorchBackend
from rtsvc.dsp.audio import HOP_LENGTH, SAMPLE_RATE
from rtsvc.models.dit import DiT, DiTConfig
from rtsvc.models.flow import Conditioning, sample
from rtsvc.models.guidance import Guidance
from rtsvc.models.loading import LoadedDiT
from rtsvc.models.vocoder import NsfHifiGan, VocoderConfig, draw_source_randomness

WARMUP = 2
CFG = 2.0
GUIDANCE = Guidance(cfg_strength=CFG)


def _random_dit(dim: int, depth: int) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(dim=dim, depth=depth, num_speaker=2)).eval()
    with torch.no_grad():  # the upstream init zeroes output layers; give every layer real work
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _bundle(tmp: Path, dit: DiT, vocoder: NsfHifiGan) -> Path:
    path = tmp / f"bench-{dit.config.dim}-{dit.config.depth}.rtsvc"
    path.mkdir()
    export_dit(dit, path / "dit.onnx")
    export_vocoder(vocoder, path / "vocoder.onnx")
    write_manifest(path, {"audio": {"sample_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH},
                          "speakers": {"a": 0, "b": 1}, "dit": {}, "defaults": {}, "features": {}})
    return path


def _cond(n: int, device: torch.device) -> Conditioning:
    g = torch.Generator().manual_seed(0)
    f0, rms = 200 + 20 * torch.rand(1, n, generator=g), 0.1 * torch.rand(1, n, generator=g)
    cvec, whisper = torch.randn(1, n, 768, generator=g), torch.randn(1, n, 1280, generator=g)
    return Conditioning(*(t.to(device) for t in (torch.tensor([0]), f0, rms, cvec, whisper)))


def _block_fn(backend, n: int, steps: int, vocode: bool):
    """A closure running one block on `backend` (inputs prepared once, outside the timing)."""
    device = backend.device
    cond = _cond(n, device)
    noise = torch.randn(1, n, 128, generator=torch.Generator().manual_seed(1)).to(device)
    phase, src = draw_source_randomness(1, n * HOP_LENGTH, torch.Generator().manual_seed(2))
    phase, src = phase.to(device), src.to(device)

    def block() -> None:
        with torch.inference_mode():
            mel = sample(lambda x, t: backend.guided_velocity(x, t, cond, GUIDANCE), noise, steps)
            if vocode:
                backend.vocode(mel.transpose(1, 2) * 7 - 5, cond.f0, phase, src)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return block


def _time_interleaved(blocks: dict, repeats: int) -> dict[str, list[float]]:
    """Time the backends in turn, block by block, so a busy machine slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for i in range(WARMUP + repeats):
        for name, block in blocks.items():
            start = time.perf_counter()
            block()
            if i >= WARMUP:
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def run(dims: list[tuple[int, int]], steps_list: list[int], seconds: float, devices: list[str],
        providers: str | None, repeats: int, vocode: bool, threads: int | None) -> list[dict]:
    n = int(round(seconds * SAMPLE_RATE / HOP_LENGTH))
    rows = []
    vocoder = NsfHifiGan(VocoderConfig()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        for dim, depth in dims:
            dit = _random_dit(dim, depth)
            bundle = _bundle(Path(tmp), dit, vocoder)
            for device in devices:
                dev = torch.device(device)
                loaded = LoadedDiT(model=dit.to(dev), speakers={"a": 0, "b": 1}, config=dit.config,
                                   path=bundle, dataset={})
                backends = {"torch": TorchBackend(loaded, vocoder.to(dev), dev)}
                if device == "cpu":
                    onnx_sets = [["CPUExecutionProvider"]]
                else:
                    onnx_sets = [[p, "CPUExecutionProvider"] for p in choose_providers(providers)
                                 if p != "CPUExecutionProvider"]
                for provs in onnx_sets:
                    name = f"onnx {short_name(provs[0])}"
                    backends[name] = OnnxBackend(read_bundle(bundle), provs, dev, threads)
                for steps in steps_list:
                    blocks = {name: _block_fn(b, n, steps, vocode) for name, b in backends.items()}
                    for name, times in _time_interleaved(blocks, repeats).items():
                        rows.append({"model": f"dit-{dim}-{depth}", "device": device, "backend": name,
                                     "steps": steps, "frames": n, "mean_ms": statistics.mean(times),
                                     "p50_ms": statistics.median(times), "min_ms": min(times)})
                        print_row(rows[-1])
            dit.to("cpu")
    return rows


def run_encoders(seconds_list: list[float], whisper_layers: int, repeats: int, threads: int | None) -> None:
    """ContentVec (HuBERT-base size) and a Whisper-large-v3-width encoder with `whisper_layers`
    layers (time scales with the layer count; large-v3 runs 31 of its 32 for hidden_states[-2]),
    random weights, torch vs ORT CPU, on unpadded windows of `seconds_list`."""
    from rtsvc.export.graphs import ContentVecGraph, WhisperGraph
    from rtsvc.export.onnx_export import _export
    from transformers import HubertConfig, WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    from rtsvc.backends.onnx_backend import make_session
    from rtsvc.features.contentvec import HubertModelWithFinalProj
    from rtsvc.features.whisper import WhisperEncoder

    torch.manual_seed(0)
    hubert = ContentVecGraph(HubertModelWithFinalProj(HubertConfig()).eval())
    wcfg = WhisperConfig(d_model=1280, encoder_layers=whisper_layers, encoder_attention_heads=20,
                         encoder_ffn_dim=5120, num_mel_bins=128)
    extractor = WhisperFeatureExtractor(feature_size=128)
    whisper = WhisperGraph(WhisperEncoder(HFWhisperEncoder(wcfg).eval(), extractor, torch.device("cpu")))
    print("| encoder | window s | backend | mean ms | p50 ms | min ms |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {
            "contentvec (hubert-base)": (
                hubert, ("audio",), lambda sec: (torch.randn(1, int(sec * 16000)) * 0.1,),
                {"audio": {0: "b", 1: "samples"}, "features": {0: "b", 1: "frames"}}),
            f"whisper-large-v3 width, {whisper_layers} layers": (
                whisper, ("mel", "position_offset"), lambda sec: (torch.randn(1, 128, int(sec * 100)),
                                                                  torch.tensor(0)),
                {"mel": {0: "b", 2: "frames"}, "features": {0: "b", 1: "positions"}}),
        }
        for label, (module, names, make, axes) in graphs.items():
            path = Path(tmp) / "enc.onnx"
            _export(module, make(1.0), path, names, "features", axes, 17)
            session = make_session(path, threads=threads)
            for sec in seconds_list:
                x = make(sec)
                feeds = {k: v.numpy() for k, v in zip(names, x, strict=True)}
                with torch.inference_mode():
                    blocks = {"torch": lambda x=x, m=module: m(*x),
                              "onnx cpu": lambda f=feeds, s=session: s.run(None, f)}
                    for backend, times in _time_interleaved(blocks, repeats).items():
                        print(f"| {label} | {sec:g} | {backend} | {statistics.mean(times):.1f} | "
                              f"{statistics.median(times):.1f} | {min(times):.1f} |", flush=True)


def print_row(row: dict) -> None:
    print(f"| {row['model']} | {row['device']} | {row['backend']} | {row['steps']} | {row['frames']} | "
          f"{row['mean_ms']:.1f} | {row['p50_ms']:.1f} | {row['min_ms']:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="512-8", help="comma list of DIM-DEPTH (default 512-8)")
    ap.add_argument("--steps", default="2,4,8", help="sampling steps (grid points), default 2,4,8")
    ap.add_argument("--seconds", type=float, default=1.0, help="window length in seconds (default 1)")
    ap.add_argument("--devices", default="cpu", help="torch devices: cpu,cuda (default cpu)")
    ap.add_argument("--providers", default=None, help="ORT GPU providers to try, e.g. cuda,tensorrt "
                    "(default: all that start)")
    ap.add_argument("--repeats", type=int, default=10, help="timed blocks per row (default 10)")
    ap.add_argument("--vocoder", action="store_true", help="also vocode the window (real-size random "
                    "vocoder)")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and ORT intra-op "
                    "(default: each library's own default)")
    ap.add_argument("--encoders", action="store_true", help="benchmark ContentVec and Whisper encoders "
                    "instead of the DiT")
    ap.add_argument("--whisper-layers", type=int, default=8, help="Whisper layers to build (default 8)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.encoders:
        run_encoders([1.0, 3.0], args.whisper_layers, args.repeats, args.threads)
        return
    dims = [tuple(int(v) for v in d.split("-")) for d in args.dims.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; window {args.seconds:g} s, "
          f"CFG {CFG} (batched), times per block in ms")
    print("| model | device | backend | steps | frames | mean ms | p50 ms | min ms |")
    print("|---|---|---|---|---|---|---|---|")
    run(dims, [int(s) for s in args.steps.split(",")], args.seconds, args.devices.split(","),
        args.providers, args.repeats, args.vocoder, args.threads)


if __name__ == "__main__":
    main()
