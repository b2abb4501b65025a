"""Front ends that move audio in and out of the engine: live audio, the websocket server and its
page, benchmarks, the loopback latency rig and `doctor`. A new front end goes in this folder."""
