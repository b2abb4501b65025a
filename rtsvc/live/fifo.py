"""The output FIFO between the worker that converts blocks and the device callback that plays them.

Why it never drifts: what sits between the input callback and the output callback (input still
queued for the worker, passed in as `queued`, plus this FIFO's level) stays constant while both
clocks tick, whatever the compute time of each block: the worker moves samples from one to the
other. It grows only where output ran dry (silence was played instead of audio, then primed again)
or where a stall ends in a burst. So the FIFO keeps a target for that total (set when audio first
arrives, raised by each underrun's lateness up to `max_prime`) and, once the smallest total over
the last `settle` pushes stands more than `tolerance` above it, drops the excess at the head,
crossfaded, and counts it (`trims`, `trimmed`).

Settling: the target set from the first block carries that block's compute time and the whole prime,
which the output may never need. The FIFO records its lowest level after a pop (`low_water`, the
slack it had when a block was slowest); `settle(margin)` lowers the target by what that low-water
mark stood above `margin` and cuts it at once. An underrun restarts the record, so only windows that
ran clean are settled on.
"""

import threading
from collections import deque

import numpy as np

SETTLE_PUSHES = 8  # pushes whose smallest total must stand above the target before trimming
TRIM_CROSSFADE = 256  # samples: the seam where audio is dropped


class OutputFifo:
    """Samples waiting for the output callback; primed with silence, counts underruns, trims drift."""

    def __init__(self, prime: int, max_level: int, max_prime: int | None = None, tolerance: int | None = None,
                 crossfade: int = TRIM_CROSSFADE, settle: int = SETTLE_PUSHES):
        self._lock = threading.Lock()
        self._chunks: deque[np.ndarray] = deque()
        self.level = 0
        self.prime, self.max_level = prime, max_level
        self.max_prime = prime if max_prime is None else max(prime, max_prime)  # the prime grows up to this
        self.tolerance = max(1, prime // 4) if tolerance is None else tolerance
        self.crossfade, self.settle_pushes = crossfade, settle
        self.primed = False
        self.underruns = self.overruns = 0
        self.trims = self.trimmed = 0  # drift cut back to the target: times, samples dropped
        self.started = False  # underruns count only once audio has flowed
        self.dry = 0  # samples the output lacked since the last underrun: how late that block came
        self.target: int | None = None  # level + queued to hold (None until audio arrives)
        self.queued = 0  # upstream samples the last push reported (input not yet converted)
        self._totals: deque[int] = deque(maxlen=settle)
        self.low_water: int | None = None  # the least level after a pop since the last settle / underrun
        self.settled = 0  # samples the target was lowered by in all

    @property
    def total(self) -> int:
        """Samples between the input and the output callbacks: queued upstream + this FIFO's level."""
        return self.level + self.queued

    def push(self, samples: np.ndarray, queued: int = 0) -> None:
        """Append converted samples; `queued`: samples (at this FIFO's rate) still waiting upstream."""
        if samples.size == 0 or (not self.started and not samples.any()):
            return  # nothing, or silence before any sound (gated blocks): the schedule starts with sound
        with self._lock:
            self.queued = queued
            if not self.primed:
                grow = min(self.dry, self.max_prime - self.prime)  # wait as long as the late block took
                self.prime, self.max_level, self.dry = self.prime + grow, self.max_level + grow, 0
                self._chunks.append(np.zeros(self.prime, dtype=np.float32))
                self.level += self.prime
                # the first time: what is in flight now (this block's compute backlog, at most what the
                # prime may grow by: a first block slowed by warm-up must not set it) plus the prime;
                # after an underrun: only the lateness is added (the backlog and prime are there already)
                first = self.level + samples.shape[0] + min(queued, self.max_prime - self.prime)
                self.target = first if self.target is None else self.target + grow
                self._totals.clear()
                self.primed = self.started = True
            self._chunks.append(samples)
            self.level += samples.shape[0]
            if self.level > self.max_level:  # output stalled or its clock is slow: cut latency back
                self.overruns += 1
                self._trim(self.total - self.target)
                return
            self._totals.append(self.total)
            if len(self._totals) == self.settle_pushes and min(self._totals) > self.target + self.tolerance:
                self._trim(min(self._totals) - self.target)

    def retarget(self, target: int) -> None:
        """A new target (the conversion changed, e.g. a longer block)."""
        with self._lock:
            self.target = target
            self._totals.clear()

    def count_skip(self, samples: int) -> None:
        """Count input skipped upstream to hold the target (cut before conversion instead of after)."""
        with self._lock:
            self.trims += 1
            self.trimmed += samples

    def _trim(self, excess: int) -> None:
        """Drop `excess` samples at the head, crossfading the seam (lock held). Only once the backlog
        upstream fits in the target: while the worker still catches up, the FIFO needs what it holds."""
        fade = min(self.crossfade, self.level // 2)
        excess = min(excess, self.total - self.target, self.level - fade)
        if excess <= 0 or self.queued > self.target - fade:
            return
        audio = np.concatenate(self._chunks)
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False, dtype=np.float32)
        seam = audio[:fade] * (1.0 - ramp) + audio[excess:excess + fade] * ramp
        self._chunks = deque([seam, audio[excess + fade:]])
        self.level -= excess
        self.trims += 1
        self.trimmed += excess
        self._totals.clear()

    def pop(self, count: int) -> np.ndarray:
        out = np.zeros(count, dtype=np.float32)
        with self._lock:
            if not self.primed:
                if self.started:
                    self.dry += count
                return out
            filled = 0
            while filled < count and self._chunks:
                head = self._chunks[0]
                take = min(count - filled, head.shape[0])
                out[filled: filled + take] = head[:take]
                filled += take
                if take == head.shape[0]:
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[take:]
            self.level -= filled
            if filled < count:
                self.underruns += 1
                self.primed = False
                self.dry = count - filled
                self.low_water = None
            else:
                self.low_water = self.level if self.low_water is None else min(self.low_water, self.level)
        return out

    def settle(self, margin: int) -> int:
        """Lower the target by the low-water mark's excess over `margin` and cut that much now
        (crossfaded; an excess shorter than the seam is left), then start a new record; the samples
        the target was lowered by."""
        with self._lock:
            low, self.low_water = self.low_water, None
            if low is None or self.target is None or not self.primed or low - margin <= self.crossfade:
                return 0
            excess = low - margin
            self.target -= excess
            self.settled += excess
            self._trim(excess)
            return excess
