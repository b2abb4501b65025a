"""The output FIFO between the worker that converts blocks and the device callback that plays them."""

import threading
from collections import deque

import numpy as np


class OutputFifo:
    """Samples waiting for the output callback; primed with silence, counts underruns."""

    def __init__(self, prime: int, max_level: int, max_prime: int | None = None):
        self._lock = threading.Lock()
        self._chunks: deque[np.ndarray] = deque()
        self.level = 0
        self.prime, self.max_level = prime, max_level
        self.max_prime = prime if max_prime is None else max(prime, max_prime)  # the prime grows up to this
        self.primed = False
        self.underruns = self.overruns = 0
        self.started = False  # underruns count only once audio has flowed
        self.dry = 0  # samples the output lacked since the last underrun: how late that block came

    def push(self, samples: np.ndarray) -> None:
        if samples.size == 0 or (not self.started and not samples.any()):
            return  # nothing, or silence before any sound (gated blocks): the schedule starts with sound
        with self._lock:
            if not self.primed:
                grow = min(self.dry, self.max_prime - self.prime)  # wait as long as the late block took
                self.prime, self.max_level, self.dry = self.prime + grow, self.max_level + grow, 0
                self._chunks.append(np.zeros(self.prime, dtype=np.float32))
                self.level += self.prime
                self.primed = self.started = True
            self._chunks.append(samples)
            self.level += samples.shape[0]
            if self.level > self.max_level:  # output stalled or its clock is slow: cut latency back
                self.overruns += 1
                while self.level > self.max_level // 2 and len(self._chunks) > 1:
                    self.level -= self._chunks.popleft().shape[0]

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
        return out
