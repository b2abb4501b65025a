"""Numeric parity of exported graphs: ONNX Runtime against the torch module they came from.

Each graph is run on random inputs of several frame counts (odd ones included, so nothing
relies on a multiple of a block size) and the worst absolute error is compared with the largest
reference value: `rel = max|ort - torch| / max|torch|`. The vocoder is fed the same explicit
phase and noise on both sides, so any difference is numerical, not random.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rtsvc.export.graphs import VocoderGraph, graphs_for, vocoder_example

from rtsvc.backends.bundle import VOCODER_INPUTS
from rtsvc.backends.onnx_backend import make_session
from rtsvc.models.vocoder import NsfHifiGan

DEFAULT_LENGTHS = (17, 64, 203)  # mel frames: 0.2 s, 0.74 s, 2.4 s
FP32_TOLERANCE = 1e-4  # relative to the largest reference value
FP16_TOLERANCE = 2e-2
PARITY_SEED = 1234


@dataclass(frozen=True)
class ParityRow:
    graph: str
    batch: int
    frames: int
    max_abs: float
    ref_max: float
    tolerance: float

    @property
    def rel(self) -> float:
        return self.max_abs / max(self.ref_max, 1e-12)

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.rel <= self.tolerance


def default_tolerance(fp16: bool) -> float:
    return FP16_TOLERANCE if fp16 else FP32_TOLERANCE


def _batch_for(i: int) -> int:
    return 2 if i % 2 else 1  # alternate 1 and 2 so the dynamic batch axis is exercised too


def _compare(graph: str, reference: Callable, session, names: tuple[str, ...], example: tuple,
             tolerance: float) -> ParityRow:
    with torch.no_grad():
        ref = reference(*example).float().numpy()
    feeds = {name: value.numpy() for name, value in zip(names, example, strict=True)}
    out = session.run(None, feeds)[0]
    if out.shape != ref.shape:
        raise RuntimeError(f"{graph}: ONNX output shape {out.shape} differs from torch {ref.shape}")
    err = float(np.max(np.abs(out.astype(np.float64) - ref))) if ref.size else 0.0
    frames = example[0].shape[1] if graph == "dit" else example[0].shape[-1]
    ref_max = float(np.max(np.abs(ref))) if ref.size else 0.0
    return ParityRow(graph, int(example[0].shape[0]), int(frames), err, ref_max, tolerance)


def check_dit(onnx_path: str | Path, dit: torch.nn.Module, lengths=DEFAULT_LENGTHS,
              tolerance: float = FP32_TOLERANCE, providers: list[str] | None = None,
              skip_layers: tuple[int, ...] | None = None, student: bool = False) -> list[ParityRow]:
    """dit.onnx vs the torch DiT (fp32), one row per length: V2 with CFG 2.0; V3 with every guidance
    pass on (ds 0.2, spk 0.8, skip 0.5, rescale 0.7), the DiT as loaded (LoRA unmerged); a distilled
    student (either family): its single-branch velocity at random t, dt."""
    session = make_session(onnx_path, providers or ["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(PARITY_SEED)
    graphs = graphs_for(dit.family)
    graph = graphs.student if student else graphs.teacher
    reference, names, example = graph.module(dit.float().eval(), skip_layers, False), graph.inputs, \
        graph.example
    return [_compare("dit", reference, session, names, example(_batch_for(i), n, dit.config.num_speaker, g),
                     tolerance)
            for i, n in enumerate(lengths)]


def check_vocoder(onnx_path: str | Path, vocoder: NsfHifiGan, lengths=DEFAULT_LENGTHS,
                  tolerance: float = FP32_TOLERANCE, providers: list[str] | None = None) -> list[ParityRow]:
    """vocoder.onnx vs the torch vocoder (fp32) with identical phase/noise, one row per length."""
    session = make_session(onnx_path, providers or ["CPUExecutionProvider"])
    reference = VocoderGraph(vocoder.float().eval())
    g = torch.Generator().manual_seed(PARITY_SEED)
    return [_compare("vocoder", reference, session, VOCODER_INPUTS,
                     vocoder_example(_batch_for(i), n, vocoder.upp, g), tolerance)
            for i, n in enumerate(lengths)]


ENCODER_SECONDS = (0.37, 1.0, 2.3)  # ContentVec input lengths
WHISPER_FRAMES = (64, 237, 3000)  # Whisper mel frames: streaming windows and the padded 30 s
WHISPER_OFFSETS = (40, 1450, 0)  # position offsets (the second is clamped so the window fits)


def _encoder_compare(graph: str, reference, session, feeds: dict[str, torch.Tensor], length: int,
                     tolerance: float) -> ParityRow:
    with torch.no_grad():
        ref = reference(*feeds.values()).float().numpy()
    out = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    if out.shape != ref.shape:
        raise RuntimeError(f"{graph}: ONNX output shape {out.shape} differs from torch {ref.shape}")
    err = float(np.max(np.abs(out - ref)))
    return ParityRow(graph, 1, length, err, float(np.max(np.abs(ref))), tolerance)


def check_contentvec(onnx_path, reference, tolerance: float = FP32_TOLERANCE) -> list[ParityRow]:
    """contentvec.onnx vs torch on noise-like 16 kHz audio; `frames` = output frames (50/s)."""
    session = make_session(onnx_path)
    g = torch.Generator().manual_seed(PARITY_SEED)
    rows = []
    for seconds in ENCODER_SECONDS:
        audio = torch.randn(1, int(seconds * 16000), generator=g) * 0.1
        rows.append(_encoder_compare("contentvec", reference, session, {"audio": audio}, int(seconds * 50),
                                     tolerance))
    return rows


def check_fcpe(onnx_path, model, tolerance: float = FP32_TOLERANCE) -> list[ParityRow]:
    """fcpe.onnx vs torchfcpe's network on the mel of a gliding tone in noise (the network's real
    input, from torchfcpe's own `wav2mel`); `frames` = mel frames (100/s)."""
    session = make_session(onnx_path)
    g = torch.Generator().manual_seed(PARITY_SEED)
    rows = []
    for seconds in ENCODER_SECONDS:
        t = torch.arange(int(seconds * 16000)) / 16000
        tone = 0.3 * torch.sin(2 * torch.pi * (150 * t + 60 * t ** 2))
        tone = tone + 0.02 * torch.randn(t.shape, generator=g)
        with torch.no_grad():
            mel = model.wav2mel(tone.reshape(1, -1, 1), 16000)
        rows.append(_encoder_compare("fcpe", model.model, session, {"mel": mel}, int(mel.shape[1]),
                                     tolerance))
    return rows


def check_whisper(onnx_path, reference, n_mels: int, tolerance: float = FP32_TOLERANCE) -> list[ParityRow]:
    """whisper_encoder.onnx vs torch on random log-mel inputs of several frame counts, with position
    offsets inside the table, past its end (clamped) and zero."""
    session = make_session(onnx_path)
    g = torch.Generator().manual_seed(PARITY_SEED)
    rows = []
    for n, offset in zip(WHISPER_FRAMES, WHISPER_OFFSETS, strict=True):
        feeds = {"mel": torch.randn(1, n_mels, n, generator=g) * 0.5, "position_offset": torch.tensor(offset)}
        rows.append(_encoder_compare("whisper", reference, session, feeds, n, tolerance))
    return rows
