"""`rtsvc bench --streams N`: how many real-time clients one server holds, batched vs unbatched.

An in-process `StreamServer` listens on 127.0.0.1 (its own event loop in a thread); N simulated
clients connect through real websockets and each sends one engine block of a sung tone (f32le at
44.1 kHz, no resampling) every block period on an absolute clock, like a microphone would, starting
at staggered times within the first block. The server answers each frame with one frame; a
block's latency is answer time - send time. A block is late when its latency exceeds the block
period (the client's audio would run dry: the next block is already due). A run holds real time
when at most `LATE_LIMIT` of its blocks are late. The first `WARMUP_BLOCKS` of each stream are not
counted (cold feature caches, lazy initialisation).
"""

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rtsvc.dsp.audio import SAMPLE_RATE
from rtsvc.dsp.signals import sung_tone
from rtsvc.engine import StreamConfig, StreamLayout
from rtsvc.errors import UserError
from rtsvc.serve.server import ServerConfig, StreamServer, VoiceSource
from rtsvc.settings import Knobs

if TYPE_CHECKING:
    from rtsvc.voices.spec import VoiceSpec

WARMUP_BLOCKS = 3
LATE_LIMIT = 0.01  # fraction of blocks allowed late for a run to "hold real time"
DRAIN_S = 20.0  # after the last frame, answers still missing this much later count as late
NEVER_DROP_MS = 3_600_000.0  # the server's --max-lag-ms for the benchmark: convert every block


@dataclass
class StreamsRun:
    streams: int
    max_batch: int
    block_ms: float
    blocks: int  # counted blocks, all streams
    late: int
    p50_ms: float  # median over streams of each stream's median latency
    p99_ms: float  # worst stream's 99th percentile
    mean_batch: float  # mean blocks per DiT/vocoder batch (1 without batching)
    cpu_ms: float  # process CPU time per answered block (server + clients): robust to a shared machine
    load: float  # 1-minute load average when the run ended (the machine may be shared)

    @property
    def held(self) -> bool:
        return self.late <= LATE_LIMIT * self.blocks

    def capacity(self, cores: int) -> float:
        """Streams `cores` idle cores would hold at this CPU cost per block (an estimate)."""
        return cores * self.block_ms / self.cpu_ms if self.cpu_ms > 0 else float("inf")


class ServerThread:
    """A `StreamServer` on 127.0.0.1 with its own event loop in a daemon thread (context manager)."""

    def __init__(self, config: ServerConfig, source: VoiceSource, knobs: Knobs, stream_config: StreamConfig):
        self._args = (config, source, knobs, stream_config)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: StreamServer | None = None

    def __enter__(self) -> "ServerThread":
        self._thread = threading.Thread(target=self._main, name="rtsvc-bench-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the benchmark server did not start within 60 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def port(self) -> int:
        return self.server.port

    def _main(self) -> None:
        async def run() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                self.server = StreamServer(*self._args)
                await self.server.start()
            except BaseException as err:  # reported to the caller's thread
                self._error = err
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.server.close()

        asyncio.run(run())


async def _client(port: int, index: int, blocks: list[bytes], period: float, delay: float,
                  start: dict) -> list[float]:
    """One simulated real-time client; latency in seconds per block (inf: no answer in time)."""
    from websockets.asyncio.client import connect

    await asyncio.sleep(delay)
    latency = [float("inf")] * len(blocks)
    sent = [0.0] * len(blocks)
    async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, compression=None) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": SAMPLE_RATE, "format": "f32le", **start}))
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            raise RuntimeError(f"client {index}: the server answered {ready}")

        async def reader() -> None:
            for k in range(len(blocks)):
                await ws.recv()
                latency[k] = time.monotonic() - sent[k]

        reading = asyncio.create_task(reader())
        t0 = time.monotonic()
        for k, frame in enumerate(blocks):
            await asyncio.sleep(max(0.0, t0 + k * period - time.monotonic()))
            sent[k] = time.monotonic()
            await ws.send(frame)
        try:
            await asyncio.wait_for(reading, DRAIN_S)
        except TimeoutError:
            pass  # unanswered blocks stay inf: late
    return latency


def run_streams(source: VoiceSource, streams: int, max_batch: int, stream_config: StreamConfig,
                knobs: Knobs, seconds: float = 8.0, deadline_ms: float | None = None,
                workers: int = 0, seed: int = 0, batch_runners: int = 0) -> StreamsRun:
    """`streams` simulated clients for `seconds` through a fresh in-process server."""
    import os

    voice = source.model or source.make()
    block = StreamLayout.from_config(stream_config.for_voice(voice), SAMPLE_RATE).block  # whole mel frames
    period = block / SAMPLE_RATE
    count = WARMUP_BLOCKS + max(1, int(seconds / period))
    rng = np.random.default_rng(seed)
    # every block is converted, however late (the server's default answers very late input with
    # silence, which would hide the cost of overload): lateness is what the clients measure
    server_config = ServerConfig(port=0, max_clients=streams, max_batch=max_batch, workers=workers,
                                 batch_runners=batch_runners,
                                 idle_timeout_s=120.0, max_lag_ms=NEVER_DROP_MS, send_timeout_s=120.0,
                                 **({} if deadline_ms is None else {"batch_deadline_ms": deadline_ms}))
    plans = []
    for i in range(streams):
        audio = sung_tone(count * period + 0.1, SAMPLE_RATE, f0=rng.uniform(110, 330), seed=i)
        frames = [audio[k * block:(k + 1) * block].astype("<f4").tobytes() for k in range(count)]
        start = {"pitch_shift": float(rng.integers(-6, 7))}
        if source.speakers:
            start["speaker"] = source.speakers[i % len(source.speakers)]
        plans.append((frames, rng.uniform(0, period), start))

    async def clients(port: int):
        return await asyncio.gather(*[_client(port, i, f, period, d, s) for i, (f, d, s) in enumerate(plans)])

    with ServerThread(server_config, source, knobs, stream_config) as running:
        cpu = time.process_time()
        latencies = asyncio.run(clients(running.port))
        cpu = time.process_time() - cpu
        batchers = getattr(running.server.scheduler, "batchers", [])
        sizes = [s for b in batchers for s in b.batch_sizes]
    counted = [np.array(lat[WARMUP_BLOCKS:]) for lat in latencies]
    late = sum(int(np.sum(lat > period)) for lat in counted)
    finite = [lat[np.isfinite(lat)] for lat in counted]
    p50 = float(np.median([np.median(f) for f in finite if f.size])) * 1000.0 if any(f.size for f in finite) \
        else float("inf")
    p99 = max((float(np.percentile(f, 99)) if f.size == len(c) else float("inf"))
              for f, c in zip(finite, counted, strict=True)) * 1000.0
    answered = sum(int(np.sum(np.isfinite(lat))) for lat in latencies)
    return StreamsRun(streams, max_batch, period * 1000.0, sum(len(c) for c in counted), late, p50, p99,
                      float(np.mean(sizes)) if sizes else 1.0, cpu * 1000.0 / max(answered, 1),
                      os.getloadavg()[0])


def parse_counts(text: str, option: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]: positive integers."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} must be a comma-separated list of whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} needs whole numbers of at least 1, got {text!r}")
    return values


def streams_table(rows: list[StreamsRun]):
    import os

    from rich.table import Table

    cores = os.cpu_count() or 1

    table = Table(title="rtsvc bench --streams: simulated real-time clients over loopback websockets",
                  caption=f"latency = answer - send per block; late = latency > block; held = late <= "
                  f"{LATE_LIMIT:.0%} of blocks; CPU ms = process CPU time per answered block; est. = "
                  f"streams {cores} idle cores would hold at that cost; load = 1-min load average")
    for name in ("streams", "max batch", "block ms", "blocks", "late", "p50 ms", "p99 ms", "mean batch",
                 "held", "CPU ms", "est.", "load"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r.streams), str(r.max_batch), f"{r.block_ms:.1f}", str(r.blocks), str(r.late),
                      f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.mean_batch:.2f}", "yes" if r.held else "no",
                      f"{r.cpu_ms:.1f}", f"{r.capacity(cores):.1f}", f"{r.load:.1f}")
    return table


def largest_held(rows: list[StreamsRun]) -> dict[int, int]:
    """max_batch -> the largest stream count held in real time (0: none)."""
    out: dict[int, int] = {}
    for r in rows:
        out.setdefault(r.max_batch, 0)
        if r.held:
            out[r.max_batch] = max(out[r.max_batch], r.streams)
    return out


def run_streams_command(spec: "VoiceSpec", counts: str, batches: str, block_ms: str, steps: str | None,
                        context_ms: float, crossfade_ms: float, seconds: float, deadline_ms: float,
                        threads: int, console=None, batch_runners: int = 0) -> list[StreamsRun]:
    """`rtsvc bench --streams`: options as typed (comma lists; the first block and steps value are
    used) -> `run_streams_bench` on the voice of `spec` with the gate off."""
    import torch

    from rtsvc.bench.blocks import parse_blocks
    from rtsvc.serve.server import dsp_source, model_source
    from rtsvc.settings import validate_knobs
    from rtsvc.voices.spec import open_voice

    counts_, batches_ = parse_counts(counts, "--streams"), parse_counts(batches, "--max-batches")
    steps_ = parse_counts(steps, "--steps")[0] if steps else Knobs.steps
    knobs = validate_knobs(Knobs(gate_db=-120.0, steps=steps_))
    config = StreamConfig(block_ms=parse_blocks(block_ms)[0], context_ms=context_ms,
                          crossfade_ms=crossfade_ms).validate()
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if seconds <= 0:
        raise UserError(f"--seconds must be positive, got {seconds:g}")
    voice = open_voice(spec)
    source = dsp_source() if spec.model is None else model_source(voice, spec.model.name)
    torch.set_num_threads(threads)
    return run_streams_bench(source, counts_, batches_, config, knobs, seconds, deadline_ms,
                             batch_runners=batch_runners, console=console)


def run_streams_bench(source: VoiceSource, counts: list[int], batches: list[int], stream_config: StreamConfig,
                      knobs: Knobs, seconds: float = 8.0, deadline_ms: float | None = None, workers: int = 0,
                      console=None, batch_runners: int = 0) -> list[StreamsRun]:
    """Every stream count, each with every max batch in turn (alternating, so a change in the
    machine's load hits both alike); prints the table and the largest count held per max batch."""
    from rich.console import Console

    if seconds <= 0:
        raise UserError(f"--seconds must be positive, got {seconds:g}")
    if source.model is None and any(b > 1 for b in batches):
        batches = [1]  # the DSP voice has no model stages to batch
    console = console or Console()
    rows = []
    for n in counts:
        for b in batches:
            r = run_streams(source, n, b, stream_config, knobs, seconds, deadline_ms, workers,
                            batch_runners=batch_runners)
            rows.append(r)
            console.print(f"streams {n}, max batch {b}: late {r.late}/{r.blocks}, p50 {r.p50_ms:.0f} ms, "
                          f"p99 {r.p99_ms:.0f} ms, mean batch {r.mean_batch:.2f}, "
                          f"CPU {r.cpu_ms:.0f} ms/block, load {r.load:.1f}", highlight=False)
    console.print(streams_table(rows))
    held = largest_held(rows)
    console.print("largest stream count held in real time: " +
                  ", ".join(f"max batch {b}: {n}" for b, n in held.items()), highlight=False)
    return rows


__all__ = ["LATE_LIMIT", "ServerThread", "StreamsRun", "largest_held", "parse_counts", "run_streams",
           "run_streams_bench", "run_streams_command", "streams_table"]
