"""`rtsvc serve --ray ADDRESS|auto --replicas N`: the websocket endpoint as a Ray Serve application.

Each replica opens the voice itself and holds a `StreamServer` that never binds a socket: the Ray
Serve proxy accepts the connections (a FastAPI/Starlette websocket route) and every connection is
handed to the same `StreamServer.serve_client` the plain server runs, through `StarletteTransport`
(the `rtsvc.serve.transport.Transport` seam). Every request and handshake first passes
`AccessCheck`, which asks the plain server's `rtsvc.serve.access.check_request` (Host, Origin,
duplicate headers, the token of /v1/info). So protocol v1, admission, limits, knobs and the page are
the plain server's own code; a websocket is one long request, so Serve keeps it on one replica for
its life.

A replica that dies takes only its own connections with it: `rtsvc.serve.ray_proxy` runs inside
the proxy and closes those with 1012 ("service restart": reconnect; Serve routes the new connection
to a live replica and starts a replacement). Ray is optional: `pip install rtsvc[ray]`.

`--ray auto` joins the cluster in $RAY_ADDRESS, else starts a private local instance (loopback
only, no dashboard, usage stats off, small object store) that stops with the command; any other
value is the address of a running cluster (`ray start --head` prints it).
"""

import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rtsvc.errors import UserError
from rtsvc.serve.access import INFO_PATH, AccessRules, check_request
from rtsvc.serve.server import STREAM_PATH, ServerConfig, StreamServer, dsp_source, model_source
from rtsvc.serve.transport import TransportClosed
from rtsvc.settings import Knobs

APP_NAME = "rtsvc"
DEPLOYMENT = "StreamReplica"
START_TIMEOUT_S = 180.0  # replicas load their voice before they count as running
# Environment for a local instance, set before Ray is imported (some are read at import time) and
# inherited by every Ray process: loopback addresses, no usage statistics, plain logs.
LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # on Linux too: node address 127.0.0.1, not the LAN one
    "RAY_DEDUP_LOGS": "0",
    "RAY_SERVE_DEFAULT_HTTP_HOST": "127.0.0.1",
}
PROXY_CALLBACK = "rtsvc.serve.ray_proxy:proxy_middlewares"
LOCAL_OBJECT_STORE_BYTES = 128 << 20


@dataclass
class RayOptions:
    address: str  # "auto" or a cluster address
    replicas: int = 2
    replica_cpus: float = 0.0  # Ray's CPU reservation per replica (0: do not let accounting block)
    replica_gpus: float = 0.0
    steps: int | None = None  # --steps as given (None: a distilled student runs its own count)
    extra_env: dict = field(default_factory=dict)


def check_ray_options(options: RayOptions) -> None:
    if options.replicas < 1:
        raise UserError(f"--replicas must be at least 1, got {options.replicas}")
    if options.replica_cpus < 0 or options.replica_gpus < 0:
        raise UserError("--replica-cpus and --replica-gpus must be at least 0")
    if not options.address:
        raise UserError("--ray needs an address or auto")


class StarletteTransport:
    """A Starlette websocket as a `rtsvc.serve.transport.Transport`. What it sends passes through
    Ray to the proxy, which holds the socket: no backlog is visible here, so a client that reads
    nothing is found by the send time limit alone."""

    def __init__(self, ws):
        self.ws = ws
        query = ws.url.query
        self.target = ws.url.path + (f"?{query}" if query else "")
        self.address = ws.client.host if ws.client else "?"
        self._closed = False

    def abort(self) -> None:
        """No more sends; the handler returns and the proxy drops the connection."""
        self._closed = True

    def backlog(self) -> tuple[int, float]:
        return 0, 0.0

    async def recv(self) -> str | bytes:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            self._closed = True
            raise TransportClosed(f"client closed ({message.get('code', 1000)})")
        return message["bytes"] if message.get("bytes") is not None else message["text"]

    async def send(self, data: str | bytes) -> None:
        await self._io(self.ws.send_bytes if isinstance(data, bytes) else self.ws.send_text, data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self._closed:
            await self._io(self.ws.close, code, reason)
            self._closed = True

    async def _io(self, call, *args) -> None:
        from starlette.websockets import WebSocketDisconnect

        if self._closed:
            raise TransportClosed("closed")
        try:
            await call(*args)
        except (WebSocketDisconnect, RuntimeError, OSError):  # the peer left or the socket closed
            self._closed = True
            raise TransportClosed("the connection is gone") from None


class AccessCheck:
    """ASGI middleware of the replica app: the plain server's admission check
    (`rtsvc.serve.access.check_request`) for every HTTP request and websocket handshake."""

    def __init__(self, app, rules: AccessRules):
        self.app = app
        self.rules = rules

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope["path"] + (f"?{query}" if query else "")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
        refusal = check_request(self.rules, scope.get("method", "GET"), target, headers)
        if refusal is None:
            return await self.app(scope, receive, send)
        body = (refusal.message + "\n").encode()
        head = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        if refusal.allow:
            head.append((b"allow", refusal.allow.encode()))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": int(refusal.status), "headers": head})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in scope.get("extensions", {}):  # the refusal's own status
            await send({"type": "websocket.http.response.start", "status": int(refusal.status),
                        "headers": head})
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # a close before accept: the client gets HTTP 403
            await send({"type": "websocket.close", "code": 1008})


def build_app(config: ServerConfig, spec, knobs: Knobs, stream_config, options: RayOptions):
    """The Serve application: `options.replicas` replicas of the websocket endpoint."""
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import JSONResponse, Response
    from ray import serve

    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    api.add_middleware(AccessCheck, rules=config.rules)

    @serve.deployment(
        name=DEPLOYMENT,
        num_replicas=options.replicas,
        max_ongoing_requests=config.max_clients + 4,  # a websocket holds one for life; + /healthz, page
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        health_check_period_s=2, health_check_timeout_s=10,
        graceful_shutdown_timeout_s=2, graceful_shutdown_wait_loop_s=0.5,
    )
    @serve.ingress(api)
    class StreamReplica:
        def __init__(self):
            from rtsvc.voices.spec import open_voice, sampling_steps

            voice = open_voice(spec)
            source = dsp_source() if spec.model is None else model_source(voice, Path(spec.model).name)
            self.server = StreamServer(config, source, sampling_steps(knobs, voice, options.steps),
                                       stream_config.for_voice(voice))
            self.replica = serve.get_replica_context().replica_id.unique_id

        @api.get("/healthz")
        def healthz(self):
            return JSONResponse({**self.server.health(), "replica": self.replica, "pid": os.getpid()})

        @api.get(INFO_PATH)
        def info(self):  # (the token, when there is one, was checked by AccessCheck)
            return JSONResponse(self.server.info())

        @api.get("/{name:path}")
        def page(self, name: str):
            found = self.server.static_file(name)
            if found is None:
                return Response("not found\n", status_code=404, media_type="text/plain")
            body, kind = found
            return Response(body, headers={"Content-Type": kind, "Cache-Control": "no-store",
                                           "X-Content-Type-Options": "nosniff"})

        @api.websocket(STREAM_PATH)
        async def stream(self, ws: WebSocket):
            await ws.accept()  # (Host and Origin were checked by AccessCheck)
            await self.server.serve_client(StarletteTransport(ws), ready_extra={"replica": self.replica})

    return StreamReplica.bind()


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def connect_ray(options: RayOptions) -> bool:
    """Join or start Ray; True when this command started (and so must stop) the instance."""
    address = options.address
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    local = address == "auto"
    if local:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray Serve: pip install 'rtsvc[ray]'") from None
    # the Serve proxy and the replicas import rtsvc: give them this checkout, and the close-code
    # middleware to the proxy (the proxy inherits the job's environment)
    paths = [_project_root()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
           "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK, **options.extra_env}
    try:
        if local:
            ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     _node_ip_address="127.0.0.1", namespace=APP_NAME, log_to_driver=False,
                     configure_logging=False, runtime_env={"env_vars": env},
                     _temp_dir=tempfile.mkdtemp(prefix="rtsvc-ray-"))
        else:
            ray.init(address=address, namespace=APP_NAME, log_to_driver=False, runtime_env={"env_vars": env})
    except ConnectionError as err:
        raise UserError(f"cannot join the Ray cluster at {address}: {err}") from None
    return local


def deploy(config: ServerConfig, spec, knobs: Knobs, stream_config, options: RayOptions,
           timeout_s: float = START_TIMEOUT_S) -> None:
    """Start Serve's proxy on config.host:config.port and run the app until every replica runs."""
    from ray import serve

    serve.start(http_options={"host": config.host, "port": config.port}, proxy_location="HeadOnly")
    app = build_app(config, spec, knobs, stream_config, options)
    serve.run_many([serve.RunTarget(app, name=APP_NAME, route_prefix="/")],
                   wait_for_applications_running=False)
    wait_running(options.replicas, timeout_s)


def wait_running(replicas: int, timeout_s: float) -> None:
    """Until the app runs `replicas` replicas (UserError on failure or after `timeout_s`)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(APP_NAME)
        status = str(getattr(app.status, "value", app.status)) if app else "MISSING"
        dep = app.deployments.get(DEPLOYMENT) if app else None
        states = dict(dep.replica_states) if dep else {}
        if status == "RUNNING" and states.get("RUNNING", 0) == replicas and len(states) == 1:
            return
        if status == "DEPLOY_FAILED":
            message = (dep.message if dep else "") or (app.message if app else "")
            raise UserError(f"the Ray Serve deployment failed: {message.strip().splitlines()[-1:]}")
        if time.monotonic() > deadline:
            raise UserError(f"the Ray Serve app did not start {replicas} replicas within {timeout_s:g} s "
                            f"({status} {states})")
        time.sleep(0.25)


def stop(started_ray: bool) -> None:
    """Delete the app (its clients get 1012); stop Serve and Ray when this command started them."""
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
        if started_ray:
            serve.shutdown()
    finally:
        ray.shutdown()


def serve_on_ray(config: ServerConfig, spec, knobs: Knobs, stream_config, options: RayOptions,
                 on_ready=None) -> None:
    """`rtsvc serve --ray`: deploy, report, then wait for Ctrl-C or SIGTERM and stop cleanly."""
    check_ray_options(options)

    def interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one signal: let the shutdown finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    started = connect_ray(options)
    # after ray.init, which installs a crash handler for SIGTERM that aborts the process; ours stops
    # cleanly (and also handles SIGINT when started in the background, where SIGINT is ignored)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        deploy(config, spec, knobs, stream_config, options)
        if on_ready is not None:
            on_ready()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop(started)


__all__ = ["APP_NAME", "AccessCheck", "RayOptions", "StarletteTransport", "build_app", "check_ray_options",
           "connect_ray", "deploy", "serve_on_ray", "stop", "wait_running"]
