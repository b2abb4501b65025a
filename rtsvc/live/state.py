"""Counters shared by the live callbacks, the worker, the key reader and the status line."""

import threading
from dataclasses import dataclass, field


@dataclass
class LiveState:
    """Counters shared by the callbacks, the worker and the status line."""

    input_overruns: int = 0
    portaudio_flags: int = 0
    input_db: float = -120.0
    frames_in: int = 0  # device frames seen by the callbacks
    frames_out: int = 0
    input_chunk: int = 0  # frames of the last input callback
    frames_monitor: int = 0  # frames the monitor output (headphones) took
    seconds: float = 0.0
    error: BaseException | None = None
    terminated: bool = False  # stopped by SIGTERM
    stop: threading.Event = field(default_factory=threading.Event)
