"""`rtsvc serve`: the websocket streaming endpoint (protocol v1), /healthz and the browser page.

One asyncio event loop owns every socket; it only parses messages and moves bytes. Each client
gets a `Session` (its own RuntimeSettings, StreamingConverter and RateAdapter), and a session's
frames run on the scheduler's worker threads (`rtsvc.serve.scheduler`: `BlockScheduler`, or
`BatchScheduler` with `--max-batch`), so a slow client never stalls the loop or the other clients;
a new session is set up on threads of its own, so admission answers while every worker is busy.
docs/protocol.md describes the wire format; rtsvc/serve/protocol.py parses it.

Seams: every request and handshake first passes `rtsvc.serve.access.check_request` (Host, Origin,
duplicate headers, token), the one admission check the Ray Serve deployment runs too; a connection
reaches `StreamServer.serve_client` as a `rtsvc.serve.transport.Transport` (websockets here,
Starlette under Ray). `Session` and `VoiceSource` are public for other front ends.

Batching: with `max_batch > 1` and a model voice each session's voice is a
`rtsvc.voices.batch.BatchedVoice`: its whole block (features, DiT, vocoder) joins a
`DeadlineBatcher` with the other sessions' blocks that are waiting or expected soon (see
`batched_source`); sessions and the socket code stay as they are.

Hostile clients and overload (docs/protocol.md section 6): connections whose HTTP request has not
arrived are limited per address and in all, and must finish the handshake in time; each stream's
frames are received by their own task while earlier ones convert, stamped with the time they are
due; a frame converts in pieces of at most FRAME_CHUNK_S of audio, a live piece that is too late is
answered with silence instead (policy and admission: rtsvc/serve/overload.py), and a session stops
at its next piece when its client leaves or the server closes; replies left unread in our own
layer for --send-timeout end the stream; SIGTERM stops the server as Ctrl-C does.
"""

import asyncio
import contextlib
import logging
import math
import mimetypes
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from rtsvc import __version__
from rtsvc.errors import UserError
from rtsvc.serve.access import (
    INFO_PATH,
    AccessRules,
    check_request,
    host_header_is_loopback,
    is_loopback,
    origin_allowed,
    query_token,
    token_matches,
)
from rtsvc.serve.capabilities import Capabilities, capabilities_of
from rtsvc.serve.overload import Admission, DropCounter, HalfOpen, Pacing
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
from rtsvc.serve.scheduler import DEFAULT_BATCH_DEADLINE_MS, BatchScheduler, BlockScheduler, Scheduler
from rtsvc.serve.transport import Transport, TransportClosed, WebsocketsTransport, limit_send_buffer
from rtsvc.settings import DENOISE_CHOICES, Knobs, RuntimeSettings, knob_spec
from rtsvc.voice import StreamDefaults, Voice
from rtsvc.voices.blend import check_speaker, is_blend
from rtsvc.voices.defaults import DSP_STREAM

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
HISTORY = 256  # finished-session summaries kept for /healthz and tests (bounded: memory stays flat)
FRAME_CHUNK_S = 0.25  # a frame is converted in pieces of at most this much audio; between pieces the
# work stops when its client has left or the server is closing, and a live piece already later than
# --max-lag-ms is answered with silence (so one huge frame cannot hold a worker for a minute)
SHUTDOWN_CLOSE_TIMEOUT_S = 0.5  # at shutdown, a client's closing handshake is cut after this
HANDSHAKE_TIMEOUT_S = 5.0  # TCP connect to a complete HTTP request and handshake


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
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S  # connect to a finished handshake (or HTTP answer)
    max_half_open: int = 256  # connections whose HTTP request has not fully arrived, in all
    max_half_open_per_address: int = 16  # ... and from one IP address (more are cut at once)

    @property
    def rules(self) -> AccessRules:
        return AccessRules(self.token, self.allowed_origins)


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
    stream_defaults: StreamDefaults = DSP_STREAM  # the voice's own lengths (`--block-ms auto` etc.)
    capabilities: Capabilities | None = None  # what the voice honours (None: all its family's knobs)

    def __post_init__(self):
        if self.capabilities is None:
            self.capabilities = Capabilities(self.family)


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
    if not config.handshake_timeout_s > 0:
        raise UserError(f"handshake timeout must be positive, got {config.handshake_timeout_s}")
    if config.max_half_open < 1 or config.max_half_open_per_address < 1:
        raise UserError("the half-open connection limits must be at least 1")
    if not 0 <= config.batch_deadline_ms <= 1000:
        raise UserError(f"--batch-deadline-ms must be between 0 and 1000, got {config.batch_deadline_ms:g}")


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

    return VoiceSource(source.name, source.speakers, make, voice, source.family, source.stream_defaults,
                       source.capabilities)


class SessionStopped(Exception):
    """The session was stopped (its client left, or the server is closing) while converting."""


class Session:
    """One client's stream: settings, engine and rate adapter, for any front end.

    `convert_frame`, `flush` and `stats` run on a worker thread (never on an event loop); `stop()`
    may be called from any thread and ends a frame's work at its next piece.
    """

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
        self._stop = threading.Event()

    @property
    def latency_ms(self) -> float:
        return float(self.adapter.latency_ms)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def process(self, samples: np.ndarray) -> np.ndarray:
        """One frame in one piece (same length out on average, delayed by `latency_ms`)."""
        return self.convert_frame(samples, chunk_s=math.inf)

    def convert_frame(self, samples: np.ndarray, due: float | None = None, max_lag_s: float = math.inf,
                      chunk_s: float = FRAME_CHUNK_S) -> np.ndarray:
        """One client frame, in pieces of at most `chunk_s` of audio. Between pieces the work stops
        (SessionStopped) once the session is stopped; a later piece that is more than `max_lag_s`
        behind its due time (`due`: the frame's, None: never late) is answered with silence of its
        length. (Whether the frame's first piece is converted at all, the caller decided.)"""
        self.frames_in += 1
        step = samples.shape[0] if math.isinf(chunk_s) else max(1, int(self.rate * chunk_s))
        parts = []
        for begin in range(0, samples.shape[0], max(1, step)):
            if self._stop.is_set():
                raise SessionStopped
            piece = samples[begin:begin + step]
            if begin and due is not None and time.monotonic() - (due + begin / self.rate) > max_lag_s:
                parts.append(self._silence(piece.shape[0]))
            else:
                parts.append(self._convert(piece))
        return np.concatenate(parts) if parts else self._convert(samples)

    def _convert(self, samples: np.ndarray) -> np.ndarray:
        out = self.adapter.process(samples)
        self.samples_in += samples.shape[0]
        self.samples_out += out.shape[0]
        return out

    def _silence(self, samples: int) -> np.ndarray:
        self.drops.add(samples)
        self.samples_in += samples
        self.samples_out += samples
        return np.zeros(samples, np.float32)

    def drop(self, samples: int) -> np.ndarray:
        """Answer a late frame with silence of its length (the totals stay equal after flush)."""
        self.frames_in += 1
        return self._silence(samples)

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
    sessions: set = field(default_factory=set)  # live sessions, stopped when the server closes


class GatedConnection(ServerConnection):
    """A websockets connection that counts as half-open until its HTTP request has arrived: past
    the per-address or total limit it is cut at once (no file descriptor is held), and within them
    the handshake timeout ends it."""

    half_open: HalfOpen

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._half_open_address = str(peer[0]) if peer else "?"
        if not self.half_open.enter(self._half_open_address):
            self._half_open_address = None
            transport.abort()
            return
        limit_send_buffer(transport)  # slow readers show in our own layer (rtsvc.serve.transport)

    def request_arrived(self) -> None:
        if self._half_open_address is not None:
            self.half_open.leave(self._half_open_address)
            self._half_open_address = None

    def connection_lost(self, exc) -> None:
        self.request_arrived()
        super().connection_lost(exc)


class StreamServer:
    """The websocket server. `await start()`, then `await serve_forever()` or `await close()`.

    Other front ends (Ray Serve, an in-process bridge) hand their accepted connections to
    `serve_client` as `rtsvc.serve.transport.Transport`s and ask `rtsvc.serve.access.check_request`
    about requests first, as `start()`'s websockets server does.
    """

    def __init__(self, config: ServerConfig, source: VoiceSource, knobs: Knobs | None = None,
                 stream_config=None):
        check_config(config)
        self.config = config
        self.source = source
        self.knobs = knobs or Knobs()
        self.stream_config = stream_config
        self.state = ServerState()
        self.admission = Admission(config.max_clients, config.max_pending, config.max_pending_per_address)
        self.half_open = HalfOpen(config.max_half_open, config.max_half_open_per_address)
        self.scheduler: Scheduler
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
        half_open = self.half_open

        def gated(*args, **kwargs) -> GatedConnection:
            connection = GatedConnection(*args, **kwargs)
            connection.half_open = half_open
            return connection

        try:
            self._server = await ws_serve(
                self._handle, self.config.host, self.config.port,
                process_request=self._process_request, create_connection=gated,
                open_timeout=self.config.handshake_timeout_s,
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

    def stop_sessions(self) -> None:
        """Stop every session's conversion at its next piece (the server is closing)."""
        for session in list(self.state.sessions):
            session.stop()

    async def close(self) -> None:
        self.stop_sessions()  # workers are free within one piece; then clients get 1001
        if self._server is not None:
            for connection in self._server.connections:  # a client that reads nothing (not even the
                connection.close_timeout = SHUTDOWN_CLOSE_TIMEOUT_S  # close frame) is cut sooner
            self._server.close()
            await self._server.wait_closed()
        self.scheduler.close()

    # --- HTTP: /healthz, the page; the admission rules (rtsvc.serve.access) for everything -----
    def _process_request(self, connection: GatedConnection, request: Request) -> Response | None:
        connection.request_arrived()  # no longer half-open
        refusal = check_request(self.config.rules, request.method, request.path, request.headers.raw_items())
        if refusal is not None:
            response = connection.respond(refusal.status, refusal.message + "\n")
            if refusal.allow:
                response.headers["Allow"] = refusal.allow
            return response
        url = urlsplit(request.path)
        if url.path == STREAM_PATH:
            return None  # go on with the websocket handshake (websockets refuses non-GET itself)
        if url.path == "/healthz":
            response = self._json_response(self.health())
        elif url.path == INFO_PATH:  # (the token was checked above)
            response = self._json_response(self.info())
        else:
            name = "index.html" if url.path == "/" else unquote(url.path)[1:]
            found = self.static_file(name)
            if found is None:
                return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
            response = _response(HTTPStatus.OK, *found)
        if request.method == "HEAD":
            response = replace(response, body=b"")  # headers (Content-Length too) as for GET
        return response

    def health(self) -> dict:
        return {"status": "ok", "version": __version__, "protocol": PROTOCOL_VERSION, "endpoint": STREAM_PATH,
                "voice": self.source.name, "clients": self.admission.streams,
                "max_clients": self.config.max_clients, "pending": sum(self.admission.pending.values()),
                "half_open": self.half_open.total, "behind": self.admission.behind,
                "sessions_total": self.state.sessions_total, "auth": bool(self.config.token)}

    def info(self) -> dict:
        """What the page shows before Start: voice, speakers, default settings, the controls that apply,
        what this voice supports, and the engine latency (the denoiser's, per choice, is added when on)."""
        from rtsvc.dsp.audio import SAMPLE_RATE
        from rtsvc.dsp.denoise import denoise_latency_samples
        from rtsvc.engine import StreamConfig, StreamLayout

        kind = self.source.family
        config = (self.stream_config or StreamConfig()).with_defaults(self.source.stream_defaults)
        if config.block_ms is None:  # auto, as the voice would resolve it
            config = replace(config, block_ms=self.source.stream_defaults.block_ms)
        latency = StreamLayout.from_config(config, SAMPLE_RATE).latency
        return {"voice": self.source.name, "speakers": list(self.source.speakers),
                "settings": knobs_dict(self.knobs), "auth": bool(self.config.token),
                "latency_ms": round(latency * 1000 / SAMPLE_RATE, 1),
                "denoise_latency_ms": {name: round(denoise_latency_samples(name, SAMPLE_RATE) * 1000
                                                   / SAMPLE_RATE, 1) for name in DENOISE_CHOICES[1:]},
                "controls": knob_spec(kind),
                "supports": self.source.capabilities.supports()}

    @staticmethod
    def _json_response(payload: dict) -> Response:
        return _response(HTTPStatus.OK, dumps(payload).encode(), "application/json")

    def static_file(self, name: str) -> tuple[bytes, str] | None:
        """(body, content type) of a page file by exact name ("" is index.html), else None: only the
        files directly inside rtsvc/serve/web (no paths, so no traversal)."""
        path = self._static.get(name or "index.html")
        if path is None:
            return None
        kind = {".js": "text/javascript", ".html": "text/html"}.get(path.suffix) or \
            mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/"):
            kind += "; charset=utf-8"
        return path.read_bytes(), kind

    # --- websocket --------------------------------------------------------------------------
    async def _handle(self, connection: ServerConnection) -> None:
        await self.serve_client(WebsocketsTransport(connection))

    async def serve_client(self, transport: Transport, ready_extra: dict | None = None) -> None:
        """Serve one accepted websocket of any front end until it ends (`ready_extra`: fields added
        to `ready`, e.g. the Ray replica)."""
        self.state.active += 1
        summary = {"format": None, "sample_rate": None, "samples_in": 0, "samples_out": 0,
                   "error": None, "out_peak": 0.0, "dropped_samples": 0}
        streaming, session = False, None
        try:
            with self.admission.pending_place(transport.address):
                request = await self._read_start(transport)
            self.admission.take_slot()  # only now: the token (if any) was right
            streaming = True
            summary.update(format=request.format, sample_rate=request.sample_rate)
            session = await self._open(transport, request, ready_extra)
            self.state.sessions_total += 1
            log.info("client %s connected: speaker %s, %d Hz %s%s", transport.address,
                     session.settings.snapshot().speaker or self.source.speakers[0], request.sample_rate,
                     request.format, "" if request.realtime else " (file)")
            await self._stream(transport, session, summary)
        except ProtocolError as err:
            summary["error"] = err.code
            await self._fail(transport, err)
        except (TransportClosed, SessionStopped):
            pass  # the client went away, or the server is closing (it closes the connection with 1001)
        except Exception as err:  # a bug must not take the server down: report and close this client only
            log.exception("session failed")
            summary["error"] = "internal"
            message = f"internal error: {type(err).__name__}"
            await self._fail(transport, ProtocolError("internal", message, CLOSE_INTERNAL))
        finally:
            if session is not None:
                session.stop()
                self.state.sessions.discard(session)
                log.info("client %s left after %.1f s: speaker %s, %d Hz, %.1f s of audio%s",
                         transport.address, time.monotonic() - session.started,
                         session.settings.snapshot().speaker or self.source.speakers[0], session.rate,
                         session.samples_in / session.rate,
                         f" ({summary['error']})" if summary["error"] else "")
            if streaming:
                self.admission.free_slot()
            self.state.active -= 1
            self.state.history.append(summary)

    async def _recv(self, transport: Transport, timeout: float | None = None):
        timeout = timeout or self.config.idle_timeout_s
        try:
            return await asyncio.wait_for(transport.recv(), timeout=timeout)
        except TimeoutError:
            raise ProtocolError("idle_timeout", f"no message for {timeout:g} s", CLOSE_POLICY) from None

    async def _send(self, transport: Transport, data: str | bytes) -> None:
        """Send, or drop a client whose replies have waited unread in our layer for send_timeout_s
        (`Transport.backlog`), or whose send does not finish in that time."""
        timeout = self.config.send_timeout_s
        queued, waited = transport.backlog()
        if waited > timeout:
            raise ProtocolError("not_reading", f"the client left {queued} bytes of replies unread for "
                                f"{waited:.1f} s (limit {timeout:g} s)", CLOSE_POLICY)
        try:
            await asyncio.wait_for(transport.send(data), timeout)
        except TimeoutError:
            raise ProtocolError("not_reading", f"the client read none of its replies for {timeout:g} s",
                                CLOSE_POLICY) from None

    async def _fail(self, transport: Transport, err: ProtocolError) -> None:
        """Send the error message, then close with its code; a peer that reads nothing is cut."""
        try:
            async with asyncio.timeout(min(self.config.send_timeout_s, CLOSE_TIMEOUT_S)):
                await transport.send(dumps(err.to_message()))
                await transport.close(err.close, err.code)
        except TransportClosed:
            pass
        except TimeoutError:
            transport.abort()

    async def _read_start(self, transport: Transport) -> StartRequest:
        """The authorized, validated `start` (the connection holds only a pending place meanwhile)."""
        message = await self._recv(transport, min(self.config.start_timeout_s, self.config.idle_timeout_s))
        if isinstance(message, bytes):
            raise ProtocolError("not_started", "send a start message before audio", CLOSE_POLICY)
        message = parse_text(message)
        if message["type"] in ("flush", "set", "stats"):
            raise ProtocolError("not_started", f"send a start message before {message['type']}", CLOSE_POLICY)
        if message["type"] != "start":
            raise ProtocolError("unknown_type", f"unknown message type {message['type']!r}; expected start")
        token = message.get("token")
        if token is None:  # the page passes it in the URL: ws://host/v1/stream?token=...
            token = query_token(transport.target)
        if not token_matches(self.config.token, token):
            raise ProtocolError("unauthorized", "missing or wrong token", CLOSE_POLICY)
        return parse_start(message)

    async def _open(self, transport: Transport, request: StartRequest, ready_extra: dict | None) -> Session:
        session = await self.scheduler.setup(self._make_session, request)  # never behind busy workers
        self.state.sessions.add(session)
        await self._send(transport, dumps({**ready_message(
            request.sample_rate, request.format, session.latency_ms, self.source.speakers,
            knobs_dict(session.settings.snapshot()), self.config.max_frame_bytes),
            "supports": self.source.capabilities.supports(), **(ready_extra or {})}))
        return session

    def _make_session(self, request: StartRequest) -> Session:
        self._check_speaker(request.knobs.get("speaker"), fatal=True)
        try:
            knobs = RuntimeSettings(self.knobs).update(**request.knobs)
        except UserError as err:
            raise ProtocolError("bad_setting", str(err)) from None
        refusal = self.source.capabilities.refusal(knobs)
        if refusal is not None:
            raise ProtocolError("bad_setting", refusal)
        return Session(self.source.make(), knobs, request.sample_rate, request.format, self.stream_config,
                       request.realtime, request.warnings)

    def _check_speaker(self, speaker: object, fatal: bool) -> None:
        if speaker is not None and speaker not in self.source.speakers:
            if isinstance(speaker, str) and is_blend(speaker, self.source.speakers) \
                    and self.source.family != "dsp":
                try:  # a blend of this model's speakers (rtsvc.voices.blend)
                    return check_speaker(speaker, self.source.speakers, "this server")
                except UserError as err:
                    raise ProtocolError("unknown_speaker", str(err), fatal=fatal) from None
            raise ProtocolError("unknown_speaker", f"unknown speaker {speaker!r}; this server has: "
                                f"{', '.join(self.source.speakers)}", fatal=fatal)

    async def _read_frames(self, transport: Transport, session: Session, inbox: asyncio.Queue) -> None:
        """Receive into `inbox` while earlier frames convert, stamping each frame's due time; the
        connection's end (or a client error) goes into the inbox too, after what came before it. A
        client that has gone stops its session's work at once: nobody would read the result."""
        itemsize = FORMATS[session.format].itemsize
        try:
            while True:
                message = await self._recv(transport)
                due = None
                if isinstance(message, bytes):
                    if len(message) > self.config.max_frame_bytes:
                        raise ProtocolError("too_big", f"binary frame of {len(message)} bytes is over the "
                                            f"{self.config.max_frame_bytes}-byte limit", CLOSE_TOO_BIG)
                    due = session.pacing.due(time.monotonic(), len(message) // itemsize)
                await inbox.put((due, message))
        except Exception as err:  # ProtocolError, TransportClosed, or a bug: handled in order by _stream
            if isinstance(err, TransportClosed):
                session.stop()
            await inbox.put((None, err))

    async def _stream(self, transport: Transport, session: Session, summary: dict) -> None:
        inbox: asyncio.Queue = asyncio.Queue(INBOX_FRAMES)
        reader = asyncio.create_task(self._read_frames(transport, session, inbox))
        try:
            while True:
                due, message = await inbox.get()
                if isinstance(message, Exception):
                    raise message
                if isinstance(message, bytes):
                    await self._audio(transport, session, message, due, summary)
                else:
                    await self._control(transport, session, parse_text(message), summary)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _audio(self, transport: Transport, session: Session, data: bytes, due: float,
                     summary: dict) -> None:
        samples = decode_pcm(data, session.format)
        max_lag = self.config.max_lag_ms / 1000
        dropped = session.drops.samples
        if session.realtime and time.monotonic() - due > max_lag:
            out = session.drop(samples.shape[0])  # too late to be worth converting: keep up instead
        else:
            out = await self.scheduler.run(session.convert_frame, samples, due if session.realtime else None,
                                           max_lag)
        if session.drops.samples > dropped:
            self.admission.note_drop()
            summary["dropped_samples"] = session.drops.samples
        await self._send_audio(transport, out, session, summary)
        if session.warnings and session.drops.warning_due():
            await self._send(transport, dumps(session.drops.take_warning(self.config.max_lag_ms)))

    async def _control(self, transport: Transport, session: Session, message: dict, summary: dict) -> None:
        kind = message["type"]
        if kind == "flush":
            out = await self.scheduler.run(session.flush)
            await self._send_audio(transport, out, session, summary)
            await self._send(transport, dumps({"type": "flushed", "samples_in": session.samples_in,
                                               "samples_out": session.samples_out}))
        elif kind == "set":
            await self._set(transport, session, message)
        elif kind == "stats":
            await self._send(transport, dumps({"type": "stats", **session.stats()}))
        elif kind == "start":
            raise ProtocolError("already_started", "the stream is already started", CLOSE_POLICY)
        else:
            raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected flush, set or "
                                "stats")

    async def _set(self, transport: Transport, session: Session, message: dict) -> None:
        try:
            changes = parse_set(message)
            self._check_speaker(changes.get("speaker"), fatal=False)
            refusal = self.source.capabilities.refusal(replace(session.settings.snapshot(), **changes))
            if refusal is not None:  # (types were checked by parse_set; sets run one at a time)
                raise ProtocolError("bad_setting", refusal, fatal=False)
            try:
                knobs = session.settings.update(**changes)
            except UserError as err:
                raise settings_error(err) from None
        except ProtocolError as err:  # a bad value is reported; the stream goes on unchanged
            await self._send(transport, dumps(err.to_message()))
            return
        await self._send(transport, dumps({"type": "settings", "settings": knobs_dict(knobs)}))

    async def _send_audio(self, transport: Transport, out: np.ndarray, session: Session,
                          summary: dict) -> None:
        """Exactly one binary frame per input frame (empty while the resamplers fill up), so even a
        lockstep client that sends one frame and reads one frame never waits forever."""
        summary["samples_in"], summary["samples_out"] = session.samples_in, session.samples_out
        if out.shape[0]:
            summary["out_peak"] = max(summary["out_peak"], float(np.max(np.abs(out))))
        await self._send(transport, encode_pcm(out, session.format))


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

    checked = DspVoice(f0_method)  # a bad F0 method fails at start, not at the first client
    # one voice per session: each continues its own stream's pulse clock
    return VoiceSource("dsp", list(checked.speakers), lambda: DspVoice(checked.f0_method),
                       stream_defaults=checked.stream_defaults)


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
    family = voice.backend.family  # its model family: which controls the page shows
    return VoiceSource(name, list(voice.speakers), make, batchable, family, voice.stream_defaults,
                       capabilities_of(voice, family))


def log_clients_to_stderr() -> None:
    """`rtsvc serve` shows one line per client that connects or leaves (INFO on rtsvc.serve), unless
    the embedding program configured logging itself."""
    logger = logging.getLogger("rtsvc.serve")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def serve(config: ServerConfig, source: VoiceSource, knobs: Knobs | None = None, stream_config=None,
          on_ready: Callable[[StreamServer], None] | None = None) -> None:
    """Run the server until Ctrl-C or SIGTERM (the `rtsvc serve` command).

    Both stop it the same way, as systemd, Docker and Kubernetes stop services with SIGTERM: every
    session stops at its next piece of audio (FRAME_CHUNK_S), every client is closed with 1001
    (going away), and the call returns.
    """

    log_clients_to_stderr()

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


__all__ = ["BlockScheduler", "GatedConnection", "ServerConfig", "Session", "SessionStopped", "StreamServer",
           "VoiceSource", "batched_source", "check_config", "dsp_source", "host_header_is_loopback",
           "is_loopback", "log_clients_to_stderr", "model_source", "origin_allowed", "serve"]
