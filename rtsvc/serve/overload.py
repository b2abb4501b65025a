"""`rtsvc serve`'s overload and admission policy (no I/O here; docs/protocol.md section 6).

Admission: a connection that has not sent a valid `start` is *pending*: it holds no client slot,
only a pending place (a few per address, a bounded total) for at most the start deadline, so
unauthenticated connections can never starve authenticated streams. A slot is taken after the
token is checked; none is given while the server is behind (it dropped late input recently).

Backlog: a live stream's frame is *due* when it arrives or when the audio sent before it would
have played in real time, whichever is later (a client sending a file faster than real time is
early, not late). A frame still waiting `max_lag_s` after it was due is not converted: it is
answered at once with silence of its length (never the unconverted voice: that would reveal the
speaker), so latency stays bounded however far behind the machine is.
"""

import contextlib
import math
import time
from collections import Counter
from collections.abc import Iterator

from rtsvc.serve.protocol import CLOSE_TRY_LATER, ProtocolError

BEHIND_HOLD_S = 3.0  # after a dropped frame, new streams are refused for this long
WARNING_INTERVAL_S = 1.0  # at most one `warning` message per stream per interval


class Admission:
    """Pending places and client slots (touched only on the event loop thread)."""

    def __init__(self, max_clients: int, max_pending: int, max_pending_per_address: int,
                 clock=time.monotonic):
        self.max_clients = max_clients
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self.clock = clock
        self.streams = 0
        self.pending: Counter = Counter()
        self.last_drop = -math.inf

    @contextlib.contextmanager
    def pending_place(self, address: str) -> Iterator[None]:
        """Held from the handshake until `start` is accepted or refused."""
        if sum(self.pending.values()) >= self.max_pending:
            raise ProtocolError("too_many_pending", f"{self.max_pending} connections are waiting to start; "
                                "try again later", CLOSE_TRY_LATER)
        if self.pending[address] >= self.max_pending_per_address:
            raise ProtocolError("too_many_pending", f"{self.max_pending_per_address} connections from "
                                f"{address} have not sent start yet; try again later", CLOSE_TRY_LATER)
        self.pending[address] += 1
        try:
            yield
        finally:
            self.pending[address] -= 1
            if not self.pending[address]:
                del self.pending[address]

    @property
    def behind(self) -> bool:
        return self.clock() - self.last_drop < BEHIND_HOLD_S

    def take_slot(self) -> None:
        if self.streams >= self.max_clients:
            raise ProtocolError("too_many_clients", f"the server is full ({self.max_clients} clients); try "
                                "again later", CLOSE_TRY_LATER)
        if self.behind:
            raise ProtocolError("overloaded", "the server cannot keep up with its current streams; try "
                                "again later", CLOSE_TRY_LATER)
        self.streams += 1

    def free_slot(self) -> None:
        self.streams -= 1

    def note_drop(self) -> None:
        self.last_drop = self.clock()


class Pacing:
    """Due times of one live stream's frames (see the module docstring)."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.next_due = -math.inf

    def due(self, arrival: float, samples: int) -> float:
        due = max(arrival, self.next_due)
        self.next_due = due + samples / self.sample_rate
        return due


class DropCounter:
    """What one stream dropped, for `stats` and rate-limited `warning` messages."""

    def __init__(self, sample_rate: int, clock=time.monotonic):
        self.sample_rate = sample_rate
        self.clock = clock
        self.frames = 0
        self.samples = 0
        self.unreported = 0  # samples dropped since the last warning
        self.last_warning = -math.inf

    def add(self, samples: int) -> None:
        self.frames += 1
        self.samples += samples
        self.unreported += samples

    def warning_due(self) -> bool:
        return self.unreported > 0 and self.clock() - self.last_warning >= WARNING_INTERVAL_S

    def take_warning(self, max_lag_ms: float) -> dict:
        dropped_ms = 1000 * self.unreported / self.sample_rate
        self.unreported, self.last_warning = 0, self.clock()
        return {"type": "warning", "code": "overloaded", "dropped_ms": round(dropped_ms, 1),
                "message": f"the server is behind: {dropped_ms:.0f} ms of input arrived more than "
                           f"{max_lag_ms:g} ms late and was answered with silence"}

    def stats(self) -> dict:
        return {"dropped_frames": self.frames, "dropped_samples": self.samples,
                "dropped_ms": round(1000 * self.samples / self.sample_rate, 1)}


class HalfOpen:
    """Connections whose HTTP request has not fully arrived, per address and in all (event loop
    thread only): past either limit a new one is cut at once, so half-open connections cannot use
    up the process's file descriptors."""

    def __init__(self, max_total: int, max_per_address: int):
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.by_address: Counter = Counter()
        self.total = 0

    def enter(self, address: str) -> bool:
        if self.total >= self.max_total or self.by_address[address] >= self.max_per_address:
            return False
        self.by_address[address] += 1
        self.total += 1
        return True

    def leave(self, address: str) -> None:
        self.total -= 1
        self.by_address[address] -= 1
        if not self.by_address[address]:
            del self.by_address[address]
