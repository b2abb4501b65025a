"""Distilled students: a teacher DiT plus a second time input, run without guidance branches.

A student predicts the *average* velocity u(x_t, t, dt) over [t, t + dt] (MeanFlow's u(z, r, t)
with dt = t - r), so one Euler update x + dt * u lands where the teacher's 32-point guided
trajectory lands. The second time input is an embedding of dt added to the teacher's time
embedding; its output layer starts at zero, so a fresh student is exactly its teacher network.

The network is called with `time` of shape [b, 2] = (t, dt); a 1-D `time` means dt = 0 (the
instantaneous velocity). The teacher's guidance at distill time is baked into the targets, so a
student runs one branch (full conditioning) per evaluation.

Checkpoint: the upstream layout plus `time_embed.interval.*` keys, and a marker
`hyper_parameters.cfg.student` (`StudentInfo.as_dict`) that `load_dit` reads.

Families: each family's record (`rtsvc.models.families`) names its student velocity below; the
second time input goes on whichever `TimestepEmbedding` the network holds. V2 and V3 are wired end
to end (distill, checkpoint round trip, export, convert); V2's quality is measured.
"""

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rtsvc.errors import UserError
from rtsvc.models.dit import TimestepEmbedding
from rtsvc.models.flow import Conditioning

STUDENT_KEY = "student"  # hyper_parameters.cfg[STUDENT_KEY]
RECIPE = "trajectory-meanflow"


@dataclass
class StudentInfo:
    """What a student checkpoint records about itself (the marker)."""
    nfe: int  # network evaluations per block it was distilled for
    grid: list[float]  # its default time grid (nfe + 1 points of the teacher's grid)
    teacher_points: int = 32  # the teacher's uniform grid its targets were integrated on
    guidance: dict = field(default_factory=dict)  # baked-in teacher guidance, e.g. {"cfg_strength": 2.0}
    recipe: str = RECIPE
    teacher: str = ""  # teacher checkpoint path, for the record

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudentInfo":
        try:
            info = cls(nfe=int(d["nfe"]), grid=[float(t) for t in d["grid"]],
                       teacher_points=int(d.get("teacher_points", 32)), guidance=dict(d.get("guidance", {})),
                       recipe=str(d.get("recipe", RECIPE)), teacher=str(d.get("teacher", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"malformed student marker in the checkpoint ({err})") from None
        if len(info.grid) != info.nfe + 1:
            raise UserError(f"student marker: grid has {len(info.grid)} points for nfe {info.nfe}")
        return info

    def grid_for(self, points: int) -> list[float]:
        """A grid of `points` (= evaluations + 1) on the teacher's lattice; its own for nfe + 1."""
        if points == self.nfe + 1:
            return list(self.grid)
        last = self.teacher_points - 1
        return [round(last * k / (points - 1)) / last for k in range(points)]


class _IntervalTime(nn.Module):
    """Mixed into a family's timestep embedding: time [b, 2] = (t, dt) -> emb(t) + interval(dt)."""

    interval: TimestepEmbedding

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        if time.ndim == 1:  # dt = 0: the instantaneous velocity
            time = torch.stack((time, torch.zeros_like(time)), dim=-1)
        return super().forward(time[:, 0]) + self.interval(time[:, 1])


_STUDENT_CLASSES: dict[type, type] = {}


def _time_embedding(model: nn.Module) -> tuple[str, nn.Module]:
    """The network's one timestep embedding (V2 `time_embed`, V3 `tembed`), found by its type."""
    found = [(name, m) for name, m in model.named_children() if isinstance(m, TimestepEmbedding)]
    if len(found) != 1:
        raise UserError(f"{type(model).__name__} has {len(found)} TimestepEmbedding children, not one: "
                        "this network cannot be distilled")
    return found[0]


def make_student(model: nn.Module) -> nn.Module:
    """Give `model` (in place) the second time input, zero-initialised: outputs are unchanged.

    The timestep embedding's class is swapped for a subclass that adds the interval embedding,
    so every upstream key keeps its name and the new ones sit under `<attr>.interval.`."""
    _, emb = _time_embedding(model)
    if isinstance(emb, _IntervalTime):
        return model
    base = type(emb)
    if base not in _STUDENT_CLASSES:
        _STUDENT_CLASSES[base] = type(f"Student{base.__name__}", (_IntervalTime, base), {})
    emb.__class__ = _STUDENT_CLASSES[base]
    dim = model.config.dim
    emb.interval = TimestepEmbedding(dim).to(next(emb.parameters()))
    nn.init.normal_(emb.interval.time_emb.weight, std=emb.interval.time_emb.in_features ** -0.5)
    nn.init.zeros_(emb.interval.time_emb.bias)
    nn.init.zeros_(emb.interval.proj.weight)  # zero output: the student starts as its teacher
    nn.init.zeros_(emb.interval.proj.bias)
    return model


def is_student(model: nn.Module) -> bool:
    try:
        return isinstance(_time_embedding(model)[1], _IntervalTime)
    except UserError:
        return False


# --- the students' velocities (named by their families' records) ---------------------------------

def v2_student_velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                        cond: Conditioning) -> torch.Tensor:
    """A V2 student's average velocity over [t, t + dt]: one forward, full conditioning."""
    b = x.shape[0]
    t = t.reshape(-1).expand(b) if t.numel() == 1 else t
    dt = dt.reshape(-1).expand(b) if dt.numel() == 1 else dt
    time = torch.stack((t.to(x.dtype), dt.to(x.dtype)), dim=-1)
    keep_whisper = torch.zeros_like(t, dtype=torch.bool)  # a tensor, not False: traces to ONNX
    return model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, whisper=cond.whisper,
                 time=time, drop_whisper=keep_whisper, mask=cond.mask)


def v3_student_velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                        cond: Conditioning) -> torch.Tensor:
    """A V3 student's average velocity over [t, t + dt]: one forward with every condition (the p_c
    pass of V3 guidance), no degraded-content, null-speaker or skip-layer pass."""
    b = x.shape[0]
    t = t.reshape(-1).expand(b) if t.numel() == 1 else t
    dt = dt.reshape(-1).expand(b) if dt.numel() == 1 else dt
    time = torch.stack((t.to(x.dtype), dt.to(x.dtype)), dim=-1)
    return model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, time=time, mask=cond.mask)

