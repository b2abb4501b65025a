"""Live audio: microphone -> voice -> speaker through PortAudio (`rtsvc live`, `rtsvc devices`).

    result = rtsvc.live.run_live(voice, settings, config, input_device="mic", output_device="speaker")

`OutputFifo` (the jitter buffer between a converting worker and a device callback) is public so an
in-process front end (an OBS or VST bridge) can reuse it."""

from rtsvc.live.devices import devices_table, find_device, find_devices, list_devices
from rtsvc.live.fifo import OutputFifo
from rtsvc.live.keys import KeyReader, key_help
from rtsvc.live.run import (
    AUDIO_API,
    DEVICE_BLOCK_MS,
    PULSE_BUFFER_MS,
    PULSE_DEVICE_BLOCK_MS,
    auto_jitter_ms,
    check_live_options,
    live_summary,
    parse_device_buffer_ms,
    parse_jitter_ms,
    run_live,
)
from rtsvc.live.state import LiveState
from rtsvc.live.virtual_mic import VirtualMic, check_virtual_mic

__all__ = ["AUDIO_API", "DEVICE_BLOCK_MS", "PULSE_BUFFER_MS", "PULSE_DEVICE_BLOCK_MS", "KeyReader",
           "LiveState", "OutputFifo", "auto_jitter_ms", "check_live_options",
           "devices_table", "find_device", "find_devices", "key_help", "list_devices", "live_summary",
           "parse_device_buffer_ms", "parse_jitter_ms", "run_live", "VirtualMic", "check_virtual_mic"]
