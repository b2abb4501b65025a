"""Live microphone -> voice -> speaker with sounddevice (`rtsvc devices`, `rtsvc live`).

Threads: PortAudio's input callback only copies samples into a queue; a worker thread runs the
engine (resampling in, converting, resampling out) and appends to an output FIFO; the output
callback only copies from that FIFO. Nothing that can take long runs in a callback.

Output buffering: the engine delivers a block at a time, so the output FIFO is primed with
`jitter_ms` of silence when the first block with sound arrives (silent blocks before it, e.g. gated
ones that cost a model voice ~1 ms, would otherwise set the schedule). A block is then on time while
its compute takes at most `jitter_ms` longer than that first block's did, whatever the block
length; on a machine whose load moves compute by more (issue 14: 70-200 ms within a minute), the
FIFO runs dry (an underrun) and is primed again with the silence it lacked added to the prime (at
most one block more in all), so the next equally late block is on time: latency grows only where
it must.
Overruns (the worker falling behind, or the output clock running slower than the input clock) drop
the oldest audio and are counted.
"""


import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rtsvc.dsp.audio import rms_db
from rtsvc.engine import RateAdapter, StreamConfig, StreamingConverter
from rtsvc.errors import UserError
from rtsvc.live.devices import MAX_RATE, MIN_RATE, find_devices, load_sounddevice, pulse_routing
from rtsvc.live.fifo import OutputFifo
from rtsvc.live.keys import KeyReader, key_help
from rtsvc.live.state import LiveState
from rtsvc.settings import RuntimeSettings
from rtsvc.voice import Voice

if TYPE_CHECKING:
    from rtsvc.autoblock import AutoBlock

DEVICE_BLOCK_MS = 10.0  # PortAudio callback size
JITTER_MS = 40.0  # silence primed into the output FIFO to absorb block-wise delivery (at least)
MAX_JITTER_MS = 2000.0
MAX_QUEUE_S = 1.0  # more unprocessed input than this: drop the oldest (overrun)
STATUS_HZ = 4.0
INPUT_WAIT_S = 10.0  # how long to wait for the first input callback before warning


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


def _wait_for_input(state: LiveState, console, timeout: float = INPUT_WAIT_S) -> None:
    """Return once the input callback has delivered audio (PulseAudio can take a second or more)."""
    deadline = time.monotonic() + timeout
    try:
        while state.frames_in == 0 and time.monotonic() < deadline and not state.stop.is_set():
            time.sleep(0.02)
    except KeyboardInterrupt:
        state.stop.set()
        return
    if state.frames_in == 0:
        console.print(f"warning: no input audio after {timeout:.0f} s; still waiting", style="yellow")


def _worker(adapter: RateAdapter, inbox: queue.Queue, fifos: list[OutputFifo], state: LiveState,
            recorder) -> None:
    try:
        while not state.stop.is_set():
            try:
                chunk = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            out = adapter.process(chunk)
            for fifo in fifos:  # the output device, and the monitor (headphones) when there is one
                fifo.push(out)
            if recorder is not None and out.size:
                recorder.write(out)
    except BaseException as err:  # surfaced by the main loop
        state.error = err
        state.stop.set()


def _status_text(engine: StreamingConverter, fifo: OutputFifo, state: LiveState, settings: RuntimeSettings,
                 out_rate: int, device_ms: float, keys: KeyReader | None, width: int = 200):
    from rich.text import Text

    st, knobs = engine.stats(), settings.snapshot()
    level = max(-60.0, min(0.0, state.input_db))
    bar = "█" * int((level + 60) / 3) + "·" * (20 - int((level + 60) / 3))
    buffer_ms = fifo.level * 1000.0 / out_rate
    text = Text()
    text.append(f"in {bar} {state.input_db:6.1f} dB  ",
                style="green" if state.input_db > knobs.gate_db else "dim")
    text.append(f"latency {engine.latency_ms:.0f} ms algo + {buffer_ms:.0f} buffer "
                f"+ {device_ms:.0f} device  ")
    rtf_style = "red" if st["rtf"] > 0.9 else "yellow" if st["rtf"] > 0.6 else "green"
    text.append(f"compute {st['compute_ms_last']:.1f} ms/{st['block_ms']:.0f} ms block "
                f"(rtf {st['rtf']:.2f})  ", style=rtf_style)
    text.append(f"under {fifo.underruns} over {fifo.overruns + state.input_overruns}  ",
                style="red" if fifo.underruns or fifo.overruns or state.input_overruns else "")
    formant = f" formant {knobs.formant_shift:g}" if keys is None or keys.formant else ""
    denoise = f" denoise {knobs.denoise}" if knobs.denoise != "off" else ""
    gains = f"{knobs.input_gain_db:+g}/{knobs.output_gain_db:+g}"
    auto = st.get("auto_pitch")  # --pitch auto: the shift chosen
    auto = f" auto {auto:+.1f}" if auto is not None else ""
    text.append(f"pitch {knobs.pitch_shift:+g}{auto}{formant} gate {knobs.gate_db:g} dB gain {gains} "
                f"dB{denoise}  {state.seconds:5.1f} s")
    # each line cut at the terminal width: a line the terminal wraps is taller than rich Live thinks,
    # and every refresh would then leave a copy behind
    text.truncate(width, overflow="ellipsis")
    if keys is not None and keys.message:
        message = Text(keys.message, style="yellow")
        message.truncate(width, overflow="ellipsis")
        text = Text("\n").join([text, message])
    return text


def run_live(voice: Voice, settings: RuntimeSettings, config: StreamConfig | None = None,
             input_device: str | int | dict | None = None, output_device: str | int | dict | None = None,
             input_rate: int | None = None, output_rate: int | None = None, duration: float | None = None,
             record: str | Path | None = None, jitter_ms: float = JITTER_MS, console=None,
             keys: bool = True, monitor_device: str | int | dict | None = None) -> dict:
    """Run mic -> voice -> speaker until Ctrl-C, `q`, or `duration` seconds; return the final counters.

    Devices are indices or names (`find_device`), PulseAudio/PipeWire sources and sinks included, or
    the entries `find_devices` returned; `monitor_device` also plays the converted voice (e.g.
    headphones, while the output is a cable).
    """
    sd = load_sounddevice()
    from rich.console import Console
    from rich.live import Live

    console = console or Console(stderr=True)
    check_live_options(input_rate, output_rate, duration, jitter_ms)
    if isinstance(input_device, dict) and isinstance(output_device, dict):  # resolved by find_devices
        dev_in, dev_out, dev_mon = input_device, output_device, monitor_device
    else:
        dev_in, dev_out, dev_mon = find_devices(input_device, output_device, monitor_device)
    in_rate = int(input_rate or dev_in["default_rate"])
    out_rate = int(output_rate or dev_out["default_rate"])
    engine = StreamingConverter(voice, settings, config)
    adapter = RateAdapter(engine, in_rate, out_rate)
    state = LiveState()
    block_out = int(round(engine.layout.block * out_rate / engine.sample_rate))
    prime = int(jitter_ms * out_rate / 1000)
    fifo, monitor_fifo = (OutputFifo(prime=prime, max_level=prime + 2 * block_out + out_rate // 5,
                                     max_prime=prime + block_out) for _ in range(2))
    inbox: queue.Queue = queue.Queue()
    max_chunks = int(MAX_QUEUE_S * 1000 / DEVICE_BLOCK_MS)

    def on_input(indata, frames, time_info, status):
        if status:
            state.portaudio_flags += 1
        mono = indata[:, 0].copy()
        state.frames_in += frames
        state.input_db = rms_db(mono)
        if inbox.qsize() > max_chunks:  # the worker is behind: drop the oldest audio
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
        if outdata.shape[1] > 1:
            outdata[:, 1:] = outdata[:, :1]

    def open_output(device: dict, callback):
        with pulse_routing(device, "output"):
            return sd.OutputStream(device=device["index"], samplerate=out_rate,
                                   channels=min(2, device["outputs"]), dtype="float32",
                                   blocksize=int(out_rate * DEVICE_BLOCK_MS / 1000), latency="low",
                                   callback=callback)

    recorder = None
    if record is not None:
        import soundfile as sf

        try:
            recorder = sf.SoundFile(str(record), "w", samplerate=out_rate, channels=1)
        except Exception as err:
            raise UserError(f"cannot write recording {record}: {err}") from None
    try:
        try:
            with pulse_routing(dev_in, "input"):
                in_stream = sd.InputStream(device=dev_in["index"], samplerate=in_rate, channels=1,
                                           dtype="float32", blocksize=int(in_rate * DEVICE_BLOCK_MS / 1000),
                                           latency="low", callback=on_input)
            out_stream = open_output(dev_out, on_output)
            mon_stream = open_output(dev_mon, on_monitor) if dev_mon is not None else None
        except sd.PortAudioError as err:
            names = " + ".join(d["name"] for d in (dev_out, dev_mon) if d is not None)
            raise UserError(f"cannot open audio devices ({dev_in['name']} -> {names}): {err}") from None
        device_ms = (in_stream.latency + out_stream.latency) * 1000.0
        fifos = [fifo] + ([monitor_fifo] if mon_stream is not None else [])
        worker = threading.Thread(target=_worker, args=(adapter, inbox, fifos, state, recorder),
                                  daemon=True)
        key_reader = KeyReader(settings, state, voice) if keys and sys.stdin.isatty() else None
        worker.start()
        status = lambda: _status_text(engine, fifo, state, settings, out_rate, device_ms,  # noqa: E731
                                      key_reader, max(20, console.width - 1))
        with native_stderr_above(console), in_stream, out_stream, (mon_stream or nullcontext()):
            _wait_for_input(state, console)
            monitor = f", monitor {dev_mon['name']}" if dev_mon is not None else ""
            console.print(f"live: {dev_in['name']} ({in_rate} Hz) -> {dev_out['name']} ({out_rate} Hz)"
                          f"{monitor}, block {engine.layout.block * 1000 / engine.sample_rate:.0f} ms, "
                          f"algorithmic latency {engine.latency_ms:.0f} ms. Ctrl-C to stop.",
                          highlight=False, soft_wrap=True)
            if key_reader is not None:
                console.print(key_help(voice), style="dim", highlight=False, soft_wrap=True)
                key_reader.start()
            started = time.monotonic()
            with Live(status(), console=console, refresh_per_second=STATUS_HZ, transient=False,
                      redirect_stderr=False) as panel:
                try:
                    while not state.stop.is_set():
                        state.stop.wait(1.0 / STATUS_HZ)
                        state.seconds = time.monotonic() - started
                        panel.update(status())
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
            console.print()  # end the status line in logs
        worker.join(timeout=5.0)
        if key_reader is not None:
            key_reader.join()
        if state.error is not None:
            if isinstance(state.error, UserError):
                raise state.error
            raise RuntimeError(f"the conversion worker failed: {state.error!r}") from state.error
    except sd.PortAudioError as err:
        raise UserError(f"audio device error: {err}") from None
    finally:
        if recorder is not None:
            recorder.close()
    result = engine.stats()
    result.update(underruns=fifo.underruns, overruns=fifo.overruns + state.input_overruns,
                  portaudio_flags=state.portaudio_flags, seconds=state.seconds, input_rate=in_rate,
                  output_rate=out_rate, device_latency_ms=device_ms)
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


def auto_jitter_ms(choice: "AutoBlock | None") -> float:
    """`--jitter-ms auto`: with a measured (auto) block, its headroom, so that every block computed
    within the block's length is on time (measured: a V3 student at a 209 ms block had 1 underrun a
    minute with 40 ms, none with 100 ms); at least JITTER_MS. A given block was not measured: JITTER_MS."""
    if choice is None:
        return JITTER_MS
    return min(MAX_JITTER_MS, max(JITTER_MS, float(np.ceil(choice.headroom_ms))))


def check_live_options(input_rate: int | None = None, output_rate: int | None = None,
                       duration: float | None = None, jitter_ms: float = JITTER_MS) -> None:
    """User mistakes in `rtsvc live` options that would otherwise surface late (after the model loads)."""
    for name, rate in (("--input-rate", input_rate), ("--output-rate", output_rate)):
        if rate is not None and not MIN_RATE <= rate <= MAX_RATE:
            raise UserError(f"{name} must be between {MIN_RATE} and {MAX_RATE} Hz, got {rate}")
    if duration is not None and duration <= 0:
        raise UserError(f"--duration must be positive seconds, got {duration:g}")
    if not 0.0 <= jitter_ms <= MAX_JITTER_MS:
        raise UserError(f"--jitter-ms must be between 0 and {MAX_JITTER_MS:g} ms, got {jitter_ms:g}")


def live_summary(result: dict, record: str | Path | None = None) -> str:
    """The line `rtsvc live` prints when it stops."""
    return (f"stopped after {result['seconds']:.1f} s: {result['blocks']} blocks "
            f"({result['gated_blocks']} gated), compute {result['compute_ms_mean']:.1f} ms/block "
            f"(p99 {result['compute_ms_p99']:.1f}), underruns {result['underruns']}, "
            f"overruns {result['overruns']}" + (f", recorded {record}" if record else ""))
