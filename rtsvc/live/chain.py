"""What `rtsvc live`'s worker runs: the engine (plain or pipelined) between the input queue and the
output FIFOs, and the guard that lengthens its block under sustained overload.

Overload: a block whose compute takes longer than the block itself, block after block, piles input
up faster than it is converted; the FIFO can only trim what has been converted, so delay would grow
without bound (300-480 ms where 64 ms was announced, measured). `OverloadGuard` watches the
recent compute (the slower stage when pipelined) and the input backlog; after OVERLOAD_S of
overload it rebuilds the engine at the next longer candidate block (`rtsvc.autoblock`), says so,
and steps back down after CALM_S of comfortable headroom.
"""

import queue
import threading
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from rtsvc.autoblock import CANDIDATE_FRAMES, frames_to_ms
from rtsvc.engine import RateAdapter, StreamConfig, StreamingConverter
from rtsvc.live.fifo import OutputFifo
from rtsvc.pipeline import PipelinedAdapter
from rtsvc.settings import RuntimeSettings
from rtsvc.voice import Voice

OVERLOAD_RTF = 0.95  # recent compute over this fraction of the block counts as overload
OVERLOAD_S = 3.0  # seconds of overload before the block grows
CALM_RTF = 0.4  # the next shorter block would run at most this loaded ...
CALM_S = 20.0  # ... for this long: step back down
MIN_CHANGE_S = 5.0  # at most one change in this many seconds
GRACE_S = 10.0  # no change in the first seconds of a run: caches and thread pools are still warming up
SKIP_FADE = 128  # samples: the seam where skipped input is crossfaded


class Conversion:
    """The engine and its rate adapter (or pipeline), feeding `fifos` and an optional recorder.
    `inbox_samples()` says how much input (at the output rate) waits for the worker."""

    def __init__(self, voice: Voice, settings: RuntimeSettings, config: StreamConfig, in_rate: int,
                 out_rate: int, fifos: list[OutputFifo], recorder=None, pipeline: bool = False,
                 inbox_samples: Callable[[], int] = lambda: 0):
        self.voice, self.settings = voice, settings
        self.in_rate, self.out_rate = in_rate, out_rate
        self.fifos, self.recorder, self.pipeline = fifos, recorder, pipeline
        self.inbox_samples = inbox_samples
        self._requested: float | None = None
        self.earlier_blocks = self.earlier_gated = 0  # blocks converted at earlier block lengths
        self._lock = threading.Lock()
        self.engine: StreamingConverter
        self.adapter: RateAdapter | PipelinedAdapter | None = None
        self.build(config)

    def build(self, config: StreamConfig) -> None:
        """(Re)start the conversion at `config` (the worker's thread: nothing converts meanwhile)."""
        if isinstance(self.adapter, PipelinedAdapter):
            self.adapter.close()
        if self.adapter is not None:  # the counters of the run so far carry over
            st = self.engine.stats()
            self.earlier_blocks += st["blocks"]
            self.earlier_gated += st["gated_blocks"]
        self.voice.reset()
        self.config = config
        self.engine = StreamingConverter(self.voice, self.settings, config)
        if self.pipeline:
            self.adapter = PipelinedAdapter(self.engine, self.in_rate, self._emit, self.out_rate)
        else:
            self.adapter = RateAdapter(self.engine, self.in_rate, self.out_rate)

    @property
    def block_ms(self) -> float:
        return self.engine.layout.block * 1000.0 / self.engine.sample_rate

    def held(self) -> int:
        """Input taken from the inbox but not yet handed to the FIFOs (output-rate samples)."""
        adapter = self.adapter
        return max(0, adapter.samples_in * self.out_rate // self.in_rate - adapter.samples_out)

    def request_block(self, block_ms: float) -> None:
        """Ask the worker to rebuild at `block_ms` before its next chunk."""
        with self._lock:
            self._requested = block_ms

    def process(self, chunk: np.ndarray) -> None:
        with self._lock:
            requested, self._requested = self._requested, None
        if requested is not None:
            self.build(replace(self.config, block_ms=requested))
            block = self.engine.layout.block * self.out_rate // self.engine.sample_rate
            for fifo in self.fifos:  # the prime plus a whole block of compute: on time while it keeps up
                fifo.retarget(fifo.prime + block)
        if isinstance(self.adapter, PipelinedAdapter):
            self.adapter.process(chunk)
        else:
            self._emit(self.adapter.process(chunk))

    def skip_backlog(self, chunk: np.ndarray, inbox: queue.Queue) -> np.ndarray:
        """After a stall: input that would only be converted to be trimmed from the output (the FIFO
        over its target) is skipped now, the seam crossfaded, and counted as a trim. Returns the
        chunk to convert."""
        fifo = self.fifos[0]
        per_chunk, skipped = chunk.shape[0] * self.out_rate // self.in_rate, 0
        while fifo.target is not None and not inbox.empty():
            total = fifo.level + self.inbox_samples() + self.held() + per_chunk
            if total - fifo.target <= fifo.tolerance + per_chunk:
                break
            try:
                following = inbox.get_nowait()
            except queue.Empty:
                break
            fade = min(SKIP_FADE, chunk.shape[0], following.shape[0])
            ramp = np.linspace(0.0, 1.0, fade, endpoint=False, dtype=np.float32)
            following = following.copy()
            following[:fade] = chunk[:fade] * (1.0 - ramp) + following[:fade] * ramp
            skipped += per_chunk
            chunk = following
        if skipped:
            fifo.count_skip(skipped)
        return chunk

    def _emit(self, out: np.ndarray) -> None:
        queued = self.inbox_samples() + self.held()
        for fifo in self.fifos:  # the output device, and the monitor (headphones) when there is one
            fifo.push(out, queued)
        if self.recorder is not None and out.size:
            self.recorder.write(out)

    def bottleneck_ms(self) -> float:
        """Recent compute per block: the slower stage when pipelined, else the whole block."""
        if isinstance(self.adapter, PipelinedAdapter):
            prep, run = list(self.adapter.prepare_ms)[-8:], list(self.adapter.run_ms)[-8:]
            return max(float(np.mean(prep)) if prep else 0.0, float(np.mean(run)) if run else 0.0)
        return self.engine.stats()["compute_ms_recent"]

    def close(self) -> None:
        if isinstance(self.adapter, PipelinedAdapter):
            self.adapter.close()


def candidate_blocks(sample_rate: int) -> list[float]:
    return [frames_to_ms(f, sample_rate) for f in CANDIDATE_FRAMES]


class OverloadGuard:
    """Lengthens the block of a `Conversion` under sustained overload and shortens it again when calm
    (never below the block it started with). `check(now)` returns a message when it changed it."""

    def __init__(self, conversion: Conversion, enabled: bool = True):
        self.conversion, self.enabled = conversion, enabled
        self.base_ms = conversion.block_ms
        self.changes = 0
        self._over_since: float | None = None
        self._calm_since: float | None = None
        self._last_change = float("-inf")
        self._first_check: float | None = None

    def check(self, now: float) -> str | None:
        conv = self.conversion
        self._first_check = now if self._first_check is None else self._first_check
        st = conv.engine.stats()
        if not self.enabled or now - self._first_check < GRACE_S or st["blocks"] - st["gated_blocks"] < 4:
            return None
        block, compute = conv.block_ms, conv.bottleneck_ms()
        backlog_ms = conv.inbox_samples() * 1000.0 / conv.out_rate
        overloaded = compute > OVERLOAD_RTF * block or backlog_ms > block + 200.0
        self._over_since = (self._over_since or now) if overloaded else None
        sizes = candidate_blocks(conv.engine.sample_rate)
        shorter = [b for b in sizes if self.base_ms - 0.05 <= b < block - 0.05]
        calm = bool(shorter) and compute < CALM_RTF * shorter[-1]
        self._calm_since = (self._calm_since or now) if calm else None
        if now - self._last_change < MIN_CHANGE_S:
            return None
        if self._over_since is not None and now - self._over_since >= OVERLOAD_S:
            longer = [b for b in sizes if b > block + 0.05]
            if not longer:
                return None
            return self._change(now, longer[0],
                                f"overload: compute {compute:.0f} ms per {block:.0f} ms block for "
                                f"{OVERLOAD_S:g} s; block {block:.0f} -> {longer[0]:.0f} ms (latency grows "
                                "by the difference)")
        if self._calm_since is not None and now - self._calm_since >= CALM_S:
            return self._change(now, shorter[-1],
                                f"load eased: compute {compute:.0f} ms; block {block:.0f} -> "
                                f"{shorter[-1]:.0f} ms")
        return None

    def _change(self, now: float, block_ms: float, message: str) -> str:
        self.conversion.request_block(block_ms)
        self._last_change, self._over_since, self._calm_since = now, None, None
        self.changes += 1
        return message
