"""`rtsvc live --audio-api pulse`: PulseAudio/PipeWire streams with explicit buffer sizes (pasimple).

Why: PortAudio reaches PulseAudio through ALSA's pulse plugin, which on the PulseAudio test rig buffered
70-100 ms whatever latency PortAudio asked for. libpulse's simple API (wrapped by the maintained
`pasimple` package; PipeWire's pulse server answers it too) takes the buffer attributes directly:
`fragsize` for a recording stream, `tlength` / `minreq` / `prebuf` for playback (with
ADJUST_LATENCY, which pa_simple sets, tlength is the whole playback latency).

A thread per stream reads or writes one `block` at a time and calls the same callback PortAudio
would, `callback(data, frames, time_info, status)`, so `run_live` drives both APIs alike. The
blocking write is the output clock: it returns as soon as the server has room for a block.
"""

import threading

import numpy as np

from rtsvc.errors import UserError

BYTES = 4  # float32


def load_pasimple():
    try:
        import pasimple
    except ImportError:
        raise UserError("--audio-api pulse needs the pasimple package (pip install pasimple)") from None
    except OSError as err:  # libpulse-simple.so.0 missing
        raise UserError(f"--audio-api pulse needs libpulse-simple ({err}); apt-get install libpulse0") \
            from None
    return pasimple


class PulseStream:
    """One recording ("input") or playback ("output") stream on the PulseAudio server; a context
    manager like a sounddevice stream (`latency` in seconds, `active`)."""

    def __init__(self, kind: str, device: str | None, rate: int, channels: int, block: int,
                 buffer_ms: float, callback):
        pasimple = load_pasimple()
        self.kind, self.rate, self.channels, self.block = kind, rate, channels, block
        self.callback = callback
        frame = BYTES * channels
        buffer_bytes = max(block, int(round(buffer_ms * rate / 1000))) * frame
        if kind == "input":  # a reader late by more than the buffer loses the oldest audio, never adds delay
            attrs = {"fragsize": block * frame, "maxlength": buffer_bytes}
            direction = pasimple.PA_STREAM_RECORD
        else:  # playback starts once two blocks are queued; the server asks for a block at a time
            attrs = {"tlength": buffer_bytes, "minreq": block * frame,
                     "prebuf": min(buffer_bytes, 2 * block * frame)}
            direction = pasimple.PA_STREAM_PLAYBACK
        try:
            self._pa = pasimple.PaSimple(direction, pasimple.PA_SAMPLE_FLOAT32LE, channels, rate,
                                         app_name="rtsvc", stream_name=f"rtsvc {kind}", device_name=device,
                                         **attrs)
        except pasimple.PaSimpleError as err:
            raise UserError(f"cannot open PulseAudio {kind} {device or '(default)'}: {err}") from None
        # what the stream buffers by design: one fragment in, tlength out (`latency` measures it)
        self.nominal_latency = (block if kind == "input" else buffer_bytes // frame) / rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pulse-{kind}", daemon=True)
        self.error: BaseException | None = None

    @property
    def latency(self) -> float:
        """Seconds buffered now (the server's measure, sink or source included); nominal before it runs."""
        try:
            return self._pa.get_latency() / 1e6
        except Exception:  # not yet running, or closed: what was asked for
            return self.nominal_latency

    @property
    def active(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def _run(self) -> None:
        frame = BYTES * self.channels
        try:
            while not self._stop.is_set():
                if self.kind == "input":
                    raw = self._pa.read(self.block * frame)
                    data = np.frombuffer(raw, dtype=np.float32).reshape(-1, self.channels)
                    self.callback(data, data.shape[0], None, None)
                else:
                    data = np.zeros((self.block, self.channels), dtype=np.float32)
                    self.callback(data, self.block, None, None)
                    self._pa.write(data.tobytes())
        except BaseException as err:  # surfaced through `active`
            self.error = err

    def __enter__(self) -> "PulseStream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._pa.close()
