"""Audio devices for `rtsvc live` and `rtsvc devices`: PortAudio devices, and PulseAudio/PipeWire
sources and sinks by name (opened through PortAudio's `pulse` device)."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from rtsvc.errors import UserError

MIN_RATE, MAX_RATE = 8000, 384000  # device rates PortAudio hosts offer

def load_sounddevice():
    """Import sounddevice lazily: it needs the PortAudio shared library."""
    try:
        import sounddevice
    except OSError as err:
        raise UserError(f"audio is unavailable ({err}); install PortAudio "
                        "(apt-get install libportaudio2)") from None
    return sounddevice


def list_devices() -> list[dict]:
    """Every PortAudio device (index, name, host API, channel counts, default rate, default flags),
    then the PulseAudio/PipeWire sources and sinks, which open through PortAudio's `pulse` device."""
    sd = load_sounddevice()
    default_in, default_out = sd.default.device
    hostapis = sd.query_hostapis()
    devices = [{
        "index": i, "name": dev["name"], "hostapi": hostapis[dev["hostapi"]]["name"],
        "inputs": dev["max_input_channels"], "outputs": dev["max_output_channels"],
        "default_rate": int(dev["default_samplerate"]),
        "default_input": i == default_in, "default_output": i == default_out, "pulse": None,
    } for i, dev in enumerate(sd.query_devices())]
    via = [d["index"] for d in devices if d["name"] == PULSE_DEVICE and d["inputs"] and d["outputs"]]
    return devices + (pulse_devices(via[0]) if via else [])


PULSE_DEVICE = "pulse"  # ALSA's PulseAudio plugin (PipeWire's pulse server answers it too)
PULSE_ENV = {"input": "PULSE_SOURCE", "output": "PULSE_SINK"}  # read by libpulse when a stream opens


def parse_pactl_short(text: str, kind: str, via: int) -> list[dict]:
    """`pactl list short sources|sinks` lines (index, name, driver, "s16le 2ch 44100Hz", state) as
    device entries opened through PortAudio device `via` with PULSE_SOURCE / PULSE_SINK set."""
    devices = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 4:
            continue
        spec = fields[3].split()
        channels = next((int(w[:-2]) for w in spec if w.endswith("ch") and w[:-2].isdigit()), 2)
        rate = next((int(w[:-2]) for w in spec if w.endswith("Hz") and w[:-2].isdigit()), 48000)
        devices.append({"index": via, "name": fields[1], "hostapi": "PulseAudio", "pulse": fields[1],
                        "inputs": channels if kind == "sources" else 0,
                        "outputs": channels if kind == "sinks" else 0, "default_rate": rate,
                        "default_input": False, "default_output": False})
    return devices


def pulse_devices(via: int) -> list[dict]:
    """PulseAudio/PipeWire sources and sinks by name (via pactl); none when pactl or the server is absent."""
    if shutil.which("pactl") is None:
        return []
    found = []
    for kind in ("sources", "sinks"):
        try:
            listing = subprocess.run(["pactl", "list", "short", kind], capture_output=True, text=True,
                                     timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return []
        if listing.returncode != 0:
            return []
        found += parse_pactl_short(listing.stdout, kind, via)
    return found


@contextmanager
def pulse_routing(device: dict, kind: str) -> Iterator[None]:
    """Open a stream inside this block: a PulseAudio source/sink entry sets PULSE_SOURCE/PULSE_SINK,
    which libpulse reads as the ALSA `pulse` device opens (each stream keeps its own)."""
    name, variable = device.get("pulse"), PULSE_ENV[kind]
    if name is None:
        yield
        return
    saved = os.environ.get(variable)
    os.environ[variable] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved


def find_device(spec: str | int | None, kind: str, devices: list[dict] | None = None) -> dict:
    """Resolve --input/--output: None (the default device), an index, or a unique name substring."""
    devices = list_devices() if devices is None else devices
    channels = "inputs" if kind == "input" else "outputs"
    usable = [d for d in devices if d[channels] > 0]
    if not usable:
        # The install line ends in `rtsvc live`: on a machine without a sound card this must not read
        # as a failed install.
        raise UserError(f"rtsvc is installed; only an audio {kind} device is missing (PortAudio finds no "
                        f"{'microphone' if kind == 'input' else 'speaker'} or sound card). `rtsvc devices` "
                        "lists what it sees; without one, convert a file: `rtsvc convert in.wav out.wav "
                        "--pitch 5`")
    if spec is None or spec == "":
        chosen = [d for d in usable if d[f"default_{kind}"]]
        return chosen[0] if chosen else usable[0]
    text = str(spec).strip()
    if text.isdigit():
        match = [d for d in devices if d["index"] == int(text) and not d.get("pulse")]
        if not match:
            raise UserError(f"no audio device with index {text} (see `rtsvc devices`)")
        if match[0][channels] == 0:
            raise UserError(f"device {text} ({match[0]['name']}) has no {kind} channels")
        return match[0]
    exact = [d for d in usable if d["name"].lower() == text.lower()]
    if exact:
        return exact[0]
    match = [d for d in usable if text.lower() in d["name"].lower()]
    if not match:
        raise UserError(f"no {kind} device matches {text!r} (see `rtsvc devices`)")
    if len(match) > 1:
        names = ", ".join(d["name"] if d.get("pulse") else f"{d['index']}: {d['name']}" for d in match)
        raise UserError(f"{text!r} matches several {kind} devices ({names}); give the index or the "
                        "whole name")
    return match[0]


def find_devices(input_device: str | int | None, output_device: str | int | None,
                 monitor_device: str | int | None = None) -> tuple[dict, dict, dict | None]:
    """The devices of `rtsvc live` (input, output, monitor or None), resolved up front so a wrong
    name fails before a model loads."""
    devices = list_devices()
    monitor = find_device(monitor_device, "output", devices) if monitor_device not in (None, "") else None
    return find_device(input_device, "input", devices), find_device(output_device, "output", devices), monitor


def devices_table(devices: list[dict]) -> str:
    """`rtsvc devices` as plain lines: each name whole on its own line (a user types or copies it; a
    table column would cut a long PulseAudio name at 80 columns), its details indented below."""
    lines = ["audio devices: --input / --output / --monitor take an index or a name",
             "(PulseAudio/PipeWire sources and sinks by name)"]
    for d in devices:
        flags = (("input", d["default_input"]), ("output", d["default_output"]))
        defaults = "/".join(kind for kind, on in flags if on)
        if d.get("pulse"):
            kind = "source" if d["inputs"] else "sink"
            where = f"PulseAudio {kind}"
            head = d["name"]
        else:
            where = d["hostapi"]
            head = f"{d['index']}: {d['name']}"
        details = f"{where}, in {d['inputs']} out {d['outputs']}, {d['default_rate']} Hz"
        lines += ["", head, f"    {details}" + (f", default {defaults}" if defaults else "")]
    return "\n".join(lines)


AUDIO_APIS = ("auto", "portaudio", "pulse")


def pulse_server_running() -> bool:
    """A PulseAudio (or PipeWire pulse) server answers `pactl info`."""
    if shutil.which("pactl") is None:
        return False
    try:
        return subprocess.run(["pactl", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pasimple_loads() -> bool:
    try:
        import pasimple  # noqa: F401
    except (ImportError, OSError):  # not installed / libpulse-simple missing
        return False
    return True


def on_pulse_server(device: dict) -> bool:
    """A device that a native pulse client can open: a source/sink entry, or PortAudio's pulse / default
    device (the ALSA plugin to the same server)."""
    return bool(device.get("pulse")) or device["name"] in (PULSE_DEVICE, "default")


def choose_audio_api(api: str, devices: list[dict], server: bool | None = None, native: bool | None = None
                     ) -> str:
    """`--audio-api`: portaudio or pulse as asked; auto = pulse when every device is on a running
    PulseAudio/PipeWire server and pasimple loads (its explicit buffers measured 83 ms mic to ear where
    the ALSA plugin gave 169-190, docs/benchmarks.md), else portaudio. `server` / `native`: known answers
    to "does a server run" / "does pasimple load" (None: find out)."""
    if api not in AUDIO_APIS:
        raise UserError(f"--audio-api must be one of {', '.join(AUDIO_APIS)}, got {api!r}")
    if api != "auto":
        return api
    if not all(on_pulse_server(d) for d in devices):
        return "portaudio"
    server = pulse_server_running() if server is None else server
    native = pasimple_loads() if native is None else native
    return "pulse" if server and native else "portaudio"
