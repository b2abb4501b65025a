"""Run a window's F0 extraction alongside its encoders.

Once a window's 16 kHz segment exists, F0 and the encoders (ContentVec, Whisper) read it and write
different frame stores, so they need not wait for each other. On a 2-core CPU, one stream's F0
(torch, 1 thread) next to ContentVec (ONNX Runtime) costs about the longer of the two instead of
their sum where a core is free (measured 81 -> 46 ms per pair): ONNX Runtime releases the GIL while
it runs, so torch's many small F0 ops get it meanwhile. The results are the same numbers either way.

How it composes with the feature-request protocol (`rtsvc.features.requests`): the single-stream
driver `drive(..., side=SideThread())` answers an F0 request with a `concurrent.futures.Future`
from the side thread instead of the result, and goes on to the next request (ContentVec) at once;
`FeatureCache` writes the F0 frames when the window is assembled. The many-stream lockstep driver
answers with results, as before.

Worth it where a stream has a core to spare (live, `convert --stream`, bench); where many streams
already keep every core busy (`serve` with many clients) it only adds a thread per stream.
"""

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class SideThread:
    """One worker thread (created on first use) that computes a request while the caller goes on."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, call: Callable[[], object]) -> Future:
        """`call()` on the worker, under inference mode (it is per thread); the future's result is
        (value, milliseconds it took)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtsvc-features")
        return self._pool.submit(_timed_without_grad, call)


def _timed_without_grad(call: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    with torch.inference_mode():
        value = call()
    return value, (time.perf_counter() - started) * 1000.0


__all__ = ["SideThread"]
