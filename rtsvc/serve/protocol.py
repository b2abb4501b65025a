"""Websocket protocol v1: message parsing, validation and PCM encoding (no I/O here).

docs/protocol.md is the reference for client authors; this module is its executable form.
Every problem with a client's input raises `ProtocolError`, which carries the error code the
client sees, the websocket close code, and whether the stream has to end.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from rtsvc.errors import UserError
from rtsvc.settings import KNOB_TABLE, Knob, KnobError

PROTOCOL_VERSION = 1
STREAM_PATH = "/v1/stream"
FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
MIN_RATE = 8000  # Hz
MAX_RATE = 192000  # Hz
MAX_TEXT_BYTES = 4096  # a control message never needs more

# websocket close codes (RFC 6455 section 7.4.1)
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_UNSUPPORTED = 1003  # data the server cannot use (bad JSON, format, rate, samples)
CLOSE_POLICY = 1008  # order, auth, idle time, a client that does not read
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013  # the server is full or behind
START_FIELDS = ("type", "sample_rate", "format", "channels", "version", "token", "realtime", "warnings")


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
    knobs: dict  # knob name -> value of the right type; ranges are checked by RuntimeSettings.update
    realtime: bool = True  # a live source: late input is dropped to bound latency (False: a file)
    warnings: bool = False  # the client wants `warning` messages (they interleave with audio)


def dumps(message: dict) -> str:
    """Standard JSON only: a NaN or infinity here is a server bug, never sent as a bare token."""
    return json.dumps(message, allow_nan=False)


def parse_text(text: str) -> dict:
    """A text frame as a JSON object with a string `type`.

    Python's parser also reads NaN, Infinity and 1e400 (as float infinity); such values reach the
    validators, which refuse every non-finite number with the field's own error."""
    size = len(text.encode("utf-8", "surrogatepass"))  # the limit is in bytes, as on the wire
    if size > MAX_TEXT_BYTES:
        raise ProtocolError("too_big", f"text message of {size} bytes is over the {MAX_TEXT_BYTES}-byte "
                            "limit", CLOSE_TOO_BIG)
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: deeply nested arrays
        raise ProtocolError("bad_json", f"text frame is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("bad_message", 'text frames must be JSON objects with a string "type"')
    return message


def _describe(value: object) -> str:
    return repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"


def check_knob_value(name: str, value: object, fatal: bool = True,
                     table: Iterable[Knob] = KNOB_TABLE) -> object:
    """The wire type of one runtime setting (its row's `Knob.coerce`): numbers are JSON numbers (not
    strings, not booleans), finite; integers are JSON integers; speaker is a string or null.
    Ranges: RuntimeSettings."""
    try:
        return {k.name: k for k in table}[name].coerce(value)
    except KnobError as err:
        raise ProtocolError("bad_setting", str(err), fatal=fatal) from None


def _check_knobs(changes: dict, fatal: bool, table: Iterable[Knob]) -> dict:
    names = [k.name for k in table]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise ProtocolError("bad_setting", f"unknown setting(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(names)}", fatal=fatal)
    return {name: check_knob_value(name, value, fatal, table) for name, value in changes.items()}


def parse_start(message: dict, table: Iterable[Knob] = KNOB_TABLE) -> StartRequest:
    """Validate a `start` message: types and ranges of every field (knob ranges: RuntimeSettings)."""
    names = {k.name for k in table}
    extra = sorted(set(message) - names - set(START_FIELDS))
    if extra:
        raise ProtocolError("bad_message", f"unknown field(s) in start: {', '.join(map(_describe, extra))}")
    rate = message.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise ProtocolError("bad_rate", f"sample_rate must be an integer in Hz, got {_describe(rate)}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ProtocolError("bad_rate", f"sample_rate must be between {MIN_RATE} and {MAX_RATE} Hz, "
                            f"got {rate}")
    fmt = message.get("format", "s16le")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ProtocolError("bad_format", f"format must be one of {', '.join(FORMATS)}, got {_describe(fmt)}")
    channels = message.get("channels", 1)
    if channels != 1 or isinstance(channels, bool) or not isinstance(channels, int):
        raise ProtocolError("bad_channels", f"only mono is supported (channels 1), got {_describe(channels)}")
    version = message.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION or isinstance(version, bool) or not isinstance(version, int):
        raise ProtocolError("bad_version", f"this server speaks protocol version {PROTOCOL_VERSION}, "
                            f"got {_describe(version)}")
    token = message.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError("bad_message", "token must be a string", CLOSE_POLICY)
    flags = {}
    for name, default in (("realtime", True), ("warnings", False)):
        flags[name] = message.get(name, default)
        if not isinstance(flags[name], bool):
            raise ProtocolError("bad_message", f"{name} must be true or false, got {_describe(flags[name])}")
    knobs = _check_knobs({k: v for k, v in message.items() if k in names}, True, table)
    return StartRequest(rate, fmt, token, knobs, flags["realtime"], flags["warnings"])


def parse_set(message: dict, table: Iterable[Knob] = KNOB_TABLE) -> dict:
    """The knob changes of a `set` message, type-checked (ranges: RuntimeSettings.update)."""
    changes = {k: v for k, v in message.items() if k != "type"}
    if not changes:
        raise ProtocolError("bad_setting", "set needs at least one setting", fatal=False)
    return _check_knobs(changes, False, table)


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
