"""A virtual microphone on Linux (`rtsvc live --virtual-mic NAME`): a PulseAudio/PipeWire source
that Discord, OBS or a browser can pick as their microphone, fed with the converted voice.

Made with pactl from two modules: a null sink `rtsvc-NAME-sink` that live plays into, and a
module-remap-source NAME on that sink's monitor (apps list remapped sources as microphones; a bare
".monitor" many of them hide). Both carry the properties `rtsvc.virtual_mic=NAME rtsvc.pid=PID`, so a
later start can tell its own leftovers: modules of a run that was killed (SIGKILL, no chance to clean)
are unloaded before new ones load; those of a run still alive make the start fail instead.

Removal happens in `remove()`, which `run_live` calls in its `finally`: after Ctrl-C, `q`, a
failing voice and, because `create()` turns SIGTERM into KeyboardInterrupt while the mic exists,
after SIGTERM too.
"""

import os
import re
import shutil
import signal
import subprocess
import threading

from rtsvc.errors import UserError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MARK = "rtsvc.virtual_mic"  # module property: which virtual mic a module belongs to
CHANNELS = 1  # the converted voice is mono
PACTL_TIMEOUT_S = 10.0


def pactl(*args: str) -> str:
    """Run pactl; its stdout, or a UserError with its message."""
    if shutil.which("pactl") is None:
        raise UserError("--virtual-mic needs pactl and a PulseAudio or PipeWire server "
                        "(apt-get install pulseaudio-utils)")
    try:
        done = subprocess.run(["pactl", *args], capture_output=True, text=True, timeout=PACTL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"pactl {args[0]} did not answer within {PACTL_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        raise UserError(f"pactl {' '.join(args[:2])} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def owned_modules(name: str, listing: str) -> list[tuple[int, int]]:
    """(module index, owner pid) of the modules of virtual mic `name` in `pactl list short modules`."""
    found = []
    for line in listing.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or f"{MARK}={name} " not in fields[2]:
            continue
        pid = re.search(r"rtsvc\.pid=(\d+)", fields[2])
        found.append((int(fields[0]), int(pid.group(1)) if pid else 0))
    return found


def pid_runs_rtsvc(pid: int) -> bool:
    """Whether process `pid` is alive and is an rtsvc live with a virtual mic (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"--virtual-mic" in f.read()
    except OSError:
        return False


def check_virtual_mic(name: str | None, output: str | None = None) -> None:
    """`--virtual-mic` before a model loads: a usable name, and no --output beside it."""
    if name is None:
        return
    VirtualMic(name)
    if output:
        raise UserError("--virtual-mic plays into its own device: leave out --output (--monitor to listen)")


class VirtualMic:
    """The virtual microphone `name`, fed at `rate` Hz; `create()` returns the output device entry
    (as rtsvc.live.devices makes them) that plays into it; `remove()` unloads it."""

    def __init__(self, name: str, rate: int = 48000):
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(f"--virtual-mic must be a name of letters, digits, '.', '_' or '-' (at most 63), "
                            f"got {name!r}")
        self.name, self.rate = name, int(rate)
        self.sink = f"rtsvc-{name}-sink"
        self.modules: list[int] = []
        self.cleaned: list[int] = []  # stale modules of a killed run that `create` unloaded
        self._previous_sigterm = None

    def _clean_stale(self) -> None:
        for _, pid in owned_modules(self.name, pactl("list", "short", "modules")):
            if pid != os.getpid() and pid_runs_rtsvc(pid):
                raise UserError(f"virtual microphone {self.name} is in use by rtsvc (pid {pid}); "
                                "stop that one or pick another name")
        for index, _ in sorted(owned_modules(self.name, pactl("list", "short", "modules")), reverse=True):
            pactl("unload-module", str(index))  # the source first (it sits on the sink's monitor)
            self.cleaned.append(index)
        taken = [line.split("\t")[1] for line in pactl("list", "short", "sources").splitlines()
                 if line.count("\t") >= 1]
        if self.name in taken:
            raise UserError(f"a source named {self.name} already exists (not made by rtsvc); "
                            "pick another --virtual-mic name")

    def create(self) -> dict:
        """Load the sink and the source (after cleaning a killed run's), hook SIGTERM; the device entry."""
        self._clean_stale()
        marks = f"{MARK}={self.name} rtsvc.pid={os.getpid()}"
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            self._load("module-null-sink", f"sink_name={self.sink}", f"rate={self.rate}",
                       f"sink_properties='device.description=\"rtsvc {self.name} feed\" {marks}'")
            self._load("module-remap-source", f"master={self.sink}.monitor", f"source_name={self.name}",
                       f"source_properties='device.description=\"{self.name}\" {marks}'")
            via = _pulse_portaudio_index()
        except BaseException:
            self.remove()
            raise
        return {"index": via, "name": f"virtual microphone {self.name}", "pulse": self.sink,
                "hostapi": "PulseAudio", "inputs": 0, "outputs": CHANNELS, "default_rate": self.rate,
                "default_input": False, "default_output": False}

    def _load(self, module: str, *args: str) -> None:
        self.modules.append(int(pactl("load-module", module, f"channels={CHANNELS}", *args).strip()))

    def remove(self) -> None:
        """Unload what `create` loaded (the source first) and give SIGTERM back its handler."""
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        failed = []
        for index in reversed(self.modules):
            try:
                pactl("unload-module", str(index))
            except UserError as err:
                failed.append(str(err))
        self.modules = []
        if failed:
            raise UserError(f"could not remove virtual microphone {self.name}: {'; '.join(failed)} "
                            "(the next start with this name cleans it)")


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # live's loop stops on it as on Ctrl-C, and its finally removes the mic


def _pulse_portaudio_index() -> int:
    """PortAudio's `pulse` device, through which named PulseAudio sinks open (rtsvc.live.devices)."""
    from rtsvc.live.devices import PULSE_DEVICE, load_sounddevice

    found = [i for i, dev in enumerate(load_sounddevice().query_devices())
             if dev["name"] == PULSE_DEVICE and dev["max_output_channels"] > 0]
    if not found:
        raise UserError("--virtual-mic needs PortAudio's pulse device (apt-get install libasound2-plugins)")
    return found[0]
