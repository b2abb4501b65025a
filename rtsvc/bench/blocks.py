"""Benchmarks (`rtsvc bench`): engine compute time per block, and streaming vs offline distance.

Compute: each configuration streams a synthetic sung tone through `StreamingConverter` and
reports per-block compute time (mean, p50, p99), real-time factor (compute / block length) and the
engine's algorithmic latency, and where a block's time goes (`StageTimes`: the voice's own `last_ms`
per stage, the rest of the engine's time is SOLA, gains and copies). Nothing here asserts on time;
it prints tables.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtsvc.autoblock import resolve_block
from rtsvc.dsp.audio import SAMPLE_RATE
from rtsvc.dsp.signals import sung_tone
from rtsvc.engine import StreamConfig, StreamingConverter
from rtsvc.errors import UserError
from rtsvc.settings import Knobs, RuntimeSettings
from rtsvc.voice import Voice
from rtsvc.voices.spec import VoiceSpec, open_voice

WARMUP_BLOCKS = 2  # first blocks pay for lazy initialisation; not timed
STAGES = ("f0", "contentvec", "whisper", "dit", "vocoder")  # a model block's big parts, in order
SMALL_STAGES = ("resample", "rms")  # the feature cache's cheap parts, shown summed as "resample+rms"


class StageTimes:
    """A voice seen through the engine, keeping each `convert`'s wall time and (model voices) its
    `last_ms` per stage; everything else is the wrapped voice's."""

    def __init__(self, voice: Voice):
        self.voice = voice
        self.rows: list[dict[str, float]] = []

    def __getattr__(self, name: str):
        return getattr(self.voice, name)

    def convert(self, *args, **kwargs):
        started = time.perf_counter()
        out = self.voice.convert(*args, **kwargs)
        row = dict(getattr(self.voice, "last_ms", None) or {})
        row["voice"] = (time.perf_counter() - started) * 1000.0
        self.rows.append(row)
        return out

    def means(self, block_mean_ms: float) -> dict[str, float]:
        """Mean ms per stage over the recorded blocks; `engine` = the block's mean minus the voice's."""
        if not self.rows:
            return {}
        mean = lambda key: float(np.mean([r.get(key, 0.0) for r in self.rows]))  # noqa: E731
        out = {stage: mean(stage) for stage in STAGES}
        out["resample+rms"] = sum(mean(k) for k in SMALL_STAGES)
        out["voice"] = mean("voice")
        out["engine"] = max(block_mean_ms - out["voice"], 0.0)
        return out


@dataclass
class BenchCase:
    label: str  # e.g. "dsp" or "model.ckpt torch"
    device: str  # "cpu" / "cuda"
    voice: Voice
    config: StreamConfig
    steps: int | None = None  # model voices: sampling steps (grid points)
    schedule: str = "uniform"  # model voices: where the grid points fall


def parse_list(text: str, kind: type, option: str) -> list:
    """A comma-separated option value (`--block-ms 50,100`) -> a non-empty list of `kind`."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise UserError(f"{option} needs at least one value")
    return values


def parse_blocks(text: str) -> list[float | None]:
    """`--block-ms 50,auto,150` -> [50.0, None, 150.0] (None: the voice's auto block)."""
    def block(part: str) -> float | None:
        return None if part.strip().lower() == "auto" else float(part)

    return parse_list(text, block, "--block-ms")


def resolve_configs(configs: list[StreamConfig], voice: Voice) -> list[StreamConfig]:
    """`configs` with auto blocks measured for `voice` as live does (`rtsvc.autoblock`),
    duplicates dropped (order kept)."""
    resolved = [resolve_block(voice, c) for c in configs]
    return [c for i, c in enumerate(resolved) if c not in resolved[:i]]


def dsp_configs(configs: list[StreamConfig]) -> list[StreamConfig]:
    """`configs` as the DSP voice runs them (`rtsvc bench --loopback` measures each)."""
    from rtsvc.voices.dsp import DspVoice

    return resolve_configs(configs, DspVoice())


def bench_devices(spec: str) -> list[str]:
    """--device: `all` is cpu plus cuda when torch sees a GPU; else a comma list as given."""
    if spec != "all":
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        for device in devices:
            if device not in ("cpu", "auto") and not device.startswith("cuda"):
                raise UserError(f"unknown --device {device!r}: use all or a comma list of cpu, cuda")
        return devices or ["cpu"]
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_cases(configs: list[StreamConfig], spec: VoiceSpec, steps: list[int] = (),
               backends: list[str] = ("auto",), devices: list[str] = ("cpu",),
               teacher_steps: list[int] = (4,), schedule: str = "uniform") -> list[BenchCase]:
    """The DSP voice at every config, then (with `spec.model`) every device x backend x config x
    steps, each opened from `spec` with that backend and device. Without `steps` a distilled
    student runs its own count, a teacher `teacher_steps`."""
    from rtsvc.settings import validate_knobs

    for count in steps:
        validate_knobs(Knobs(steps=count, schedule=schedule))  # before any model loads
    validate_knobs(Knobs(schedule=schedule))
    spec = spec.validate()  # f0, providers, DiT context: checked even when only the DSP voice runs
    dsp = open_voice(VoiceSpec())
    cases = [BenchCase("dsp", "cpu", dsp, c) for c in resolve_configs(configs, dsp)]
    if spec.model is None:
        return cases
    for device in devices:
        for backend in backends:
            voice = open_voice(spec.with_(backend=backend, device=device, streaming=True))
            own = getattr(voice, "default_steps", None)
            counts = list(steps) or ([own] if own else list(teacher_steps))
            cases += [BenchCase(f"{Path(spec.model).name} {backend}", device, voice, c, s, schedule)
                      for c in resolve_configs(configs, voice) for s in counts]
    return cases


def gap_grid(configs: list[StreamConfig], crossfades: list[float],
             searches: list[float]) -> list[StreamConfig]:
    """`rtsvc bench --gap`: every block length (and context) x crossfade x SOLA search, validated."""
    return [StreamConfig(block_ms=c.block_ms, context_ms=c.context_ms, crossfade_ms=x,
                         sola_search_ms=s).validate() for c in configs for x in crossfades for s in searches]


def bench_case(case: BenchCase, seconds: float = 5.0) -> dict:
    """Stream `seconds` of the test signal through one configuration; compute-time statistics."""
    knobs = Knobs(gate_db=-120.0, steps=case.steps or Knobs().steps,  # gate off: every block is timed
                  schedule=case.schedule)
    voice = StageTimes(case.voice)
    engine = StreamingConverter(voice, RuntimeSettings(knobs), case.config)
    block = engine.layout.block
    audio = sung_tone(seconds + (WARMUP_BLOCKS + 1) * block / engine.sample_rate, engine.sample_rate)
    engine.process(audio[: WARMUP_BLOCKS * block])
    engine.reset_stats()  # drop warm-up timings
    voice.rows.clear()
    cpu = time.process_time()  # CPU seconds of this process: meaningful on a shared, busy machine
    engine.process(audio[WARMUP_BLOCKS * block:])
    cpu = time.process_time() - cpu
    st = engine.stats()
    return {"voice": case.label, "device": case.device, "steps": case.steps, "block_ms": st["block_ms"],
            "blocks": st["blocks"], "mean_ms": st["compute_ms_mean"], "p50_ms": st["compute_ms_p50"],
            "p99_ms": st["compute_ms_p99"], "cpu_ms": cpu * 1000.0 / max(st["blocks"], 1), "rtf": st["rtf"],
            "p99_block": st["compute_ms_p99"] / st["block_ms"], "latency_ms": st["latency_ms"],
            "stages": voice.means(st["compute_ms_mean"])}


def stage_table(rows: list[dict], title: str = "where a block's time goes (mean ms per block)"):
    """One row per configuration: mean ms of each stage (model voices; the DSP voice is one stage)."""
    from rich.table import Table

    table = Table(title=title, caption="f0, contentvec, whisper: the feature cache's new work per block; "
                  "resample+rms: the rest of it; engine: SOLA, gains, copies (block minus voice)")
    columns = ("voice", "device", "steps", "block ms") + STAGES + ("resample+rms", "engine", "total")
    for name in columns:
        table.add_column(name, justify="left" if name in ("voice", "device") else "right")
    for r in rows:
        st = r.get("stages") or {}
        table.add_row(r["voice"], r["device"], "-" if r["steps"] is None else str(r["steps"]),
                      f"{r['block_ms']:.1f}", *(f"{st.get(k, 0.0):.1f}" for k in STAGES),
                      f"{st.get('resample+rms', 0.0):.1f}", f"{st.get('engine', 0.0):.1f}",
                      f"{r['mean_ms']:.1f}")
    return table


def bench_table(rows: list[dict], title: str = "rtsvc bench: streaming engine, per-block compute"):
    from rich.table import Table

    table = Table(title=title, caption="ms = wall-clock compute per block; CPU ms = process CPU time per "
                  "block; RTF = mean / block length (< 1 keeps up); p99/block = the real-time margin "
                  "(keep it well under 1: docs/streaming.md chose blocks at <= 0.6)")
    for name in ("voice", "device", "steps", "block ms", "blocks", "mean ms", "p50 ms", "p99 ms",
                 "CPU ms", "RTF", "p99/block", "algo latency ms"):
        table.add_column(name, justify="left" if name in ("voice", "device") else "right")
    for r in rows:
        table.add_row(r["voice"], r["device"], "-" if r["steps"] is None else str(r["steps"]),
                      f"{r['block_ms']:.1f}", str(r["blocks"]), f"{r['mean_ms']:.1f}", f"{r['p50_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", f"{r['cpu_ms']:.1f}", f"{r['rtf']:.3f}", f"{r['p99_block']:.2f}",
                      f"{r['latency_ms']:.1f}")
    return table


def run_bench(cases: list[BenchCase], seconds: float = 5.0, console=None) -> list[dict]:
    """Run every case (with a progress bar) and print one table; returns the rows."""
    from rich.console import Console
    from rich.progress import Progress

    if seconds <= 0:
        raise UserError(f"--seconds must be positive, got {seconds:g}")
    console = console or Console()
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.label} {case.device} block {case.config.block_ms:g} ms")
            rows.append(bench_case(case, seconds))
            progress.advance(task)
    console.print(bench_table(rows))
    if any(r["stages"].get("dit") for r in rows):  # a model voice ran: show where its time went
        console.print(stage_table(rows))
    return rows


# --- streaming vs offline: how the stream settings change the output ---------------------------

def log_spectral_distance(a: np.ndarray, b: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Mean over STFT frames of the RMS difference of the two power spectra, in dB."""
    from scipy.signal import stft

    _, _, sa = stft(a, sample_rate, nperseg=2048, noverlap=1536)
    _, _, sb = stft(b, sample_rate, nperseg=2048, noverlap=1536)
    la, lb = (10 * np.log10(np.abs(s) ** 2 + 1e-8) for s in (sa, sb))
    return float(np.mean(np.sqrt(np.mean((la - lb) ** 2, axis=0))))


def streaming_gap(voice: Voice, configs: list[StreamConfig], knobs: Knobs | None = None,
                  seconds: float = 4.0) -> list[dict]:
    """LSD between `convert_stream` and the offline conversion of the same test signal, per config
    (how docs/streaming.md chose the default block, crossfade and SOLA search).

    `voice` is the offline reference: the DSP voice, or a model voice opened with `streaming=False` (whose
    `for_streaming()` variant, same weights, is what gets streamed). A streaming model voice as the
    reference would compare the stream against itself."""
    from rtsvc.engine import StreamLayout, convert_stream

    if getattr(voice, "streaming", False):
        raise ValueError("streaming_gap needs the offline voice as its reference: "
                         "open it with VoiceSpec(streaming=False)")
    streamed_voice = voice.for_streaming() if hasattr(voice, "for_streaming") else voice
    knobs = knobs or Knobs(pitch_shift=5, gate_db=-70.0)
    audio = sung_tone(seconds, voice.sample_rate)
    voice.reset()
    offline = voice.convert(audio, knobs)
    rows = []
    for config in configs:
        config = config.for_voice(streamed_voice)  # an auto block: this voice's
        streamed = convert_stream(streamed_voice, audio, knobs, config)
        latency = StreamLayout.from_config(config, voice.sample_rate).latency
        rows.append({"block_ms": config.block_ms, "context_ms": config.context_ms,
                     "crossfade_ms": config.crossfade_ms, "sola_search_ms": config.sola_search_ms,
                     "lsd_db": log_spectral_distance(streamed, offline),
                     "latency_ms": latency * 1000.0 / voice.sample_rate})
    return rows


def run_gap(grid: list[StreamConfig], spec: VoiceSpec, console=None) -> dict[str, list[dict]]:
    """`rtsvc bench --gap`: `streaming_gap` of the DSP voice and, with `spec.model`, of its offline
    voice (`spec` with streaming=False, so the reference is the upstream offline conversion);
    prints one table per voice, returns the rows by voice."""
    from rich.console import Console
    from rich.progress import Progress

    console = console or Console()
    labels = ["dsp"] + ([Path(spec.model).name] if spec.model is not None else [])
    results = {}
    for label in labels:
        with Progress(console=console, transient=True) as progress:
            progress.add_task(f"{label}: streaming vs offline", total=None)
            voice = open_voice(VoiceSpec() if label == "dsp" else spec.with_(streaming=False))
            results[label] = streaming_gap(voice, grid)
        console.print(gap_table(results[label], title=f"{label}: streaming vs offline "
                                "(log-spectral distance, lower = closer)"))
    return results


def gap_table(rows: list[dict], title: str = "streaming vs offline (log-spectral distance, lower = closer)"):
    from rich.table import Table

    table = Table(title=title)
    for name in ("block ms", "context ms", "crossfade ms", "SOLA search ms", "LSD dB", "algo latency ms"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(f"{r['block_ms']:g}", f"{r['context_ms']:g}", f"{r['crossfade_ms']:g}",
                      f"{r['sola_search_ms']:g}", f"{r['lsd_db']:.2f}", f"{r['latency_ms']:.1f}")
    return table
