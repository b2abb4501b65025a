"""The websocket endpoint (`rtsvc serve`): protocol v1 (docs/protocol.md), admission and overload
policy, deadline-aware batching of clients' blocks, the control page (`web/`), and the same endpoint
on Ray Serve (`ray_serve.py`)."""
