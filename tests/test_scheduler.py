"""`DeadlineBatcher`: batches form from streams expected together (phase-aware), never past a job's
budget or the deadline, and a lone block or a stream not due soon does not wait."""

import threading
import time

import pytest

from rtsvc.serve.scheduler import DeadlineBatcher


def doubled(jobs):
    return [2 * j for j in jobs]


def submit_all(batcher, jobs, due_in: float = 10.0):
    """Submit each job from its own thread at once; (results by job, seconds each took)."""
    results, took = {}, {}

    def one(job):
        started = time.monotonic()
        results[job] = batcher.submit(job, started + due_in, stream=job)
        took[job] = time.monotonic() - started

    threads = [threading.Thread(target=one, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results, took


def clients(batcher, phases: dict, period: float, rounds: int, due_in: float | None = None):
    """Real-time clients: client k submits at phases[k] + r * period on one clock; returns
    {(k, r): (result, seconds waited)}."""
    out, t0 = {}, time.monotonic() + 0.05

    def run(k):
        for r in range(rounds):
            at = t0 + phases[k] + r * period
            time.sleep(max(0.0, at - time.monotonic()))
            started = time.monotonic()
            result = batcher.submit((k, r), started + (due_in or period), stream=k)
            out[(k, r)] = (result, time.monotonic() - started)

    threads = [threading.Thread(target=run, args=(k,)) for k in phases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def echo(jobs):
    return list(jobs)


def sleeping(seconds: float, answer=echo):
    """A batch function that takes `seconds` per batch, whatever its size, then answers."""
    def run(jobs):
        time.sleep(seconds)
        return answer(jobs)

    return run


def test_a_lone_stream_never_waits():
    batcher = DeadlineBatcher(echo, max_batch=8, deadline_s=5.0)
    try:
        out = clients(batcher, {"a": 0.0}, period=0.1, rounds=4)
        assert max(took for _, took in out.values()) < 0.05
        assert list(batcher.batch_sizes) == [1, 1, 1, 1]
    finally:
        batcher.close()


def test_streams_with_close_phases_batch_before_anyone_is_late():
    batcher = DeadlineBatcher(echo, max_batch=8, deadline_s=0.1)
    try:
        out = clients(batcher, {"a": 0.0, "b": 0.03}, period=0.25, rounds=4)
        assert all(result == key for key, (result, _) in out.items())
        # round 0 teaches the rhythm (each alone); from then on "a" waits ~30 ms for "b"
        assert list(batcher.batch_sizes)[-3:] == [2, 2, 2], list(batcher.batch_sizes)
        assert all(0.015 < out[("a", r)][1] < 0.09 for r in (1, 2, 3))
        assert all(out[(k, r)][1] < 0.25 for k, r in out)  # on time
    finally:
        batcher.close()


def test_a_stream_not_expected_before_the_deadline_is_not_waited_for():
    batcher = DeadlineBatcher(echo, max_batch=8, deadline_s=0.03)
    try:
        out = clients(batcher, {"a": 0.0, "b": 0.12}, period=0.25, rounds=3)
        assert list(batcher.batch_sizes) == [1] * 6
        assert max(took for _, took in out.values()) < 0.025
    finally:
        batcher.close()


def test_a_dead_client_delays_others_at_most_the_deadline_and_then_is_forgotten():
    batcher = DeadlineBatcher(echo, max_batch=8, deadline_s=0.06)
    try:
        assert batcher.submit("b0", time.monotonic() + 0.1, stream="b") == "b0"  # b's only block
        waits = []
        for r in range(6):  # "a" every 100 ms; "b" was expected 100 ms after its block, never came
            started = time.monotonic()
            batcher.submit(r, started + 0.1, stream="a")
            waits.append(time.monotonic() - started)
            time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
        assert max(waits) < 0.06 + 0.03  # never beyond the deadline
        assert max(waits[3:]) < 0.02  # "b" is stale after two periods: nobody waits for it
        assert list(batcher._streams) == ["a"]  # and forgotten (a server runs for days)
    finally:
        batcher.close()


def test_a_job_is_never_held_past_its_budget():
    batcher = DeadlineBatcher(sleeping(0.1), max_batch=8, deadline_s=5.0)
    try:
        batcher.submit("b0", time.monotonic() + 0.3, stream="b")  # teaches: a batch takes ~0.1 s
        assert batcher.estimate(1) == pytest.approx(0.1, abs=0.08)
        started = time.monotonic()  # "b" is expected within the 5 s deadline ...
        batcher.submit(1, started + 0.2, stream="a")  # ... but "a" must start within ~0.1 s
        assert time.monotonic() - started < 0.2 + 0.05
    finally:
        batcher.close()


def test_jobs_that_queue_while_the_runner_is_busy_go_together():
    """Job 0 holds the only runner until jobs 1-4 have queued (events, not timing: a busy machine
    may start threads late); those four then run as one batch."""
    running, release = threading.Event(), threading.Event()

    def held(jobs):
        running.set()
        assert release.wait(10)
        return echo(jobs)

    batcher = DeadlineBatcher(held, max_batch=8, deadline_s=0.0)
    results = {}

    def one(job):
        results[job] = batcher.submit(job, time.monotonic() + 10.0, stream=job)

    threads = [threading.Thread(target=one, args=(j,)) for j in range(5)]
    try:
        threads[0].start()
        assert running.wait(10)  # job 0 is running
        for t in threads[1:]:
            t.start()
        with batcher._cond:  # submit() notifies this condition each time it queues a job
            assert batcher._cond.wait_for(lambda: len(batcher._pending) == 4, timeout=10)
        release.set()
        for t in threads:
            t.join(10)
        assert results == {j: j for j in range(5)}
        assert list(batcher.batch_sizes) == [1, 4]
    finally:
        release.set()
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
        one_fails = DeadlineBatcher(lambda jobs: [ValueError("mine") if j == 2 else j for j in jobs],
                                    max_batch=1, deadline_s=0.0)
        with pytest.raises(ValueError, match="mine"):  # an exception as a result fails its own job
            one_fails.submit(2, time.monotonic() + 1.0)
        assert one_fails.submit(3, time.monotonic() + 1.0) == 3
        one_fails.close()
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1, time.monotonic() + 1.0)


def test_max_batch_caps_the_batch():
    batcher = DeadlineBatcher(sleeping(0.1, doubled), max_batch=2, deadline_s=5.0)
    try:
        results, _ = submit_all(batcher, list(range(5)))  # queue while the first runs
        assert results == {j: 2 * j for j in range(5)}
        assert max(batcher.batch_sizes) == 2 and sum(batcher.batch_sizes) == 5
    finally:
        batcher.close()


def test_several_runners_share_the_jobs_and_none_is_lost():
    batcher = DeadlineBatcher(sleeping(0.01, doubled), max_batch=3, deadline_s=0.02, runners=3)
    try:
        for _ in range(3):  # rounds of many concurrent submitters racing the runners
            results, _ = submit_all(batcher, list(range(20)))
            assert results == {j: 2 * j for j in range(20)}
        assert all(t.is_alive() for t in batcher._threads)
    finally:
        batcher.close()


def test_a_spare_runner_leaves_blocks_to_a_busy_one_unless_they_would_be_late():
    for due_in, expected in ((1.0, [1, 1, 2]), (0.15, [1, 1, 1, 1])):
        batcher = DeadlineBatcher(sleeping(0.1), max_batch=8, deadline_s=0.2, runners=2)
        try:
            batcher.submit("teach", time.monotonic() + 1.0)  # a batch of one takes ~0.1 s
            results = {}

            def one(job, delay, batcher=batcher, results=results, due_in=due_in):
                time.sleep(delay)
                results[job] = batcher.submit(job, time.monotonic() + due_in, stream=job)

            threads = [threading.Thread(target=one, args=(job, d)) for job, d in (("x", 0), ("y", 0.02),
                                                                                   ("z", 0.04))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(5)
            assert results == {"x": "x", "y": "y", "z": "z"}
            # time to spare (and within the deadline): y and z wait for the busy runner and go
            # together; no time: in parallel
            assert list(batcher.batch_sizes) == expected, (due_in, list(batcher.batch_sizes))
        finally:
            batcher.close()
