"""ASGI middleware that runs inside the Ray Serve proxy (`rtsvc serve --ray`): when the replica
behind an accepted websocket dies, its client gets a close frame with 1012 ("service restart":
reconnect) instead of a dropped TCP connection (1006). Loaded by Serve through
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=rtsvc.serve.ray_proxy:proxy_middlewares.
"""

CLOSE_SERVICE_RESTART = 1012
REASON = "replica lost; reconnect"


class CloseOnReplicaLoss:
    def __init__(self, app, code: int = CLOSE_SERVICE_RESTART, reason: str = REASON):
        self.app = app
        self.code = code
        self.reason = reason

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        state = {"accepted": False, "closed": False}

        async def watched_receive():
            message = await receive()
            if message["type"] == "websocket.disconnect":
                state["closed"] = True
            return message

        async def watched_send(message):
            if message["type"] == "websocket.accept":
                state["accepted"] = True
            elif message["type"] == "websocket.close":
                state["closed"] = True
            await send(message)

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            if state["accepted"] and not state["closed"]:  # the app ended without closing: replica lost
                try:
                    await send({"type": "websocket.close", "code": self.code, "reason": self.reason})
                except Exception:  # the client is gone as well
                    pass


def proxy_middlewares() -> list:
    from starlette.middleware import Middleware

    return [Middleware(CloseOnReplicaLoss)]
