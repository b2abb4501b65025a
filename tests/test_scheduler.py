"""`DeadlineBatcher`: batches form from blocks in flight together, never past a job's budget, and
a lone block does not wait."""

import threading
import time

import pytest

from rtsvc.apps.scheduler import DeadlineBatcher


def doubled(jobs):
    return [2 * j for j in jobs]


def submit_all(batcher, jobs, due_in: float = 10.0):
    """Announce every job, then submit each from its own thread; (results by job, seconds each took)."""
    results, took = {}, {}
    for _ in jobs:
        batcher.announce()

    def one(job):
        started = time.monotonic()
        results[job] = batcher.submit(job, started + due_in, announced=True)
        took[job] = time.monotonic() - started

    threads = [threading.Thread(target=one, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results, took


def test_concurrent_jobs_form_one_batch_as_soon_as_it_is_full():
    batcher = DeadlineBatcher(doubled, max_batch=4, deadline_s=5.0)
    try:
        results, took = submit_all(batcher, [1, 2, 3, 4])
        assert results == {1: 2, 2: 4, 3: 6, 4: 8}
        assert list(batcher.batch_sizes) == [4]
        assert max(took.values()) < 2.0  # full: it did not wait for the 5 s deadline
    finally:
        batcher.close()


def test_a_lone_job_does_not_wait():
    batcher = DeadlineBatcher(doubled, max_batch=8, deadline_s=5.0)
    try:
        started = time.monotonic()
        assert batcher.submit(21, started + 10.0) == 42  # nothing else announced: runs at once
        assert time.monotonic() - started < 0.5
    finally:
        batcher.close()


def test_a_job_waits_for_an_announced_one_up_to_the_deadline_and_no_longer():
    batcher = DeadlineBatcher(doubled, max_batch=8, deadline_s=0.08)
    try:
        batcher.announce()  # a second stream is preparing a block ... that never comes (a dead client)
        started = time.monotonic()
        assert batcher.submit(21, started + 10.0) == 42
        assert 0.075 <= time.monotonic() - started < 0.6
        batcher.withdraw()
    finally:
        batcher.close()


def test_a_job_is_never_held_past_its_budget():
    batcher = DeadlineBatcher(doubled, max_batch=8, deadline_s=5.0)
    try:
        batcher.announce()
        started = time.monotonic()
        batcher.submit(1, started + 0.1)  # due in 100 ms: runs by then though the deadline is 5 s
        assert time.monotonic() - started < 0.6
    finally:
        batcher.close()


def test_a_job_already_past_its_budget_waits_for_company_up_to_the_deadline():
    batcher = DeadlineBatcher(doubled, max_batch=2, deadline_s=5.0)
    try:
        results, took = {}, {}
        batcher.announce()

        def late_one():
            started = time.monotonic()
            results["late"] = batcher.submit(1, started - 1.0)  # overloaded server: already late
            took["late"] = time.monotonic() - started

        thread = threading.Thread(target=late_one)
        thread.start()
        time.sleep(0.3)
        assert "late" not in results  # it waits for the announced block instead of running alone
        assert batcher.submit(2, time.monotonic() + 10.0, announced=True) == 4
        thread.join(5)
        assert results["late"] == 2 and list(batcher.batch_sizes) == [2]
    finally:
        batcher.close()


def test_measured_batch_time_starts_a_batch_early_enough():
    def slow(jobs):
        time.sleep(0.2)
        return jobs

    batcher = DeadlineBatcher(slow, max_batch=8, deadline_s=5.0)
    try:
        batcher.submit(0, time.monotonic() + 0.2)  # teaches it: a batch takes ~0.2 s
        assert batcher.estimate(1) == pytest.approx(0.2, abs=0.15)
        batcher.announce()  # someone is coming, but waiting for them would make job 1 late
        started = time.monotonic()
        batcher.submit(1, started + 0.3)  # must start within ~0.1 s to be done in 0.3 s
        assert time.monotonic() - started < 0.3 + 0.25
    finally:
        batcher.close()


def test_a_failing_batch_fails_only_its_jobs():
    calls = []

    def flaky(jobs):
        calls.append(list(jobs))
        if 13 in jobs:
            raise ValueError("unlucky")
        return doubled(jobs)

    batcher = DeadlineBatcher(flaky, max_batch=1, deadline_s=0.0)
    try:
        with pytest.raises(ValueError, match="unlucky"):
            batcher.submit(13, time.monotonic() + 1.0)
        assert batcher.submit(4, time.monotonic() + 1.0) == 8
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1, time.monotonic() + 1.0)


def test_max_batch_caps_the_batch():
    batcher = DeadlineBatcher(doubled, max_batch=2, deadline_s=5.0)
    try:
        results, _ = submit_all(batcher, list(range(5)))
        assert results == {j: 2 * j for j in range(5)}
        assert max(batcher.batch_sizes) == 2 and sum(batcher.batch_sizes) == 5
    finally:
        batcher.close()


def test_several_runners_share_the_jobs_and_none_is_lost():
    def slowish(jobs):
        time.sleep(0.01)
        return doubled(jobs)

    batcher = DeadlineBatcher(slowish, max_batch=3, deadline_s=0.02, runners=3)
    try:
        for _ in range(3):  # rounds of many concurrent submitters racing the runners
            results, _ = submit_all(batcher, list(range(20)))
            assert results == {j: 2 * j for j in range(20)}
        assert all(t.is_alive() for t in batcher._threads)
    finally:
        batcher.close()
