"""Live microphone -> voice -> speaker with sounddevice (`rtsvc devices`, `rtsvc live`).

Threads: PortAudio's input callback only copies samples into a queue; a worker thread runs the
engine (resampling in, converting, resampling out) and appends to an output FIFO; the output
callback only copies from that FIFO. Nothing that can take long runs in a callback.

Output buffering: the engine delivers a block at a time, so the output FIFO is primed with
`jitter_ms` of silence when the first block with sound arrives (silent blocks before it, e.g. gated
ones that cost a model voice ~1 ms, would otherwise set the schedule). A block is then on time while
its compute takes at most `jitter_ms` longer than that first block's did, whatever the block
length; on a machine whose load moves compute by more (70-200 ms within a minute, measured), the
FIFO runs dry (an underrun) and is primed again with the silence it lacked added to the prime (at
most one block more in all), so the next equally late block is on time: latency grows only where
it must. After SETTLE_FIRST_S, then every SETTLE_S, the buffer is cut to what the output needed at
its lowest in that window plus half the prime (`OutputFifo.settle`), so latency also shrinks where
it can.
Drift: what waits between the callbacks returns to its target after a stall or a burst:
queued input over it is skipped and converted audio over it is dropped, both crossfaded and counted
as trims (`rtsvc/live/fifo.py`); under sustained overload the block grows (`rtsvc/live/chain.py`).
The status shows the end-to-end estimate: algorithmic + buffer + device (docs/latency.md).
"""


import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rtsvc.dsp.audio import rms_db
from rtsvc.engine import StreamConfig, StreamLayout
from rtsvc.errors import UserError
from rtsvc.live.chain import Conversion, OverloadGuard
from rtsvc.live.devices import (
    MAX_RATE,
    MIN_RATE,
    choose_audio_api,
    find_devices,
    load_sounddevice,
    pulse_routing,
)
from rtsvc.live.fifo import OutputFifo
from rtsvc.live.keys import KeyReader, key_help
from rtsvc.live.state import LiveState
from rtsvc.live.virtual_mic import VirtualMic
from rtsvc.pipeline import PipelinedAdapter
from rtsvc.settings import RuntimeSettings
from rtsvc.voice import Voice

if TYPE_CHECKING:
    from rtsvc.autoblock import AutoBlock

DEVICE_BLOCK_MS = 10.0  # PortAudio callback size
# PortAudio on a JACK server (PipeWire's JACK): 0, JACK's own period. A fixed size unequal to the
# period adds PortAudio's adapting buffer: 101 vs 88 ms mic to ear at a 256-sample quantum
# (benchmarks/pipewire_rig.py, docs/benchmarks.md)
JACK_DEVICE_BLOCK_MS = 0.0
MAX_DEVICE_BLOCK_MS = 100.0
NOMINAL_CHUNK_MS = 5.0  # the input chunk assumed until a variable-size (0) callback has delivered one
PULSE_DEVICE_BLOCK_MS = 5.0  # --audio-api pulse: record fragment and playback write size
AUDIO_API = "auto"  # --audio-api default: pulse on a pulse server with pasimple, else portaudio
MAX_JITTER_MS = 2000.0
MAX_QUEUE_S = 1.0  # more unprocessed input than this: drop the oldest (overrun)
STATUS_HZ = 4.0
LOG_EVERY_S = 1.0  # stderr no terminal: one plain status line this often
TRIM_TOLERANCE_MS = 10.0  # the output buffer may stand this far above its target before it is trimmed
# every SETTLE_S the output buffer is cut to keep half the jitter prime in hand at its lowest over the
# window (`OutputFifo.settle`): the first block's target carries its compute and the whole prime.
# DSP voice through the rig: 93-100 ms mic to ear against 109-121 without (docs/benchmarks.md)
SETTLE_S = 10.0
# the first settling comes sooner: 4 s of low water already holds the worst block (rig, alternated:
# 93, 89, 95 ms and no underrun against 96, 95, 116 ms with 1, 1, 5 at 10 s; docs/benchmarks.md)
SETTLE_FIRST_S = 4.0
PULSE_BUFFER_MS = 20.0  # --audio-api pulse: playback buffer (tlength) unless --device-buffer-ms
INPUT_WAIT_S = 10.0  # how long to wait for the first input callback before warning
# An output counts as running once it has taken this much audio: PortAudio's ALSA `pulse` device
# takes one callback's worth, then often nothing for 1.6-2 s. Sound arriving in that stall would pile
# up in the FIFO and be trimmed as drift, cutting the first second that was said.
OUTPUT_RUNNING_MS = 200.0
# A stream latency over this is no latency but a host API's bad report: PortAudio's JACK host API on
# PipeWire's JACK gives 97391 s (a wrapped frame count); the device part then reads "?"
MAX_DEVICE_LATENCY_S = 5.0


def _writes_to_fd2(console) -> bool:
    try:
        return console.file.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a StringIO and the like
        return False


@contextmanager
def native_stderr_above(console) -> Iterator[None]:
    """Keep C libraries' messages (ALSA, PortAudio, JACK write straight to fd 2) out of the status
    line: while live runs, fd 2 is a pipe whose lines `console` prints above the status, and
    `console` itself writes to a copy of the real stderr. Nothing changes when stderr is no terminal."""
    if not console.is_terminal:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    own_file = _writes_to_fd2(console)
    previous = console.file
    if own_file:
        console.file = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")

    def pump() -> None:
        with os.fdopen(read_fd, "r", errors="replace") as lines:
            for line in lines:
                if line.strip():
                    console.print(line.rstrip(), style="dim", highlight=False, markup=False, soft_wrap=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees the end
        os.close(saved)
        reader.join(timeout=1.0)
        if own_file:
            console.file.close()
            console.file = previous


def _wait_until(ready, state: LiveState, console, warning: str, timeout: float = INPUT_WAIT_S) -> None:
    """Return once `ready()` holds, live is stopped, or `timeout` s have passed (then print `warning`)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready() and time.monotonic() < deadline and not state.stop.is_set():
            time.sleep(0.02)
    except KeyboardInterrupt:
        state.stop.set()
        return
    if not ready():
        console.print(f"warning: {warning}", style="yellow")


def _wait_for_streams(state: LiveState, rate: int, monitor: bool, console) -> None:
    """Return once the input has delivered audio (PulseAudio can take a second or more) and each
    output has taken OUTPUT_RUNNING_MS of it (past the stall after its start)."""
    _wait_until(lambda: state.frames_in > 0, state, console,
                f"no input audio after {INPUT_WAIT_S:.0f} s; still waiting")
    need = int(OUTPUT_RUNNING_MS * rate / 1000)
    _wait_until(lambda: state.frames_out >= need and (not monitor or state.frames_monitor >= need), state,
                console, f"the output took no audio for {INPUT_WAIT_S:.0f} s; still waiting")


def _worker(conversion: Conversion, inbox: queue.Queue, state: LiveState) -> None:
    try:
        while not state.stop.is_set():
            try:
                chunk = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            conversion.process(conversion.skip_backlog(chunk, inbox))
    except BaseException as err:  # surfaced by the main loop
        state.error = err
        state.stop.set()


def device_latency_ms(*streams) -> float | None:
    """The streams' own latencies summed (ms), as the host API reports them; None where one is not a
    latency (negative, not finite or over MAX_DEVICE_LATENCY_S)."""
    seconds = [float(stream.latency) for stream in streams]
    if not all(0.0 <= value <= MAX_DEVICE_LATENCY_S for value in seconds):  # NaN fails too
        return None
    return sum(seconds) * 1000.0


def ms_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def latency_split(conversion: Conversion, fifo: OutputFifo, device_ms: float | None) -> dict:
    """The current end-to-end estimate and its parts (ms): algorithmic (the engine), buffer (input
    waiting for the worker + converted audio waiting for the device: compute time and jitter
    slack live here), device (PortAudio's / the sound server's stream latencies; None: not reported,
    left out of e2e)."""
    rate = conversion.out_rate
    algo = conversion.engine.latency_ms
    # now, not as of the last push: mid-compute the FIFO drains while input queues up
    buffer_ms = (fifo.level + conversion.inbox_samples() + conversion.held()) * 1000.0 / rate
    target_ms = (fifo.target or 0) * 1000.0 / rate
    return {"e2e_ms": algo + buffer_ms + (device_ms or 0.0), "algorithmic_ms": algo, "buffer_ms": buffer_ms,
            "buffer_target_ms": target_ms, "device_ms": device_ms}


def status_lines(conversion: Conversion, fifo: OutputFifo, state: LiveState, settings: RuntimeSettings,
                 device_ms: float | None, keys: KeyReader | None, width: int = 200):
    """The live status: three lines of at most 79 columns (each cut only on a narrower terminal)."""
    from rich.text import Text

    st, knobs = conversion.engine.stats(), settings.snapshot()
    split = latency_split(conversion, fifo, device_ms)
    level = max(-60.0, min(0.0, state.input_db))
    bar = "█" * int((level + 60) / 6) + "·" * (10 - int((level + 60) / 6))
    first = Text()
    first.append(f"in {bar} {state.input_db:6.1f} dB  ",
                 style="green" if state.input_db > knobs.gate_db else "dim")
    first.append(f"e2e ~{split['e2e_ms']:.0f} ms = algo {split['algorithmic_ms']:.0f} + buffer "
                 f"{split['buffer_ms']:.0f} + device {ms_text(device_ms)}")
    rtf_style = "red" if st["rtf"] > 0.9 else "yellow" if st["rtf"] > 0.6 else "green"
    second = Text()
    second.append(f"compute {st['compute_ms_recent']:.0f}/{st['block_ms']:.0f} ms (rtf {st['rtf']:.2f})  ",
                  style=rtf_style)
    over = fifo.overruns + state.input_overruns
    second.append(f"under {fifo.underruns} over {over} trim {fifo.trims}  ",
                  style="red" if fifo.underruns or over else "")
    second.append(f"target {split['buffer_target_ms']:.0f} ms  {state.seconds:6.1f} s")
    formant = f" formant {knobs.formant_shift:g}" if keys is None or keys.formant else ""
    denoise = f" denoise {knobs.denoise}" if knobs.denoise != "off" else ""
    denoise += " vad" if knobs.vad == "on" else ""  # the voice-activity gate is on
    gains = f"{knobs.input_gain_db:+g}/{knobs.output_gain_db:+g}"
    auto = st.get("auto_pitch")  # --pitch auto: the shift chosen
    auto = f" auto {auto:+.1f}" if auto is not None else ""
    third = Text(f"pitch {knobs.pitch_shift:+g}{auto}{formant} gate {knobs.gate_db:g} dB gain {gains} "
                 f"dB{denoise}")
    if st["limited_samples"]:
        third.append(f"  limited {st['limited_samples']}", style="yellow")
    lines = [first, second, third]
    if keys is not None and keys.message:
        lines.append(Text(keys.message, style="yellow"))
    # each line cut at the terminal width: a line the terminal wraps is taller than rich Live thinks,
    # and every refresh would then leave a copy behind
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return Text("\n").join(lines)


def log_line(conversion: Conversion, fifo: OutputFifo, state: LiveState, device_ms: float | None) -> str:
    """One plain status line (printed every LOG_EVERY_S when stderr is no terminal)."""
    st, split = conversion.engine.stats(), latency_split(conversion, fifo, device_ms)
    return (f"[{state.seconds:6.1f} s] e2e ~{split['e2e_ms']:.0f} ms = algo {split['algorithmic_ms']:.0f} + "
            f"buffer {split['buffer_ms']:.0f} (target {split['buffer_target_ms']:.0f}) + device "
            f"{ms_text(device_ms)}; compute {st['compute_ms_recent']:.0f}/{st['block_ms']:.0f} ms; under "
            f"{fifo.underruns} over {fifo.overruns + state.input_overruns} trim {fifo.trims}")


@contextmanager
def sigterm_as_stop(state: LiveState) -> Iterator[None]:
    """SIGTERM stops `live` the way Ctrl-C does (summary, exit 0), not with status 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame) -> None:
        state.terminated = True
        state.stop.set()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_device_buffer_ms(text: str | None) -> float | None:
    """`--device-buffer-ms`: milliseconds, or low/None (PortAudio's "low" / the API's default)."""
    if text is None or text.strip().lower() in ("", "low", "auto"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--device-buffer-ms must be a number of ms or low, got {text!r}") from None
    if not 1.0 <= value <= 1000.0:
        raise UserError(f"--device-buffer-ms must be between 1 and 1000 ms, got {value:g}")
    return value


def open_streams(sd, api: str, dev_in: dict, dev_out: dict, dev_mon: dict | None, in_rate: int, out_rate: int,
                 block_ms: float, buffer_ms: float | None, on_input, on_output, on_monitor):
    """(input, output, monitor or None) streams on `api`: portaudio (sounddevice) or pulse (pasimple)."""
    if api == "pulse":
        from rtsvc.live.pulse_native import PulseStream

        def name(device: dict, kind: str) -> str | None:
            if device.get("pulse"):
                return device["pulse"]
            if device["name"] in ("pulse", "default"):
                return None  # the server's default source / sink
            raise UserError(f"--audio-api pulse opens PulseAudio/PipeWire sources and sinks; "
                            f"{device['name']!r} is a {device['hostapi']} device (see `rtsvc devices`)")

        out_ms = PULSE_BUFFER_MS if buffer_ms is None else buffer_ms
        in_block, out_block = int(in_rate * block_ms / 1000), int(out_rate * block_ms / 1000)
        return (PulseStream("input", name(dev_in, "input"), in_rate, 1, in_block, max(out_ms, 4 * block_ms),
                            on_input),
                PulseStream("output", name(dev_out, "output"), out_rate, min(2, dev_out["outputs"]),
                            out_block, out_ms, on_output),
                None if dev_mon is None else PulseStream("output", name(dev_mon, "output"), out_rate,
                                                         min(2, dev_mon["outputs"]), out_block, out_ms,
                                                         on_monitor))
    if api != "portaudio":
        raise UserError(f"--audio-api must be portaudio or pulse, got {api!r}")
    latency = "low" if buffer_ms is None else buffer_ms / 1000.0

    def output(device: dict, callback):
        with pulse_routing(device, "output"):
            return sd.OutputStream(device=device["index"], samplerate=out_rate,
                                   channels=min(2, device["outputs"]), dtype="float32",
                                   blocksize=int(out_rate * block_ms / 1000), latency=latency,
                                   callback=callback)

    try:
        with pulse_routing(dev_in, "input"):
            in_stream = sd.InputStream(device=dev_in["index"], samplerate=in_rate, channels=1,
                                       dtype="float32", blocksize=int(in_rate * block_ms / 1000),
                                       latency=latency,
                                       callback=on_input)
        return in_stream, output(dev_out, on_output), None if dev_mon is None else output(dev_mon, on_monitor)
    except sd.PortAudioError as err:
        names = " + ".join(d["name"] for d in (dev_out, dev_mon) if d is not None)
        raise UserError(f"cannot open audio devices ({dev_in['name']} -> {names}): {err}") from None


def run_live(voice: Voice, settings: RuntimeSettings, config: StreamConfig | None = None,
             input_device: str | int | dict | None = None, output_device: str | int | dict | None = None,
             input_rate: int | None = None, output_rate: int | None = None, duration: float | None = None,
             record: str | Path | None = None, jitter_ms: float | None = None, console=None,
             keys: bool = True, monitor_device: str | int | dict | None = None, audio_api: str = AUDIO_API,
             device_block_ms: float | None = None, device_buffer_ms: float | None = None,
             pipeline: bool = False, adapt: bool = True, virtual_mic: str | None = None) -> dict:
    """Run mic -> voice -> speaker until Ctrl-C, SIGTERM, `q`, or `duration` seconds; return the final
    counters.

    Devices are indices or names (`find_device`), PulseAudio/PipeWire sources and sinks included, or
    the entries `find_devices` returned; `monitor_device` also plays the converted voice (e.g.
    headphones, while the output is a cable). `jitter_ms`: the output buffer's prime (None: the voice's
    floor, `stream_defaults.jitter_ms`). `audio_api`: portaudio (sounddevice), pulse (a native
    PulseAudio/PipeWire client with explicit buffers) or auto (`choose_audio_api`); `device_block_ms` /
    `device_buffer_ms`: the callback size (None: DEVICE_BLOCK_MS, pulse PULSE_DEVICE_BLOCK_MS) and the
    stream buffering asked for (None: PortAudio's "low", pulse PULSE_BUFFER_MS).
    `pipeline`: a model voice's features and DiT + vocoder on two threads (`rtsvc.pipeline`).
    `adapt`: lengthen the block under sustained overload (`rtsvc.live.chain.OverloadGuard`).
    `virtual_mic` plays into a new virtual microphone of that name instead of the output device,
    removed however this ends (rtsvc.live.virtual_mic).
    """
    from rich.console import Console
    from rich.live import Live

    console = console or Console(stderr=True)
    jitter_ms = voice.stream_defaults.jitter_ms if jitter_ms is None else jitter_ms
    check_live_options(input_rate, output_rate, duration, jitter_ms)
    if isinstance(input_device, dict) and isinstance(output_device, dict):  # resolved by find_devices
        dev_in, dev_out, dev_mon = input_device, output_device, monitor_device
    else:
        dev_in, dev_out, dev_mon = find_devices(input_device, output_device, monitor_device)
    played = [d for d in (dev_out, dev_mon) if d is not None] if virtual_mic is None else \
        [d for d in (dev_mon,) if d is not None]  # a virtual mic is a pulse sink
    audio_api = choose_audio_api(audio_api, [dev_in, *played])
    sd = load_sounddevice() if audio_api == "portaudio" else None
    if device_block_ms is None:
        on_jack = any("JACK" in d.get("hostapi", "") for d in (dev_in, *played))
        device_block_ms = PULSE_DEVICE_BLOCK_MS if audio_api == "pulse" else \
            JACK_DEVICE_BLOCK_MS if on_jack else DEVICE_BLOCK_MS
    check_device_block(device_block_ms, audio_api)
    in_rate = int(input_rate or dev_in["default_rate"])
    out_rate = int(output_rate or dev_out["default_rate"])
    state = LiveState()
    config = (config or StreamConfig()).for_voice(voice)
    block_out = int(round(StreamLayout.from_config(config, voice.sample_rate).block * out_rate
                          / voice.sample_rate))
    prime, tolerance = int(jitter_ms * out_rate / 1000), int(TRIM_TOLERANCE_MS * out_rate / 1000)
    fifo, monitor_fifo = (OutputFifo(prime=prime, max_level=prime + 2 * block_out + out_rate // 5,
                                     max_prime=prime + block_out, tolerance=tolerance) for _ in range(2))
    inbox: queue.Queue = queue.Queue()
    vmic = VirtualMic(virtual_mic, out_rate) if virtual_mic else None
    # input frames per callback (a 0 block: whatever the host API delivers, learnt from the callbacks)
    state.input_chunk = int(in_rate * (device_block_ms or NOMINAL_CHUNK_MS) / 1000)

    recorder = None
    if record is not None:
        import soundfile as sf

        try:
            recorder = sf.SoundFile(str(record), "w", samplerate=out_rate, channels=1)
        except Exception as err:
            raise UserError(f"cannot write recording {record}: {err}") from None
    conversion = Conversion(voice, settings, config, in_rate, out_rate, [fifo], recorder, pipeline,
                            inbox_samples=lambda: inbox.qsize() * state.input_chunk * out_rate // in_rate)
    guard = OverloadGuard(conversion, enabled=adapt)

    def on_input(indata, frames, time_info, status):
        if status:
            state.portaudio_flags += 1
        mono = indata[:, 0].copy()
        state.frames_in += frames
        state.input_chunk = frames
        state.input_db = rms_db(mono)
        if inbox.qsize() * frames > MAX_QUEUE_S * in_rate:  # the worker is behind: drop the oldest audio
            try:
                inbox.get_nowait()
            except queue.Empty:
                pass
            state.input_overruns += 1
        inbox.put(mono)

    def on_output(outdata, frames, time_info, status):
        if status:
            state.portaudio_flags += 1
        outdata[:, 0] = fifo.pop(frames)
        state.frames_out += frames
        if outdata.shape[1] > 1:
            outdata[:, 1:] = outdata[:, :1]

    def on_monitor(outdata, frames, time_info, status):
        outdata[:, 0] = monitor_fifo.pop(frames)
        state.frames_monitor += frames
        if outdata.shape[1] > 1:
            outdata[:, 1:] = outdata[:, :1]

    errors = (UserError,) if sd is None else (sd.PortAudioError,)
    buffer_sum = e2e_sum = 0.0
    samples = 0
    try:
        dev_out = vmic.create() if vmic is not None else dev_out  # removed in the finally below
        in_stream, out_stream, mon_stream = open_streams(
            sd, audio_api, dev_in, dev_out, dev_mon, in_rate, out_rate, device_block_ms, device_buffer_ms,
            on_input, on_output, on_monitor)
        device_ms = device_latency_ms(in_stream, out_stream)
        if mon_stream is not None:
            conversion.fifos.append(monitor_fifo)
        worker = threading.Thread(target=_worker, args=(conversion, inbox, state), daemon=True)
        key_reader = KeyReader(settings, state, voice) if keys and sys.stdin.isatty() else None
        worker.start()
        status = lambda: status_lines(conversion, fifo, state, settings,  # noqa: E731
                                      device_latency_ms(in_stream, out_stream), key_reader,
                                      max(20, console.width - 1))
        with sigterm_as_stop(state), native_stderr_above(console), in_stream, out_stream, \
                (mon_stream or nullcontext()):
            _wait_for_streams(state, out_rate, mon_stream is not None, console)
            monitor = f", monitor {dev_mon['name']}" if dev_mon is not None else ""
            console.print(f"live: {dev_in['name']} ({in_rate} Hz) -> {dev_out['name']} ({out_rate} Hz)"
                          f"{monitor}, block {conversion.block_ms:.0f} ms"
                          f"{' pipelined' if pipeline else ''}, algorithmic latency "
                          f"{conversion.engine.latency_ms:.0f} ms, device buffers {ms_text(device_ms)} ms "
                          f"({audio_api}). Ctrl-C to stop.", highlight=False, soft_wrap=True,
                          markup=False)  # device names are literal
            if key_reader is not None:
                console.print(key_help(voice), style="dim", highlight=False, soft_wrap=True)
                key_reader.start()
            started = last_log = time.monotonic()
            next_settle = started + SETTLE_FIRST_S
            with Live(status(), console=console, refresh_per_second=STATUS_HZ, transient=False,
                      redirect_stderr=False, auto_refresh=console.is_terminal) as panel:
                try:
                    while not state.stop.is_set():
                        state.stop.wait(1.0 / STATUS_HZ)
                        now = time.monotonic()
                        state.seconds = now - started
                        device_ms = device_latency_ms(in_stream, out_stream)  # pulse: measured
                        if fifo.started and now >= next_settle:
                            for each in (fifo, monitor_fifo):  # the prime grows with underruns: so does this
                                each.settle(each.prime // 2)
                            next_settle = now + SETTLE_S
                        if fifo.started:
                            split = latency_split(conversion, fifo, device_ms)
                            buffer_sum, e2e_sum, samples = (buffer_sum + split["buffer_ms"],
                                                            e2e_sum + split["e2e_ms"], samples + 1)
                        message = guard.check(now)
                        if message is not None:
                            console.print(message, style="yellow", highlight=False, soft_wrap=True)
                        panel.update(status())  # drawn 4 times a second on a terminal, else once at the end
                        if not console.is_terminal and now - last_log >= LOG_EVERY_S:
                            console.print(log_line(conversion, fifo, state, device_ms), highlight=False,
                                          soft_wrap=True)
                            last_log = now
                        if duration is not None and state.seconds >= duration:
                            break
                        if not (in_stream.active and out_stream.active
                                and (mon_stream is None or mon_stream.active)):
                            raise UserError("the audio stream stopped unexpectedly (was a device unplugged?)")
                except KeyboardInterrupt:
                    console.print("stopping (Ctrl-C)", highlight=False)
                finally:
                    state.stop.set()
            if not console.is_terminal:
                console.print()  # end the status lines in logs
            if state.terminated:
                console.print("stopping (SIGTERM)", highlight=False)
        worker.join(timeout=5.0)
        conversion.close()
        if key_reader is not None:
            key_reader.join()
        if state.error is not None:
            if isinstance(state.error, UserError):
                raise state.error
            raise RuntimeError(f"the conversion worker failed: {state.error!r}") from state.error
    except errors as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"audio device error: {err}") from None
    finally:
        if recorder is not None:
            recorder.close()
        if vmic is not None:
            vmic.remove()
    result = conversion.engine.stats()
    result["blocks"] += conversion.earlier_blocks
    result["gated_blocks"] += conversion.earlier_gated
    result.update(underruns=fifo.underruns, overruns=fifo.overruns + state.input_overruns,
                  trims=fifo.trims, trimmed_ms=fifo.trimmed * 1000.0 / out_rate,
                  settled_ms=fifo.settled * 1000.0 / out_rate,
                  portaudio_flags=state.portaudio_flags, seconds=state.seconds, input_rate=in_rate,
                  output_rate=out_rate, device_latency_ms=device_ms, block_changes=guard.changes,
                  buffer_ms_mean=buffer_sum / max(samples, 1), e2e_ms_mean=e2e_sum / max(samples, 1),
                  algorithmic_ms=conversion.engine.latency_ms, terminated=state.terminated)
    if isinstance(conversion.adapter, PipelinedAdapter):
        result.update(conversion.adapter.stage_stats())
    return result


def parse_jitter_ms(text: str) -> float | None:
    """`--jitter-ms`: milliseconds, or auto (None)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--jitter-ms must be a number of milliseconds or auto, got {text!r}") from None
    check_live_options(jitter_ms=value)
    return value


def auto_jitter_ms(choice: "AutoBlock | None", floor_ms: float, say=None) -> float:
    """`--jitter-ms auto`: with a measured (auto) block, its headroom, so that every block computed
    within the block's length is on time (measured: a V3 student at a 209 ms block had 1 underrun a
    minute with 40 ms, none with 100 ms); at least `floor_ms` (the voice's `stream_defaults.jitter_ms`).
    A given block was not measured: `floor_ms`. `say` is told the buffer an auto block got."""
    if choice is None:
        return floor_ms
    jitter = min(MAX_JITTER_MS, max(floor_ms, float(np.ceil(choice.headroom_ms))))
    if say is not None:
        say(f"auto jitter buffer: {jitter:.0f} ms (the block's headroom over its mean compute)")
    return jitter


def check_device_block(block_ms: float, audio_api: str) -> None:
    """--device-block-ms: 0 (PortAudio only: the host API's own size) up to MAX_DEVICE_BLOCK_MS."""
    low = 0.0 if audio_api == "portaudio" else 1.0
    if not low <= block_ms <= MAX_DEVICE_BLOCK_MS:  # NaN fails too
        raise UserError(f"--device-block-ms must be between {low:g} and {MAX_DEVICE_BLOCK_MS:g} ms "
                        f"({'0: the host API picks' if low == 0 else 'the pulse API needs a size'}), "
                        f"got {block_ms:g}")


def check_live_options(input_rate: int | None = None, output_rate: int | None = None,
                       duration: float | None = None, jitter_ms: float = 0.0) -> None:
    """User mistakes in `rtsvc live` options that would otherwise surface late (after the model loads)."""
    for name, rate in (("--input-rate", input_rate), ("--output-rate", output_rate)):
        if rate is not None and not MIN_RATE <= rate <= MAX_RATE:
            raise UserError(f"{name} must be between {MIN_RATE} and {MAX_RATE} Hz, got {rate}")
    if duration is not None and duration <= 0:
        raise UserError(f"--duration must be positive seconds, got {duration:g}")
    if not 0.0 <= jitter_ms <= MAX_JITTER_MS:
        raise UserError(f"--jitter-ms must be between 0 and {MAX_JITTER_MS:g} ms, got {jitter_ms:g}")


def live_summary(result: dict, record: str | Path | None = None) -> str:
    """The line `rtsvc live` prints when it stops (`rtsvc bench --loopback` reads it)."""
    return (f"stopped after {result['seconds']:.1f} s: {result['blocks']} blocks "
            f"({result['gated_blocks']} gated) of {result['block_ms']:.1f} ms, compute "
            f"{result['compute_ms_mean']:.1f} ms/block (p99 {result['compute_ms_p99']:.1f}), underruns "
            f"{result['underruns']}, overruns {result['overruns']}, trims {result['trims']} "
            f"({result['trimmed_ms']:.0f} ms), e2e estimate {result['e2e_ms_mean']:.0f} ms = algorithmic "
            f"{result['algorithmic_ms']:.0f} + buffer {result['buffer_ms_mean']:.0f} + device "
            f"{ms_text(result['device_latency_ms'])}, limited samples {result['limited_samples']}"
            + (f", buffer settled -{result['settled_ms']:.0f} ms" if result.get('settled_ms') else "")
            + (f", block changes {result['block_changes']}" if result['block_changes'] else "")
            + (f", recorded {record}" if record else ""))
