"""Rectified-flow sampling for RIFT-SVC: Euler steps over the upstream time grid, V2's
classifier-free guidance on the Whisper feature (both branches in one batched forward; V3's
guidance is in `rtsvc.models.guidance`), and start noise tied to the absolute mel-frame index so
overlapping streaming windows agree.

    grid = linspace(0, 1, steps)                      # steps - 1 Euler updates, as upstream
    v    = v_null + s * (v_full - v_null)             # null = Whisper replaced by its null embedding
    x   <- x + (t_next - t) * v(x, t)
    mel  = denormalize(x)                             # [-1, 1] -> log-mel
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rtsvc.models.schedules import time_grid as schedule_grid

N_MELS = 128
CFG_EPS = 1e-5  # upstream: a strength below this runs the null branch only
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class Conditioning:
    """Everything the DiT is conditioned on, on the mel grid (b items, n frames)."""
    spk: torch.Tensor  # [b] long speaker index, or [b, S] float weights (a blend: rtsvc.models.speakers)
    f0: torch.Tensor  # [b, n] Hz (0 = unvoiced, normally interpolated away)
    rms: torch.Tensor  # [b, n]
    cvec: torch.Tensor  # [b, n, 768]
    whisper: torch.Tensor | None = None  # [b, n, 1280]; V2 only
    mask: torch.Tensor | None = None  # [b, n] bool, True = valid frame
    bad_cvec: torch.Tensor | None = None  # [b, n, 768] V3 content-degradation guidance (None: made on use)
    # padded items batched (offline slices): each computed as if alone (convs and V3's rescale too)
    items_alone: bool = False

    def alone(self) -> dict:
        """The DiT keywords for `items_alone` (none when off: any velocity callable takes that)."""
        return {"items_alone": True} if self.items_alone else {}

    def repeat2(self) -> "Conditioning":
        """The same conditioning twice along the batch (for the two CFG branches)."""
        def cat(t):
            return None if t is None else torch.cat((t, t), dim=0)
        return Conditioning(cat(self.spk), cat(self.f0), cat(self.rms), cat(self.cvec), cat(self.whisper),
                            cat(self.mask), cat(self.bad_cvec), self.items_alone)

    def crop(self, first: int) -> "Conditioning":
        """The conditioning from frame `first` on."""
        if first == 0:
            return self
        def cut(t):
            return None if t is None else t[:, first:]
        return Conditioning(self.spk, cut(self.f0), cut(self.rms), cut(self.cvec), cut(self.whisper),
                            cut(self.mask), cut(self.bad_cvec), self.items_alone)


def time_grid(steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Upstream's grid: `linspace(0, 1, steps)`, i.e. steps - 1 Euler updates (steps >= 2)."""
    return schedule_grid(steps, "uniform", device)


def cfg_velocity(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                 cfg_strength: float) -> torch.Tensor:
    """Guided velocity `v_null + s * (v_full - v_null)` at noisy mel x [b, n, 128] and time t.

    Both branches run as one forward of batch 2b (first half null, second half full). With
    s below 1e-5 only the null branch runs, exactly as upstream.
    """
    b = x.shape[0]
    t = t.reshape(-1).expand(b) if t.numel() == 1 else t
    if cfg_strength < CFG_EPS:
        return model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, whisper=cond.whisper,
                     time=t, drop_whisper=True, mask=cond.mask, **cond.alone())
    c2 = cond.repeat2()
    drop = torch.arange(2 * b, device=x.device) < b  # null branch first
    v = model(x=torch.cat((x, x)), spk=c2.spk, f0=c2.f0, rms=c2.rms, cvec=c2.cvec, whisper=c2.whisper,
              time=torch.cat((t, t)), drop_whisper=drop, mask=c2.mask, **c2.alone())
    v_null, v_full = v[:b], v[b:]
    return v_null + cfg_strength * (v_full - v_null)


def sample(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
           steps: int, schedule: str = "uniform") -> torch.Tensor:
    """Euler integration of dx/dt = velocity_fn(x, t) from t=0 (x = noise) to t=1 over the
    `schedule`'s grid of `steps` points (`rtsvc.models.schedules`)."""
    grid = schedule_grid(steps, schedule, noise.device)
    return sample_on_grid(lambda x, t, dt: velocity_fn(x, t), noise, grid)


def sample_on_grid(step_velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                   noise: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """x <- x + dt * step_velocity(x, t, dt) over consecutive grid points. A teacher ignores dt (its
    instantaneous velocity); a distilled student returns its average velocity over [t, t + dt]."""
    x = noise
    for i in range(len(grid) - 1):
        dt = grid[i + 1] - grid[i]
        x = x + dt * step_velocity(x, grid[i], dt)
    return x


# --- noise ------------------------------------------------------------------------------------

def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash (splitmix64 finaliser); uint64 arithmetic wraps by design."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def counter_normal(start: int, count: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Standard-normal [count, dim] where row i depends only on (seed, start + i, dim).

    Each value hashes its absolute (row, column) counter into two uniforms, then Box-Muller.
    Used for flow start noise per mel frame (and usable for vocoder noise per sample).
    """
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) ^ np.uint64(dim))
    rows = np.arange(start, start + count, dtype=np.int64).astype(np.uint64)
    counters = rows[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        c2 = counters * np.uint64(2) ^ key
        bits1, bits2 = _splitmix64(c2), _splitmix64(c2 + np.uint64(1))
    u1 = ((bits1 >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]: log is finite
    u2 = (bits2 >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(z.astype(np.float32))


class NoiseRows:
    """`counter_normal` rows of one width for a sliding range of counters, kept between calls.

    Consecutive streaming blocks ask for overlapping ranges (a block's vocoder noise overlaps the
    previous block's by the vocoder context and the crossfade); the rows held are reused and only the
    rest is drawn. A row depends only on (seed, counter, dim), so `get` equals `counter_normal` bit
    for bit whatever was asked before."""

    def __init__(self, dim: int):
        self.dim, self.seed, self.start = dim, 0, 0
        self.rows: torch.Tensor | None = None

    def clear(self) -> None:
        self.rows = None

    def get(self, start: int, count: int, seed: int = 0) -> torch.Tensor:
        """`counter_normal(start, count, self.dim, seed)`."""
        end = start + count
        held_end = self.start + (0 if self.rows is None else self.rows.shape[0])
        if self.rows is None or seed != self.seed or not self.start <= start < held_end:
            rows = counter_normal(start, count, self.dim, seed)
        else:  # the held rows from `start` on, then the new ones
            kept = self.rows[start - self.start: min(end, held_end) - self.start]
            rows = torch.cat((kept, counter_normal(held_end, end - held_end, self.dim, seed))) \
                if end > held_end else kept.clone()
        self.seed, self.start, self.rows = seed, start, rows
        return rows


def frame_noise(start_frame: int, n_frames: int, seed: int = 0, dim: int = N_MELS) -> torch.Tensor:
    """Start noise [n_frames, dim] for absolute mel frames start_frame ... start_frame + n - 1.

    Deterministic per absolute frame: a window starting at frame 100 and one starting at 90 give
    the same vector for frame 105, so overlapping streaming windows start from the same noise.
    """
    return counter_normal(start_frame, n_frames, dim, seed)
