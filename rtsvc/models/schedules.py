"""Time grids for rectified-flow sampling: where the Euler updates fall on [0, 1].

A grid of `points` times runs `points - 1` network evaluations (upstream's `steps` counts grid
points). Schedules, by name (`--schedule`):

    uniform  linspace(0, 1, points)                                   upstream
    sway     t = u + s (cos(pi/2 u) - 1 + u), u uniform, s = -1        F5-TTS sway sampling: small
             (= 1 - cos(pi/2 u)): updates crowd near t = 0, where the flow bends most
    epss     F5-TTS's empirically pruned grids on a 1/32 lattice (5, 6, 7, 10, 12, 16 updates);
             for other counts a dyadic grid 0, 2^-(k-1), ..., 1/4, 1/2, 1 (the same shape: dense
             early, halving towards the end) -- our extension, F5 falls back to uniform there

A distilled student carries its own grid (`student_grid`): its evaluations fall on points of
the teacher's 32-point grid, the grid its targets were integrated on.
"""

import math

import torch

from rtsvc.errors import UserError
from rtsvc.settings import SCHEDULES

SWAY_COEF = -1.0  # F5-TTS default
EPSS_LATTICE = 32
EPSS_TABLE = {  # updates -> grid on the 1/32 lattice (F5-TTS get_epss_timesteps)
    5: [0, 2, 4, 8, 16, 32],
    6: [0, 2, 4, 6, 8, 16, 32],
    7: [0, 2, 4, 6, 8, 16, 24, 32],
    10: [0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32],
    12: [0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32],
    16: [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32],
}


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        raise UserError(f"unknown --schedule {name!r}: use {', '.join(SCHEDULES)}")
    return name


def time_grid(points: int, schedule: str = "uniform",
              device: torch.device | str | None = None) -> torch.Tensor:
    """`points` increasing times from 0 to 1 (points - 1 Euler updates; points >= 2)."""
    check_schedule(schedule)
    if points < 2:
        raise UserError(f"--steps must be at least 2 (got {points}): a grid needs two points for one "
                        "Euler update")
    if schedule == "uniform":  # float32 linspace, bit for bit upstream's grid
        return torch.linspace(0, 1, points, device=device)
    u = torch.linspace(0, 1, points, dtype=torch.float64)
    if schedule == "sway":
        t = u + SWAY_COEF * (torch.cos(math.pi / 2 * u) - 1 + u)
    else:
        t = _epss(points - 1)
    t[0], t[-1] = 0.0, 1.0  # exact ends whatever the rounding
    return t.to(dtype=torch.float32, device=device)


def _epss(updates: int) -> torch.Tensor:
    if updates in EPSS_TABLE:
        return torch.tensor(EPSS_TABLE[updates], dtype=torch.float64) / EPSS_LATTICE
    return torch.tensor([0.0] + [2.0 ** -k for k in range(updates - 1, -1, -1)], dtype=torch.float64)


def student_grid(evaluations: int, teacher_points: int) -> list[float]:
    """A student's grid: `evaluations + 1` points of the teacher's uniform grid, evenly spread."""
    if evaluations < 1:
        raise UserError(f"--nfe must be at least 1, got {evaluations}")
    last = teacher_points - 1
    return [round(last * k / evaluations) / last for k in range(evaluations + 1)]
