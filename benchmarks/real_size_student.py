"""A real-size V3 student checkpoint and pretrained folder, random weights (the CPU voice of
docs/choosing.md).

    python -m benchmarks.real_size_student OUT [--dim 512 --depth 8]

writes, under OUT (nothing is downloaded; weights are random, sizes are the real ones):

    student-v3-DIM-DEPTH.ckpt   a V3 DiT (head_dim 64, ff_mult 4, kernel 31, 2 speakers) made a
        one-evaluation student by `rtsvc.models.student.make_student`, saved in the layout
        `rtsvc distill` writes (student marker nfe 1, grid [0, 1])
    pretrained/                 the upstream layout: ContentVec = HuBERT-base + final_proj,
        NSF-HiFiGAN at the official openvpi size, RMVPE at the published size

Then the bundle a user would run, through the project's own exporter and quantizer:

    rtsvc export OUT/student-v3-512-8.ckpt OUT/student.rtsvc --pretrained-dir OUT/pretrained \\
        --with-encoders --int8
"""

import argparse
import json
from pathlib import Path

import torch
from rtsvc.training.checkpoint import build_checkpoint, save_checkpoint

from rtsvc.models.dit_v3 import DiTV3, DiTV3Config
from rtsvc.models.student import StudentInfo, make_student
from rtsvc.pretrained import LAYOUT

SPEAKERS = {"a": 0, "b": 1}
WEIGHT_NOISE = 0.02  # the upstream init zeroes the output layers: give every layer real work


def _randomise(model: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def write_student(path: Path, dim: int, depth: int, seed: int = 0) -> Path:
    """A random-weight V3 one-evaluation student of size dim-depth, as `rtsvc distill` saves one."""
    config = DiTV3Config(dim=dim, depth=depth, num_speaker=len(SPEAKERS))
    torch.manual_seed(seed)
    student = make_student(DiTV3(config).eval())
    _randomise(student, WEIGHT_NOISE, seed)
    info = StudentInfo(nfe=1, grid=[0.0, 1.0], guidance={}, teacher="random (benchmarks.real_size_student)")
    cfg = {"seed": seed,
           "model": {"dim": dim, "depth": depth, "n_mel_channels": config.n_mel, "head_dim": config.head_dim,
                     "ff_mult": config.ff_mult, "kernel_size": config.kernel_size},
           "dataset": {}, "training": {}, "spk2idx": dict(SPEAKERS), "student": info.as_dict()}
    return save_checkpoint(path, build_checkpoint(student.state_dict(), cfg, 0, 0))


def write_pretrained(root: Path, seed: int = 0) -> Path:
    """ContentVec (HuBERT-base), the official-size NSF-HiFiGAN and RMVPE, random, in the upstream layout."""
    from transformers import HubertConfig

    from rtsvc.features.contentvec import HubertModelWithFinalProj
    from rtsvc.features.hf import quiet_transformers
    from rtsvc.features.rmvpe import Rmvpe, RmvpeConfig
    from rtsvc.models.vocoder import NsfHifiGan, VocoderConfig, unfold_weight_norm, weight_norm_layers

    torch.manual_seed(seed)
    contentvec = root / LAYOUT["contentvec"]
    if not (contentvec / "config.json").exists():
        with quiet_transformers():
            HubertModelWithFinalProj(HubertConfig(architectures=["HubertModelWithFinalProj"])).eval() \
                .save_pretrained(str(contentvec))
    vocoder = root / LAYOUT["vocoder"]
    if not vocoder.exists():
        vocoder.parent.mkdir(parents=True, exist_ok=True)
        config = VocoderConfig()  # the openvpi 44.1 kHz hop-512 128-bin sizes
        model = NsfHifiGan(config)
        (vocoder.parent / "config.json").write_text(json.dumps(config.__dict__, indent=2))
        torch.save({"generator": unfold_weight_norm(model.state_dict(), weight_norm_layers(model))}, vocoder)
    rmvpe = root / LAYOUT["rmvpe"]
    if not rmvpe.exists():
        rmvpe.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": Rmvpe(RmvpeConfig()).state_dict()}, rmvpe)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder to write into")
    ap.add_argument("--dim", type=int, default=512, help="DiT width (default 512)")
    ap.add_argument("--depth", type=int, default=8, help="DiT blocks (default 8)")
    args = ap.parse_args()
    ckpt = write_student(args.out / f"student-v3-{args.dim}-{args.depth}.ckpt", args.dim, args.depth)
    pretrained = write_pretrained(args.out / "pretrained")
    print(f"{ckpt}\n{pretrained}")


if __name__ == "__main__":
    main()
