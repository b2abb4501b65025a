"""Per-block DiT compute: torch vs ONNX Runtime, on random weights (no downloads needed).

    python -m export.bench_onnx                                  # dit-512-8, 1 s window, CPU
    python -m export.bench_onnx --dims 512-8,768-12 --devices cpu,cuda --providers cuda,tensorrt

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

from export.onnx_export import export_dit, export_vocoder
from rtsvc.audio import HOP_LENGTH, SAMPLE_RATE
from rtsvc.backends import TorchBackend
from rtsvc.bundle import read_bundle, write_manifest
from rtsvc.dit import DiT, DiTConfig
from rtsvc.flow import Conditioning, sample
from rtsvc.models import LoadedDiT
from rtsvc.onnx_backend import OnnxBackend, choose_providers, short_name
from rtsvc.vocoder import NsfHifiGan, VocoderConfig, draw_source_randomness

WARMUP = 2
CFG = 2.0


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


def _time_block(backend, n: int, steps: int, repeats: int, vocode: bool) -> list[float]:
    device = backend.device
    cond = _cond(n, device)
    noise = torch.randn(1, n, 128, generator=torch.Generator().manual_seed(1)).to(device)
    phase, src = draw_source_randomness(1, n * HOP_LENGTH, torch.Generator().manual_seed(2))
    phase, src = phase.to(device), src.to(device)
    times = []
    for i in range(WARMUP + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            mel = sample(lambda x, t: backend.velocity_cfg(x, t, cond, CFG), noise, steps)
            if vocode:
                backend.vocode(mel.transpose(1, 2) * 7 - 5, cond.f0, phase, src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append((time.perf_counter() - start) * 1000)
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
                for name, backend in backends.items():
                    for steps in steps_list:
                        times = _time_block(backend, n, steps, repeats, vocode)
                        rows.append({"model": f"dit-{dim}-{depth}", "device": device, "backend": name,
                                     "steps": steps, "frames": n, "mean_ms": statistics.mean(times),
                                     "p50_ms": statistics.median(times), "min_ms": min(times)})
                        print_row(rows[-1])
            dit.to("cpu")
    return rows


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
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    args = ap.parse_args()
    dims = [tuple(int(v) for v in d.split("-")) for d in args.dims.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; window {args.seconds:g} s, "
          f"CFG {CFG} (batched), times per block in ms")
    print("| model | device | backend | steps | frames | mean ms | p50 ms | min ms |")
    print("|---|---|---|---|---|---|---|---|")
    run(dims, [int(s) for s in args.steps.split(",")], args.seconds, args.devices.split(","),
        args.providers, args.repeats, args.vocoder, args.threads)


if __name__ == "__main__":
    main()
