"""Teacher trajectories reused across distillation steps (`rtsvc distill --teacher-reuse R`).

A step's cost is almost all teacher: P - 1 = 31 guided evaluations per trajectory, against one
student forward and backward on `pairs` intervals of it. But a trajectory has P(P - 1)/2 = 496
intervals and a step trains on `pairs` (4) of them, so one trajectory can teach many steps. With
R > 1, every R-th step computes its batch's trajectories (a refresh) and keeps them; the steps in
between train on new random intervals of one of the last `size` kept batches (picked by the step's
own generator). R = 1 is the original recipe, bit for bit.

The cache lives in memory only (a few batches: [P, b, n, 128] float32 each, ~67 MB at b = 16 and
256 frames). A resumed run rebuilds it: the kept batches are those of the last refresh steps before
it (`refresh_steps_before`), whose batches and noise are fixed by their step numbers, so --resume
stays bit-exact (at the cost of up to CACHE_BATCHES teacher batches at start).
"""

import torch
from rtsvc.training.distill_loss import Trajectories

CACHE_BATCHES = 4  # kept batches: reuse draws from the last few, not only the newest (less correlated)


class TrajectoryCache:
    def __init__(self, reuse: int = 1, size: int = CACHE_BATCHES):
        if reuse < 1:
            raise ValueError(f"reuse must be at least 1, got {reuse}")
        self.reuse, self.size = reuse, size
        self.kept: list[Trajectories] = []
        self.refreshes = 0  # batches of trajectories computed (what the teacher cost)

    def refresh_steps_before(self, step: int) -> list[int]:
        """The refresh steps whose trajectories an uninterrupted run holds when it reaches `step`."""
        if self.reuse == 1 or step <= 0:
            return []
        return list(range(0, step, self.reuse))[-self.size:]

    def due(self, step: int) -> bool:
        """Whether `step` computes new trajectories: every `reuse`-th step, and whenever none are kept."""
        return not self.kept or step % self.reuse == 0

    def add(self, found: Trajectories) -> Trajectories:
        if self.reuse > 1:  # R = 1 keeps nothing: no memory for the original recipe
            self.kept = [*self.kept[-(self.size - 1):], found] if self.size > 1 else [found]
        self.refreshes += 1
        return found

    def pick(self, generator: torch.Generator) -> Trajectories:
        """One kept batch, chosen by the step's generator (so a step's choice is reproducible)."""
        index = int(torch.randint(0, len(self.kept), (1,), generator=generator, device=generator.device))
        return self.kept[index]
