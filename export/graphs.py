"""The torch modules that are traced to ONNX: each model with its randomness and guidance as inputs,
and the example inputs they are traced and parity-checked with. `DIT_GRAPHS` lists each model
family's DiT graphs (a teacher's guided velocity, a student's average velocity) by family name."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rtsvc.backends.bundle import DIT_INPUTS, DIT_V3_INPUTS, STUDENT_DIT_INPUTS, STUDENT_V3_DIT_INPUTS
from rtsvc.errors import UserError
from rtsvc.features.whisper import LAYER_INDEX
from rtsvc.models.dit import DiT
from rtsvc.models.dit_v3 import DiTV3
from rtsvc.models.flow import Conditioning, cfg_velocity
from rtsvc.models.guidance import degrade_content, v3_velocity_all_branches
from rtsvc.models.student import v2_student_velocity, v3_student_velocity
from rtsvc.models.vocoder import NsfHifiGan


class DitCfgVelocity(nn.Module):
    """The DiT's classifier-free-guided velocity in one call (what the sampler needs per step).

    Traced through `rtsvc.models.flow.cfg_velocity` itself (null and full branch as one batch of 2b), so
    the graph computes exactly what the torch backend does. The trace takes the batched branch;
    at cfg_strength 0 the graph still runs both halves and returns v_null, the same value.
    """

    def __init__(self, dit: DiT, half: bool = False):
        super().__init__()
        self.dit = dit
        self.dtype = torch.float16 if half else torch.float32

    def forward(self, x, t, spk, f0, rms, cvec, whisper, cfg_strength):
        d = self.dtype
        cond = Conditioning(spk=spk, f0=f0.to(d), rms=rms.to(d), cvec=cvec.to(d), whisper=whisper.to(d))
        return cfg_velocity(self.dit, x.to(d), t, cond, cfg_strength).float()


class DitV3GuidedVelocity(nn.Module):
    """A V3 DiT's guided velocity in one call: the plain, bad-cvec and null-speaker passes as one
    batch of 3b, plus the skip-layer pass when exported with `skip_layers` (fixed in the graph);
    the strengths are inputs (`rtsvc.models.guidance.v3_velocity_all_branches`)."""

    def __init__(self, dit: DiTV3, skip_layers: tuple[int, ...] | None = None, half: bool = False):
        super().__init__()
        self.dit = dit
        self.skip_layers = skip_layers
        self.dtype = torch.float16 if half else torch.float32

    def forward(self, x, t, spk, f0, rms, cvec, bad_cvec, ds_cfg_strength, spk_cfg_strength,
                skip_cfg_strength, cfg_rescale):
        d = self.dtype
        cond = Conditioning(spk=spk, f0=f0.to(d), rms=rms.to(d), cvec=cvec.to(d), bad_cvec=bad_cvec.to(d))
        return v3_velocity_all_branches(self.dit, x.to(d), t, cond, ds_cfg_strength, spk_cfg_strength,
                                        skip_cfg_strength, cfg_rescale, self.skip_layers).float()


def dit_v3_example(batch: int, frames: int, num_speaker: int, generator: torch.Generator | None = None):
    """Random V3 DiT inputs in DIT_V3_INPUTS order, every guidance pass on."""
    x, t, spk, f0, rms, cvec, _, _ = dit_example(batch, frames, num_speaker, generator)
    bad = degrade_content(cvec)
    return (x, t, spk, f0, rms, cvec, bad, torch.tensor(0.2), torch.tensor(0.8), torch.tensor(0.5),
            torch.tensor(0.7))


class StudentVelocity(nn.Module):
    """A distilled V2 student's average velocity over [t, t + dt]: one single-branch forward, no
    guidance input (it is baked into the weights). Traced through `v2_student_velocity`."""

    def __init__(self, dit: DiT, half: bool = False):
        super().__init__()
        self.dit = dit
        self.dtype = torch.float16 if half else torch.float32

    def forward(self, x, t, dt, spk, f0, rms, cvec, whisper):
        d = self.dtype
        cond = Conditioning(spk=spk, f0=f0.to(d), rms=rms.to(d), cvec=cvec.to(d), whisper=whisper.to(d))
        return v2_student_velocity(self.dit, x.to(d), t, dt, cond).float()


class StudentV3Velocity(nn.Module):
    """A distilled V3 student's average velocity over [t, t + dt]: one forward with every condition
    (no bad-cvec, null-speaker or skip pass; guidance is in the weights). Traced through
    `v3_student_velocity`; a LoRA DiT is merged by the caller."""

    def __init__(self, dit: DiTV3, half: bool = False):
        super().__init__()
        self.dit = dit
        self.dtype = torch.float16 if half else torch.float32

    def forward(self, x, t, dt, spk, f0, rms, cvec):
        d = self.dtype
        cond = Conditioning(spk=spk, f0=f0.to(d), rms=rms.to(d), cvec=cvec.to(d))
        return v3_student_velocity(self.dit, x.to(d), t, dt, cond).float()


class VocoderGraph(nn.Module):
    """The vocoder with its source randomness as explicit inputs."""

    def __init__(self, vocoder: NsfHifiGan, half: bool = False):
        super().__init__()
        self.vocoder = vocoder
        self.dtype = torch.float16 if half else torch.float32

    def forward(self, mel, f0, phase, noise):
        # the harmonic source is computed in float32 (phase accumulation), then cast to mel's dtype
        return self.vocoder(mel.to(self.dtype), f0, phase=phase, noise=noise).float()


def dit_example(batch: int, frames: int, num_speaker: int, generator: torch.Generator | None = None):
    """Random but plausible DiT inputs (voiced/unvoiced f0, small rms) in DIT_INPUTS order."""
    g = generator
    f0 = torch.rand(batch, frames, generator=g) * 700 + 80
    f0[:, : max(1, frames // 5)] = 0.0  # an unvoiced stretch, as in real audio
    return (
        torch.randn(batch, frames, 128, generator=g),
        torch.rand(batch, generator=g),
        speaker_example(batch, num_speaker, g),  # weights over the table (bundle format 2: blends)
        f0,
        torch.rand(batch, frames, generator=g) * 0.2,
        torch.randn(batch, frames, 768, generator=g),
        torch.randn(batch, frames, 1280, generator=g),
        torch.tensor(2.0),
    )


def student_example(batch: int, frames: int, num_speaker: int, generator: torch.Generator | None = None):
    """`dit_example` in STUDENT_DIT_INPUTS order: dt after t, no cfg_strength."""
    x, t, spk, f0, rms, cvec, whisper, _ = dit_example(batch, frames, num_speaker, generator)
    return x, t, torch.rand(batch, generator=generator) * (1 - t), spk, f0, rms, cvec, whisper


def student_v3_example(batch: int, frames: int, num_speaker: int, generator: torch.Generator | None = None):
    """`student_example` in STUDENT_V3_DIT_INPUTS order (no whisper)."""
    return student_example(batch, frames, num_speaker, generator)[:-1]


def vocoder_example(batch: int, frames: int, hop: int, generator: torch.Generator | None = None):
    """Random log-mel in the model's range, f0 with an unvoiced stretch, and the source draws."""
    g = generator
    mel = torch.randn(batch, 128, frames, generator=g) * 1.5 - 6.0
    f0 = torch.rand(batch, frames, generator=g) * 500 + 100
    f0[:, : max(1, frames // 5)] = 0.0
    phase = torch.rand(1, 9, generator=g)
    phase[:, 0] = 0.0
    noise = torch.randn(batch, frames * hop, 9, generator=g)
    return mel, f0, phase, noise


class ContentVecGraph(nn.Module):
    """audio [b, samples] at 16 kHz -> last_hidden_state [b, frames, 768]."""

    def __init__(self, hubert: nn.Module):
        super().__init__()
        self.hubert = hubert

    def forward(self, audio):
        return self.hubert(audio).last_hidden_state


class WhisperGraph(nn.Module):
    """Whisper log-mel [b, 128, frames] (any frames up to 3000: the padded 30 s input or a streaming
    window) and `position_offset` [] int64 -> hidden_states[-2] [b, ceil(frames / 2), d].

    The same computation as `WhisperEncoder.hidden_from_mel`, with the position-embedding start
    as a tensor (clamped so the window fits) so it stays an input of the graph.
    """

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder.encoder  # rtsvc.features.whisper.WhisperEncoder -> transformers encoder
        self.stop = LAYER_INDEX % (len(self.encoder.layers) + 1)  # layers before hidden_states[-2]

    def forward(self, mel, position_offset):
        enc = self.encoder
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        table = enc.embed_positions.weight
        positions = torch.arange(x.shape[1], device=x.device)
        last_start = table.shape[0] - positions.shape[0]  # the window must fit the table
        start = torch.minimum(position_offset.clamp(min=0), last_start + positions[:1] * 0)
        x = x + table[positions + start]
        for layer in enc.layers[: self.stop]:
            x = layer(x, None)
        return x


def speaker_example(batch: int, num_speaker: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Speaker weights [batch, num_speaker]: the first item one-hot (a single speaker), the rest random
    blends, so a traced graph and a parity check see both."""
    weights = torch.rand(batch, num_speaker, generator=generator)
    weights[0] = F.one_hot(torch.randint(0, num_speaker, (), generator=generator), num_speaker)
    return weights / weights.sum(dim=1, keepdim=True)


# --- each family's DiT graphs ---------------------------------------------------------------------

PER_FRAME_INPUTS = ("x", "f0", "rms", "cvec", "whisper", "bad_cvec")  # [batch, frames, ...]
PER_ITEM_INPUTS = ("t", "dt", "spk")  # [batch]; every other input is a 0-d strength


@dataclass(frozen=True)
class DitGraph:
    """One traced DiT interface: `module(dit, skip_layers, half)` wraps the network, `inputs` are
    its inputs in order (the bundle's `dit.inputs`), `example(batch, frames, speakers, generator)`
    random inputs in that order."""

    module: Callable[[nn.Module, tuple[int, ...] | None, bool], nn.Module]
    inputs: tuple[str, ...]
    example: Callable


@dataclass(frozen=True)
class FamilyGraphs:
    """A model family's ONNX export: its teacher and student graphs and its own keys in the
    manifest's `dit` section (`manifest(config, skip_layers)`)."""

    teacher: DitGraph
    student: DitGraph
    manifest: Callable[[object, tuple[int, ...] | None], dict]


def graphs_for(family: str) -> FamilyGraphs:
    if family not in DIT_GRAPHS:
        raise UserError(f"{family.upper()} models have no ONNX export yet; run the .ckpt on --backend torch")
    return DIT_GRAPHS[family]


def _v3_manifest(c, skip_layers: tuple[int, ...] | None) -> dict:
    lora = None if c.lora_rank is None else {"rank": c.lora_rank, "alpha": c.lora_alpha, "merged": True}
    return {"kernel_size": c.kernel_size, "lora": lora,
            "cfg_skip_layers": None if skip_layers is None else list(skip_layers)}


DIT_GRAPHS: dict[str, FamilyGraphs] = {
    "v2": FamilyGraphs(
        teacher=DitGraph(lambda dit, skip, half: DitCfgVelocity(dit, half=half), DIT_INPUTS,
                         dit_example),
        student=DitGraph(lambda dit, skip, half: StudentVelocity(dit, half=half), STUDENT_DIT_INPUTS,
                         student_example),
        manifest=lambda c, skip_layers: {"whisper_dim": c.whisper_dim}),
    "v3": FamilyGraphs(
        teacher=DitGraph(lambda dit, skip, half: DitV3GuidedVelocity(dit, skip, half=half), DIT_V3_INPUTS,
                         dit_v3_example),
        student=DitGraph(lambda dit, skip, half: StudentV3Velocity(dit, half=half), STUDENT_V3_DIT_INPUTS,
                         student_v3_example),
        manifest=_v3_manifest),
}
