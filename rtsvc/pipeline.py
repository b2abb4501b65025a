"""A model voice's stages overlapped across blocks (`rtsvc live --pipeline`).

The engine converts a block in one go: features (F0, RMS, ContentVec: `ModelVoice.prepare`), then
the DiT and the vocoder (`rtsvc.voices.batch.run_jobs`). A block is on time when that sum fits in
the block. Here the two halves run on two threads: block n+1's features are extracted while block
n's DiT and vocoder run, so a block only needs the slower half to fit, and a shorter block (less
algorithmic latency) keeps up. The compute latency of one block is still the sum (what the output
buffer must hold); what shrinks is the block.

    stage 1 (the caller's thread): resample in, engine.begin_block (gain, ring, gate), voice.prepare
    stage 2 (a thread):            run_jobs (DiT + vocoder), engine.finish_block (SOLA), resample out

Blocks pass through each stage in stream order and every per-stream state belongs to one stage
(the feature cache to stage 1, SOLA's kept tail to stage 2), so the output is the unpipelined
engine's, sample for sample (tests/test_pipeline.py). Output goes to `emit` as each block is done.
"""

import queue
import threading
import time
from collections import deque

import numpy as np

from rtsvc.dsp.audio import StreamResampler
from rtsvc.engine import STATS_WINDOW, BlockStart, StreamingConverter
from rtsvc.errors import UserError
from rtsvc.voices.batch import run_jobs

_STOP = object()


def can_pipeline(voice) -> bool:
    """A voice whose work splits into `prepare` (features) and `run_jobs` (DiT + vocoder)."""
    return callable(getattr(voice, "prepare", None)) and getattr(voice, "backend", None) is not None \
        and getattr(voice, "cache", None) is not None


class PipelinedAdapter:
    """Like `RateAdapter` (input at `rate`, output at `output_rate`), with the engine's block split
    over two stages; output is handed to `emit(samples)` from stage 2 as blocks finish.
    `threaded=False` runs stage 2 inline (same output; for measuring each stage's time)."""

    def __init__(self, engine: StreamingConverter, rate: int, emit, output_rate: int | None = None,
                 threaded: bool = True):
        if not can_pipeline(engine.voice):
            raise UserError("--pipeline needs a model voice (--model) streaming with its feature cache")
        self.engine, self.voice, self.emit = engine, engine.voice, emit
        self.rate = int(rate)
        self.output_rate = int(output_rate or rate)
        self._to_engine = StreamResampler(self.rate, engine.sample_rate)
        self._from_engine = StreamResampler(engine.sample_rate, self.output_rate)
        self.samples_in = self.samples_out = 0  # at rate / at output_rate
        self.prepare_ms: deque[float] = deque(maxlen=STATS_WINDOW)  # stage 1 per block
        self.run_ms: deque[float] = deque(maxlen=STATS_WINDOW)  # stage 2 per block
        self.error: BaseException | None = None
        self._jobs: queue.Queue = queue.Queue()
        # first out: the engine's block of delay (the unpipelined engine starts its output with it)
        self._jobs.put(("emit", np.zeros(engine.layout.block, dtype=np.float32)))
        self._threaded = threaded
        self._thread: threading.Thread | None = None  # started by the first process(): nothing is
        # emitted while the caller is still storing this object

    @property
    def held(self) -> int:
        """Samples (at output_rate) fed in but not yet emitted."""
        return self.samples_in * self.output_rate // self.rate - self.samples_out

    def process(self, samples: np.ndarray) -> None:
        """Stage 1 for these samples; blocks they complete go to stage 2."""
        if self.error is not None:
            raise self.error
        if self._threaded and self._thread is None:
            self._thread = threading.Thread(target=self._stage2_loop, name="pipeline-stage2", daemon=True)
            self._thread.start()
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.samples_in += samples.shape[0]
        for new in self.engine.split_blocks(self._to_engine.process(samples)):
            started = time.perf_counter()
            block = self.engine.begin_block(new)
            job = None
            if block.window is not None:
                job = self.voice.prepare(block.window, block.knobs, block.start_sample,
                                         self.engine.layout.tail)
            self._jobs.put((block, job, (time.perf_counter() - started) * 1000.0))
        if not self._threaded:
            self._drain()

    def _drain(self) -> None:
        while not self._jobs.empty():
            self._stage2(self._jobs.get())

    def _stage2_loop(self) -> None:
        try:
            while (item := self._jobs.get()) is not _STOP:
                self._stage2(item)
        except BaseException as err:  # raised to the caller at its next process()
            self.error = err

    def _stage2(self, item) -> None:
        if item[0] == "emit":
            self._emit(item[1])
            return
        block, job, prepare_ms = item
        assert isinstance(block, BlockStart)
        started = time.perf_counter()
        converted = None
        if block.window is not None:
            converted = run_jobs(self.voice.backend, [job])[0] if job is not None else \
                np.zeros(0, dtype=np.float32)
        run_ms = (time.perf_counter() - started) * 1000.0
        if block.window is not None:
            self.prepare_ms.append(prepare_ms)
            self.run_ms.append(run_ms)
        out = self.engine.finish_block(block, converted, compute_ms=prepare_ms - block.begin_ms + run_ms)
        self._emit(out)

    def _emit(self, out: np.ndarray) -> None:
        out = self._from_engine.process(out)
        self.samples_out += out.shape[0]
        if out.size:
            self.emit(out)

    def close(self, timeout: float = 10.0) -> None:
        """Let stage 2 finish the blocks it has, then stop it."""
        if self._thread is not None:
            self._jobs.put(_STOP)
            self._thread.join(timeout=timeout)
            self._thread = None
        else:
            self._drain()
        if self.error is not None:
            raise self.error

    def stage_stats(self) -> dict:
        """Mean and p99 of each stage's time per block (ms)."""
        def pct(values, q):
            return float(np.percentile(values, q)) if values else 0.0

        prep, run = list(self.prepare_ms), list(self.run_ms)
        return {"prepare_ms_mean": float(np.mean(prep)) if prep else 0.0, "prepare_ms_p99": pct(prep, 99),
                "run_ms_mean": float(np.mean(run)) if run else 0.0, "run_ms_p99": pct(run, 99)}
