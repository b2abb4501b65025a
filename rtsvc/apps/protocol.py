"""Websocket protocol v1: message parsing, validation and PCM encoding (no I/O here).

docs/protocol.md is the reference for client authors; this module is its executable form.
Every problem with a client's input raises `ProtocolError`, which carries the error code the
client sees, the websocket close code, and whether the stream has to end.
"""

import json
import math
from dataclasses import dataclass

import numpy as np

from rtsvc.errors import UserError
from rtsvc.settings import KNOB_NAMES

PROTOCOL_VERSION = 1
STREAM_PATH = "/v1/stream"
FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
MIN_RATE = 8000  # Hz
MAX_RATE = 192000  # Hz
MAX_TEXT_BYTES = 4096  # a control message never needs more

# websocket close codes (RFC 6455 section 7.4.1)
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003  # data the server cannot use (bad JSON, format, rate, samples)
CLOSE_POLICY = 1008  # order, auth, idle time
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013  # the server is full


class ProtocolError(Exception):
    """A client mistake: `code` goes into the error message, `close` is the close code to use.

    `fatal=False` errors (a bad `set`) are reported and the stream goes on.
    """

    def __init__(self, code: str, message: str, close: int = CLOSE_UNSUPPORTED, fatal: bool = True):
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close
        self.fatal = fatal

    def to_message(self) -> dict:
        return {"type": "error", "code": self.code, "message": self.message, "fatal": self.fatal}


@dataclass(frozen=True)
class StartRequest:
    sample_rate: int
    format: str
    token: str | None
    knobs: dict  # knob name -> raw value, validated later by RuntimeSettings.update


def parse_text(text: str) -> dict:
    """A text frame as a JSON object with a string `type`."""
    if len(text) > MAX_TEXT_BYTES:
        raise ProtocolError("too_big", f"text messages are limited to {MAX_TEXT_BYTES} bytes", CLOSE_TOO_BIG)
    try:
        message = json.loads(text)
    except ValueError as err:
        raise ProtocolError("bad_json", f"text frame is not valid JSON: {err}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("bad_message", 'text frames must be JSON objects with a string "type"')
    return message


def parse_start(message: dict) -> StartRequest:
    """Validate a `start` message; knob values are checked by the caller's RuntimeSettings."""
    rate = message.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate != int(rate):
        raise ProtocolError("bad_rate", f"sample_rate must be an integer in Hz, got {rate!r}")
    if not MIN_RATE <= int(rate) <= MAX_RATE:
        raise ProtocolError("bad_rate", f"sample_rate must be between {MIN_RATE} and {MAX_RATE} Hz, "
                            f"got {rate}")
    fmt = message.get("format", "s16le")
    if fmt not in FORMATS:
        raise ProtocolError("bad_format", f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    channels = message.get("channels", 1)
    if channels != 1 or isinstance(channels, bool):
        raise ProtocolError("bad_channels", f"only mono is supported (channels 1), got {channels!r}")
    version = message.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"this server speaks protocol version {PROTOCOL_VERSION}, "
                            f"got {version!r}")
    token = message.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError("bad_message", "token must be a string", CLOSE_POLICY)
    knobs = {k: v for k, v in message.items() if k in KNOB_NAMES}
    extra = sorted(set(message) - set(KNOB_NAMES) - {"type", "sample_rate", "format", "channels", "version",
                                                     "token"})
    if extra:
        raise ProtocolError("bad_message", f"unknown field(s) in start: {', '.join(extra)}")
    return StartRequest(int(rate), fmt, token, knobs)


def parse_set(message: dict) -> dict:
    """The knob changes of a `set` message (values are validated by RuntimeSettings.update)."""
    changes = {k: v for k, v in message.items() if k != "type"}
    for name, value in changes.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError("bad_setting", f"{name} must be a finite number", fatal=False)
    if not changes:
        raise ProtocolError("bad_setting", "set needs at least one setting", fatal=False)
    return changes


def settings_error(err: UserError) -> ProtocolError:
    return ProtocolError("bad_setting", str(err), fatal=False)


def decode_pcm(data: bytes, fmt: str) -> np.ndarray:
    """Binary frame -> float32 samples in [-1, 1] (s16) or as sent (f32, which must be finite)."""
    dtype = FORMATS[fmt]
    if len(data) % dtype.itemsize:
        raise ProtocolError("bad_length", f"binary frame of {len(data)} bytes is not a whole number of "
                            f"{fmt} samples ({dtype.itemsize} bytes each)")
    samples = np.frombuffer(data, dtype=dtype)
    if fmt == "s16le":
        return samples.astype(np.float32) / 32768.0
    samples = samples.astype(np.float32)
    if not np.isfinite(samples).all():
        raise ProtocolError("bad_samples", "f32le frame contains NaN or infinite samples")
    return samples


def encode_pcm(samples: np.ndarray, fmt: str) -> bytes:
    """float32 samples -> binary frame; clipped to [-1, 1] in both formats."""
    clipped = np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    if fmt == "s16le":
        return np.round(clipped * 32767.0).astype("<i2").tobytes()
    return clipped.astype("<f4").tobytes()


def ready_message(sample_rate: int, fmt: str, latency_ms: float, speakers: list[str], settings: dict,
                  max_frame_bytes: int) -> dict:
    return {"type": "ready", "version": PROTOCOL_VERSION, "sample_rate": sample_rate, "format": fmt,
            "channels": 1, "latency_ms": round(latency_ms, 3), "speakers": list(speakers),
            "settings": settings, "max_frame_bytes": max_frame_bytes}
