"""Deadline-aware gathering of blocks from many streams into batches (`rtsvc serve --max-batch`).

Each stream's thread `announce()`s a block, prepares its features, then `submit(job, due)`s it and
waits. One runner thread per batcher takes the pending jobs as a batch when any of these holds:

    - `max_batch` jobs are waiting;
    - no announced block is still being prepared (nobody else is about to arrive: a lone stream,
      or streams that are not due together, never wait);
    - the oldest waiting job has waited `deadline_s` (the --batch-deadline-ms);
    - waiting longer would make some waiting job late: now >= its `due` minus the measured time of
      a batch of this size (a block is never held past its stream's real-time budget for company;
      a block that is already past it, on an overloaded server, waits at most the deadline).

So batches grow exactly when the server is busy (blocks of several streams are in flight at once)
and latency is not spent when it is not. Nothing waits for a particular stream beyond the
deadline, so a slow or dead client never delays the others; a batch that fails fails only its own
jobs. `BatchScheduler` is the server's `BlockScheduler` for batched
voices: one thread per client (each may be parked in `submit`) and `workers` compute slots that
bound how many streams extract features at once.
"""

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_DEADLINE_MS = 15.0
COST_SMOOTHING = 0.3  # weight of the newest batch time in the running estimate per batch size
RECENT_BATCHES = 4096  # batch sizes kept for statistics (bounded: a server runs for days)


@dataclass
class _Pending:
    job: object
    due: float  # time.monotonic() by which the result is needed
    arrived: float
    future: Future = field(default_factory=Future)


class DeadlineBatcher:
    """Runs `run_batch(jobs) -> results` (same order) on batches gathered from many threads.

    `runners` threads take batches (more than one lets batches run in parallel, e.g. one per CPU
    core); each holds `slot` while its batch runs (the scheduler's compute slots, shared with the
    feature stage, so the cores are never oversubscribed).
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
        self._coming = 0  # announced blocks not yet submitted
        self._closed = False
        self._cost: dict[int, float] = {}  # batch size -> smoothed seconds per batch
        self.batch_sizes: deque[int] = deque(maxlen=RECENT_BATCHES)  # recent batches, for stats and tests
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, runners))]
        for thread in self._threads:
            thread.start()

    def announce(self) -> None:
        """A block is being prepared and will be submitted (or withdrawn): worth waiting for."""
        with self._cond:
            self._coming += 1

    def withdraw(self) -> None:
        """An announced block will not come after all (its preparation failed or had nothing to do)."""
        with self._cond:
            self._coming -= 1
            self._cond.notify_all()

    def submit(self, job, due: float, announced: bool = False):
        """Queue `job` and block until its result (or re-raise its batch's exception)."""
        item = _Pending(job, due, time.monotonic())
        with self._cond:
            if announced:
                self._coming -= 1
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(item)
            self._cond.notify_all()
        return item.future.result()

    def estimate(self, size: int) -> float:
        """Expected seconds for a batch of `size`: measured, else scaled from the nearest measured size."""
        if size in self._cost:
            return self._cost[size]
        if not self._cost:
            return 0.0
        nearest = min(self._cost, key=lambda s: abs(s - size))
        return self._cost[nearest] * size / nearest if size > nearest else self._cost[nearest]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5.0)

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
                    results = self.run_batch([p.job for p in batch])
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
                p.future.set_result(result)

    def _gather(self) -> list[_Pending] | None:
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                while (not self._closed and self._pending and len(self._pending) < self.max_batch
                       and self._coming > 0):
                    wait = self._close_at() - time.monotonic()
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

    def _close_at(self) -> float:
        """When the pending jobs must start: the oldest's deadline, or earlier if a job that can
        still be on time would be late. A job already too late for its budget (the server is
        overloaded) does not cut the wait short: then only larger batches help it catch up."""
        oldest = self._pending[0].arrived + self.deadline_s
        cost = self.estimate(len(self._pending) + 1)  # waiting is only worth it for one more job
        now_cost = self.estimate(len(self._pending))
        latest = [p.due - cost for p in self._pending if p.due - now_cost > p.arrived]  # could be on time
        return min([oldest, *latest])


class BatchScheduler:
    """The server's block scheduler for batched voices (same `run`/`close` as `BlockScheduler`).

    `threads`: every client may be parked waiting for its batch, so one per client (plus one for
    session set-up); `slot` (a semaphore of `workers`) is held by every computation, a stream's
    feature extraction or a batch, so at most `workers` run at once (more would oversubscribe the
    cores); batches run on `workers` runner threads.
    """

    def __init__(self, workers: int, max_clients: int):
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=max_clients + 1, thread_name_prefix="rtsvc-stream")
        self.slot = threading.BoundedSemaphore(workers)
        self.batchers: list[DeadlineBatcher] = []

    def batcher(self, run_batch: Callable[[list], list], max_batch: int,
                deadline_s: float) -> DeadlineBatcher:
        """A batcher whose batches run on `workers` runner threads, each holding a compute slot."""
        batcher = DeadlineBatcher(run_batch, max_batch, deadline_s, runners=self.workers, slot=self.slot)
        self.batchers.append(batcher)
        return batcher

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        for batcher in self.batchers:
            batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["DEFAULT_BATCH_DEADLINE_MS", "DEFAULT_MAX_BATCH", "BatchScheduler", "DeadlineBatcher"]
