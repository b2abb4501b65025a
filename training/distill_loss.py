"""The distillation objective: a student's average velocity against the teacher's guided trajectory.

    grid  = linspace(0, 1, P)                           the teacher's grid (P = 32: its convert default)
    x_0   = noise, x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k)      v = the teacher's *guided* velocity
    pair (i < j):  target u = (x_j - x_i) / (t_j - t_i)             MeanFlow's average velocity
    loss  = mean over valid frames of (u_student(x_i, t_i, t_j - t_i) - target)^2

MeanFlow defines u(z_t, r, t) = 1/(t - r) * integral of v over [r, t] and trains it through a JVP
identity; with a teacher at hand the integral is the teacher's own trajectory, so the target is a
difference of two trajectory points (no JVP, no bootstrapping as in shortcut models). Pairs mix
the intervals a 1- or 2-evaluation student runs (0 -> 1, 0 -> mid, mid -> 1) with random ones on
the grid, so other step counts (--steps) stay meaningful. Each trajectory feeds `pairs` items of
the student's batch (the teacher's P - 1 guided evaluations dominate the cost).
"""

from dataclasses import dataclass, replace

import torch
from rtsvc.training.dataset import lengths_to_mask

from rtsvc.dsp.mel import normalize_mel
from rtsvc.models.families import GuidedVelocity, StepVelocity, family_named
from rtsvc.models.flow import Conditioning
from rtsvc.models.schedules import time_grid
from rtsvc.models.student import StudentInfo


def batch_conditioning(batch: dict[str, torch.Tensor], family: str, guidance: dict) -> Conditioning:
    """A padded batch's conditioning as the family's sampler builds it: with Whisper where the family
    uses it (V2), and the family's per-window preparation (`Family.prepare_condition`: V3's bad_cvec
    when content-degradation guidance is on) made per item from its own valid frames (as convert
    makes it per window), so padding never blurs into the content."""
    record = family_named(family)
    n = batch["mel"].shape[1]
    mask = lengths_to_mask(batch["frame_len"], n)
    cond = Conditioning(spk=batch["spk_id"], f0=batch["f0"], rms=batch["rms"], cvec=batch["cvec"],
                        whisper=batch["whisper"] if record.uses_whisper else None, mask=mask)
    settings = record.settings(guidance)
    bad = None
    for i, length in enumerate(batch["frame_len"].tolist()):
        item = Conditioning(spk=cond.spk[i:i + 1], f0=cond.f0[i:i + 1, :length],
                            rms=cond.rms[i:i + 1, :length], cvec=cond.cvec[i:i + 1, :length])
        made = record.prepare_condition(item, settings).bad_cvec
        if made is not None:
            bad = torch.zeros_like(cond.cvec) if bad is None else bad
            bad[i, :length] = made[0]
    return replace(cond, bad_cvec=bad)


@torch.no_grad()
def teacher_trajectory(teacher: GuidedVelocity, noise: torch.Tensor, cond: Conditioning,
                       grid: torch.Tensor) -> torch.Tensor:
    """Every grid point of the teacher's guided Euler trajectory: [P, b, n, 128] (float32)."""
    points = [noise.float()]
    x = noise
    for i in range(len(grid) - 1):
        x = x + (grid[i + 1] - grid[i]) * teacher(x, grid[i], cond).float()
        points.append(x.float())
    return torch.stack(points)


def deployment_pairs(info: StudentInfo) -> torch.Tensor:
    """Index pairs (i, j) on the teacher's grid that 1- and 2-evaluation students run."""
    last = info.teacher_points - 1
    pairs = set()
    for points in (2, 3, info.nfe + 1):
        idx = [round(t * last) for t in info.grid_for(points)]
        pairs.update(zip(idx[:-1], idx[1:], strict=True))
    return torch.tensor(sorted(pairs), dtype=torch.long)


def sample_pairs(count: int, points: int, deployed: torch.Tensor, deployed_share: float,
                 generator: torch.Generator) -> torch.Tensor:
    """[count, 2] index pairs i < j: a `deployed_share` of them from `deployed`, the rest uniform."""
    device = generator.device
    a = torch.randint(0, points, (count,), generator=generator, device=device)
    b = torch.randint(0, points - 1, (count,), generator=generator, device=device)
    b = b + (b >= a).long()  # b != a
    rand = torch.stack((torch.minimum(a, b), torch.maximum(a, b)), dim=1)
    pick = torch.randint(0, len(deployed), (count,), generator=generator, device=device)
    use = torch.rand(count, generator=generator, device=device) < deployed_share
    return torch.where(use[:, None], deployed.to(device)[pick], rand)


@dataclass
class Trajectories:
    """A batch's teacher trajectories with what the student needs to learn from them again: the
    conditioning and the grid. `rtsvc distill --teacher-reuse` keeps a few and draws new pairs from
    them on the steps between refreshes (training.distill_cache)."""

    cond: Conditioning
    traj: torch.Tensor  # [P, b, n, 128] float32
    grid: torch.Tensor  # [P]


def teacher_trajectories(teacher: GuidedVelocity, batch: dict[str, torch.Tensor], info: StudentInfo,
                         generator: torch.Generator, family: str = "v2") -> Trajectories:
    """The expensive half of a step: noise from `generator`, then the teacher's P - 1 guided steps."""
    mel = batch["mel"]
    cond = batch_conditioning(batch, family, info.guidance)
    noise = torch.randn(normalize_mel(mel).shape, generator=generator, device=mel.device)
    grid = time_grid(info.teacher_points, "uniform", mel.device)
    return Trajectories(cond, teacher_trajectory(teacher, noise, cond, grid), grid)


def trajectory_loss(student: StepVelocity, found: Trajectories, info: StudentInfo, generator: torch.Generator,
                    pairs: int = 4, deployed_share: float = 0.5) -> torch.Tensor:
    """The cheap half: masked MSE of the student's average velocity on `pairs` random intervals per
    trajectory (drawn from `generator`)."""
    cond, traj, grid = found.cond, found.traj, found.grid
    device = traj.device
    b = traj.shape[1]
    ij = sample_pairs(b * pairs, info.teacher_points, deployment_pairs(info), deployed_share, generator)
    item = torch.arange(b, device=device).repeat(pairs)
    x_i, x_j = traj[ij[:, 0], item], traj[ij[:, 1], item]
    t_i, t_j = grid[ij[:, 0]], grid[ij[:, 1]]
    target = (x_j - x_i) / (t_j - t_i)[:, None, None]
    def rep(t: torch.Tensor | None) -> torch.Tensor | None:  # item k*b + i is trajectory i
        return None if t is None else t.repeat(pairs, *([1] * (t.ndim - 1)))

    # the student runs one branch with full conditioning: no bad_cvec
    cond_p = Conditioning(rep(cond.spk), rep(cond.f0), rep(cond.rms), rep(cond.cvec), rep(cond.whisper),
                          rep(cond.mask))
    pred = student(x_i, t_i, t_j - t_i, cond_p)
    err = (pred.float() - target) ** 2
    return err[cond_p.mask].mean()


def distill_loss(student: StepVelocity, teacher: GuidedVelocity, batch: dict[str, torch.Tensor],
                 info: StudentInfo, generator: torch.Generator, pairs: int = 4,
                 deployed_share: float = 0.5, family: str = "v2") -> torch.Tensor:
    """Masked MSE of the student's average velocity on `pairs` random intervals per trajectory (fresh
    teacher trajectories for `batch`: `teacher_trajectories` then `trajectory_loss`)."""
    found = teacher_trajectories(teacher, batch, info, generator, family)
    return trajectory_loss(student, found, info, generator, pairs, deployed_share)
