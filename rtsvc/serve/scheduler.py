"""Deadline- and phase-aware gathering of blocks from many streams into batches (`rtsvc serve --max-batch`).

Each stream's thread `submit(job, due, stream)`s a whole block and waits for its result. Real-time
clients send one block per period on their own clock, at their own phase, so the batcher keeps
each stream's recent arrival times and predicts when it sends next. A runner thread takes the
pending jobs as a batch at once unless waiting is worth it, i.e. it waits only while all hold:

    - fewer than `max_batch` jobs are waiting;
    - some stream that is not waiting (nor being run) is expected to arrive, or a busy runner to be
      free (it then takes the waiting jobs with its next batch), before the latest safe start:
      min over the waiting jobs of (due - measured cost of a batch one larger - margin); a stream
      not seen for `STALE_PERIODS` periods is no longer expected;
    - the oldest waiting job has waited less than `deadline_s` (the --batch-deadline-ms).

When the measured cost of a batch exceeds a block's budget (cores contended by other work), a
spare runner leaves the jobs to the busy one instead (a parallel batch would slow both down), again
for at most the deadline: `--batch-deadline-ms 0` never waits, batches then form only from blocks
that queued while every runner was busy.
So a lone stream, or streams not due soon, never wait, and blocks of streams whose phases are close
join one batch before anyone is late. Jobs that queued while every runner was busy go together
(natural batching under load). Nothing waits for a particular stream beyond the deadline or its
budget, so a slow or dead client never delays the others; a batch that fails fails only its own
jobs, and a job whose result is an exception fails alone.
"""

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_DEADLINE_MS = 15.0
COST_SMOOTHING = 0.3  # weight of the newest batch time in the running estimate per batch size
PERIOD_SMOOTHING = 0.3  # weight of the newest interval in a stream's period estimate
RECENT_BATCHES = 4096  # batch sizes kept for statistics (bounded: a server runs for days)
STALE_PERIODS = 2.0  # a stream not seen for this many periods is no longer expected
SAFETY_MARGIN_S = 0.010  # start this much before the estimate says a waiting job would be late (the
# block's way from the socket to the batch and back, SOLA and sending, is outside the estimate)
OVERRUN_POLL_S = 0.005  # how often a runner waiting for a busy one re-decides once that one overran
EXTRA_ITEM_COST = 0.7  # prior for an unmeasured batch size: each added item costs this much of one
# (tiny model, one CPU thread: batches of 2 / 4 / 8 took 1.7 / 2.7 / 4.5 times one block's time)


@dataclass
class _Pending:
    job: object
    due: float  # time.monotonic() by which the result is needed
    arrived: float
    stream: Hashable | None
    future: Future = field(default_factory=Future)


@dataclass
class _Rhythm:
    """When a stream last submitted and how often it does."""

    last: float
    period: float
    busy: bool = True  # a job of it is waiting or running: it sends no other before the answer

    def expected(self, now: float) -> float | None:
        """When its next block should come (never before now), or None when it is stale."""
        if self.busy or now - self.last > STALE_PERIODS * self.period:
            return None
        return max(now, self.last + self.period)


class DeadlineBatcher:
    """Runs `run_batch(jobs) -> results` (same order) on batches gathered from many threads.

    `runners` threads take batches (more than one lets batches run in parallel, e.g. one per CPU
    core); each holds `slot` while its batch runs. A result that is an exception instance fails
    its own job only.
    """

    def __init__(self, run_batch: Callable[[list], list], max_batch: int = DEFAULT_MAX_BATCH,
                 deadline_s: float = DEFAULT_BATCH_DEADLINE_MS / 1000.0, name: str = "rtsvc-batch",
                 runners: int = 1, slot: AbstractContextManager | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.run_batch = run_batch
        self.slot = slot or nullcontext()
        self.max_batch = int(max_batch)
        self.deadline_s = float(deadline_s)
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._streams: dict[Hashable, _Rhythm] = {}
        self._running: dict[int, tuple[float, int]] = {}  # runner thread -> (batch start, size)
        self._closed = False
        self._cost: dict[int, float] = {}  # batch size -> smoothed seconds per batch
        self.batch_sizes: deque[int] = deque(maxlen=RECENT_BATCHES)  # recent batches, for stats and tests
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, runners))]
        for thread in self._threads:
            thread.start()

    def submit(self, job, due: float, stream: Hashable | None = None):
        """Queue `job` of `stream` (None: a one-off, no rhythm to learn) and block until its result
        (or re-raise its exception)."""
        now = time.monotonic()
        item = _Pending(job, due, now, stream)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if stream is not None:
                self._arrived(stream, now, due - now)
            self._pending.append(item)
            self._cond.notify_all()
        try:
            result = item.future.result()
        finally:
            if stream is not None:
                with self._cond:
                    rhythm = self._streams.get(stream)
                    if rhythm is not None:
                        rhythm.busy = False
                    self._cond.notify_all()
        return result

    def estimate(self, size: int) -> float:
        """Expected seconds for a batch of `size`: measured, else from the nearest measured size with
        each further item costing `EXTRA_ITEM_COST` of an item (a prior: the first batch of a size
        measures it)."""
        if size in self._cost:
            return self._cost[size]
        if not self._cost:
            return 0.0
        nearest = min(self._cost, key=lambda s: abs(s - size))
        if size < nearest:
            return self._cost[nearest]
        per_item = self._cost[nearest] / nearest
        return self._cost[nearest] + EXTRA_ITEM_COST * per_item * (size - nearest)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5.0)

    # --- arrivals -------------------------------------------------------------------------------
    def _arrived(self, stream: Hashable, now: float, budget: float) -> None:
        for key in [k for k, r in self._streams.items() if not r.busy and r.expected(now) is None]:
            del self._streams[key]  # stale: ended or paused clients (a server runs for days)
        rhythm = self._streams.get(stream)
        if rhythm is None:  # first block: assume one block per budget (the server's block period)
            self._streams[stream] = _Rhythm(now, max(budget, 1e-3))
            return
        interval = now - rhythm.last
        if interval < STALE_PERIODS * rhythm.period:  # a gap (a paused client) says nothing of its period
            rhythm.period += PERIOD_SMOOTHING * (interval - rhythm.period)
        rhythm.last, rhythm.busy = now, True

    # --- the runner thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                with self.slot:
                    batch += self._top_up(len(batch))  # jobs that came while the slot was busy
                    started = time.monotonic()
                    with self._cond:
                        self._running[threading.get_ident()] = (started, len(batch))
                    try:
                        results = self.run_batch([p.job for p in batch])
                    finally:
                        with self._cond:
                            del self._running[threading.get_ident()]
                            self._cond.notify_all()  # a runner waiting for this one re-decides
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} jobs")
            except BaseException as err:  # the batch's own jobs fail; the batcher goes on
                for p in batch:
                    p.future.set_exception(err)
                continue
            elapsed = time.monotonic() - started
            old = self._cost.get(len(batch))
            self._cost[len(batch)] = elapsed if old is None else old + COST_SMOOTHING * (elapsed - old)
            with self._cond:
                self.batch_sizes.append(len(batch))
            for p, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)

    def _gather(self) -> list[_Pending] | None:
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                while not self._closed and self._pending and len(self._pending) < self.max_batch:
                    wait = self._wait_for_company()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._closed:
                    for p in self._pending:
                        p.future.set_exception(RuntimeError("the batcher is closed"))
                    self._pending.clear()
                    self._cond.notify_all()  # the other runners end too
                    return None
                if self._pending:  # (another runner may have taken them while this one waited)
                    batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                    return batch

    def _top_up(self, size: int) -> list[_Pending]:
        with self._cond:
            more, self._pending = self._pending[:self.max_batch - size], self._pending[self.max_batch - size:]
            return more

    def _wait_for_company(self) -> float:
        """Seconds worth waiting before taking the pending jobs (0: take them now): for another
        stream's block, or for a busy runner to be free, expected before the latest safe start and
        the deadline (that runner then takes these jobs together with whatever came meanwhile:
        larger batches, and a core left free while one runner keeps up)."""
        now = time.monotonic()
        start_by = self._start_by()
        close_at = min(start_by, self._pending[0].arrived + self.deadline_s)
        coming = [t for r in self._streams.values() if (t := r.expected(now)) is not None and t <= close_at]
        if coming:
            return close_at - now
        free_at = min((began + self.estimate(size) for began, size in self._running.values()), default=None)
        if free_at is None:
            return 0.0
        if start_by == float("inf"):  # a batch takes longer than a block's budget (the cores are
            # contended): a batch beside it would only slow both down, so leave the jobs to it,
            # within the deadline
            return min(max(free_at - now, OVERRUN_POLL_S), self._pending[0].arrived + self.deadline_s - now)
        return close_at - now if free_at <= close_at else 0.0

    def _start_by(self) -> float:
        """The latest start that keeps every waiting job on time in a batch one larger. A job
        already too late for its budget (an overloaded server) does not cut the wait short: then
        only larger batches help it catch up."""
        cost = self.estimate(len(self._pending) + 1) + SAFETY_MARGIN_S
        now_cost = self.estimate(len(self._pending))
        latest = [p.due - cost for p in self._pending if p.due - now_cost > p.arrived]  # could be on time
        return min(latest, default=float("inf"))


SETUP_THREADS = 2  # session set-up (opening a client's voice) never waits behind blocks


class Scheduler:
    """Where the server runs session work off the event loop: `run` a stream's block (or flush),
    `setup` a new session, `close`. Set-up has threads of its own, so admission answers new
    clients (`ready` or an error) while every block worker is busy."""

    def __init__(self, threads: int, name: str):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._setup = ThreadPoolExecutor(max_workers=SETUP_THREADS, thread_name_prefix="rtsvc-setup")

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def setup(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._setup, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._setup.shutdown(wait=False, cancel_futures=True)


class BlockScheduler(Scheduler):
    """One block at a time per worker thread (`--max-batch 1`, and every DSP voice)."""

    def __init__(self, workers: int = 0):
        self.workers = workers or self.default_workers()
        super().__init__(self.workers, "rtsvc-block")

    @staticmethod
    def default_workers() -> int:
        return min(8, os.cpu_count() or 1)


class BatchScheduler(Scheduler):
    """The server's block scheduler for batched voices (`--max-batch` > 1 with a model voice).

    Threads: every client may be parked waiting for its batch, so one per client. Whole blocks
    (features, DiT, vocoder) run in batches on `workers` runner threads; `slot` (a semaphore of
    `workers`) is held by each running batch, so batchers of several voices together never run
    more than `workers` at once.
    """

    def __init__(self, workers: int, max_clients: int):
        super().__init__(max_clients, "rtsvc-stream")
        self.workers = workers  # batch runners
        self.slot = threading.BoundedSemaphore(workers)
        self.batchers: list[DeadlineBatcher] = []

    @staticmethod
    def default_runners() -> int:
        """One per CPU core, at most 8 (as the unbatched pool). A runner starts a batch beside a
        busy one only when that one would not be free within the deadline and the latest safe
        start, so with time to spare blocks gather into one runner's larger batches. On a machine
        shared with other CPU work, `--batch-runners 1` did better at times (docs/benchmarks.md)."""
        return max(1, min(8, os.cpu_count() or 1))

    def batcher(self, run_batch: Callable[[list], list], max_batch: int,
                deadline_s: float) -> DeadlineBatcher:
        """A batcher whose batches run on `workers` runner threads, each holding a compute slot."""
        batcher = DeadlineBatcher(run_batch, max_batch, deadline_s, runners=self.workers, slot=self.slot)
        self.batchers.append(batcher)
        return batcher

    def close(self) -> None:
        for batcher in self.batchers:
            batcher.close()
        super().close()


__all__ = ["DEFAULT_BATCH_DEADLINE_MS", "DEFAULT_MAX_BATCH", "BatchScheduler", "BlockScheduler",
           "DeadlineBatcher", "Scheduler"]
