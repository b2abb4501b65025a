"""Per-block DiT cost of a V3 voice against a V2 voice of the same size (docs/benchmarks.md).

Random weights at the published sizes; the frames a streaming block samples with the defaults
(block 150.9 ms = 13 frames + 8 vocoder-context frames + 250 ms DiT context = 22 frames: 43
frames), the sampler of `ModelVoice` (steps - 1 guided velocity calls) with each family's default
guidance (V2: Whisper CFG 2.0, 2 passes batched; V3: ds 0.2 + spk 0.8, 3 passes batched, rescale
0.7; and V3 with skip-layer guidance on, one more pass). The variants are timed alternately, block
by block. Run: PYTHONPATH=. python benchmarks/v3_block_cost.py [--dims 512-8,768-12] [--reps 10]
[--device cuda] (a GPU run of the defaults takes well under a minute).
"""

import argparse
import statistics
import time

import torch

from rtsvc.models.dit import DiT, DiTConfig
from rtsvc.models.dit_v3 import DiTV3, DiTV3Config
from rtsvc.models.families import guided_velocity
from rtsvc.models.flow import Conditioning, frame_noise, sample
from rtsvc.models.guidance import Guidance, with_bad_cvec

FRAMES = 43


def conditioning(n: int, whisper: bool, device: str) -> Conditioning:
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(spk=torch.tensor([0]), f0=150 + 100 * torch.rand(1, n, generator=g),
                        rms=0.1 * torch.rand(1, n, generator=g),
                        cvec=torch.randn(1, n, 768, generator=g),
                        whisper=torch.randn(1, n, 1280, generator=g) if whisper else None)
    return Conditioning(*(None if t is None else t.to(device) for t in
                          (cond.spk, cond.f0, cond.rms, cond.cvec, cond.whisper)))


@torch.inference_mode()
def block_ms(model, cond: Conditioning, guidance: Guidance, steps: int) -> float:
    device = cond.f0.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    if model.family == "v3":
        cond = with_bad_cvec(cond, guidance)
    noise = frame_noise(0, cond.f0.shape[1])[None].to(device)
    sample(lambda x, t: guided_velocity(model, x, t, cond, guidance), noise, steps)
    sync()
    return (time.perf_counter() - started) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="512-8,768-12")
    parser.add_argument("--steps", default="2,4")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.device}, threads {torch.get_num_threads()}, "
          f"{FRAMES} frames per block")
    print("| DiT | steps | V2 (cfg 2.0) ms | V3 (ds+spk) ms | V3 (+skip) ms | V3/V2 | V3+skip/V2 |")
    print("|---|---|---|---|---|---|---|")
    for dims in args.dims.split(","):
        dim, depth = map(int, dims.split("-"))
        v2 = DiT(DiTConfig(dim=dim, depth=depth)).eval().to(args.device)
        v3 = DiTV3(DiTV3Config(dim=dim, depth=depth)).eval().to(args.device)
        plain, no_whisper = conditioning(FRAMES, True, args.device), conditioning(FRAMES, False, args.device)
        variants = [(v2, plain, Guidance()),
                    (v3, no_whisper, Guidance()),
                    (v3, no_whisper,
                     Guidance(skip_cfg_strength=0.5, cfg_skip_layers=(depth // 2,)))]
        for steps in map(int, args.steps.split(",")):
            for model, cond, guidance in variants:  # warm-up
                block_ms(model, cond, guidance, steps)
            times = [[], [], []]
            for _ in range(args.reps):
                for i, (model, cond, guidance) in enumerate(variants):
                    times[i].append(block_ms(model, cond, guidance, steps))
            med = [statistics.median(t) for t in times]
            print(f"| {dims} | {steps} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | "
                  f"{med[1] / med[0]:.2f} | {med[2] / med[0]:.2f} |")


if __name__ == "__main__":
    main()
