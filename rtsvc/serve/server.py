"""`rtsvc serve`: the websocket streaming endpoint (protocol v1), /healthz and the browser page.

One asyncio event loop owns every socket; it only parses messages and moves bytes. Each client
gets a `Session` (its own RuntimeSettings, StreamingConverter and RateAdapter), and a session's
blocks run on `BlockScheduler` worker threads, so a slow client never stalls the loop or the
other clients. docs/protocol.md describes the wire format; rtsvc/serve/protocol.py parses it.

Batching: sessions never call the voice themselves from the loop; they hand a block to
`scheduler.run(session.process, samples)` and await the result. With `max_batch > 1` and a model
voice, the scheduler is `rtsvc.serve.scheduler.BatchScheduler` and each session's voice a
`rtsvc.voices.batch.BatchedVoice`: its whole block (features, DiT, vocoder) joins a
`DeadlineBatcher` with the other sessions' blocks that are waiting or expected soon (see
`batched_source`); sessions and the socket code stay as they are. `handle` serves connections of
other transports (Ray Serve's Starlette websockets, `rtsvc.serve.ray_serve`) with the same code.

Hostile clients and overload (docs/protocol.md section 6): each stream's frames are received by
their own task while earlier ones convert, stamped with the time they are due, and a live frame
that is too late is answered with silence instead (policy and admission: rtsvc/serve/overload.py);
every send has a time limit; SIGTERM stops the server as Ctrl-C does.
"""

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import mimetypes
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from rtsvc import __version__
from rtsvc.errors import UserError
from rtsvc.serve.overload import Admission, DropCounter, Pacing
from rtsvc.serve.protocol import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    FORMATS,
    MAX_TEXT_BYTES,
    PROTOCOL_VERSION,
    STREAM_PATH,
    ProtocolError,
    StartRequest,
    decode_pcm,
    dumps,
    encode_pcm,
    parse_set,
    parse_start,
    parse_text,
    ready_message,
    settings_error,
)
from rtsvc.serve.scheduler import DEFAULT_BATCH_DEADLINE_MS, BatchScheduler
from rtsvc.settings import DENOISE_CHOICES, Knobs, RuntimeSettings, knob_controls
from rtsvc.voice import Voice
from rtsvc.voices.defaults import DSP_BLOCK_MS

log = logging.getLogger("rtsvc.serve.server")

WEB_DIR = Path(__file__).parent / "web"
DEFAULT_PORT = 8765
DEFAULT_MAX_CLIENTS = 8
DEFAULT_MAX_FRAME_BYTES = 1 << 20  # 1 MiB: ~5.5 s of 48 kHz f32le mono per frame
DEFAULT_IDLE_TIMEOUT_S = 30.0
DEFAULT_MAX_LAG_MS = 500.0  # a live frame converted later than this after it was due is dropped
DEFAULT_SEND_TIMEOUT_S = 10.0
HARD_FRAME_FACTOR = 4  # frames past this multiple of the limit are cut by the websocket layer itself
START_TIMEOUT_S = 5.0  # a connection must send `start` this soon (at most the idle timeout)
INBOX_FRAMES = 32  # received messages waiting for conversion, per stream; then TCP backpressure
CLOSE_TIMEOUT_S = 2.0  # a closing handshake the peer does not finish is cut after this
INFO_PATH = "/v1/info"  # voice, speakers, defaults, controls and latency for the page, before Start
HISTORY = 256  # finished-session summaries kept for /healthz and tests (bounded: memory stays flat)
READ_METHODS = ("GET", "HEAD")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port (tests)
    token: str | None = None
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    allowed_origins: tuple[str, ...] = ()  # besides the page's own origin; "*" allows any
    workers: int = 0  # inference threads; 0: one per CPU core, at most 8
    max_lag_ms: float = DEFAULT_MAX_LAG_MS  # live input later than this is answered with silence
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S  # a client that reads nothing this long is dropped
    start_timeout_s: float = START_TIMEOUT_S  # handshake to `start`; pending connections hold no slot
    max_pending: int = 64  # connections that have not sent `start`, in all
    max_pending_per_address: int = 8  # ... and from one IP address
    max_batch: int = 1  # model voices: blocks of different clients run as one batch (1: one at a time)
    batch_deadline_ms: float = DEFAULT_BATCH_DEADLINE_MS  # longest a block waits for company
    batch_runners: int = 0  # threads that run batches (max_batch > 1); 0: one per CPU core, at most 8


@dataclass
class VoiceSource:
    """Where sessions get their voice: `make()` returns a Voice for one client's stream.

    Voices may cache features per stream, so each session gets its own; a model-backed source
    shares the loaded weights between the voices it makes.
    """

    name: str
    speakers: list[str]
    make: Callable[[], Voice]
    model: Voice | None = None  # the shared model voice behind `make`, for batching (None: DSP)
    family: str = "dsp"  # "dsp", or the model family ("v2", "v3"): which controls the page shows
    default_block_ms: float = DSP_BLOCK_MS  # the voice's own block for `--block-ms auto`


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def host_header_is_loopback(value: str) -> bool:
    """`Host: 127.0.0.1:8765`, `[::1]:8765`, `localhost`: names this machine whatever DNS says."""
    host = value.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return is_loopback(host)


def check_config(config: ServerConfig) -> None:
    """Refuse unsafe or impossible settings before binding (UserError, one line)."""
    if not is_loopback(config.host) and not config.token:
        raise UserError(f"refusing to listen on {config.host} without --token: anyone on the network could "
                        "use the server (use --host 127.0.0.1 or set --token)")
    if config.token is not None and len(config.token.strip()) < 8:
        raise UserError("--token must be at least 8 characters, not counting spaces")
    if not 0 <= config.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {config.port}")
    if config.max_clients < 1:
        raise UserError(f"--max-clients must be at least 1, got {config.max_clients}")
    if config.max_frame_bytes < 1024:
        raise UserError(f"--max-frame-bytes must be at least 1024, got {config.max_frame_bytes}")
    if not config.idle_timeout_s > 0:
        raise UserError(f"--idle-timeout must be positive, got {config.idle_timeout_s}")
    if not config.max_lag_ms > 0:
        raise UserError(f"--max-lag-ms must be positive, got {config.max_lag_ms}")
    if not config.send_timeout_s > 0:
        raise UserError(f"--send-timeout must be positive, got {config.send_timeout_s}")
    if config.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {config.max_batch}")
    if not 0 <= config.batch_runners <= 64:
        raise UserError(f"--batch-runners must be between 0 and 64, got {config.batch_runners}")
    if not 0 <= config.batch_deadline_ms <= 1000:
        raise UserError(f"--batch-deadline-ms must be between 0 and 1000, got {config.batch_deadline_ms:g}")


class BlockScheduler:
    """Runs session work off the event loop on a thread pool (the seam for cross-client batching)."""

    def __init__(self, workers: int = 0):
        workers = workers or self.default_workers()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rtsvc-block")
        self.workers = workers

    @staticmethod
    def default_workers() -> int:
        return min(8, os.cpu_count() or 1)

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def batched_source(source: VoiceSource, scheduler: BatchScheduler, config: ServerConfig,
                   stream_config=None) -> VoiceSource:
    """`source` whose sessions run their whole model blocks through one shared `DeadlineBatcher`: a
    block may wait up to `batch_deadline_ms` for other streams' blocks that are expected soon, never
    past its real-time budget (one block)."""
    from rtsvc.engine import StreamConfig  # the engine pulls in the heavy parts
    from rtsvc.voices.batch import BatchedVoice, run_blocks

    voice = source.model
    block_s = (stream_config or StreamConfig()).for_voice(voice).block_ms / 1000.0
    batcher = scheduler.batcher(run_blocks, config.max_batch, config.batch_deadline_ms / 1000.0)

    def make() -> Voice:
        return BatchedVoice(voice.fork(), batcher, block_s)

    return VoiceSource(source.name, source.speakers, make, voice, source.family, source.default_block_ms)


class Session:
    """One client's stream: settings, engine and rate adapter. Methods run on a worker thread."""

    def __init__(self, voice: Voice, knobs: Knobs, rate: int, fmt: str, stream_config=None,
                 realtime: bool = True, warnings: bool = False):
        from rtsvc.engine import RateAdapter, StreamingConverter  # the engine pulls in the heavy parts

        self.rate, self.format = rate, fmt
        self.realtime, self.warnings = realtime, warnings
        self.pacing = Pacing(rate)
        self.drops = DropCounter(rate)
        self.settings = RuntimeSettings(knobs)
        self.engine = StreamingConverter(voice, self.settings, stream_config)
        self.adapter = RateAdapter(self.engine, rate)
        self.samples_in = 0
        self.samples_out = 0
        self.frames_in = 0
        self.started = time.monotonic()

    @property
    def latency_ms(self) -> float:
        return float(self.adapter.latency_ms)

    def process(self, samples: np.ndarray) -> np.ndarray:
        out = self.adapter.process(samples)
        self.samples_in += samples.shape[0]
        self.samples_out += out.shape[0]
        self.frames_in += 1
        return out

    def drop(self, samples: int) -> np.ndarray:
        """Answer a late frame with silence of its length (the totals stay equal after flush)."""
        self.drops.add(samples)
        self.samples_in += samples
        self.samples_out += samples
        self.frames_in += 1
        return np.zeros(samples, np.float32)

    def flush(self) -> np.ndarray:
        """Every sample still held back; then the stream starts afresh (counters keep running)."""
        out = self.adapter.flush()  # the adapter and engine reset themselves for a new stream
        self.samples_out += out.shape[0]
        return out

    def stats(self) -> dict:
        engine = {k: v for k, v in self.engine.stats().items() if isinstance(v, int | float | str | None)}
        # the server's part of end to end: a sample waits the algorithmic latency, then its block's compute
        e2e = self.latency_ms + float(engine.get("compute_ms_recent", 0.0))
        return {**engine, "samples_in": self.samples_in, "samples_out": self.samples_out,
                "frames_in": self.frames_in, "latency_ms": round(self.latency_ms, 3), "e2e_ms": round(e2e, 1),
                "uptime_s": round(time.monotonic() - self.started, 3), **self.drops.stats()}


def knobs_dict(knobs: Knobs) -> dict:
    return asdict(knobs)


@dataclass
class ServerState:
    """Counters shared by every connection (touched only on the event loop thread)."""

    active: int = 0  # connection handlers running (pending connections and streams)
    sessions_total: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))


class StreamServer:
    """The websocket server. `await start()`, then `await serve_forever()` or `await close()`."""

    def __init__(self, config: ServerConfig, source: VoiceSource, knobs: Knobs | None = None,
                 stream_config=None):
        check_config(config)
        self.config = config
        self.source = source
        self.knobs = knobs or Knobs()
        self.stream_config = stream_config
        self.state = ServerState()
        self.admission = Admission(config.max_clients, config.max_pending, config.max_pending_per_address)
        if config.max_batch > 1 and source.model is not None:
            runners = config.batch_runners or BatchScheduler.default_runners()
            self.scheduler = BatchScheduler(runners, config.max_clients)
            self.source = batched_source(source, self.scheduler, config, stream_config)
        else:
            self.scheduler = BlockScheduler(config.workers)
        self._server = None
        self._static = {p.name: p for p in WEB_DIR.iterdir() if p.is_file()} if WEB_DIR.is_dir() else {}

    # --- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            self._server = await ws_serve(
                self._handle, self.config.host, self.config.port,
                process_request=self._process_request,
                max_size=self.config.max_frame_bytes * HARD_FRAME_FACTOR + MAX_TEXT_BYTES,
                compression=None,  # PCM does not deflate well; saves CPU and a zip-bomb vector
                ping_interval=20, ping_timeout=20, close_timeout=CLOSE_TIMEOUT_S,
                server_header=f"rtsvc/{__version__}",
            )
        except OSError as err:
            where = f"{self.config.host}:{self.config.port}"
            raise UserError(f"cannot listen on {where}: {err.strerror or err}") from None

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.scheduler.close()

    # --- HTTP: /healthz, the page, origin and host checks for everything -----------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        try:
            host, origin = _single_header(request, "Host"), _single_header(request, "Origin")
            upgrade = _single_header(request, "Upgrade") or ""
        except MultipleValuesError as err:
            return connection.respond(HTTPStatus.BAD_REQUEST, f"duplicate {err.args[0]} header\n")
        if not self.config.token and (host is None or not host_header_is_loopback(host)):
            # loopback mode: a page from another site must not reach us by pointing its own host
            # name at 127.0.0.1 (DNS rebinding), so the request must name this machine
            return connection.respond(HTTPStatus.FORBIDDEN, "this server only answers requests for "
                                      "localhost or a loopback address (no --token)\n")
        url = urlsplit(request.path)
        if url.path == STREAM_PATH:
            if origin is not None and not self._origin_allowed(origin, host):
                return connection.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
            return None  # go on with the websocket handshake (websockets refuses non-GET itself)
        if upgrade.lower() == "websocket":
            return connection.respond(HTTPStatus.NOT_FOUND, f"the websocket endpoint is {STREAM_PATH}\n")
        if request.method not in READ_METHODS:
            response = connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD\n")
            response.headers["Allow"] = ", ".join(READ_METHODS)
            return response
        if url.path == "/healthz":
            response = self._json_response(self.health())
        elif url.path == INFO_PATH:  # speaker names: for token holders only, like the stream
            given = (parse_qs(url.query).get("token") or [""])[0]
            if self.config.token and not hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                                             self.config.token.encode()):
                return connection.respond(HTTPStatus.UNAUTHORIZED, "token required (?token=)\n")
            response = self._json_response(self.info())
        else:
            name = "index.html" if url.path == "/" else unquote(url.path)[1:]
            path = self._static.get(name)  # only the files directly inside rtsvc/serve/web, by exact name
            if path is None:
                return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
            response = self._file_response(path)
        if request.method == "HEAD":
            response = replace(response, body=b"")  # headers (Content-Length too) as for GET
        return response

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        allowed = self.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        # the page this server itself serves connects from its own origin
        return host is not None and origin in (f"http://{host}", f"https://{host}")

    def health(self) -> dict:
        return {"status": "ok", "version": __version__, "protocol": PROTOCOL_VERSION, "endpoint": STREAM_PATH,
                "voice": self.source.name, "clients": self.admission.streams,
                "max_clients": self.config.max_clients, "pending": sum(self.admission.pending.values()),
                "behind": self.admission.behind, "sessions_total": self.state.sessions_total,
                "auth": bool(self.config.token)}

    def info(self) -> dict:
        """What the page shows before Start: voice, speakers, default settings, the controls that apply,
        and the engine latency (the denoiser's, per choice, is added when it is on)."""
        from rtsvc.dsp.audio import SAMPLE_RATE
        from rtsvc.dsp.denoise import denoise_latency_samples
        from rtsvc.engine import StreamConfig, StreamLayout

        kind = self.source.family
        config = self.stream_config or StreamConfig()
        if config.block_ms is None:  # auto, as the voice would resolve it
            config = replace(config, block_ms=self.source.default_block_ms)
        latency = StreamLayout.from_config(config, SAMPLE_RATE).latency
        return {"voice": self.source.name, "speakers": list(self.source.speakers),
                "settings": knobs_dict(self.knobs), "auth": bool(self.config.token),
                "latency_ms": round(latency * 1000 / SAMPLE_RATE, 1),
                "denoise_latency_ms": {name: round(denoise_latency_samples(name, SAMPLE_RATE) * 1000
                                                   / SAMPLE_RATE, 1) for name in DENOISE_CHOICES[1:]},
                "controls": [asdict(c) for c in knob_controls(kind)]}

    @staticmethod
    def _json_response(payload: dict) -> Response:
        return _response(HTTPStatus.OK, dumps(payload).encode(), "application/json")

    @staticmethod
    def _file_response(path: Path) -> Response:
        kind = {".js": "text/javascript", ".html": "text/html"}.get(path.suffix) or \
            mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/"):
            kind += "; charset=utf-8"
        return _response(HTTPStatus.OK, path.read_bytes(), kind)

    # --- for other transports (rtsvc.serve.ray_serve) -------------------------------------------
    async def handle(self, ws) -> None:
        """Serve one accepted websocket of another transport: anything with the `recv`, `send`,
        `close`, `request.path`, `remote_address` and `transport.abort()` of a websockets connection
        (raising ConnectionClosed when gone)."""
        await self._handle(ws)

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        return origin is None or self._origin_allowed(origin, host)

    def static_file(self, name: str) -> tuple[bytes, str] | None:
        """(body, content type) of a page file by exact name ("" is index.html), else None."""
        path = self._static.get(name or "index.html")
        if path is None:
            return None
        response = self._file_response(path)
        return response.body, response.headers["Content-Type"]

    # --- websocket --------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        self.state.active += 1
        summary = {"format": None, "sample_rate": None, "samples_in": 0, "samples_out": 0,
                   "error": None, "out_peak": 0.0, "dropped_samples": 0}
        address = str((ws.remote_address or ("?",))[0])
        streaming = False
        try:
            with self.admission.pending_place(address):
                request = await self._read_start(ws)
            self.admission.take_slot()  # only now: the token (if any) was right
            streaming = True
            summary.update(format=request.format, sample_rate=request.sample_rate)
            session = await self._open(ws, request)
            self.state.sessions_total += 1
            await self._stream(ws, session, summary)
        except ProtocolError as err:
            summary["error"] = err.code
            await self._fail(ws, err)
        except ConnectionClosed as err:
            # the client went away (cleanly or not); its session just ends. The connection keeps
            # this exception: drop its traceback so our frames (and the session) are freed now,
            # not at the next garbage collection
            err.__traceback__ = None
        except Exception as err:  # a bug must not take the server down: report and close this client only
            log.exception("session failed")
            summary["error"] = "internal"
            message = f"internal error: {type(err).__name__}"
            await self._fail(ws, ProtocolError("internal", message, CLOSE_INTERNAL))
        finally:
            if streaming:
                self.admission.free_slot()
            self.state.active -= 1
            self.state.history.append(summary)

    async def _recv(self, ws: ServerConnection, timeout: float | None = None):
        timeout = timeout or self.config.idle_timeout_s
        try:
            return await asyncio.wait_for(ws.recv(), timeout=timeout)
        except TimeoutError:
            raise ProtocolError("idle_timeout", f"no message for {timeout:g} s", CLOSE_POLICY) from None

    async def _send(self, ws: ServerConnection, data: str | bytes) -> None:
        """Send, or drop a client that has left its replies unread for send_timeout_s."""
        timeout = self.config.send_timeout_s
        try:
            await asyncio.wait_for(ws.send(data), timeout)
        except TimeoutError:
            raise ProtocolError("not_reading", f"the client read none of its replies for {timeout:g} s",
                                CLOSE_POLICY) from None

    async def _fail(self, ws: ServerConnection, err: ProtocolError) -> None:
        """Send the error message, then close with its code; a peer that reads nothing is cut."""
        try:
            async with asyncio.timeout(min(self.config.send_timeout_s, CLOSE_TIMEOUT_S)):
                await ws.send(dumps(err.to_message()))
                await ws.close(err.close, err.code)
        except ConnectionClosed:
            pass
        except TimeoutError:
            ws.transport.abort()

    async def _read_start(self, ws: ServerConnection) -> StartRequest:
        """The authorized, validated `start` (the connection holds only a pending place meanwhile)."""
        message = await self._recv(ws, min(self.config.start_timeout_s, self.config.idle_timeout_s))
        if isinstance(message, bytes):
            raise ProtocolError("not_started", "send a start message before audio", CLOSE_POLICY)
        message = parse_text(message)
        if message["type"] in ("flush", "set", "stats"):
            raise ProtocolError("not_started", f"send a start message before {message['type']}", CLOSE_POLICY)
        if message["type"] != "start":
            raise ProtocolError("unknown_type", f"unknown message type {message['type']!r}; expected start")
        self._authorize(ws, message.get("token"))
        return parse_start(message)

    async def _open(self, ws: ServerConnection, request: StartRequest) -> Session:
        session = await self.scheduler.run(self._make_session, request)
        await self._send(ws, dumps(ready_message(
            request.sample_rate, request.format, session.latency_ms, self.source.speakers,
            knobs_dict(session.settings.snapshot()), self.config.max_frame_bytes)))
        return session

    def _authorize(self, ws: ServerConnection, token: object) -> None:
        if not self.config.token:
            return
        if token is None:  # the page passes it in the URL: ws://host/v1/stream?token=...
            token = parse_qs(urlsplit(ws.request.path).query).get("token", [None])[0]
        if not isinstance(token, str) or not hmac.compare_digest(token.encode("utf-8", "surrogatepass"),
                                                                 self.config.token.encode()):
            raise ProtocolError("unauthorized", "missing or wrong token", CLOSE_POLICY)

    def _make_session(self, request: StartRequest) -> Session:
        self._check_speaker(request.knobs.get("speaker"), fatal=True)
        try:
            knobs = RuntimeSettings(self.knobs).update(**request.knobs)
        except UserError as err:
            raise ProtocolError("bad_setting", str(err)) from None
        return Session(self.source.make(), knobs, request.sample_rate, request.format, self.stream_config,
                       request.realtime, request.warnings)

    def _check_speaker(self, speaker: object, fatal: bool) -> None:
        if speaker is not None and speaker not in self.source.speakers:
            raise ProtocolError("unknown_speaker", f"unknown speaker {speaker!r}; this server has: "
                                f"{', '.join(self.source.speakers)}", fatal=fatal)

    async def _read_frames(self, ws: ServerConnection, session: Session, inbox: asyncio.Queue) -> None:
        """Receive into `inbox` while earlier frames convert, stamping each frame's due time; the
        connection's end (or a client error) goes into the inbox too, after what came before it."""
        itemsize = FORMATS[session.format].itemsize
        try:
            while True:
                message = await self._recv(ws)
                due = None
                if isinstance(message, bytes):
                    if len(message) > self.config.max_frame_bytes:
                        raise ProtocolError("too_big", f"binary frame of {len(message)} bytes is over the "
                                            f"{self.config.max_frame_bytes}-byte limit", CLOSE_TOO_BIG)
                    due = session.pacing.due(time.monotonic(), len(message) // itemsize)
                await inbox.put((due, message))
        except Exception as err:  # ProtocolError, ConnectionClosed, or a bug: handled in order by _stream
            await inbox.put((None, err))

    async def _stream(self, ws: ServerConnection, session: Session, summary: dict) -> None:
        inbox: asyncio.Queue = asyncio.Queue(INBOX_FRAMES)
        reader = asyncio.create_task(self._read_frames(ws, session, inbox))
        try:
            while True:
                due, message = await inbox.get()
                if isinstance(message, Exception):
                    raise message
                if isinstance(message, bytes):
                    await self._audio(ws, session, message, due, summary)
                else:
                    await self._control(ws, session, parse_text(message), summary)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _audio(self, ws: ServerConnection, session: Session, data: bytes, due: float,
                     summary: dict) -> None:
        samples = decode_pcm(data, session.format)
        if session.realtime and time.monotonic() - due > self.config.max_lag_ms / 1000:
            out = session.drop(samples.shape[0])  # too late to be worth converting: keep up instead
            self.admission.note_drop()
            summary["dropped_samples"] = session.drops.samples
        else:
            out = await self.scheduler.run(session.process, samples)
        await self._send_audio(ws, out, session, summary)
        if session.warnings and session.drops.warning_due():
            await self._send(ws, dumps(session.drops.take_warning(self.config.max_lag_ms)))

    async def _control(self, ws: ServerConnection, session: Session, message: dict, summary: dict) -> None:
        kind = message["type"]
        if kind == "flush":
            out = await self.scheduler.run(session.flush)
            await self._send_audio(ws, out, session, summary)
            await self._send(ws, dumps({"type": "flushed", "samples_in": session.samples_in,
                                        "samples_out": session.samples_out}))
        elif kind == "set":
            await self._set(ws, session, message)
        elif kind == "stats":
            await self._send(ws, dumps({"type": "stats", **session.stats()}))
        elif kind == "start":
            raise ProtocolError("already_started", "the stream is already started", CLOSE_POLICY)
        else:
            raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected flush, set or "
                                "stats")

    async def _set(self, ws: ServerConnection, session: Session, message: dict) -> None:
        try:
            changes = parse_set(message)
            self._check_speaker(changes.get("speaker"), fatal=False)
            try:
                knobs = session.settings.update(**changes)
            except UserError as err:
                raise settings_error(err) from None
        except ProtocolError as err:  # a bad value is reported; the stream goes on unchanged
            await self._send(ws, dumps(err.to_message()))
            return
        await self._send(ws, dumps({"type": "settings", "settings": knobs_dict(knobs)}))

    async def _send_audio(self, ws: ServerConnection, out: np.ndarray, session: Session,
                          summary: dict) -> None:
        """Exactly one binary frame per input frame (empty while the resamplers fill up), so even a
        lockstep client that sends one frame and reads one frame never waits forever."""
        summary["samples_in"], summary["samples_out"] = session.samples_in, session.samples_out
        if out.shape[0]:
            summary["out_peak"] = max(summary["out_peak"], float(np.max(np.abs(out))))
        await self._send(ws, encode_pcm(out, session.format))


def _single_header(request: Request, name: str) -> str | None:
    """A header that must appear at most once (MultipleValuesError otherwise)."""
    values = request.headers.get_all(name)
    if len(values) > 1:
        raise MultipleValuesError(name)
    return values[0] if values else None


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([
        ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
        ("Connection", "close"),
        ("Content-Length", str(len(body))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ])
    return Response(status.value, status.phrase, headers, body)


def dsp_source(f0_method: str = "dio") -> VoiceSource:
    from rtsvc.voices.dsp import DspVoice

    voice = DspVoice(f0_method)  # stateless: one instance serves every session
    return VoiceSource("dsp", list(voice.speakers), lambda: voice, default_block_ms=voice.default_block_ms)


def model_source(voice: Voice, name: str = "model") -> VoiceSource:
    """Sessions of a loaded model share its weights; each gets its own per-stream caches.

    A voice with `fork()` makes the per-session copy itself; otherwise a shallow copy (same
    backend and encoders) is reset so that its caches are its own.
    """
    import copy

    def make() -> Voice:
        fork = getattr(voice, "fork", None)
        if fork is not None:
            return fork()
        clone = copy.copy(voice)
        clone.reset()
        return clone

    batchable = voice if hasattr(voice, "prepare") and getattr(voice, "streaming", False) else None
    family = getattr(getattr(voice, "backend", None), "family", "v2")
    return VoiceSource(name, list(voice.speakers), make, batchable, family, voice.default_block_ms)


def serve(config: ServerConfig, source: VoiceSource, knobs: Knobs | None = None, stream_config=None,
          on_ready: Callable[[StreamServer], None] | None = None) -> None:
    """Run the server until Ctrl-C or SIGTERM (the `rtsvc serve` command).

    Both stop it the same way, as systemd, Docker and Kubernetes stop services with SIGTERM: every
    client is closed with 1001 (going away), blocks being converted finish, and the call returns.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        server = StreamServer(config, source, knobs, stream_config)
        await server.start()
        if on_ready is not None:
            on_ready(server)
        try:
            await stop.wait()
        finally:
            await server.close()

    asyncio.run(main())


__all__ = ["BlockScheduler", "ServerConfig", "Session", "StreamServer", "VoiceSource", "batched_source",
           "check_config", "dsp_source", "model_source", "serve"]
